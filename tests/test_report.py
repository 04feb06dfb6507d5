"""report.html without a browser: what the page says, what its charts hold, and that nothing in it is live markup
from a bank name or a config value.

The run folders here are written by the server's own recorder (server/report.py), so the report reads the format
a run really writes.
"""

from __future__ import annotations

import base64
import json
import logging
import math
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import pytest

from fedchurn.cli.main import main
from fedchurn.comparison.report import summarise
from fedchurn.reporting import REPORT_FILE, build_report, charts, write_report, write_report_safely
from fedchurn.reporting.run_folder import bank_series, lifetime_cap, read_run_folder
from fedchurn.server.report import RunRecorder
from fedchurn.server.strategy import DroppedReply, Reply
from fedchurn.shared.config import config_to_dict, default_config

HOSTILE = "<script>alert('bank')</script>\"&$x$"


def _reply(name: str, metrics: dict[str, float]) -> Reply:
    return Reply(institution=name, metrics=metrics, message=None, weight=1.0)  # type: ignore[arg-type]


def _evaluation(auc: float, *, epsilon: float, kept_round: int) -> dict[str, float]:
    return {
        "num-examples": 100.0,
        "auc": auc,
        "pr-auc": 0.4,
        "brier": 0.1,
        "ece": 0.05,
        "loss": 0.3,
        "mean-probability": 0.2,
        "churn-rate": 0.25,
        "val-auc": auc,
        "kept-round": float(kept_round),
        "kept-auc": auc,
        "kept-ece": 0.04,
        "epsilon": epsilon,
        "delta": 1e-5,
        "n-train": 0.0,
        "n-test": 100.0,
        **reliability_figures(BINS),
    }


BINS = 10


def reliability_figures(bins: int) -> dict[str, float]:
    """Per-bin figures as a bank sends them: bin j at probability (j + 0.5) / bins with churn rate j / bins and
    10·j noisy rows (bin 0: the noise left it empty, rate NaN)."""
    values: dict[str, float] = {}
    for j in range(bins):
        rows = 10.0 * j
        values |= {f"cal-prob-{j}": (j + 0.5) / bins, f"cal-rate-{j}": j / bins if rows else math.nan}
        values[f"cal-rows-{j}"] = rows
    return values


def make_run(
    folder: Path,
    names: list[str],
    *,
    rounds: int = 3,
    config_overrides: dict[str, Any] | None = None,
) -> Path:
    """A run folder as the server writes it: bank i trains at ε = (i+1)·r/10 in round r and releases
    AUC 0.5 + 0.1·r − 0.01·i after training (ε then 0.05 higher); its kept round is the last."""
    folder.mkdir(parents=True, exist_ok=True)
    recorder = RunRecorder(folder, rounds=rounds)
    for r in range(1, rounds + 1):
        recorder.on_train(
            r,
            [
                _reply(n, {"num-examples": 1.0, "epsilon": (i + 1) * r / 10, "delta": 1e-5, "noise-multiplier": 1.1})
                for i, n in enumerate(names)
            ],
            [DroppedReply(institution=names[0], reason="update norm too large")] if r == 2 else [],
        )
        recorder.on_evaluate(
            r,
            [
                _reply(n, _evaluation(0.5 + 0.1 * r - 0.01 * i, epsilon=(i + 1) * r / 10 + 0.05, kept_round=r))
                for i, n in enumerate(names)
            ],
            [],
        )
        recorder.completed_rounds = r
    config = config_to_dict(default_config()) | {"rounds": rounds, **(config_overrides or {})}
    extra = {
        "run_id": "test-run",
        "seconds": 1.5,
        "strategy": "fedavg",
        "budget": {"max_epsilon": None, "institution_epsilon": {}, "delta": 1e-5, "stopped": {}, "declines": []},
        "privacy": {"enabled": True, "unit": "one customer row", "not_covered": "whether a bank replied"},
        "versions": {"python": "3.x", "torch": "t", "flwr": "f", "opacus": "o", "fedchurn": "0"},
        "config": config,
    }
    recorder.write_summary(recorder.summary(extra=extra))
    (folder / "config.yaml").write_text(json.dumps(config), encoding="utf-8")
    for n in [n for n in names if "/" not in n][:2]:  # a folder per bank (a name with "/" cannot be one)
        bank = folder / "institutions" / n
        bank.mkdir(parents=True)
        record = {"round": rounds, "calibration": {"method": "platt", "a": 0.8, "b": -0.2}}
        (bank / "kept-model.json").write_text(json.dumps(record), encoding="utf-8")
    return folder


