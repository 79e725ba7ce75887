"""Data-parallel training through the shared loop (src/dreamerv4/training/{loop,distributed}.py):
two CPU processes launched by torchrun (gloo) against the single-process loop on the same global batch.

    pytest tests/training/test_distributed.py -q -x

One torchrun launch runs, in each of 2 worker processes (`worker_main`): a fresh 2-step run, its
resume to step 3, and a 3-step run where rank 1 alone gets a NaN loss at step 2 (all three share the
process group the first call created, as the stages of a pipeline do; it ends at exit). Each worker
records what it saw (batch indices, local losses, final parameters, its TrainSummary) and, through a
Python audit hook, every write it made under the runs folder.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Dataset

from dreamerv4.checkpoint import load_checkpoint
from dreamerv4.training.logging import read_metrics
from dreamerv4.training.config import TrainConfig
from dreamerv4.training.loop import train
from dreamerv4.training.loss_norm import RunningRMS
from dreamerv4.training.sampler import StepBatchSampler

THIS_FILE = Path(__file__).resolve()
SRC_DIR = THIS_FILE.parents[2] / "src"
GLOBAL_BATCH = 8
NAN_CALL = 2  # run "nan": rank 1's 2nd loss is NaN (single process: the 2nd loss)


class Regression(Dataset):
    """32 fixed samples of y = sin(x W); items carry their index so workers can report their shard."""

    def __init__(self, n: int = 32):
        rng = np.random.default_rng(7)
        self.x = rng.normal(size=(n, 8)).astype(np.float32)
        self.y = np.sin(self.x @ rng.normal(size=(8, 2)).astype(np.float32))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": torch.from_numpy(self.x[i]), "y": torch.from_numpy(self.y[i]), "i": torch.tensor(i)}


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.Tanh())
        self.head = nn.Linear(16, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))

    def features(self, x: torch.Tensor) -> torch.Tensor:  # a custom method, as phase models have
        return self.body(x)


def cfg(steps: int) -> TrainConfig:
    # warmup longer than the run: the lr of a step does not depend on `steps` (2-step run + resume to
    # 3 follows the same schedule as a straight 3-step run).
    return TrainConfig(steps=steps, batch_size=GLOBAL_BATCH, lr=1e-2, warmup_steps=10, log_every=1, ckpt_every=1,
                       precision="fp32", device="cpu", tensorboard=False, image_every=1, eval_every=2, seed=5)


def run(run_dir: Path, steps: int, *, resume: bool = False, nan_on_rank: int | None = None,
        seen: dict | None = None, skip_head: bool = False, find_unused_parameters: bool = False,
        noisy: bool = False):
    """The same call in the workers and the reference; `seen` collects batch indices and local MSEs."""
    torch.manual_seed(0)
    model, stat = Net(), RunningRMS()
    calls = {"n": 0}

    def loss_fn(model: Net, batch: dict):
        calls["n"] += 1
        # The head via a submodule call and a custom method: both must be gradient-synchronized.
        x = batch["x"]
        if noisy:  # draws from each rank's torch RNG stream
            noise = torch.randn_like(x)
            x = x + 0.01 * noise
            if seen is not None:
                seen.setdefault("noise", []).append(noise[0, 0].item())
        pred = model.features(x)[:, :2] if skip_head else model.head(model.features(x))
        mse = F.mse_loss(pred, batch["y"])
        stat(mse)  # running statistic in extra_state (the loop keeps it equal across ranks)
        if seen is not None:
            seen.setdefault("indices", []).append(batch["i"].tolist())
            seen.setdefault("mse", []).append(float(mse.detach()))
        rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        loss = mse
        if nan_on_rank == rank and calls["n"] == NAN_CALL:
            loss = mse * float("nan")
        return loss, {"mse": mse.detach()}

    def on_image(step, model, batch):
        return {"sample": np.full((4, 4, 3), step, dtype=np.uint8)}

    def eval_fn(model):
        data = Regression()
        return {"mse": float(F.mse_loss(model(torch.from_numpy(data.x)), torch.from_numpy(data.y)))}

    summary = train(model, Regression(), loss_fn, cfg(steps), run_dir, resume=resume, extra_state={"stat": stat},
                    on_image=on_image, eval_fn=eval_fn, find_unused_parameters=find_unused_parameters)
    return summary, model, stat


def _params(model: nn.Module) -> dict[str, list]:
    return {k: v.tolist() for k, v in model.state_dict().items()}


def worker_main(runs_root: str, out_dir: str) -> None:
    """Body of each torchrun worker."""
    runs = Path(runs_root)
    writes: list[list[str]] = []

    def audit(event: str, args: tuple) -> None:
        path = None
        if event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            mode, flags = args[1] or "", args[2] or 0
            if any(c in mode for c in "wax+") or flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
                path = args[0]
        elif event in ("os.rename", "os.mkdir", "os.remove", "os.rmdir", "os.truncate"):
            path = args[1] if event == "os.rename" else args[0]
        if path is not None and os.fsdecode(path).startswith(str(runs)):
            writes.append([event, os.fsdecode(path)])

    sys.addaudithook(audit)
    rank = int(os.environ["RANK"])
    report: dict = {"world_size": int(os.environ["WORLD_SIZE"])}
    for name, steps, resume, nan_on_rank in (("fresh", 2, False, None), ("resumed", 3, True, None),
                                             ("nan", 3, False, 1)):
        run_dir = runs / ("nan" if name == "nan" else "main")
        seen: dict = {}
        summary, model, stat = run(run_dir, steps, resume=resume, nan_on_rank=nan_on_rank, seen=seen)
        report[name] = {"step": summary.step, "done": summary.done, "metrics": summary.metrics, "seen": seen,
                        "params": _params(model), "stat": float(stat.mean_square)}
    # Exact resume with random draws in the loss: each rank continues its own RNG stream.
    noisy: dict = {}
    for name, steps, resume in (("straight", 3, False), ("part", 2, False), ("resumed", 3, True)):
        seen = {}
        summary, model, _ = run(runs / ("noisy_" + ("straight" if name == "straight" else "resumed")), steps,
                                resume=resume, noisy=True, seen=seen)
        noisy[name] = {"params": _params(model), "noise": seen["noise"]}
    report["noisy"] = noisy
    # A loss that leaves the head without gradient: fine with find_unused_parameters, else a clear error.
    torch.manual_seed(0)  # as run() does
    head_before = _params(Net())["head.weight"]
    summary, model, _ = run(runs / "unused", 2, skip_head=True, find_unused_parameters=True)
    report["unused"] = {"step": summary.step, "head_kept": _params(model)["head.weight"] == head_before}
    try:
        run(runs / "unused_error", 2, skip_head=True)
    except RuntimeError as exc:
        report["unused"]["error"] = str(exc)
    report["writes"] = writes
    (Path(out_dir) / f"rank{rank}.json").write_text(json.dumps(report))


@pytest.fixture(scope="module")
def launched(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    runs, out = root / "runs", root / "out"
    out.mkdir()
    script = root / "worker.py"
    script.write_text(
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('ddp_test', {str(THIS_FILE)!r})\n"
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module)\n"
        "module.worker_main(sys.argv[1], sys.argv[2])\n"
    )
    env = {**os.environ, "PYTHONPATH": f"{SRC_DIR}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "OMP_NUM_THREADS": "1"}
    # --standalone: a local rendezvous on a free port (no fixed port to collide with).
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(runs), str(out)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        log, _ = proc.communicate(timeout=180)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        log, _ = proc.communicate()
        pytest.fail(f"torchrun did not finish in 180 s:\n{log[-4000:]}")
    assert proc.returncode == 0, log[-4000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"runs": runs, "ranks": ranks, "log": log}


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process loop on the same global batches."""
    root = tmp_path_factory.mktemp("single")
    out = {}
    for name, steps, nan_on_rank in (("fresh", 2, None), ("straight3", 3, None), ("nan", 3, 0)):
        seen: dict = {}
        summary, model, stat = run(root / name, steps, nan_on_rank=nan_on_rank, seen=seen)
        out[name] = {"summary": summary, "model": model, "seen": seen, "run_dir": root / name}
    return out


