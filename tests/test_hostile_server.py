"""The consortium server as the adversary, against a bank's REAL ClientApp with real Flower messages.

A real bank here is what a SuperNode gives the ClientApp: a node config naming the institution, its data file,
its state folder and its policy file. The server controls everything else — the run-config, the round number,
the encoder, how often it asks — and tries to make the bank train with weaker privacy than its own policy, to
predict or remove the noise, to get a data value out of an error, or to reset the bank's ε.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml
from flwr.app import ConfigRecord, Context, Message, MessageType, RecordDict

from fedchurn.clients.app import make_client_app
from fedchurn.clients.prepared_institution import prepare_institution
from fedchurn.clients.training import steps_per_round
from fedchurn.server.app import initial_encoder
from fedchurn.server.privacy_oversight import PrivacyOversight
from fedchurn.shared.bank_random import bank_secret_key
from fedchurn.shared.config import (
    FedChurnConfig,
    SchemaConfig,
    SyntheticConfig,
    apply_overrides,
    config_to_run_config,
    default_config,
)
from fedchurn.shared.decline import is_decline, read_decline
from fedchurn.shared.institution_rows import write_csv
from fedchurn.shared.ledger import InstitutionLedger
from fedchurn.shared.privacy_accounting import compute_epsilon, sample_rate_for
from fedchurn.shared.synthetic_consortium import SYNTHETIC_SCHEMA, generate_synthetic_institution
from fedchurn.shared.wire import TRAIN_METRICS, from_array_record, to_array_record

BANK = "bank-a"
ROWS = 400


@pytest.fixture(autouse=True)
def _task_identity():
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 0
    yield


@pytest.fixture(scope="module")
def bank_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    table = generate_synthetic_institution(SyntheticConfig(institutions=1, min_rows=ROWS, max_rows=ROWS), 0, seed=7)
    path = tmp_path_factory.mktemp("bank") / "customers.csv"
    write_csv(table, path)
    return path


POLICY = {
    "require_dp": True,
    "min_noise_multiplier": 0.8,
    "max_clipping_norm": 5.0,
    "max_delta": 1.0e-5,
    "lifetime_epsilon": 10.0,
    "allowed_transfer_modes": ["finetune", "fedrep"],
    "max_rounds_per_run": 4,
}


def _server_config(tmp_path: Path, **overrides: Any) -> FedChurnConfig:
    config = dataclasses.replace(default_config(), rounds=3, output_dir=str(tmp_path / "server"))
    return apply_overrides(config, overrides) if overrides else config


class RealBank:
    """One bank's SuperNode: its node config is the bank's; the run-config and messages are the server's."""

    def __init__(self, tmp_path: Path, data: Path, *, name: str = "bank", policy: dict[str, Any] | None = None):
        self.state_dir = tmp_path / name / "state"
        policy_path = tmp_path / name / "policy.yaml"
        policy_path.parent.mkdir(parents=True, exist_ok=True)
        policy_path.write_text(yaml.safe_dump(policy if policy is not None else POLICY))
        self.node_config = {
            "institution": BANK,
            "data-path": str(data),
            "state-dir": str(self.state_dir),
            "policy": str(policy_path),
        }
        self.app = make_client_app()  # reads the run-config from the context, as under `flwr run`
        self.state = RecordDict()

    def send(
        self, config: FedChurnConfig, server_round: int, *, encoder: dict | None = None, run_id: int = 1
    ) -> Message:
        context = Context(
            run_id=run_id,
            node_id=7,
            node_config=self.node_config,
            state=self.state,
            run_config=config_to_run_config(config),
        )
        arrays = encoder if encoder is not None else _encoder(config)
        content = RecordDict(
            {"arrays": to_array_record(arrays), "config": ConfigRecord({"server-round": server_round})}
        )
        reply = self.app(Message(content=content, dst_node_id=7, message_type=MessageType.TRAIN), context)
        assert not reply.has_error(), "a bank answers with a code, never with Flower's exception text"
        return reply

    def ledger_records(self) -> list[dict]:
        return [entry.record for entry in InstitutionLedger.in_folder(self.state_dir).entries()]

    def n_train(self, config: FedChurnConfig) -> int:
        """The bank's training rows (the test's view of the bank's disk; the server never sees this)."""
        data = dataclasses.replace(
            config.data, source="csv", schema=SYNTHETIC_SCHEMA, institution_files={BANK: self.node_config["data-path"]}
        )
        key, _ = bank_secret_key(self.state_dir)
        return len(prepare_institution(dataclasses.replace(config, data=data), BANK, split_key=key).y_train)


