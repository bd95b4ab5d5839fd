"""`WorldModel`: the public API of the engine (docs/architecture.md). The autoencoder and the transformer
together, a sampler over a static KV cache, uint8 frames in and out.

    wm = WorldModel.from_pretrained("checkpoints/doom-tiny")   # device="auto": cuda, then mps, then cpu
    wm.reset(frames, actions)       # uint8 (N, H, W, 3), N actions: actions[i] produced frames[i]
    frame = wm.step(Action(move=1)) # uint8 (H, W, 3)
    wm.configure(steps=2, speculative=4)  # between frames; wm.steps = 2 is the same

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
to the host. `compile=True` wraps the cached pass (the transformer with its KV cache, one module: see
FrameSampler.compile) and the decoder in torch.compile (mode
"reduce-overhead", CUDA graphs, on CUDA); `compile="inductor"` compiles without CUDA graphs and
`compile="graphs"` replays the traced passes as CUDA graphs without inductor's code generation (CUDA
only; seconds to compile instead of minutes). On a CPU the compile freezes the weights into the graph
(`freeze_weights_when_compiling`) and pays where bf16 is native (about 1.3x the frames/s of eager on a
2-core AVX512-BF16 EPYC, benchmarks/speed_doom-tiny_cpu_bf16.json), after 40-50 s of compiling before
the first frames and again for each new shape (a speculative batch): off by default.
"""
from __future__ import annotations

import copy
import dataclasses
from collections import deque
from pathlib import Path

import numpy as np
import torch

from worldmodel import device as devices
from worldmodel import kernels
from worldmodel.game.action import ACTION_DIM, Action, decode_actions, encode_actions
from worldmodel.model.autoencoder import Autoencoder
from worldmodel.model.checkpoint import CheckpointError, load_pretrained, sampling_defaults, save_pretrained
from worldmodel.model.linear import pack_linears
from worldmodel.model.transformer import ModelConfig, WorldTransformer, preset
from worldmodel.model.sampler import FrameSampler, SamplingDefaults
from worldmodel.inference.settings import AUTO, DEFAULT_TOLERANCE, SETTINGS, EngineSettings


def compile_options(mode: str, device: torch.device) -> dict:
    """torch.compile keyword arguments of a compile mode (settings.COMPILE_MODES) other than "off" on `device`."""
    if mode == "on":
        return {"mode": "reduce-overhead"} if device.type == "cuda" else {}
    if mode == "inductor":
        return {}
    if mode == "graphs":
        if device.type != "cuda":
            raise ValueError(f"compile='graphs' replays CUDA graphs: it needs a CUDA device, not {device.type}")
        return {"backend": "cudagraphs"}
    raise ValueError(f"no torch.compile options for compile mode {mode!r}")


def freeze_weights_when_compiling() -> None:
    """Have inductor fold the weights into what it compiles under no_grad (its `freezing` config), which
    lets it pack them for oneDNN once: on a CPU the compiled per-frame step took 12.6 ms instead of 15.8
    (17.4 eager) here. Process-wide (inductor reads its config when it compiles; passing it as
    torch.compile's `options` reached only part of the work): fine for the engine, which never changes its
    weights, and compiles for training (with gradients) are not affected."""
    import torch._inductor.config as inductor_config

    inductor_config.freezing = True


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


def _setting(name: str) -> property:
    """`wm.NAME`: the setting as the engine runs it; `wm.NAME = value` is `wm.configure(NAME=value)`."""
    return property(lambda self: getattr(self.settings, name), lambda self, value: self.configure(**{name: value}),
                    doc=f"the `{name}` setting (EngineSettings); setting it is configure({name}=...)")


