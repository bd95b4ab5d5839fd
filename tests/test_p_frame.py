"""The P-frame decoder (`ae_p_frame`): the warp moves pixels by the flow, the decoder refuses to decode
without the previous frame, training it alone leaves the encoder bit-identical, the engine decodes each
frame against the one it showed last (the context's last frame first), and `train attach-decoder` gives
a checkpoint the new decoder only when its encoder is the checkpoint's own."""
import json

import numpy as np
import pytest
import torch

from worldmodel.game.action import Action
from worldmodel.model.autoencoder import Autoencoder, AutoencoderConfig, warp
from worldmodel.training.autoencoder import load_autoencoder, train_autoencoder
from worldmodel.training.config import AutoencoderTrainConfig
from test_engine import changing_actions, context, small_model
from test_model import tiny_config
from test_train import TINY_SET, make_dataset


def test_warp_moves_pixels_by_the_flow():
    g = torch.Generator().manual_seed(0)
    images = torch.randn(2, 3, 12, 16, generator=g)
    assert torch.allclose(warp(images, torch.zeros(2, 2, 12, 16)), images, atol=1e-6)
    flow = torch.zeros(2, 2, 12, 16)
    flow[:, 0], flow[:, 1] = 3.0, -2.0  # out[y, x] = images[y - 2, x + 3]
    out = warp(images, flow)
    assert torch.allclose(out[..., 2:, :-3], images[..., :-2, 3:], atol=1e-5)
    half = warp(images, flow * 0.5 / 1.5)  # a fractional shift interpolates between neighbours
    assert not torch.allclose(half, images) and half.abs().max() <= images.abs().max() + 1e-6


def test_p_frame_decoder_needs_the_previous_frame_and_copies_it_when_the_mask_says_so():
    torch.manual_seed(0)
    ae = Autoencoder(AutoencoderConfig(frame_size=(32, 48), channels=(8, 8, 8, 8), res_blocks=(0, 0, 0, 0),
                                       latent_channels=4, p_frame=True)).eval()
    z = torch.randn(1, 4, 2, 3)
    prev = torch.randint(0, 256, (1, 32, 48, 3), dtype=torch.uint8)
    with pytest.raises(ValueError, match="previous frame"):
        ae.decode_uint8(z)
    with torch.no_grad():
        blend = ae.decoder.p_frame.blend[-1]
        blend.bias[0] = 40.0  # the mask says: the warped previous frame everywhere
        ae.decoder.p_frame.log_temperature.fill_(30.0)  # matching weighs every shift alike: no matched motion
        ae.decoder.p_frame.motion[-1].bias[0] = 1.0 / ae.decoder.p_frame.FLOW_SCALE  # one pixel to the right
    out = ae.decode_uint8(z, prev)
    assert torch.equal(out[:, :, :-1], prev[:, :, 1:])  # the previous frame, moved one pixel
    other = ae.decode_uint8(z, prev.flip(2))
    assert not torch.equal(out, other)


def test_block_matching_finds_the_shift_between_two_frames():
    """The motion the decoder starts from, before any training: a frame that is the previous one moved
    by (8, -4) pixels gets a flow of (8, -4) away from the edges."""
    from worldmodel.model.autoencoder import MotionBlend

    g = torch.Generator().manual_seed(0)
    prev = torch.nn.functional.interpolate(torch.rand(1, 3, 12, 16, generator=g) * 2 - 1, size=(48, 64),
                                           mode="bilinear", align_corners=False)  # a smooth picture
    flow = torch.zeros(1, 2, 48, 64)
    flow[:, 0], flow[:, 1] = 8.0, -4.0
    image = warp(prev, flow)  # image[p] = prev[p + (8, -4)]
    with torch.no_grad():
        got = MotionBlend(8).flow(image, prev)
    inner = got[:, :, 12:-12, 16:-16]
    assert (inner[:, 0] - 8.0).abs().mean() < 1.0 and (inner[:, 1] + 4.0).abs().mean() < 1.0, inner.mean((2, 3))