def _encoder(config: FedChurnConfig) -> dict[str, np.ndarray]:
    return initial_encoder(config, SYNTHETIC_SCHEMA.feature_names)


def _arrays(reply: Message) -> dict[str, np.ndarray]:
    return from_array_record(reply.content["arrays"])  # type: ignore[arg-type]


def _differ(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return any(not np.array_equal(a[key], b[key]) for key in a)


def _declined(reply: Message, code: str) -> None:
    assert is_decline(reply)
    decline = read_decline(reply)
    assert not isinstance(decline, str), decline
    assert decline.reason == code
    assert not reply.content.array_records, "a decline sends no weights"


# --------------------------------------------------------------------------------------------------
# Noise the server can neither predict nor remove
# --------------------------------------------------------------------------------------------------


def test_same_config_and_seed_twice_and_a_retried_round_give_different_noise(tmp_path: Path, bank_csv: Path) -> None:
    config = _server_config(tmp_path)
    first = _arrays(RealBank(tmp_path, bank_csv, name="one").send(config, 1))
    second = _arrays(RealBank(tmp_path, bank_csv, name="two").send(config, 1))
    assert _differ(first, second)
    bank = RealBank(tmp_path, bank_csv, name="retry")
    tried = _arrays(bank.send(config, 1))
    retried = _arrays(bank.send(config, 1))  # the server asks for round 1 again, same encoder
    assert _differ(tried, retried)
    assert all(record["noise_source"] == "secret (OS CSPRNG)" for record in bank.ledger_records())


def _simulated_bank_config(tmp_path: Path, data: Path, *, reproducible: bool) -> FedChurnConfig:
    config = _server_config(tmp_path, **{"privacy.reproducible_noise": reproducible})
    data_config = dataclasses.replace(
        config.data, source="csv", schema=SYNTHETIC_SCHEMA, institution_files={BANK: str(data)}
    )
    return dataclasses.replace(config, data=data_config)


def _simulated_reply(config: FedChurnConfig, out: Path) -> dict[str, np.ndarray]:
    """The server's shadow of the bank: the same code on data it assumes, with the public seed."""
    config = dataclasses.replace(config, output_dir=str(out))
    context = Context(
        run_id=1,
        node_id=3,
        node_config={"partition-id": 0, "num-partitions": 1},
        state=RecordDict(),
        run_config=config_to_run_config(config),
    )
    content = RecordDict({"arrays": to_array_record(_encoder(config)), "config": ConfigRecord({"server-round": 1})})
    reply = make_client_app()(Message(content=content, dst_node_id=3, message_type=MessageType.TRAIN), context)
    return _arrays(reply)


def test_the_old_noise_regeneration_attack_no_longer_works(tmp_path: Path, bank_csv: Path) -> None:
    """The strongest DP adversary knows every row but the target's. With noise seeded from public values (the old
    behaviour, now only ``privacy.reproducible_noise`` in a simulation) it regenerates the bank's reply for both
    worlds — target row in or out — and the reply matches one of them bit for bit: membership decided with
    certainty. Against a real bank's secret noise neither world matches."""
    lines = bank_csv.read_text().splitlines()
    without_target = tmp_path / "without.csv"
    without_target.write_text("\n".join(lines[:-1]) + "\n")  # the last customer is the target

    # Before: the bank's reply is a function of public values and the rows.
    seeded = _simulated_bank_config(tmp_path, bank_csv, reproducible=True)
    reply = _simulated_reply(seeded, tmp_path / "bank-before")
    world_in = _simulated_reply(seeded, tmp_path / "shadow-in")
    world_out = _simulated_reply(_simulated_bank_config(tmp_path, without_target, reproducible=True), tmp_path / "o")
    assert not _differ(reply, world_in), "seeded noise: the server regenerates the reply exactly"
    assert _differ(reply, world_out), "... and tells the world without the target apart"

    # After: a real bank, same public config and seed. The shadow worlds say nothing.
    real = _arrays(RealBank(tmp_path, bank_csv).send(_server_config(tmp_path), 1))
    assert _differ(real, world_in) and _differ(real, world_out)
    for world in (world_in, world_out):
        secret = _simulated_reply(_simulated_bank_config(tmp_path, bank_csv, reproducible=False), tmp_path / "s")
        assert _differ(secret, world)


# --------------------------------------------------------------------------------------------------
# Instructions weaker than the bank's policy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("overrides", "code"),
    [
        ({"privacy.enabled": False}, "policy-dp-required"),
        ({"privacy.noise_multiplier": 0.5}, "policy-noise-too-low"),
        ({"privacy.delta": 1.0e-3}, "policy-delta-too-high"),
        ({"privacy.clipping_norm": 50.0}, "policy-clipping-too-high"),
        ({"transfer.mode": "fedavg"}, "policy-mode-not-allowed"),
        ({"rounds": 50}, "policy-too-many-rounds"),
        ({"privacy.reproducible_noise": True}, "policy-reproducible-noise"),
    ],
)
def test_instruction_weaker_than_policy_is_declined_before_any_training(
    tmp_path: Path, bank_csv: Path, overrides: dict[str, Any], code: str
) -> None:
    bank = RealBank(tmp_path, bank_csv)
    reply = bank.send(_server_config(tmp_path, **overrides), 1)
    _declined(reply, code)
    assert dict(reply.content["metrics"]) == {
        "epsilon": 0.0,
        "projected-epsilon": 0.0,
        "max-epsilon": 0.0,
        "delta": 0.0,
        "rounds-trained": 0.0,
    }, "a policy decline's numbers say nothing"
    assert bank.ledger_records() == [], "nothing was trained"
    assert not (bank.state_dir / "head.pt").exists()


