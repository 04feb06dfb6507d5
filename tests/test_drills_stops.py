"""Drills (issue 13): every wait is bounded and Ctrl-C stops cleanly, with the exact command to resume.

Before: Ctrl-C printed "interrupted" and hung for over 200 s; a second one exited with a traceback;
`simulate` with min_replies above the number of institutions hung silently.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SMALL = [
    "--set",
    "data.synthetic.institutions=2",
    "--set",
    "data.synthetic.min_rows=300",
    "--set",
    "data.synthetic.max_rows=400",
    "--set",
    "simulation.ray_num_cpus=2",
]


def test_simulate_refuses_min_replies_above_the_institutions(tmp_path: Path, capsys) -> None:
    from fedchurn.cli.main import main

    code = main(["simulate", "--out", str(tmp_path / "out"), *SMALL, "--set", "strategy.min_replies=3"])
    assert code == 2
    err = capsys.readouterr().err
    assert "strategy.min_replies" in err and "exceeds the 2 institutions" in err


# Enough rounds that the run is still going when the signal lands: a small round takes a fraction of a second.
ROUNDS = 12


def _descendants(pid: int) -> list[int]:
    from tests.federation_harness import descendants

    return descendants(pid)


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


def _simulate(out: Path, *extra: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = ["simulate", "--out", str(out), "--rounds", str(ROUNDS), *SMALL, *extra]
    return subprocess.Popen(
        [sys.executable, "-m", "fedchurn.cli.main", *command],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def _wait_for_round(out: Path, process: subprocess.Popen[str], server_round: int, timeout_s: float) -> list[int]:
    deadline = time.monotonic() + timeout_s
    state = out / "checkpoints" / "server-state.json"
    while time.monotonic() < deadline:
        if state.is_file() and json.loads(state.read_text())["round"] >= server_round:
            return _descendants(process.pid)
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.5)
    raise TimeoutError(f"round {server_round} was not checkpointed within {timeout_s} s")


@pytest.mark.slow
def test_ctrl_c_stops_after_a_checkpointed_round_and_prints_the_resume_command(tmp_path: Path) -> None:
    out = tmp_path / "run"
    process = _simulate(out)
    try:
        children = _wait_for_round(out, process, 1, timeout_s=300)
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130, output[-3000:]
    assert "Traceback" not in output
    completed = json.loads((out / "checkpoints" / "server-state.json").read_text())["round"]
    assert 1 <= completed < ROUNDS
    command = f"fedchurn simulate --resume {out}"
    assert command in output
    time.sleep(2)
    assert [pid for pid in children if _alive(pid)] == []  # Ray and Flower workers gone
    # The printed command continues the run to its end, and every bank's ledger passes the audit.
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    resumed = subprocess.run(
        [sys.executable, "-m", "fedchurn.cli.main", *command.split()[1:]],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["rounds"] == ROUNDS
    audit = subprocess.run(
        [sys.executable, "-m", "fedchurn.cli.main", "audit", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert audit.returncode == 0, (audit.stdout + audit.stderr)[-3000:]


def _wait_for_train_records(out: Path, process: subprocess.Popen[str], server_round: int, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    rounds = out / "rounds.jsonl"
    while time.monotonic() < deadline:
        if rounds.is_file() and any(
            json.loads(line).get("round") == server_round and json.loads(line).get("phase") == "train"
            for line in rounds.read_text().splitlines()
            if line.strip()
        ):
            return
        assert process.poll() is None, process.communicate()[0][-3000:]
        time.sleep(0.05)
    raise TimeoutError(f"round {server_round}'s training was not recorded within {timeout_s} s")


@pytest.mark.slow
def test_a_second_ctrl_c_exits_at_once_and_the_abandoned_round_is_in_the_ledgers_once(tmp_path: Path) -> None:
    """Stopped in round 2's evaluate phase (its training already in the consortium ledger), then resumed: the
    round is trained again, and `fedchurn audit` passes every bank (before: the ledger kept round 2 twice)."""
    out = tmp_path / "run"
    process = _simulate(out)
    try:
        _wait_for_round(out, process, 1, timeout_s=300)
        _wait_for_train_records(out, process, 2, timeout_s=300)
        process.send_signal(signal.SIGINT)
        children = _descendants(process.pid)
        started = time.monotonic()
        process.send_signal(signal.SIGINT)
        output, _ = process.communicate(timeout=60)
        took = time.monotonic() - started
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode == 130 and took < 15, output[-3000:]
    assert "Traceback" not in output and "stopping now" in output
    time.sleep(2)
    assert [pid for pid in children if _alive(pid)] == []
    completed = json.loads((out / "checkpoints" / "server-state.json").read_text())["round"]
    ledger = [json.loads(line)["record"] for line in (out / "consortium_ledger.jsonl").read_text().splitlines()]
    interrupted = any(record.get("round", 0) > completed for record in ledger)  # usually: round 2 trained, not done
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [
        sys.executable,
        "-m",
        "fedchurn.cli.main",
        "simulate",
        "--resume",
        str(out),
    ]
    resumed = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    assert bool(list(out.glob("consortium_ledger.abandoned-*.jsonl"))) == interrupted  # the first attempt, aside
    audit = subprocess.run(
        [sys.executable, "-m", "fedchurn.cli.main", "audit", str(out)],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert audit.returncode == 0, (audit.stdout + audit.stderr)[-3000:]


def test_stop_ends_the_started_process_and_its_children_and_nothing_else(tmp_path: Path, capsys) -> None:
    from fedchurn.cli.main import main

    script = "import subprocess, time; subprocess.Popen(['sleep', '300']); time.sleep(300)"
    ours = subprocess.Popen([sys.executable, "-c", script, "fedchurn-drill"], start_new_session=True)
    other = subprocess.Popen(["sleep", "300"], start_new_session=True)  # someone else's process
    try:
        deadline = time.monotonic() + 10
        while not _descendants(ours.pid) and time.monotonic() < deadline:
            time.sleep(0.1)
        children = _descendants(ours.pid)
        assert children
        (tmp_path / "bank.pid").write_text(f"{ours.pid}\n")
        (tmp_path / "other.pid").write_text(f"{other.pid}\n")
        assert main(["stop", str(tmp_path / "bank.pid"), "--grace", "5"]) == 0
        ours.wait(timeout=10)
        time.sleep(0.5)
        assert [pid for pid in children if _alive(pid)] == []
        assert not (tmp_path / "bank.pid").exists()
        assert main(["stop", str(tmp_path / "other.pid")]) == 1
        assert "left alone" in capsys.readouterr().out and other.poll() is None
    finally:
        for process in (ours, other):
            if process.poll() is None:
                process.kill()
                process.wait()
