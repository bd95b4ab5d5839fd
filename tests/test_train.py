"""Training: deterministic data order, a killed-and-resumed run equals an uninterrupted one step for
step, a 2-process torchrun (gloo) run trains and checkpoints (and matches one process), and the
`worldmodel train autoencoder|model` commands run end to end on a tiny dataset and export a checkpoint
that WorldModel loads. Tiny shapes throughout (32x32 frames, 16 tokens a frame, dim 64, 2 blocks)."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.model.autoencoder import reconstruction_loss
from worldmodel.model.checkpoint import load_tensors
from worldmodel.model.sampler import SamplingDefaults
from worldmodel.model.transformer import WorldTransformer
from worldmodel.training.autoencoder import AutoencoderLoss, load_autoencoder, train_autoencoder
from worldmodel.training.clips import LatentClips, clip_starts, spread_shards
from worldmodel.training.config import AutoencoderTrainConfig, ModelTrainConfig
from worldmodel.training.runs import AE_FILE, checkpoint_dirs
from worldmodel.training.steps import amp_enabled, batch_indices
from worldmodel.training.transformer import self_forced_clip, self_forcing_layout, train_model
from test_model import tiny_config

HERE = Path(__file__).resolve().parent


def synthetic_latents(cfg, frames_per_episode=40, episodes=4, seed=0) -> LatentClips:
    g = torch.Generator().manual_seed(seed)
    n = frames_per_episode * episodes
    # smooth in time, so that there is something to predict
    z = torch.randn(episodes, 1, cfg.latent_channels, *cfg.latent_size, generator=g)
    drift = 0.1 * torch.randn(episodes, frames_per_episode, cfg.latent_channels, *cfg.latent_size, generator=g)
    latents = (z + drift.cumsum(1)).flatten(0, 1).half()
    actions = torch.randn(n, cfg.action_dim, generator=g)
    episode = torch.arange(episodes).repeat_interleave(frames_per_episode)
    frame_index = torch.arange(frames_per_episode).repeat(episodes)
    starts = clip_starts(episode, frame_index, cfg.clip_frames)
    return LatentClips(latents, actions, starts, cfg.clip_frames, ["MAP01"])


def quick(**kw) -> ModelTrainConfig:
    d = dict(steps=8, batch=4, lr=1e-3, warmup=2, log_every=1, val_every=1000, ckpt_every=3, device="cpu",
             progress=False, seed=3)
    d.update(kw)
    return ModelTrainConfig(**d)


def test_batch_indices_are_a_function_of_the_step():
    n, b = 10, 4
    seq = torch.cat([batch_indices(s, b, n, seed=1) for s in range(5)])  # 20 = two epochs
    assert sorted(seq[:10].tolist()) == list(range(10)) and sorted(seq[10:20].tolist()) == list(range(10))
    assert torch.equal(batch_indices(3, b, n, seed=1), seq[12:16])  # no state: step 3 alone
    assert not torch.equal(batch_indices(0, b, n, seed=2), batch_indices(0, b, n, seed=1))


def test_clip_starts_stay_inside_episodes():
    episode = torch.tensor([0, 0, 0, 0, 1, 1, 1, 2, 2, 2, 2, 2])
    frame_index = torch.tensor([0, 1, 2, 3, 0, 1, 2, 0, 1, 3, 4, 5])  # a gap in episode 2
    assert clip_starts(episode, frame_index, 3).tolist() == [0, 1, 4, 9]
    assert clip_starts(episode, frame_index, 3, stride=2).tolist() == [0, 4, 9]


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def test_killed_and_resumed_run_matches_an_uninterrupted_one(tmp_path):
    torch.manual_seed(0)
    cfg = tiny_config()
    data = synthetic_latents(cfg)
    full = train_model(data, tmp_path / "full", cfg, quick())
    assert full["start_step"] == 0 and len(full["losses"]) == 8

    class Killed(Exception):
        pass

    def kill_at_7(step, loss):
        if step == 7:
            raise Killed

    with pytest.raises(Killed):
        train_model(data, tmp_path / "run", cfg, quick(), on_step=kill_at_7)
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step_00000003", "step_00000006"]
    # a leftover temporary folder from a checkpoint killed while being written is ignored
    (tmp_path / "run" / "checkpoints" / ".step_00000009.tmp").mkdir()
    resumed = train_model(data, tmp_path / "run", cfg, quick(), resume=True)
    assert resumed["start_step"] == 6
    assert resumed["losses"] == full["losses"][6:]  # exactly, step for step
    for name in ("model", "ema"):
        a, b = _state(full[name]), _state(resumed[name])
        assert all(torch.equal(a[k], b[k]) for k in a), name
    # the optimizer state too (compare the written checkpoints)
    fa = load_tensors(tmp_path / "full" / "checkpoints" / "step_00000008" / "optimizer.safetensors")
    fb = load_tensors(tmp_path / "run" / "checkpoints" / "step_00000008" / "optimizer.safetensors")
    assert fa.keys() == fb.keys() and all(torch.equal(fa[k], fb[k]) for k in fa)
    # metrics: one line per step, the replayed steps not duplicated
    steps = [json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 9))
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_00000008" / "state.json").read_text())
    assert state["step"] == 8 and state["data_position"]["clips_seen"] == 32
    # a run resumed with nothing left to do is a no-op
    again = train_model(data, tmp_path / "run", cfg, quick(), resume=True)
    assert again["losses"] == [] and again["start_step"] == 8


def test_max_time_stops_with_a_checkpoint_that_resume_continues(tmp_path):
    cfg = tiny_config()
    data = synthetic_latents(cfg)
    full = train_model(data, tmp_path / "full", cfg, quick())
    first = train_model(data, tmp_path / "run", cfg, quick(max_time=1e-9))  # out of time after one step
    assert first["steps"] == 1 and len(first["losses"]) == 1
    assert [p.name for p in checkpoint_dirs(tmp_path / "run")] == ["step_00000001"]
    rest = train_model(data, tmp_path / "run", cfg, quick(), resume=True)
    assert rest["start_step"] == 1 and first["losses"] + rest["losses"] == full["losses"]


def test_a_level_models_export_names_its_level_where_play_and_eval_read_it(tmp_path):
    from worldmodel.model.autoencoder import Autoencoder

    cfg = tiny_config()
    level = {"wad": "freedoom2", "map": "MAP01"}
    train_model(synthetic_latents(cfg), tmp_path / "run", cfg, quick(steps=1), Autoencoder(cfg.autoencoder),
                  info={"data": "data/map01", "level": level})
    info = json.loads((tmp_path / "run" / "export" / "config.json").read_text())["info"]
    assert info["level"] == level and "level" not in info["training"]
    assert info["training"]["data"] == "data/map01"


def test_init_starts_a_new_run_from_a_checkpoints_weights(tmp_path):
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.model.checkpoint import save_pretrained
    from worldmodel.errors import UserError

    torch.manual_seed(0)
    cfg = tiny_config()
    data = synthetic_latents(cfg)
    trained = train_model(data, tmp_path / "first", cfg, quick(steps=4))
    save_pretrained(tmp_path / "ckpt", cfg, Autoencoder(cfg.autoencoder), trained["ema"],
                    sampling=SamplingDefaults(steps=2))
    # learning rate 0: the new run's weights (model and EMA) stay exactly the checkpoint's
    cont = train_model(data, tmp_path / "cont", cfg, quick(steps=1, lr=0.0, warmup=0, init=str(tmp_path / "ckpt")))
    want = _state(trained["ema"])
    for name in ("model", "ema"):
        got = _state(cont[name])
        assert all(torch.equal(want[k], got[k]) for k in want), name
    fresh = _state(train_model(data, tmp_path / "fresh", cfg, quick(steps=1, lr=0.0, warmup=0))["model"])
    assert not all(torch.equal(want[k], fresh[k]) for k in want)
    with pytest.raises(UserError, match="depth"):
        train_model(data, tmp_path / "bad", tiny_config(depth=3), quick(steps=1, init=str(tmp_path / "ckpt")))


def test_init_from_a_distilled_student_says_to_distil_again(tmp_path, capsys):
    """Flow-matching training undoes a student's distillation: a run started from one says so, once;
    a run from a checkpoint that was not distilled says nothing."""
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.model.checkpoint import save_pretrained

    torch.manual_seed(0)
    cfg = tiny_config()
    data = synthetic_latents(cfg)
    trained = train_model(data, tmp_path / "first", cfg, quick(steps=1))["ema"]
    save_pretrained(tmp_path / "teacher", cfg, Autoencoder(cfg.autoencoder), trained, info={"steps": 1})
    save_pretrained(tmp_path / "student", cfg, Autoencoder(cfg.autoencoder), trained,
                    info={"steps": 1, "distill": {"student_steps": 2}})
    capsys.readouterr()
    train_model(data, tmp_path / "from-teacher", cfg, quick(steps=1, init=str(tmp_path / "teacher")))
    assert "distilled" not in capsys.readouterr().err
    train_model(data, tmp_path / "from-student", cfg, quick(steps=1, init=str(tmp_path / "student")))
    err = capsys.readouterr().err
    assert err.count("is a distilled student") == 1 and "worldmodel distill" in err


def test_init_switches_on_the_previous_frame_input_without_changing_what_the_model_computes(tmp_path):
    """--init from a model without `prev_frame` into one with it: the previous frame's input weights start
    at zero, so the new model's outputs equal the checkpoint's exactly; after training they do not."""
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.model.checkpoint import save_pretrained

    torch.manual_seed(0)
    cfg = tiny_config()
    data = synthetic_latents(cfg)
    trained = train_model(data, tmp_path / "first", cfg, quick(steps=4))
    save_pretrained(tmp_path / "ckpt", cfg, Autoencoder(cfg.autoencoder), trained["ema"])
    pcfg = tiny_config(prev_frame=True)
    pdata = synthetic_latents(pcfg)
    cont = train_model(pdata, tmp_path / "cont", pcfg, quick(steps=1, lr=0.0, warmup=0, init=str(tmp_path / "ckpt")))
    x, a = pdata.clip(torch.arange(2))
    t = torch.rand(x.shape[:2], generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = trained["ema"](x.float(), t, a)
        got = cont["ema"](x.float(), t, a)
    assert torch.equal(want, got)
    w = cont["model"].patch_embed.weight
    assert w.shape[1] == 2 * cfg.latent_channels and torch.count_nonzero(w[:, cfg.latent_channels:]) == 0
    moved = train_model(pdata, tmp_path / "moved", pcfg, quick(steps=3, init=str(tmp_path / "ckpt")))
    assert torch.count_nonzero(moved["model"].patch_embed.weight[:, cfg.latent_channels:]) > 0


def test_init_onto_another_latent_keeps_the_blocks_and_starts_the_token_layers_afresh(tmp_path):
    """--init from a checkpoint on another autoencoder and patch size (here 4x4 latents, one a token, to
    8x8 latents, 2x2 a token, with the previous frame): every weight whose shape and meaning carry over is
    the checkpoint's; the patch embedding is freshly initialised and the output projection is zero."""
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.model.checkpoint import save_pretrained

    torch.manual_seed(0)
    cfg = tiny_config()
    trained = train_model(synthetic_latents(cfg), tmp_path / "first", cfg, quick(steps=4))
    save_pretrained(tmp_path / "ckpt", cfg, Autoencoder(cfg.autoencoder), trained["ema"])
    ncfg = tiny_config(ae_channels=(8, 16), ae_res_blocks=(0, 0), patch_size=2, prev_frame=True)
    assert ncfg.latent_size == (8, 8) and ncfg.grid == cfg.grid
    cont = train_model(synthetic_latents(ncfg), tmp_path / "cont", ncfg,
                       quick(steps=1, lr=0.0, warmup=0, init=str(tmp_path / "ckpt")))["model"]
    want, got = _state(trained["ema"]), _state(cont)
    token_layers = {"patch_embed.weight", "patch_embed.bias", "final.linear.weight", "final.linear.bias"}
    assert set(want) == set(got)
    for k in set(want) - token_layers:
        assert torch.equal(want[k], got[k]), k
    assert got["patch_embed.weight"].shape == (cfg.dim, 2 * ncfg.patch_size ** 2 * ncfg.latent_channels)  # [frame, prev]
    assert torch.count_nonzero(got["patch_embed.weight"]) > 0
    assert torch.count_nonzero(got["final.linear.weight"]) == 0 and torch.count_nonzero(got["final.linear.bias"]) == 0


