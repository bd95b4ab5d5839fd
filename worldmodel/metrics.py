"""Frame metrics, one home for training, eval and the benchmarks: fidelity (PSNR, SSIM), motion from
optical flow, frame statistics.

All take uint8 RGB frames (H, W, 3) (or float arrays in 0..255).

- `psnr(a, b)`: dB over all pixels and channels; +inf for identical frames.
- `psnr_frames(a, b)`, `psnr_pooled(a, b)`: the same on torch batches (training's validation): per frame
  (capped at 100 dB), and of the mean squared error over all frames.
- `ssim(a, b)`: Wang et al. 2004 (Gaussian window 11, sigma 1.5, K1 0.01, K2 0.03), mean over the
  channels; 1.0 for identical frames.
- `optical_flow(prev, next)`: dense Farneback flow (cv2.calcOpticalFlowFarneback) on grey levels,
  (H, W, 2) pixels of motion of the content from prev to next.
- `motion(flow)`: the similarity motion that best explains a flow field, by least squares around the image
  centre: `tx`, `ty` (translation, pixels/frame; the scene moves *left* = tx < 0 when the player turns
  right), `zoom` (relative expansion per frame: > 0 when the image grows, i.e. moving forward), `rotation`
  (radians/frame) and `divergence` (= 2 * zoom, the flow's divergence).
- `frame_stats(frame)`: brightness (mean grey), contrast (std of grey), sharpness (variance of the
  Laplacian of grey).
"""
from __future__ import annotations

import math

import cv2
import numpy as np
import torch

# which rows feed the motion estimates: Doom draws the weapon sprite over the bottom of the screen, and it
# bobs and fires regardless of where the player looks, so the bottom part of the frame is left out
MOTION_ROWS = (0.0, 0.62)


def _f64(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64)


def _check_pair(a, b) -> tuple[np.ndarray, np.ndarray]:
    a, b = _f64(a), _f64(b)
    if a.shape != b.shape:
        raise ValueError(f"frames differ in shape: {a.shape} vs {b.shape}")
    return a, b


def psnr(a, b, max_value: float = 255.0) -> float:
    """Peak signal-to-noise ratio in dB; +inf when a == b."""
    a, b = _check_pair(a, b)
    mse = float(np.mean((a - b) ** 2))
    if mse == 0.0:
        return math.inf
    return 10.0 * math.log10(max_value ** 2 / mse)


