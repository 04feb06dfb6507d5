"""The one configuration schema: YAML ⇄ frozen dataclasses ⇄ Flower run-config.

Everything is parsed and checked here, once, at the edge. Errors name the key, the value and the rule.
The Flower run-config form is flat (``"privacy.noise_multiplier" = 1.0``) because Flower accepts scalars
only; lists, mappings and absent optional values travel as JSON text and are decoded by field type.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Union, get_args, get_origin

import yaml

from shared.errors import ConfigError
from shared.policy import PolicyConfig

# --------------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SchemaConfig:
    """Which columns of a customer table mean what."""

    label: str  # the churn column
    positive: str | None = None  # the label value that means "churned"; None: 1 / yes / true
    numeric: tuple[str, ...] = ()
    categorical: dict[str, tuple[str, ...]] = field(default_factory=dict)  # column -> allowed values
    drop: tuple[str, ...] = ()  # identifiers, leaky columns: ignored if present
    bounds: dict[str, tuple[float, float]] = field(
        default_factory=dict
    )  # numeric column -> declared [low, high]; values are clipped to it

    def __post_init__(self) -> None:
        _require(bool(self.label), "data.schema.label", self.label, "must name the churn column")
        if not self.numeric and not self.categorical:
            raise ConfigError(
                "data.schema",
                "no features",
                "declare at least one numeric or categorical column",
                "list columns under data.schema.numeric / data.schema.categorical",
            )
        seen: dict[str, str] = {}
        for kind, names in (("numeric", self.numeric), ("categorical", tuple(self.categorical))):
            for name in names:
                if name == self.label:
                    raise ConfigError(f"data.schema.{kind}", name, "the label column cannot be a feature")
                if name in seen:
                    raise ConfigError(f"data.schema.{kind}", name, f"column is already declared as {seen[name]}")
                seen[name] = kind
        for name, values in self.categorical.items():
            if len(values) == 0:
                raise ConfigError(f"data.schema.categorical.{name}", list(values), "list at least one category value")
            if len(set(values)) != len(values):
                raise ConfigError(f"data.schema.categorical.{name}", list(values), "values must be unique")
        for name in self.drop:
            if name in seen or name == self.label:
                raise ConfigError("data.schema.drop", name, "a dropped column cannot also be label or feature")
        for name, bound in self.bounds.items():  # declared, public ranges: preprocessing never reads them from rows
            key = f"data.schema.bounds.{name}"
            if name not in self.numeric:
                raise ConfigError(key, list(bound), "bounds are for numeric columns only", "list it under numeric")
            if len(bound) != 2 or not all(math.isfinite(v) for v in bound) or not bound[0] < bound[1]:
                raise ConfigError(key, list(bound), "must be [low, high] with finite low < high")

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Model input order: numeric columns, then one entry per category of each categorical column."""
        names = list(self.numeric)
        for column, values in self.categorical.items():
            names.extend(f"{column}={value}" for value in values)
        return tuple(names)


@dataclass(frozen=True)
class SyntheticConfig:
    """The seeded synthetic consortium: a realistic bank-customer table per institution."""

    institutions: int = 6
    min_rows: int = 400  # institution sizes are spread log-uniformly between these
    max_rows: int = 3000
    churn_rate_min: float = 0.12
    churn_rate_max: float = 0.30
    feature_shift: float = 0.5  # spread of per-institution feature means, in feature standard deviations

    def __post_init__(self) -> None:
        _require(self.institutions >= 1, "data.synthetic.institutions", self.institutions, "must be >= 1")
        _require(self.min_rows >= 30, "data.synthetic.min_rows", self.min_rows, "must be >= 30")
        _require(
            self.max_rows >= self.min_rows,
            "data.synthetic.max_rows",
            self.max_rows,
            f"must be >= data.synthetic.min_rows ({self.min_rows})",
        )
        for key in ("churn_rate_min", "churn_rate_max"):
            value = getattr(self, key)
            _require(0.01 <= value <= 0.99, f"data.synthetic.{key}", value, "must be between 0.01 and 0.99")
        _require(
            self.churn_rate_max >= self.churn_rate_min,
            "data.synthetic.churn_rate_max",
            self.churn_rate_max,
            "must be >= data.synthetic.churn_rate_min",
        )
        _require(
            0.0 <= self.feature_shift <= 5.0, "data.synthetic.feature_shift", self.feature_shift, "must be in [0, 5]"
        )


