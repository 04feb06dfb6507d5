"""fedchurn: federated transfer learning for bank churn prediction.

The Flower apps live in the repository's top-level folders and are imported under this name:
``fedchurn.server`` (the consortium's ServerApp), ``fedchurn.clients`` (each bank's ClientApp) and
``fedchurn.shared`` (the code both sides run). Everything else in this package is for the people who run
the platform: the command line, simulations, comparisons, pretraining, scoring, audits and deployment.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

# In a source checkout or a Flower app bundle the apps sit beside this folder (server/, clients/, shared/); an
# installed wheel puts them inside it. Looking beside it too lets `flwr run .` import `fedchurn.server.app`
# from a bundle without anything installed there.
_APP_PACKAGES = ("server", "clients", "shared")
_here = Path(__file__).resolve().parent
if not (_here / "server").is_dir() and all((_here.parent / name / "__init__.py").is_file() for name in _APP_PACKAGES):
    __path__.append(str(_here.parent))

try:
    __version__ = version("fedchurn")
except PackageNotFoundError:  # a bundle or checkout that was never installed
    __version__ = "0+unknown"
