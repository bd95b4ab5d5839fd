"""Checkpoint folders: exact round trips, Hub ids resolved offline, push_to_hub, and one clear line
naming the file for every kind of broken checkpoint."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from worldmodel.model import checkpoint
from worldmodel.model.autoencoder import Autoencoder
from worldmodel.model.checkpoint import (CheckpointError, load_pretrained, push_to_hub, read_config,
                                         sampling_defaults, save_pretrained)
from worldmodel.model.sampler import SamplingDefaults
from worldmodel.model.transformer import ModelConfig, WorldTransformer

from test_model import _randomize, tiny_config


@pytest.fixture(scope="module")
def parts():
    cfg = tiny_config()
    torch.manual_seed(0)
    ae, dit = Autoencoder(cfg.autoencoder), WorldTransformer(cfg)
    _randomize(dit)
    ae.latent_mean.uniform_(-1, 1)
    ae.latent_std.uniform_(0.5, 2)
    return cfg, ae, dit


@pytest.fixture()
def ckpt(tmp_path, parts):
    cfg, ae, dit = parts
    return save_pretrained(tmp_path / "ckpt", cfg, ae, dit, info={"training": {"steps": 7, "maps": ["MAP01"]}})


def _same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


def test_round_trip_is_exact(ckpt, parts):
    cfg, ae, dit = parts
    cfg2, ae2, dit2, config, folder = load_pretrained(ckpt)
    assert cfg2 == cfg and folder == ckpt
    assert config["info"]["training"]["steps"] == 7 and config["frame_size"] == [32, 32] and config["fps"] == 35
    _same_state(ae, ae2)
    _same_state(dit, dit2)
    x = torch.randn(1, 3, cfg.latent_channels, *cfg.latent_size)
    t, a = torch.rand(1, 3), torch.randn(1, 3, cfg.action_dim)
    with torch.no_grad():
        assert torch.equal(dit.eval()(x, t, a), dit2(x, t, a))
    # saving what was loaded gives the same bytes
    save_pretrained(ckpt.parent / "again", cfg2, ae2, dit2, config["info"])
    for f in ("autoencoder.safetensors", "transformer.safetensors", "config.json"):
        assert (ckpt / f).read_bytes() == (ckpt.parent / "again" / f).read_bytes(), f


def test_world_model_from_preset_save_and_load(tmp_path):
    from worldmodel.inference.engine import WorldModel
    over = tiny_config().to_dict()
    wm = WorldModel.from_preset("tiny", device="cpu", cfg_overrides=over)
    folder = wm.save_pretrained(tmp_path / "wm", info={"note": "random"})
    wm2 = WorldModel.from_pretrained(folder, device="cpu")
    assert wm2.cfg == wm.cfg and wm2.info == {"note": "random"}
    _same_state(wm.transformer, wm2.transformer)
    _same_state(wm.autoencoder, wm2.autoencoder)


# -- sampling defaults: config.json's "sampling", not the architecture ------------------------------------------


def test_model_config_has_no_sampling_fields_and_drops_the_old_keys():
    names = {f.name for f in ModelConfig.__dataclass_fields__.values()}
    assert not {n for n in names if n.startswith("sample")}
    with pytest.raises(TypeError):
        ModelConfig(sample_steps=2)
    old = {**tiny_config().to_dict(), "sample_steps": 2, "sample_shift": 1.0}  # a config.json written before
    assert ModelConfig.from_dict(old) == tiny_config()


def test_a_new_checkpoint_round_trips_its_sampling_defaults(tmp_path, parts):
    from worldmodel.inference.engine import WorldModel
    cfg, ae, dit = parts
    folder = save_pretrained(tmp_path / "ckpt", cfg, ae, dit, sampling=SamplingDefaults(steps=2, shift=1.5))
    config = json.loads((folder / "config.json").read_text())
    assert config["sampling"] == {"steps": 2, "shift": 1.5, "context_noise": None}
    assert "sample_steps" not in config["model"]
    wm = WorldModel.from_pretrained(folder, device="cpu")
    assert wm.sampling == SamplingDefaults(steps=2, shift=1.5) and wm.steps == 2 and wm.sampler.shift == 1.5
    assert WorldModel.from_pretrained(folder, device="cpu", steps=3).steps == 3  # the settings' steps come first
    wm.save_pretrained(tmp_path / "again")
    assert json.loads((tmp_path / "again" / "config.json").read_text())["sampling"] == config["sampling"]
    plain = save_pretrained(tmp_path / "plain", cfg, ae, dit)  # no sampling given: the defaults, written out
    assert json.loads((plain / "config.json").read_text())["sampling"] == {"steps": 4, "shift": 1.0,
                                                                            "context_noise": None}
    noisy = save_pretrained(tmp_path / "noisy", cfg, ae, dit, sampling=SamplingDefaults(steps=2, context_noise=0.15))
    wm = WorldModel.from_pretrained(noisy, device="cpu")
    assert wm.context_noise == 0.15 and wm.sampler.context_noise == 0.15  # over the training level, cfg.context_noise
    assert WorldModel.from_pretrained(noisy, device="cpu", context_noise=0.0).sampler.context_noise == 0.0


def test_an_old_format_checkpoint_loads_with_its_sampling_steps(tmp_path, ckpt):
    """A config.json written before the "sampling" section (every shipped checkpoint, run exports and
    students made before) keeps its steps and shift in `model.sample_steps` / `model.sample_shift`."""
    from worldmodel.inference.engine import WorldModel
    config = json.loads((ckpt / "config.json").read_text())
    del config["sampling"]
    config["model"].update(sample_steps=3, sample_shift=2.0)
    (ckpt / "config.json").write_text(json.dumps(config))
    cfg, _, _, loaded, _ = load_pretrained(ckpt)
    assert cfg == tiny_config() and sampling_defaults(loaded) == SamplingDefaults(steps=3, shift=2.0)
    wm = WorldModel.from_pretrained(ckpt, device="cpu")
    assert wm.steps == 3 and wm.sampler.steps == 3 and wm.sampler.shift == 2.0
    del config["model"]["sample_steps"], config["model"]["sample_shift"]  # older still: the defaults then
    assert sampling_defaults(config) == SamplingDefaults()
    root = Path(__file__).resolve().parents[1]
    for name in ("doom-map01", "doom-map01-dense"):  # the shipped 2-step checkpoints
        assert sampling_defaults(read_config(root / "checkpoints" / name)) == SamplingDefaults(steps=2, shift=1.0)
    for name in ("doom-tiny", "doom-map01-sf", "doom-map01-guided"):  # format 3: committed at the level best on MAP01
        assert sampling_defaults(read_config(root / "checkpoints" / name)) == SamplingDefaults(2, 1.0, 0.1)


@pytest.mark.parametrize("sampling", [{"steps": 0, "shift": 1.0}, {"steps": 2, "shift": -1}, {"steps": 2.5},
                                      {"steps": 2, "speed": 1}, [2, 1.0], {"steps": 2, "context_noise": 1.5},
                                      {"steps": 2, "context_noise": "low"}])
def test_bad_sampling_defaults_are_one_line_naming_the_file(ckpt, sampling):
    config = json.loads((ckpt / "config.json").read_text())
    (ckpt / "config.json").write_text(json.dumps({**config, "sampling": sampling}))
    with pytest.raises(CheckpointError, match="config.json: bad sampling defaults") as e:
        load_pretrained(ckpt)
    assert len(str(e.value).splitlines()) == 1


def _fake_hub_cache(cache: Path, repo_id: str, src: Path, revision: str = "main") -> Path:
    """huggingface_hub's cache layout: models--user--name/{refs/main, snapshots/<commit>/files}."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True)
    for f in src.iterdir():
        (snap / f.name).write_bytes(f.read_bytes())
    (repo / "refs").mkdir()
    (repo / "refs" / revision).write_text(commit)
    return snap


