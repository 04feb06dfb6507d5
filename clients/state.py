"""What an institution keeps between rounds: its churn head and its privacy accountant's history.

Kept in Flower's ``context.state`` (memory, one run) and mirrored to the institution's own disk after every
round, so a restarted node continues its accounting instead of starting from zero.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, RecordDict

from fedchurn.shared.errors import FedChurnError
from fedchurn.shared.privacy_accounting import AccountantState

logger = logging.getLogger(__name__)

HEAD_FILE = "head.pt"
PRIVACY_FILE = "privacy.json"
PREPROCESSOR_FILE = "preprocessor.json"
_CONTEXT_HEAD = "fedchurn.head"
_CONTEXT_PRIVACY = "fedchurn.privacy"


@dataclass
class InstitutionState:
    """One institution's memory across rounds of one run (its lifetime privacy history is its ledger)."""

    run_id: int | str  # Flower's run id, or the fedchurn run name (federation.run_name)
    accountant: AccountantState
    head: dict[str, torch.Tensor] | None = None
    noise_multiplier: float | None = None  # fixed for the run once derived (re-planned when rounds change)
    planned_rounds: int | None = None  # the run length σ was planned for (target_epsilon)
    rounds_trained: int = 0
    last_epsilon: float = 0.0
    preprocessor: dict[str, Any] | None = field(default=None)

    def privacy_record(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "rounds_trained": self.rounds_trained,
            "noise_multiplier": self.noise_multiplier,
            "planned_rounds": self.planned_rounds,
            "epsilon": self.last_epsilon,
            "accountant_state": self.accountant.to_dict(),
        }


class StateStore:
    """Loads and saves an institution's state: ``context.state`` first, then its folder on disk."""

    def __init__(self, folder: Path, *, run_id: int | str, accountant: str) -> None:
        self.folder = folder
        self.run_id = run_id
        self.accountant = accountant

    def load(self, context_state: RecordDict) -> InstitutionState:
        state = self._from_context(context_state)
        if state is None:
            state = self._from_disk()
        if state is None:
            state = InstitutionState(run_id=self.run_id, accountant=AccountantState(accountant=self.accountant))
        return state

    def save(self, state: InstitutionState, context_state: RecordDict) -> None:
        record = state.privacy_record()
        context_state[_CONTEXT_PRIVACY] = ConfigRecord({"json": json.dumps(record)})
        if state.head is not None:
            context_state[_CONTEXT_HEAD] = ArrayRecord({k: v for k, v in state.head.items()})
        self.folder.mkdir(parents=True, exist_ok=True)
        if state.head is not None:
            _atomic_torch_save(state.head, self.folder / HEAD_FILE)
        _atomic_write(self.folder / PRIVACY_FILE, json.dumps(record, indent=2))
        if state.preprocessor is not None:
            _atomic_write(self.folder / PREPROCESSOR_FILE, json.dumps(state.preprocessor, indent=2))

    # --- internals -------------------------------------------------------------------------------

    def _from_context(self, context_state: RecordDict) -> InstitutionState | None:
        if _CONTEXT_PRIVACY not in context_state:
            return None
        record = context_state[_CONTEXT_PRIVACY]
        values = json.loads(str(record["json"]))  # type: ignore[index]
        head = None
        if _CONTEXT_HEAD in context_state:
            head = dict(context_state[_CONTEXT_HEAD].to_torch_state_dict())  # type: ignore[union-attr]
        return self._state_from(values, head)

    def _from_disk(self) -> InstitutionState | None:
        privacy_path = self.folder / PRIVACY_FILE
        if not privacy_path.is_file():
            return None
        try:
            values = json.loads(privacy_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise FedChurnError(
                f"{privacy_path} is unreadable ({exc}); it holds this institution's privacy accounting — restore it "
                "from backup or move it away to start a new run"
            ) from None
        if values.get("run_id") != self.run_id:
            return None  # state of another run: this run starts afresh (its files are replaced at first save)
        head = None
        head_path = self.folder / HEAD_FILE
        if head_path.is_file():
            head = torch.load(head_path, map_location="cpu", weights_only=True)
        logger.info("resuming institution state from %s (round %s)", self.folder, values.get("rounds_trained"))
        return self._state_from(values, head)

    def _state_from(self, values: dict[str, Any], head: dict[str, torch.Tensor] | None) -> InstitutionState:
        accountant = AccountantState.from_dict(values["accountant_state"])
        return InstitutionState(
            run_id=values["run_id"],
            accountant=accountant,
            head=head,
            noise_multiplier=values.get("noise_multiplier"),
            planned_rounds=values.get("planned_rounds"),
            rounds_trained=int(values.get("rounds_trained", 0)),
            last_epsilon=float(values.get("epsilon", 0.0)),
        )


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _atomic_torch_save(obj: Any, path: Path) -> None:
    tmp = path.with_name(path.name + ".tmp")
    torch.save(obj, tmp)
    os.replace(tmp, path)
