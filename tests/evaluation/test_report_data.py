"""What the report shows, as data (src/dreamerv4/evaluation/report_data.py): reading metrics.jsonl, the
headline (per-policy returns with intervals, the achievements that moved, the comparisons) and each
stage's key numbers beside their baselines, with the verdicts they give."""

from __future__ import annotations

import json

import pytest

from dreamerv4.evaluation.report_data import (KeyNumber, agent_numbers, ci_bounds, collect, compare_returns,
                                              crafter_eval_path, dynamics_numbers, headline, imagine_numbers,
                                              imagine_return_series, moved_achievements, paired_returns, policy_result,
                                              read_jsonl, tokenizer_numbers)

from .test_report import build_run, dynamics_eval


def test_read_jsonl_skips_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"kind": "train", "step": 1, "loss": 1.0}\n{"kind": "train", "step": 2, "lo')
    assert read_jsonl(path) == [{"kind": "train", "step": 1, "loss": 1.0}]


def _crafter(mean, ci, score, rates, episodes=30):
    return {"mean_return": mean, "return_ci95": ci, "crafter_score": score, "achievements": rates, "episodes": episodes}


def test_policy_result_reads_intervals_and_tolerates_missing_keys():
    r = policy_result(_crafter(2.0, [1.5, 2.5], 3.1, {"wake_up": 0.5, "eat_cow": "nan"}))
    assert r == {"mean_return": 2.0, "ci95": (1.5, 2.5), "crafter_score": 3.1, "episodes": 30,
                 "achievements": {"wake_up": 0.5}}  # a non-number rate is left out
    assert policy_result(_crafter(2.0, 0.4, 3.1, {}))["ci95"] == pytest.approx((1.6, 2.4))  # a half-width
    bare = policy_result({"mean_return": 1.0})
    assert bare["ci95"] is None and bare["crafter_score"] is None and bare["achievements"] == {}
    assert policy_result(None) is None and policy_result([1, 2]) is None
    assert ci_bounds(1.0, [2.0, 1.0]) is None and ci_bounds(1.0, [1.0]) is None and ci_bounds(None, 0.5) is None


def test_moved_achievements_largest_change_first_unchanged_left_out():
    bc = policy_result(_crafter(2, None, 1, {"a": 0.5, "b": 0.2, "c": 0.9, "d": 0.1, "only_bc": 0.3}))
    imagine = policy_result(_crafter(2, None, 1, {"a": 0.5, "b": 0.5, "c": 0.6, "d": 0.0}))
    random = policy_result(_crafter(1, None, 1, {"b": 0.1}))
    moved = moved_achievements(bc, imagine, random)
    assert [m["name"] for m in moved] == ["b", "c", "d"]  # |+0.3| ties |-0.3|: by name; "a" did not move
    assert moved[0] == {"name": "b", "random": 0.1, "bc": 0.2, "imagine": 0.5, "change": pytest.approx(0.3)}
    assert moved[1]["change"] == pytest.approx(-0.3) and moved[1]["random"] is None
    assert [m["name"] for m in moved_achievements(bc, imagine, top=1)] == ["b"]
    assert moved_achievements(bc, None) == [] and moved_achievements(None, imagine) == []


def test_compare_returns_says_whether_the_intervals_separate():
    low = policy_result(_crafter(1.0, [0.8, 1.2], 1, {}))
    high = policy_result(_crafter(2.0, [1.7, 2.3], 1, {}))
    near = policy_result(_crafter(1.1, [0.9, 1.3], 1, {}))
    assert compare_returns(high, low) == {"diff": pytest.approx(1.0), "disjoint": True}
    assert compare_returns(near, low) == {"diff": pytest.approx(0.1), "disjoint": False}
    assert compare_returns(high, policy_result({"mean_return": 1.0}))["disjoint"] is None
    assert compare_returns(high, None) is None and compare_returns(policy_result({}), high) is None


def test_headline_from_a_run_folder(tmp_path):
    run = build_run(tmp_path / "run")
    result = headline(collect(run))
    assert result["policies"]["imagine"] is None  # not run
    bc = result["policies"]["bc"]
    assert bc["mean_return"] == 4.6 and bc["ci95"] == pytest.approx((4.3, 4.9))
    assert result["moved"] == []  # needs the imagination policy's evaluation
    assert result["comparisons"]["bc_vs_random"] == {"diff": pytest.approx(3.5), "disjoint": True}
    assert result["comparisons"]["imagine_vs_bc"] is None
    bc = json.loads(crafter_eval_path(run, "bc").read_text())
    crafter_eval_path(run, "imagine").write_text(json.dumps(
        {**bc, "mean_return": 4.8, "achievements": {**bc["achievements"], "wake_up": 0.0, "collect_wood": 0.9}}))
    result = headline(collect(run))
    assert [m["name"] for m in result["moved"]] == ["collect_wood", "wake_up"]  # +58.5 and -52.5 points
    assert result["comparisons"]["imagine_vs_bc"] == {"diff": pytest.approx(0.2), "disjoint": False}
    assert result["paired"] == {"bc_vs_random": None, "imagine_vs_bc": None}  # no per-episode returns here


def test_paired_returns_pairs_world_by_world():
    seeds = [5, 6, 7]
    bc = {"returns": [1.0, 2.0, 6.0], "env_seeds": seeds}
    imagine = {"returns": [2.0, 3.0, 8.0], "env_seeds": seeds}  # differences 1, 1, 2: mean 4/3, sd 1/sqrt(3)
    paired = paired_returns(imagine, bc)
    half = 1.96 * (1 / 3) ** 0.5 / 3 ** 0.5
    assert paired["diff"] == pytest.approx(4 / 3) and paired["episodes"] == 3
    assert paired["ci95"] == pytest.approx((4 / 3 - half, 4 / 3 + half))
    assert paired["ratio"] == pytest.approx(13 / 9)
    # The intervals of the two means overlap widely; the paired interval is clear of zero.
    assert paired["ci95"][0] > 0
    assert paired_returns(imagine, {**bc, "env_seeds": [5, 6, 8]}) is None  # other worlds
    assert paired_returns(imagine, {"returns": [1.0, 2.0], "env_seeds": seeds}) is None  # other lengths
    assert paired_returns(imagine, {"returns": [1.0, "nan", 2.0], "env_seeds": seeds}) is None
    assert paired_returns(imagine, None) is None and paired_returns({"env_seeds": seeds}, bc) is None
    one = paired_returns({"returns": [2.0], "env_seeds": [1]}, {"returns": [1.0], "env_seeds": [1]})
    assert one["diff"] == 1.0 and one["ci95"] is None


def test_key_number_verdicts():
    assert KeyNumber("psnr", 21.0, "pool", 18.0).verdict() == "beats"
    assert KeyNumber("mae", 0.2, "mean", 0.1, higher_is_better=False).verdict() == "below"
    assert KeyNumber("mae", 0.1, "mean", 0.2, higher_is_better=False).verdict() == "beats"
    assert KeyNumber("acc", 0.5, "majority", 0.5).verdict() == "equal"
    assert KeyNumber("psnr", 17.0, "copy", 16.5, diff_ci=(-0.1, 1.1)).verdict() == "within noise"
    assert KeyNumber("psnr", 17.0, "copy", 16.5, diff_ci=(0.2, 0.8)).verdict() == "beats"
    assert KeyNumber("mae", 0.1, "mean", 0.2, higher_is_better=False, diff_ci=(-0.15, -0.05)).verdict() == "beats"
    assert KeyNumber("return", 2.2, "bc", 2.1, value_ci=(1.8, 2.6), baseline_ci=(1.7, 2.5)).verdict() == "within noise"
    assert KeyNumber("return", 3.0, "bc", 2.1, value_ci=(2.6, 3.4), baseline_ci=(1.7, 2.5)).verdict() == "beats"
    assert KeyNumber("imagined", 0.4, "real", 0.1, higher_is_better=None).verdict() == "over"
    assert KeyNumber("psnr", 21.0, "pool", None).verdict() is None


def test_stage_key_numbers():
    tok = tokenizer_numbers({"psnr": 21.5, "ssim": 0.65, "object_retention": 0.41,
                             "references": {"avg_pool_4x4": {"psnr": 18.2, "ssim": 0.45, "object_retention": 0.62}}})
    assert [(k.value, k.baseline_value, k.verdict()) for k in tok] == [
        (21.5, 18.2, "beats"), (0.65, 0.45, "beats"), (0.41, 0.62, "below")]
    assert tokenizer_numbers(None) == [] and tokenizer_numbers({"psnr": "nan"}) == []

    dyn = dynamics_numbers(dynamics_eval())
    assert [k.measure for k in dyn] == ["PSNR 1 frame ahead (dB)", "PSNR 4 frames ahead (dB)",
                                        "object retention 4 frames ahead", "PSNR 4 frames ahead (dB)"]
    assert [k.verdict() for k in dyn] == ["below", "beats", "below", "within noise"]
    assert dyn[0].diff_ci == (-9.0, -7.0) and dyn[3].baseline == "the same model fed another window's actions"
    assert dynamics_numbers({"psnr_imagined": 18.2}) == [] and dynamics_numbers([]) == []

    agent = agent_numbers({"action": {"log_likelihood": -1.87, "marginal_log_likelihood": -1.84, "accuracy": 0.24,
                                      "components": {"action": {"majority_accuracy": 0.24}}},
                           "reward": {"mae": 0.066, "baseline_mae": 0.069, "auroc": 0.58}})
    assert [(k.measure, k.verdict()) for k in agent] == [
        ("action log-likelihood (nats/step)", "below"), ("action accuracy", "equal"),
        ("reward AUROC of achievement unlocks", "beats"), ("reward MAE", "beats")]
    no_auroc = agent_numbers({"action": {"accuracy": 0.3, "components": {"keys": {}, "camera": {}}},
                              "reward": {"auroc": None}})
    assert [(k.measure, k.baseline_value) for k in no_auroc] == [("action accuracy", None)]  # no majority to compare

    data = {"crafter_eval": {"bc": _crafter(2.1, [1.7, 2.5], 1.8, {}), "imagine": _crafter(2.2, [1.8, 2.6], 2.1, {})},
            "instrument": {"imagine": {"horizon": 15, "imagined_return": 0.42, "real_return": 0.11}}}
    rows = imagine_numbers(data)
    assert [(k.measure, k.verdict()) for k in rows] == [
        ("real-game return", "within noise"), ("Crafter score (%)", "beats"),
        ("imagined return over 15 steps", "over")]
    assert imagine_numbers({"crafter_eval": {}, "instrument": {}}) == []


def test_imagine_return_series_brackets_training_with_the_real_game_evaluations():
    imagined = [(10.0, 0.2), (20.0, 0.5), (30.0, 0.9)]
    evals = {"bc": _crafter(2.0, [1.8, 2.2], 3.0, {}), "imagine": _crafter(3.0, [2.7, 3.3], 4.0, {})}
    data = {"curves": {"imagine": {"imagined_reward": imagined}}, "crafter_eval": evals}
    series = imagine_return_series(data)
    assert series["imagined reward per rollout (H steps)"] == imagined
    # No monitoring during training: BC's return at step 0, the final policy's at the last logged step.
    assert series["real-game return per episode (BC at step 0, final policy)"] == [(0.0, 2.0), (30.0, 3.0)]
    # The training's own real-game monitoring wins where it ran.
    monitored = [(0.0, 1.9), (30.0, 2.8)]
    data["curves"]["imagine"]["eval/crafter_return"] = monitored
    assert imagine_return_series(data) == {"imagined reward per rollout (H steps)": imagined,
                                           "real-game return per episode": monitored}
    # Without the final policy's evaluation or any training record there is no real series to draw.
    assert list(imagine_return_series({"curves": {"imagine": {"imagined_reward": imagined}},
                                       "crafter_eval": {"bc": evals["bc"]}})) == ["imagined reward per rollout (H steps)"]
    assert imagine_return_series({"curves": {}, "crafter_eval": evals}) == {}