@dataclass(frozen=True)
class DataConfig:
    """Where each institution's customers come from, and how they are checked and split."""

    source: Literal["synthetic", "csv"] = "synthetic"
    csv_path: str | None = None  # one table holding every institution ...
    institution_column: str | None = None  # ... split by this column
    institution_files: dict[str, str] = field(default_factory=dict)  # or: institution name -> its own CSV
    institutions: tuple[str, ...] = ()  # optional: only these institutions, in this order
    schema: SchemaConfig | None = None  # required for csv; synthetic data brings its own
    missing_values: Literal["error", "drop", "impute"] = "impute"  # blank, NaN or inf cells: fail, drop row, or fill
    validation_fraction: float = 0.15
    test_fraction: float = 0.2
    synthetic: SyntheticConfig = field(default_factory=SyntheticConfig)

    def __post_init__(self) -> None:
        _require(
            0.0 < self.validation_fraction < 0.5,
            "data.validation_fraction",
            self.validation_fraction,
            "must be > 0 and < 0.5",
        )
        _require(0.0 < self.test_fraction < 0.5, "data.test_fraction", self.test_fraction, "must be > 0 and < 0.5")
        _require(
            self.validation_fraction + self.test_fraction < 0.8,
            "data.test_fraction",
            self.test_fraction,
            "validation + test fractions must leave at least 20% for training",
        )
        if len(set(self.institutions)) != len(self.institutions):
            raise ConfigError("data.institutions", list(self.institutions), "names must be unique")
        if self.source == "csv":
            if self.schema is None:
                raise ConfigError(
                    "data.schema",
                    None,
                    "is required when data.source is 'csv'",
                    "declare label, numeric and categorical columns, or use 'fedchurn simulate --data'",
                )
            has_table = self.csv_path is not None
            has_files = bool(self.institution_files)
            if has_table == has_files:
                raise ConfigError(
                    "data.csv_path",
                    self.csv_path,
                    "give either data.csv_path with data.institution_column, or data.institution_files, not both"
                    if has_table
                    else "give data.csv_path with data.institution_column, or data.institution_files",
                )
            if has_table and not self.institution_column:
                raise ConfigError(
                    "data.institution_column",
                    self.institution_column,
                    "is required with data.csv_path: it names the column that says which institution a row is from",
                )
        for name in list(self.institution_files) + list(self.institutions):
            _check_institution_name(name)


@dataclass(frozen=True)
class ModelConfig:
    """Shared encoder (MLP, no BatchNorm: Opacus refuses it) and each institution's churn head."""

    encoder_hidden: tuple[int, ...] = (64, 32)
    embedding_dim: int = 16
    head_hidden: int = 16  # 0: a linear head
    dropout: float = 0.0
    encoder_checkpoint: str | None = None  # a saved encoder to start from (pretrained transfer)

    def __post_init__(self) -> None:
        for width in self.encoder_hidden:
            _require(1 <= width <= 4096, "model.encoder_hidden", list(self.encoder_hidden), "widths must be 1..4096")
        _require(1 <= self.embedding_dim <= 4096, "model.embedding_dim", self.embedding_dim, "must be 1..4096")
        _require(0 <= self.head_hidden <= 4096, "model.head_hidden", self.head_hidden, "must be 0..4096")
        _require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class TrainingConfig:
    """Local training at each institution, per round."""

    local_epochs: int = 1
    batch_size: int = 64  # expected batch size; with DP the sample rate is batch_size / rows
    learning_rate: float = 0.02
    optimizer: Literal["sgd", "adam"] = "adam"  # measured: adam reaches the same AUC in fewer noisy rounds
    momentum: float = 0.9  # sgd only

    def __post_init__(self) -> None:
        _require(1 <= self.local_epochs <= 1000, "training.local_epochs", self.local_epochs, "must be 1..1000")
        _require(1 <= self.batch_size <= 1_000_000, "training.batch_size", self.batch_size, "must be 1..1000000")
        _require(0.0 < self.learning_rate <= 10.0, "training.learning_rate", self.learning_rate, "must be in (0, 10]")
        _require(0.0 <= self.momentum < 1.0, "training.momentum", self.momentum, "must be in [0, 1)")