def test_init_onto_the_prev_skip_starts_only_the_output_projection_afresh(tmp_path):
    """--init from a checkpoint without the output skip into a run with it: every weight is the
    checkpoint's but the output projection, which starts at zero (the new model starts as a copy)."""
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.model.checkpoint import save_pretrained

    torch.manual_seed(0)
    cfg = tiny_config(prev_frame=True)
    trained = train_model(synthetic_latents(cfg), tmp_path / "first", cfg, quick(steps=4))
    save_pretrained(tmp_path / "ckpt", cfg, Autoencoder(cfg.autoencoder), trained["ema"])
    ncfg = tiny_config(prev_frame=True, prev_skip=True)
    cont = train_model(synthetic_latents(ncfg), tmp_path / "cont", ncfg,
                       quick(steps=1, lr=0.0, warmup=0, init=str(tmp_path / "ckpt")))["model"]
    want, got = _state(trained["ema"]), _state(cont)
    output = {"final.linear.weight", "final.linear.bias"}
    for k in set(want) - output:
        assert torch.equal(want[k], got[k]), k
    assert torch.count_nonzero(want["final.linear.weight"]) > 0
    assert all(torch.count_nonzero(got[k]) == 0 for k in output)


def test_bf16_autocast_training_loss_matches_float32_on_a_fixed_batch():
    """The training loss under bf16 autocast (what `train model` uses on CPUs with native bf16, and on
    CUDA) agrees with float32 on the same batch; it is refused where the CPU has no bf16."""
    from worldmodel.model import diffusion
    from worldmodel.device import native_bf16

    cfg = tiny_config(prev_frame=True)
    torch.manual_seed(0)
    model = WorldTransformer(cfg)
    for p in model.parameters():  # adaLN-Zero would make the blocks identities
        torch.nn.init.normal_(p, std=0.05)
    data = synthetic_latents(cfg)
    x0, a = data.batch(0, 4, 0, 4, seed=0)
    g = torch.Generator().manual_seed(0)
    t = diffusion.sample_training_noise_levels(4, x0.shape[1], g)
    noise = torch.randn(x0.shape, generator=g)
    with torch.no_grad():
        fp32 = diffusion.flow_matching_loss(model, x0.float(), a, t, noise).item()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            bf16 = diffusion.flow_matching_loss(model, x0.float(), a, t, noise).item()
    assert abs(bf16 - fp32) <= 0.02 * fp32, (bf16, fp32)
    assert amp_enabled(True, torch.device("cpu")) == native_bf16()
    assert not amp_enabled(False, torch.device("cpu"))


