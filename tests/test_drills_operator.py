"""Drill (issue 13): the operator's path of deploy/README.md section 1, run as written (ports made free), then
its "Stop everything" — and afterwards no process started from the demo folder is left running."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from fedchurn.deployment.federation import find_executable, free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "deploy" / "README.md"


def _blocks(text: str) -> list[str]:
    return re.findall(r"```bash\n(.*?)```", text, flags=re.S)


def operator_script(demo: Path, superlink_port: int, first_runtime_port: int) -> str:
    text = README.read_text(encoding="utf-8")
    section = text[text.index("## 1.") : text.index("## 2.")]
    stop = text[text.index("**Stop everything**") :]
    script = "\n".join([*_blocks(section), _blocks(stop)[0]])
    script = script.replace("$HOME/fedchurn-demo", str(demo))
    script = script.replace("9093", str(superlink_port)).replace("port=9101", f"port={first_runtime_port}")
    return "set -euo pipefail\n" + script


def _processes_in(folder: Path) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                cwd = Path(os.readlink(entry / "cwd"))
            except OSError:
                continue
            if cwd == folder or folder in cwd.parents:
                state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
                if state != "Z":
                    found.append(int(entry.name))
    return found


def test_the_script_covers_section_1_and_the_stop() -> None:
    script = operator_script(Path("/tmp/demo"), 19093, 19101)
    for step in ("fedchurn pki ca", "fedchurn superlink", "federation register", "fedchurn supernode", "fedchurn run"):
        assert step in script
    assert "fedchurn stop superlink.pid" in script and "pkill" not in script
    assert not re.search(r"\b9093\b", script) and "port=19101" in script


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_deploy_readme_operator_path_runs_as_written(tmp_path: Path) -> None:
    binary = Path(sys.executable).parent / "fedchurn"
    if not binary.exists() or find_executable("flower-superlink") is None:
        pytest.skip("the fedchurn script or Flower's CLIs are not installed next to this Python")
    demo = tmp_path / "fedchurn-demo"
    env = {
        **os.environ,
        "HOME": str(tmp_path),
        "PYTHONPATH": str(ROOT),
        "PATH": f"{binary.parent}{os.pathsep}{os.environ.get('PATH', '')}",
    }
    script = operator_script(demo, free_port(), free_port())
    process = subprocess.Popen(
        ["bash", "-c", script],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=1200)
        assert process.returncode == 0, output[-4000:]
        summary = json.loads((demo / "runs" / "demo-1" / "summary.json").read_text())
        assert summary["rounds"] == 3 and sorted(summary["institutions"]) == ["bank-01", "bank-02", "bank-03"]
        assert summary["dropped_replies"] == []
        assert "Run " in output and "completed" in output
        left = _processes_in(demo)
        assert left == [], [Path(f"/proc/{pid}/cmdline").read_bytes()[:200] for pid in left]
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
        for pid in _processes_in(demo):
            os.kill(pid, signal.SIGKILL)
