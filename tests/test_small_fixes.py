"""The small things a careful user hits: --version, defaults in --help, each log line once, the privacy command's
inputs, a noise floor and δ below 1/n, one default consortium size, Ray's session folders, tests that skipped."""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
from collections.abc import Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest

from fedchurn.cli.main import _build_parser, _setup_logging, main
from fedchurn.deployment.federation import find_executable, flower_environment
from fedchurn.shared.config import SyntheticConfig, apply_overrides, default_config
from fedchurn.shared.decline import DELTA_TOO_HIGH_FOR_ROWS, REASON_CODES, Decline
from fedchurn.shared.errors import ConfigError
from fedchurn.simulation.delta_check import check_delta_for_rows
from fedchurn.simulation.ray_head import remove_session_dir

# --------------------------------------------------------------------------------------------------
# --version and --help
# --------------------------------------------------------------------------------------------------


def test_version_names_fedchurn_and_the_libraries_a_run_depends_on(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"fedchurn {metadata.version('fedchurn')} (")
    for library in ("flwr", "torch", "opacus", "ray"):
        assert f"{library} {metadata.version(library)}" in out


def _parsers(parser: argparse.ArgumentParser) -> Iterator[argparse.ArgumentParser]:
    yield parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in action.choices.values():
                yield from _parsers(sub)


def test_every_option_with_a_default_shows_it_in_help() -> None:
    checked = 0
    for parser in _parsers(_build_parser()):
        formatter = parser._get_formatter()
        for action in parser._actions:
            default = action.default
            if not action.option_strings or default in (None, False, argparse.SUPPRESS, "", []):
                continue
            if isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
                continue
            checked += 1
            shown = formatter._expand_help(action) if action.help else ""  # what --help prints for it
            assert "default" in shown, f"{parser.prog} {action.option_strings}: no default shown"
    assert checked >= 10  # privacy --accountant, compare --seeds, demo-data --institutions, pki --days, ...


