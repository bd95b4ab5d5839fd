"""Frame autoencoder: uint8 frames (B, H, W, 3) <-> a small latent grid (B, C, H/16, W/16).

The transformer works on these latents; the decoder runs once per displayed frame, so it is kept
cheap enough for the CPU frame budget (ResBlocks only at low resolution, thin convs at high).
Latents are normalised per channel (`latent_mean`, `latent_std`, measured after training) so that
the diffusion model sees roughly unit-variance inputs.

A 6x8 grid of 16 numbers cannot hold a frame's texture: decoded from the latent alone a frame is the
blurred average of what it could be. With `p_frame` on, the decoder also sees the frame shown before
(as a video codec's P-frame is decoded against the previous picture): it estimates the motion between
that frame and the latent's coarse picture, warps the previous frame along it, and blends per pixel
between the warped texture and its own picture (`MotionBlend`). Where the scene only moved, the detail
is carried over; where something new appears, the latent's picture shows. Decoding is then a sequence:
frame t is decoded against the decoded frame t-1 (the engine keeps the frame it showed last).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class AutoencoderConfig:
    frame_size: tuple[int, int] = (96, 128)  # (H, W)
    latent_channels: int = 16
    channels: tuple[int, ...] = (16, 32, 64, 128)  # width at full, 1/2, 1/4, 1/8 resolution
    res_blocks: tuple[int, ...] = (0, 0, 1, 1)  # ResBlocks per resolution (cheap at low res only)
    latent_noise: float = 0.1  # training: noise added to normalised latents so decoding is robust
    p_frame: bool = False  # the decoder also sees the previous displayed frame (motion-compensated blend)

    @property
    def downsample(self) -> int:
        return 2 ** len(self.channels)

    @property
    def latent_size(self) -> tuple[int, int]:
        h, w = self.frame_size
        return h // self.downsample, w // self.downsample

    def __post_init__(self):
        self.frame_size = tuple(self.frame_size)
        self.channels = tuple(self.channels)
        self.res_blocks = tuple(self.res_blocks)
        if len(self.channels) != len(self.res_blocks):
            raise ValueError("AutoencoderConfig: channels and res_blocks must have the same length")
        h, w = self.frame_size
        if h % self.downsample or w % self.downsample:
            raise ValueError(f"frame size {h}x{w} must be divisible by {self.downsample}")

    def to_dict(self) -> dict:
        return asdict(self)


class ResBlock(nn.Module):
    def __init__(self, ch: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(min(8, ch // 4), ch)
        self.conv1 = nn.Conv2d(ch, ch, 3, padding=1)
        self.norm2 = nn.GroupNorm(min(8, ch // 4), ch)
        self.conv2 = nn.Conv2d(ch, ch, 3, padding=1)

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return x + h


class Encoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.channels
        self.stem = nn.Conv2d(3, ch[0], 3, padding=1)
        layers: list[nn.Module] = []
        for i, c in enumerate(ch):
            layers += [ResBlock(c) for _ in range(cfg.res_blocks[i])]
            c_out = ch[i + 1] if i + 1 < len(ch) else ch[-1]
            layers += [nn.Conv2d(c, c_out, 4, stride=2, padding=1), nn.SiLU()]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(ch[-1], cfg.latent_channels, 1)

    def forward(self, x):  # (B, 3, H, W) in [-1, 1] -> (B, C, H/16, W/16)
        return self.out(self.body(self.stem(x)))


class Decoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        ch = cfg.channels
        self.stem = nn.Conv2d(cfg.latent_channels, ch[-1], 3, padding=1)
        layers: list[nn.Module] = []
        for i in reversed(range(len(ch))):
            c_in = ch[i + 1] if i + 1 < len(ch) else ch[-1]
            layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(c_in, ch[i], 3, padding=1), nn.SiLU()]
            layers += [ResBlock(ch[i]) for _ in range(cfg.res_blocks[i])]
        self.body = nn.Sequential(*layers)
        self.out = nn.Conv2d(ch[0], 3, 3, padding=1)
        self.p_frame = MotionBlend(ch[0]) if cfg.p_frame else None

    def forward(self, z, prev=None):  # (B, C, h, w), prev (B, 3, H, W) -> (B, 3, H, W), roughly in [-1, 1]
        return self.forward_parts(z, prev)[0]

    def forward_parts(self, z, prev=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the decoded images, the previous frames warped by the estimated motion for the motion loss
        (None without p_frame, or without autograd))."""
        h = self.body(self.stem(z))  # (B, ch[0], H, W)
        image = self.out(h)
        if self.p_frame is None:
            return image, None
        if prev is None:
            raise ValueError("this decoder decodes against the previous frame (p_frame): pass prev")
        return self.p_frame(h, image, prev)


