"""One source of defaults: the dataclass defaults ARE the embedded default config `fedchurn config show` prints."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import yaml

from fedchurn.shared.config import FedChurnConfig, config_to_dict, default_config, load_config


def _leaves(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            out.update(_leaves(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def test_every_key_of_the_embedded_default_equals_the_dataclass_default() -> None:
    from_yaml = _leaves(config_to_dict(default_config()))
    from_fields = _leaves(config_to_dict(FedChurnConfig()))
    assert set(from_yaml) == set(from_fields)
    differing = {k: (from_yaml[k], from_fields[k]) for k in from_fields if from_yaml[k] != from_fields[k]}
    assert differing == {}, "DEFAULT_CONFIG_YAML and the dataclass defaults disagree (yaml, field): " + repr(differing)


def test_every_key_the_embedded_yaml_spells_out_is_a_field() -> None:
    from fedchurn.shared.config import DEFAULT_CONFIG_YAML

    spelled = _leaves(yaml.safe_load(DEFAULT_CONFIG_YAML))
    fields = _leaves(config_to_dict(FedChurnConfig()))
    assert set(spelled) <= set(fields)


def test_a_file_setting_one_key_gets_the_printed_defaults(tmp_path: Path) -> None:
    path = tmp_path / "c.yaml"
    path.write_text("rounds: 5\n", encoding="utf-8")
    config = load_config(path)
    # The figures `fedchurn config show` prints for these keys (hand-copied from its text).
    assert config.privacy.noise_multiplier == 1.2
    assert config.training.optimizer == "adam"
    assert config.training.learning_rate == 0.02
    assert config.privacy.clipping_norm == 1.0
    assert config.training.batch_size == 64
    expected = dataclasses.replace(default_config(), output_dir=config.output_dir)
    assert config == expected