def psnr_frames(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-frame PSNR in dB of uint8 frames (..., H, W, 3) against (..., H, W, 3); peak 255, capped at 100."""
    mse = (a.float() - b.float()).pow(2).flatten(-3).mean(-1)
    return (10 * torch.log10(255.0 ** 2 / mse.clamp_min(1e-10))).clamp(max=100.0)


def psnr_pooled(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of the mean squared error over all frames (torchmetrics' default reduction): unlike
    the mean of per-frame PSNRs it is not dominated by a few (near-)identical frames."""
    mse = (a.float() - b.float()).pow(2).mean().item()
    return 10 * math.log10(255.0 ** 2 / max(mse, 1e-10))


def ssim(a, b, max_value: float = 255.0) -> float:
    """Structural similarity (mean SSIM over the image and the channels), in [-1, 1]; 1.0 when a == b."""
    a, b = _check_pair(a, b)
    if a.ndim == 2:
        a, b = a[..., None], b[..., None]
    c1, c2 = (0.01 * max_value) ** 2, (0.03 * max_value) ** 2
    blur = lambda x: cv2.GaussianBlur(x, (11, 11), 1.5, borderType=cv2.BORDER_REFLECT)  # noqa: E731
    vals = []
    for c in range(a.shape[-1]):
        x, y = a[..., c], b[..., c]
        mx, my = blur(x), blur(y)
        sxx = blur(x * x) - mx * mx
        syy = blur(y * y) - my * my
        sxy = blur(x * y) - mx * my
        num = (2 * mx * my + c1) * (2 * sxy + c2)
        den = (mx * mx + my * my + c1) * (sxx + syy + c2)
        vals.append(float(np.mean(num / den)))
    return float(np.mean(vals))


def gray(frame) -> np.ndarray:
    f = np.asarray(frame)
    if f.ndim == 2:
        return f.astype(np.float32)
    if f.dtype != np.uint8:
        f = np.clip(f, 0, 255).astype(np.uint8)
    return cv2.cvtColor(f, cv2.COLOR_RGB2GRAY).astype(np.float32)


def optical_flow(prev, nxt) -> np.ndarray:
    """Dense Farneback optical flow from prev to next: float32 (H, W, 2), (dx, dy) in pixels."""
    p = np.clip(gray(prev), 0, 255).astype(np.uint8)
    n = np.clip(gray(nxt), 0, 255).astype(np.uint8)
    if p.shape != n.shape:
        raise ValueError(f"frames differ in shape: {p.shape} vs {n.shape}")
    levels = max(1, min(3, int(math.log2(max(2, min(p.shape) // 16)))))
    return cv2.calcOpticalFlowFarneback(p, n, None, pyr_scale=0.5, levels=levels, winsize=13, iterations=3,
                                        poly_n=5, poly_sigma=1.1, flags=0)


def motion(flow: np.ndarray, rows: tuple[float, float] = MOTION_ROWS, border: int = 4) -> dict:
    """Least-squares similarity motion of a flow field (H, W, 2) about the image centre:
    u = tx + zoom * x - rotation * y,  v = ty + zoom * y + rotation * x   (x, y from the centre).
    Only the rows in `rows` (fractions of the height) and away from the border are used."""
    H, W = flow.shape[:2]
    r0, r1 = int(round(rows[0] * H)), int(round(rows[1] * H))
    r0, r1 = max(r0, border), min(r1, H - border)
    c0, c1 = border, W - border
    ys, xs = np.mgrid[r0:r1, c0:c1].astype(np.float64)
    x = (xs - (W - 1) / 2).ravel()
    y = (ys - (H - 1) / 2).ravel()
    u = flow[r0:r1, c0:c1, 0].astype(np.float64).ravel()
    v = flow[r0:r1, c0:c1, 1].astype(np.float64).ravel()
    n = x.size
    one, zero = np.ones(n), np.zeros(n)
    A = np.concatenate([np.stack([one, zero, x, -y], 1), np.stack([zero, one, y, x], 1)])
    sol, *_ = np.linalg.lstsq(A, np.concatenate([u, v]), rcond=None)
    tx, ty, zoom, rot = (float(s) for s in sol)
    return {"tx": tx, "ty": ty, "zoom": zoom, "rotation": rot, "divergence": 2.0 * zoom,
            "magnitude": float(np.mean(np.hypot(u, v)))}


def frame_motion(prev, nxt) -> dict:
    """motion(optical_flow(prev, nxt))."""
    return motion(optical_flow(prev, nxt))


def frame_stats(frame) -> dict:
    g = gray(frame)
    return {"brightness": float(g.mean()), "contrast": float(g.std()),
            "sharpness": float(cv2.Laplacian(g, cv2.CV_32F).var())}


STATS = ("brightness", "contrast", "sharpness")


PSNR_CAP = 100.0  # dB: identical frames (PSNR +inf) count as this much when PSNRs are averaged


def mean_psnr(values) -> float | None:
    """Mean of per-frame PSNRs with +inf (identical frames) counted as PSNR_CAP; None if empty."""
    v = [min(float(x), PSNR_CAP) for x in values if x is not None]
    return float(np.mean(v)) if v else None


def flow_cosine(f1: np.ndarray, f2: np.ndarray, rows: tuple[float, float] = MOTION_ROWS) -> float:
    """Cosine similarity of two flow fields (H, W, 2) over the motion rows: 1 = same directions."""
    H = f1.shape[0]
    r0, r1 = int(round(rows[0] * H)), int(round(rows[1] * H))
    a, b = f1[r0:r1].astype(np.float64).ravel(), f2[r0:r1].astype(np.float64).ravel()
    na, nb = np.linalg.norm(a), np.linalg.norm(b)
    if na == 0.0 or nb == 0.0:
        return 0.0
    return float(a @ b / (na * nb))
