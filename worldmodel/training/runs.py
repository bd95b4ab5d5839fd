"""A training run's folder: claiming it (`--resume`, `--overwrite`), its checkpoints, its metrics log
and curves, its sample images and its export.

    config.json          the resolved model, sampling defaults and training config (written at start)
    metrics.jsonl        one JSON object per logged step / validation
    curves.png           loss and validation PSNR against the step
    checkpoints/         resumable training state (the newest `keep_checkpoints`)
    samples/step_*.png   real vs teacher-forced vs autoregressive frames on validation maps
    export/              a ready-to-play checkpoint (`WorldModel.from_pretrained(RUN/export)`)
    cache/               latents of the dataset under the frozen autoencoder (`clips.prepare_latents`)

An autoencoder run holds `autoencoder.safetensors` and `train_config.json` instead of the export.
Checkpoints are folders `RUN/checkpoints/step_XXXXXXXX/` written under a temporary name and renamed
(atomic): `model.safetensors`, `ema.safetensors`, `optimizer.safetensors` (every optimizer state
tensor), `rng.safetensors` and `state.json` (step, optimizer hyper-parameters, data position, elapsed
time) -- no pickle anywhere. `--resume` continues from the newest one.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from worldmodel.errors import UserError
from worldmodel.files import atomic_folder, atomic_path, atomic_write_json, atomic_write_text, check_output_path
from worldmodel.model.autoencoder import Autoencoder
from worldmodel.model.checkpoint import (CONFIG_FILE, CheckpointError, check_state_dict, load_tensors,
                                         save_pretrained, save_tensors)
from worldmodel.model.sampler import SamplingDefaults
from worldmodel.model.transformer import LEGACY_SAMPLING_FIELDS, ModelConfig, WorldTransformer

STATE_FORMAT = 1
AE_FILE = "autoencoder.safetensors"

# --------------------------------------------------------------------------------------------------
# The run folder
# --------------------------------------------------------------------------------------------------


# reused only when it was made from the same data and autoencoder)
RUN_FILES = (CONFIG_FILE, "train_config.json", AE_FILE, "metrics.jsonl", "curves.png", "checkpoints", "samples",
             "export")
# training settings that a resumed run may change; any other must be the run's own
RESUME_MAY_CHANGE = {"steps", "max_time", "log_every", "val_every", "ckpt_every", "keep_checkpoints", "val_frames",
                     "calibrate_frames", "val_clips", "eval_clips", "sample_steps", "init", "compile", "amp",
                     "device", "progress"}


def claim_run_folder(out: Path, kind: str, cfg: ModelConfig, tcfg, resume: bool, overwrite: bool,
                     main: bool = True, sampling: SamplingDefaults | None = None) -> None:
    """Before any work, `train autoencoder|model --out OUT`: a folder that holds another run is refused
    (its checkpoints would mix with the new run's, its export be replaced), unless --resume continues it
    with the same model, sampling (`train model`) and training settings, or --overwrite replaces it (its
    files are deleted here, by the main process)."""
    check_output_path(out, folder=True)
    found = [name for name in RUN_FILES if (out / name).exists()]
    if not found:
        return
    if overwrite:
        for name in found if main else []:
            if (out / name).is_dir():
                shutil.rmtree(out / name)
            else:
                (out / name).unlink()
        return
    if not resume:
        raise UserError(f"{out} holds another run ({', '.join(found)}): pass --resume to continue it, or "
                        f"--overwrite to replace it")
    stored_file = out / ("train_config.json" if kind == "autoencoder" else CONFIG_FILE)
    try:
        stored = json.loads(stored_file.read_text())
    except (OSError, ValueError):
        raise UserError(f"{out}: {stored_file.name} is missing or unreadable, so the run there cannot be "
                        f"resumed; pass --overwrite to replace it") from None
    if stored.get("kind") != kind:
        raise UserError(f"{out} holds a `train {stored.get('kind', '?')}` run, not a `train {kind}` run: pass "
                        f"--overwrite to replace it, or another --out")
    now = json.loads(json.dumps({"model": cfg.to_dict(), "sampling": sampling.to_dict() if sampling else {},
                                 "train": asdict(tcfg)}, default=str))
    if "sampling" not in stored:  # a run started when the model config held the sampling defaults
        stored["sampling"] = {k.removeprefix("sample_"): v for k, v in (stored.get("model") or {}).items()
                              if k in LEGACY_SAMPLING_FIELDS}

    def shown(v) -> str:
        return ",".join(map(str, v)) if isinstance(v, list) else str(v)

    def name(part: str, k: str) -> str:  # as the command line names it
        return f"sample_{k}" if part == "sampling" else k

    diff = [f"--{k.replace('_', '-')} {shown(v)}" if part == "train" else f"--set {name(part, k)}={shown(v)}"
            for part in ("model", "sampling", "train") for k, v in stored.get(part, {}).items()
            if name(part, k) not in RESUME_MAY_CHANGE and now[part].get(k, v) != v]
    if diff:
        raise UserError(f"{out}: the run there was started with {', '.join(diff)}; resume it with the same "
                        f"settings, or pass --overwrite to replace it")


# --------------------------------------------------------------------------------------------------
# Training state: safetensors for tensors, JSON for the rest
# --------------------------------------------------------------------------------------------------


def optimizer_state(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for idx, st in sd["state"].items():
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{idx}.{k}"] = v
            else:
                scalars[f"{idx}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def load_optimizer_state(opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict) -> None:
    state: dict[int, dict] = {}
    for key, v in list(tensors.items()) + list(meta.get("scalars", {}).items()):
        idx, _, name = key.partition(".")
        state.setdefault(int(idx), {})[name] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def rng_state() -> dict[str, torch.Tensor]:
    out = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        for i, s in enumerate(torch.cuda.get_rng_state_all()):
            out[f"cuda.{i}"] = s
    return out


def set_rng_state(t: dict[str, torch.Tensor]) -> None:
    if "torch" in t:
        torch.set_rng_state(t["torch"])
    if torch.cuda.is_available():
        states = [t[f"cuda.{i}"] for i in range(torch.cuda.device_count()) if f"cuda.{i}" in t]
        if len(states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(states)


def checkpoint_dirs(run: Path) -> list[Path]:
    """Complete checkpoints of a run, oldest first (temporary folders start with '.')."""
    d = Path(run) / "checkpoints"
    if not d.is_dir():
        return []
    found = [p for p in d.iterdir() if p.is_dir() and p.name.startswith("step_") and (p / "state.json").is_file()]
    return sorted(found, key=lambda p: int(p.name[5:]))


def save_checkpoint(run: Path, step: int, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer,
                    state: dict, keep: int = 2) -> Path:
    """RUN/checkpoints/step_XXXXXXXX/ written under a temporary name, then renamed; the oldest beyond
    `keep` are removed."""
    final = Path(run) / "checkpoints" / f"step_{step:08d}"
    with atomic_folder(final) as tmp:  # the same step written again (a resumed run): replaced
        for name, module in modules.items():
            save_tensors(tmp / f"{name}.safetensors", module.state_dict())
        opt_tensors, opt_meta = optimizer_state(optimizer)
        save_tensors(tmp / "optimizer.safetensors", opt_tensors)
        save_tensors(tmp / "rng.safetensors", rng_state())
        atomic_write_json(tmp / "state.json", {"format": STATE_FORMAT, "step": step, "optimizer": opt_meta, **state})
    for old in checkpoint_dirs(run)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(ckpt: Path, modules: dict[str, nn.Module], optimizer: torch.optim.Optimizer) -> dict:
    """Load a checkpoint folder into modules and optimizer; returns its state.json."""
    ckpt = Path(ckpt)
    try:
        state = json.loads((ckpt / "state.json").read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / 'state.json'}: unreadable ({e})") from None
    if state.get("format", 0) > STATE_FORMAT:
        raise CheckpointError(f"{ckpt / 'state.json'}: training state format {state.get('format')} is newer "
                              f"than this worldmodel reads ({STATE_FORMAT})")
    for name, module in modules.items():
        f = ckpt / f"{name}.safetensors"
        tensors = load_tensors(f)
        check_state_dict(tensors, module, f)
        module.load_state_dict(tensors)
    try:
        load_optimizer_state(optimizer, load_tensors(ckpt / "optimizer.safetensors"), state["optimizer"])
    except (KeyError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"{ckpt / 'optimizer.safetensors'}: does not match this model ({e})") from None
    set_rng_state(load_tensors(ckpt / "rng.safetensors"))
    return state


# --------------------------------------------------------------------------------------------------
# Metrics, curves and sample images
# --------------------------------------------------------------------------------------------------


def trim_metrics(run: Path, step: int) -> None:
    """On resume: drop metric lines after the checkpoint's step (they are recomputed)."""
    f = Path(run) / "metrics.jsonl"
    if not f.is_file():
        return
    keep = []
    for line in f.read_text().splitlines():
        try:
            if json.loads(line).get("step", 0) <= step:
                keep.append(line)
        except json.JSONDecodeError:
            pass
    atomic_write_text(f, "".join(line + "\n" for line in keep))


class MetricsLog:
    def __init__(self, run: Path, enabled: bool):
        self.path, self.enabled = Path(run) / "metrics.jsonl", enabled

    def write(self, **record) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def plot(self) -> None:
        """RUN/curves.png from metrics.jsonl: training and validation loss, and validation PSNR against
        its baseline (copy-last for the model, none for the autoencoder)."""
        if self.enabled and self.path.is_file():
            plot_metrics([json.loads(x) for x in self.path.read_text().splitlines() if x.strip()],
                         self.path.with_name("curves.png"))


# the validation PSNR curves of each kind of run: (metrics key, label)
PSNR_CURVES = (("psnr_tf", "model, teacher-forced next frame"), ("psnr_copy_last", "copy last frame"),
               ("psnr_rollout", "model, rollout of the 2 sample-strip clips"),
               ("psnr_rollout_copy", "copy last frame, the same 2 clips"),
               ("val_psnr", "autoencoder reconstruction"))


def plot_metrics(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def series(key):
        pts = [(r["step"], r[key]) for r in records if isinstance(r.get(key), (int, float))]
        return [p[0] for p in pts], [p[1] for p in pts]

    sharp = series("val_sharpness")[0]  # autoencoder runs: a third panel, sharpness against the real frames
    fig, axes = plt.subplots(1, 3 if sharp else 2, figsize=(16 if sharp else 11, 4))
    ax_l, ax_p = axes[:2]
    if sharp:
        for key, label in (("val_sharpness", "reconstruction"), ("val_sharpness_real", "real frames")):
            x, y = series(key)
            axes[2].plot(x, y, label=label, marker="o", ls="--" if key.endswith("real") else "-")
        axes[2].set(xlabel="step", ylabel="median Laplacian variance", yscale="log", title="validation sharpness")
    for key, label in (("loss", "training loss"), ("val_loss", "validation loss"), ("val_loss_ema", "validation loss, EMA")):
        x, y = series(key)
        if x:
            ax_l.plot(x, y, label=label, lw=0.8 if key == "loss" else 1.6, marker=None if key == "loss" else "o")
    ax_l.set(xlabel="step", ylabel="loss", yscale="log", title="loss")
    for key, label in PSNR_CURVES:
        x, y = series(key)
        if x:
            ax_p.plot(x, y, label=label, marker="o", ls="--" if "copy" in key else "-")
    ax_p.set(xlabel="step", ylabel="PSNR (dB)", title="validation PSNR")
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def save_png(path: Path, image: torch.Tensor) -> None:
    from PIL import Image
    with atomic_path(path) as tmp:
        Image.fromarray(image.numpy()).save(tmp, format="PNG")


# --------------------------------------------------------------------------------------------------
# Export: a ready-to-play checkpoint folder
# --------------------------------------------------------------------------------------------------


def export(run: Path, cfg: ModelConfig, autoencoder: Autoencoder, transformer: WorldTransformer, info: dict,
           sampling: SamplingDefaults) -> Path:
    """RUN/export/ (sampled by default as `sampling` says), replaced as a whole (written next to it, then
    swapped in)."""
    final = Path(run) / "export"
    with atomic_folder(final) as tmp:
        save_pretrained(tmp, cfg, autoencoder, transformer, info, sampling)
    return final

