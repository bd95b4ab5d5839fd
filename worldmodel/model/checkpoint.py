"""Checkpoint folders: `config.json` (every constructor argument, format version, training data
summary, frame size, fps, the sampling defaults) + `autoencoder.safetensors` + `transformer.safetensors`.
Safetensors only, never pickle. A Hub id resolves through huggingface_hub into the same layout.

    save_pretrained(dir, cfg, autoencoder, transformer, info, sampling)  # write a folder (each file atomically)
    load_pretrained(path_or_hub_id)                              # -> cfg, autoencoder, transformer, config, folder
    sampling_defaults(config)                                    # -> SamplingDefaults of a loaded config.json
    push_to_hub(dir, "user/name")                                # upload a folder to the Hugging Face Hub

Every way a checkpoint can be wrong (missing or truncated file, missing or unexpected tensor, a shape
or dtype that does not match config.json, a newer format version) raises `CheckpointError` with one
line that names the file; the CLI prints it as is.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from worldmodel.model.autoencoder import Autoencoder
from worldmodel.errors import UserError
from worldmodel.files import atomic_path, atomic_write_json
from worldmodel.model.sampler import SamplingDefaults
from worldmodel.model.transformer import ModelConfig, WorldTransformer

# 2: the sampling defaults in their own `sampling` section (1: inside `model`, as sample_steps/sample_shift;
# still read). A reader of format 1 would sample a format-2 student at its own default steps, so it refuses.
# 3: `sampling.context_noise`, the level frames are committed at (absent in 2: the model's training level).
FORMAT_VERSION = 3
CONFIG_FILE = "config.json"
WEIGHT_FILES = {"autoencoder": "autoencoder.safetensors", "transformer": "transformer.safetensors"}
HUB_PATTERNS = [CONFIG_FILE, "*.safetensors", "*.md", "start_clips/*"]  # what a checkpoint folder holds


class CheckpointError(UserError):
    """A checkpoint that cannot be loaded; the message names the file and what is wrong."""


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """safetensors file written atomically (tensors are moved to CPU and made contiguous)."""
    with atomic_path(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)




def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file, or a one-line CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: missing")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise CheckpointError(f"{path}: unreadable or truncated safetensors file ({detail})") from None


# --------------------------------------------------------------------------------------------------
# save
# --------------------------------------------------------------------------------------------------


def save_pretrained(directory: str | Path, cfg: ModelConfig, autoencoder: Autoencoder,
                    transformer: WorldTransformer, info: dict | None = None,
                    sampling: SamplingDefaults | None = None) -> Path:
    """Write a checkpoint folder. `info` (training data summary, steps, ...) and `sampling` (how the model
    is best sampled; default SamplingDefaults()) go into config.json. Weights are written first and
    config.json last, each file atomically, so a reader never sees a half-written file."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {"format": "pt"}  # one key: safetensors writes its metadata map in no fixed order
    save_tensors(directory / WEIGHT_FILES["autoencoder"], autoencoder.state_dict(), meta)
    save_tensors(directory / WEIGHT_FILES["transformer"], transformer.state_dict(), meta)
    config = {"format_version": FORMAT_VERSION, "frame_size": list(cfg.frame_size), "fps": cfg.fps,
              "model": cfg.to_dict(), "sampling": (sampling or SamplingDefaults()).to_dict(), "info": info or {}}
    atomic_write_json(directory / CONFIG_FILE, config)
    return directory


# --------------------------------------------------------------------------------------------------
# resolve a path or a Hub id
# --------------------------------------------------------------------------------------------------


def is_hub_id(s: str) -> bool:
    repo = s.partition("@")[0]
    parts = repo.split("/")
    return len(parts) == 2 and all(parts) and not s.startswith((".", "/", "~")) and "\\" not in s


def resolve(path_or_id: str | Path, *, cache_dir: str | Path | None = None, local_files_only: bool | None = None,
            token: str | bool | None = None) -> Path:
    """A local folder as it is; otherwise a Hub id (`user/name`, optionally `user/name@revision`)
    through huggingface_hub's `snapshot_download`: files go to (and come from) its cache, by default
    `~/.cache/huggingface/hub` (`HF_HUB_CACHE`, or `cache_dir`). With `HF_HUB_OFFLINE=1`, or
    `local_files_only=True`, or no network, a repository already in the cache is used without network."""
    p = Path(path_or_id).expanduser()
    if p.exists():
        if not p.is_dir():
            raise CheckpointError(f"{p}: a checkpoint is a folder with {CONFIG_FILE} and *.safetensors, not a file")
        return p
    s = str(path_or_id)
    if not is_hub_id(s):
        raise CheckpointError(f"{s}: no such checkpoint folder (and not a Hub id like user/name)")
    repo_id, _, revision = s.partition("@")
    try:
        from huggingface_hub import snapshot_download
        kwargs = {"revision": revision or None, "allow_patterns": HUB_PATTERNS, "cache_dir": cache_dir, "token": token}
        if local_files_only is not None:
            kwargs["local_files_only"] = local_files_only
        return Path(snapshot_download(repo_id, **kwargs))
    except Exception as e:  # network, missing repo, offline without cache: one line is enough
        detail = str(e).splitlines()[0] if str(e) else "no detail"
        raise CheckpointError(f"{s}: not a local folder and the Hub could not provide it "
                              f"({type(e).__name__}: {detail})") from None


# --------------------------------------------------------------------------------------------------
# load
# --------------------------------------------------------------------------------------------------


