"""A real federation on loopback: SuperLink + SuperNodes over TLS with node authentication, failures, resume.

The first test runs in the default suite (one bank, one round, plus a refused unregistered key, about 40 s);
the three-bank tests are marked slow (each several minutes on two cores: every message starts a ClientApp
process that imports torch).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedchurn.deployment.federation import find_executable
from tests.federation_harness import Federation, kill_tree

pytestmark = [
    pytest.mark.filterwarnings("ignore"),
    pytest.mark.skipif(find_executable("flower-superlink") is None, reason="Flower's CLIs are not installed"),
]
CONFIG = Path(__file__).resolve().parents[1] / "deploy" / "configs" / "federation-demo.yaml"
BANKS = ["bank-01", "bank-02", "bank-03"]


@pytest.fixture
def federation(tmp_path: Path) -> Iterator[Federation]:
    fed = Federation(tmp_path, BANKS)
    try:
        yield fed
    finally:
        fed.close()


def _summary(fed: Federation) -> dict:
    return json.loads((fed.root / "out" / "summary.json").read_text())


def _privacy(fed: Federation, bank: str) -> dict:
    return json.loads((fed.root / bank / "state" / "privacy.json").read_text())


def test_tls_federation_with_node_auth_trains_and_refuses_an_unregistered_key(federation: Federation) -> None:
    fed = federation
    fed.start_superlink()
    fed.register("bank-01")
    fed.start_supernode("bank-01")
    rogue = fed.start_supernode("bank-02")  # its key was never registered
    assert rogue.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in fed.log("bank-02") or "could not establish" in fed.log("bank-02")
    fed.wait_online(1)
    run = fed.start_run("run", CONFIG, "--rounds", "1", "--run-name", "smoke", "--set", "strategy.min_replies=1")
    assert run.wait(timeout=240) == 0, fed.log("run")[-3000:]
    summary = _summary(fed)
    assert summary["rounds"] == 1 and list(summary["institutions"]) == ["bank-01"]
    assert summary["dropped_replies"] == []
    assert 0.0 < summary["institutions"]["bank-01"]["epsilon"] < 10.0
    privacy = _privacy(fed, "bank-01")
    assert privacy["run_id"] == "smoke" and privacy["rounds_trained"] == 1
    assert (fed.root / "bank-01" / "state").stat().st_mode & 0o077 == 0
    assert not (fed.root / "bank-02" / "state" / "privacy.json").exists()


def _start_three(fed: Federation) -> None:
    fed.start_superlink()
    for bank in BANKS:
        fed.register(bank)
        fed.start_supernode(bank)
    fed.wait_online(3)


@pytest.mark.slow
def test_three_banks_complete_two_rounds(federation: Federation) -> None:
    fed = federation
    _start_three(fed)
    run = fed.start_run("run", CONFIG, "--rounds", "2", "--run-name", "three")
    assert run.wait(timeout=600) == 0, fed.log("run")[-3000:]
    summary = _summary(fed)
    assert summary["rounds"] == 2 and sorted(summary["institutions"]) == BANKS
    assert summary["dropped_replies"] == []
    for bank in BANKS:
        assert summary["institutions"][bank]["evaluated_round"] == 2
        assert _privacy(fed, bank)["rounds_trained"] == 2


@pytest.mark.slow
def test_a_supernode_killed_mid_run_does_not_stop_the_run(federation: Federation) -> None:
    fed = federation
    _start_three(fed)
    run = fed.start_run("run", CONFIG, "--rounds", "3", "--run-name", "kill", "--set", "strategy.round_timeout_s=90")
    fed.wait_for(  # banks release evaluation statistics after the last round only: round 1's training is the mark
        lambda: sum(1 for r in fed.records() if r["round"] == 1 and r["phase"] == "train") == 3,
        timeout_s=400,
        what="round 1",
    )
    kill_tree(fed.processes["bank-03"])
    assert run.wait(timeout=900) == 0, fed.log("run")[-3000:]
    summary = _summary(fed)
    assert summary["rounds"] == 3
    dropped = summary["dropped_replies"]
    assert dropped and all("bank-03" in d["institution"] for d in dropped), dropped
    assert summary["institutions"]["bank-01"]["evaluated_round"] == 3
    # bank-03 died before the run's last round, so it never released an evaluation
    assert summary["institutions"].get("bank-03", {}).get("evaluated_round", 0) < 3


@pytest.mark.slow
def test_a_killed_server_resumes_from_its_last_round_and_accounting_continues(federation: Federation) -> None:
    fed = federation
    _start_three(fed)
    args = ("--rounds", "3", "--run-name", "resume", "--set", "strategy.name=fedadam")
    run = fed.start_run("run", CONFIG, *args)
    state = fed.root / "out" / "checkpoints" / "server-state.json"
    fed.wait_for(state.exists, timeout_s=400, what="the round-1 checkpoint")
    kill_tree(fed.processes["superlink"])  # the SuperLink, its SuperExec and the ServerApp, mid-round 2
    kill_tree(run)
    completed = json.loads(state.read_text())["round"]
    assert completed < 3
    fed.start_superlink()  # same database: registrations survive; the SuperNodes reconnect
    fed.wait_online(3)
    resumed = fed.start_run("resumed", CONFIG, *args, "--resume")
    assert resumed.wait(timeout=900) == 0, fed.log("resumed")[-3000:]
    summary = _summary(fed)
    assert summary["rounds"] == 3 and len(summary["seconds_per_round"]) == 3
    train = [r for r in fed.records() if r["phase"] == "train" and not r.get("dropped")]
    assert sorted({r["round"] for r in train}) == [1, 2, 3]
    assert sum(1 for r in train if r["round"] <= completed) == 3 * completed  # kept from before the crash
    for bank in BANKS:
        privacy = _privacy(fed, bank)
        assert privacy["run_id"] == "resume"
        assert privacy["rounds_trained"] >= 3  # continued; a round cut short by the crash counts too
        # Step counts stay at the bank (they reveal its size): its own state holds this run's history.
        run_steps = sum(step["steps"] for step in privacy["accountant_state"]["history"])
        last = next(r for r in train if r["institution"] == bank and r["round"] == 3)
        assert run_steps > 0 and "total-steps" not in last