def test_a_delta_not_below_one_over_the_banks_rows_is_declined_with_a_code_that_carries_no_n(
    tmp_path: Path, bank_csv: Path
) -> None:
    """δ >= 1/n (n: the bank's training rows) is refused even when the bank's policy sets no max_delta. The server
    learns the fixed code and zeros: not n, not 1/n, not the message (which stays in the bank's log)."""
    bank = RealBank(tmp_path, bank_csv, policy={**POLICY, "max_delta": None})
    config = _server_config(tmp_path, **{"privacy.delta": 0.9 / bank.n_train(_server_config(tmp_path))})
    assert bank.send(config, 1).content.array_records, "δ just below 1/n trains"
    bank = RealBank(tmp_path, bank_csv, name="other", policy={**POLICY, "max_delta": None})
    config = _server_config(tmp_path, **{"privacy.delta": 1.0 / bank.n_train(_server_config(tmp_path))})
    reply = bank.send(config, 1)
    _declined(reply, "delta-too-high-for-rows")
    assert set(dict(reply.content["metrics"]).values()) == {0.0}, "no n, no 1/n leaves the bank"
    assert bank.ledger_records() == [], "nothing was trained"


def test_a_server_probing_delta_cannot_bracket_a_small_banks_rows(tmp_path: Path, bank_csv: Path) -> None:
    """The server picks δ and sees the decline code, so ``delta-too-high-for-rows`` tells it n >= 1/δ. The bank's
    policy is checked first: any δ above its max_delta gets the same policy code whatever n is, so the probe can
    only bracket n at or above 1/max_delta (100,000 rows here), never a smaller bank's."""
    n = RealBank(tmp_path, bank_csv, name="probe").n_train(_server_config(tmp_path))
    assert n < 1.0 / POLICY["max_delta"]  # a small bank: 1/n is far above the policy's max δ
    codes = set()
    for index, delta in enumerate((0.5 / n, 0.9 / n, 1.0 / n, 2.0 / n)):  # on both sides of 1/n
        reply = RealBank(tmp_path, bank_csv, name=f"bank-{index}").send(
            _server_config(tmp_path, **{"privacy.delta": delta}), 1
        )
        decline = read_decline(reply)
        assert not isinstance(decline, str), decline
        assert not reply.content.array_records
        codes.add(decline.reason)
    assert codes == {"policy-delta-too-high"}, "one answer either side of 1/n: the probe learns nothing about n"


def test_a_bank_without_a_policy_file_enforces_the_conservative_default(tmp_path: Path, bank_csv: Path) -> None:
    bank = RealBank(tmp_path, bank_csv)
    del bank.node_config["policy"]
    _declined(bank.send(_server_config(tmp_path, **{"privacy.noise_multiplier": 0.5}), 1), "policy-noise-too-low")
    _declined(bank.send(_server_config(tmp_path, **{"privacy.enabled": False}), 1), "policy-dp-required")
    assert bank.send(_server_config(tmp_path), 1).content.array_records, "an honest instruction trains"


