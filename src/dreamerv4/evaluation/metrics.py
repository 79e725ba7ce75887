"""Per-image reconstruction metrics: PSNR and SSIM on batches (N,C,H,W) of floats in [0, 1].

    from dreamerv4.evaluation.metrics import psnr, ssim
    psnr(real, recon)  # (N,) dB, inf where the images are identical
    ssim(real, recon)  # (N,) in [-1, 1], 1 where identical

SSIM follows Wang et al. 2004: Gaussian window 11x11, sigma 1.5, K1 = 0.01, K2 = 0.03, computed
per channel over the valid window positions (no padding) and averaged over channels and positions.
"""

from __future__ import annotations

import torch


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.ndim != 4:
        raise ValueError(f"expected two (N,C,H,W) batches of equal shape, got {tuple(a.shape)} and {tuple(b.shape)}")


def psnr(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0) -> torch.Tensor:
    """(N,) peak signal-to-noise ratio in dB, 10 log10(max_val^2 / MSE) per image."""
    _check_pair(a, b)
    mse = (a.double() - b.double()).pow(2).flatten(1).mean(dim=1)
    return (10 * torch.log10(max_val**2 / mse)).float()  # mse 0 -> inf


def gaussian_taps(size: int = 11, sigma: float = 1.5) -> torch.Tensor:
    """(size,) normalized 1-D Gaussian; the 2-D window is its outer product with itself."""
    x = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _valid_blur_matrix(length: int, taps: torch.Tensor) -> torch.Tensor:
    """(length, length - size + 1) banded matrix: x @ M filters x's last axis with `taps`, no padding."""
    size = len(taps)
    matrix = torch.zeros(length, length - size + 1, dtype=taps.dtype)
    for i in range(length - size + 1):
        matrix[i: i + size, i] = taps
    return matrix


def ssim(a: torch.Tensor, b: torch.Tensor, max_val: float = 1.0, window: int = 11, sigma: float = 1.5,
         k1: float = 0.01, k2: float = 0.03) -> torch.Tensor:
    """(N,) structural similarity, the mean SSIM map over channels and valid window positions."""
    _check_pair(a, b)
    h, w = a.shape[-2:]
    if h < window or w < window:
        raise ValueError(f"SSIM needs images of at least {window}x{window} pixels, got {h}x{w}")
    taps = gaussian_taps(window, sigma)
    # The Gaussian window is separable: two banded matmuls, in float64 (variances are differences
    # of nearly equal moments), run far faster on CPU than a float64 depthwise 11x11 convolution.
    rows_t = _valid_blur_matrix(h, taps).T.to(a.device)
    cols = _valid_blur_matrix(w, taps).to(a.device)
    x, y = a.double(), b.double()

    def blur(t: torch.Tensor) -> torch.Tensor:
        return rows_t @ t @ cols

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov_xy = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * max_val) ** 2, (k2 * max_val) ** 2
    ssim_map = ((2 * mu_x * mu_y + c1) * (2 * cov_xy + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return ssim_map.flatten(1).mean(dim=1).float()
