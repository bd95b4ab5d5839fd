"""`WorldModel`: the public API of the engine (docs/architecture.md). The autoencoder and the transformer
together, a sampler over a static KV cache, uint8 frames in and out.

    wm = WorldModel.from_pretrained("checkpoints/doom-tiny")   # device="auto": cuda, then mps, then cpu
    wm.reset(frames, actions)       # uint8 (N, H, W, 3), N actions: actions[i] produced frames[i]
    frame = wm.step(Action(move=1)) # uint8 (H, W, 3)
    wm.steps, wm.speculative, wm.attention, wm.seed, wm.compile = 2, 4, "sdpa", 0, False  # settable

A frame is two stages: `step_latent(action)` (the transformer's passes: denoise and commit) and
`decode(latent)` (the autoencoder's decoder, to uint8 pixels); `step` is both. The next frame's
stage 1 needs the KV cache, not the pixels, so on a CPU with two or more cores the engine runs
stage 2 of frame t on another core while stage 1 of frame t+1 runs (`pipeline`, worldmodel/inference/pipeline.py;
`worldmodel play` and `worldmodel bench` use it), each stage with `threads` intra-op threads (auto:
half the cores, so the two stages never fight over a core; one each on 2 cores).

Precision (`dtype`, auto): bfloat16 on CUDA and on CPUs with native bf16 arithmetic (AVX512-BF16 or
AMX: oneDNN's bf16 matmuls there are ~2.4x its float32 ones), float32 elsewhere (without those
instructions bf16 is emulated and several times slower).

Speculative next-frame sampling (NFD), `speculative = N > 1`: while an action is held (the action
just received matches the previous one), a frame that has to be generated comes with N - 1 *drafts*:
N frames in one batched pass per denoising step (block-causal among them), all assuming the action
stays held. The first is served now. (Right after the action changed, only that one frame is made.)
When the next action arrives and matches the first draft's assumed action (`speculative_match`: equal
move, strafe, attack and use, and a turn within `speculative_tolerance` degrees), that draft is served
at once with no model pass (only decoding); otherwise all drafts are discarded and a new batch is
generated. Drafts never enter the KV cache: a served frame is committed by the next pass, so a
discarded draft leaves the cache exactly as it was ("rolled back" for free). A served draft is
committed with the action it assumed (the one its frame depicts, and the one the drafts after it
were conditioned on). `stats` counts frames, drafted, accepted and discarded drafts.

The per-frame work is static-shaped and free of host syncs (no .item(), no branching on tensor
values; counter-based noise; the cache's bookkeeping is tensors): the one sync is copying the frame
to the host. `compile=True` wraps the cached pass and the decoder in torch.compile (mode
"reduce-overhead", CUDA graphs, on CUDA); `compile="inductor"` compiles without CUDA graphs and
`compile="graphs"` replays the traced passes as CUDA graphs without inductor's code generation (CUDA
only; seconds to compile instead of minutes). On CPU compiling is slower than eager here (inductor's
GEMMs vs oneDNN) and is off by default.
"""
from __future__ import annotations

import copy
import math
import numbers
from collections import deque
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from worldmodel import device as devices
from worldmodel import kernels
from worldmodel.game.action import ACTION_DIM, Action, decode_actions, encode_actions
from worldmodel.model.autoencoder import Autoencoder
from worldmodel.model.checkpoint import CheckpointError, load_pretrained, save_pretrained
from worldmodel.model.transformer import KVCache, ModelConfig, WorldTransformer, pack_linears, preset
from worldmodel.inference.sampler import FrameSampler

# `WorldModel.compile` settings: "off" (eager); "on" (inductor, with CUDA graphs on CUDA: torch.compile
# mode "reduce-overhead"); "inductor" (inductor, no CUDA graphs); "graphs" (CUDA graphs of the traced
# passes, no inductor code generation: dynamo's "cudagraphs" backend; CUDA only)
COMPILE_MODES = ("off", "on", "inductor", "graphs")
DEFAULT_TOLERANCE = 0.5  # degrees of turn: < 1 pixel of yaw at the tiny tier's 128 px width (~90 deg FOV)


def compile_options(mode: str, device: torch.device) -> dict:
    """torch.compile keyword arguments of a COMPILE_MODES mode other than "off" on `device`."""
    if mode == "on":
        return {"mode": "reduce-overhead"} if device.type == "cuda" else {}
    if mode == "inductor":
        return {}
    if mode == "graphs":
        if device.type != "cuda":
            raise ValueError(f"compile='graphs' replays CUDA graphs: it needs a CUDA device, not {device.type}")
        return {"backend": "cudagraphs"}
    raise ValueError(f"no torch.compile options for compile mode {mode!r}")


