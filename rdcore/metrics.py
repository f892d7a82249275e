"""Where a training stage reports: ``metrics.jsonl`` (one row per optimizer step), TensorBoard
scalars, a progress bar and a log line — all on rank 0, all through :class:`MetricsLog`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger("rdcore.train")

TENSORBOARD_KEYS = ("loss", "kl", "hidden_mse", "ce", "lr", "step_time_s", "val_loss")
TERMS = ("kl", "hidden_mse", "ce")


class MetricsLog:
    """The reports of one stage. ``start``: the step a resumed run continues from — rows of this
    stage past it (written before a crash) are dropped, so the file holds each step once."""

    def __init__(self, out: Path, stage: str, rank: int, *, total: int, start: int,
                 tensorboard: bool):
        self.stage, self.total, self.rank = stage, total, rank
        self.path = out / "metrics.jsonl"
        self.writer = self.bar = None
        if rank != 0:
            return
        if self.path.exists():
            rows = [json.loads(x) for x in self.path.read_text().splitlines() if x.strip()]
            keep = [r for r in rows if r.get("stage") != stage or r["step"] <= start]
            self.path.write_text("".join(json.dumps(r) + "\n" for r in keep))
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(out / "tensorboard" / stage))
        from tqdm import tqdm

        self.bar = tqdm(total=total, initial=start, desc=stage, unit="step", dynamic_ncols=True)

    def write(self, row: dict[str, Any]) -> None:
        """Record one step's row (rank 0; a no-op elsewhere)."""
        if self.rank != 0:
            return
        with self.path.open("a") as fh:
            fh.write(json.dumps(row) + "\n")
        step = row["step"]
        if self.writer is not None:
            for key in TENSORBOARD_KEYS:
                if key in row:
                    self.writer.add_scalar(f"train/{key}", row[key], step)
        self.bar.set_postfix(loss=f"{row['loss']:.4g}", tok=row["tokens"])
        self.bar.update(1)
        self.bar.clear()
        terms = " ".join(f"{k} {row[k]:.4g}" for k in TERMS if k in row)
        log.info("[%s] step %d/%d | loss %.4f | %s | %d tok | %.2fs", self.stage, step, self.total,
                 row["loss"], terms, row["tokens"], row["step_time_s"])

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.writer is not None:
            self.writer.close()
