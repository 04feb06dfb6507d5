"""Drill: a member is known by its registered key (node id), never by the name its reply carries."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from fedchurn.cli import run_cmd
from fedchurn.deployment.federation import find_executable
from fedchurn.deployment.members import MEMBERS_FILE, RegistryError, node_of_key, read_members, record_member
from fedchurn.shared.config import ConfigError, default_config


def _key(folder: Path, name: str) -> Path:
    path = folder / f"{name}.pub"
    path.write_text(f"ecdsa-sha2-nistp384 AAAA{name} {name}\n")
    return path


def test_registry_binds_one_node_to_one_institution(tmp_path: Path) -> None:
    home = tmp_path / "flwr"
    key1, key2 = _key(tmp_path, "bank-01"), _key(tmp_path, "bank-02")
    record_member(home, "consortium", node_id=11, institution="bank-01", public_key=key1)
    record_member(home, "consortium", node_id=22, institution="bank-02", public_key=key2)
    record_member(home, "consortium", node_id=11, institution="bank-01", public_key=key1)  # idempotent
    assert read_members(home, "consortium") == {11: "bank-01", 22: "bank-02"}
    assert read_members(home, "other") == {}
    assert node_of_key(home, "consortium", key2) == 22
    with pytest.raises(RegistryError, match="already registered as 'bank-01'"):
        record_member(home, "consortium", node_id=11, institution="bank-03", public_key=key1)
    with pytest.raises(RegistryError, match="already registered as node 11"):
        record_member(home, "consortium", node_id=33, institution="bank-01", public_key=_key(tmp_path, "x"))
    assert read_members(home, "consortium") == {11: "bank-01", 22: "bank-02"}  # refusals changed nothing


def test_a_corrupt_registry_is_refused_naming_the_file(tmp_path: Path) -> None:
    (tmp_path / MEMBERS_FILE).write_text("{not json")
    with pytest.raises(RegistryError, match=MEMBERS_FILE):
        read_members(tmp_path, "consortium")
    (tmp_path / MEMBERS_FILE).write_text(json.dumps({"consortium": {"12": {"institution": ""}}}))
    with pytest.raises(RegistryError, match="malformed"):
        read_members(tmp_path, "consortium")


def _args(tmp_path: Path, **extra: object) -> argparse.Namespace:
    values = {
        "config": None,
        "federation": "consortium",
        "run_name": "drill",
        "resume": False,
        "out": str(tmp_path / "out"),
        "rounds": 1,
        "set": [],
        "flwr_home": str(tmp_path / "flwr"),
        "timeout": 5.0,
        "quiet": True,
    }
    values.update(extra)
    return argparse.Namespace(**values)


def test_run_refuses_a_federation_without_a_member_registry(tmp_path: Path, capsys) -> None:
    assert run_cmd.run(_args(tmp_path)) == 1
    assert "no institution is registered" in capsys.readouterr().out
    assert not (tmp_path / "out").exists()


def test_run_sends_the_registry_with_the_run(tmp_path: Path) -> None:
    config = run_cmd.resolve_federated_config(_args(tmp_path), {7: "bank-01", 9: "bank-02"})
    assert config.federation.members == {"7": "bank-01", "9": "bank-02"}


def test_members_config_is_validated() -> None:
    from fedchurn.shared.config import apply_overrides

    with pytest.raises(ConfigError, match="node ids"):
        apply_overrides(default_config(), {"federation.members": {"bank": "bank-01"}})
    with pytest.raises(ConfigError, match="one node"):
        apply_overrides(default_config(), {"federation.members": {"1": "bank-01", "2": "bank-01"}})


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_a_registered_node_claiming_another_banks_name_is_refused(tmp_path: Path) -> None:
    """The issue's drill: bank-02's registered node starts as 'bank-01'. Before: accepted as bank-01 and the
    genuine bank-01 dropped as a second reply. Now: the impostor is refused, bank-01's reply is merged."""
    from tests.federation_harness import Federation

    if find_executable("flower-superlink") is None:
        pytest.skip("Flower's CLIs are not installed")
    fed = Federation(tmp_path, ["bank-01", "bank-02"])
    try:
        fed.start_superlink()
        fed.register("bank-01")
        fed.register("bank-02")
        fed.start_supernode("bank-01")
        fed.start_supernode("bank-02", institution="bank-01")  # registered key, someone else's name
        fed.wait_online(2)
        config = Path(__file__).resolve().parents[1] / "deploy" / "configs" / "federation-demo.yaml"
        run = fed.start_run("run", config, "--rounds", "1", "--run-name", "impostor", "--set", "strategy.min_replies=1")
        assert run.wait(timeout=400) == 0, fed.log("run")[-3000:]
        summary = json.loads((tmp_path / "out" / "summary.json").read_text())
        assert list(summary["institutions"]) == ["bank-01"]
        reasons = [d["reason"] for d in summary["dropped_replies"]]
        assert reasons and all("registered as 'bank-02'" in r for r in reasons), reasons
        from fedchurn.shared.ledger import CONSORTIUM_LEDGER_FILE, JsonlChain

        chain = JsonlChain(tmp_path / "out" / CONSORTIUM_LEDGER_FILE, fresh=False)
        records = [json.loads(entry.record_json) for entry in chain.entries()]
        trained = [r for r in records if r.get("kind") == "train"]
        assert [r["institution"] for r in trained] == ["bank-01"]  # only the genuine reply reached the ledger
    finally:
        fed.close()