def test_hub_id_resolves_offline_from_the_local_cache(tmp_path, ckpt, parts, monkeypatch):
    import huggingface_hub.constants as hc
    cache = tmp_path / "hf-cache"
    snap = _fake_hub_cache(cache, "someone/doom-tiny", ckpt)
    monkeypatch.setattr(hc, "HF_HUB_OFFLINE", True)  # no network, whatever the environment says
    monkeypatch.setattr(hc, "HF_HUB_CACHE", str(cache))
    cfg, ae, dit, config, folder = load_pretrained("someone/doom-tiny")
    assert folder == snap
    _same_state(dit, parts[2])
    # explicit arguments work without the environment too
    assert checkpoint.resolve("someone/doom-tiny@main", cache_dir=cache, local_files_only=True) == snap
    from worldmodel.inference.engine import WorldModel
    assert WorldModel.from_pretrained("someone/doom-tiny", device="cpu").cfg == cfg
    # an id that is not in the cache: one clear line, no traceback, no network
    with pytest.raises(CheckpointError, match="someone/missing: not a local folder and the Hub could not provide it"):
        load_pretrained("someone/missing")


def test_not_a_folder_or_hub_id(tmp_path):
    with pytest.raises(CheckpointError, match="no such checkpoint folder"):
        load_pretrained(tmp_path / "nowhere" / "deeper")
    f = tmp_path / "file.safetensors"
    f.write_bytes(b"x")
    with pytest.raises(CheckpointError, match="is a folder|not a file"):
        load_pretrained(f)