def clips(n=16, frames=4, size=32, seed=0):
    """Clips of a texture moving one pixel a frame to the left: the next frame is mostly the one before."""
    g = torch.Generator().manual_seed(seed)
    texture = torch.randint(0, 256, (n, size, size + frames, 3), generator=g, dtype=torch.uint8)
    return torch.stack([texture[:, :, j:j + size] for j in range(frames)], 1)  # (n, F, H, W, 3)


def test_p_frame_decoder_trains_alone_and_the_encoder_stays_bit_identical(tmp_path):
    cfg = tiny_config()
    frames = clips().flatten(0, 1)
    tc = dict(steps=2, batch=8, warmup=1, log_every=1, val_every=100, ckpt_every=100, device="cpu", progress=False,
              val_frames=8, calibrate_frames=32)
    train_autoencoder(frames, tmp_path / "ae", cfg, AutoencoderTrainConfig(**tc))
    before, _ = load_autoencoder(tmp_path / "ae")
    pcfg = tiny_config(ae_p_frame=True)
    s = train_autoencoder(clips(), tmp_path / "dec", pcfg, AutoencoderTrainConfig(
        **{**tc, "steps": 3, "init": str(tmp_path / "ae"), "decoder_only": True, "crop": (16, 16),
           "val_frames": 32}), clips(4, 8, seed=1))
    after, config = load_autoencoder(tmp_path / "dec")
    assert after.cfg.p_frame and config["model"]["ae_p_frame"]
    assert np.isfinite(s["val_psnr"]) and s["val_frames"] == 4 * 7  # 7 frames of each clip decoded in a chain
    b, a = before.state_dict(), after.state_dict()
    fixed = [k for k in b if not k.startswith("decoder.")]
    assert fixed and all(torch.equal(b[k], a[k]) for k in fixed)
    assert any(k.startswith("decoder.p_frame.") for k in a)
    assert any(not torch.equal(b[k], a[k]) for k in b if k.startswith("decoder."))
    from worldmodel.errors import UserError
    with pytest.raises(UserError, match=r"\(N, F, 32, 32, 3\)"):  # a P-frame decoder trains on clips
        train_autoencoder(frames, tmp_path / "flat", pcfg, AutoencoderTrainConfig(**tc))


def test_engine_decodes_each_frame_against_the_one_it_showed_last():
    acts = changing_actions(5)
    wm = small_model(steps=2, cfg={"ae_p_frame": True})
    with torch.no_grad():  # a decoder that leans on the previous frame, and moves it
        wm.autoencoder.decoder.p_frame.blend[-1].bias[0] = 1.0
        wm.autoencoder.decoder.p_frame.motion[-1].bias.fill_(0.5)
    ctx_frames, ctx_actions = context(wm)
    wm.reset(ctx_frames, ctx_actions)
    shown = [wm.step(a) for a in acts]
    ref = small_model(steps=2, cfg={"ae_p_frame": True})
    ref.autoencoder.load_state_dict(wm.autoencoder.state_dict())
    ref.reset(ctx_frames, ctx_actions)
    prev = torch.from_numpy(ctx_frames[-1:])
    with torch.inference_mode():
        for i, a in enumerate(acts):
            latent = ref.sampler.next(a.to_tensor().view(1, 1, -1))[:, 0]
            prev = ref.autoencoder.decode_uint8(latent.contiguous(memory_format=torch.channels_last), prev)
            assert np.array_equal(prev[0].numpy(), shown[i]), i
    # a new context: the first frame is decoded against its last frame, not the frame shown before
    other = ctx_frames.copy()
    other[-1] = 255 - other[-1]
    wm.reset(other, ctx_actions)
    ref.reset(ctx_frames, ctx_actions)
    assert not np.array_equal(wm.step(acts[0]), ref.step(acts[0]))