@pytest.mark.parametrize("adv_weight", [0.0, 0.5])
def test_autoencoder_training_resumes_exactly(tmp_path, adv_weight):
    cfg = tiny_config()
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (64, 32, 32, 3), generator=g, dtype=torch.uint8)
    tc = dict(steps=6, batch=8, warmup=1, log_every=1, val_every=3, ckpt_every=2, device="cpu", progress=False,
              val_frames=16, calibrate_frames=32, crop=(16, 16), adv_weight=adv_weight, adv_start=3)
    full = train_autoencoder(frames, tmp_path / "full", cfg, AutoencoderTrainConfig(**tc), frames[:16])

    def kill(step, loss):
        if step == 5:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train_autoencoder(frames, tmp_path / "run", cfg, AutoencoderTrainConfig(**tc), frames[:16], on_step=kill)
    resumed = train_autoencoder(frames, tmp_path / "run", cfg, AutoencoderTrainConfig(**tc), frames[:16],
                                  resume=True)
    assert resumed["start_step"] == 4 and resumed["losses"] == full["losses"][4:]
    a = (tmp_path / "full" / AE_FILE).read_bytes()
    assert a == (tmp_path / "run" / AE_FILE).read_bytes()
    ae, config = load_autoencoder(tmp_path / "run")
    assert config["kind"] == "autoencoder" and np.isfinite(config["info"]["val_psnr"])
    assert not torch.equal(ae.latent_std, torch.ones_like(ae.latent_std))  # calibrated