@dataclass(frozen=True)
class PrivacyConfig:
    """DP-SGD at each institution. The guarantee is per customer row, composed over all rounds."""

    enabled: bool = True
    clipping_norm: float = 1.0  # per-sample gradient L2 bound C
    noise_multiplier: float | None = 1.2  # sigma; or leave empty and give target_epsilon
    target_epsilon: float | None = None  # epsilon for the whole run, from which sigma is derived
    delta: float = 1.0e-5
    accountant: Literal["rdp", "prv"] = "rdp"
    # Same mechanism, two implementations: "vectorized" computes exact per-row norms for MLPs without Opacus'
    # per-sample hooks (several times faster); "opacus" uses Opacus' hooks for any model.
    implementation: Literal["vectorized", "opacus"] = "vectorized"
    # Research switch, simulation only: noise and batches seeded from `seed` (bit-identical reruns) instead of
    # the bank's secret randomness. NOT private against the server; a bank on a real SuperNode refuses it.
    reproducible_noise: bool = False

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        _require(self.clipping_norm > 0.0, "privacy.clipping_norm", self.clipping_norm, "must be > 0")
        _require(0.0 < self.delta < 1.0, "privacy.delta", self.delta, "must be > 0 and < 1")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError(
                "privacy.noise_multiplier",
                self.noise_multiplier,
                "give exactly one of privacy.noise_multiplier and privacy.target_epsilon",
                "set the other to null",
            )
        if self.noise_multiplier is not None:
            _require(
                0.0 < self.noise_multiplier <= 100.0,
                "privacy.noise_multiplier",
                self.noise_multiplier,
                "must be in (0, 100]",
            )
        if self.target_epsilon is not None:
            _require(
                0.01 <= self.target_epsilon <= 100.0,
                "privacy.target_epsilon",
                self.target_epsilon,
                "must be in [0.01, 100]",
            )


@dataclass(frozen=True)
class StrategyConfig:
    """How the server aggregates encoder updates."""

    name: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = 0.01  # fedprox: weight of the proximal term at the clients
    server_learning_rate: float = 0.01  # fedadam: eta
    server_beta_1: float = 0.9
    server_beta_2: float = 0.99
    server_tau: float = 1.0e-3
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_replies: int = 1  # a round needs at least this many valid replies
    round_timeout_s: float = 600.0
    # Robust aggregation (server/strategy.py, server/reply_checks.py): every reply is bounded before it is used.
    max_update_norm: float | None = 1000.0  # drop a reply whose encoder moved further than this (L2); null: no cap
    bound_multiplier: float | None = 3.0  # cap each norm and weight at this x the others' median; null: off
    max_examples: float | None = 1.0e6  # cap on the num-examples weight a reply reports; null: no cap
    aggregation: Literal["mean", "median", "trimmed_mean"] = "mean"  # median/trimmed_mean: strategy fedavg only
    trim_fraction: float = 0.2  # trimmed_mean: fraction of values cut at each end of every coordinate

    def __post_init__(self) -> None:
        _require(self.proximal_mu >= 0.0, "strategy.proximal_mu", self.proximal_mu, "must be >= 0")
        _require(
            self.server_learning_rate > 0.0, "strategy.server_learning_rate", self.server_learning_rate, "must be > 0"
        )
        for key in ("server_beta_1", "server_beta_2"):
            value = getattr(self, key)
            _require(0.0 <= value < 1.0, f"strategy.{key}", value, "must be in [0, 1)")
        _require(self.server_tau > 0.0, "strategy.server_tau", self.server_tau, "must be > 0")
        for key in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, key)
            _require(0.0 < value <= 1.0, f"strategy.{key}", value, "must be in (0, 1]")
        _require(self.min_replies >= 1, "strategy.min_replies", self.min_replies, "must be >= 1")
        _require(self.round_timeout_s > 0.0, "strategy.round_timeout_s", self.round_timeout_s, "must be > 0")
        for key in ("max_update_norm", "bound_multiplier", "max_examples"):
            value = getattr(self, key)
            if value is not None:
                _require(math.isfinite(value) and value > 0.0, f"strategy.{key}", value, "must be > 0 and finite")
        if self.bound_multiplier is not None:
            _require(self.bound_multiplier >= 1.0, "strategy.bound_multiplier", self.bound_multiplier, "must be >= 1")
        _require(
            self.aggregation in ("mean", "median", "trimmed_mean"),
            "strategy.aggregation",
            self.aggregation,
            "must be mean, median or trimmed_mean",
        )
        _require(
            self.aggregation == "mean" or self.name == "fedavg",
            "strategy.aggregation",
            self.aggregation,
            f"median and trimmed_mean replace FedAvg's average: set strategy.name fedavg (got {self.name!r})",
        )
        _require(0.0 <= self.trim_fraction < 0.5, "strategy.trim_fraction", self.trim_fraction, "must be in [0, 0.5)")


