"""Config: YAML ⇄ dataclasses ⇄ Flower run-config, and an error naming key, value and rule for each bad input."""

from __future__ import annotations

import dataclasses
import tomllib
from pathlib import Path

import pytest
from flwr.common.config import flatten_dict

from fedchurn.shared.config import (
    FedChurnConfig,
    SchemaConfig,
    apply_overrides,
    config_from_dict,
    config_from_run_config,
    config_to_dict,
    config_to_run_config,
    default_config,
    dump_config,
    load_config,
    parse_override,
)
from fedchurn.shared.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]


def _csv_config() -> FedChurnConfig:
    schema = SchemaConfig(
        label="churn",
        positive="yes",
        numeric=("age", "balance"),
        categorical={"region": ("north", "south"), "card": ("blue", "gold")},
        drop=("customer_id",),
    )
    base = default_config()
    data = dataclasses.replace(
        base.data, source="csv", csv_path="/data/all.csv", institution_column="bank", schema=schema
    )
    privacy = dataclasses.replace(base.privacy, noise_multiplier=None, target_epsilon=3.0, accountant="prv")
    return dataclasses.replace(base, data=data, privacy=privacy, seed=42, rounds=3)


@pytest.mark.parametrize("config", [default_config(), _csv_config()], ids=["default", "csv"])
def test_round_trips(config: FedChurnConfig, tmp_path: Path) -> None:
    assert config_from_dict(config_to_dict(config)) == config
    run_config = config_to_run_config(config)
    assert all(isinstance(v, (bool, int, float, str)) for v in run_config.values())
    assert config_from_run_config(run_config) == config
    path = tmp_path / "c.yaml"
    path.write_text(dump_config(config))
    assert load_config(path) == config


def test_run_config_values_are_flat_scalars_flower_accepts() -> None:
    run_config = config_to_run_config(_csv_config())
    # Flower flattens nested tables with "."; our keys must survive that unchanged.
    nested: dict = {}
    for key, value in run_config.items():
        node = nested
        *parents, leaf = key.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    assert flatten_dict(nested) == run_config
    assert run_config["privacy.target_epsilon"] == 3.0
    assert run_config["privacy.noise_multiplier"] == "null"
    assert run_config["model.encoder_hidden"] == "[64, 32]"


def test_pyproject_flower_config_is_the_embedded_default() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    flower_config = flatten_dict(pyproject["tool"]["flwr"]["app"]["config"])
    assert flower_config == config_to_run_config(default_config())
    components = pyproject["tool"]["flwr"]["app"]["components"]
    assert components == {"serverapp": "fedchurn.server.app:app", "clientapp": "fedchurn.clients.app:app"}


def test_unknown_run_config_key_refused() -> None:
    run_config = config_to_run_config(default_config())
    run_config["privacy.epsilon_budget"] = 3.0
    with pytest.raises(ConfigError, match="privacy.epsilon_budget"):
        config_from_run_config(run_config)


def _error(values: dict) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        config_from_dict(values)
    return info.value