class _Elements(HTMLParser):
    """Every start tag with its attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags.append((tag, dict(attrs)))


def _cell(text: str) -> str:
    """A table cell as the page writes it: numbers right-aligned (class n), text not."""
    numeric = text[:1].isdigit() or text[:1] == "-"
    return f'<td class="n">{text}</td>' if numeric else f"<td>{text}</td>"


def _elements(page: str) -> list[tuple[str, dict[str, str | None]]]:
    parser = _Elements()
    parser.feed(page)
    return parser.tags


def _svgs(page: str) -> list[ET.Element]:
    prefix = "data:image/svg+xml;base64,"
    images = [a["src"] for tag, a in _elements(page) if tag == "img"]
    assert images and all(src and src.startswith(prefix) for src in images)
    return [ET.fromstring(base64.b64decode(src[len(prefix) :])) for src in images if src]


def test_run_report_has_its_charts_and_every_bank(tmp_path: Path) -> None:
    names = ["bank-a", "bank-b", "bank-c"]
    path = write_report(make_run(tmp_path / "run", names))
    assert path == tmp_path / "run" / REPORT_FILE
    page = path.read_text(encoding="utf-8")
    # AUC per round, ε per round, ε against caps, reliability, ECE, Platt maps: each a parseable, non-empty SVG
    svgs = _svgs(page)
    assert len(svgs) == 6
    for svg in svgs:
        assert svg.tag.endswith("svg")
        assert len(list(svg.iter("{http://www.w3.org/2000/svg}path"))) > 10
    for name in names:
        assert _cell(name) in page
    # bank-c (i = 2): lifetime ε = its last release, 3·3/10 + 0.05 = 0.95; last AUC 0.5 + 0.3 − 0.02 = 0.78
    assert _cell("0.950") in page
    assert _cell("0.780") in page
    assert "Dropped replies (1)" in page and "update norm too large" in page
    for key in ("python", "torch", "flwr", "opacus", "fedchurn"):
        assert _cell(key) in page


def test_page_is_offline(tmp_path: Path) -> None:
    page = build_report(read_run_folder(make_run(tmp_path, ["a", "b"])))
    for tag, attrs in _elements(page):
        assert tag not in ("script", "link", "iframe", "object", "embed")
        for name in ("src", "href"):
            value = attrs.get(name)
            assert value is None or value.startswith("data:"), (tag, name, value)
    assert "http://" not in page and "https://" not in page
    assert "default-src 'none'" in page  # the page itself forbids any fetch


def test_hostile_bank_name_and_config_values_are_inert(tmp_path: Path) -> None:
    run = make_run(
        tmp_path,
        [HOSTILE, "bank-2"],
        config_overrides={"output_dir": "</pre><img src=x onerror=alert(1)>"},
    )
    page = write_report(run).read_text(encoding="utf-8")
    assert "<script" not in page
    assert "<img src=x" not in page
    tags = _elements(page)
    assert all(tag != "script" for tag, _ in tags)
    assert all(not key.startswith("on") for _, attrs in tags for key in attrs)
    assert "&lt;script&gt;alert(&#x27;bank&#x27;)&lt;/script&gt;&quot;&amp;$x$" in page
    assert len(_svgs(page)) >= 5  # the name (with "$": not mathematics) went through every chart


def test_many_banks_highlight_a_few_and_list_all(tmp_path: Path) -> None:
    names = [f"bank-{i:02d}" for i in range(50)]
    page = write_report(make_run(tmp_path, names, rounds=2)).read_text(encoding="utf-8")
    for name in names:
        assert _cell(name) in page
    # the lowest AUCs are the last banks (AUC falls with i): those five are coloured
    final = {n: 0.7 - 0.01 * i for i, n in enumerate(names)}
    assert charts.highlighted(names, final) == names[:-6:-1]
    assert charts.highlighted(names[:8], final) == names[:8]


def test_auc_chart_shows_chance_and_the_kept_round() -> None:
    per_bank = {"a": {1: 0.6, 2: None, 3: 0.8}, "b": {1: 0.55, 2: 0.65, 3: 0.7}}
    fig = charts.per_round_figure(
        per_bank, highlight=["a", "b"], ylabel="AUC", title="t", chance=0.5, kept={"a": 3, "b": 2}
    )
    ax = fig.axes[0]
    chance = [line for line in ax.get_lines() if str(line.get_label()).startswith("chance")]
    assert len(chance) == 1 and set(chance[0].get_ydata()) == {0.5}  # type: ignore[arg-type]
    stars = [(list(line.get_xdata()), list(line.get_ydata())) for line in ax.get_lines() if line.get_marker() == "*"]
    assert sorted(stars) == [([2], [0.65]), ([3], [0.8])]  # type: ignore[arg-type]
    ys = next(line.get_ydata() for line in ax.get_lines() if line.get_label() == "a")
    assert math.isnan(ys[1])  # type: ignore[index]  # a round without a defined AUC is a gap, not a zero


def test_the_reliability_diagram_of_each_banks_last_release(tmp_path: Path) -> None:
    run = read_run_folder(make_run(tmp_path, ["bank-a", "bank-b"], rounds=3))
    round_number, bins = run.series["bank-a"].reliability or (0, ())
    assert round_number == 3 and len(bins) == BINS
    assert bins[0].rate is None and bins[0].rows == 0.0  # NaN went through rounds.jsonl as null
    assert (bins[4].probability, bins[4].rate, bins[4].rows) == (pytest.approx(0.45), pytest.approx(0.4), 40.0)
    page = build_report(run)
    assert 'alt="reliability diagram per bank"' in page
    # the mean-vs-rate table stays: mean predicted 0.2, observed 0.25 for every bank
    assert _cell("0.200") in page and _cell("0.250") in page


def test_reliability_figure_greys_thin_bins_and_sizes_points_by_rows() -> None:
    from fedchurn.reporting.run_folder import ReliabilityBin

    bins = [
        ReliabilityBin(probability=0.1, rate=None, rows=0.0),  # undefined: not drawn
        ReliabilityBin(probability=0.3, rate=0.2, rows=5.0),  # below min_rows: grey
        ReliabilityBin(probability=0.5, rate=0.6, rows=50.0),
        ReliabilityBin(probability=0.9, rate=0.8, rows=100.0),
    ]
    fig = charts.reliability_figure({"a": bins, "b": bins[2:]}, min_rows={"a": 20.0, "b": 20.0}, rounds={"a": 3})
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert len(visible) == 2 and "round 3" in visible[0].get_title()
    ax = visible[0]
    diagonal = [line for line in ax.get_lines() if list(line.get_xdata()) == [0, 1]]
    assert len(diagonal) == 1 and list(diagonal[0].get_ydata()) == [0, 1]
    thin, enough = ax.collections  # drawn in that order
    assert thin.get_offsets().tolist() == [[0.3, 0.2]]
    assert enough.get_offsets().tolist() == [[0.5, 0.6], [0.9, 0.8]]
    assert tuple(thin.get_facecolors()[0][:3]) != tuple(enough.get_facecolors()[0][:3])  # grey, not blue
    # area grows with the noisy rows: 8 + 140 · rows / the bank's largest
    assert list(enough.get_sizes()) == [pytest.approx(78.0), pytest.approx(148.0)]
    assert list(thin.get_sizes()) == [pytest.approx(15.0)]


def test_a_run_without_per_bin_figures_says_so(tmp_path: Path) -> None:
    folder = make_run(tmp_path, ["bank-a"], rounds=1)
    rounds = folder / "rounds.jsonl"
    lines = [json.loads(line) for line in rounds.read_text(encoding="utf-8").splitlines()]
    old = [{k: v for k, v in line.items() if not k.startswith("cal-")} for line in lines]
    rounds.write_text("".join(json.dumps(line) + "\n" for line in old), encoding="utf-8")
    page = build_report(read_run_folder(folder))
    assert "No bank sent per-bin calibration figures in this run." in page
    assert _cell("0.250") in page  # the mean-vs-rate table does not need them


def test_bank_series_takes_the_largest_epsilon_per_round_and_skips_dropped_replies() -> None:
    records = [
        {"round": 1, "phase": "train", "institution": "a", "epsilon": 1.0, "noise-multiplier": 1.3},
        {"round": 1, "phase": "evaluate", "institution": "a", "epsilon": 1.2, "auc": 0.7, "ece": 0.1},
        {"round": 2, "phase": "train", "institution": "a", "reason": "late", "dropped": True},
        {"round": 2, "phase": "evaluate", "institution": "a", "epsilon": None, "auc": None},
        {"round": "3", "phase": "train", "institution": "a", "epsilon": 9.0},
    ]
    series = bank_series(records)["a"]
    assert series.epsilon == {1: 1.2}
    assert series.auc == {1: 0.7, 2: None}
    assert series.noise_multiplier == 1.3 and series.dropped == 1


def test_lifetime_cap_is_the_lower_of_policy_and_budget() -> None:
    config = {
        "budget": {"max_epsilon": 8.0, "institution_epsilon": {"b": 2.0}},
        "policy": {"lifetime_epsilon": 5.0, "institutions": {"c": {"lifetime_epsilon": 9.0}, "d": {}}},
    }
    assert lifetime_cap(config, "a") == 5.0  # policy 5 < budget 8
    assert lifetime_cap(config, "b") == 2.0  # its budget override
    assert lifetime_cap(config, "c") == 8.0  # its policy allows 9; the budget lowers it
    assert lifetime_cap(config, "d") == 5.0
    assert lifetime_cap({"budget": {"max_epsilon": None}, "policy": {}}, "a") is None


def test_the_cap_a_bank_stated_when_it_stopped_is_shown(tmp_path: Path) -> None:
    run = make_run(tmp_path, ["a", "b"], config_overrides={"budget": {"max_epsilon": 8.0, "institution_epsilon": {}}})
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    reason = "another round would take ε from 0.3 to 0.4, above its budget 0.35"
    summary["budget"]["stopped"] = {"a": {"round": 3, "reason": reason, "epsilon": 0.3, "max_epsilon": 0.35}}
    (run / "summary.json").write_text(json.dumps(summary), encoding="utf-8")
    page = write_report(run).read_text(encoding="utf-8")
    # a: its own cap 0.35 (lifetime ε 0.35 = 3·1/10 + 0.05: 100 % of it); b: the config's budget, 8
    assert "<td>a</td>" + "".join(_cell(v) for v in ("0.350", "0.35", "100 %")) in page
    assert "<td>b</td>" + "".join(_cell(v) for v in ("0.650", "8.00", "8 %")) in page
    assert "before round 3: " + reason in page


def test_comparison_folder_gets_its_table_and_chart(tmp_path: Path) -> None:
    runs = {
        "bank-a": {
            "finetune": [{"auc": 0.8, "pr_auc": 0.5, "epsilon": 3.0}],
            "logreg": [{"auc": 0.7, "pr_auc": 0.4, "epsilon": None}],
        },
        HOSTILE: {
            "finetune": [{"auc": 0.6, "pr_auc": 0.3, "epsilon": 3.0}],
            "logreg": [{"auc": 0.65, "pr_auc": 0.3, "epsilon": None}],
        },
    }
    comparison = summarise(
        runs,
        modes=["finetune", "logreg"],
        labels={"finetune": "federated fine-tune", "logreg": "logistic regression (not private)"},
        private={"finetune": True, "logreg": False},
        target_epsilon=3.0,
        delta=1e-5,
        seeds=[0],
    )
    (tmp_path / "comparison.json").write_text(json.dumps(comparison), encoding="utf-8")
    (tmp_path / "seed-0" / "finetune").mkdir(parents=True)
    (tmp_path / "seed-0" / "finetune" / "report.html").write_text("x", encoding="utf-8")
    page = write_report(tmp_path).read_text(encoding="utf-8")
    assert "<th>federated fine-tune</th>" in page and _cell("0.800") in page and _cell("0.650") in page
    assert len(_svgs(page)) == 1
    assert "<script" not in page
    assert 'href="seed-0/finetune/report.html"' in page


def test_a_failing_report_is_a_warning(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: Any) -> None:
    run = make_run(tmp_path, ["a"])

    def broken(_: Any) -> str:
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("fedchurn.reporting.page.build_report", broken)
    with caplog.at_level(logging.WARNING):
        assert write_report_safely(run) is None
    assert "disk on fire" in caplog.text
    assert write_report_safely(tmp_path / "nothing-here") is None  # no run at all: also only a warning


def test_report_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = make_run(tmp_path / "run", ["a", "b"])
    assert main(["report", str(run)]) == 0
    assert (run / REPORT_FILE).is_file()
    assert str(run / REPORT_FILE) in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    assert main(["report", str(tmp_path / "empty")]) == 2
    assert "neither a run" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore")
def test_simulate_writes_the_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    argv = ["simulate", "--rounds", "2", "--out", str(out), "--set", "data.synthetic.institutions=3"]
    argv += ["--set", "data.synthetic.max_rows=900", "--set", "simulation.ray_num_cpus=2"]
    argv += ["--set", "evaluation.every_rounds=1"]
    assert main(argv) == 0
    assert f"Report: {out}/report.html" in capsys.readouterr().out
    page = (out / REPORT_FILE).read_text(encoding="utf-8")
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    for name, released in summary["institutions"].items():
        assert _cell(name) in page
        assert _cell(f"{released['epsilon']:.3f}") in page
    assert len(_svgs(page)) == 6
    # every bank's evaluate replies carried its per-bin figures (default evaluation.bins = 10) and none was dropped
    records = [json.loads(line) for line in (out / "rounds.jsonl").read_text(encoding="utf-8").splitlines()]
    evaluated = [r for r in records if r.get("phase") == "evaluate"]
    assert evaluated and not any(r.get("dropped") for r in records)
    assert all("cal-rows-9" in r and "cal-rows-10" not in r for r in evaluated)
    assert 'alt="reliability diagram per bank"' in page