class MotionBlend(nn.Module):
    """The P-frame stage of the decoder. The motion from the previous displayed frame `prev` to the
    latent's own picture `image` (B, 3, H, W) is found by block matching at 1/4 resolution: every
    shift within +-8 pixels vertically and +-24 horizontally is scored by how well the shifted `prev`
    matches `image` around each place (a cost volume, summed over 3x3 neighbourhoods), and the flow is
    the softmin-weighted shift -- right from the start, with nothing to learn. A small network refines
    it from the cost volume. `prev` is warped along the flow and a per-pixel mask blends the warped
    frame into the picture, with a small correction. The learned last layers start at zero."""

    POOL = 4  # the motion is estimated on (image, prev) average-pooled this much
    REACH = (2, 6)  # shifts tried, in pooled pixels: +-2 rows, +-6 columns (+-8 and +-24 pixels)
    TEMPERATURE = 0.003  # the softmin's initial temperature over matching costs (images in [-1, 1])
    FLOW_SCALE = 4.0  # pixels per unit of the refinement's output

    def __init__(self, features: int, width: int = 32):
        super().__init__()
        ry, rx = self.REACH
        self.shifts = (2 * ry + 1) * (2 * rx + 1)
        dy, dx = torch.meshgrid(torch.arange(-ry, ry + 1), torch.arange(-rx, rx + 1), indexing="ij")
        self.register_buffer("offsets", torch.stack([dx, dy]).reshape(2, self.shifts).float() * self.POOL,
                             persistent=False)  # (2, K) pixels, in the order F.unfold lays the shifts out
        self.log_temperature = nn.Parameter(torch.tensor(math.log(self.TEMPERATURE)))
        self.motion = nn.Sequential(
            nn.Conv2d(6 + self.shifts, width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(width, 2 * width, 4, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.SiLU(),
            nn.Conv2d(2 * width, 2, 3, padding=1))  # a correction of the matched flow (dx, dy)
        self.blend = nn.Sequential(nn.Conv2d(features + 6, features, 3, padding=1), nn.SiLU(),
                                   nn.Conv2d(features, 4, 3, padding=1))  # mask logit, correction (3)
        for head in (self.motion[-1], self.blend[-1]):
            nn.init.zeros_(head.weight)
            nn.init.zeros_(head.bias)

    def flow(self, image, prev):  # (B, 3, H, W) x 2 -> (B, 2, H, W) float32: prev[p + flow[p]] shows image[p]
        """Matching and flow in float32 whatever the decoder's precision (bf16 cannot place a sample
        on a 128-pixel row to better than about half a pixel); the refinement in the weights' dtype."""
        H, W = image.shape[-2:]
        dtype = image.dtype
        a, b = F.avg_pool2d(image.float(), self.POOL), F.avg_pool2d(prev.float(), self.POOL)  # (B, 3, h, w)
        B, C, h, w = a.shape
        ry, rx = self.REACH
        shifted = F.unfold(F.pad(b, (rx, rx, ry, ry), mode="replicate"), (2 * ry + 1, 2 * rx + 1))
        cost = (shifted.view(B, C, self.shifts, h, w) - a[:, :, None]).abs().mean(1)  # (B, K, h, w)
        cost = F.avg_pool2d(cost, 3, stride=1, padding=1)
        weights = torch.softmax(-cost / self.log_temperature.float().exp(), dim=1)  # (B, K, h, w)
        matched = torch.einsum("bkhw,ck->bchw", weights, self.offsets.float())  # (B, 2, h, w) pixels
        features = torch.cat([a, b, cost - cost.mean(1, keepdim=True)], dim=1)  # (B, 6 + K, h, w)
        refine = self.motion(features.to(dtype)).float() * self.FLOW_SCALE  # (B, 2, h/2, w/2)
        flow = matched + F.interpolate(refine, size=(h, w), mode="bilinear", align_corners=False)
        return F.interpolate(flow, size=(H, W), mode="bilinear", align_corners=False)

    def forward(self, h, image, prev):  # (B, F, H, W), (B, 3, H, W), (B, 3, H, W) -> (B, 3, H, W), ...
        """-> (the blended frames, `prev` warped with bilinear interpolation for the motion loss (None
        without autograd)). The frames are blended with `prev` moved to the nearest whole pixel: copying
        pixels keeps the texture as sharp as it was, where interpolating would blur it a little more
        at every frame of a rollout."""
        flow = self.flow(image, prev)
        moved = warp(prev.float(), flow, mode="nearest").to(image.dtype)
        mask, correction = self.blend(torch.cat([h, image, moved], dim=1)).split([1, 3], dim=1)
        smooth = warp(prev.float(), flow) if torch.is_grad_enabled() else None
        return image + correction + torch.sigmoid(mask) * (moved - image), smooth


def warp(images: torch.Tensor, flow: torch.Tensor, mode: str = "bilinear") -> torch.Tensor:
    """Backward warp: out[p] = images[p + flow[p]] (`mode`: bilinear or nearest; edges repeat), flow
    (B, 2, H, W) in pixels (dx, dy)."""
    B, _, H, W = images.shape
    ys = torch.linspace(-1 + 1 / H, 1 - 1 / H, H, device=images.device, dtype=images.dtype)
    xs = torch.linspace(-1 + 1 / W, 1 - 1 / W, W, device=images.device, dtype=images.dtype)
    base = torch.stack(torch.meshgrid(xs, ys, indexing="xy"), dim=-1)  # (H, W, 2): (x, y) of each pixel centre
    scale = torch.tensor([2 / W, 2 / H], device=images.device, dtype=images.dtype)
    grid = base + flow.permute(0, 2, 3, 1) * scale  # (B, H, W, 2)
    return F.grid_sample(images, grid, mode=mode, padding_mode="border", align_corners=False)


class Autoencoder(nn.Module):
    def __init__(self, cfg: AutoencoderConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.register_buffer("latent_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latent_std", torch.ones(cfg.latent_channels))

    # uint8 (B, H, W, 3) <-> float (B, 3, H, W) in [-1, 1]
    @staticmethod
    def to_float(frames: torch.Tensor) -> torch.Tensor:
        return frames.permute(0, 3, 1, 2).float().div(127.5).sub(1.0)

    @staticmethod
    def to_uint8(images: torch.Tensor) -> torch.Tensor:
        return images.add(1.0).mul(127.5).round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1).contiguous()

    def _stats(self, z):
        return self.latent_mean.view(1, -1, 1, 1).to(z.dtype), self.latent_std.view(1, -1, 1, 1).to(z.dtype)

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (B, H, W, 3) -> normalised latents (B, C, h, w)."""
        z = self.encoder(self.to_float(frames).to(self.latent_mean.device))
        mean, std = self._stats(z)
        return (z - mean) / std

    def decode(self, latents: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """normalised latents (B, C, h, w) -> float images (B, 3, H, W) in about [-1, 1]. `prev`: the
        frames shown before these as float images (B, 3, H, W) -- needed by a P-frame decoder, unused
        by one without."""
        mean, std = self._stats(latents)
        return self.decoder(latents * std + mean, prev)

    def decode_uint8(self, latents: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """normalised latents (B, C, h, w) -> uint8 frames (B, H, W, 3); `prev`: the uint8 frames
        (B, H, W, 3) shown before them (a P-frame decoder's reference)."""
        return self.to_uint8(self.decode(latents, self._prev_float(prev)))

    def decode_sequence(self, latents: torch.Tensor, first_prev: torch.Tensor | None = None) -> torch.Tensor:
        """normalised latents (B, F, C, h, w) of consecutive frames -> uint8 (B, F, H, W, 3), each frame
        decoded against the one decoded before it (the first against `first_prev`, uint8 (B, H, W, 3):
        the frame shown before the sequence), as the engine shows them."""
        out, prev = [], first_prev
        for j in range(latents.shape[1]):
            prev = self.decode_uint8(latents[:, j], prev)
            out.append(prev)
        return torch.stack(out, 1)

    def _prev_float(self, prev: torch.Tensor | None) -> torch.Tensor | None:
        if prev is None or self.decoder.p_frame is None:
            return None
        return self.to_float(prev).to(self.latent_mean.device)

    def reconstruct_noisy(self, frames: torch.Tensor, generator: torch.Generator | None = None,
                          prev: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The training pass: uint8 frames (B, H, W, 3) -> (x, recon, warped), the frames as floats
        (B, 3, H, W) in [-1, 1] and their reconstruction through latents with noise added, so that the
        decoder also renders slightly-off latents (what the diffusion model produces) cleanly. `prev`:
        the float images (B, 3, H, W) shown before (a P-frame decoder's reference; gradients flow
        through it), `warped`: prev moved by the decoder's motion estimate (None without p_frame)."""
        x = self.to_float(frames).to(self.latent_mean.device)
        z = self.encoder(x)
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype,
                            device=generator.device if generator is not None else z.device).to(z.device)
        z = z + self.cfg.latent_noise * z.detach().std(dim=(0, 2, 3), keepdim=True) * noise
        return (x, *self.decoder.forward_parts(z, prev))

    @torch.no_grad()
    def calibrate(self, frames, batch_size: int = 256) -> None:
        """Measure per-channel latent mean and std over uint8 frames (B, H, W, 3) -- a tensor, or an
        iterable of such batches -- encoded `batch_size` at a time (sums in float64), and store them
        in `latent_mean` / `latent_std`, so that `encode` gives roughly zero-mean unit-variance latents."""
        batches = frames.split(batch_size) if isinstance(frames, torch.Tensor) else frames
        n, s1, s2 = 0, 0.0, 0.0
        for batch in batches:
            z = self.encoder(self.to_float(batch).to(self.latent_mean.device)).double()
            n += z.shape[0] * z.shape[2] * z.shape[3]
            s1 = s1 + z.sum(dim=(0, 2, 3))
            s2 = s2 + z.pow(2).sum(dim=(0, 2, 3))
        if n < 2:
            raise ValueError("calibrate needs at least one frame")
        mean = s1 / n
        var = (s2 - n * mean.pow(2)) / (n - 1)
        self.latent_mean.copy_(mean.float())
        self.latent_std.copy_(var.clamp_min(0).sqrt().float().clamp_min(1e-4))

    @torch.no_grad()
    def reconstruct(self, frames: torch.Tensor, prev: torch.Tensor | None = None) -> torch.Tensor:
        """uint8 frames (B, H, W, 3) -> their uint8 reconstructions through the latent grid (a P-frame
        decoder against `prev`, uint8 (B, H, W, 3): the real frames before them)."""
        return self.decode_uint8(self.encode(frames), prev)


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(recon, x) + F.mse_loss(recon, x)


MOTION_LOSS_POOLS = (8, 2)  # the motion loss compares these average-pooled versions of the images


def motion_loss(warped: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """A P-frame decoder's training signal for its motion estimate: the previous frame warped by it
    against the frame itself (B, 3, H, W), L1 on average-pooled versions (smooth images give the flow
    a gradient over many pixels, not only at edges one pixel away)."""
    return sum(F.l1_loss(F.avg_pool2d(warped, k), F.avg_pool2d(x, k)) for k in MOTION_LOSS_POOLS) / len(MOTION_LOSS_POOLS)


class PatchDiscriminator(nn.Module):
    """Training only (never shipped): a PatchGAN critic (pix2pix) that scores every ~30-pixel patch
    of a frame (B, 3, H, W) in [-1, 1] as real or reconstructed, logits (B, 1, H/8, W/8). Trained with
    the hinge loss against the autoencoder (`train autoencoder --adv-weight`), it pushes the decoder
    to draw texture rather than the blurred average that L1 + MSE alone settle on."""

    def __init__(self, channels: tuple[int, ...] = (32, 64, 128)):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(3, channels[0], 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        for c_in, c_out in zip(channels, channels[1:]):
            layers += [nn.Conv2d(c_in, c_out, 4, stride=2, padding=1), nn.GroupNorm(8, c_out), nn.LeakyReLU(0.2)]
        layers += [nn.Conv2d(channels[-1], 1, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)