def test_push_to_hub_uploads_the_checkpoint_files(ckpt, monkeypatch):
    calls = []

    class FakeApi:
        def __init__(self, token=None):
            calls.append(("init", token))

        def create_repo(self, repo_id, **kw):
            calls.append(("create_repo", repo_id, kw))

        def upload_folder(self, **kw):
            calls.append(("upload_folder", kw))
            return "commit-info"

    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    assert push_to_hub(ckpt, "someone/doom-tiny", token="tok", private=True) == "commit-info"
    assert calls[0] == ("init", "tok")
    assert calls[1][:2] == ("create_repo", "someone/doom-tiny") and calls[1][2]["exist_ok"] is True
    up = calls[2][1]
    assert up["repo_id"] == "someone/doom-tiny" and Path(up["folder_path"]) == ckpt
    assert "config.json" in up["allow_patterns"] and "*.safetensors" in up["allow_patterns"]
    assert "7 steps" in up["commit_message"]
    with pytest.raises(CheckpointError, match="not a Hub repository id"):
        push_to_hub(ckpt, "not-an-id")


def test_push_to_hub_refuses_a_broken_checkpoint(ckpt, monkeypatch):
    import huggingface_hub
    monkeypatch.setattr(huggingface_hub, "HfApi", lambda **kw: pytest.fail("must not reach the Hub"))
    (ckpt / "transformer.safetensors").unlink()
    with pytest.raises(CheckpointError, match="transformer.safetensors: missing"):
        push_to_hub(ckpt, "someone/doom-tiny")


# -- every broken checkpoint: one line naming the file -------------------------------------------------

def _one_line(e: pytest.ExceptionInfo, file: Path) -> str:
    msg = str(e.value)
    assert "\n" not in msg and str(file) in msg, msg
    return msg


@pytest.mark.parametrize("keep", [0, 7, 100, -10])
def test_truncated_weights(ckpt, keep):
    f = ckpt / "transformer.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[:keep] if keep >= 0 else data[:len(data) + keep])
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    assert "unreadable or truncated" in _one_line(e, f)


def test_truncated_config(ckpt):
    f = ckpt / "config.json"
    f.write_bytes(f.read_bytes()[:50])
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    assert "not valid JSON" in _one_line(e, f)


def test_missing_files(ckpt):
    (ckpt / "autoencoder.safetensors").unlink()
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    assert "missing" in _one_line(e, ckpt / "autoencoder.safetensors")
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    assert "missing" in _one_line(e, ckpt / "config.json")


def test_missing_tensor(ckpt):
    f = ckpt / "transformer.safetensors"
    t = load_file(f)
    name = sorted(t)[3]
    del t[name]
    save_file(t, f)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    assert f"missing tensor(s) {name}" in _one_line(e, f)


def test_unexpected_tensor(ckpt):
    f = ckpt / "autoencoder.safetensors"
    t = load_file(f)
    t["extra.weight"] = torch.zeros(2)
    save_file(t, f)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    assert "unexpected tensor(s) extra.weight" in _one_line(e, f)


def test_shape_mismatch(ckpt):
    f = ckpt / "transformer.safetensors"
    t = load_file(f)
    t["patch_embed.weight"] = torch.zeros(3, 3)
    save_file(t, f)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    assert "tensor patch_embed.weight has shape (3, 3)" in _one_line(e, f)


def test_config_that_does_not_match_the_weights(ckpt):
    f = ckpt / "config.json"
    config = json.loads(f.read_text())
    config["model"]["dim"] = 128
    f.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    assert "has shape" in _one_line(e, ckpt / "transformer.safetensors")


def test_non_finite_weights(ckpt):
    f = ckpt / "transformer.safetensors"
    t = load_file(f)
    t["patch_embed.weight"][0, 0] = float("nan")
    save_file(t, f)
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    assert "NaN" in _one_line(e, f)


def test_newer_format_version(ckpt):
    f = ckpt / "config.json"
    config = json.loads(f.read_text())
    config["format_version"] = checkpoint.FORMAT_VERSION + 1
    f.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    assert "is newer than this worldmodel reads" in _one_line(e, f)


def test_bad_model_config(ckpt):
    f = ckpt / "config.json"
    config = json.loads(f.read_text())
    config["model"]["no_such_field"] = 1
    f.write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as e:
        load_pretrained(ckpt)
    assert "bad model config" in _one_line(e, f)


def test_cli_prints_one_line(ckpt, capsys):
    """The CLI turns a CheckpointError into `worldmodel <cmd>: error: <file>: ...` (UserError)."""
    from worldmodel.errors import UserError
    assert issubclass(CheckpointError, UserError)