def test_decoder_only_fine_tune_moves_only_the_decoder(tmp_path):
    """`train autoencoder --init AE --decoder-only --adv-weight W`: after adversarial steps the encoder and
    the latent statistics are bit-identical to the initial autoencoder's (the latents keep their meaning),
    the decoder has moved; without --init it is refused."""
    from worldmodel.errors import UserError

    cfg = tiny_config()
    g = torch.Generator().manual_seed(0)
    frames = torch.randint(0, 256, (32, 32, 32, 3), generator=g, dtype=torch.uint8)
    tc = dict(steps=2, batch=8, warmup=1, log_every=1, val_every=100, ckpt_every=100, device="cpu", progress=False,
              val_frames=8, calibrate_frames=32)
    train_autoencoder(frames, tmp_path / "ae", cfg, AutoencoderTrainConfig(**tc))
    before, _ = load_autoencoder(tmp_path / "ae")
    train_autoencoder(frames, tmp_path / "dec", cfg, AutoencoderTrainConfig(
        **{**tc, "steps": 3, "adv_weight": 0.5, "init": str(tmp_path / "ae"), "decoder_only": True}), frames[:8])
    after, _ = load_autoencoder(tmp_path / "dec")
    b, a = before.state_dict(), after.state_dict()
    fixed = [k for k in b if not k.startswith("decoder.")]
    assert fixed and all(torch.equal(b[k], a[k]) for k in fixed)  # encoder and latent_mean / latent_std
    assert any(not torch.equal(b[k], a[k]) for k in b if k.startswith("decoder."))
    with pytest.raises(UserError, match="--init"):
        train_autoencoder(frames, tmp_path / "bad", cfg, AutoencoderTrainConfig(**{**tc, "decoder_only": True}))