@pytest.mark.parametrize(
    ("values", "key", "rule"),
    [
        ({"rounds": 0}, "rounds", "must be 1..100000"),
        ({"rounds": "five"}, "rounds", "must be an integer"),
        ({"rounds": 2.5}, "rounds", "must be an integer"),
        ({"privacy": {"delta": "1e-5"}}, "privacy.delta", "must be a number"),
        ({"privacy": {"delta": 2.0}}, "privacy.delta", "must be > 0 and < 1"),
        ({"privacy": {"clipping_norm": -1.0}}, "privacy.clipping_norm", "must be > 0"),
        ({"privacy": {"noise_multiplier": None}}, "privacy.noise_multiplier", "exactly one of"),
        ({"privacy": {"target_epsilon": 3.0}}, "privacy.noise_multiplier", "exactly one of"),
        ({"privacy": {"accountant": "gdp"}}, "privacy.accountant", "one of 'rdp', 'prv'"),
        ({"privacy": {"enabled": "yes"}}, "privacy.enabled", "true or false"),
        ({"privasy": {}}, "privasy", "unknown key"),
        ({"training": {"batch_size": 0}}, "training.batch_size", "must be 1..1000000"),
        ({"training": {"optimizer": "rmsprop"}}, "training.optimizer", "one of 'sgd', 'adam'"),
        ({"model": {"encoder_hidden": 64}}, "model.encoder_hidden", "a list of an integer"),
        ({"model": {"encoder_hidden": [64, "x"]}}, "model.encoder_hidden[1]", "must be an integer"),
        ({"strategy": {"name": "scaffold"}}, "strategy.name", "one of 'fedavg', 'fedprox', 'fedadam'"),
        ({"strategy": {"fraction_train": 0.0}}, "strategy.fraction_train", "must be in (0, 1]"),
        ({"data": {"source": "csv"}}, "data.schema", "is required when data.source is 'csv'"),
        ({"data": {"test_fraction": 0.6}}, "data.test_fraction", "must be > 0 and < 0.5"),
        ({"data": {"synthetic": {"min_rows": 500, "max_rows": 100}}}, "data.synthetic.max_rows", "must be >="),
        ({"data": "synthetic"}, "data", "must be a mapping"),
        (
            {"data": {"source": "csv", "schema": {"label": "y", "numeric": ["a"]}}},
            "data.csv_path",
            "give data.csv_path with data.institution_column",
        ),
        (
            {"data": {"source": "csv", "csv_path": "a.csv", "schema": {"label": "y", "numeric": ["a"]}}},
            "data.institution_column",
            "is required with data.csv_path",
        ),
        ({"data": {"schema": {"label": "y"}}}, "data.schema", "declare at least one"),
        ({"data": {"schema": {"label": "y", "numeric": ["y"]}}}, "data.schema.numeric", "label column cannot be"),
        (
            {"data": {"schema": {"label": "y", "numeric": ["a"], "categorical": {"a": ["x"]}}}},
            "data.schema.categorical",
            "already declared as numeric",
        ),
        (
            {"data": {"schema": {"label": "y", "numeric": ["a"], "categorical": {"b": []}}}},
            "data.schema.categorical.b",
            "at least one category",
        ),
        ({"data": {"institution_files": {"../evil": "x.csv"}}}, "data.institutions", "institution names"),
    ],
)
def test_bad_config_names_key_value_and_rule(values: dict, key: str, rule: str) -> None:
    error = _error(values)
    assert error.key == key
    assert rule in error.rule
    assert f"'{key}'" in str(error)


def test_yaml_float_trap_message_says_how_to_fix(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("privacy:\n  delta: 1e-5\n")
    with pytest.raises(ConfigError, match=r"write 1\.0e-5"):
        load_config(path)


def test_load_config_file_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="not found"):
        load_config(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(bad)
    listy = tmp_path / "list.yaml"
    listy.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="must be a mapping"):
        load_config(listy)


def test_relative_paths_resolve_against_the_config_file(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    path = tmp_path / "sub" / "c.yaml"
    path.write_text(
        "data:\n  source: csv\n  csv_path: ../all.csv\n  institution_column: bank\n"
        "  schema: {label: churn, numeric: [age]}\n"
    )
    assert load_config(path).data.csv_path == str((tmp_path / "all.csv").resolve())


def test_overrides() -> None:
    config = apply_overrides(
        default_config(),
        dict(parse_override(s) for s in ["privacy.delta=1e-6", "training.batch_size=32", "model.encoder_hidden=[8]"]),
    )
    assert config.privacy.delta == 1e-6
    assert config.training.batch_size == 32
    assert config.model.encoder_hidden == (8,)
    switched = apply_overrides(default_config(), {"privacy.noise_multiplier": None, "privacy.target_epsilon": 2.0})
    assert switched.privacy.target_epsilon == 2.0
    with pytest.raises(ConfigError, match="'training.batch_sise'.*unknown key"):
        apply_overrides(default_config(), {"training.batch_sise": 3})
    with pytest.raises(ConfigError, match="'rounds.x'.*not a section"):
        apply_overrides(default_config(), {"rounds.x": 3})
    with pytest.raises(ConfigError, match="key=value"):
        parse_override("rounds")


def test_config_objects_are_frozen() -> None:
    config = default_config()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.rounds = 3  # type: ignore[misc]


def test_feature_names_order() -> None:
    schema = SchemaConfig(label="y", numeric=("a", "b"), categorical={"c": ("x", "y"), "d": ("z",)})
    assert schema.feature_names == ("a", "b", "c=x", "c=y", "d=z")