# --------------------------------------------------------------------------------------------------
# Lifetime budgets: no config, run name or resume resets them
# --------------------------------------------------------------------------------------------------


def test_raised_budget_new_run_name_and_new_run_are_declined_once_the_lifetime_cap_is_spent(
    tmp_path: Path, bank_csv: Path
) -> None:
    config = _server_config(tmp_path)
    probe = RealBank(tmp_path, bank_csv, name="probe")
    n = probe.n_train(config)
    q = sample_rate_for(dataset_size=n, batch_size=config.training.batch_size)
    per_round = steps_per_round(n_train=n, batch_size=config.training.batch_size, local_epochs=1)
    two, three = (compute_epsilon(noise_multiplier=1.2, sample_rate=q, steps=k * per_round, delta=1e-5) for k in (2, 3))
    cap = (two + three) / 2  # two rounds fit, a third does not
    bank = RealBank(tmp_path, bank_csv, name="probe", policy={**POLICY, "lifetime_epsilon": cap})
    for server_round in (1, 2):
        metrics = bank.send(config, server_round).content["metrics"]
    assert metrics["epsilon"] == pytest.approx(two, rel=1e-9)
    _declined(bank.send(config, 3), "budget-exhausted")
    hostile = [
        _server_config(tmp_path, **{"budget.max_epsilon": 1000.0}),  # a raised budget
        _server_config(tmp_path, **{"federation.run_name": "fresh-start"}),  # a new run name
    ]
    for instruction in hostile:
        _declined(bank.send(instruction, 1), "budget-exhausted")
    reply = bank.send(config, 1, run_id=999)  # a new Flower run
    _declined(reply, "budget-exhausted")
    decline = read_decline(reply)
    assert not isinstance(decline, str)
    assert decline.epsilon == pytest.approx(two, rel=1e-9) and decline.max_epsilon == pytest.approx(cap)
    assert len(bank.ledger_records()) == 2


def test_resume_with_more_rounds_replans_sigma_within_target_or_declines(tmp_path: Path, bank_csv: Path) -> None:
    # Evaluation off: the plan then spends the whole target on training (test_clients checks the plan that keeps
    # room for the final evaluation release).
    config = _server_config(
        tmp_path, **{"privacy.noise_multiplier": None, "privacy.target_epsilon": 3.0, "evaluation.mode": "off"}
    )
    config = apply_overrides(config, {"rounds": 2, "federation.run_name": "r"})
    bank = RealBank(tmp_path, bank_csv, policy={**POLICY, "max_rounds_per_run": 10})
    sigmas = []
    for server_round in (1, 2):
        metrics = bank.send(config, server_round).content["metrics"]
        sigmas.append(metrics["noise-multiplier"])
    assert 2.9 <= metrics["epsilon"] <= 3.0
    resumed = apply_overrides(config, {"rounds": 4, "federation.resume": True})  # two more rounds, same target
    for server_round in (3, 4):  # σ is re-planned for the rounds left (it must grow), or the bank declines
        reply = bank.send(resumed, server_round)
        if is_decline(reply):
            _declined(reply, "budget-exhausted")
            continue
        assert reply.content["metrics"]["epsilon"] <= 3.0
        assert reply.content["metrics"]["noise-multiplier"] > max(sigmas)
    assert max(r["epsilon"] for r in bank.ledger_records()) <= 3.0
    # ε already above the target on these rows (another run spent it): a target run is declined, not trained.
    spent = RealBank(tmp_path, bank_csv, name="spent", policy={**POLICY, "max_rounds_per_run": 10})
    for server_round in (1, 2, 3):
        spent.send(_server_config(tmp_path, **{"federation.run_name": "earlier"}), server_round)
    assert spent.ledger_records()[-1]["epsilon"] > 3.0
    _declined(spent.send(config, 1), "budget-exhausted")
    # A smaller first plan leaves room: then the extra rounds train, at a re-planned (larger) σ, within the target.
    roomy = RealBank(tmp_path, bank_csv, name="roomy", policy={**POLICY, "max_rounds_per_run": 10})
    first = apply_overrides(config, {"privacy.target_epsilon": 1.5})
    for server_round in (1, 2):
        roomy.send(first, server_round)
    more = apply_overrides(config, {"rounds": 4, "federation.resume": True})
    epsilons, new_sigmas = [], []
    for server_round in (3, 4):
        metrics = roomy.send(more, server_round).content["metrics"]
        epsilons.append(metrics["epsilon"])
        new_sigmas.append(metrics["noise-multiplier"])
    assert max(epsilons) <= 3.0 and epsilons[-1] == pytest.approx(3.0, rel=0.02)
    records = roomy.ledger_records()
    assert len(records) == 4 and all(r["epsilon"] <= 3.0 for r in records)
    # More rounds than the policy allows in one run: declined by the policy.
    capped = RealBank(tmp_path, bank_csv, name="capped", policy={**POLICY, "max_rounds_per_run": 2})
    _declined(capped.send(resumed, 1), "policy-too-many-rounds")


