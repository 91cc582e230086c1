"""What a training run is (``RunIdentity``) and how far it got (``TrainState``): the content of ``state.json``.

A checkpoint is resumed only by the run that wrote it: same stage (every field, the shuffle window included),
model shape, seed and number of ranks — anything else would continue another run's data order and schedule.
``TrainState`` is everything else a resume needs besides the weights, optimizer and RNG states: the step, the
counters, the loss/lr history and every rank's data position. It is saved as readable JSON::

    {"step": 40, "tokens": 81920, "seconds": 312.5, "losses": [...], "lrs": [...],
     "positions": [{"epoch": 0, "doc": 1280, "piece": 3}, ...],   # one per rank
     "run": {"stage": {...}, "shape": {...}, "seed": 1234, "world": 2}}
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field

from mmbert_dagster.recipe import ModelShape, Stage
from mmbert_dagster.train.packing import DataPosition


@dataclass(frozen=True)
class RunIdentity:
    """What a checkpoint must have been trained with to be resumed."""

    stage: Stage  # every field: schedule, masking, batch size, shuffle window (stage.shuffle_window_docs)
    shape: ModelShape
    seed: int
    world: int  # ranks: the data is sliced per rank, so another world size reads other documents

    def to_dict(self) -> dict:
        """JSON types only (tuples become lists), so that it compares equal to its own JSON round trip."""
        return json.loads(json.dumps(dataclasses.asdict(self)))

    def differences(self, saved: dict) -> list[str]:
        """``"stage.lr_peak: checkpoint 0.001, this run 0.002"`` for every field in which ``saved`` differs."""
        return [f"{key}: checkpoint {had!r}, this run {want!r}"
                for key, want in _flat(self.to_dict()).items()
                if (had := _flat(saved).get(key)) != want]


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict) and key in ("stage", "shape"):
            out |= _flat(value, f"{prefix}{key}.")
        else:
            out[prefix + key] = value
    return out


@dataclass
class TrainState:
    """A run's progress; one per process, the same on every rank (losses and counts are summed over the ranks)."""

    run: RunIdentity
    step: int = 0  # optimizer steps done
    tokens: int = 0  # real tokens trained on, all ranks
    seconds: float = 0.0  # time spent in those steps, over every (resumed) run
    losses: list[float] = field(default_factory=list)  # per step: mean MLM loss
    lrs: list[float] = field(default_factory=list)  # per step: the learning rate
    positions: list[DataPosition] = field(default_factory=list)  # per rank: the next piece, as of the last save

    @classmethod
    def fresh(cls, run: RunIdentity) -> TrainState:
        return cls(run, positions=[DataPosition(0, rank, 0) for rank in range(run.world)])

    @classmethod
    def from_dict(cls, saved: dict, run: RunIdentity) -> TrainState:
        """The saved progress of ``run``; ``ValueError`` (with the differing fields) if ``saved`` is another run's."""
        if "run" not in saved:
            raise ValueError("written by an older trainer: no run identity")
        if problems := run.differences(saved["run"]):
            raise ValueError("; ".join(problems))
        return cls(run, step=int(saved["step"]), tokens=int(saved["tokens"]), seconds=float(saved["seconds"]),
                   losses=list(saved["losses"]), lrs=list(saved["lrs"]),
                   positions=[DataPosition.from_dict(p) for p in saved["positions"]])

    def to_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens, "seconds": self.seconds, "losses": self.losses,
                "lrs": self.lrs, "positions": [p.to_dict() for p in self.positions], "run": self.run.to_dict()}

    def record(self, *, loss: float, lr: float, tokens: int, seconds: float) -> None:
        """One more optimizer step."""
        self.step += 1
        self.tokens += tokens
        self.seconds += seconds
        self.losses.append(loss)
        self.lrs.append(lr)