@dataclass(frozen=True)
class SimulationConfig:
    """Ray resources for simulated institutions. Resources are scheduling hints, not limits."""

    ray_num_cpus: int | None = None  # CPUs of a local Ray started for the run; None: all of this machine
    client_num_cpus: float = 1.0
    client_num_gpus: float = 0.0  # fractions share one GPU between institutions
    ray_address: str | None = None  # attach to a running cluster ("auto" or host:port)

    def __post_init__(self) -> None:
        if self.ray_num_cpus is not None:
            _require(self.ray_num_cpus >= 1, "simulation.ray_num_cpus", self.ray_num_cpus, "must be >= 1")
        _require(self.client_num_cpus > 0.0, "simulation.client_num_cpus", self.client_num_cpus, "must be > 0")
        _require(self.client_num_gpus >= 0.0, "simulation.client_num_gpus", self.client_num_gpus, "must be >= 0")


@dataclass(frozen=True)
class BudgetConfig:
    """Privacy budgets: the most lifetime ε (at ``privacy.delta``) each bank spends on its rows, every run composed.

    A budget here can only lower the cap of the bank's own policy (``shared/policy.py``), never raise it.

    Enforced at the institution before every round: a round that would take it past its budget is declined,
    never trained, so a budget is never exceeded. Logic: ``clients/budget.py``.
    """

    max_epsilon: float | None = None  # for every institution; null: no budget
    institution_epsilon: dict[str, float] = field(default_factory=dict)  # institution name -> its own maximum ε

    def __post_init__(self) -> None:
        if self.max_epsilon is not None:
            _require(0.0 < self.max_epsilon <= 1000.0, "budget.max_epsilon", self.max_epsilon, "must be in (0, 1000]")
        for name, value in self.institution_epsilon.items():
            key = f"budget.institution_epsilon.{name}"
            if not is_valid_institution_name(name):
                raise ConfigError(key, name, f"institution names must be {INSTITUTION_NAME_RULE}")
            _require(0.0 < value <= 1000.0, key, value, "must be in (0, 1000]")

    def epsilon_for(self, institution: str) -> float | None:
        """This institution's maximum ε: its override, else the default, else None (no budget)."""
        return self.institution_epsilon.get(institution, self.max_epsilon)