def assert_params_close(params: dict[str, list], model: nn.Module) -> None:
    for name, value in model.state_dict().items():
        torch.testing.assert_close(torch.tensor(params[name]), value, rtol=1e-4, atol=1e-6, msg=name)


def test_each_rank_trains_on_its_half_of_the_global_batch(launched):
    rank0, rank1 = launched["ranks"]
    assert rank0["world_size"] == rank1["world_size"] == 2
    full = StepBatchSampler(len(Regression()), GLOBAL_BATCH, cfg(3).seed, 0, 3)
    for step, (a, b) in enumerate(zip(rank0["fresh"]["seen"]["indices"], rank1["fresh"]["seen"]["indices"])):
        assert len(a) == len(b) == GLOBAL_BATCH // 2
        assert a + b == full.indices(step)
    assert rank0["resumed"]["seen"]["indices"][0] + rank1["resumed"]["seen"]["indices"][0] == full.indices(2)


def test_two_process_steps_match_the_single_process_steps(launched, reference):
    rank0, rank1 = launched["ranks"]
    runs = launched["runs"]
    # One step: the checkpoint of step 1 is overwritten; compare the 2-step run and the metrics per step.
    assert rank0["fresh"]["params"] == rank1["fresh"]["params"]  # DDP keeps the replicas identical
    assert_params_close(rank0["fresh"]["params"], reference["fresh"]["model"])
    # Resumed by both ranks from rank 0's checkpoint, then one more step: a straight 3-step run.
    assert rank0["resumed"]["step"] == rank1["resumed"]["step"] == 3 and rank1["resumed"]["done"]
    assert rank0["resumed"]["params"] == rank1["resumed"]["params"]
    assert_params_close(rank0["resumed"]["params"], reference["straight3"]["model"])
    ckpt = load_checkpoint(runs / "main" / "checkpoint.pt")
    for name, value in reference["straight3"]["model"].state_dict().items():
        torch.testing.assert_close(ckpt["model"][name], value, rtol=1e-4, atol=1e-6)
    assert len(ckpt["rng_ranks"]) == 2

    # Logged loss and mse are means over the ranks, i.e. the single process's full-batch values.
    ours, ref = read_metrics(runs / "main", "train"), read_metrics(reference["straight3"]["run_dir"], "train")
    assert [r["step"] for r in ours] == [1, 2, 3]
    for a, b in zip(ours, ref):
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["mse"] == pytest.approx(b["mse"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    # Evaluation ran on rank 0; every rank's summary carries its result.
    assert rank1["resumed"]["metrics"]["eval/mse"] == rank0["resumed"]["metrics"]["eval/mse"]
    assert rank0["resumed"]["metrics"]["eval/mse"] == pytest.approx(
        reference["straight3"]["summary"].metrics["eval/mse"], rel=1e-4)


def test_running_statistics_are_averaged_across_ranks(launched):
    rank0, rank1 = launched["ranks"]
    local = [rank0["fresh"]["seen"]["mse"] + rank0["resumed"]["seen"]["mse"],
             rank1["fresh"]["seen"]["mse"] + rank1["resumed"]["seen"]["mse"]]
    expected, decay = 0.0, RunningRMS().decay
    for m0, m1 in zip(*local):  # EMA of the rank-mean of the squared local losses
        expected = decay * expected + (1 - decay) * (m0**2 + m1**2) / 2
    assert rank0["resumed"]["stat"] == rank1["resumed"]["stat"] == pytest.approx(expected, rel=1e-5)
    ckpt = load_checkpoint(launched["runs"] / "main" / "checkpoint.pt")
    assert float(ckpt["extra"]["stat"]["mean_square"]) == pytest.approx(expected, rel=1e-5)


def test_nonfinite_loss_on_one_rank_skips_the_update_on_all(launched, reference):
    rank0, rank1 = launched["ranks"]
    assert rank0["nan"]["params"] == rank1["nan"]["params"]
    assert_params_close(rank0["nan"]["params"], reference["nan"]["model"])  # single process skipped step 2
    runs = launched["runs"]
    assert [r["step"] for r in read_metrics(runs / "nan", "nonfinite")] == [NAN_CALL]
    assert [r["step"] for r in read_metrics(runs / "nan", "train")] == [1, 3]
    assert rank0["nan"]["metrics"]["nonfinite_steps"] == rank1["nan"]["metrics"]["nonfinite_steps"] == 1


def test_resume_continues_every_ranks_random_stream_exactly(launched):
    rank0, rank1 = launched["ranks"]
    for rank in (rank0, rank1):
        noisy = rank["noisy"]
        assert noisy["resumed"]["params"] == noisy["straight"]["params"]  # bitwise
        assert noisy["part"]["noise"] + noisy["resumed"]["noise"] == noisy["straight"]["noise"]
    assert rank0["noisy"]["straight"]["noise"] != rank1["noisy"]["straight"]["noise"]  # ranks draw differently


def test_parameters_without_gradient_need_find_unused_parameters(launched):
    for rank in launched["ranks"]:
        assert rank["unused"]["step"] == 2 and rank["unused"]["head_kept"]
        assert "pass train(..., find_unused_parameters=True)" in rank["unused"]["error"]


def test_only_rank_0_writes_the_run_folder(launched):
    rank0, rank1 = launched["ranks"]
    assert rank1["writes"] == []
    written = {Path(path).name for _, path in rank0["writes"]}
    assert {"metrics.jsonl", "images", "checkpoint.pt", "config.yaml"} <= written
    assert (launched["runs"] / "main" / "images" / "sample_0000003.png").is_file()