def speculative_match(assumed: Action, real: Action, tolerance: float = DEFAULT_TOLERANCE) -> bool:
    """Does a draft made assuming `assumed` stand for the frame of `real`? Keys and buttons must be
    equal; the turn (a mouse, continuous) may differ by up to `tolerance` degrees."""
    return (assumed.move == real.move and assumed.strafe == real.strafe and assumed.attack == real.attack
            and assumed.use == real.use and abs(assumed.turn - real.turn) <= tolerance + 1e-9)


def load_start_clips(folder: str | Path, frame_size: tuple[int, int] | None = None) -> list[tuple[np.ndarray, list[Action]]]:
    """Start clips shipped in a checkpoint folder: `start_clips/*.npz` (sorted by name), each with
    `frames` uint8 (N, H, W, 3) and `actions` float32 (N, 5) (the model's action encoding; actions[i]
    produced frames[i]). Loaded with allow_pickle=False. Returns [(frames, [Action] * N), ...]; an
    empty list when the folder has none. A malformed file raises CheckpointError naming it."""
    out = []
    for p in sorted(Path(folder, "start_clips").glob("*.npz")):
        try:
            with np.load(p, allow_pickle=False) as z:
                frames, actions = np.asarray(z["frames"]), np.asarray(z["actions"])
        except KeyError as e:
            raise CheckpointError(f"{p}: start clip without {e} (needs 'frames' and 'actions')") from None
        except (OSError, ValueError) as e:
            raise CheckpointError(f"{p}: unreadable start clip ({e})") from None
        if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3 or len(frames) < 1:
            raise CheckpointError(f"{p}: frames must be uint8 (N, H, W, 3), got {frames.dtype} {frames.shape}")
        if frame_size is not None and tuple(frames.shape[1:3]) != tuple(frame_size):
            raise CheckpointError(f"{p}: frames are {frames.shape[1]}x{frames.shape[2]}, the model wants "
                                  f"{frame_size[0]}x{frame_size[1]}")
        if actions.shape != (len(frames), ACTION_DIM) or not np.issubdtype(actions.dtype, np.floating):
            raise CheckpointError(f"{p}: actions must be float32 ({len(frames)}, {ACTION_DIM}), got "
                                  f"{actions.dtype} {actions.shape}")
        try:
            acts = decode_actions(torch.from_numpy(actions.astype(np.float32)))
        except ValueError as e:
            raise CheckpointError(f"{p}: bad action ({e})") from None
        out.append((np.ascontiguousarray(frames), acts))
    return out


class _CachedPass(nn.Module):
    """The transformer's cached pass bound to its cache: one module owning both, so torch.compile sees
    the cache as module buffers (static addresses, in-place updates: CUDA-graph friendly)."""

    def __init__(self, transformer: WorldTransformer, cache: KVCache):
        super().__init__()
        self.transformer, self.cache = transformer, cache

    def forward(self, x, t, actions, commit: int):
        return self.transformer.forward_cached(x, t, actions, self.cache, commit=commit)