def read_config(directory: Path) -> dict:
    f = Path(directory) / CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"{f}: missing (a checkpoint folder needs {CONFIG_FILE})")
    try:
        config = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{f}: not valid JSON, the file may be truncated ({e})") from None
    if not isinstance(config, dict) or not isinstance(config.get("model"), dict):
        raise CheckpointError(f"{f}: no 'model' section")
    version = config.get("format_version")
    if isinstance(version, bool) or not isinstance(version, int):
        raise CheckpointError(f"{f}: no integer format_version")
    if version > FORMAT_VERSION:
        raise CheckpointError(f"{f}: format version {version} is newer than this worldmodel reads "
                              f"({FORMAT_VERSION}); upgrade worldmodel")
    if version < 1:
        raise CheckpointError(f"{f}: bad format_version {version}")
    return config


def model_config(config: dict, directory: Path) -> ModelConfig:
    try:
        return ModelConfig.from_dict(config["model"])
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(directory) / CONFIG_FILE}: bad model config ({e})") from None


def sampling_defaults(config: dict, directory: Path | None = None) -> SamplingDefaults:
    """The sampling defaults of a checkpoint's config.json: its "sampling" section, or in a checkpoint
    written before it had one, `model.sample_steps` / `model.sample_shift` (absent: the defaults, as
    then). A bad value is a CheckpointError naming the file."""
    section = config.get("sampling")
    try:
        if section is None:
            return SamplingDefaults.from_model_keys(config.get("model") or {})
        if not isinstance(section, dict):
            raise ValueError("not an object")
        return SamplingDefaults.from_dict(section)
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"{Path(directory or '.') / CONFIG_FILE}: bad sampling defaults ({e})") from None


def _names(names: list[str]) -> str:
    return ", ".join(names[:3]) + (f" ... ({len(names)} in all)" if len(names) > 3 else "")


def check_state_dict(tensors: dict[str, torch.Tensor], module: torch.nn.Module, f: Path) -> None:
    """Names, shapes, dtypes and finiteness of `tensors` against what `module` expects."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(tensors))
    if missing:
        raise CheckpointError(f"{f}: missing tensor(s) {_names(missing)}")
    unexpected = sorted(set(tensors) - set(expected))
    if unexpected:
        raise CheckpointError(f"{f}: unexpected tensor(s) {_names(unexpected)} (config.json does not match the weights)")
    for name, t in tensors.items():
        want = expected[name]
        if t.shape != want.shape:
            raise CheckpointError(f"{f}: tensor {name} has shape {tuple(t.shape)}, config.json implies "
                                  f"{tuple(want.shape)}")
        if t.dtype.is_floating_point != want.dtype.is_floating_point:
            raise CheckpointError(f"{f}: tensor {name} has dtype {t.dtype}, expected {want.dtype}")
        if t.dtype.is_floating_point and not bool(torch.isfinite(t).all()):
            raise CheckpointError(f"{f}: tensor {name} holds NaN or infinite values")


def load_into(module: torch.nn.Module, f: Path) -> None:
    """Load a safetensors file into `module` (exact names and shapes; floats are cast to the module's dtype)."""
    tensors = load_tensors(f)
    check_state_dict(tensors, module, f)
    module.load_state_dict(tensors)


_load_into = load_into  # old private name


def load_pretrained(path_or_id: str | Path, device="cpu", **hub_kwargs):
    """-> (cfg, autoencoder, transformer, config dict, folder). Modules are in eval mode on `device`.
    `hub_kwargs` (cache_dir, local_files_only, token) go to `resolve` for Hub ids."""
    directory = resolve(path_or_id, **hub_kwargs)
    config = read_config(directory)
    cfg = model_config(config, directory)
    sampling_defaults(config, directory)  # a bad "sampling" section fails here, with the rest
    autoencoder, transformer = Autoencoder(cfg.autoencoder), WorldTransformer(cfg)
    load_into(autoencoder, directory / WEIGHT_FILES["autoencoder"])
    load_into(transformer, directory / WEIGHT_FILES["transformer"])
    return cfg, autoencoder.to(device).eval(), transformer.to(device).eval(), config, directory


def verify(path_or_id: str | Path, **hub_kwargs) -> dict:
    """Load a checkpoint fully (CheckpointError if anything is wrong); returns its config.json."""
    return load_pretrained(path_or_id, **hub_kwargs)[3]


# --------------------------------------------------------------------------------------------------
# push to the Hub
# --------------------------------------------------------------------------------------------------


def push_to_hub(directory: str | Path, repo_id: str, *, token: str | None = None, private: bool | None = None,
                revision: str | None = None, commit_message: str | None = None, create_pr: bool = False):
    """Upload a checkpoint folder to the Hugging Face Hub as a model repository `repo_id` (created if
    needed). The folder is loaded fully first, so a broken checkpoint is never pushed; only the files a
    checkpoint consists of are uploaded (`HUB_PATTERNS`). Needs a token with write access (`token=`,
    `HF_TOKEN`, or `hf auth login`). Returns huggingface_hub's CommitInfo; afterwards
    `WorldModel.from_pretrained(repo_id)` fetches the same folder."""
    directory = Path(directory)
    if not is_hub_id(repo_id) or "@" in repo_id:
        raise CheckpointError(f"{repo_id}: not a Hub repository id like user/name")
    config = verify(directory)
    from huggingface_hub import HfApi
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = config.get("info") or {}
    steps = info.get("steps", (info.get("training") or {}).get("steps"))
    message = commit_message or f"worldmodel checkpoint (format {config['format_version']}"\
                                f"{f', {steps} steps' if steps is not None else ''})"
    return api.upload_folder(repo_id=repo_id, folder_path=str(directory), repo_type="model", revision=revision,
                             allow_patterns=HUB_PATTERNS, commit_message=message, create_pr=create_pr)
