"""Drills (issue 13): hostile or mistaken operator inputs are refused before they can hang or destroy anything."""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import pytest

from fedchurn.shared.errors import ConfigError


def test_a_yaml_alias_bomb_is_refused_at_once(tmp_path: Path) -> None:
    from fedchurn.shared.config import load_config

    lines = ["a: &a [x, x, x, x, x, x, x, x, x]"]
    for level, name in enumerate("bcdefghi"):
        previous = "abcdefghi"[level]
        lines.append(f"{name}: &{name} [{', '.join(['*' + previous] * 9)}]")
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(lines) + "\n")  # 9**9 = 387 million strings once expanded
    started = time.perf_counter()
    with pytest.raises(ConfigError, match=r"aliases \(\*name\) are not allowed"):
        load_config(path)
    assert time.perf_counter() - started < 2.0


def test_a_single_alias_is_refused_too(tmp_path: Path) -> None:
    from fedchurn.shared.config import load_config

    path = tmp_path / "alias.yaml"
    path.write_text("seed: &s 3\nrounds: *s\n")
    with pytest.raises(ConfigError, match="line 2"):
        load_config(path)


def test_a_failed_connect_keeps_the_working_connection(tmp_path: Path) -> None:
    from fedchurn.cli import federation_cmd
    from fedchurn.deployment.federation import FLWR_CONFIG_FILE, free_port, write_connection
    from fedchurn.deployment.pki import create_ca
    from fedchurn.shared.errors import FedChurnError

    home = tmp_path / "flwr"
    create_ca(tmp_path / "good")
    create_ca(tmp_path / "other")
    write_connection(home, "consortium", address="127.0.0.1:9093", ca_cert=tmp_path / "good" / "ca.crt")
    before = (home / FLWR_CONFIG_FILE).read_text()
    args = argparse.Namespace(
        federation_command="connect",
        name="consortium",
        address=f"127.0.0.1:{free_port()}",  # nothing listens there
        ca=str(tmp_path / "other" / "ca.crt"),
        wait=0.0,
        flwr_home=str(home),
    )
    with pytest.raises(FedChurnError, match="cannot reach"):
        federation_cmd.run(args)
    (tmp_path / "not-a-cert.crt").write_text("hello")
    args.ca = str(tmp_path / "not-a-cert.crt")
    with pytest.raises(FedChurnError):
        federation_cmd.run(args)
    assert (home / FLWR_CONFIG_FILE).read_text() == before


def test_the_app_bundle_holds_only_the_apps_code(tmp_path: Path) -> None:
    import io
    import shutil
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    root = Path(__file__).resolve().parents[1]
    project = tmp_path / "project"
    for part in ("fedchurn", "server", "clients", "shared"):
        shutil.copytree(root / part, project / part, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(root / "pyproject.toml", project / "pyproject.toml")
    # What an operator's project folder collects: run outputs, saved configs, a key.
    (project / "fedchurn-run").mkdir()
    (project / "fedchurn-run" / "summary.json").write_text("{}")
    (project / "fedchurn-run" / "rounds.jsonl").write_text("{}\n")
    (project / "my-run.yaml").write_text("seed: 1\n")
    (project / "notes.md").write_text("private\n")
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(project))).namelist()
    code = [n for n in names if n.split("/")[0] in ("server", "clients", "shared")]
    assert code and all(n.endswith(".py") for n in code)
    # Of the operator's package, only the import name the apps live under: no CLI, simulation or audit code.
    assert [n for n in names if n.startswith("fedchurn/")] == ["fedchurn/__init__.py"]
    code.append("fedchurn/__init__.py")
    assert sorted(set(names) - set(code)) == [".info/CONTENT", "pyproject.toml"]
