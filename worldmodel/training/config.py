"""Training settings: the configs of `train autoencoder` and `train model` (their fields are the
commands' defaults), the up-front checks of counts and sizes, and the model config a run trains
(a preset, with `--set KEY=VALUE` overrides) with its sampling defaults (`--set sample_steps=N`,
`--set sample_shift=X`: what the export says about how it is best sampled, not architecture)."""
from __future__ import annotations

import json
from dataclasses import dataclass

from worldmodel.errors import UserError
from worldmodel.model.sampler import SamplingDefaults
from worldmodel.model.transformer import ModelConfig, preset


@dataclass
class AutoencoderTrainConfig:
    steps: int = 4000
    batch: int = 32  # frames per step (global)
    lr: float = 1e-3
    min_lr_ratio: float = 0.1  # cosine decay to lr * min_lr_ratio at `steps`
    warmup: int = 100
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    seed: int = 0
    log_every: int = 10
    val_every: int = 500
    ckpt_every: int = 500
    keep_checkpoints: int = 2
    val_frames: int = 512  # validation frames for PSNR
    crop: tuple[int, int] | None = None  # train on random (h, w) crops (convolutions: ~H*W/(h*w) x faster)
    adv_weight: float = 0.0  # > 0: a PatchGAN critic trains beside the autoencoder (hinge loss), and the
                             # autoencoder also minimises adv_weight * -critic(reconstruction)
    adv_start: int = 0  # the step from which the autoencoder feels the critic (the critic trains from 0)
    init: str | None = None  # an autoencoder (run folder, file or checkpoint folder) whose weights start the run
    decoder_only: bool = False  # train the decoder alone: the encoder (and the latents' statistics) stay
                                # as `init` has them, so a transformer trained on its latents still fits
    clip_frames: int = 4  # a P-frame decoder (`--set ae_p_frame=true`) trains on clips of this many
                          # consecutive frames: the first is shown, each next decoded against the one before
    calibrate_frames: int = 4096
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        check_sizes(self, at_least_1=("steps", "batch", "log_every", "val_every", "ckpt_every", "keep_checkpoints",
                                      "calibrate_frames"),
                    at_least_0=("warmup", "val_frames", "adv_start"))
        if self.clip_frames < 2:
            raise UserError(f"--clip-frames must be at least 2 (a frame shown, one decoded against it), got {self.clip_frames}")


@dataclass
class ModelTrainConfig:
    steps: int = 20000
    batch: int = 16  # clips per step (global, split over DDP ranks)
    lr: float = 3e-4
    min_lr_ratio: float = 0.1
    warmup: int = 200
    weight_decay: float = 0.01
    beta2: float = 0.99
    grad_clip: float = 1.0
    ema_decay: float = 0.999
    context_prob: float = 0.5  # share of clips laid out as context prefix + noisy frames
    context_max: float = 0.3  # highest noise level of a context frame (noise augmentation)
    noise_shift: float = 1.0  # > 1: noise levels of the other frames biased towards pure noise
    self_forcing: int = 0  # > 0: on a share of the steps, K context frames are the model's own rollout
    self_forcing_prob: float = 0.5  # the share of steps that are self-forced
    clip_frames: int = 0  # 0: the model's `clip_frames` (sinks + window + max draft)
    init: str | None = None  # a checkpoint folder whose transformer weights start a new run
    seed: int = 0
    log_every: int = 10
    val_every: int = 500  # validation loss, teacher-forced PSNR and a sample strip
    ckpt_every: int = 500  # checkpoint + export
    keep_checkpoints: int = 2
    val_clips: int = 32  # validation clips for the loss
    eval_clips: int = 16  # validation clips for teacher-forced PSNR
    sample_steps: int = 0  # sampling steps of validation and self-forcing; 0: the run's SamplingDefaults.steps
    compile: bool = False
    max_time: float = 0.0  # > 0: stop after this many seconds of training in this process (checkpoint + export)
    amp: bool = True  # bf16 autocast on CUDA and on CPUs with native bf16 (`amp_enabled`)
    device: str = "auto"
    progress: bool = True

    def __post_init__(self):
        check_sizes(self, at_least_1=("steps", "batch", "log_every", "val_every", "ckpt_every", "keep_checkpoints"),
                    at_least_0=("warmup", "clip_frames", "val_clips", "eval_clips", "sample_steps"))

    def frames(self, cfg: ModelConfig) -> int:
        return self.clip_frames or cfg.clip_frames


def check_sizes(obj, at_least_1: tuple[str, ...] = (), at_least_0: tuple[str, ...] = ()) -> None:
    """Counts and sizes (steps, batch, ...) refused up front, naming the flag, before any data is read."""
    for names, low in ((at_least_1, 1), (at_least_0, 0)):
        for name in names:
            v = getattr(obj, name)
            if v is not None and v < low:
                raise UserError(f"--{name.replace('_', '-')} must be at least {low}, got {v}")


def parse_overrides(items: list[str] | None) -> dict:
    """['dim=128', 'frame_size=48,64'] -> {'dim': 128, 'frame_size': [48, 64]}"""
    out = {}
    for item in items or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UserError(f"--set {item!r}: expected KEY=VALUE")
        try:
            v = json.loads(value)
        except json.JSONDecodeError:
            if "," in value:
                try:
                    v = [json.loads(x) for x in value.split(",")]
                except json.JSONDecodeError:
                    raise UserError(f"--set {item!r}: bad value") from None
            else:
                v = value
        out[key.strip()] = v
    return out


def resolve_sampling(overrides: dict) -> SamplingDefaults:
    """The run's sampling defaults from `--set sample_steps=N` / `--set sample_shift=X` (the other keys are
    the model config's, `resolve_config`, which leaves these two out)."""
    try:
        return SamplingDefaults.from_model_keys(overrides)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad --set: {e}") from None


def resolve_config(name: str, overrides: dict, base: dict | None = None) -> ModelConfig:
    d = preset(name).to_dict()
    d.update(base or {})
    d.update(overrides)
    try:
        return ModelConfig.from_dict(d)
    except (TypeError, ValueError) as e:
        raise UserError(f"bad model config: {e}") from None
