"""`WorldModel`: the public API of the engine (DESIGN.md). The autoencoder and the transformer
together, a sampler over a static KV cache, uint8 frames in and out.

    wm = WorldModel.from_pretrained("checkpoints/doom-tiny")
    wm.reset(frames, actions)      # uint8 (N, H, W, 3), N actions: actions[i] produced frames[i]
    frame = wm.step(Action(move=1)) # uint8 (H, W, 3)
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

import kernels
from worldmodel.action import Action, encode_actions
from worldmodel.autoencoder import Autoencoder
from worldmodel.checkpoint import load_pretrained, save_pretrained
from worldmodel.model import ModelConfig, WorldTransformer, preset
from worldmodel.sampler import FrameSampler


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    if str(device) != "auto":
        d = torch.device(device)
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available")
        return d
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


class WorldModel:
    def __init__(self, cfg: ModelConfig, autoencoder: Autoencoder, transformer: WorldTransformer, *,
                 device="auto", steps: int | None = None, speculative: int = 1, attention: str | None = None,
                 seed: int = 0, name: str = "", info: dict | None = None, folder: Path | None = None):
        self.cfg, self.name, self.info, self.folder = cfg, name, info or {}, folder
        self.device = resolve_device(device)
        self.autoencoder = autoencoder.to(self.device).eval()
        self.transformer = transformer.to(self.device).eval()
        self.sampler = FrameSampler(self.transformer, cfg, steps or cfg.sample_steps, seed=seed)
        self.attention = attention or ("triton" if self.device.type == "cuda" and
                                       "triton" in kernels.available_backends(self.device) else "sdpa")
        self.speculative = speculative
        self._ready = False

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, device="auto", seed: int = 0, **settings) -> "WorldModel":
        """Random weights in a preset's shape (tests, engine benchmarks)."""
        cfg = preset(name)
        torch.manual_seed(seed)
        return cls(cfg, Autoencoder(cfg.autoencoder), WorldTransformer(cfg), device=device, seed=seed,
                   name=f"{name} (random weights)", **settings)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device="auto", **settings) -> "WorldModel":
        cfg, ae, dit, config, folder = load_pretrained(path_or_id, device="cpu")
        return cls(cfg, ae, dit, device=device, name=Path(str(path_or_id)).name, info=config.get("info"),
                   folder=folder, **settings)

    def save_pretrained(self, directory: str | Path, info: dict | None = None) -> Path:
        return save_pretrained(directory, self.cfg, self.autoencoder, self.transformer, info or self.info)

    # -- settings ----------------------------------------------------------------------------------
    @property
    def frame_size(self) -> tuple[int, int]:
        return self.cfg.frame_size

    @property
    def fps(self) -> int:
        return self.cfg.fps

    @property
    def steps(self) -> int:
        return self.sampler.steps

    @steps.setter
    def steps(self, n: int) -> None:
        self.sampler.steps = n

    @property
    def seed(self) -> int:
        return self.sampler.seed

    @seed.setter
    def seed(self, s: int) -> None:
        self.sampler.reseed(int(s))

    @property
    def attention(self) -> str:
        return self.transformer.attention

    @attention.setter
    def attention(self, backend: str) -> None:
        kernels.check_backend(backend, self.device)
        self.transformer.attention = backend

    @property
    def speculative(self) -> int:
        return self._speculative

    @speculative.setter
    def speculative(self, n: int) -> None:
        if not isinstance(n, int) or not 1 <= n <= self.cfg.max_draft:
            raise ValueError(f"speculative must be an integer in 1..{self.cfg.max_draft} (1 = off), got {n!r}")
        self._speculative = n

    # -- the game ------------------------------------------------------------------------------------
    def _check_frames(self, frames) -> torch.Tensor:
        if isinstance(frames, np.ndarray):
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        if not isinstance(frames, torch.Tensor):
            raise ValueError(f"frames must be a uint8 array (N, H, W, 3), got {type(frames).__name__}")
        H, W = self.frame_size
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8, got {frames.dtype}")
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (H, W, 3) or frames.shape[0] < 1:
            raise ValueError(f"frames must have shape (N, {H}, {W}, 3) with N >= 1 for this model, "
                             f"got {tuple(frames.shape)}")
        return frames

    @torch.inference_mode()
    def reset(self, frames, actions: list[Action]) -> None:
        """Seed the context with real frames uint8 (N, H, W, 3) and the N actions that produced them."""
        frames = self._check_frames(frames)
        if len(actions) != frames.shape[0] or not all(isinstance(a, Action) for a in actions):
            raise ValueError(f"reset needs one Action per frame: got {frames.shape[0]} frames and "
                             f"{len(actions)} actions")
        latents = self.autoencoder.encode(frames.to(self.device))[None]  # (1, N, C, h, w)
        self.sampler.reset(latents, encode_actions(actions)[None])
        self._ready = True

    @torch.inference_mode()
    def step(self, action: Action) -> np.ndarray:
        """Generate the next frame for `action`: uint8 (H, W, 3)."""
        if not self._ready:
            raise RuntimeError("WorldModel.step() called before reset(frames, actions)")
        if not isinstance(action, Action):
            raise ValueError(f"step needs an Action, got {type(action).__name__}")
        a = action.to_tensor().to(self.device).view(1, 1, -1)
        latent = self.sampler.next(a)  # (1, 1, C, h, w)
        return self.autoencoder.decode_uint8(latent[:, 0])[0].cpu().numpy()  # 3. decode