# --------------------------------------------------------------------------------------------------
# Only whitelisted numbers leave
# --------------------------------------------------------------------------------------------------


def _reply_text(reply: Message) -> str:
    parts = []
    content = reply.content
    for record in content.config_records.values():
        parts.extend(f"{k}={v}" for k, v in record.items())
    for record in content.metric_records.values():
        parts.extend(f"{k}={v}" for k, v in record.items())
    if reply.has_error():
        parts.append(str(reply.error.reason))
    return "\n".join(parts)


def test_a_crafted_schema_never_gets_a_data_value_into_a_reply_or_server_file(tmp_path: Path, bank_csv: Path) -> None:
    # The server declares the numeric column 'balance' as categorical: the reader complains about a value.
    numeric = tuple(c for c in SYNTHETIC_SCHEMA.numeric if c != "balance")
    crafted = SchemaConfig(
        label=SYNTHETIC_SCHEMA.label,
        positive=SYNTHETIC_SCHEMA.positive,
        numeric=numeric,
        categorical={**SYNTHETIC_SCHEMA.categorical, "balance": ("none",)},
    )
    base = _server_config(tmp_path)
    config = dataclasses.replace(
        base,
        data=dataclasses.replace(base.data, source="csv", schema=crafted, institution_files={BANK: "/server/guess"}),
    )
    bank = RealBank(tmp_path, bank_csv)
    reply = bank.send(config, 1)
    _declined(reply, "error-data")
    header = bank_csv.read_text().splitlines()[0].split(",")
    balances = {line.split(",")[header.index("balance")] for line in bank_csv.read_text().splitlines()[1:]}
    text = _reply_text(reply)
    balances = {value for value in balances if len(value) >= 4}  # e.g. "11576.02"; "0" is in any number
    leaked = [value for value in balances if value in text]
    assert leaked == [], f"data values in the reply: {leaked[:3]}"
    assert str(bank_csv) not in text and "customers.csv" not in text
    # What the server writes from it: the consortium ledger's decline entry.
    oversight = PrivacyOversight(config, tmp_path / "server", run_id="r")
    decline = read_decline(reply)
    assert not isinstance(decline, str)
    oversight.on_declines(1, [(BANK, decline)], [])
    written = (tmp_path / "server" / "consortium_ledger.jsonl").read_text()
    assert not [value for value in balances if value and f"'{value}'" in written]
    assert "error-data" in written


def test_train_reply_carries_no_row_count_by_default(tmp_path: Path, bank_csv: Path) -> None:
    config = apply_overrides(_server_config(tmp_path), {"rounds": 1})  # round 1 is the last: evaluation releases
    bank = RealBank(tmp_path, bank_csv)
    metrics = dict(bank.send(config, 1).content["metrics"])
    assert set(metrics) == set(TRAIN_METRICS)
    assert not {"steps", "total-steps", "sample-rate"} & set(metrics)
    assert metrics["num-examples"] == 1.0
    assert math.isfinite(metrics["epsilon"])
    context = Context(
        run_id=1, node_id=7, node_config=bank.node_config, state=bank.state, run_config=config_to_run_config(config)
    )
    content = RecordDict({"arrays": to_array_record(_encoder(config)), "config": ConfigRecord({"server-round": 1})})
    evaluation = bank.app(Message(content=content, dst_node_id=7, message_type=MessageType.EVALUATE), context)
    counts = evaluation.content["metrics"]
    assert counts["n-train"] == 0.0  # withheld; the test count and the weight are noisy counts of the DP release
    assert counts["num-examples"] >= 1.0
    allowed = RealBank(tmp_path, bank_csv, name="open", policy={**POLICY, "report_dataset_size": True})
    assert allowed.send(config, 1).content["metrics"]["num-examples"] == float(allowed.n_train(config))
