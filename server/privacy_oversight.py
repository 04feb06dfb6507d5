"""The consortium's side of privacy: declines, the consortium ledger, institution-level DP. stdlib + flwr + numpy.

:class:`PrivacyOversight` sits between the strategy and the run recorder (``server/report.py``):

- it wraps the strategy so that a *decline* (``shared/decline.py``: an institution whose budget allows no further
  round) is recorded as a decline — who, round, ε so far, why — and never reaches reply validation, where it would
  count as a malformed reply; the round goes on with the others;
- it observes every accepted training reply and appends what each institution *reported* (its whitelisted
  numbers) to ``consortium_ledger.jsonl``, hash-chained like the institutions' own ledgers, so an audit can hold
  each institution's ledger against what the consortium was told;
- it countersigns each bank's signed ledger-record hash (the reply's ``ledger`` record, shared/ledger_signing.py),
  keeps the bank's signature with its own countersignature in the consortium ledger, and sends the countersignature
  back to that bank in its next message (round config ``ledger-countersignature``);
- when ``institution_dp.enabled``, it puts :class:`~server.institution_dp.InstitutionLevelDP` in the chain and
  accounts for that second guarantee.
"""

from __future__ import annotations

import datetime
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from fedchurn.server.institution_dp import InstitutionLevelDP, Release, gaussian_composition_epsilon
from fedchurn.server.reply_checks import check_member
from fedchurn.server.strategy import DroppedReply, EncoderAggregation, Reply, RoundObserver, reply_institution
from fedchurn.shared.config import FedChurnConfig
from fedchurn.shared.decline import EVALUATION_WITHHELD, Decline, is_decline, read_decline
from fedchurn.shared.ledger import CONSORTIUM_LEDGER_FILE, JsonlChain, LedgerError, SignedHash
from fedchurn.shared.ledger_signing import (
    CONSORTIUM_KEY_FILE,
    COUNTERSIGNATURE_FIELD,
    WIRE_KEY,
    load_or_create_signer,
    parse_wire,
)
from fedchurn.shared.wire import CONFIG_KEY

logger = logging.getLogger(__name__)
progress = logging.getLogger("fedchurn.progress")

SECRET_NOISE = "secret: drawn at each bank from its OS CSPRNG, fresh every call"
NOT_PRIVATE_NOISE = (
    "not private against the server: noise and batches seeded from the config's seed (privacy.reproducible_noise, "
    "a simulation-only research switch)"
)

__all__ = ["CONSORTIUM_LEDGER_FILE", "DeclineScreen", "PrivacyOversight"]


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def set_aside_abandoned_rounds(path: Path, *, completed_round: int) -> Path | None:
    """Before a resumed run re-runs round ``completed_round + 1``: move the chain's tail from the first record of a
    later round (the interrupted attempt) to ``<name>.abandoned-<time>.jsonl`` next to it, so every round is in the
    ledger once and nothing is lost. A prefix of a hash chain is a valid chain. Returns the side file, if any."""
    if not path.is_file():
        return None
    lines = path.read_text(encoding="utf-8").splitlines(keepends=True)
    cut = len(lines)
    for index, line in enumerate(lines):
        try:
            record = json.loads(line).get("record", {})
            server_round = int(record.get("round", 0)) if isinstance(record, dict) else 0
        except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
            raise LedgerError(f"{path}, line {index + 1}: not a ledger entry; cannot resume onto it") from None
        if server_round > completed_round:
            cut = index
            break
    if cut == len(lines):
        return None
    stamp = datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%S")
    side = path.with_name(f"{path.stem}.abandoned-{stamp}.jsonl")
    side.write_text("".join(lines[cut:]), encoding="utf-8")
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text("".join(lines[:cut]), encoding="utf-8")
    os.replace(temporary, path)
    logger.warning(
        "resuming after round %d: %d consortium ledger records of the interrupted round moved to %s",
        completed_round,
        len(lines) - cut,
        side.name,
    )
    return side