class WorldModel:
    """The engine. Its settings are one EngineSettings (worldmodel/inference/settings.py: steps,
    context_noise, speculative, speculative_tolerance, attention, seed, compile, threads, pipeline,
    dtype), given at construction as keyword arguments (or `settings=`) and changed between frames by
    `configure(...)`; `settings` holds them as the engine runs them (resolved: no None, no "auto"), and
    each is an attribute too (`wm.steps`). Construction-only: `device` ("auto": cuda, mps, cpu),
    `dtype`, `fused` (commit each frame in the next frame's first pass; False = a separate pass),
    `sampling` (the model's SamplingDefaults: the steps and context noise when the settings name none,
    the schedule's shift)."""

    def __init__(self, cfg: ModelConfig, autoencoder: Autoencoder, transformer: WorldTransformer, *,
                 device="auto", settings: EngineSettings | None = None, fused: bool = True, name: str = "",
                 info: dict | None = None, folder: Path | None = None, sampling: SamplingDefaults | None = None,
                 **changes):
        settings = dataclasses.replace(settings or EngineSettings(), **changes)
        self.cfg, self.name, self.info, self.folder = cfg, name, dict(info or {}), folder
        self.sampling = sampling or SamplingDefaults()
        self.device = devices.resolve_device(device)
        self.dtype = devices.resolve_dtype(settings.dtype, self.device)
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
            devices.keep_freed_memory()
        self.sampler = FrameSampler(self.transformer, cfg, settings.steps or self.sampling.steps,
                                    shift=self.sampling.shift, seed=settings.seed, fused=fused)
        self._decode = self._decode_eager
        # the frame shown last, uint8 (1, H, W, 3): a P-frame decoder (cfg.ae_p_frame) decodes the next against it
        self._shown: torch.Tensor | None = None
        self._drafts: deque = deque()  # (latent (1, 1, C, h, w), assumed Action) waiting to be served
        self._last_action: Action | None = None
        self._ready = False
        self.settings: EngineSettings | None = None
        self.reset_stats()
        self.configure(settings)

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def from_preset(cls, name: str, device="auto", settings: EngineSettings | None = None, fused: bool = True,
                    cfg_overrides: dict | None = None, **changes) -> "WorldModel":
        """Random weights in a preset's shape (tests, engine benchmarks). The weights are drawn with the
        settings' `seed` (the sampler's seed too); `cfg_overrides={...}` changes config fields (tests)."""
        settings = dataclasses.replace(settings or EngineSettings(), **changes)
        cfg = preset(name)
        if cfg_overrides:
            cfg = ModelConfig.from_dict({**cfg.to_dict(), **cfg_overrides})
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(settings.seed)
            ae, dit = Autoencoder(cfg.autoencoder), WorldTransformer(cfg)
        return cls(cfg, ae, dit, device=device, settings=settings, fused=fused, name=f"{name} (random weights)")

    @classmethod
    def from_pretrained(cls, path_or_id: str | Path, device="auto", settings: EngineSettings | None = None,
                        fused: bool = True, **changes) -> "WorldModel":
        """A checkpoint folder or a Hub id (`user/name[@revision]`). Settings: `settings=` and/or keyword
        arguments (steps: default the checkpoint's; a distilled student's is its step count)."""
        cfg, ae, dit, config, folder = load_pretrained(path_or_id, device="cpu")
        return cls(cfg, ae, dit, device=device, settings=settings, fused=fused, name=Path(str(path_or_id)).name,
                   info=config.get("info"), folder=folder, sampling=sampling_defaults(config, folder), **changes)

    def save_pretrained(self, directory: str | Path, info: dict | None = None) -> Path:
        """Write a checkpoint folder (weights in float32, whatever the engine's dtype)."""
        dit = self.transformer if self.dtype == torch.float32 else copy.deepcopy(self.transformer).float()
        return save_pretrained(directory, self.cfg, self.autoencoder, dit, info or self.info, self.sampling)

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

    def configure(self, settings: EngineSettings | None = None, **changes) -> None:
        """Change settings, between frames: `configure(steps=2, speculative=4)`, or a whole EngineSettings
        (with changes on top). Every value is checked before any is applied (ValueError, one line:
        nothing changed): EngineSettings checks the values, this the engine's limits (speculative up to
        the model's max_draft, a backend the device can run, CUDA graphs on CUDA only; dtype is fixed at
        construction). Changing seed, speculative or context_noise drops the drafts not yet served."""
        named = set(SETTINGS) if settings is not None else set(changes)
        new = self._resolve(dataclasses.replace(settings or self.settings, **changes))
        old = self.settings
        if old is None or "steps" in named:
            self.sampler.steps = new.steps
        if old is None or "context_noise" in named:
            self.sampler.context_noise = new.context_noise
        if old is None or new.attention != old.attention:
            self.transformer.attention = new.attention
        if old is None or {"seed", "speculative", "context_noise"} & named:
            self._discard_drafts()
            self.sampler.reseed(new.seed)
        if (old.compile if old is not None else False) != new.compile:
            self._compile(new.compile)
        if (old is None or "threads" in named) and self.device.type == "cpu":
            torch.set_num_threads(new.threads)
        self.settings = new

    def _resolve(self, s: EngineSettings) -> EngineSettings:
        """`s` with its defaults resolved for this engine and its limits checked."""
        if not s.speculative <= self.cfg.max_draft:
            raise ValueError(f"speculative must be an integer in 1..{self.cfg.max_draft} (1 = off), got {s.speculative}")
        dtype = str(self.dtype).removeprefix("torch.")
        if s.dtype != AUTO and devices.resolve_dtype(s.dtype, self.device) != self.dtype:
            raise ValueError(f"dtype is set at construction (this engine runs {dtype}), got {s.dtype!r}")
        attention = s.attention or self._default_attention()
        try:
            kernels.check_backend(attention, self.device)
        except RuntimeError as e:  # one line saying why this device cannot run it: a bad setting, not a crash
            raise ValueError(str(e)) from None
        if s.compile not in (False, True):
            compile_options(s.compile, self.device)  # CUDA graphs without CUDA: ValueError
        return dataclasses.replace(
            s, steps=s.steps or self.sampling.steps, attention=attention, dtype=dtype,
            context_noise=next(t for t in (s.context_noise, self.sampling.context_noise, self.cfg.context_noise)
                               if t is not None),
            threads=max(1, devices.cpu_cores() // 2) if s.threads == AUTO else s.threads,
            pipeline=self.device.type == "cpu" and devices.cpu_cores() >= 2 if s.pipeline == AUTO else s.pipeline)

    def _default_attention(self) -> str:
        """The attention backend that measured fastest for this device and dtype: Triton on CUDA, on a
        CPU the two-GEMM `matmul` in low precision (sdpa's CPU kernel is about 2x slower at a frame's
        shapes there) and sdpa in float32 (where the two are even)."""
        if self.device.type == "cuda" and "triton" in kernels.available_backends(self.device):
            return "triton"
        if self.device.type == "cpu" and self.dtype in (torch.bfloat16, torch.float16):
            return "matmul"
        return "sdpa"

    def _compile(self, mode: bool | str) -> None:
        """torch.compile the cached pass and the decoder in `mode` (False: eager again)."""
        options = None if mode is False else compile_options("on" if mode is True else mode, self.device)
        if options is not None and self.device.type == "cpu":
            freeze_weights_when_compiling()
        self.sampler.compile(options)
        self._decode = (self._decode_eager if options is None
                        else torch.compile(self._decode_eager, dynamic=False, **options))

    steps = _setting("steps")
    context_noise = _setting("context_noise")
    speculative = _setting("speculative")
    speculative_tolerance = _setting("speculative_tolerance")
    attention = _setting("attention")
    seed = _setting("seed")
    compile = _setting("compile")
    pipeline = _setting("pipeline")

    @property
    def threads(self) -> int | None:
        """torch's intra-op threads on CPU (None on other devices); setting it is configure(threads=...)."""
        return torch.get_num_threads() if self.device.type == "cpu" else None

    @threads.setter
    def threads(self, n: int | str) -> None:
        self.configure(threads=n)

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
        if self._drafts:
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
        self._shown = frames[-1:].to(self.device)
        self._ready = True

    def encode(self, frames: torch.Tensor) -> torch.Tensor:
        """uint8 (N, H, W, 3) -> latents (N, C, h, w), in chunks (no grad)."""
        with torch.inference_mode():
            return torch.cat([self.autoencoder.encode(f.to(self.device)).to(self.dtype)
                              for f in frames.split(64)], dim=0)

    def _decode_eager(self, latent: torch.Tensor, shown: torch.Tensor) -> torch.Tensor:
        """latents (B, C, h, w), the frames shown before them uint8 (B, H, W, 3) -> uint8 (B, H, W, 3):
        Autoencoder.decode_uint8 with the engine's decoder."""
        ae = self.autoencoder
        z = latent.float() * ae.latent_std.view(1, -1, 1, 1) + ae.latent_mean.view(1, -1, 1, 1)
        p = next(self._decoder.parameters())
        prev = ae.to_float(shown).to(p.dtype) if self.cfg.ae_p_frame else None
        z = z.to(p.dtype)
        if self.device.type == "cpu":
            z = z.contiguous(memory_format=torch.channels_last)
            prev = prev.contiguous(memory_format=torch.channels_last) if prev is not None else None
        return ae.to_uint8(self._decoder(z, prev).float())

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
        if self.settings.compile is not False and self.device.type == "cuda":
            torch.compiler.cudagraph_mark_step_begin()  # a new frame: CUDA-graph outputs of the last one are dead
        tolerance = self.settings.speculative_tolerance
        if self._drafts and speculative_match(self._drafts[0][1], action, tolerance):
            latent, assumed = self._drafts.popleft()  # served at once: no model pass
            self.sampler.accept(latent, assumed.to_tensor().to(self.device).view(1, 1, -1))
            self._stats["accepted"] += 1
        else:
            self._discard_drafts()
            # draft only while the action is held (it matches the previous one): right after a change the
            # player is likely still changing it (doubles the acceptance rate on human-like traces)
            held = self._last_action is not None and speculative_match(self._last_action, action, tolerance)
            n = self.settings.speculative if held else 1
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
        """Stage 2 of `step`: a latent (1, C, h, w) from `step_latent` -> uint8 (H, W, 3) on the host.
        Frames are decoded in the order they are shown (a P-frame decoder decodes each against the last)."""
        frame = self._decode(latent, self._shown)  # 3. decode
        if self.cfg.ae_p_frame:
            self._shown = frame.clone()  # its own tensor: a CUDA graph's output is overwritten by the next replay
        return frame[0].cpu().numpy()