def test_attach_decoder_refuses_another_encoder_and_the_checkpoint_plays(tmp_path, capsys):
    from worldmodel.cli import main
    from worldmodel.inference.engine import WorldModel
    from worldmodel.model.checkpoint import save_pretrained
    from worldmodel.model.transformer import WorldTransformer

    data = make_dataset(tmp_path / "data")
    common = ["--data", str(data), "--steps", "2", "--batch", "4", "--val-every", "2", "--ckpt-every", "2",
              "--threads", "1", "--no-progress", *TINY_SET]
    assert main(["train", "autoencoder", "--out", str(tmp_path / "ae"), *common]) == 0
    assert main(["train", "autoencoder", "--out", str(tmp_path / "ae2"), "--seed", "1", *common]) == 0
    ae, config = load_autoencoder(tmp_path / "ae")
    cfg = tiny_config()
    save_pretrained(tmp_path / "ckpt", cfg, ae, WorldTransformer(cfg), {"note": "kept"})
    assert main(["train", "autoencoder", "--out", str(tmp_path / "dec"), "--init", str(tmp_path / "ckpt"),
                 "--decoder-only", "--set", "ae_p_frame=true", "--clip-frames", "3", *common]) == 0
    assert "clips of 3 frames" in capsys.readouterr().out
    assert main(["train", "autoencoder", "--out", str(tmp_path / "bad"), "--set", "ae_p_frame=true",
                 "--clip-frames", "1", *common]) == 2
    assert "--clip-frames must be at least 2" in capsys.readouterr().err
    assert main(["train", "attach-decoder", "--checkpoint", str(tmp_path / "ckpt"), "--autoencoder",
                 str(tmp_path / "ae2"), "--out", str(tmp_path / "mixed")]) == 2
    err = capsys.readouterr().err
    assert "encoder is not the one" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "mixed").exists()
    assert main(["train", "attach-decoder", "--checkpoint", str(tmp_path / "ckpt"), "--autoencoder",
                 str(tmp_path / "dec"), "--out", str(tmp_path / "new")]) == 0
    new = json.loads((tmp_path / "new" / "config.json").read_text())
    assert new["model"]["ae_p_frame"] and new["info"]["note"] == "kept" and new["info"]["decoder"]["p_frame"]
    assert (tmp_path / "new" / "transformer.safetensors").read_bytes() == \
        (tmp_path / "ckpt" / "transformer.safetensors").read_bytes()
    wm = WorldModel.from_pretrained(tmp_path / "new", device="cpu")
    assert wm.cfg.ae_p_frame
    H, W = wm.frame_size
    wm.reset(np.zeros((3, H, W, 3), np.uint8), [Action()] * 3)
    assert wm.step(Action(move=1)).shape == (H, W, 3)


def test_read_clips_cuts_consecutive_frames_of_one_episode(tmp_path):
    """Clips for a P-frame decoder: each is consecutive frames of one episode (episodes that end in the
    middle of a shard and go on in the next), never across an episode's end."""
    from worldmodel.data import dataset as D, writer
    from worldmodel.training.clips import read_clips

    manifest = writer.new_manifest((8, 8))
    rows = [(e, i) for e, n in ((0, 11), (1, 9), (2, 12)) for i in range(n)]
    for s in range(0, len(rows), 16):  # shards of 16 rows
        part = rows[s:s + 16]
        ep = np.array([e for e, _ in part], np.int64)
        fi = np.array([i for _, i in part], np.int32)
        frames = np.zeros((len(part), 8, 8, 3), np.uint8)
        frames[..., 0], frames[..., 1] = ep[:, None, None], fi[:, None, None]  # each frame says which it is
        arrays = {"frames": frames, "actions": np.zeros((len(part), 5), np.float32), "episode": ep,
                  "frame_index": fi, "map": np.array(["MAP01"] * len(part), D.MAP_DTYPE)}
        manifest["shards"].append(writer.write_shard(tmp_path, f"shards/s{s:03d}.npz", arrays))
    writer.write_manifest(tmp_path, manifest)
    clips, maps = read_clips(tmp_path, "train", 3, progress=False)
    assert len(clips) >= 6 and maps == ["MAP01"]
    for clip in clips:
        episode, index = clip[:, 0, 0, 0].long(), clip[:, 0, 0, 1].long()
        assert (episode == episode[0]).all() and torch.equal(index - index[0], torch.arange(3)), clip[:, 0, 0]
