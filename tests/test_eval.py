"""`worldmodel eval` and worldmodel/metrics.py: metrics right on known cases, the pipeline end to end,
held-out maps refused."""
import json
import math

import cv2
import numpy as np
import pytest

from worldmodel import evaluate
from worldmodel.cli import main
from helpers import make_checkpoint
from worldmodel.metrics import (flow_cosine, frame_motion, frame_stats, mean_psnr, motion, optical_flow, psnr,
                                ssim)



def texture(h=200, w=260, seed=0):
    """Smooth random colour texture (something optical flow can follow)."""
    rng = np.random.default_rng(seed)
    t = cv2.GaussianBlur(rng.random((h, w, 3)).astype(np.float32), (0, 0), 2.0)
    return ((t - t.min()) / (t.max() - t.min()) * 255).astype(np.uint8)


BIG = texture()
FRAME = BIG[50:146, 60:188]  # 96 x 128


def shifted(dx, dy):
    """The view moved so that the content moves by (dx, dy) pixels."""
    return BIG[50 - dy:146 - dy, 60 - dx:188 - dx]


def zoomed(scale):
    H, W = FRAME.shape[:2]
    m = cv2.getRotationMatrix2D(((W - 1) / 2, (H - 1) / 2), 0, scale)
    return cv2.warpAffine(FRAME, m, (W, H), borderMode=cv2.BORDER_REFLECT)


# -- fidelity metrics ------------------------------------------------------------------------------
def test_identical_frames_score_maximally():
    assert psnr(FRAME, FRAME) == math.inf
    assert ssim(FRAME, FRAME) == pytest.approx(1.0)
    assert mean_psnr([math.inf, 20.0]) == pytest.approx(60.0)  # inf counts as the 100 dB cap


def test_psnr_and_ssim_known_values():
    a = np.full((32, 32, 3), 100, np.uint8)
    assert psnr(a, a + 10) == pytest.approx(20 * math.log10(255 / 10))
    assert ssim(FRAME, shifted(2, 0)) < ssim(FRAME, shifted(1, 0)) < 1.0
    noise = np.random.default_rng(1).integers(0, 256, FRAME.shape, dtype=np.uint8)
    assert abs(ssim(FRAME, noise)) < 0.1
    with pytest.raises(ValueError):
        psnr(FRAME, FRAME[:10])


class CopyLastModel:
    """A 'model' that repeats the last context frame: it must score exactly the copy-last baseline."""

    frame_size = (96, 128)

    def reset(self, frames, actions):
        self.last = frames[-1].copy()

    def step(self, action):
        return self.last.copy()


def test_copy_last_model_scores_the_baseline():
    ep = evaluate.Episode("freedoom2", "MAP21", 0, (96, 128), context=4, warmup=40, policy_seed=0)
    try:
        out = evaluate.fidelity(CopyLastModel(), ep, horizon=12)
    finally:
        ep.close()
    assert len(out["psnr"]) == 12
    assert out["psnr"] == out["psnr_copy"] and out["ssim"] == out["ssim_copy"]


# -- motion from optical flow ----------------------------------------------------------------------
@pytest.mark.parametrize("dx,dy", [(2, 0), (-2, 0), (3, -1), (0, 2)])
def test_a_shifted_image_gives_the_expected_flow(dx, dy):
    m = frame_motion(FRAME, shifted(dx, dy))
    assert m["tx"] == pytest.approx(dx, abs=0.15) and m["ty"] == pytest.approx(dy, abs=0.15)
    assert abs(m["zoom"]) < 0.005  # a translation is not a zoom


@pytest.mark.parametrize("scale", [1.05, 0.95])
def test_a_zoomed_image_gives_divergence_not_translation(scale):
    m = frame_motion(FRAME, zoomed(scale))
    assert m["zoom"] == pytest.approx(scale - 1, abs=0.01) and m["divergence"] == pytest.approx(2 * m["zoom"])
    assert abs(m["tx"]) < 0.2 and abs(m["ty"]) < 0.2


def test_flow_cosine():
    f_right, f_left = optical_flow(FRAME, shifted(2, 0)), optical_flow(FRAME, shifted(-2, 0))
    assert flow_cosine(f_right, f_right) == pytest.approx(1.0)
    assert flow_cosine(f_right, f_left) < -0.9
    assert flow_cosine(f_right, np.zeros_like(f_right)) == 0.0
    assert motion(np.zeros((96, 128, 2), np.float32))["tx"] == 0.0


def test_frame_stats():
    s, b = frame_stats(FRAME), frame_stats(cv2.GaussianBlur(FRAME, (0, 0), 2.0))
    assert b["sharpness"] < s["sharpness"] and b["brightness"] == pytest.approx(s["brightness"], abs=2)
    flat = frame_stats(np.full((96, 128, 3), 77, np.uint8))
    assert flat["brightness"] == pytest.approx(77, abs=0.5) and flat["contrast"] == 0 and flat["sharpness"] == 0


