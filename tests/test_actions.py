"""Action spaces: lossless codes, the VPT camera bins, and the factorized distribution's maths."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dreamerv4.actions import (
    CRAFTER_ACTIONS,
    ITEM_ACTIONS,
    KEYS,
    NO_MOTION_CAMERA_CLASS,
    camera_bin_centres,
    camera_class_to_degrees,
    camera_to_bins,
    camera_to_class,
    get_action_space,
)

MINERL = get_action_space("minerl")
CRAFTER = get_action_space("crafter")


def all_minerl_parts() -> dict[str, np.ndarray]:
    """Every key combination x camera class x item class (256 * 121 * 15 = 464,640)."""
    item, camera, keys = np.meshgrid(np.arange(15), np.arange(121), np.arange(256), indexing="ij")
    return {"keys": keys.ravel(), "camera": camera.ravel(), "item": item.ravel()}


def test_layout_sizes():
    assert MINERL.num_logits == 144 and [c.num_logits for c in MINERL.components] == [8, 121, 15]
    assert [c.name for c in MINERL.components] == ["keys", "camera", "item"]
    assert MINERL.num_codes == 256 * 121 * 15
    assert CRAFTER.num_logits == 17 and CRAFTER.num_codes == 17
    assert len(ITEM_ACTIONS) == 15 and len(KEYS) == 8 and len(CRAFTER_ACTIONS) == 17
    with pytest.raises(ValueError, match="unknown action space"):
        get_action_space("atari")


def test_pack_unpack_round_trip_every_combination_numpy_and_torch():
    parts = all_minerl_parts()
    codes = MINERL.pack(parts)
    assert codes.dtype == np.int64
    # The documented formula, and every code distinct and in range.
    np.testing.assert_array_equal(codes, parts["keys"] + 256 * (parts["camera"] + 121 * parts["item"]))
    assert len(np.unique(codes)) == MINERL.num_codes and codes.min() == 0 and codes.max() == MINERL.num_codes - 1
    back = MINERL.unpack(codes)
    for name in parts:
        np.testing.assert_array_equal(back[name], parts[name])

    torch_codes = MINERL.pack({k: torch.as_tensor(v) for k, v in parts.items()})
    assert torch_codes.dtype == torch.int64
    np.testing.assert_array_equal(torch_codes.numpy(), codes)
    batch = torch_codes[: 2 * 1000].reshape(2, 1000)  # (B, T) LongTensor, as the dynamics model sees it
    unpacked = MINERL.unpack(batch)
    for name in parts:
        assert unpacked[name].dtype == torch.int64 and unpacked[name].shape == (2, 1000)
        np.testing.assert_array_equal(unpacked[name].reshape(-1).numpy(), parts[name][:2000])


def test_pack_unpack_reject_out_of_range():
    with pytest.raises(ValueError, match="camera"):
        MINERL.pack({"keys": np.array([0]), "camera": np.array([121]), "item": np.array([0])})
    with pytest.raises(ValueError, match="outside"):
        MINERL.unpack(torch.tensor([MINERL.num_codes]))
    with pytest.raises(ValueError, match="outside"):
        CRAFTER.unpack(np.array([-1]))


def test_camera_centre_edges_and_clipping():
    assert NO_MOTION_CAMERA_CLASS == 60
    assert camera_to_class(np.array([0.0, 0.0])) == 60
    assert MINERL.noop_code == 256 * 60
    # pitch +10 is the top pitch bin (10), yaw -10 the bottom yaw bin (0); beyond +-10 clips to the edges.
    for pitch_yaw in ([10.0, -10.0], [10.0001, -10.0001], [90.0, -180.0]):
        assert camera_to_class(np.array(pitch_yaw)) == 10 * 11 + 0
    assert camera_to_class(np.array([-45.0, 45.0])) == 0 * 11 + 10
    np.testing.assert_array_equal(camera_to_bins(np.array([-1e6, -10, 0, 10, 1e6])), [0, 0, 5, 10, 10])


def test_bin_centres_match_vpt_values_and_round_trip():
    expected = [-10, -5.809, -3.215, -1.609, -0.615, 0, 0.615, 1.609, 3.215, 5.809, 10]
    np.testing.assert_allclose(camera_bin_centres(), expected, atol=1e-3)
    np.testing.assert_array_equal(camera_to_bins(camera_bin_centres()), np.arange(11))
    classes = np.arange(121)
    degrees = camera_class_to_degrees(classes)
    np.testing.assert_array_equal(camera_to_class(degrees), classes)
    assert tuple(camera_class_to_degrees(np.array(60))) == (0.0, 0.0)
    # Bins are monotone: more rotation never lands in a bin closer to the centre.
    sweep = np.linspace(-12, 12, 2001)
    assert (np.diff(camera_to_bins(sweep)) >= 0).all()


def test_log_prob_matches_hand_computation():
    torch.manual_seed(0)
    logits = torch.randn(144)
    keys_bits = [1, 0, 1, 0, 0, 0, 0, 1]  # forward, left, attack
    camera, item = 60, 3
    code = MINERL.pack({"keys": np.int64(sum(b << i for i, b in enumerate(keys_bits))),
                        "camera": np.int64(camera), "item": np.int64(item)})
    l = logits.tolist()

    def log_sigmoid(x):
        return -math.log1p(math.exp(-x))

    def log_softmax(xs, i):
        m = max(xs)
        return xs[i] - m - math.log(sum(math.exp(x - m) for x in xs))

    hand = sum(log_sigmoid(l[i]) if b else log_sigmoid(-l[i]) for i, b in enumerate(keys_bits))
    hand += log_softmax(l[8:129], camera) + log_softmax(l[129:144], item)
    got = MINERL.log_prob(logits, torch.tensor(int(code)))
    assert got.item() == pytest.approx(hand, abs=1e-5)

    crafter_logits = torch.randn(17)
    assert CRAFTER.log_prob(crafter_logits, torch.tensor(5)).item() == pytest.approx(
        log_softmax(crafter_logits.tolist(), 5), abs=1e-6)


def enumerate_log_probs(logits: torch.Tensor) -> torch.Tensor:
    """log pi of every MineRL code, in code order, under one logits row (broadcast against the codes)."""
    return MINERL.log_prob(logits, torch.arange(MINERL.num_codes))


def test_factorized_distribution_normalizes_and_mode_is_argmax_kl_entropy_match_enumeration():
    gen = torch.Generator().manual_seed(1)
    logits_p = torch.randn(144, generator=gen) * 2
    logits_q = torch.randn(144, generator=gen)
    logp = enumerate_log_probs(logits_p)
    logq = enumerate_log_probs(logits_q)
    assert torch.logsumexp(logp.double(), 0).item() == pytest.approx(0.0, abs=1e-4)
    assert MINERL.mode(logits_p).item() == int(logp.argmax())
    p = logp.double().exp()
    assert MINERL.entropy(logits_p).item() == pytest.approx(-(p * logp.double()).sum().item(), rel=1e-4)
    assert MINERL.kl(logits_p, logits_q).item() == pytest.approx((p * (logp - logq).double()).sum().item(), rel=1e-4)
    assert MINERL.kl(logits_p, logits_p).abs().item() < 1e-6


def test_sample_is_reproducible_finite_and_follows_the_distribution():
    logits = torch.randn(4, 144) * 3
    codes = MINERL.sample(logits.expand(5000, 4, 144), generator=torch.Generator().manual_seed(0))
    again = MINERL.sample(logits.expand(5000, 4, 144), generator=torch.Generator().manual_seed(0))
    assert codes.shape == (5000, 4) and codes.dtype == torch.int64
    assert torch.equal(codes, again)
    assert torch.isfinite(MINERL.log_prob(logits.expand(5000, 4, 144), codes)).all()
    # Each key's press rate matches sigmoid(logit); the item frequencies match softmax.
    keys = MINERL.unpack(codes)["keys"]
    press_rate = ((keys.unsqueeze(-1) >> torch.arange(8)) & 1).float().mean(0)
    torch.testing.assert_close(press_rate, torch.sigmoid(logits[:, :8]), atol=0.03, rtol=0)
    item_freq = torch.nn.functional.one_hot(MINERL.unpack(codes)["item"], 15).float().mean(0)
    torch.testing.assert_close(item_freq, torch.softmax(logits[:, 129:], -1), atol=0.03, rtol=0)

    crafter_logits = torch.randn(17)
    draws = CRAFTER.sample(crafter_logits.expand(20000, 17), generator=torch.Generator().manual_seed(0))
    freq = torch.bincount(draws, minlength=17).float() / 20000
    torch.testing.assert_close(freq, torch.softmax(crafter_logits, -1), atol=0.02, rtol=0)
    assert CRAFTER.mode(crafter_logits).item() == int(crafter_logits.argmax())


def test_split_logits_rejects_wrong_width():
    with pytest.raises(ValueError, match="144 logits"):
        MINERL.log_prob(torch.zeros(17), torch.tensor(0))


def raw_minerl_actions() -> dict[str, np.ndarray]:
    steps = 6
    actions = {f"action${k}": np.zeros(steps, np.int64) for k in KEYS}
    actions["action$forward"][[1, 2]] = 1
    actions["action$attack"][2] = 1
    actions["action$camera"] = np.array([[0, 0], [1.6, -0.6], [10, -10], [30, 0], [0, -200], [-5.8, 3.2]], np.float32)
    actions["action$craft"] = np.array(["none", "planks", "none", "none", "stick", "none"])
    actions["action$place"] = np.array(["none", "none", "dirt", "none", "furnace", "none"])
    actions["action$equip"] = np.array(["none", "none", "none", "air", "none", "iron_pickaxe"])
    actions["action$nearbySmelt"] = np.array(["none", "none", "none", "none", "none", "coal"])
    return actions


def test_minerl_conversion_codes_and_counted_unrepresentable_values():
    codes, report = MINERL.codes_from_actions(raw_minerl_actions())
    parts = MINERL.unpack(codes)
    np.testing.assert_array_equal(parts["keys"], [0, 1, 1 | (1 << 7), 0, 0, 0])
    np.testing.assert_array_equal(parts["camera"], [60, 7 * 11 + 4, 110, 10 * 11 + 5, 5 * 11 + 0, 1 * 11 + 8])
    expected_items = ["none", "craft:planks", "none", "none", "craft:stick", "equip:iron_pickaxe"]
    assert [ITEM_ACTIONS[i] for i in parts["item"]] == expected_items
    assert report.steps == 6
    assert report.camera_clipped == 2  # (30, 0) and (0, -200); exactly 10 is not beyond the range
    assert report.multiple_item_actions == 2  # step 4 craft+place, step 5 equip+nearbySmelt
    assert dict(report.unrepresentable_items) == {"place:dirt": 1, "equip:air": 1, "nearbySmelt:coal": 1}
    assert report.total == 2 + 2 + 3


def test_minerl_integer_enums_follow_minerls_sorted_enum_order():
    strings = raw_minerl_actions()
    ints = dict(strings)
    # MineRL's Enum numbers sorted values: craft ['crafting_table', 'none', 'planks', 'stick', 'torch'].
    ints["action$craft"] = np.array([1, 2, 1, 1, 3, 1])
    codes_s, _ = MINERL.codes_from_actions(strings)
    codes_i, _ = MINERL.codes_from_actions(ints)
    np.testing.assert_array_equal(codes_s, codes_i)
    ints["action$craft"] = np.array([1, 2, 1, 1, 9, 1])
    with pytest.raises(ValueError, match="action\\$craft"):
        MINERL.codes_from_actions(ints)


def test_minerl_actions_from_codes_round_trip():
    parts = all_minerl_parts()
    rng = np.random.default_rng(0)
    codes = MINERL.pack(parts)[rng.choice(MINERL.num_codes, 5000, replace=False)]
    codes = np.concatenate([codes, MINERL.pack({"keys": np.zeros(15, np.int64), "camera": np.full(15, 60),
                                                "item": np.arange(15)})])  # every item at least once
    back, report = MINERL.codes_from_actions(MINERL.actions_from_codes(codes))
    np.testing.assert_array_equal(back, codes)
    assert report.total == 0


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda a: a.pop("action$jump"), "missing MineRL action key"),
        (lambda a: a.__setitem__("action$camera", np.full((6, 2), np.nan, np.float32)), "NaN or inf"),
        (lambda a: a.__setitem__("action$forward", np.full(6, 2)), "0/1"),
        (lambda a: a.__setitem__("action$camera", np.zeros((6, 3), np.float32)), "\\(T, 2\\)"),
    ],
)
def test_minerl_conversion_rejects_bad_input(change, message):
    actions = raw_minerl_actions()
    change(actions)
    with pytest.raises(ValueError, match=message):
        MINERL.codes_from_actions(actions)


def test_crafter_codes_are_the_action_index_and_range_checked():
    codes, report = CRAFTER.codes_from_actions({"action": np.arange(17, dtype=np.int64)})
    np.testing.assert_array_equal(codes, np.arange(17))
    assert report.total == 0
    with pytest.raises(ValueError, match="outside 0..16"):
        CRAFTER.codes_from_actions({"action": np.array([0, 17], np.int64)})
    with pytest.raises(ValueError, match="int64"):
        CRAFTER.codes_from_actions({"action": np.array([0, 1], np.int32)})