class DeclineScreen(Strategy):
    """A strategy wrapper: declines go to the oversight, every other reply to the wrapped strategy."""

    def __init__(self, strategy: Strategy, oversight: PrivacyOversight) -> None:
        super().__init__()
        self.strategy = strategy
        self.oversight = oversight

    def configure_train(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        return self.oversight.with_countersignatures(self.strategy.configure_train(server_round, arrays, config, grid))

    def aggregate_train(
        self, server_round: int, replies: Iterable[Message]
    ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        others, declines, malformed = self._screen(replies, evaluate=False)
        self.oversight.on_declines(server_round, declines, malformed)
        return self.strategy.aggregate_train(server_round, others)

    def configure_evaluate(
        self, server_round: int, arrays: ArrayRecord, config: ConfigRecord, grid: Grid
    ) -> Iterable[Message]:
        messages = self.strategy.configure_evaluate(server_round, arrays, config, grid)
        return self.oversight.with_countersignatures(messages)

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        others, declined, malformed = self._screen(replies, evaluate=True)
        withheld = [name for name, _ in declined]
        self.oversight.on_withheld(server_round, withheld, malformed)
        return self.strategy.aggregate_evaluate(server_round, others)

    def _screen(
        self, replies: Iterable[Message], *, evaluate: bool
    ) -> tuple[list[Message], list[tuple[str, Decline]], list[DroppedReply]]:
        """Replies that are not declines; well-formed declines by name; malformed ones with their reason.

        An evaluate request may only be declined with 'evaluation-withheld', a training round never with it.
        """
        others: list[Message] = []
        declines: list[tuple[str, Decline]] = []
        malformed: list[DroppedReply] = []
        for message in replies:
            if not is_decline(message):
                others.append(message)
                continue
            name, decline = self._read(message)
            if not isinstance(decline, str) and (decline.reason == EVALUATION_WITHHELD) != evaluate:
                decline = (
                    "not an acceptable evaluate decline"
                    if evaluate
                    else "'evaluation-withheld' answers an evaluate request, not a training round"
                )
            if name is None or isinstance(decline, str):
                malformed.append(DroppedReply(name or f"node {message.metadata.src_node_id}", str(decline)))
            else:
                declines.append((name, decline))
        return others, sorted(declines, key=lambda item: item[0]), malformed

    def _read(self, message: Message) -> tuple[str | None, Decline | str]:
        """Who declines and why, or why this decline is refused (malformed, or from a node registered otherwise)."""
        try:
            name = reply_institution(message)
            if name is None:
                return None, "a decline that names no institution"
            return name, check_member(message, name, self.oversight.members) or read_decline(message)
        except Exception as exc:  # a reply must never crash the server, whatever it holds
            return None, f"unreadable decline ({type(exc).__name__})"

    def summary(self) -> None:
        self.strategy.summary()


class PrivacyOversight:
    """Round observer in front of the run recorder; see the module docstring."""

    def __init__(
        self, config: FedChurnConfig, output_dir: Path, *, run_id: int | str, completed_round: int = 0
    ) -> None:
        self.config = config
        self.run_id = run_id
        # A resumed run continues its chain and remembers who already stopped; a new run starts both afresh.
        resuming = config.federation.resume
        if resuming:
            set_aside_abandoned_rounds(output_dir / CONSORTIUM_LEDGER_FILE, completed_round=completed_round)
        self.ledger = JsonlChain(output_dir / CONSORTIUM_LEDGER_FILE, fresh=not resuming)
        self.declines: list[dict[str, Any]] = []
        self.stopped: dict[str, dict[str, Any]] = {}  # institution -> its first decline
        if config.privacy.reproducible_noise:  # the run header says it, before any round
            progress.warning("privacy.reproducible_noise is on: %s", NOT_PRIVATE_NOISE)
        if resuming:
            for entry in self.ledger.entries():
                record = json.loads(entry.record_json)
                if record.get("kind") == "decline" and record.get("run_id") == run_id:
                    decline = {k: v for k, v in record.items() if k not in ("kind", "run_id", "recorded_at")}
                    self.declines.append(decline)
                    self.stopped.setdefault(decline["institution"], decline)
        self.releases: list[Release] = []
        self.withheld: dict[str, list[int]] = {}  # institution -> rounds it released no evaluation
        self._weights: dict[int, list[float]] = {}
        self._forward: RoundObserver | None = None
        # Ledger countersigning (shared/ledger_signing.py): the consortium key lives in the server's output folder.
        self.signer = load_or_create_signer(output_dir / CONSORTIUM_KEY_FILE, "consortium")
        self.bank_keys: dict[str, str] = {}  # institution -> the ledger key first seen from it (pinned)
        for entry in self.ledger.entries() if resuming else []:
            bank = entry.record.get("bank_ledger")
            if isinstance(bank, dict) and isinstance(bank.get("public-key"), str):
                self.bank_keys.setdefault(str(entry.record.get("institution")), bank["public-key"])
        self._pending: dict[int, SignedHash] = {}  # node id -> countersignature to send in its next message
        self.members: Mapping[int, str] | None = None  # node id -> registered institution, from the strategy

    def wrap(self, strategy: EncoderAggregation) -> Strategy:
        """The strategy to run: declines screened, replies observed here, institution-level DP when configured."""
        self._forward = strategy.observer
        self.members = strategy.members
        strategy.observer = self
        inner: Strategy = strategy  # type: ignore[assignment]
        if self.config.institution_dp.enabled:
            inner = InstitutionLevelDP(
                strategy,
                self.config.institution_dp,
                strategy_name=self.config.strategy.name,
                accepted_weights=lambda server_round: self._weights.get(server_round, []),
                on_release=self.on_release,
            )
        return DeclineScreen(inner, self)

    # --- RoundObserver ---------------------------------------------------------------------------

    def on_train(self, server_round: int, accepted: list[Reply], dropped: list[DroppedReply]) -> None:
        self._weights[server_round] = [reply.weight for reply in accepted]  # as aggregated (capped)
        for reply in accepted:
            record = {"kind": "train", "round": server_round, "institution": reply.institution, **reply.metrics}
            self._append({**record, **self._countersign(reply)})
        if self._forward is not None:
            self._forward.on_train(server_round, accepted, dropped)

    def on_evaluate(self, server_round: int, accepted: list[Reply], dropped: list[DroppedReply]) -> None:
        if self._forward is not None:
            self._forward.on_evaluate(server_round, accepted, dropped)

    # --- ledger countersignatures ----------------------------------------------------------------

    def _countersign(self, reply: Reply) -> dict[str, Any]:
        """Fields for the consortium record: the bank's signed hash and our countersignature, or why there is none.

        The ``ledger`` record is hostile input: it is verified (bounded fields, the signature against the key) and
        the key must be the one this institution used before; otherwise nothing is countersigned and the reason (a
        fixed text) is recorded.
        """
        content = reply.message.content
        if WIRE_KEY not in content.config_records:
            return {"bank_ledger": None, "bank_ledger_problem": "the reply carried no signed ledger record"}
        parsed = parse_wire(dict(content.config_records[WIRE_KEY]), "bank")
        if not isinstance(parsed, str):
            pinned = self.bank_keys.setdefault(reply.institution, parsed.public_key)
            if pinned != parsed.public_key:
                parsed = "signed with a key other than the one this institution signed with before"
        if isinstance(parsed, str):
            logger.warning("%s: not countersigning its ledger record: %s", reply.institution, parsed)
            return {"bank_ledger": None, "bank_ledger_problem": parsed}
        countersignature = self.signer.sign(parsed.record_hash)
        self._pending[reply.message.metadata.src_node_id] = countersignature
        return {"bank_ledger": parsed.to_wire(), "consortium_countersignature": countersignature.to_wire()}

    def with_countersignatures(self, messages: Iterable[Message]) -> list[Message]:
        """The messages, each bank's carrying our countersignature of its last ledger record in its round config.

        Flower's strategies send one shared RecordDict to every node: a message that gains a field gets its own copy.
        """
        out: list[Message] = []
        for message in messages:
            pending = self._pending.get(message.metadata.dst_node_id)
            if pending is None or CONFIG_KEY not in message.content.config_records:
                out.append(message)
                continue
            content = RecordDict(dict(message.content.items()))
            config = dict(message.content.config_records[CONFIG_KEY])
            content[CONFIG_KEY] = ConfigRecord({**config, COUNTERSIGNATURE_FIELD: pending.to_text()})
            out.append(
                Message(
                    content=content,
                    dst_node_id=message.metadata.dst_node_id,
                    message_type=message.metadata.message_type,
                    group_id=message.metadata.group_id or None,
                )
            )
        return out

    # --- declines and releases -------------------------------------------------------------------

    def on_declines(
        self, server_round: int, declines: list[tuple[str, Decline]], malformed: list[DroppedReply]
    ) -> None:
        for name, decline in declines:
            entry = {
                "round": server_round,
                "institution": name,
                "reason_code": decline.reason,
                "reason": decline.explain(),
                "epsilon": _finite(decline.epsilon),
                "projected_epsilon": _finite(decline.projected_epsilon),
                "max_epsilon": decline.max_epsilon,
                "delta": decline.delta,
                "rounds_trained": decline.rounds_trained,
            }
            self.declines.append(entry)
            self._append({"kind": "decline", **entry})
            if name not in self.stopped:
                self.stopped[name] = entry
                progress.info("round %d: %s stops training: %s", server_round, name, decline.explain())
        if malformed and self._forward is not None:
            self._forward.on_train(server_round, [], malformed)

    def on_withheld(self, server_round: int, names: list[str], malformed: list[DroppedReply]) -> None:
        """Institutions that released no evaluation statistics this round: recorded, never an error."""
        for name in names:
            self.withheld.setdefault(name, []).append(server_round)
            self._append({"kind": "evaluation-withheld", "round": server_round, "institution": name})
        if malformed and self._forward is not None:
            self._forward.on_evaluate(server_round, [], malformed)

    def on_release(self, release: Release) -> None:
        self.releases.append(release)
        self._append(
            {
                "kind": "institution-dp",
                "round": release.server_round,
                "contributors": release.contributors,
                "max_weight_share": release.max_weight_share,
                "noise_std": release.noise_std,
                "clipping_norm": self.config.institution_dp.clipping_norm,
                "noise_multiplier": self.config.institution_dp.noise_multiplier,
                "effective_noise_multiplier": release.effective_noise_multiplier,
                "delta": self.config.institution_dp.delta,
                "epsilon": self.institution_epsilon(),
            }
        )

    def institution_epsilon(self) -> float:
        """ε of the institution-level guarantee over every noisy release so far (exact Gaussian composition)."""
        return gaussian_composition_epsilon(
            [r.effective_noise_multiplier for r in self.releases], delta=self.config.institution_dp.delta
        )

    # --- summary ---------------------------------------------------------------------------------

    def summary(self) -> dict[str, Any]:
        """The ``budget`` and ``institution_dp`` sections of summary.json."""
        budget = self.config.budget
        institution_dp: dict[str, Any] = {"enabled": self.config.institution_dp.enabled}
        if self.config.institution_dp.enabled:
            institution_dp.update(
                {
                    "guarantee": "per institution: one institution's whole encoder update in each round "
                    "(zero-out adjacency), NOT per customer",
                    "noise_multiplier": self.config.institution_dp.noise_multiplier,
                    "clipping_norm": self.config.institution_dp.clipping_norm,
                    "delta": self.config.institution_dp.delta,
                    "releases": len(self.releases),
                    "effective_noise_multipliers": [r.effective_noise_multiplier for r in self.releases],
                    "epsilon": _finite(self.institution_epsilon()),
                    "accounting": "Gaussian mechanisms without sampling, composed exactly (GDP)",
                }
            )
        return {
            "budget": {
                "max_epsilon": budget.max_epsilon,
                "institution_epsilon": dict(budget.institution_epsilon),
                "delta": self.config.privacy.delta,
                "stopped": dict(sorted(self.stopped.items())),
                "declines": self.declines,
            },
            "institution_dp": institution_dp,
            "noise": NOT_PRIVATE_NOISE if self.config.privacy.reproducible_noise else SECRET_NOISE,
            "evaluation_withheld": {name: rounds for name, rounds in sorted(self.withheld.items())},
            "consortium_ledger": CONSORTIUM_LEDGER_FILE,
        }

    def _append(self, record: dict[str, Any]) -> None:
        stamped = {
            "run_id": self.run_id,
            "recorded_at": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
            **record,
        }
        self.ledger.append(stamped)
