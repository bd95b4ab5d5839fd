"""Checkpoint folders: `config.json` (every constructor argument, format version, training data
summary, frame size, fps) + `autoencoder.safetensors` + `transformer.safetensors`. Safetensors only,
never pickle. A Hub id resolves through huggingface_hub into the same layout."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from worldmodel.autoencoder import Autoencoder
from worldmodel.errors import UserError
from worldmodel.model import ModelConfig, WorldTransformer

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
WEIGHT_FILES = {"autoencoder": "autoencoder.safetensors", "transformer": "transformer.safetensors"}


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


def atomic_write_bytes(path: Path, data: bytes) -> None:
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _save_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_pretrained(directory: str | Path, cfg: ModelConfig, autoencoder: Autoencoder,
                    transformer: WorldTransformer, info: dict | None = None) -> Path:
    """Write a checkpoint folder. `info` (training data summary, steps, ...) goes into config.json."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _save_tensors(directory / WEIGHT_FILES["autoencoder"], autoencoder.state_dict())
    _save_tensors(directory / WEIGHT_FILES["transformer"], transformer.state_dict())
    config = {"format_version": FORMAT_VERSION, "frame_size": list(cfg.frame_size), "fps": cfg.fps,
              "model": cfg.to_dict(), "info": info or {}}
    atomic_write_bytes(directory / CONFIG_FILE, (json.dumps(config, indent=2) + "\n").encode())
    return directory


def resolve(path_or_id: str | Path) -> Path:
    """A local folder as it is; otherwise a Hub id (`user/name`, optionally `user/name@revision`)
    through huggingface_hub, which uses its local cache when offline."""
    p = Path(path_or_id)
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: a checkpoint is a folder with {CONFIG_FILE} and *.safetensors")
        return p
    s = str(path_or_id)
    if s.count("/") != 1 or s.startswith((".", "/")):
        raise CheckpointError(f"{s}: no such checkpoint folder (and not a Hub id like user/name)")
    repo_id, _, revision = s.partition("@")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(repo_id, revision=revision or None,
                                      allow_patterns=[CONFIG_FILE, "*.safetensors", "*.md", "start_clips/*"]))
    except Exception as e:  # network, missing repo, offline without cache: one line is enough
        raise CheckpointError(f"{s}: not a local folder and the Hub could not provide it "
                              f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None


def read_config(directory: Path) -> dict:
    f = directory / CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (a checkpoint folder needs {CONFIG_FILE})")
    try:
        config = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON ({e})") from None
    if not isinstance(config, dict) or "model" not in config:
        raise CheckpointError(f"{f}: no 'model' section")
    version = config.get("format_version")
    if not isinstance(version, int):
        raise CheckpointError(f"{f}: no integer format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{f}: format version {version} is newer than this worldmodel reads "
                              f"({FORMAT_VERSION}); upgrade worldmodel")
    return config


def _load_into(module: torch.nn.Module, f: Path) -> None:
    if not f.is_file():
        raise CheckpointError(f"{f}: missing")
    try:
        tensors = load_file(str(f))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{f}: unreadable or truncated safetensors file ({e})") from None
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{f}: missing tensor(s) {', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{f}: unexpected tensor(s) {', '.join(unexpected[:3])}"
                              f"{' ...' if len(unexpected) > 3 else ''} (config.json does not match the weights)")
    for name, t in tensors.items():
        if t.shape != expected[name].shape:
            raise CheckpointError(f"{f}: tensor {name} has shape {tuple(t.shape)}, the config expects "
                                  f"{tuple(expected[name].shape)}")
    module.load_state_dict(tensors)


def load_pretrained(path_or_id: str | Path, device="cpu"):
    """-> (cfg, autoencoder, transformer, config dict, folder). Modules are in eval mode on `device`."""
    directory = resolve(path_or_id)
    config = read_config(directory)
    try:
        cfg = ModelConfig.from_dict(config["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{directory / CONFIG_FILE}: bad model config ({e})") from None
    autoencoder, transformer = Autoencoder(cfg.autoencoder), WorldTransformer(cfg)
    _load_into(autoencoder, directory / WEIGHT_FILES["autoencoder"])
    _load_into(transformer, directory / WEIGHT_FILES["transformer"])
    return cfg, autoencoder.to(device).eval(), transformer.to(device).eval(), config, directory
