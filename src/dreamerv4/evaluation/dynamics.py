"""Evaluate a trained dynamics model: imagined frames against the real future, beside baselines.

    dreamerv4 eval dynamics --checkpoint runs/x/dynamics/checkpoint.pt --data data/crafter-heldout \
        [--context 8] [--windows 64] [--out report.json]

For up to `windows` held-out windows of `context` + 15 steps (starting every context + 15 steps,
plus one ending at each episode's end; evenly spread over the episodes), the model sees `context` real frames (encoded by its frozen tokenizer exactly as
`data tokenize` encodes them: data/latents.py) and imagines the next 15 with the recorded actions
(K = model.sampling_steps shortcut steps per frame, fixed noise seed), attending over at most the
training seq_len frames at once (`imagine`: beyond it, a sliding window). At horizons
1, 4, 8 and 15 (frame h after the context) the decoded frames are scored against the real frames:
PSNR (per-frame, capped at 50 dB since identical frames have infinite PSNR; `psnr_mean_mse` is
10 log10(1 / mean MSE) over the frames, with no cap), SSIM, and Crafter object retention (the cell
classifier of the tokenizer evaluation: its accuracy, against the TRUE labels, on cells that are
not grass/sand/path; `cell_accuracy` on all cells). The same for:
  copy_last_frame           the last real context frame, repeated (pixels, no tokenizer)
  copy_last_latent          the last context latent repeated, decoded (the copy baseline in the
                            tokenizer's space: same decoder handicap as the model)
  shuffled_actions          the model with the same noise, fed the actions of another window
                            (windows paired with the one half the list away): does it use actions?
  tokenizer_reconstruction  the real future latents decoded: the ceiling the tokenizer allows
`real` gives the classifier's retention on the real frames (its own ceiling). `psnr_curve` has the
PSNR of every horizon 1..15 per method. `comparisons` pairs the model with each baseline on the same
windows: the mean per-frame PSNR difference and the object-retention difference (model minus
baseline) with 95% bootstrap intervals over the windows, so "beats" can be read with its noise.
`beatable_frames` repeats `results` and `comparisons` on the windows where copy_last_frame scores
below tokenizer_reconstruction, and gives the share of the others: there the frame barely changes
(Crafter's daylight shifts pixels by a grey level or so) and the copy beats even the real future
latents decoded, so no prediction through this tokenizer can match it. The split shows how much of
a per-frame PSNR gap to the copy comes from such frames and how the model does where it can win.
A GIF/MP4 beside the JSON shows a few windows: real | imagined | imagined with shuffled actions
(green border: context, red: imagined).
The cell classifier is fitted on the training frames (`--fit-data`, default the run's data.path)
and cached next to the tokenizer checkpoint, shared with `eval tokenizer`.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch

from dreamerv4.data.crafter_layout import BACKGROUND_LABELS
from dreamerv4.data.dataset import SequenceDataset
from dreamerv4.data.episodes import load_frames, load_observations
from dreamerv4.data.latents import decode_latents, encode_episode, frames_to_float, tokenizer_fingerprint
from dreamerv4.errors import CheckpointError, UserError
from dreamerv4.evaluation.cells import retention
from dreamerv4.evaluation.metrics import psnr, ssim
from dreamerv4.evaluation.tokenizer import _json_safe, cell_classifier
from dreamerv4.media import context_borders, write_side_by_side
from dreamerv4.models.dynamics import NO_ACTION, DynamicsModel, Rollout, previous_actions
from dreamerv4.training.stages import load_dynamics, load_tokenizer, tokenizer_identity

HORIZONS = (1, 4, 8, 15)
PSNR_CAP = 50.0
METHODS = ("model", "copy_last_frame", "copy_last_latent", "shuffled_actions", "tokenizer_reconstruction", "real")
BASELINES = ("copy_last_frame", "copy_last_latent", "shuffled_actions")  # what the model is compared with
BOOTSTRAP_RESAMPLES = 2000


def frame_scores(real: torch.Tensor, pred: torch.Tensor, labels: np.ndarray | None, classifier) -> dict:
    """Scores of predicted frames (N,3,64,64) against real ones (module docstring)."""
    p = psnr(real, pred).clamp(max=PSNR_CAP)
    mse = float((real.double() - pred.double()).pow(2).mean())
    result = {"psnr": float(p.mean()), "psnr_mean_mse": float(10 * math.log10(1 / max(mse, 1e-10))),
              "ssim": float(ssim(real, pred).mean())}
    if classifier is not None and labels is not None:
        r = retention(classifier, pred, labels)
        result.update(object_retention=r["object_retention"], cell_accuracy=r["cell_accuracy"],
                      object_cells=r["object_cells"])
    return result


def paired_difference(real: torch.Tensor, pred: torch.Tensor, base: torch.Tensor, labels: np.ndarray | None,
                      classifier, resamples: int = BOOTSTRAP_RESAMPLES, seed: int = 0) -> dict:
    """Model minus baseline on the same frames (N,3,64,64), one frame per window: mean per-frame PSNR
    difference (both capped as in `frame_scores`) and, with labels and a classifier, the object-retention
    difference in points of accuracy; each with a 95% percentile-bootstrap interval over the N windows
    (the windows are resampled together, so the pairing is kept)."""
    diff = (psnr(real, pred).clamp(max=PSNR_CAP) - psnr(real, base).clamp(max=PSNR_CAP)).double().numpy()
    rng = np.random.default_rng(seed)
    picks = rng.integers(len(diff), size=(resamples, len(diff)))
    boot = diff[picks].mean(axis=1)
    result = {"psnr_diff": float(diff.mean()), "psnr_diff_ci95": [float(np.quantile(boot, 0.025)),
                                                                 float(np.quantile(boot, 0.975))]}
    if classifier is not None and labels is not None:
        is_object = ~np.isin(labels, BACKGROUND_LABELS)

        def kept(frames: torch.Tensor) -> np.ndarray:  # object cells classified right, per frame
            return ((classifier.predict(frames) == labels) & is_object).sum(axis=(1, 2))

        gained = (kept(pred) - kept(base)).astype(np.float64)
        cells = is_object.sum(axis=(1, 2)).astype(np.float64)
        if cells.sum() > 0:
            boot = gained[picks].sum(axis=1) / np.maximum(cells[picks].sum(axis=1), 1)
            result["retention_diff"] = float(gained.sum() / cells.sum())
            result["retention_diff_ci95"] = [float(np.quantile(boot, 0.025)), float(np.quantile(boot, 0.975))]
    return result


def beatable_split(target: torch.Tensor, predicted: dict[str, torch.Tensor], labels: np.ndarray | None,
                   classifier, seed: int = 0) -> dict:
    """`frame_scores` and `paired_difference` on the windows where copy_last_frame scores below
    tokenizer_reconstruction (module docstring), and the share of the others. target (N,3,64,64) and
    predicted[method] (N,3,64,64), one frame per window, labels (N,7,9) or None."""
    ceiling = psnr(target, predicted["tokenizer_reconstruction"]).clamp(max=PSNR_CAP)
    keep = psnr(target, predicted["copy_last_frame"]).clamp(max=PSNR_CAP) < ceiling
    split: dict = {"copy_above_ceiling_fraction": float(1 - keep.double().mean()), "frames": int(keep.sum())}
    if keep.any():
        lab = labels[keep.numpy()] if labels is not None else None
        split["results"] = {method: frame_scores(target[keep], frames[keep], lab, classifier)
                            for method, frames in predicted.items()}
        split["comparisons"] = {base: paired_difference(target[keep], predicted["model"][keep], predicted[base][keep],
                                                        lab, classifier, seed=seed) for base in BASELINES}
    return split


@torch.no_grad()
def imagine(model: DynamicsModel, context_latents: torch.Tensor, actions: torch.Tensor, horizon: int, window: int,
            steps: int | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Imagine `horizon` frames (B,H,L,C) after real context latents (B,C,L,C) given dataset-aligned
    actions (B, C + H), seeing at most `window` frames at once (the model's training seq_len).

    When C + H <= window this is `model.generate` (cached). Otherwise each new frame is generated
    from a fresh context of the window - 1 frames before it (real or imagined), whose first frame has
    no previous action, as in a training window: the time attention never reaches further than in
    training."""
    c = context_latents.shape[1]
    if c + horizon <= window:
        return model.generate(context_latents, actions[:, :c], actions[:, c:c + horizon], steps=steps,
                              generator=generator)
    prev = previous_actions(actions[:, :c + horizon])
    seq, frames = context_latents.float(), []
    for i in range(horizon):
        p = c + i  # index of the new frame
        lo = max(0, p - (window - 1))
        window_prev = prev[:, lo:p].clone()
        window_prev[:, 0] = NO_ACTION
        rollout = Rollout(model, use_cache=True, generator=generator)
        rollout.observe(seq[:, lo:p], window_prev)
        frame = rollout.imagine(prev[:, p], steps)
        frames.append(frame)
        seq = torch.cat((seq, frame[:, None]), dim=1)
    return torch.stack(frames, dim=1)