def test_adversarial_losses_each_train_only_their_own_side():
    """One backward of the total: the critic's gradient is that of its hinge loss alone, the
    autoencoder's that of reconstruction + weight * adversarial alone."""
    from worldmodel.model.autoencoder import Autoencoder, PatchDiscriminator

    torch.manual_seed(0)
    cfg = tiny_config()
    ae, critic = Autoencoder(cfg.autoencoder), PatchDiscriminator()
    frames = torch.randint(0, 256, (4, 32, 32, 3), dtype=torch.uint8)
    net = AutoencoderLoss(ae, critic)

    def grads(module):
        return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in module.parameters()]

    total, parts = net(frames, torch.Generator().manual_seed(1), 0.3)
    total.backward()
    g_ae, g_critic = grads(ae), grads(critic)
    for m in (ae, critic):
        m.zero_grad()
    x, recon, _ = ae.reconstruct_noisy(frames, torch.Generator().manual_seed(1))
    (reconstruction_loss(recon, x) + 0.3 * -critic(recon).mean()).backward(inputs=list(ae.parameters()))
    critic_loss = torch.relu(1 - critic(x)).mean() + torch.relu(1 + critic(recon.detach())).mean()
    critic_loss.backward(inputs=list(critic.parameters()))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_ae, grads(ae)))
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g_critic, grads(critic)))
    assert torch.allclose(parts["critic_loss"], critic_loss.detach())
    assert any(g.abs().sum() > 0 for g in g_critic)


DDP_SCRIPT = r'''
import json, os, sys, torch
sys.path.insert(0, {tests!r})
torch.set_num_threads(1)
from worldmodel.training.transformer import train_model
from test_model import tiny_config
from test_train import synthetic_latents, quick
cfg = tiny_config()
out = sys.argv[1]
s = train_model(synthetic_latents(cfg), out, cfg, quick(steps=4, ckpt_every=2))
if os.environ["RANK"] == "0":
    json.dump({{"losses": s["losses"], "world_size": s["world_size"]}}, open(out + "/result.json", "w"))
torch.distributed.destroy_process_group()
'''


def test_torchrun_two_processes_train_and_checkpoint(tmp_path):
    script = tmp_path / "ddp_train.py"
    script.write_text(DDP_SCRIPT.format(tests=str(HERE)))
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(HERE.parent))
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                        str(script), str(tmp_path / "ddp")], env=env, capture_output=True, text=True, timeout=180)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    result = json.loads((tmp_path / "ddp" / "result.json").read_text())
    assert result["world_size"] == 2
    assert [p.name for p in checkpoint_dirs(tmp_path / "ddp")] == ["step_00000002", "step_00000004"]
    state = json.loads((tmp_path / "ddp" / "checkpoints" / "step_00000004" / "state.json").read_text())
    assert state["world_size"] == 2
    # the same global batches as one process: the same losses (up to float reduction order)
    cfg = tiny_config()
    single = train_model(synthetic_latents(cfg), tmp_path / "single", cfg, quick(steps=4, ckpt_every=2))
    np.testing.assert_allclose(result["losses"], single["losses"], rtol=2e-4)
    # and the 2-process checkpoint resumes in one process
    more = train_model(synthetic_latents(cfg), tmp_path / "ddp", cfg, quick(steps=5, ckpt_every=2), resume=True)
    assert more["start_step"] == 4 and len(more["losses"]) == 1


