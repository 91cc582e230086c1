"""Per-step training metrics: always ``<out_dir>/logs/metrics.jsonl``; TensorBoard event files too if installed.

``metrics.jsonl`` holds one JSON object per line (``{"step": …, "train/loss": …, "train/lr": …, …}``, and
``heldout/loss`` at the end). On resume the lines after the resumed step are dropped first (those steps are
trained again), so each step appears once.
TensorBoard (``torch.utils.tensorboard``) needs the ``tensorboard`` package; without it only the JSONL is written
and ``MetricsLog.tensorboard`` is False.
"""

from __future__ import annotations

import json
from pathlib import Path

LOGS = "logs"
METRICS_JSONL = "metrics.jsonl"


def _tensorboard_writer(folder: Path):
    try:
        import tensorboard  # noqa: F401
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return None
    return SummaryWriter(log_dir=str(folder))


def _keep(row: dict, resume_step: int) -> bool:
    """Lines of steps the checkpoint holds; evaluations at the resumed step itself run again."""
    step = row.get("step", 0)
    return step < resume_step or (step == resume_step and any(k.startswith("train/") for k in row))


class MetricsLog:
    def __init__(self, out_dir: Path, *, resume_step: int = 0, enabled: bool = True):
        self.enabled = enabled
        self.folder = Path(out_dir) / LOGS
        self.path = self.folder / METRICS_JSONL
        self._tb = None
        if not enabled:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # keep the steps the resumed checkpoint already holds
            lines = [line for line in self.path.read_text().splitlines() if line.strip()]
            kept = [line for line in lines if _keep(json.loads(line), resume_step)]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._tb = _tensorboard_writer(self.folder / "tensorboard")

    @property
    def tensorboard(self) -> bool:
        return self._tb is not None

    def write(self, step: int, values: dict, prefix: str = "train") -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as f:
            f.write(json.dumps({"step": step, **{f"{prefix}/{k}": v for k, v in values.items()}}) + "\n")
        if self._tb is not None:
            for k, v in values.items():
                if isinstance(v, (int, float)):
                    self._tb.add_scalar(f"{prefix}/{k}", v, step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
            self._tb = None


def read_metrics(out_dir: Path) -> list[dict]:
    """The rows of ``<out_dir>/logs/metrics.jsonl``, in order."""
    path = Path(out_dir) / LOGS / METRICS_JSONL
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def loss_ends(losses: list[float], fraction: float = 0.2) -> tuple[float, float]:
    """Mean loss over the first and the last ``fraction`` of the steps (at least one step each).

    Per-step MLM losses are noisy (at 5 % masking a tiny batch predicts a few hundred tokens), so "the final loss
    is below the initial loss" is judged on these window means rather than on two single steps.
    """
    if not losses:
        raise ValueError("no losses recorded")
    k = max(1, int(len(losses) * fraction))
    return sum(losses[:k]) / k, sum(losses[-k:]) / k