def pick_windows(data: SequenceDataset, count: int) -> list[int]:
    """`count` window indices spread evenly over the dataset (deterministic)."""
    return sorted({int(i) for i in np.linspace(0, len(data) - 1, min(count, len(data))).round()})


@torch.no_grad()
def evaluate_dynamics(checkpoint: str | Path, data: str | Path, out: str | Path | None = None, context: int = 8,
                      horizons: tuple[int, ...] = HORIZONS, windows: int = 64, tokenizer: str | Path | None = None,
                      fit_data: str | Path | None = None, fit_max_frames: int = 20000, fit_steps: int = 1000,
                      seed: int = 0, steps: int | None = None, batch: int = 32, video_windows: int = 4) -> dict:
    """Score imagined frames of the checkpoint's model on held-out episodes `data` (module docstring).
    Returns the report, also written as JSON to `out` (default eval.json next to the checkpoint) with
    a video beside it (same stem, .gif/.mp4)."""
    started = time.perf_counter()
    checkpoint = Path(checkpoint)
    if context < 1 or not horizons or min(horizons) < 1:
        raise UserError(f"--context ({context}) and every horizon ({horizons}) must be >= 1")
    model, cfg = load_dynamics(checkpoint)
    identity = tokenizer_identity(checkpoint)
    tok_path = Path(tokenizer or cfg.dynamics.tokenizer_checkpoint or Path(cfg.out_dir) / "tokenizer" / "checkpoint.pt")
    tok, _ = load_tokenizer(tok_path)
    if tokenizer_fingerprint(tok) != identity["fingerprint"]:
        raise CheckpointError(f"{tok_path}: is not the tokenizer this dynamics model was trained with "
                              f"(that one: {identity['checkpoint']}); pass --tokenizer")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device)
    tok.to(device)
    chunk = int(identity["context"])
    window = cfg.dynamics.train.seq_len  # frames the model attends over at once, as in training
    horizon = max(horizons)
    length = context + horizon
    with_cells = cfg.data.action_space == "crafter"
    held = SequenceDataset(data, seq_len=length, stride=length, split="all", action_space=cfg.data.action_space,
                           with_semantic=with_cells)
    picks = pick_windows(held, windows)

    # Real frames, labels, actions and latents of every window. Each window's latents come from
    # encoding its episode from the S-aligned chunk start before it, as `data tokenize` does.
    frames, labels, actions, latents, names = [], [], [], [], []
    for index in picks:
        name, start = held.window(index)
        info = held.episodes[held.episode_names.index(name)]
        episode_frames = load_frames(info.path)
        first = start - start % chunk
        encoded = encode_episode(tok, episode_frames[first: start + length], chunk)[start - first:]
        frames.append(frames_to_float(episode_frames[start: start + length]))
        latents.append(torch.from_numpy(encoded))
        actions.append(torch.from_numpy(info.codes[start: start + length].copy()))
        if with_cells:
            labels.append(load_observations(info.path, ("semantic",))["semantic"][start: start + length])
        names.append(f"{name}@{start}")
    real, lat, act = torch.stack(frames), torch.stack(latents), torch.stack(actions)
    n = len(picks)
    shuffled = act.clone()
    perm = (torch.arange(n) + n // 2) % n  # another window's actions (a different episode for most)
    shuffled[:, context - 1:] = act[perm, context - 1:]  # the actions that lead to the imagined frames

    def imagine_all(acts: torch.Tensor) -> torch.Tensor:
        out = []
        for i in range(0, n, batch):
            generator = torch.Generator(device).manual_seed(seed * 1_000_003 + i)
            a = acts[i: i + batch].to(device)
            out.append(imagine(model, lat[i: i + batch, :context].to(device), a, horizon, window, steps,
                               generator).cpu())
        return torch.cat(out)

    def decoded_future(future: torch.Tensor) -> torch.Tensor:
        seq = torch.cat((lat[:, :context], future.to(lat.dtype)), dim=1)
        return torch.cat([decode_latents(tok, seq[i: i + batch], chunk) for i in range(0, n, batch)])[:, context:]

    future = {
        "model": decoded_future(imagine_all(act)),
        "copy_last_frame": real[:, context - 1: context].expand(-1, horizon, -1, -1, -1),
        "copy_last_latent": decoded_future(lat[:, context - 1: context].expand(-1, horizon, -1, -1)),
        "shuffled_actions": decoded_future(imagine_all(shuffled)),
        "tokenizer_reconstruction": decoded_future(lat[:, context:]),
        "real": real[:, context:],
    }
    classifier = None
    if with_cells:
        fit_root = Path(fit_data or cfg.data.path)
        with torch.enable_grad():  # fitting the classifier (once; cached) needs gradients
            classifier = cell_classifier(tok_path.parent, fit_root, cfg, fit_max_frames, fit_steps)
    label_arr = np.stack(labels) if with_cells else None
    results: dict = {method: {} for method in METHODS}
    for h in horizons:
        target = real[:, context + h - 1]
        target_labels = label_arr[:, context + h - 1] if with_cells else None
        for method in METHODS:
            results[method][str(h)] = frame_scores(target, future[method][:, h - 1], target_labels, classifier)
    comparisons = {base: {str(h): paired_difference(
        real[:, context + h - 1], future["model"][:, h - 1], future[base][:, h - 1],
        label_arr[:, context + h - 1] if with_cells else None, classifier, seed=seed) for h in horizons}
        for base in BASELINES}
    beatable = {str(h): beatable_split(real[:, context + h - 1], {m: future[m][:, h - 1] for m in METHODS},
                                       label_arr[:, context + h - 1] if with_cells else None, classifier, seed)
                for h in horizons}
    curve = {method: [float(psnr(real[:, context + h], future[method][:, h]).clamp(max=PSNR_CAP).mean())
                      for h in range(horizon)] for method in METHODS if method != "real"}

    out = Path(out) if out else checkpoint.parent / "eval.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    shown = sorted({int(i) for i in np.linspace(0, n - 1, min(video_windows, n)).round()})
    video = {}
    if shown:
        context_frames = real[shown, :context]
        panels = [real[shown]] + [torch.cat((context_frames, future[m][shown]), dim=1)
                                  for m in ("model", "shuffled_actions")]
        borders = [None] + [context_borders(context, length)] * 2
        paths = write_side_by_side(out.with_suffix(""), panels, fps=4, scale=2, borders=borders)
        video = {k: str(v) if v else None for k, v in paths.items()}
        video["panels"] = ["real", "model", "shuffled_actions"]
        video["windows"] = [names[i] for i in shown]

    report = {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "tokenizer": str(tok_path),
        "step": identity["step"],
        "context": context,
        "window": window,
        "horizons": list(horizons),
        "windows": n,
        "episodes": len({name.split("@")[0] for name in names}),
        "sampling_steps": steps or model.cfg.sampling_steps,
        "seed": seed,
        "psnr_cap": PSNR_CAP,
        "results": results,
        "comparisons": comparisons,
        "beatable_frames": beatable,
        "psnr_curve": curve,
        "video": video,
        "seconds": round(time.perf_counter() - started, 1),
    }
    out.write_text(json.dumps(_json_safe(report), indent=2, allow_nan=False))
    return report


def _difference_text(d: dict) -> str:
    """A `paired_difference` as "PSNR dB [95% interval]" and, when present, "retention points [interval]"."""
    lo, hi = d["psnr_diff_ci95"]
    text = f"{d['psnr_diff']:+.2f} [{lo:+.2f}, {hi:+.2f}]"
    if d.get("retention_diff") is not None:
        lo, hi = d["retention_diff_ci95"]
        text += f" {100 * d['retention_diff']:+.1f} [{100 * lo:+.1f}, {100 * hi:+.1f}]"
    return text


def format_report(report: dict) -> str:
    lines = [f"{report['windows']} windows ({report['episodes']} episodes of {report['data']}), context "
             f"{report['context']}, K = {report['sampling_steps']}"]
    for method, by_h in report["results"].items():
        cells = []
        for h, m in by_h.items():
            ret = m.get("object_retention")
            cells.append(f"h{h} {m['psnr']:.2f} dB" + (f" {100 * ret:.1f}%" if ret is not None and ret == ret else ""))
        lines.append(f"  {method:<25} " + " | ".join(cells))
    lines.append("model minus baseline, mean [95% bootstrap interval over windows]: PSNR dB, retention points")
    for base, by_h in report.get("comparisons", {}).items():
        lines.append(f"  - {base:<23} " + " | ".join(f"h{h} {_difference_text(d)}" for h, d in by_h.items()))
    cells = []
    for h, c in report.get("beatable_frames", {}).items():
        d = c.get("comparisons", {}).get("copy_last_frame")
        cells.append(f"h{h} {100 * c['copy_above_ceiling_fraction']:.0f}% above"
                     + (f", on the rest {_difference_text(d)}" if d is not None else ""))
    if cells:
        lines.append("model minus copy_last_frame where the copy scores below the tokenizer's reconstruction "
                     "(share of windows where it scores above): " + " | ".join(cells))
    return "\n".join(lines)


def cmd_eval(args) -> int:
    report = evaluate_dynamics(args.checkpoint, args.data, out=args.out, context=args.context, windows=args.windows,
                               tokenizer=args.tokenizer, fit_data=args.fit_data, seed=args.seed, steps=args.steps)
    print(format_report(report))
    print(f"report: {args.out or Path(args.checkpoint).parent / 'eval.json'}; video: {report['video'].get('gif')}")
    return 0