@dataclass(frozen=True)
class InstitutionDPConfig:
    """Institution-level DP at the server (off by default): each institution's encoder update is clipped to
    ``clipping_norm`` and Gaussian noise is added to the average (Flower's server-side fixed-clipping wrapper).

    A second guarantee, for a whole institution's contribution, reported apart from the per-customer ε.
    Logic: ``server/institution_dp.py``.
    """

    enabled: bool = False
    noise_multiplier: float = 1.0  # noise std = noise_multiplier * clipping_norm / contributing institutions
    clipping_norm: float = 1.0  # L2 bound on one institution's encoder update per round
    delta: float = 1.0e-5

    def __post_init__(self) -> None:
        if not self.enabled:
            return
        _require(
            0.0 < self.noise_multiplier <= 100.0,
            "institution_dp.noise_multiplier",
            self.noise_multiplier,
            "must be in (0, 100]",
        )
        _require(self.clipping_norm > 0.0, "institution_dp.clipping_norm", self.clipping_norm, "must be > 0")
        _require(0.0 < self.delta < 1.0, "institution_dp.delta", self.delta, "must be > 0 and < 1")


@dataclass(frozen=True)
class TransferConfig:
    """How the shared encoder is used and what travels (rules in shared/transfer.py)."""

    # finetune: encoder + head train, encoder aggregated | frozen: heads only, nothing sent back | fedrep: head
    # epochs (encoder fixed) then encoder epochs, encoder aggregated | fedavg: everything shared, head included |
    # local: each institution alone (fedchurn compare) | centralized: pooled, NOT private (fedchurn compare)
    mode: Literal["finetune", "frozen", "fedrep", "fedavg", "local", "centralized"] = "finetune"
    head_epochs: int = 1  # fedrep: head-only epochs per round, before training.local_epochs encoder epochs

    def __post_init__(self) -> None:
        _require(1 <= self.head_epochs <= 1000, "transfer.head_epochs", self.head_epochs, "must be 1..1000")


@dataclass(frozen=True)
class PretrainConfig:
    """`fedchurn pretrain`: the encoder trained on source data with Ray Train (not private: public/consented data)."""

    objective: Literal["supervised", "self_supervised"] = "supervised"
    source: Literal["synthetic", "csv"] = "synthetic"  # synthetic: the consortium's seeded source domain
    csv_path: str | None = None  # source table with the federation's schema (label optional if self_supervised)
    source_rows: int = 20000  # synthetic source-domain customers
    epochs: int = 8
    batch_size: int = 256
    learning_rate: float = 0.003
    mask_fraction: float = 0.3  # self_supervised: share of features corrupted (swap noise) to reconstruct
    validation_fraction: float = 0.1
    num_workers: int = 1  # Ray Train workers (data-parallel)
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0

    def __post_init__(self) -> None:
        _require(
            100 <= self.source_rows <= 10_000_000, "pretrain.source_rows", self.source_rows, "must be 100..10000000"
        )
        _require(1 <= self.epochs <= 10_000, "pretrain.epochs", self.epochs, "must be 1..10000")
        _require(1 <= self.batch_size <= 1_000_000, "pretrain.batch_size", self.batch_size, "must be 1..1000000")
        _require(0.0 < self.learning_rate <= 10.0, "pretrain.learning_rate", self.learning_rate, "must be in (0, 10]")
        _require(0.0 < self.mask_fraction < 1.0, "pretrain.mask_fraction", self.mask_fraction, "must be in (0, 1)")
        _require(
            0.0 < self.validation_fraction < 0.5,
            "pretrain.validation_fraction",
            self.validation_fraction,
            "must be > 0 and < 0.5",
        )
        _require(1 <= self.num_workers <= 1024, "pretrain.num_workers", self.num_workers, "must be 1..1024")
        _require(self.cpus_per_worker > 0.0, "pretrain.cpus_per_worker", self.cpus_per_worker, "must be > 0")
        _require(self.gpus_per_worker >= 0.0, "pretrain.gpus_per_worker", self.gpus_per_worker, "must be >= 0")
        if self.source == "csv" and not self.csv_path:
            raise ConfigError("pretrain.csv_path", self.csv_path, "is required when pretrain.source is 'csv'")


