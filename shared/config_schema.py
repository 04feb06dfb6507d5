"""The configuration's schema: frozen dataclasses, one per section, whose field defaults are the only defaults.

Each section checks its own rules in ``__post_init__``; errors name the key, the value and the rule. Reading YAML
and the Flower run-config into these classes is ``shared/config_coercion.py``; the public entry points are in
``shared/config.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Literal

from fedchurn.shared.config_data import (
    INSTITUTION_NAME_RULE,
    DataConfig,
    SchemaConfig,
    SyntheticConfig,
    is_valid_institution_name,
    require,
)
from fedchurn.shared.errors import ConfigError
from fedchurn.shared.policy import PolicyConfig

__all__ = [
    "INSTITUTION_NAME_RULE",
    "BudgetConfig",
    "DataConfig",
    "EvaluationConfig",
    "FedChurnConfig",
    "FederationConfig",
    "InstitutionDPConfig",
    "ModelConfig",
    "PretrainConfig",
    "PrivacyConfig",
    "SchemaConfig",
    "SimulationConfig",
    "StrategyConfig",
    "SyntheticConfig",
    "TrackingConfig",
    "TrainingConfig",
    "TransferConfig",
    "is_valid_institution_name",
]

# --------------------------------------------------------------------------------------------------
# The schema
# --------------------------------------------------------------------------------------------------


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
            require(1 <= width <= 4096, "model.encoder_hidden", list(self.encoder_hidden), "widths must be 1..4096")
        require(1 <= self.embedding_dim <= 4096, "model.embedding_dim", self.embedding_dim, "must be 1..4096")
        require(0 <= self.head_hidden <= 4096, "model.head_hidden", self.head_hidden, "must be 0..4096")
        require(0.0 <= self.dropout < 1.0, "model.dropout", self.dropout, "must be in [0, 1)")


@dataclass(frozen=True)
class TrainingConfig:
    """Local training at each institution, per round."""

    local_epochs: int = 1
    batch_size: int = 64  # expected batch size; with DP the sample rate is batch_size / rows
    learning_rate: float = 0.02
    optimizer: Literal["sgd", "adam"] = "adam"  # measured: adam reaches the same AUC in fewer noisy rounds
    momentum: float = 0.9  # sgd only
    # "auto": with privacy.target_epsilon set, each bank plans batch size, epochs per round, learning rate,
    # optimizer and clipping norm from its own row count (shared/dp_planning.py), replacing the values above;
    # "fixed": the values above, as given.
    plan: Literal["auto", "fixed"] = "auto"

    def __post_init__(self) -> None:
        require(1 <= self.local_epochs <= 1000, "training.local_epochs", self.local_epochs, "must be 1..1000")
        require(1 <= self.batch_size <= 1_000_000, "training.batch_size", self.batch_size, "must be 1..1000000")
        require(0.0 < self.learning_rate <= 10.0, "training.learning_rate", self.learning_rate, "must be in (0, 10]")
        require(0.0 <= self.momentum < 1.0, "training.momentum", self.momentum, "must be in [0, 1)")


# The smallest noise multiplier a config may give. Lower σ buys no meaningful guarantee: ε grows like 1/σ² and
# reaches the tens to thousands within a few dozen steps (fedchurn privacy epsilon shows it). 0 is not "no noise":
# no DP is privacy.enabled: false, said explicitly.
MIN_NOISE_MULTIPLIER = 0.3


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
        require(self.clipping_norm > 0.0, "privacy.clipping_norm", self.clipping_norm, "must be > 0")
        require(0.0 < self.delta < 1.0, "privacy.delta", self.delta, "must be > 0 and < 1")
        if (self.noise_multiplier is None) == (self.target_epsilon is None):
            raise ConfigError(
                "privacy.noise_multiplier",
                self.noise_multiplier,
                "give exactly one of privacy.noise_multiplier and privacy.target_epsilon",
                "set the other to null",
            )
        if self.noise_multiplier is not None and not MIN_NOISE_MULTIPLIER <= self.noise_multiplier <= 100.0:
            raise ConfigError(
                "privacy.noise_multiplier",
                self.noise_multiplier,
                f"must be in [{MIN_NOISE_MULTIPLIER:g}, 100]: below {MIN_NOISE_MULTIPLIER:g} the guarantee is void "
                "(σ = 0.1 over just 50 steps at sample rate 0.02 already gives ε ≈ 840 at δ = 1e-5)",
                "raise it (1.0 or more is usual); or set it to null and give privacy.target_epsilon; or, for no "
                "privacy at all, say so: privacy.enabled: false",
            )
        if self.target_epsilon is not None:
            require(
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
        require(self.proximal_mu >= 0.0, "strategy.proximal_mu", self.proximal_mu, "must be >= 0")
        require(
            self.server_learning_rate > 0.0, "strategy.server_learning_rate", self.server_learning_rate, "must be > 0"
        )
        for key in ("server_beta_1", "server_beta_2"):
            value = getattr(self, key)
            require(0.0 <= value < 1.0, f"strategy.{key}", value, "must be in [0, 1)")
        require(self.server_tau > 0.0, "strategy.server_tau", self.server_tau, "must be > 0")
        for key in ("fraction_train", "fraction_evaluate"):
            value = getattr(self, key)
            require(0.0 < value <= 1.0, f"strategy.{key}", value, "must be in (0, 1]")
        require(self.min_replies >= 1, "strategy.min_replies", self.min_replies, "must be >= 1")
        require(self.round_timeout_s > 0.0, "strategy.round_timeout_s", self.round_timeout_s, "must be > 0")
        for key in ("max_update_norm", "bound_multiplier", "max_examples"):
            value = getattr(self, key)
            if value is not None:
                require(math.isfinite(value) and value > 0.0, f"strategy.{key}", value, "must be > 0 and finite")
        if self.bound_multiplier is not None:
            require(self.bound_multiplier >= 1.0, "strategy.bound_multiplier", self.bound_multiplier, "must be >= 1")
        require(
            self.aggregation in ("mean", "median", "trimmed_mean"),
            "strategy.aggregation",
            self.aggregation,
            "must be mean, median or trimmed_mean",
        )
        require(
            self.aggregation == "mean" or self.name == "fedavg",
            "strategy.aggregation",
            self.aggregation,
            f"median and trimmed_mean replace FedAvg's average: set strategy.name fedavg (got {self.name!r})",
        )
        require(0.0 <= self.trim_fraction < 0.5, "strategy.trim_fraction", self.trim_fraction, "must be in [0, 0.5)")


@dataclass(frozen=True)
class SimulationConfig:
    """Ray resources for simulated institutions. Resources are scheduling hints, not limits."""

    ray_num_cpus: int | None = None  # CPUs of a local Ray started for the run; None: all of this machine
    client_num_cpus: float = 1.0
    client_num_gpus: float = 0.0  # fractions share one GPU between institutions
    ray_address: str | None = None  # attach to a running cluster ("auto" or host:port)

    def __post_init__(self) -> None:
        if self.ray_num_cpus is not None:
            require(self.ray_num_cpus >= 1, "simulation.ray_num_cpus", self.ray_num_cpus, "must be >= 1")
        require(self.client_num_cpus > 0.0, "simulation.client_num_cpus", self.client_num_cpus, "must be > 0")
        require(self.client_num_gpus >= 0.0, "simulation.client_num_gpus", self.client_num_gpus, "must be >= 0")


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
            require(0.0 < self.max_epsilon <= 1000.0, "budget.max_epsilon", self.max_epsilon, "must be in (0, 1000]")
        for name, value in self.institution_epsilon.items():
            key = f"budget.institution_epsilon.{name}"
            if not is_valid_institution_name(name):
                raise ConfigError(key, name, f"institution names must be {INSTITUTION_NAME_RULE}")
            require(0.0 < value <= 1000.0, key, value, "must be in (0, 1000]")

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
        require(
            0.0 < self.noise_multiplier <= 100.0,
            "institution_dp.noise_multiplier",
            self.noise_multiplier,
            "must be in (0, 100]",
        )
        require(self.clipping_norm > 0.0, "institution_dp.clipping_norm", self.clipping_norm, "must be > 0")
        require(0.0 < self.delta < 1.0, "institution_dp.delta", self.delta, "must be > 0 and < 1")


@dataclass(frozen=True)
class TransferConfig:
    """How the shared encoder is used and what travels (rules in shared/transfer.py)."""

    # finetune: encoder + head train, encoder aggregated | frozen: heads only, nothing sent back | fedrep: head
    # epochs (encoder fixed) then encoder epochs, encoder aggregated | fedavg: everything shared, head included |
    # local: each institution alone (fedchurn compare) | centralized: pooled, NOT private (fedchurn compare)
    mode: Literal["finetune", "frozen", "fedrep", "fedavg", "local", "centralized"] = "finetune"
    head_epochs: int = 1  # fedrep: head-only epochs per round, before training.local_epochs encoder epochs

    def __post_init__(self) -> None:
        require(1 <= self.head_epochs <= 1000, "transfer.head_epochs", self.head_epochs, "must be 1..1000")


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
        require(
            100 <= self.source_rows <= 10_000_000, "pretrain.source_rows", self.source_rows, "must be 100..10000000"
        )
        require(1 <= self.epochs <= 10_000, "pretrain.epochs", self.epochs, "must be 1..10000")
        require(1 <= self.batch_size <= 1_000_000, "pretrain.batch_size", self.batch_size, "must be 1..1000000")
        require(0.0 < self.learning_rate <= 10.0, "pretrain.learning_rate", self.learning_rate, "must be in (0, 10]")
        require(0.0 < self.mask_fraction < 1.0, "pretrain.mask_fraction", self.mask_fraction, "must be in (0, 1)")
        require(
            0.0 < self.validation_fraction < 0.5,
            "pretrain.validation_fraction",
            self.validation_fraction,
            "must be > 0 and < 0.5",
        )
        require(1 <= self.num_workers <= 1024, "pretrain.num_workers", self.num_workers, "must be 1..1024")
        require(self.cpus_per_worker > 0.0, "pretrain.cpus_per_worker", self.cpus_per_worker, "must be > 0")
        require(self.gpus_per_worker >= 0.0, "pretrain.gpus_per_worker", self.gpus_per_worker, "must be >= 0")
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
            require(
                isinstance(node, str) and node.isdigit() and int(node) < 2**64,
                "federation.members",
                node,
                "keys are node ids (unsigned integers, as text)",
            )
            require(is_valid_institution_name(name), f"federation.members.{node}", name, INSTITUTION_NAME_RULE)
        names = list(self.members.values())
        duplicated = sorted({name for name in names if names.count(name) > 1})
        require(not duplicated, "federation.members", duplicated, "each institution is registered for one node")
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
    """What a bank releases about its training, validation and test rows (logic: clients/private_metrics.py).

    ``off``: nothing. ``dp``: a 2×bins histogram of model scores per row set with Gaussian noise of std
    ``noise_multiplier`` per cell (sensitivity 1), accounted in the bank's ledger, never past its budget.
    """

    mode: Literal["off", "dp"] = "dp"
    noise_multiplier: float = 5.0
    bins: int = 10
    logit_range: float = 6.0
    every_rounds: int = 0  # 0: only after the run's last round (or when the bank stops); k: also every k-th

    def __post_init__(self) -> None:
        require(
            0.5 <= self.noise_multiplier <= 1000.0,
            "evaluation.noise_multiplier",
            self.noise_multiplier,
            "must be in [0.5, 1000] (noise std per histogram cell)",
        )
        require(2 <= self.bins <= 1000, "evaluation.bins", self.bins, "must be 2..1000")
        require(0.0 < self.logit_range <= 50.0, "evaluation.logit_range", self.logit_range, "must be in (0, 50]")
        require(
            self.every_rounds >= 0, "evaluation.every_rounds", self.every_rounds, "must be >= 0 (0: last round only)"
        )


@dataclass(frozen=True)
class TrackingConfig:
    """Metrics streamed to an experiment tracker as rounds finish (written by the server: ``server/tracking.py``).

    Only what the server already records (the banks' released metrics, ε, σ, round times) is sent; a tracking
    failure is logged once and never fails or stalls the run.
    """

    backend: Literal["none", "tensorboard", "mlflow"] = "none"
    # Where the local store lives; null: RUN/tensorboard or RUN/mlflow. Relative paths are inside the run folder.
    directory: str | None = None
    mlflow_uri: str | None = None  # an MLflow tracking server or database URI instead of the local store
    experiment: str = "fedchurn"  # MLflow experiment; each run is named after its run identity

    def __post_init__(self) -> None:
        require(
            self.backend in ("none", "tensorboard", "mlflow"),
            "tracking.backend",
            self.backend,
            "must be none, tensorboard or mlflow",
        )
        if self.directory is not None:
            require(
                bool(self.directory.strip()) and "\x00" not in self.directory,
                "tracking.directory",
                self.directory,
                "must name a folder (or null for the default inside the run folder)",
            )
        if self.mlflow_uri is not None:
            require(
                bool(self.mlflow_uri.strip()),
                "tracking.mlflow_uri",
                self.mlflow_uri,
                "must be a tracking URI such as http://host:5000 (or null for the local store)",
            )
        require(
            bool(self.experiment.strip()) and len(self.experiment) <= 250,
            "tracking.experiment",
            self.experiment,
            "must be a name of 1..250 characters",
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
    tracking: TrackingConfig = field(default_factory=TrackingConfig)

    def __post_init__(self) -> None:
        require(0 <= self.seed < 2**31, "seed", self.seed, "must be in [0, 2^31)")
        require(1 <= self.rounds <= 100_000, "rounds", self.rounds, "must be 1..100000")
        require(bool(self.output_dir), "output_dir", self.output_dir, "must name a folder")


# --------------------------------------------------------------------------------------------------
# Generic conversion, driven by the dataclass type hints
# --------------------------------------------------------------------------------------------------