# -- the CLI, end to end, on a tiny dataset ----------------------------------------------------------------

TINY_SET = ["--set", "frame_size=32,32", "--set", "latent_channels=4", "--set", "ae_channels=8,8,16",
            "--set", "ae_res_blocks=0,0,0", "--set", "dim=64", "--set", "depth=2", "--set", "heads=2",
            "--set", "window_frames=3", "--set", "max_draft=2"]


def make_dataset(root: Path, maps=("MAP01", "MAP02", "MAP21"), frames=48, seed=0) -> Path:
    """A dataset in the `worldmodel collect` format: one episode per map of a blob moving with the actions."""
    from worldmodel.data import dataset as D, writer
    rng = np.random.default_rng(seed)
    manifest = writer.new_manifest((32, 32))
    yy, xx = np.mgrid[0:32, 0:32]
    for e, m in enumerate(maps):
        actions = np.zeros((frames, 5), np.float32)
        actions[1:, 0] = rng.integers(-1, 2, frames - 1)
        actions[1:, 2] = rng.uniform(-1, 1, frames - 1)
        pos = 16 + np.cumsum(actions[:, 2] * 2) % 16
        img = np.zeros((frames, 32, 32, 3), np.uint8)
        for i in range(frames):
            blob = np.exp(-((xx - pos[i]) ** 2 + (yy - 16) ** 2) / 20.0)
            img[i, ..., 0] = (255 * blob).astype(np.uint8)
            img[i, ..., 1] = 40 + 8 * e
            img[i, ..., 2] = (yy * 4).astype(np.uint8)
        arrays = {"frames": img, "actions": actions, "episode": np.full(frames, e, np.int64),
                  "frame_index": np.arange(frames, dtype=np.int32), "map": np.array([m] * frames, D.MAP_DTYPE)}
        manifest["shards"].append(writer.write_shard(root, f"shards/ep{e:06d}-000.npz", arrays))
    writer.write_manifest(root, manifest)
    return root