@dataclass(frozen=True)
class FederationConfig:
    """A run on a real federation (``fedchurn run``): its identity, and whether it continues an interrupted run.

    ``run_name`` is the identity institutions key their saved head and privacy accountant by (instead of Flower's
    run id, which changes when a run is resubmitted), so a resumed run continues every institution's ε.
    Logic: ``server/resume.py``.
    """

    run_name: str | None = None  # null: Flower's run id (a resubmitted run then starts every accountant afresh)
    resume: bool = False  # continue from the last completed round checkpointed in output_dir
    # Node id (the SuperLink's, from the bank's registered key) -> the institution registered for it. `fedchurn run`
    # fills it from `fedchurn federation register`; a reply naming another institution than its node's is refused.
    members: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        for node, name in self.members.items():
            _require(
                isinstance(node, str) and node.isdigit() and int(node) < 2**64,
                "federation.members",
                node,
                "keys are node ids (unsigned integers, as text)",
            )
            _require(is_valid_institution_name(name), f"federation.members.{node}", name, INSTITUTION_NAME_RULE)
        names = list(self.members.values())
        duplicated = sorted({name for name in names if names.count(name) > 1})
        _require(not duplicated, "federation.members", duplicated, "each institution is registered for one node")
        if self.run_name is not None and not is_valid_institution_name(self.run_name):
            raise ConfigError("federation.run_name", self.run_name, f"run names must be {INSTITUTION_NAME_RULE}")
        if self.resume and self.run_name is None:
            raise ConfigError(
                "federation.resume",
                self.resume,
                "resuming needs federation.run_name: the name the interrupted run was started with",
            )

    def identity(self, flower_run_id: int) -> int | str:
        """What institutions key their saved state by: ``run_name`` when given, else Flower's run id."""
        return self.run_name if self.run_name is not None else flower_run_id


@dataclass(frozen=True)
class EvaluationConfig:
    """What a bank releases about its validation and test rows (logic: shared/private_metrics.py).

    ``off``: nothing. ``dp``: a 2×bins histogram of model scores per row set with Gaussian noise of std
    ``noise_multiplier`` per cell (sensitivity 1), accounted in the bank's ledger, never past its budget.
    """

    mode: Literal["off", "dp"] = "dp"
    noise_multiplier: float = 5.0
    bins: int = 10
    logit_range: float = 6.0
    every_rounds: int = 0  # 0: only after the run's last round (or when the bank stops); k: also every k-th

    def __post_init__(self) -> None:
        _require(
            0.5 <= self.noise_multiplier <= 1000.0,
            "evaluation.noise_multiplier",
            self.noise_multiplier,
            "must be in [0.5, 1000] (noise std per histogram cell)",
        )
        _require(2 <= self.bins <= 1000, "evaluation.bins", self.bins, "must be 2..1000")
        _require(0.0 < self.logit_range <= 50.0, "evaluation.logit_range", self.logit_range, "must be in (0, 50]")
        _require(
            self.every_rounds >= 0, "evaluation.every_rounds", self.every_rounds, "must be >= 0 (0: last round only)"
        )


@dataclass(frozen=True)
class FedChurnConfig:
    """A whole federated run."""

    seed: int = 0
    rounds: int = 5
    output_dir: str = "fedchurn-run"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    transfer: TransferConfig = field(default_factory=TransferConfig)
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    institution_dp: InstitutionDPConfig = field(default_factory=InstitutionDPConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    # Simulated banks' own privacy policies (shared/policy.py); a real bank reads its policy from its node config.
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)

    def __post_init__(self) -> None:
        _require(0 <= self.seed < 2**31, "seed", self.seed, "must be in [0, 2^31)")
        _require(1 <= self.rounds <= 100_000, "rounds", self.rounds, "must be 1..100000")
        _require(bool(self.output_dir), "output_dir", self.output_dir, "must name a folder")


# --------------------------------------------------------------------------------------------------
# Generic conversion, driven by the dataclass type hints
# --------------------------------------------------------------------------------------------------