class WorldModel:
    """The engine. Settings (keyword arguments, and attributes settable at any time): `steps`
    (denoising steps a frame), `speculative` (N frames per pass, 1 = off), `speculative_tolerance`
    (degrees of turn a draft may be off), `attention` (kernels backend), `seed`, `compile`
    (torch.compile the per-frame passes: True = "on", i.e. inductor + CUDA graphs on CUDA; or one of
    COMPILE_MODES), `threads` (CPU: torch's intra-op threads, process-wide; "auto": half the cores, at
    least 1), `pipeline` (decode frame t on another thread while frame t+1 is generated, for the callers
    that run a FramePipeline; "auto": on a CPU with 2+ cores).
    Construction-only: `device` ("auto": cuda, mps, cpu), `dtype` ("auto": bfloat16 on CUDA and on CPUs
    with native bf16, else float32), `fused` (commit each frame in the next frame's first pass; False =
    a separate pass)."""

    def __init__(self, cfg: ModelConfig, autoencoder: Autoencoder, transformer: WorldTransformer, *,
                 device="auto", dtype="auto", steps: int | None = None, speculative: int = 1,
                 speculative_tolerance: float = DEFAULT_TOLERANCE, attention: str | None = None,
                 seed: int = 0, compile: bool | str = False, fused: bool = True, threads: int | str = "auto",
                 pipeline: bool | str = "auto", name: str = "", info: dict | None = None,
                 folder: Path | None = None):
        self.cfg, self.name, self.info, self.folder = cfg, name, dict(info or {}), folder
        self.device = devices.resolve_device(device)
        self.dtype = devices.resolve_dtype(dtype, self.device)
        self.autoencoder = autoencoder.to(self.device).eval()  # float32: small, and its input is float32
        if self.device.type == "cpu":  # oneDNN convs are ~2x faster in channels_last here
            self.autoencoder.to(memory_format=torch.channels_last)
        # a low-precision copy of the decoder for low-precision engines (bf16 convs: ~1.7x faster on
        # AVX512-BF16 CPUs, within ~1 level of uint8); the autoencoder itself stays float32
        self._decoder = (self.autoencoder.decoder if self.dtype in (torch.float32, torch.float64)
                         else copy.deepcopy(self.autoencoder.decoder).to(self.dtype))
        self.transformer = transformer.to(self.device, self.dtype).eval()
        for p in (*self.autoencoder.parameters(), *self.transformer.parameters()):
            p.requires_grad_(False)
        if self.device.type == "cpu":
            pack_linears(self.transformer)
        self.sampler = FrameSampler(self.transformer, cfg, steps or cfg.sample_steps, seed=seed, fused=fused)
        self._pass = _CachedPass(self.transformer, self.sampler.cache)
        self._decode = self._decode_eager
        self.attention = attention or ("triton" if self.device.type == "cuda" and
                                       "triton" in kernels.available_backends(self.device) else "sdpa")
        self._drafts: deque = deque()  # (latent (1, 1, C, h, w), assumed Action) waiting to be served
        self._last_action: Action | None = None
        self._ready = False
        self.speculative = speculative
        self.speculative_tolerance = speculative_tolerance
        self._compile_mode = "off"
        self.compile = compile
        self.threads = threads
        self.pipeline = pipeline
        self.reset_stats()

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, device="auto", seed: int = 0, **settings) -> "WorldModel":
        """Random weights in a preset's shape (tests, engine benchmarks). The weights are drawn with
        `seed` (the sampler's seed too); `cfg_overrides={...}` changes config fields (tests)."""
        cfg = preset(name)
        overrides = settings.pop("cfg_overrides", None)
        if overrides:
            cfg = ModelConfig.from_dict({**cfg.to_dict(), **overrides})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            ae, dit = Autoencoder(cfg.autoencoder), WorldTransformer(cfg)
        return cls(cfg, ae, dit, device=device, seed=seed, name=f"{name} (random weights)", **settings)

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device="auto", **settings) -> "WorldModel":
        """A checkpoint folder or a Hub id (`user/name[@revision]`). Settings as keyword arguments:
        steps (default: the config's sample_steps; a distilled student's is its step count), speculative,
        speculative_tolerance, attention, seed, compile, dtype, fused."""
        cfg, ae, dit, config, folder = load_pretrained(path_or_id, device="cpu")
        return cls(cfg, ae, dit, device=device, name=Path(str(path_or_id)).name, info=config.get("info"),
                   folder=folder, **settings)

    def save_pretrained(self, directory: str | Path, info: dict | None = None) -> Path:
        """Write a checkpoint folder (weights in float32, whatever the engine's dtype)."""
        dit = self.transformer if self.dtype == torch.float32 else copy.deepcopy(self.transformer).float()
        return save_pretrained(directory, self.cfg, self.autoencoder, dit, info or self.info)

    def start_clips(self) -> list[tuple[np.ndarray, list[Action]]]:
        """The start clips shipped with the checkpoint (empty for a preset)."""
        return load_start_clips(self.folder, self.frame_size) if self.folder is not None else []

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
        if isinstance(s, bool) or not isinstance(s, (int, np.integer)):
            raise ValueError(f"seed must be an integer, got {s!r}")
        self._discard_drafts()
        self.sampler.reseed(int(s))

    @property
    def attention(self) -> str:
        return self.transformer.attention

    @attention.setter
    def attention(self, backend: str) -> None:
        try:
            kernels.check_backend(backend, self.device)
        except RuntimeError as e:  # one line saying why this device cannot run it: a bad setting, not a crash
            raise ValueError(str(e)) from None
        self.transformer.attention = backend

    @property
    def speculative(self) -> int:
        return self._speculative

    @speculative.setter
    def speculative(self, n: int) -> None:
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or not 1 <= n <= self.cfg.max_draft:
            raise ValueError(f"speculative must be an integer in 1..{self.cfg.max_draft} (1 = off), got {n!r}")
        self._speculative = int(n)
        self._discard_drafts()

    @property
    def speculative_tolerance(self) -> float:
        return self._tolerance

    @speculative_tolerance.setter
    def speculative_tolerance(self, deg: float) -> None:
        if isinstance(deg, bool) or not isinstance(deg, numbers.Real) or not math.isfinite(deg) or deg < 0:
            raise ValueError(f"speculative_tolerance must be a finite number of degrees >= 0, got {deg!r}")
        self._tolerance = float(deg)

    @property
    def threads(self) -> int | None:
        """torch's intra-op threads on CPU (None on other devices)."""
        return torch.get_num_threads() if self.device.type == "cpu" else None

    @threads.setter
    def threads(self, n: int | str) -> None:
        if n in (None, "auto"):
            n = max(1, devices.cpu_cores() // 2)
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise ValueError(f"threads must be a positive integer or 'auto', got {n!r}")
        if self.device.type == "cpu":
            torch.set_num_threads(int(n))

    @property
    def pipeline(self) -> bool:
        return self._pipeline

    @pipeline.setter
    def pipeline(self, on: bool | str) -> None:
        if on in (None, "auto"):
            on = self.device.type == "cpu" and devices.cpu_cores() >= 2
        if not isinstance(on, (bool, np.bool_)):
            raise ValueError(f"pipeline must be True, False or 'auto', got {on!r}")
        self._pipeline = bool(on)

    @property
    def compile(self) -> bool | str:
        """False (off), True (on), or the mode's name: "inductor" or "graphs" (see COMPILE_MODES)."""
        return {"off": False, "on": True}.get(self._compile_mode, self._compile_mode)

    @compile.setter
    def compile(self, mode: bool | str) -> None:
        """torch.compile the cached pass and the decoder, in one of COMPILE_MODES (True = "on", False =
        "off"). Each (frames, commit) shape compiles once, on first use."""
        mode = ("on" if mode else "off") if isinstance(mode, (bool, np.bool_)) else mode
        if mode not in COMPILE_MODES:
            raise ValueError(f"compile must be True, False or one of {', '.join(COMPILE_MODES)}, got {mode!r}")
        if mode == self._compile_mode:
            return
        if mode == "off":
            self.sampler.forward = self.transformer.forward_cached
            self._decode = self._decode_eager
        else:
            kwargs = compile_options(mode, self.device)
            compiled = torch.compile(self._pass, dynamic=False, **kwargs)
            cache = self.sampler.cache

            def forward(x, t, actions, c, commit=0):
                assert c is cache, "the compiled pass is bound to the sampler's cache"
                return compiled(x, t, actions, commit)

            self.sampler.forward = forward
            self._decode = torch.compile(self._decode_eager, dynamic=False, **kwargs)
        self._compile_mode = mode

    # -- statistics --------------------------------------------------------------------------------
    @property
    def stats(self) -> dict:
        """frames served; drafted (speculative frames generated beyond the one asked for), accepted
        (drafts served), discarded (drafts thrown away), acceptance_rate = accepted / (accepted +
        discarded) (None before any draft is resolved); pending_drafts (still waiting)."""
        s = dict(self._stats)
        resolved = s["accepted"] + s["discarded"]
        s["acceptance_rate"] = s["accepted"] / resolved if resolved else None
        s["pending_drafts"] = len(self._drafts)
        return s

    def reset_stats(self) -> None:
        self._stats = {"frames": 0, "drafted": 0, "accepted": 0, "discarded": 0}

    def _discard_drafts(self) -> None:
        if getattr(self, "_drafts", None):
            self._stats["discarded"] += len(self._drafts)
            self._drafts.clear()

    # -- the game ------------------------------------------------------------------------------------
    def _check_frames(self, frames) -> torch.Tensor:
        if isinstance(frames, np.ndarray):
            if frames.dtype != np.uint8:
                raise ValueError(f"frames must be uint8, got {frames.dtype}")
            frames = torch.from_numpy(np.ascontiguousarray(frames))
        if not isinstance(frames, torch.Tensor):
            raise ValueError(f"frames must be a uint8 array (N, H, W, 3), got {type(frames).__name__}")
        H, W = self.frame_size
        if frames.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8, got {frames.dtype}")
        if frames.ndim == 3:
            raise ValueError(f"frames must be a batch (N, {H}, {W}, 3); got a single frame {tuple(frames.shape)} "
                             f"(use frames[None])")
        if frames.ndim != 4 or tuple(frames.shape[1:]) != (H, W, 3) or frames.shape[0] < 1:
            raise ValueError(f"frames must have shape (N, {H}, {W}, 3) with N >= 1 for this model, "
                             f"got {tuple(frames.shape)}")
        return frames

    @torch.inference_mode()
    def reset(self, frames, actions: list[Action]) -> None:
        """Seed the context with real frames uint8 (N, H, W, 3) and the N actions that produced them
        (the first `sink_frames` and the last `window_frames` are kept: only they are encoded). Drafts are
        dropped."""
        frames = self._check_frames(frames)
        actions = list(actions)
        if len(actions) != frames.shape[0] or not all(isinstance(a, Action) for a in actions):
            raise ValueError(f"reset needs one Action per frame: got {frames.shape[0]} frames and "
                             f"{len(actions)} actions" + ("" if all(isinstance(a, Action) for a in actions)
                                                         else " (not all of them Action)"))
        self._discard_drafts()
        self._last_action = actions[-1]
        keep = self.sampler.context_frames(len(actions))  # only the frames the cache keeps are encoded
        latents = self.encode(frames[keep])[None]  # (1, n, C, h, w)
        self.sampler.reset(latents, encode_actions([actions[i] for i in keep])[None])
        self._ready = True

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> latents (N, C, h, w), in chunks (no grad)."""
        with torch.inference_mode():
            return torch.cat([self.autoencoder.encode(f.to(self.device)).to(self.dtype)
                              for f in frames.split(64)], dim=0)

    def _decode_eager(self, latent: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w) -> uint8 (B, H, W, 3): Autoencoder.decode_uint8 with the engine's decoder."""
        ae = self.autoencoder
        z = latent.float() * ae.latent_std.view(1, -1, 1, 1) + ae.latent_mean.view(1, -1, 1, 1)
        p = next(self._decoder.parameters())
        z = z.to(p.dtype)
        if self.device.type == "cpu":
            z = z.contiguous(memory_format=torch.channels_last)
        return ae.to_uint8(self._decoder(z).float())

    @torch.inference_mode()
    def step(self, action: Action) -> np.ndarray:
        """Generate the next frame for `action`: uint8 (H, W, 3). The same as
        `decode(step_latent(action))`."""
        return self.decode(self.step_latent(action))

    @torch.inference_mode()
    def step_latent(self, action: Action) -> torch.Tensor:
        """Stage 1 of `step`: the next frame's latent (1, C, h, w) for `action` (its own tensor: it may
        be decoded on another thread while the next frame is generated)."""
        if not self._ready:
            raise RuntimeError("WorldModel.step() called before reset(frames, actions): seed the context first")
        if not isinstance(action, Action):
            raise ValueError(f"step needs an Action, got {type(action).__name__}")
        if self._compile_mode != "off" and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # a new frame: CUDA-graph outputs of the last one are dead
        if self._drafts and speculative_match(self._drafts[0][1], action, self._tolerance):
            latent, assumed = self._drafts.popleft()  # served at once: no model pass
            self.sampler.accept(latent, assumed.to_tensor().to(self.device).view(1, 1, -1))
            self._stats["accepted"] += 1
        else:
            self._discard_drafts()
            # draft only while the action is held (it matches the previous one): right after a change the
            # player is likely still changing it (doubles the acceptance rate on human-like traces)
            held = self._last_action is not None and speculative_match(self._last_action, action, self._tolerance)
            n = self._speculative if held else 1
            a = action.to_tensor().to(self.device).view(1, 1, -1).expand(1, n, -1)
            latents = self.sampler.generate(a)  # 1. denoise (committing what is pending in its first pass)
            latent = latents[:, :1]
            self.sampler.accept(latent, a[:, :1])  # 2. commit: by the next pass
            self._drafts.extend((latents[:, i:i + 1], action) for i in range(1, n))
            self._stats["drafted"] += n - 1
        self._last_action = action
        self._stats["frames"] += 1
        return latent[:, 0].clone()

    @torch.inference_mode()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        """Stage 2 of `step`: a latent (1, C, h, w) from `step_latent` -> uint8 (H, W, 3) on the host."""
        return self._decode(latent)[0].cpu().numpy()  # 3. decode
