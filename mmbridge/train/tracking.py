"""Experiment trackers: the scalars of `metrics.jsonl` also sent to TensorBoard and/or Weights & Biases.

A recipe opts in with `log: {tensorboard: true, wandb: {project: NAME, mode: offline}}` (off by default).
The trainer hands every row it writes to `metrics.jsonl` to `Trackers.log` (its numbers under `train/`, at
the run's global step: optimizer steps counted over all stages), and eval metrics to `log(..., "eval")`.
TensorBoard events go to `RUN/tensorboard/`; W&B runs to `RUN/wandb/` (unless `dir` is given), resumed
under the same id when the training run is resumed. Only the main process logs.
"""

from __future__ import annotations

import math
from pathlib import Path

from mmbridge.log_settings import PACKAGES, TrackingError, _missing, check  # noqa: F401  (also imported from here)


def scalars(row: dict) -> dict[str, float]:
    """The finite numbers of a metrics row (`step` and text fields left out)."""
    return {
        k: float(v)
        for k, v in row.items()
        if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class TensorBoard:
    """Scalars as TensorBoard events in `folder` (a new event file each time it is opened); `purge_step`: events
    of earlier files at this step or later are hidden (a resumed run redoes them)."""

    def __init__(self, folder: Path, purge_step: int | None = None):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            raise _missing("tensorboard") from e
        self.writer = SummaryWriter(log_dir=str(folder), purge_step=purge_step)

    def log(self, values: dict[str, float], step: int) -> None:
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        self.writer.close()


class WandB:
    """Scalars as a W&B run (offline or online, as `options` say), its id kept in `run_dir/wandb-id`."""

    def __init__(self, options: dict, run_dir: Path, name: str, config: dict):
        try:
            import wandb
        except ImportError as e:
            raise _missing("wandb") from e
        id_file = run_dir / "wandb-id"
        again = {"id": id_file.read_text().strip(), "resume": "allow"} if id_file.exists() else {}
        folder = Path(options.get("dir") or run_dir)
        folder.mkdir(parents=True, exist_ok=True)
        self.run = wandb.init(
            **{"name": name, **{k: v for k, v in options.items() if k != "dir"}},
            dir=str(folder),
            config=config,
            **again,
        )
        id_file.write_text(self.run.id + "\n")

    def log(self, values: dict[str, float], step: int) -> None:
        self.run.log(values, step=step)

    def close(self) -> None:
        self.run.finish()


class Trackers:
    """The trackers a recipe's `log` asks for, opened on first use; `log` sends one row to each."""

    def __init__(
        self, log: dict, run_dir: str | Path, name: str = "run", config: dict | None = None, enabled: bool = True
    ):
        check(log or {})
        self.options, self.run_dir, self.name, self.config = log or {}, Path(run_dir), name, config or {}
        self.enabled = enabled and any(self.options.values())
        self.open: list = []

    def _start(self, purge_step: int | None) -> None:
        if self.options.get("tensorboard"):
            self.open.append(TensorBoard(self.run_dir / "tensorboard", purge_step))
        wandb = self.options.get("wandb")
        if wandb:
            self.open.append(WandB(wandb if isinstance(wandb, dict) else {}, self.run_dir, self.name, self.config))

    def log(self, row: dict, step: int, prefix: str = "train") -> None:
        """The numbers of `row` under `prefix/`, at global step `step`."""
        values = {f"{prefix}/{k}": v for k, v in scalars(row).items()}
        if not self.enabled or not values:  # e.g. a skipped step's row: its reason and ids only
            return
        if not self.open:  # training rows start (or resume) the run: what earlier files hold from here on is redone
            self._start(step if prefix == "train" else None)
        for tracker in self.open:
            tracker.log(values, step)

    def close(self) -> None:
        for tracker in self.open:
            tracker.close()
        self.open = []