def _require(ok: bool, key: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(key, value, rule)


INSTITUTION_NAME_RULE = "1-100 characters of letters, digits, space and - _ . $ +"
_INSTITUTION_NAME_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_. $+")


def is_valid_institution_name(name: str) -> bool:
    """Names become folder names at each institution; keep them safe for any file system."""
    return bool(name) and name not in (".", "..") and set(name) <= _INSTITUTION_NAME_CHARS and len(name) <= 100


def _check_institution_name(name: str) -> None:
    if not is_valid_institution_name(name):
        raise ConfigError(
            "data.institutions",
            name,
            f"institution names must be {INSTITUTION_NAME_RULE}",
        )


def _strip_optional(tp: Any) -> tuple[Any, bool]:
    """``X | None`` -> (X, True); anything else -> (tp, False)."""
    origin = get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(get_args(tp)) == 2:
            return args[0], True
    return tp, False


def _type_name(tp: Any) -> str:
    base, optional = _strip_optional(tp)
    origin = get_origin(base)
    if origin is Literal:
        name = "one of " + ", ".join(repr(a) for a in get_args(base))
    elif origin is tuple:
        name = f"a list of {_type_name(get_args(base)[0])}"
    elif origin is dict:
        name = f"a mapping of name to {_type_name(get_args(base)[1])}"
    elif dataclasses.is_dataclass(base):
        name = "a mapping"
    else:
        name = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(base, str(base))
    return name + (" or null" if optional else "")


def _coerce(tp: Any, value: Any, key: str) -> Any:
    """Check ``value`` against the type hint ``tp`` and return it in the dataclass's own form."""
    base, optional = _strip_optional(tp)
    if value is None:
        if optional:
            return None
        raise ConfigError(key, value, f"must be {_type_name(tp)}")
    origin = get_origin(base)
    if dataclasses.is_dataclass(base):
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, "must be a mapping of keys to values")
        return _build(base, value, key)  # type: ignore[arg-type]
    if origin is Literal:
        if value not in get_args(base):
            raise ConfigError(key, value, f"must be {_type_name(base)}")
        return value
    if origin is tuple:
        if isinstance(value, str) or not isinstance(value, (list, tuple)):
            raise ConfigError(key, value, f"must be {_type_name(base)}")
        item_type = get_args(base)[0]
        return tuple(_coerce(item_type, item, f"{key}[{i}]") for i, item in enumerate(value))
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(key, value, f"must be {_type_name(base)}")
        value_type = get_args(base)[1]
        out: dict[str, Any] = {}
        for name, item in value.items():
            if not isinstance(name, str):
                raise ConfigError(key, name, "mapping keys must be text (quote them in YAML)")
            out[name] = _coerce(value_type, item, f"{key}.{name}")
        return out
    if base is bool:
        if not isinstance(value, bool):
            raise ConfigError(key, value, "must be true or false")
        return value
    if base is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(key, value, "must be an integer")
        return value
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            hint = None
            if isinstance(value, str) and _looks_like_float(value):
                hint = "YAML reads 1e-5 as text: write 1.0e-5"
            raise ConfigError(key, value, "must be a number", hint)
        if not math.isfinite(value):
            raise ConfigError(key, value, "must be a finite number")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ConfigError(key, value, "must be text (quote it in YAML)")
        return value
    raise TypeError(f"unsupported config type {tp!r} at {key}")  # a schema bug, not a user error


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _build(cls: type, values: Mapping[str, Any], prefix: str) -> Any:
    hints = _hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in values if k not in names]
    if unknown:
        key = f"{prefix}.{unknown[0]}" if prefix else str(unknown[0])
        raise ConfigError(key, values[unknown[0]], "unknown key", f"known keys here: {', '.join(names)}")
    kwargs = {}
    for name in names:
        if name in values:
            kwargs[name] = _coerce(hints[name], values[name], f"{prefix}.{name}" if prefix else name)
    return cls(**kwargs)


