"""Tests of `dreamerv4 run` (src/dreamerv4/pipeline.py) end to end with a tiny config.

    pytest tests/test_pipeline.py -q -x

Every stage (record -> ... -> eval_imagination) into one run folder with report.html; a second run
skips the finished stages and rewrites nothing; a data.path the user filled is read, never written;
a tokenizer stopped by its time limit lets the pipeline go on; an interrupted recording is redone.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from dreamerv4.checkpoint import load_checkpoint
from dreamerv4.cli import main
from dreamerv4.config import load_config
from dreamerv4.data.episodes import validate_root
from dreamerv4.evaluation.cells import CellClassifier
from dreamerv4.pipeline import INCOMPLETE_MARKER, stage_record
from dreamerv4.run_config import RunConfig

NET = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_kv_heads": 2, "time_every": 2, "num_registers": 1}
STAGES = ["record", "validate", "tokenizer", "eval_tokenizer"]
ALL_STAGES = STAGES + ["tokenize", "dynamics", "eval_dynamics", "agent", "eval_agent", "crafter_random",
                       "crafter_bc", "imagine", "crafter_imagine", "eval_imagination"]
TRAIN = {"warmup_steps": 1, "log_every": 1, "precision": "fp32", "device": "cpu", "tensorboard": False, "threads": 1}


def write_config(path: Path, out_dir: Path, data_path: Path, *, record: dict, **train) -> Path:
    config = {
        "out_dir": str(out_dir),
        "record": {"seed": 3, "heldout_seed": 4, "policy": "random", "max_steps": 30, **record},
        "data": {"path": str(data_path)},
        "tokenizer": {"model": {"encoder": NET, "decoder": NET},
                      "train": {"steps": 4, "batch_size": 2, "seq_len": 2, "warmup_steps": 1, "log_every": 1,
                                "image_every": 2, "precision": "fp32", "device": "cpu", "tensorboard": False,
                                "threads": 1, **train},
                      "lpips_weight": 0.2},
        "dynamics": {"model": {"transformer": NET},
                     "train": {"steps": 3, "batch_size": 2, "seq_len": 4, "image_every": 0, "eval_every": 0, **TRAIN}},
        "agent": {"model": {"mtp_length": 2, "head_hidden": 16, "head_layers": 1},
                  "train": {"steps": 3, "batch_size": 2, "seq_len": 4, "eval_every": 0, **TRAIN}},
        "imagine": {"horizon": 2, "max_context": 4, "eval_episodes": 0,
                    "train": {"steps": 2, "batch_size": 2, "seq_len": 2, "eval_every": 0, **TRAIN}},
        "eval": {"crafter_episodes": 2, "crafter_max_steps": 12, "imagination_starts": 2},
    }
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


@pytest.fixture(autouse=True)
def quick_cell_classifier(monkeypatch):
    """The eval stage fits the cell classifier for 1000 steps by default; 20 do for plumbing tests."""
    original_fit = CellClassifier.fit.__func__
    monkeypatch.setattr(CellClassifier, "fit", classmethod(
        lambda cls, *args, **kwargs: original_fit(cls, *args, **{**kwargs, "steps": 20})))


def snapshot(*roots: Path) -> dict[str, tuple[int, str]]:
    """{path: (mtime_ns, sha256)} of every file below the roots."""
    return {str(p): (p.stat().st_mtime_ns, hashlib.sha256(p.read_bytes()).hexdigest())
            for root in roots for p in sorted(root.rglob("*")) if p.is_file()}


def test_run_records_trains_evaluates_then_skips_finished_stages(tmp_path, capsys):
    data, out = tmp_path / "data" / "crafter", tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml", out, data, record={"episodes": 2, "heldout_episodes": 1})
    assert main(["run", "--config", str(config)]) == 0
    first_output = capsys.readouterr().out

    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["stages"]) == ALL_STAGES
    stages = summary["stages"]
    heldout = tmp_path / "data" / "crafter-heldout"
    assert stages["record"] == {"seconds": stages["record"]["seconds"],
                                str(data): {"recorded": True, "episodes": 2, "frames": 60},
                                str(heldout): {"recorded": True, "episodes": 1, "frames": 30}}
    assert stages["validate"][str(data)] == {"episodes": 2, "frames": 60}
    assert stages["validate"][str(heldout)] == {"episodes": 1, "frames": 30}
    assert stages["tokenizer"]["step"] == 4 and stages["tokenizer"]["done"]
    assert stages["tokenizer"]["stop_reason"] == "done"
    evaluation = stages["eval_tokenizer"]
    assert evaluation["data"] == str(heldout) and evaluation["split"] == "all"
    assert 0 < evaluation["psnr"] < 60 and 0 <= evaluation["object_retention"] <= 1
    run_dir = out / "tokenizer"
    assert load_checkpoint(run_dir / "checkpoint.pt")["done"]
    assert json.loads((run_dir / "eval.json").read_text())["psnr"] == evaluation["psnr"]
    assert (run_dir / "eval.png").is_file() and len(list((run_dir / "images").glob("*.png"))) == 2
    assert load_config(RunConfig, out / "config.yaml") == load_config(RunConfig, config)
    assert "[4/14] eval_tokenizer" in first_output and "[13/14] crafter_imagine" in first_output
    for stage in ("dynamics", "agent", "imagine"):
        assert stages[stage]["done"] and load_checkpoint(out / stage / "checkpoint.pt")["done"]
    for method in ("model", "copy_last_frame", "shuffled_actions"):
        assert set(stages["eval_dynamics"][method]) == {"1", "4", "8", "15"}
        assert all(0 < scores["psnr"] <= 50 for scores in stages["eval_dynamics"][method].values())
    assert stages["eval_agent"]["action_log_likelihood"] < 0
    for policy in ("random", "bc", "imagine"):
        result = json.loads((out / "eval" / f"crafter_{policy}.json").read_text())
        assert result["episodes"] == 2 and stages[f"crafter_{policy}"]["mean_return"] == result["mean_return"]
    for policy in ("bc", "imagine"):
        instrument = json.loads((out / "eval" / f"imagination_{policy}.json").read_text())
        assert instrument["starts"] == 2 and instrument["horizon"] == 2
        assert stages["eval_imagination"][policy]["real_return"] == instrument["real_return"]
    report = (out / "report.html").read_text()
    assert "not run" not in report.split('id="crafter-eval"')[1].split("</section>")[0]
    assert "not run" not in report.split('id="imagination-instrument"')[1].split("</section>")[0]
    assert json.loads((out / "summary.json").read_text())["report"]

    before = snapshot(data, heldout, *(out / stage for stage in ("tokenizer", "dynamics", "agent", "imagine", "eval")))
    assert main(["run", "--config", str(config)]) == 0
    output = capsys.readouterr().out
    assert "[3/14] tokenizer: done, skipped" in output and "[13/14] crafter_imagine: done, skipped" in output
    assert output.count("episodes present, using them as they are") == 2
    # nothing re-recorded, retrained or re-evaluated
    assert snapshot(data, heldout, *(out / stage for stage in ("tokenizer", "dynamics", "agent", "imagine", "eval"))) == before
    again = json.loads((out / "summary.json").read_text())["stages"]
    assert again["tokenizer"] == stages["tokenizer"] and again["eval_tokenizer"] == stages["eval_tokenizer"]
    assert again["record"][str(data)] == {"recorded": False, "episodes": 2}


def test_user_data_is_never_written_and_a_time_limited_tokenizer_counts_as_finished(
        tiny_crafter_copy, tmp_path, capsys):
    user_data = tiny_crafter_copy
    before = snapshot(user_data)
    out = tmp_path / "run"
    # record.episodes > 0 on purpose: the folder already holds episodes, so nothing may be recorded.
    # 1000 steps cannot finish in 0.1 s: the time limit ends training.
    config = write_config(tmp_path / "tiny.yaml", out, user_data, record={"episodes": 2, "heldout_episodes": 0},
                          steps=1000, time_limit_min=0.1 / 60)
    assert main(["run", "--config", str(config), "--until", "eval_tokenizer"]) == 0
    assert "episodes present, using them as they are" in capsys.readouterr().out

    assert snapshot(user_data) == before
    assert not Path(f"{user_data}-heldout").exists()
    stages = json.loads((out / "summary.json").read_text())["stages"]
    assert list(stages) == STAGES
    assert stages["record"][str(user_data)] == {"recorded": False, "episodes": 3}
    tokenizer = stages["tokenizer"]
    assert tokenizer["stop_reason"] == "time_limit" and not tokenizer["done"] and 1 <= tokenizer["step"] < 1000
    # No held-out folder: evaluation uses the validation split of data.path.
    assert stages["eval_tokenizer"]["data"] == str(user_data) and stages["eval_tokenizer"]["split"] == "val"

    checkpoint = out / "tokenizer" / "checkpoint.pt"
    mtime = checkpoint.stat().st_mtime_ns
    assert main(["run", "--config", str(config), "--until", "eval_tokenizer"]) == 0  # used to stop at the time limit again, forever
    assert "[3/14] tokenizer: done, skipped" in capsys.readouterr().out
    assert checkpoint.stat().st_mtime_ns == mtime
    assert snapshot(user_data) == before


def test_interrupted_recording_is_recorded_again(tmp_path):
    data = tmp_path / "data"
    broken = data / "episode_00000"
    broken.mkdir(parents=True)
    (broken / "frames.npy").write_bytes(b"cut short")  # what a killed recording leaves
    (data / INCOMPLETE_MARKER).touch()
    cfg = load_config(RunConfig, overrides=[f"data.path={data}", "record.episodes=1", "record.heldout_episodes=0",
                                            "record.max_steps=10"])
    assert stage_record(cfg) == {str(data): {"recorded": True, "episodes": 1, "frames": 10}}
    assert not (data / INCOMPLETE_MARKER).exists()
    summary = validate_root(data)
    assert summary["problems"] == [] and summary["frames"] == 10


def test_until_names_a_stage(tmp_path, capsys):
    config = write_config(tmp_path / "tiny.yaml", tmp_path / "run", tmp_path / "data", record={"episodes": 1})
    assert main(["run", "--config", str(config), "--until", "tokenizr"]) == 2
    assert "unknown stage" in capsys.readouterr().err


def test_minerl_layout_runs_every_stage_without_the_crafter_only_parts(tmp_path, capsys):
    """MineRL episodes (record.episodes 0, action_space minerl): no semantic labels and no game, so
    the tokenizer eval has no object retention and the real-game stages are skipped; the rest runs."""
    from dreamerv4.data.episodes import write_episode

    rng = np.random.default_rng(0)
    data = tmp_path / "minerl"
    for i in range(3):
        steps = 24
        actions = {f"action${k}": rng.integers(0, 2, steps) for k in
                   ("forward", "back", "left", "right", "jump", "sneak", "sprint", "attack")}
        actions["action$camera"] = rng.uniform(-5, 5, (steps, 2)).astype(np.float32)
        write_episode(data / f"episode_{i:05d}", rng.integers(0, 256, (steps, 64, 64, 3), dtype=np.uint8),
                      actions, rng.normal(size=steps).astype(np.float32))
    config = write_config(tmp_path / "minerl.yaml", tmp_path / "run", data, record={"episodes": 0})
    cfg = yaml.safe_load(config.read_text())
    cfg["data"].update({"action_space": "minerl", "val_fraction": 0.34})
    cfg["dynamics"]["model"]["action_space"] = "minerl"
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    assert main(["run", "--config", str(config)]) == 0
    stages = json.loads((tmp_path / "run" / "summary.json").read_text())["stages"]
    assert list(stages) == ALL_STAGES
    assert "psnr" in stages["eval_tokenizer"] and "object_retention" not in stages["eval_tokenizer"]
    assert all(stages[f"crafter_{p}"].get("skipped") for p in ("random", "bc", "imagine"))
    assert stages["imagine"]["done"] and "no real-game evaluation" in capsys.readouterr().out


@pytest.mark.parametrize("victim", ["dynamics", "agent"])
def test_kill_9_during_a_stage_then_run_again_finishes_without_redoing_finished_stages(tmp_path, victim):
    """`dreamerv4 run` killed with SIGKILL while a training stage runs: running it again resumes that
    stage from its last checkpoint, leaves every finished stage's files untouched, and finishes."""
    import os
    import signal
    import subprocess
    import sys
    import time

    data, out = tmp_path / "data" / "crafter", tmp_path / "run"
    config = write_config(tmp_path / "tiny.yaml", out, data, record={"episodes": 2, "heldout_episodes": 1})
    cfg = yaml.safe_load(config.read_text())
    # The victim trains until its time limit with a checkpoint every step, slow enough to be caught.
    cfg[victim]["train"].update({"steps": 100_000, "ckpt_every": 1, "time_limit_min": 4 / 60})
    config.write_text(yaml.safe_dump(cfg, sort_keys=False))
    command = [sys.executable, "-m", "dreamerv4.cli", "run", "--config", str(config)]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
    ckpt = out / victim / "checkpoint.pt"
    deadline = time.monotonic() + 240
    while not (ckpt.exists() and load_checkpoint(ckpt)["step"] >= 2):
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert time.monotonic() < deadline, f"no {victim} checkpoint after 240 s"
        time.sleep(0.05)
    finished = [s for s in ALL_STAGES[: ALL_STAGES.index(victim)] if (out / s).is_dir()]
    before = snapshot(*(out / s for s in finished))
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    stopped = load_checkpoint(ckpt)  # written atomically: never half a file
    assert not stopped["done"] and stopped.get("stop_reason") != "time_limit"

    rerun = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert snapshot(*(out / s for s in finished)) == before  # finished stages neither redone nor rewritten
    for name in finished:
        assert f"{name}: done, skipped" in rerun.stdout
    resumed = load_checkpoint(ckpt)
    assert resumed["step"] > stopped["step"] and resumed["stop_reason"] == "time_limit"
    assert list(json.loads((out / "summary.json").read_text())["stages"]) == ALL_STAGES
