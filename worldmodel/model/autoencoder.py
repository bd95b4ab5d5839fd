"""Frame autoencoder: uint8 frames (B, H, W, 3) <-> a small latent grid (B, C, H/16, W/16).

The transformer works on these latents; the decoder runs once per displayed frame, so it is kept
cheap enough for the CPU frame budget (ResBlocks only at low resolution, thin convs at high).
Latents are normalised per channel (`latent_mean`, `latent_std`, measured after training) so that
the diffusion model sees roughly unit-variance inputs.
"""
from __future__ import annotations

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

    def forward(self, z):  # (B, C, h, w) -> (B, 3, H, W), roughly in [-1, 1]
        return self.out(self.body(self.stem(z)))


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

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents (B, C, h, w) -> float images (B, 3, H, W) in about [-1, 1]."""
        mean, std = self._stats(latents)
        return self.decoder(latents * std + mean)

    def decode_uint8(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents (B, C, h, w) -> uint8 frames (B, H, W, 3)."""
        return self.to_uint8(self.decode(latents))

    def reconstruct_noisy(self, frames: torch.Tensor, generator: torch.Generator | None = None
                          ) -> tuple[torch.Tensor, torch.Tensor]:
        """The training pass: uint8 frames (B, H, W, 3) -> (x, recon), the frames as floats (B, 3, H, W)
        in [-1, 1] and their reconstruction through latents with noise added, so that the decoder also
        renders slightly-off latents (what the diffusion model produces) cleanly."""
        x = self.to_float(frames).to(self.latent_mean.device)
        z = self.encoder(x)
        noise = torch.randn(z.shape, generator=generator, dtype=z.dtype,
                            device=generator.device if generator is not None else z.device).to(z.device)
        z = z + self.cfg.latent_noise * z.detach().std(dim=(0, 2, 3), keepdim=True) * noise
        return x, self.decoder(z)

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
    def reconstruct(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 frames (B, H, W, 3) -> their uint8 reconstructions through the latent grid."""
        return self.decode_uint8(self.encode(frames))


def reconstruction_loss(recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return F.l1_loss(recon, x) + F.mse_loss(recon, x)


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
