"""`dreamerv4 data tokenize`: every episode encoded once by a finished tokenizer, into a latent folder.

    dreamerv4 data tokenize --checkpoint runs/x/tokenizer/checkpoint.pt --data data/crafter --out runs/x/latents

The world model, the agent and imagination train on these latents. The folder's layout, its
resume and what it refuses are data/latents.py's (`write_latent_folder`); this module loads the
tokenizer stage (training/stages.py) and records in the manifest which checkpoint made them.
"""

from __future__ import annotations

from pathlib import Path

import torch

from dreamerv4.checkpoint import load_checkpoint
from dreamerv4.data.latents import write_latent_folder
from dreamerv4.training.stages import load_tokenizer


def tokenize_dataset(checkpoint: str | Path, data: str | Path, out: str | Path, overwrite: bool = False,
                     batch_frames: int = 256, context: int | None = None, progress: bool = True) -> dict:
    """Encode every episode of `data` with the tokenizer of `checkpoint` into the latent folder `out`
    (data/latents.py). `context`: frames per encoding chunk (default the tokenizer's training
    seq_len). Episodes already in `out` from the same tokenizer and context are kept; anything else
    already there is an error unless `overwrite`. Returns the manifest."""
    checkpoint = Path(checkpoint)
    tokenizer, tok_cfg = load_tokenizer(checkpoint)
    tokenizer.requires_grad_(False)
    if torch.cuda.is_available():
        tokenizer.cuda()
    ckpt = load_checkpoint(checkpoint)
    source = {"checkpoint": str(checkpoint.resolve()), "step": int(ckpt.get("step", -1)),
              "done": bool(ckpt.get("done", False)), "model": ckpt["config"]["tokenizer"]["model"]}
    del ckpt
    return write_latent_folder(tokenizer, source, data, out, context=int(context or tok_cfg.tokenizer.train.seq_len),
                               overwrite=overwrite, batch_frames=batch_frames, progress=progress)


def cmd_tokenize(args) -> int:
    manifest = tokenize_dataset(args.checkpoint, args.data, args.out, overwrite=args.overwrite,
                                batch_frames=args.batch_frames, context=getattr(args, "context", None))
    counts = manifest.pop("_counts")
    frames = sum(manifest["episodes"].values())
    print(f"{args.out}: {len(manifest['episodes'])} episodes, {frames} frames of ({manifest['num_latents']}, "
          f"{manifest['latent_dim']}) latents ({counts['encoded']} encoded, {counts['skipped']} already there); "
          f"tokenizer {manifest['tokenizer']['checkpoint']} step {manifest['tokenizer']['step']}, "
          f"context {manifest['context']}")
    return 0
