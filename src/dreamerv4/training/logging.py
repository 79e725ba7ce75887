"""Run-folder logging for the training loop: metrics to JSONL and TensorBoard, images to PNG.

    log = MetricsLog(run_dir, tensorboard=True)
    log.write({"kind": "train", "step": 10, "loss": 0.5, "lr": 3e-4})   # one JSON line + TB scalars
    log.write_image("recon", 10, image_grid(frames))                    # images/recon_0000010.png + TB (media.py)
    log.close()

`metrics.jsonl` holds one JSON object per line, each with "kind" ("train", "eval" or "nonfinite")
and "step"; TensorBoard tags are "<kind>/<key>". The loop (loop.py) is the only writer.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from dreamerv4.media import save_png

METRICS_FILE = "metrics.jsonl"
IMAGE_DIR = "images"


def _json_value(value: Any) -> Any:
    """Floats that JSON cannot hold (nan, inf) become strings, so every line stays parseable."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class MetricsLog:
    """Appends metric records to `run_dir/metrics.jsonl` and (optionally) TensorBoard in `run_dir/tb`."""

    def __init__(self, run_dir: str | Path, *, tensorboard: bool = True, resume_step: int | None = None):
        """`resume_step`: drop records after this step, left by a run that died after its last checkpoint."""
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.path = self.run_dir / METRICS_FILE
        if resume_step is None:
            self.path.write_text("")  # a fresh run starts a fresh log
        else:
            self._drop_after(resume_step)
        self._file = open(self.path, "a")
        self._tb = None
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter  # slow import; only when asked for

            # purge_step hides events a killed run wrote past its last checkpoint.
            purge = None if resume_step is None else resume_step + 1
            self._tb = SummaryWriter(str(self.run_dir / "tb"), purge_step=purge)

    def _drop_after(self, step: int) -> None:
        if not self.path.exists():
            return
        kept = []
        for line in self.path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if int(record.get("step", 0)) <= step:
                kept.append(line)
        self.path.write_text("".join(k + "\n" for k in kept))

    def write(self, record: dict[str, Any]) -> None:
        """Append one record (needs "kind" and "step"); numeric values also go to TensorBoard."""
        self._file.write(json.dumps({k: _json_value(v) for k, v in record.items()}) + "\n")
        self._file.flush()
        if self._tb is not None:
            kind, step = record["kind"], int(record["step"])
            for key, value in record.items():
                if key not in ("kind", "step") and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._tb.add_scalar(f"{kind}/{key}", value, step)
            self._tb.flush()

    def write_image(self, name: str, step: int, image: np.ndarray) -> Path:
        """Save an (H, W, 3) uint8 image as images/<name>_<step>.png (and to TensorBoard under `name`);
        characters other than letters, digits, "_", "." and "-" become "_" in the file name."""
        safe_name = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)  # "input|recon" -> input_recon_0000500.png
        path = self.run_dir / IMAGE_DIR / f"{safe_name}_{step:07d}.png"
        save_png(path, image)
        if self._tb is not None:
            self._tb.add_image(name, image, step, dataformats="HWC")
            self._tb.flush()
        return path

    def close(self) -> None:
        self._file.close()
        if self._tb is not None:
            self._tb.close()


class NoLog:
    """What ranks other than 0 log to under torchrun: nothing (only rank 0 writes run_dir)."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def write_image(self, name: str, step: int, image: np.ndarray) -> None:
        pass

    def close(self) -> None:
        pass


def read_metrics(run_dir: str | Path, kind: str | None = None) -> list[dict[str, Any]]:
    """All records of `run_dir/metrics.jsonl` (only those of `kind` when given)."""
    lines = (Path(run_dir) / METRICS_FILE).read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [r for r in records if kind is None or r.get("kind") == kind]