def test_cli_trains_autoencoder_and_model_and_exports(tmp_path, capsys):
    from worldmodel.cli import main
    data = make_dataset(tmp_path / "data")
    ae_run, run = tmp_path / "ae", tmp_path / "dit"
    rc = main(["train", "autoencoder", "--data", str(data), "--out", str(ae_run), "--steps", "4", "--batch", "8",
               "--val-every", "2", "--ckpt-every", "2", "--threads", "1", "--no-progress", *TINY_SET])
    assert rc == 0
    out = capsys.readouterr().out
    assert "validation PSNR" in out and (ae_run / "autoencoder.safetensors").is_file()
    ae_config = json.loads((ae_run / "config.json").read_text())
    assert ae_config["info"]["maps"] == ["MAP01", "MAP02"]  # validation map MAP21 not trained on
    rc = main(["train", "model", "--data", str(data), "--autoencoder", str(ae_run), "--out", str(run),
               "--steps", "4", "--batch", "2", "--val-every", "2", "--ckpt-every", "4", "--threads", "1",
               "--eval-clips", "2", "--val-clips", "4", "--no-progress", *TINY_SET, "--set", "sample_steps=3"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "teacher-forced next-frame PSNR" in out and "copy-last-frame" in out and "(3 steps)" in out
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["dim"] == 64 and config["train"]["steps"] == 4
    # `--set sample_steps=N` sets the run's sampling defaults (not an architecture field): the export says it
    assert config["sampling"] == {"steps": 3, "shift": 1.0, "context_noise": None}
    assert "sample_steps" not in config["model"]
    assert json.loads((run / "export" / "config.json").read_text())["sampling"] == config["sampling"]
    assert (run / "samples" / "step_00000004.png").is_file() and (run / "samples" / "latest.png").is_file()
    import cv2
    # loss and PSNR curves, redrawn at each validation; the autoencoder's with a third panel, sharpness
    for folder, width in ((ae_run, 1440), (run, 990)):
        curves = cv2.imread(str(folder / "curves.png"))
        assert curves is not None and curves.shape[:2] == (360, width)
    ae_metrics = [json.loads(x) for x in (ae_run / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("val_sharpness", 0) > 0 and m.get("val_sharpness_real", 0) > 0 for m in ae_metrics)
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("psnr_tf" in m and "psnr_copy_last" in m for m in metrics)
    assert (run / "cache" / "train_latents.safetensors").is_file()
    # the export plays
    from worldmodel.inference.engine import WorldModel
    from worldmodel.game.action import Action
    wm = WorldModel.from_pretrained(run / "export", device="cpu")
    assert wm.steps == 3
    training = wm.info["training"]
    assert training["steps"] == 4 and training["maps"] == ["MAP01", "MAP02"] and training["hardware"]
    assert training["validation_maps"] == ["MAP21"]
    from worldmodel.data import dataset as D
    ds = D.ClipDataset(data, clip_len=3, maps=["MAP21"])
    clip = ds[0]
    wm.reset(clip["frames"].numpy(), [Action.from_vector(a) for a in clip["actions"]])
    frame = wm.step(Action(move=1))
    assert frame.shape == (32, 32, 3) and frame.dtype == np.uint8
    # resuming a finished run: nothing to do, the latent cache is reused; the schedule's shift must stay
    resume = ["train", "model", "--data", str(data), "--autoencoder", str(ae_run), "--out", str(run),
              "--steps", "4", "--batch", "2", "--resume", "--threads", "1", "--no-progress", "--eval-clips", "2",
              *TINY_SET, "--set", "sample_steps=3"]
    capsys.readouterr()
    assert main([*resume, "--set", "sample_shift=2"]) == 2
    assert "started with --set sample_shift=1.0" in capsys.readouterr().err
    assert main(resume) == 0


def test_cli_errors_are_one_line(tmp_path, capsys):
    from worldmodel.cli import main
    data = make_dataset(tmp_path / "data", maps=("MAP21",))
    rc = main(["train", "autoencoder", "--data", str(data), "--out", str(tmp_path / "ae"), "--steps", "1",
               "--no-progress", *TINY_SET])
    err = capsys.readouterr().err
    assert rc == 2 and "no frames on the train maps" in err
    rc = main(["train", "autoencoder", "--data", str(data), "--out", str(tmp_path / "ae"), "--maps", "MAP30",
               "--no-progress", *TINY_SET])
    assert rc == 2 and "held-out" in capsys.readouterr().err
    train_data = make_dataset(tmp_path / "train", maps=("MAP01",))
    ae_args = ["train", "autoencoder", "--data", str(train_data), "--out", str(tmp_path / "gan"), "--steps", "1",
               "--batch", "4", "--threads", "1", "--no-progress", *TINY_SET]
    assert main([*ae_args, "--adv-weight", "0.1"]) == 0
    capsys.readouterr()
    rc = main([*ae_args, "--steps", "2", "--resume"])  # resumed without the critic it was started with
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "started with --adv-weight" in err.splitlines()[-1] and "Traceback" not in err
    rc = main(["train", "model", "--data", str(data), "--autoencoder", str(tmp_path / "none"),
               "--out", str(tmp_path / "m"), "--no-progress"])
    assert rc == 2 and "no such autoencoder" in capsys.readouterr().err


def test_set_sample_steps_sets_the_runs_sampling_defaults_not_the_architecture():
    from worldmodel.errors import UserError
    from worldmodel.training.config import parse_overrides, resolve_config, resolve_sampling
    overrides = parse_overrides(["sample_steps=2", "dim=128", "sample_shift=1.5"])
    assert resolve_sampling(overrides) == SamplingDefaults(steps=2, shift=1.5)
    assert resolve_config("tiny", overrides).dim == 128
    assert resolve_sampling(parse_overrides(["dim=128"])) == SamplingDefaults()
    with pytest.raises(UserError, match="sampling steps must be an integer >= 1"):
        resolve_sampling(parse_overrides(["sample_steps=0"]))


def _active_model(cfg, seed=0):
    torch.manual_seed(seed)
    model = WorldTransformer(cfg)
    with torch.no_grad():
        for p in model.parameters():  # adaLN-Zero would make the blocks identities
            p.normal_(0.0, 0.05)
    return model


@pytest.mark.parametrize("prev_frame", [False, True])
def test_self_forced_rollout_is_the_engines_rollout(prev_frame):
    """The self-made context of Self Forcing comes from the engine's own sampling path: for the same seed,
    context and actions, `self_forced_clip` holds exactly the latents `WorldModel.step` generates."""
    from worldmodel.game.action import Action, decode_actions
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.inference.engine import WorldModel

    cfg = tiny_config(prev_frame=prev_frame)
    model = _active_model(cfg).eval()
    ae = Autoencoder(cfg.autoencoder).eval()
    g = torch.Generator().manual_seed(5)
    frames = torch.randint(0, 256, (cfg.clip_frames, *cfg.frame_size, 3), generator=g, dtype=torch.uint8)
    acts = decode_actions(torch.rand(cfg.clip_frames, cfg.action_dim, generator=g) * 2 - 1)
    acts = [Action(move=a.move, strafe=a.strafe, turn=a.turn) for a in acts]
    real, k, seed = 3, 2, 1234
    wm = WorldModel(cfg, ae, model, device="cpu", dtype="float32", seed=seed, sampling=SamplingDefaults(steps=2))
    latents = wm.encode(frames)[None].float()  # (1, F, C, h, w): what the engine sees of the frames
    a = torch.stack([x.to_tensor() for x in acts])[None]
    clip = self_forced_clip(model, cfg, latents, a, real, k, steps=2, seed=seed, shift=1.0)
    wm.reset(frames[:real].numpy(), acts[:real])
    engine = []
    for i in range(k):
        wm.step(acts[real + i])
        engine.append(wm.sampler._pending[-1][0])  # the latent the engine just generated (B, 1, C, h, w)
    torch.testing.assert_close(clip[:, real:real + k], torch.cat(engine, 1), rtol=0, atol=1e-6)
    assert torch.equal(clip[:, :real], latents[:, :real]) and torch.equal(clip[:, real + k:], latents[:, real + k:])
    assert not torch.allclose(clip[:, real:real + k], latents[:, real:real + k])


def test_self_forcing_layout_and_training_run(tmp_path):
    g = torch.Generator().manual_seed(0)
    t, w = self_forcing_layout(4, 6, real=2, k=3, context_max=0.3, g=g)
    assert (t[:, :5] <= 0.3).all() and w[:, 2:5].sum() == 0 and w[:, :2].eq(1).all() and w[:, 5].eq(1).all()
    cfg = tiny_config(prev_frame=True)
    data = synthetic_latents(cfg)
    s = train_model(data, tmp_path / "sf", cfg, quick(steps=3, self_forcing=2, self_forcing_prob=1.0))
    assert len(s["losses"]) == 3 and all(np.isfinite(s["losses"]))


def test_self_forcing_flags_refuse_bad_values(tmp_path, capsys):
    from worldmodel.cli import main
    for flags, what in ((["--self-forcing", "-1"], "--self-forcing"), (["--self-forcing-prob", "1.5"], "--self-forcing"),
                        (["--max-time", "-5"], "--max-time")):
        rc = main(["train", "model", "--data", str(tmp_path), "--autoencoder", str(tmp_path), "--out",
                   str(tmp_path / "m"), "--no-progress", *flags])
        err = capsys.readouterr().err.strip()
        assert rc == 2 and what in err and len(err.splitlines()) == 1, err


def test_spread_shards_takes_whole_shards_evenly():
    manifest = {"shards": [{"name": f"s{i:02d}", "frames": 100, "maps": ["MAP01" if i < 10 else "MAP02"]}
                           for i in range(12)]}
    names, total = spread_shards(manifest, ["MAP01"], 300)
    assert names == {"s00", "s04", "s09"} and total == 300  # first, middle, last of MAP01's ten
    everything, n = spread_shards(manifest, ["MAP01", "MAP02"], None)
    assert len(everything) == 12 and n == 1200
    assert spread_shards(manifest, ["MAP01"], 5000) == ({f"s{i:02d}" for i in range(10)}, 1000)
