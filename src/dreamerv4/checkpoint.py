"""Atomic checkpoint writes and safe loads (weights_only), plus RNG state capture for exact resume.

A checkpoint is a dict of tensors and plain Python values:
    {"model": state_dict, "optimizer": ..., "scheduler": ..., "step": int,
     "rng": rng_state(), "config": to_dict(cfg), ...}
"""

from __future__ import annotations

import os
import pickle
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from dreamerv4.errors import CheckpointError


def save_checkpoint(path: str | Path, payload: dict[str, Any]) -> None:
    """Write `payload` to `path` atomically: a temp file in the same folder, fsync, then rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(payload, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with `weights_only=True`; a missing or damaged file raises CheckpointError."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint not found")
    try:
        payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        if "weights only load failed" in str(exc).lower():  # torch's advice (weights_only=False) is unsafe
            raise CheckpointError(f"{path}: not a dreamerv4 checkpoint (it holds Python objects, which are not "
                                  "loaded for safety)") from None
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    except Exception as exc:  # truncated zip, wrong format
        raise CheckpointError(f"{path}: cannot read checkpoint ({type(exc).__name__}: {exc})") from exc
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: not a dreamerv4 checkpoint (top level is {type(payload).__name__})")
    return payload


# The command that writes each training stage's checkpoint.
STAGES = {
    "tokenizer": "`dreamerv4 train tokenizer`",
    "dynamics": "`dreamerv4 train dynamics`",
    "agent": "`dreamerv4 train agent`",
    "imagine": "`dreamerv4 train imagine`",
}


def checkpoint_stage(ckpt: dict[str, Any]) -> str | None:
    """The training stage that wrote a loaded checkpoint ("tokenizer", "dynamics", "agent", "imagine"),
    read from its model's parameter names and its extra state (the imagination stage keeps the frozen
    BC policy head as extra state "prior"); None when it is none of them."""
    model, extra = ckpt.get("model"), ckpt.get("extra")
    if not isinstance(model, dict):
        return None
    extra = extra if isinstance(extra, dict) else {}
    if any(k == "agent_tokens" or k.startswith("agent.") for k in model):
        return "imagine" if "prior" in extra else "agent"
    if "patch_embed.weight" in model:
        return "tokenizer"
    if "latent_in.weight" in model:
        return "dynamics"
    return None


def require_stage(ckpt: dict[str, Any], path: str | Path, *wanted: str) -> str | None:
    """CheckpointError naming both stages when the checkpoint is one of another stage than `wanted`;
    else its stage (None when its weights are of no known stage: the loader's own checks decide)."""
    stage = checkpoint_stage(ckpt)
    if stage is None or stage in wanted:
        return stage

    def a(word: str) -> str:
        return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"

    need = " or ".join(f"{a(w)} checkpoint ({STAGES[w]})" for w in wanted)
    raise CheckpointError(f"{path}: {a(stage)} checkpoint (written by {STAGES[stage]}); this command needs {need}")


def rng_state() -> dict[str, Any]:
    """Python, NumPy and torch RNG states as weights_only-loadable values."""
    np_state = np.random.get_state()
    return {
        "python": random.getstate(),
        "numpy": {
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what `rng_state` captured."""
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    np_s = state["numpy"]
    np.random.set_state(
        ("MT19937", np_s["keys"].numpy().astype(np.uint32), np_s["pos"], np_s["has_gauss"], np_s["cached_gaussian"])
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