def _plain(value: Any) -> Any:
    """Dataclass -> nested dicts, lists and scalars (YAML- and JSON-safe)."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


# --------------------------------------------------------------------------------------------------
# Public API
# --------------------------------------------------------------------------------------------------


def config_from_dict(values: Mapping[str, Any]) -> FedChurnConfig:
    """Build and validate a config from nested plain values (parsed YAML)."""
    if not isinstance(values, Mapping):
        raise ConfigError("(top level)", values, "a config file must be a mapping of keys to values")
    return _build(FedChurnConfig, values, "")  # type: ignore[no-any-return]


def config_to_dict(config: FedChurnConfig) -> dict[str, Any]:
    """The nested plain form; ``config_from_dict(config_to_dict(c)) == c``."""
    return _plain(config)  # type: ignore[no-any-return]


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


def dump_config(config: FedChurnConfig) -> str:
    """YAML text that ``load_config`` reads back to the same config."""
    return yaml.safe_dump(config_to_dict(config), sort_keys=False, default_flow_style=None)


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
    if isinstance(value, str) and _looks_like_float(value):
        value = float(value)  # on the command line, 1e-5 means the number (YAML alone would read text)
    return key, value


def _looks_like_float(text: str) -> bool:
    if text.strip().lower() in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity"):
        return False
    try:
        float(text)
    except ValueError:
        return False
    return True


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


# --- Flower run-config: flat keys, scalar values --------------------------------------------------

RunConfig = dict[str, bool | int | float | str]


def config_to_run_config(config: FedChurnConfig) -> RunConfig:
    """Flatten to Flower's run-config: dotted keys, scalars; lists/mappings/None as JSON text."""
    flat: RunConfig = {}

    def walk(obj: Any, prefix: str) -> None:
        for f in dataclasses.fields(obj):
            value = getattr(obj, f.name)
            key = f"{prefix}{f.name}"
            if dataclasses.is_dataclass(value):
                walk(value, key + ".")
            elif isinstance(value, (bool, int, float, str)):
                flat[key] = value
            else:  # tuple, dict, None, or an optional section that is absent
                flat[key] = json.dumps(_plain(value))

    walk(config, "")
    return flat


def config_from_run_config(run_config: Mapping[str, Any]) -> FedChurnConfig:
    """Inverse of ``config_to_run_config``. Unknown keys are refused, as Flower refuses them."""
    nested: dict[str, Any] = {}
    for key, value in run_config.items():
        tp = _field_type(key)
        base, _ = _strip_optional(tp)
        if isinstance(value, str) and not (base is str or get_origin(base) is Literal):
            try:
                value = json.loads(value)
            except json.JSONDecodeError:
                raise ConfigError(key, value, f"must be {_type_name(tp)} (as JSON text in the run-config)") from None
        elif isinstance(value, str) and value == "null" and tp is not base:
            value = None  # an optional text field that was absent
        node = nested
        parts = key.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return config_from_dict(nested)


def _field_type(dotted: str) -> Any:
    cls: Any = FedChurnConfig
    parts = dotted.split(".")
    for depth, part in enumerate(parts):
        hints = _hints(cls) if isinstance(cls, type) and dataclasses.is_dataclass(cls) else {}
        if part not in hints:
            raise ConfigError(dotted, None, "unknown run-config key", "see the embedded default: fedchurn config show")
        tp = hints[part]
        if depth < len(parts) - 1:
            cls, _ = _strip_optional(tp)
        else:
            return tp
    return None


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
evaluation:                  # what a bank releases about its validation/test rows (accounted in its ε)
  mode: dp                   # dp: noisy score histograms | off: nothing leaves the bank
  noise_multiplier: 5.0      # Gaussian noise std per histogram cell (one customer changes one cell by 1);
                             #   a bank uses the larger of this and its policy's evaluation_noise_multiplier
  bins: 10                   # equal-width logit bins over [-logit_range, logit_range]
  logit_range: 6.0
  every_rounds: 0            # 0: release only after the last round (or when the bank stops training);
                             #   k: also after every k-th trained round, to keep the best (at most one per round)
"""


def default_config() -> FedChurnConfig:
    """The embedded default: ``fedchurn simulate`` with no argument runs this."""
    return config_from_dict(yaml.safe_load(DEFAULT_CONFIG_YAML))