def test_controllability_scoring():
    def probe(tx_model, tx_real, zoom_model, zoom_real):
        out = {}
        for name, (_, field, _) in evaluate.PROBES.items():
            sign = 1 if name in ("turn_left", "forward") else -1
            m = {"tx": sign * tx_model, "zoom": sign * zoom_model, "ty": 0, "magnitude": 1}
            r = {"tx": sign * tx_real, "zoom": sign * zoom_real, "ty": 0, "magnitude": 1}
            out[name] = {"field": field, "expected_sign": sign, "model": m, "real": r, "flow_cosine": 0.5}
        return out

    good = evaluate.score_controllability([probe(3.0, 4.0, 0.03, 0.05)] * 2)
    assert good["overall"]["model_direction_correct"] == 1.0 and good["overall"]["agreement_with_real"] == 1.0
    assert good["probes"]["turn_right"]["magnitude_ratio"] == pytest.approx(0.75)
    backwards = evaluate.score_controllability([probe(-3.0, 4.0, -0.03, 0.05)])
    assert backwards["overall"]["model_direction_correct"] == 0.0 and backwards["overall"]["agreement_with_real"] == 0.0
    still = evaluate.score_controllability([probe(0.01, 4.0, 0.0001, 0.05)])  # below the noise floor: no motion
    assert still["overall"]["model_direction_correct"] == 0.0
    # a probe where the real game did not move (blocked) counts in model_direction_correct but not in
    # model_correct_where_real_moved, which only scores the probes the game itself moved as expected
    mixed = evaluate.score_controllability([probe(3.0, 4.0, 0.03, 0.05), probe(3.0, 0.0, 0.03, 0.0),
                                            probe(-3.0, 0.0, -0.03, 0.0)])
    fwd = mixed["probes"]["forward"]
    assert fwd["model_direction_correct"] == pytest.approx(2 / 3) and fwd["n_real_moved"] == 1
    assert fwd["model_correct_where_real_moved"] == 1.0 and mixed["overall"]["model_correct_where_real_moved"] == 1.0
    blocked = evaluate.score_controllability([probe(3.0, 0.0, 0.03, 0.0)])
    assert blocked["probes"]["forward"]["model_correct_where_real_moved"] is None
    assert blocked["overall"]["model_correct_where_real_moved"] is None


def test_real_game_probes_move_the_right_way():
    """The probes themselves, on the real game (model = the real game's copy-last, i.e. no motion)."""
    ep = evaluate.Episode("freedoom2", "MAP21", 0, (96, 128), context=4, warmup=0, policy_seed=0)
    try:
        probes = evaluate.probe(CopyLastModel(), ep, frames=8)
    finally:
        ep.close()
    assert probes["turn_right"]["real"]["tx"] < -1 and probes["turn_left"]["real"]["tx"] > 1
    assert probes["forward"]["real"]["zoom"] > 0.01
    assert abs(probes["turn_right"]["model"]["tx"]) < 1e-3  # a still image has no flow


# -- the command -----------------------------------------------------------------------------------


def test_eval_end_to_end(tmp_path, capsys):
    ckpt = make_checkpoint(tmp_path / "small")
    out = tmp_path / "ev"
    rc = main(["eval", "--checkpoint", ckpt, "--device", "cpu", "--maps", "MAP21,MAP22", "--episodes", "1",
               "--horizons", "1,3,6", "--warmup", "20", "--probe-frames", "3", "--stability-frames", "12",
               "--sample-every", "4", "--videos", "--out", str(out), "--no-progress"])
    assert rc == 0
    shown = capsys.readouterr().out
    assert "PSNR" in shown and "controllability" in shown and "stability" in shown
    r = json.loads((out / "eval.json").read_text())
    assert r["maps"] == ["MAP21", "MAP22"] and r["horizons"] == [1, 3, 6] and r["fidelity"]["episodes"] == 2
    for h in ("1", "3", "6"):
        row = r["fidelity"]["horizons"][h]
        assert row["n"] == 2
        for k in ("psnr", "psnr_copy", "ssim", "ssim_copy", "psnr_gain_over_copy"):
            assert isinstance(row[k], float)
    assert len(r["fidelity"]["curve"]["psnr"]) == 6
    c = r["controllability"]
    assert set(c["probes"]) == set(evaluate.PROBES) and c["overall"]["real_direction_correct"] is not None
    st = r["stability"]
    assert st["frames"] == 12 and st["samples"]["frame"] == [4, 8, 12]
    assert set(st["in_real_range"]) == {"brightness", "contrast", "sharpness"}
    assert st["memory_flat"]["ratio_last_first"] > 0 and st["latency_flat"] is not None
    assert r["real_frame_stats"]["frames"] > 20
    for png in ("fidelity.png", "controllability.png", "stability.png"):
        assert (out / png).read_bytes()[:4] == b"\x89PNG"
    assert (out / "MAP21_ep0.mp4").exists() and (out / "MAP22_ep0.actions.jsonl").exists()


@pytest.mark.parametrize("wad,maps", [("freedoom2", "MAP21,MAP27"), ("freedoom2", "MAP25-MAP26"),
                                      ("freedoom1", "E1M1")])
def test_eval_refuses_held_out_maps(tmp_path, capsys, wad, maps):
    rc = main(["eval", "--preset", "tiny", "--wad", wad, "--maps", maps, "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "held-out" in err
    assert not (tmp_path / "ev").exists()


def test_eval_bad_flags(tmp_path, capsys):
    assert main(["eval", "--preset", "tiny", "--maps", "MAP99", "--out", str(tmp_path / "e")]) == 2
    assert "MAP99" in capsys.readouterr().err
    assert main(["eval", "--preset", "tiny", "--horizons", "0,8", "--out", str(tmp_path / "e")]) == 2
    assert "--horizons" in capsys.readouterr().err
