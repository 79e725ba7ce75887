"""PSNR and SSIM: exact values on known inputs, and SSIM against a plain-loop numpy reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from dreamerv4.evaluation.metrics import psnr, ssim


def reference_ssim(a: np.ndarray, b: np.ndarray, size: int = 11, sigma: float = 1.5) -> float:
    """Wang et al. 2004 written out: for every channel and every valid window position, weighted
    means, variances and covariance by explicit sums over the window, then the mean SSIM."""
    offsets = np.arange(size) - (size - 1) / 2
    g = np.exp(-(offsets**2) / (2 * sigma**2))
    weights = np.outer(g, g) / np.outer(g, g).sum()
    c1, c2 = 0.01**2, 0.03**2
    values = []
    channels, height, width = a.shape
    for ch in range(channels):
        for top in range(height - size + 1):
            for left in range(width - size + 1):
                mx = my = sxx = syy = sxy = 0.0
                for i in range(size):
                    for j in range(size):
                        w, x, y = weights[i, j], a[ch, top + i, left + j], b[ch, top + i, left + j]
                        mx += w * x
                        my += w * y
                        sxx += w * x * x
                        syy += w * y * y
                        sxy += w * x * y
                vx, vy, cxy = sxx - mx * mx, syy - my * my, sxy - mx * my
                values.append(((2 * mx * my + c1) * (2 * cxy + c2)) / ((mx * mx + my * my + c1) * (vx + vy + c2)))
    return float(np.mean(values))


def test_identical_images_give_infinite_psnr_and_unit_ssim():
    a = torch.rand(3, 3, 16, 16)
    assert torch.isinf(psnr(a, a)).all()
    assert torch.allclose(ssim(a, a), torch.ones(3), atol=1e-6)


def test_psnr_of_a_known_mse_and_its_scale():
    a = torch.rand(2, 3, 8, 8) * 0.6 + 0.2
    b = a + 0.1  # MSE 0.01 -> 20 dB
    c = a - 0.01 * torch.sign(torch.randn_like(a))  # MSE 1e-4 -> 40 dB
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 20.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(psnr(a, c), torch.full((2,), 40.0), atol=1e-4, rtol=0)
    torch.testing.assert_close(psnr(a * 255, b * 255, max_val=255.0), psnr(a, b), atol=1e-4, rtol=0)


def test_metrics_are_per_image():
    a = torch.rand(4, 3, 16, 16)
    b = (a + 0.05 * torch.randn_like(a) * torch.arange(1, 5).view(4, 1, 1, 1)).clamp(0, 1)
    for metric in (psnr, ssim):
        batched = metric(a, b)
        single = torch.cat([metric(a[i: i + 1], b[i: i + 1]) for i in range(4)])
        torch.testing.assert_close(batched, single)
        assert (batched[:-1] > batched[1:]).all()  # more noise, lower score


def test_ssim_falls_with_noise():
    torch.manual_seed(0)
    a = torch.rand(2, 3, 32, 32)
    scores = [ssim(a, (a + s * torch.randn_like(a)).clamp(0, 1)).mean().item() for s in (0.02, 0.1, 0.3)]
    assert 1.0 > scores[0] > scores[1] > scores[2]


def test_ssim_matches_loop_reference():
    rng = np.random.default_rng(0)
    a = rng.random((2, 3, 13, 14))
    b = np.clip(a + 0.15 * rng.standard_normal(a.shape), 0, 1)
    ours = ssim(torch.from_numpy(a).float(), torch.from_numpy(b).float())
    for i in range(2):
        assert math.isclose(ours[i].item(), reference_ssim(a[i], b[i]), abs_tol=1e-4)


def test_bad_shapes_are_rejected():
    with pytest.raises(ValueError):
        psnr(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 9))
    with pytest.raises(ValueError):
        ssim(torch.rand(3, 16, 16), torch.rand(3, 16, 16))
    with pytest.raises(ValueError, match="at least 11x11"):
        ssim(torch.rand(1, 3, 8, 8), torch.rand(1, 3, 8, 8))
