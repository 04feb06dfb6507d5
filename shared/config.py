"""The configuration: read once, at the edge, into validated frozen dataclasses.

``load_config`` (YAML file), ``apply_overrides`` (``--set key=value``), ``config_from_run_config`` (Flower's
run-config) and ``default_config`` (the embedded default) all end in the same checks. The sections themselves are
``shared/config_schema.py``; the type-driven coercion is ``shared/config_coercion.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

from fedchurn.shared.config_coercion import RunConfig as RunConfig
from fedchurn.shared.config_coercion import config_from_dict as config_from_dict
from fedchurn.shared.config_coercion import config_from_run_config as config_from_run_config
from fedchurn.shared.config_coercion import config_to_dict as config_to_dict
from fedchurn.shared.config_coercion import config_to_run_config as config_to_run_config
from fedchurn.shared.config_coercion import looks_like_float
from fedchurn.shared.config_schema import *  # noqa: F403 (the sections are part of this module's interface)
from fedchurn.shared.config_schema import FedChurnConfig
from fedchurn.shared.config_writer import commented_yaml, relative_path
from fedchurn.shared.errors import ConfigError


class _NoAliasLoader(yaml.SafeLoader):
    """YAML without aliases: a config never needs ``*name``, and nested aliases (a "billion laughs") expand into
    exponentially large values that hang the loader."""

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.events.AliasEvent):
            event = self.peek_event()
            raise yaml.composer.ComposerError(
                None, None, "YAML aliases (*name) are not allowed in a config: write the value out", event.start_mark
            )
        return super().compose_node(parent, index)


def load_yaml(text: str) -> Any:
    """Parse config YAML safely (plain values only, no aliases)."""
    return yaml.load(text, Loader=_NoAliasLoader)  # a SafeLoader subclass: plain values only


def load_config(path: str | Path) -> FedChurnConfig:
    """Read a YAML config. Relative data and checkpoint paths are taken relative to the file."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError("(file)", str(path), "config file not found") from None
    except OSError as exc:
        raise ConfigError("(file)", str(path), f"cannot be read: {exc.strerror}") from None
    try:
        values = load_yaml(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        raise ConfigError("(file)", str(path), f"is not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    if values is None:
        values = {}
    config = config_from_dict(values)
    return resolve_paths(config, base_dir=path.parent)


def resolve_paths(config: FedChurnConfig, *, base_dir: Path) -> FedChurnConfig:
    """Make the config's file paths absolute, relative to ``base_dir``."""

    def absolute(p: str | None) -> str | None:
        if p is None:
            return None
        candidate = Path(p).expanduser()
        return str(candidate if candidate.is_absolute() else (base_dir / candidate).resolve())

    data = dataclasses.replace(
        config.data,
        csv_path=absolute(config.data.csv_path),
        institution_files={k: absolute(v) or v for k, v in config.data.institution_files.items()},
    )
    model = dataclasses.replace(config.model, encoder_checkpoint=absolute(config.model.encoder_checkpoint))
    pretrain = dataclasses.replace(config.pretrain, csv_path=absolute(config.pretrain.csv_path))
    return dataclasses.replace(config, data=data, model=model, pretrain=pretrain)


def dump_config(config: FedChurnConfig, *, relative_to: Path | None = None) -> str:
    """YAML text that ``load_config`` reads back to the same config, commented like the embedded default.

    ``relative_to``: the folder of the file the text is written to. File paths are then written relative to it
    (where the two share a folder below the root), as ``load_config`` reads them: relative to the file.
    """
    values = config_to_dict(config)
    if relative_to is not None:

        def rel(path: str | None) -> str | None:
            return relative_path(path, folder=relative_to)

        data = values["data"]
        data["csv_path"] = rel(data["csv_path"])
        data["institution_files"] = {name: rel(path) for name, path in data["institution_files"].items()}
        values["model"]["encoder_checkpoint"] = rel(values["model"]["encoder_checkpoint"])
        values["pretrain"]["csv_path"] = rel(values["pretrain"]["csv_path"])
    return commented_yaml(values, template=DEFAULT_CONFIG_YAML, is_free_mapping=_is_free_mapping)


def parse_override(text: str) -> tuple[str, Any]:
    """``"privacy.delta=1.0e-6"`` -> ("privacy.delta", 1e-06). The value is read as YAML."""
    key, sep, raw = text.partition("=")
    key = key.strip()
    if not sep or not key:
        raise ConfigError(text, text, "an override must look like key=value", "for example --set privacy.delta=1.0e-6")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str) and looks_like_float(value):
        value = float(value)  # on the command line, 1e-5 means the number (YAML alone would read text)
    return key, value


def apply_overrides(config: FedChurnConfig, overrides: Mapping[str, Any]) -> FedChurnConfig:
    """Set dotted keys (``training.batch_size``) and re-validate the whole config."""
    values = config_to_dict(config)
    for dotted, value in overrides.items():
        parts = dotted.split(".")
        node: Any = values
        for depth, part in enumerate(parts[:-1]):
            child = node.get(part) if isinstance(node, dict) else None
            if child is None and isinstance(node, dict) and part in node:
                child = {}  # an optional section that is null (data.schema): start it
                node[part] = child
            if not isinstance(child, dict):
                raise ConfigError(dotted, value, f"'{'.'.join(parts[: depth + 1])}' is not a section of the config")
            node = child
        if not isinstance(node, dict) or parts[-1] not in node:
            if isinstance(node, dict) and _is_free_mapping(parts[:-1]):
                node[parts[-1]] = value
                continue
            raise ConfigError(dotted, value, "unknown key", "see the embedded default: fedchurn config show")
        node[parts[-1]] = value
    return config_from_dict(values)


def _is_free_mapping(section: list[str]) -> bool:
    """Sections whose keys are names chosen by the user, not schema fields."""
    return section in (
        ["data", "institution_files"],
        ["data", "schema", "categorical"],
        ["data", "schema", "bounds"],
        ["budget", "institution_epsilon"],
        ["policy", "institutions"],
        ["federation", "members"],
    )


# The field defaults above are the one source of defaults: a file that sets only some keys gets them. This
# template repeats them with comments for `fedchurn config show`; tests/test_defaults.py fails on any key whose
# value here differs from its field default. (Dataclasses rather than a validation library: the hand-written
# coercion above already gives key/value/rule/fix errors and the flat Flower run-config form, with no new
# dependency on the server and client path.)
DEFAULT_CONFIG_YAML = """\
# fedchurn — the embedded default: a synthetic consortium of six banks of different sizes,
# churn rates and customer mixes, training a shared encoder under DP-SGD for five rounds.
seed: 0
rounds: 5
output_dir: fedchurn-run
data:
  source: synthetic
  synthetic:
    institutions: 6          # banks in the consortium
    min_rows: 400            # the smallest bank's customers
    max_rows: 3000           # the largest bank's customers
    churn_rate_min: 0.12
    churn_rate_max: 0.30
    feature_shift: 0.5       # how different the banks' customers are (feature SDs)
  missing_values: impute     # blank/NaN/inf cells: error | drop | impute (declared: bounds midpoint, no category)
  validation_fraction: 0.15
  test_fraction: 0.2
model:
  encoder_hidden: [64, 32]   # shared encoder, sent to the server each round
  embedding_dim: 16
  head_hidden: 16            # each bank's churn head: stays at the bank
training:
  local_epochs: 1
  batch_size: 64             # expected batch; the DP sample rate is about batch_size / rows
  learning_rate: 0.02
  optimizer: adam            # adam | sgd (measured: adam reaches the same AUC in fewer noisy rounds)
  momentum: 0.9              # sgd only
  plan: auto                 # auto: with privacy.target_epsilon set, each bank plans its batch, epochs per
                             #   round, learning rate, optimizer and clipping norm from its own row count
                             #   (the settings above and privacy.clipping_norm are then ignored); fixed: as given
privacy:
  enabled: true
  clipping_norm: 1.0         # per-customer gradient bound
  noise_multiplier: 1.2      # or null, with target_epsilon for the whole run
  target_epsilon: null
  delta: 1.0e-5
  accountant: rdp
  implementation: vectorized # same DP-SGD as Opacus' hooks, faster for MLPs (or: opacus)
  reproducible_noise: false  # research only: seeded noise and split (not private against the server)
strategy:
  name: fedavg               # fedavg | fedprox | fedadam
  min_replies: 1
  round_timeout_s: 600.0
  max_update_norm: 1000.0    # drop a reply whose encoder update (L2) exceeds this (null: no absolute cap)
  bound_multiplier: 3.0      # an update's norm and weight are capped at this x the median of the other replies
  max_examples: 1000000.0    # cap on the num-examples weight a reply reports
  aggregation: mean          # mean (weighted) | median | trimmed_mean (coordinate-wise; strategy fedavg only)
  trim_fraction: 0.2         # trimmed_mean: fraction cut at each end of every coordinate
simulation:
  ray_num_cpus: null         # local Ray bound to this many CPUs (null: all)
  client_num_cpus: 1.0
  client_num_gpus: 0.0
budget:
  max_epsilon: null          # most LIFETIME ε (at privacy.delta) a bank spends on its rows (every run composed);
                             # it can only lower the bank policy's cap; a round that would exceed it is declined
  institution_epsilon: {}    # per-institution overrides, e.g. {bank-01: 3.0}
institution_dp:
  enabled: false             # server-side clipping + noise on each bank's encoder update (a second guarantee,
  noise_multiplier: 1.0      #   per institution, reported apart from the per-customer ε)
  clipping_norm: 1.0
  delta: 1.0e-5
transfer:
  mode: finetune             # finetune | frozen | fedrep | fedavg | local | centralized (the last two: compare)
  head_epochs: 1             # fedrep: head-only epochs per round before the encoder epochs
pretrain:                    # fedchurn pretrain: not private; for public or consented source data
  objective: supervised      # supervised (labelled source) | self_supervised (masked-feature reconstruction)
  source: synthetic          # synthetic: the consortium's seeded source domain | csv: pretrain.csv_path
  csv_path: null
  source_rows: 20000
  epochs: 8
  batch_size: 256
  learning_rate: 0.003
  mask_fraction: 0.3
  validation_fraction: 0.1
  num_workers: 1             # Ray Train data-parallel workers
  cpus_per_worker: 1.0
  gpus_per_worker: 0.0
federation:                  # fedchurn run on a real federation (deploy/README.md)
  run_name: null             # identity of the run at every bank; set it to be able to resume
  resume: false              # continue an interrupted run from its last completed round
  members: {}                # node id -> institution; fedchurn run fills it from `fedchurn federation register`
policy:                      # each SIMULATED bank's own policy (a real bank reads its file: node config `policy`)
  require_dp: false          # refuse rounds without DP
  min_noise_multiplier: 0.0  # refuse a given sigma below this (a sigma planned from target_epsilon is raised to it)
  max_clipping_norm: null    # refuse a larger clipping norm (null: no limit)
  max_delta: null            # refuse a larger delta (null: no limit)
  lifetime_epsilon: null     # cap on epsilon over every round ever run on the bank's rows (budget can only lower it)
  allowed_transfer_modes: [finetune, frozen, fedrep, fedavg, local, centralized]
  evaluation: dp             # off: no metric on validation/test rows leaves the bank | dp: DP statistics only
  evaluation_noise_multiplier: 5.0
  max_rounds_per_run: null   # refuse runs of more rounds (null: no limit)
  report_dataset_size: false # false: FedAvg weight 1.0 and no row counts leave the bank
  institutions: {}           # per-bank overrides, e.g. {bank-01: {min_noise_multiplier: 1.0, lifetime_epsilon: 3.0}}
evaluation:                  # what a bank releases about its own rows' scores (accounted in its ε)
  mode: dp                   # dp: noisy score histograms | off: nothing leaves the bank
  noise_multiplier: 5.0      # Gaussian noise std per histogram cell (one customer changes one cell by 1);
                             #   a bank uses the larger of this and its policy's evaluation_noise_multiplier
  bins: 10                   # equal-width logit bins over [-logit_range, logit_range]
  logit_range: 6.0
  every_rounds: 0            # 0: release only after the last round (or when the bank stops training);
                             #   k: also after every k-th trained round, to keep the best (at most one per round)
tracking:                    # stream each round's metrics (released AUC/ECE, ε, σ, round time) to a tracker
  backend: none              # none | tensorboard (tensorboard --logdir RUN/tensorboard) | mlflow (local store)
  directory: null            # null: RUN/tensorboard or RUN/mlflow; a relative path is inside the run folder
  mlflow_uri: null           # an MLflow tracking server (http://host:5000) instead of the local store
  experiment: fedchurn       # MLflow experiment; each run is named after its run identity
"""


def default_config() -> FedChurnConfig:
    """The embedded default: ``fedchurn simulate`` with no argument runs this."""
    return config_from_dict(yaml.safe_load(DEFAULT_CONFIG_YAML))