def test_help_shows_the_actual_default_values(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["federation", "demo-data", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert f"number of banks (default: {SyntheticConfig().institutions})" in flat
    with pytest.raises(SystemExit):
        main(["privacy", "plan", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert "(default: rdp)" in flat


def test_compare_help_names_the_folder_compare_writes_to(capsys: pytest.CaptureFixture[str]) -> None:
    from fedchurn.cli.compare import DEFAULT_OUT

    with pytest.raises(SystemExit):
        main(["compare", "--help"])
    flat = " ".join(capsys.readouterr().out.split())
    assert f"output folder (default: {DEFAULT_OUT}" in flat
    assert "(default: the config's output_dir)" not in flat
    assert "95%%" not in flat


# --------------------------------------------------------------------------------------------------
# Logging: configured once, at the CLI; every line printed once
# --------------------------------------------------------------------------------------------------


# The loggers the CLI configures are restored after every test by tests/conftest.py.


@pytest.mark.parametrize("verbose", [False, True])
def test_each_record_is_printed_once_even_with_a_root_handler(
    verbose: bool, capsys: pytest.CaptureFixture[str]
) -> None:
    # A library that calls logging.basicConfig (Opacus does, at import) puts a handler on the root logger.
    root_handler = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(root_handler)
    _setup_logging(verbose)
    _setup_logging(verbose)  # a second call (tests call main many times) adds no second handler
    logging.getLogger("fedchurn.progress").info("round 1/1 marker-progress")
    logging.getLogger("fedchurn.server.app").warning("marker-warning")
    logging.getLogger("fedchurn.clients.training").info("marker-info")
    err = capsys.readouterr().err
    assert err.count("marker-progress") == 1
    assert err.count("marker-warning") == 1
    assert err.count("marker-info") == (1 if verbose else 0)
    assert "WARNING fedchurn.server.app: marker-warning" in err


def test_importing_opacus_through_fedchurn_leaves_the_root_logger_alone() -> None:
    # Opacus' import-time basicConfig gave the root logger a handler, and Flower's records (which propagate)
    # were then printed twice: once by Flower's handler, once by that one.
    code = "import logging, fedchurn.shared.privacy_accounting; print(len(logging.getLogger().handlers))"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert result.stdout.strip() == "0"


FLOWER_PROCESS = """
import logging
from flwr.common.logger import log
import fedchurn.clients.app, fedchurn.server.app  # as flwr-serverapp / flwr-clientapp load them (Opacus too)
from fedchurn.server.app_logging import log_through_flower
log_through_flower()  # what the ServerApp does first under `flwr run`
log(logging.INFO, "marker-flower")
logging.getLogger("fedchurn.progress").info("marker-round")
logging.getLogger("fedchurn.server.strategy").warning("marker-warning")
"""


def test_in_a_process_flower_runs_every_line_is_printed_once() -> None:
    """Under `flwr run`: Flower's own lines were printed twice (its handler, then Opacus' root handler), the
    per-round line not at all."""
    result = subprocess.run([sys.executable, "-c", FLOWER_PROCESS], capture_output=True, text=True, timeout=180)
    assert result.returncode == 0, result.stderr
    output = result.stdout + result.stderr
    assert output.count("marker-flower") == 1
    assert output.count("marker-round") == 1
    assert output.count("marker-warning") == 1


def test_a_flower_app_process_prints_fedchurn_records_through_flowers_handler(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from fedchurn.server.app_logging import log_through_flower

    package = logging.getLogger("fedchurn")
    package.handlers[:] = []  # a process Flower starts: nothing configured yet
    package.setLevel(logging.NOTSET)
    package.propagate = True
    progress = logging.getLogger("fedchurn.progress")
    progress.handlers[:] = []
    progress.propagate = True
    flower_handler = logging.StreamHandler(sys.stderr)
    flwr = logging.getLogger("flwr")
    flwr.handlers[:] = [flower_handler]
    logging.getLogger().addHandler(logging.StreamHandler(sys.stderr))  # as Opacus' basicConfig would
    log_through_flower()
    log_through_flower()
    logging.getLogger("fedchurn.progress").info("marker-round")
    flwr.info("marker-flower")  # Flower's own records are Flower's business: untouched
    err = capsys.readouterr().err
    assert err.count("marker-round") == 1
    assert package.handlers == [flower_handler]


# --------------------------------------------------------------------------------------------------
# fedchurn privacy epsilon|plan: inputs checked
# --------------------------------------------------------------------------------------------------

EPSILON = ["privacy", "epsilon", "--noise-multiplier", "1.0", "--sample-rate", "0.01", "--steps", "100"]
PLAN = ["privacy", "plan", "--target-epsilon", "3", "--rounds", "5", "--sample-rate", "0.01", "--steps-per-round", "10"]


@pytest.mark.parametrize(
    ("argv", "option", "words"),
    [
        ([*EPSILON, "--delta", "0.5"], "--delta", "δ = 0.5 must be > 0 and <= 0.001"),
        ([*EPSILON, "--delta", "0"], "--delta", "δ = 0 must be > 0"),
        ([*EPSILON, "--delta", "1.5"], "--delta", "well below 1/n"),
        ([*EPSILON[:3], "0", *EPSILON[4:], "--delta", "1e-5"], "--noise-multiplier", "σ = 0 must be > 0"),
        ([*EPSILON[:3], "-1", *EPSILON[4:], "--delta", "1e-5"], "--noise-multiplier", "must be > 0"),
        ([*EPSILON[:5], "1.5", *EPSILON[6:], "--delta", "1e-5"], "--sample-rate", "q = 1.5 must be > 0 and <= 1"),
        ([*EPSILON[:5], "0", *EPSILON[6:], "--delta", "1e-5"], "--sample-rate", "q = 0 must be"),
        ([*EPSILON[:7], "0", "--delta", "1e-5"], "--steps", "must be a whole number >= 1, got 0"),
        ([*EPSILON[:7], "2.5", "--delta", "1e-5"], "--steps", "'2.5' is not a whole number"),
        ([*EPSILON, "--delta", "nan"], "--delta", "not a finite number"),
        (
            [*PLAN[:3], "-1", *PLAN[4:], "--delta", "1e-5"],
            "--target-epsilon",
            "must be > 0",
        ),
        (
            [*PLAN, "--delta", "0.2"],
            "--delta",
            "δ = 0.2",
        ),
    ],
)
def test_privacy_command_refuses_inputs_with_no_meaningful_epsilon(
    argv: list[str], option: str, words: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # no ε printed, least of all a negative one
    assert f"argument {option}: " in captured.err
    assert words in captured.err
    assert "(give" in captured.err  # and the fix


def test_privacy_epsilon_still_answers_sensible_inputs(capsys: pytest.CaptureFixture[str]) -> None:
    assert main([*EPSILON, "--delta", "1e-5", "--json"]) == 0
    import json

    value = json.loads(capsys.readouterr().out)["epsilon"]
    assert 0.0 < value < 10.0


# --------------------------------------------------------------------------------------------------
# A noise floor in the config; δ below 1/n for every bank
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("sigma", [1e-5, 0.01, 0.1, 0.29])
def test_a_noise_multiplier_below_the_floor_is_refused(sigma: float) -> None:
    with pytest.raises(ConfigError) as refused:
        apply_overrides(default_config(), {"privacy.noise_multiplier": sigma})
    message = str(refused.value)
    assert "'privacy.noise_multiplier'" in message and "must be in [0.3, 100]" in message
    assert "privacy.enabled: false" in message and "privacy.target_epsilon" in message


def test_the_noise_floor_itself_and_no_dp_are_accepted() -> None:
    assert apply_overrides(default_config(), {"privacy.noise_multiplier": 0.3}).privacy.noise_multiplier == 0.3
    off = apply_overrides(default_config(), {"privacy.enabled": False, "privacy.noise_multiplier": 0.0})
    assert not off.privacy.enabled


def test_plan_refuses_delta_not_below_one_over_the_largest_banks_rows() -> None:
    # δ must be below 1/n for every bank: hardest for the bank with the most rows (the smallest 1/n).
    config = apply_overrides(default_config(), {"privacy.delta": 0.004})
    with pytest.raises(ConfigError) as refused:
        check_delta_for_rows(config, {"bank-01": 200, "bank-02": 260, "bank-03": 240})
    message = str(refused.value)
    assert "bank-02" in message and "n = 260" in message and "1/n = 0.00385" in message
    assert "'privacy.delta' = 0.004" in message and "1/(10 n) = 3.8e-04" in message
    check_delta_for_rows(config, {"bank-01": 200, "bank-02": 249})  # 0.004 < 1/249
    with pytest.raises(ConfigError):
        check_delta_for_rows(config, {"bank-01": 250})  # δ = 1/n exactly is not below it
    off = apply_overrides(config, {"privacy.enabled": False})
    check_delta_for_rows(off, {"bank-01": 100_000})  # no DP: no δ to check


def test_delta_below_but_near_one_over_n_warns(caplog: pytest.LogCaptureFixture) -> None:
    config = apply_overrides(default_config(), {"privacy.delta": 0.003})
    with caplog.at_level(logging.WARNING, logger="fedchurn.simulation.delta_check"):
        check_delta_for_rows(config, {"bank-01": 300})
    assert "not well below" in caplog.text and "bank-01" in caplog.text


def test_simulation_plan_checks_delta_against_the_synthetic_banks(tmp_path: Path) -> None:
    from fedchurn.simulation.driver import plan_simulation

    config = apply_overrides(
        default_config(), {"privacy.delta": 0.01, "output_dir": str(tmp_path / "run"), "data.synthetic.institutions": 2}
    )
    with pytest.raises(ConfigError, match=r"is not below 1/n for bank-0\d, which has n = \d+ training rows"):
        plan_simulation(config)


def test_the_banks_delta_decline_is_a_fixed_code_with_numbers_that_say_nothing() -> None:
    assert DELTA_TOO_HIGH_FOR_ROWS in REASON_CODES
    decline = Decline.code_only(DELTA_TOO_HIGH_FOR_ROWS)
    assert set(decline.metrics().values()) == {0.0}  # no n, no 1/n
    assert "1/n" in decline.explain()


# --------------------------------------------------------------------------------------------------
# One default consortium size
# --------------------------------------------------------------------------------------------------


def test_demo_data_defaults_to_the_consortium_simulate_runs() -> None:
    args = _build_parser().parse_args(["federation", "demo-data", "--out", "x"])
    assert args.institutions == default_config().data.synthetic.institutions == SyntheticConfig().institutions


# --------------------------------------------------------------------------------------------------
# Ray's session folder
# --------------------------------------------------------------------------------------------------


def test_remove_session_dir_removes_only_its_own_session(tmp_path: Path) -> None:
    ours = tmp_path / "session_2026-01-01_00-00-00_000001_1"
    theirs = tmp_path / "session_2026-01-01_00-00-00_000002_2"
    for session in (ours, theirs):
        (session / "logs").mkdir(parents=True)
        (session / "logs" / "raylet.out").write_text("log")
    os.symlink(ours, tmp_path / "session_latest")
    remove_session_dir(ours)
    assert not ours.exists() and not (tmp_path / "session_latest").is_symlink()
    assert (theirs / "logs" / "raylet.out").exists()
    # The link is left when it names another session; a path that is not a session folder is never removed.
    os.symlink(theirs, tmp_path / "session_latest")
    other = tmp_path / "results"
    other.mkdir()
    remove_session_dir(other)
    remove_session_dir(None)
    assert other.exists() and (tmp_path / "session_latest").is_symlink()


# --------------------------------------------------------------------------------------------------
# Tests that skipped for a package that is installed
# --------------------------------------------------------------------------------------------------


def test_flowers_commands_are_found_beside_this_python_without_an_activated_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The federation tests skipped ('Flower's CLIs are not installed') whenever the venv's python ran them
    without the venv on PATH; the processes they start then could not find one another either."""
    monkeypatch.setenv("PATH", "/nonexistent")
    found = find_executable("flower-superlink")
    assert found is not None and Path(found).parent == Path(sys.executable).parent
    assert flower_environment()["PATH"].split(os.pathsep)[0] == str(Path(sys.executable).parent)


# --------------------------------------------------------------------------------------------------
# Written configs keep the template's comments and relative paths, and read back identically
# --------------------------------------------------------------------------------------------------


def _rich_config(tmp_path: Path) -> Any:
    from fedchurn.shared.config import SchemaConfig

    base = default_config()
    schema = SchemaConfig(
        label="churn",
        positive="yes",
        numeric=("age", "balance"),
        categorical={"region": ("north", "south #2"), "card": ("blue", "gold: premium")},
        drop=("customer_id",),
    )
    files = {"bank one": str(tmp_path / "data" / "one.csv"), "bank-2$": str(tmp_path / "data" / "two.csv")}
    data = dataclasses.replace(base.data, source="csv", institution_files=files, schema=schema)
    config = dataclasses.replace(base, data=data, seed=42, rounds=3)
    return apply_overrides(
        config,
        {
            "privacy.noise_multiplier": 2.5,
            "budget.institution_epsilon": {"bank one": 3.0},
            "policy.institutions": {"bank-2$": {"min_noise_multiplier": 1.0}},
            "model.encoder_checkpoint": str(tmp_path / "pretrained" / "encoder.pt"),
        },
    )


def test_a_written_config_keeps_the_templates_comments_with_the_users_values(tmp_path: Path) -> None:
    from fedchurn.shared.config import DEFAULT_CONFIG_YAML, config_from_dict, dump_config, load_yaml

    config = _rich_config(tmp_path)
    text = dump_config(config)
    assert config_from_dict(load_yaml(text)) == config
    lines = text.splitlines()
    sigma = next(line for line in lines if line.strip().startswith("noise_multiplier: 2.5"))
    assert sigma.endswith("# or null, with target_epsilon for the whole run")
    # Every comment of the embedded default is kept (on its key's line or the lines after it).
    template_comments = [line.split("#", 1)[1].strip() for line in DEFAULT_CONFIG_YAML.splitlines() if "#" in line]
    kept = [line.split("#", 1)[1].strip() for line in lines if "#" in line]
    missing = [c for c in template_comments[2:] if c not in kept]  # [2:]: the template's own title lines
    assert missing == []


def test_a_written_config_stores_paths_relative_to_its_file_and_reads_back_identically(tmp_path: Path) -> None:
    from fedchurn.shared.config import dump_config, load_config

    config = _rich_config(tmp_path)
    run = tmp_path / "runs" / "r1"
    run.mkdir(parents=True)
    path = run / "config.yaml"
    path.write_text(dump_config(config, relative_to=run), encoding="utf-8")
    text = path.read_text(encoding="utf-8")
    assert str(tmp_path) not in text  # no absolute path of this machine
    assert "../../data/one.csv" in text and "encoder_checkpoint: ../../pretrained/encoder.pt" in text
    assert load_config(path) == config  # what resume (server/resume.py) and the audit read back


def test_paths_with_nothing_in_common_but_the_root_stay_absolute(tmp_path: Path) -> None:
    from fedchurn.shared.config_writer import relative_path

    assert relative_path("/opt/bank/data.csv", folder=tmp_path) == "/opt/bank/data.csv"
    assert relative_path(str(tmp_path / "a" / "b.csv"), folder=tmp_path / "c") == "../a/b.csv"
    assert relative_path(None, folder=tmp_path) is None


@pytest.mark.slow
def test_a_run_folders_config_keeps_relative_data_paths_and_resumes_from_it(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    from fedchurn.shared.config import dump_config, load_config
    from fedchurn.shared.institution_rows import write_csv
    from fedchurn.shared.synthetic_consortium import SYNTHETIC_SCHEMA, generate_synthetic_institution

    synthetic = SyntheticConfig(institutions=2, min_rows=300, max_rows=400)
    files = {}
    for index in range(2):
        table = generate_synthetic_institution(synthetic, index, seed=3)
        files[table.institution] = str(tmp_path / "data" / f"{table.institution}.csv")
        write_csv(table, Path(files[table.institution]))
    base = default_config()
    data = dataclasses.replace(base.data, source="csv", institution_files=files, schema=SYNTHETIC_SCHEMA)
    config = apply_overrides(
        dataclasses.replace(base, data=data),
        {"simulation.ray_num_cpus": 1, "federation.run_name": "relative-paths", "privacy.delta": 1.0e-5},
    )
    (tmp_path / "project").mkdir()
    start = tmp_path / "project" / "config.yaml"
    start.write_text(dump_config(config, relative_to=start.parent), encoding="utf-8")
    assert "../data/" in start.read_text(encoding="utf-8")
    out = tmp_path / "project" / "runs" / "r1"
    assert main(["simulate", str(start), "--out", str(out), "--rounds", "1"]) == 0
    written = (out / "config.yaml").read_text(encoding="utf-8")
    assert "../../../data/bank-01.csv" in written and str(tmp_path) + "/data" not in written
    assert "# per-customer gradient bound" in written
    assert load_config(out / "config.yaml").data.institution_files == {
        name: str(Path(path).resolve()) for name, path in files.items()
    }
    # The resume command the CLI prints reads that file: same config, so the run continues at round 2.
    assert main(["simulate", str(out / "config.yaml"), "--set", "federation.resume=true", "--rounds", "2"]) == 0
    err = capsys.readouterr().err
    assert "round 2/2" in err and "round 1/2" not in err  # continued, not started over
