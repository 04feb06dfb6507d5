"""fedchurn: federated transfer learning for bank churn prediction.

The Flower apps live in the repository's top-level folders and are imported under this name:
``fedchurn.server`` (the consortium's ServerApp), ``fedchurn.clients`` (each bank's ClientApp) and
``fedchurn.shared`` (the code both sides run). Everything else in this package is for the people who run
the platform: the command line, simulations, comparisons, pretraining, scoring, audits and deployment.

The Python API (``fedchurn/api``) is reachable from here: ``fedchurn.simulate(...)``, ``fedchurn.load_run(dir)``,
``fedchurn.compare``, ``fedchurn.pretrain``, ``fedchurn.predict``, ``fedchurn.audit``, ``fedchurn.export_split``
and ``fedchurn.find_runs``. They are imported on first use: importing ``fedchurn`` (as the Flower apps do) stays
cheap and loads neither torch, pandas nor Flower.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Any

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

_API = frozenset(
    {
        "AuditResult",
        "ComparisonResult",
        "PredictionResult",
        "PretrainResult",
        "RunInfo",
        "RunResult",
        "SplitExport",
        "audit",
        "compare",
        "export_split",
        "find_runs",
        "inspect_run",
        "load_run",
        "predict",
        "pretrain",
        "simulate",
    }
)
__all__ = sorted(_API)

if TYPE_CHECKING:
    from fedchurn.api import (
        AuditResult as AuditResult,
    )
    from fedchurn.api import (
        ComparisonResult as ComparisonResult,
    )
    from fedchurn.api import (
        PredictionResult as PredictionResult,
    )
    from fedchurn.api import (
        PretrainResult as PretrainResult,
    )
    from fedchurn.api import (
        RunInfo as RunInfo,
    )
    from fedchurn.api import (
        RunResult as RunResult,
    )
    from fedchurn.api import (
        SplitExport as SplitExport,
    )
    from fedchurn.api import (
        audit as audit,
    )
    from fedchurn.api import (
        compare as compare,
    )
    from fedchurn.api import (
        export_split as export_split,
    )
    from fedchurn.api import (
        find_runs as find_runs,
    )
    from fedchurn.api import (
        inspect_run as inspect_run,
    )
    from fedchurn.api import (
        load_run as load_run,
    )
    from fedchurn.api import (
        predict as predict,
    )
    from fedchurn.api import (
        pretrain as pretrain,
    )
    from fedchurn.api import (
        simulate as simulate,
    )


def __getattr__(name: str) -> Any:
    """The API's names, imported on first use (``fedchurn.simulate``)."""
    if name in _API:
        import fedchurn.api

        return getattr(fedchurn.api, name)
    raise AttributeError(f"module 'fedchurn' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_API})
