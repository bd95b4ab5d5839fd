"""`worldmodel eval` (worldmodel/evaluation: evaluate.py, rollouts.py, eval_report.py) and worldmodel/metrics.py:
metrics right on known cases, the pipeline end to end (validation maps; a level model's held-out episodes,
several models on the same real frames), every number of the result finite, held-out maps refused."""
import json
import math
import re

import cv2
import numpy as np
import pytest

from worldmodel.evaluation import eval_report, evaluate, rollouts
from worldmodel.cli import main
from worldmodel.game.level import EVAL_STARTS
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
    ep = rollouts.Episode("freedoom2", "MAP21", 0, (96, 128), context=4, warmup=40, policy_seed=0)
    try:
        out = rollouts.fidelity(CopyLastModel(), ep, horizon=12)
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
        for name, (_, field, sign) in rollouts.PROBES.items():
            m = {"tx": sign * tx_model, "zoom": sign * zoom_model, "ty": 0, "magnitude": 1}
            r = {"tx": sign * tx_real, "zoom": sign * zoom_real, "ty": 0, "magnitude": 1}
            out[name] = {"field": field, "expected_sign": sign, "model": m, "real": r, "flow_cosine": 0.5}
        return out

    good = eval_report.score_controllability([probe(3.0, 4.0, 0.03, 0.05)] * 2)
    assert good["overall"]["model_direction_correct"] == 1.0 and good["overall"]["agreement_with_real"] == 1.0
    assert good["probes"]["turn_right"]["magnitude_ratio"] == pytest.approx(0.75)
    backwards = eval_report.score_controllability([probe(-3.0, 4.0, -0.03, 0.05)])
    assert backwards["overall"]["model_direction_correct"] == 0.0 and backwards["overall"]["agreement_with_real"] == 0.0
    still = eval_report.score_controllability([probe(0.01, 4.0, 0.0001, 0.05)])  # below the noise floor: no motion
    assert still["overall"]["model_direction_correct"] == 0.0
    # a probe where the real game did not move (blocked) counts in model_direction_correct but not in
    # model_correct_where_real_moved, which only scores the probes the game itself moved as expected
    mixed = eval_report.score_controllability([probe(3.0, 4.0, 0.03, 0.05), probe(3.0, 0.0, 0.03, 0.0),
                                            probe(-3.0, 0.0, -0.03, 0.0)])
    fwd = mixed["probes"]["forward"]
    assert fwd["model_direction_correct"] == pytest.approx(2 / 3) and fwd["n_real_moved"] == 1
    assert fwd["model_correct_where_real_moved"] == 1.0 and mixed["overall"]["model_correct_where_real_moved"] == 1.0
    blocked = eval_report.score_controllability([probe(3.0, 0.0, 0.03, 0.0)])
    assert blocked["probes"]["forward"]["model_correct_where_real_moved"] is None
    assert blocked["overall"]["model_correct_where_real_moved"] is None


def test_real_game_probes_move_the_right_way():
    """The probes themselves, on the real game (model = the real game's copy-last, i.e. no motion)."""
    ep = rollouts.Episode("freedoom2", "MAP21", 0, (96, 128), context=4, warmup=0, policy_seed=0)
    try:
        probes = rollouts.probe(CopyLastModel(), ep, frames=8)
    finally:
        ep.close()
    assert probes["turn_right"]["real"]["tx"] < -1 and probes["turn_left"]["real"]["tx"] > 1
    assert probes["forward"]["real"]["zoom"] > 0.01
    # strafing slides the view sideways: the scene moves against the strafe, like a turn the same way
    assert probes["strafe_right"]["real"]["tx"] < -1 and probes["strafe_left"]["real"]["tx"] > 1
    assert abs(probes["turn_right"]["model"]["tx"]) < 1e-3  # a still image has no flow


# -- the command -----------------------------------------------------------------------------------


def test_eval_end_to_end(tmp_path, capsys, make_checkpoint):
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
    assert set(c["probes"]) == set(rollouts.PROBES) and c["overall"]["real_direction_correct"] is not None
    st = r["stability"]
    assert st["frames"] == 12 and st["samples"]["frame"] == [4, 8, 12]
    assert set(st["in_real_range"]) == {"brightness", "contrast", "sharpness"}
    assert st["memory_flat"]["ratio_last_first"] > 0 and st["latency_flat"] is not None
    assert r["real_frame_stats"]["frames"] > 20
    assert r["complete"] and not_finite(r) == []
    plots_written(r, out, {"fidelity.png", "controllability.png", "stability.png"})
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


# -- a level model: held-out episodes of its level, several models in one run -----------------------------
def test_level_episodes_are_never_training_episodes():
    """By construction: every level-eval episode starts at one of the level's evaluation start places
    with an evaluation (odd) seed, whatever --seed and --episodes; training (collect --starts level)
    never starts there nor uses such a seed."""
    from worldmodel.data import units as C
    from worldmodel.game.level import episode_seed, load_level

    lv = load_level("freedoom2", "MAP01")
    ev_cells = {tuple(c) for c in lv.starts("eval")}
    train_cells = {tuple(c) for c in lv.starts("train")}
    train_plan = C.plan(C.CollectConfig(frames=64 * 200, maps=["MAP01"], starts="level", episode_frames=64,
                                        shard_frames=64, warmup_frames=0))
    train_seeds = {u.seed for u in train_plan} | {episode_seed("train", v) for v in range(10_000)}
    for seed in (0, 1, 977, 2 ** 31 - 2):
        for n in (1, 5, EVAL_STARTS, 2 * EVAL_STARTS + 3):
            eps = evaluate.level_episodes(lv, n, seed)
            cells = [tuple(e["start"]["cell"]) for e in eps]
            assert len(eps) == n and set(cells) <= ev_cells and not set(cells) & train_cells
            assert all(e["seed"] % 2 == 1 and e["seed"] == e["policy_seed"] for e in eps)
            assert not {e["seed"] for e in eps} & train_seeds and len({e["seed"] for e in eps}) == n
            assert all(tuple(lv.cell_of(np.array([[e["start"]["x"], e["start"]["y"]]]))[0]) == c
                       for e, c in zip(eps, cells))
            assert all(0 <= e["start"]["heading"] < 360 for e in eps)
            if n >= EVAL_STARTS:  # all of the level's evaluation start places, each as often
                assert set(cells) == ev_cells and set(cells[:EVAL_STARTS]) == ev_cells
    # a few episodes are already spread over the level: 4 of them lie farther apart than 4 neighbours do
    xy = lambda eps: np.array([[e["start"]["x"], e["start"]["y"]] for e in eps])  # noqa: E731
    spread = lambda p: min(np.linalg.norm(a - b) for i, a in enumerate(p) for b in p[i + 1:])  # noqa: E731
    assert spread(xy(evaluate.level_episodes(lv, 4))) > 3 * spread(xy(evaluate.level_episodes(lv, EVAL_STARTS)))


RAW_PSNR = re.compile(r"\.per_episode\[\d+\]\.psnr(_copy)?\[\d+\]$")  # one frame's PSNR, before the cap


def not_finite(o, path=""):
    """The paths of the numbers in an eval result that are not finite: every number must be finite or null
    (not measured), except a raw per-frame PSNR of identical frames, which JSON holds as "inf"."""
    bad = []
    if isinstance(o, dict):
        for k, v in o.items():
            bad += not_finite(v, f"{path}.{k}")
    elif isinstance(o, list):
        for i, v in enumerate(o):
            bad += not_finite(v, f"{path}[{i}]")
    elif isinstance(o, float) and not math.isfinite(o) or o in ("inf", "-inf", "nan"):
        if not (o == "inf" and RAW_PSNR.search(path)):
            bad.append(path)
    return bad


def test_not_finite_finds_what_json_cannot_hold():
    ok = {"a": [1.0, None, 2], "fidelity": {"per_episode": [{"psnr": [30.0, "inf"], "psnr_copy": ["inf"]}]}}
    assert not_finite(ok) == []
    assert not_finite({"x": {"y": [1.0, "nan"]}, "z": "inf", "w": float("inf")}) == [".x.y[1]", ".z", ".w"]
    assert not_finite({"fidelity": {"per_episode": [{"ssim": ["inf"]}]}}) == [".fidelity.per_episode[0].ssim[0]"]


def plots_written(r: dict, out, expected: set) -> None:
    """The plots the result lists are the expected ones, and each is a PNG on disk."""
    assert set(r["plots"]) == expected
    for png in expected:
        assert (out / png).read_bytes()[:4] == b"\x89PNG"


def test_level_eval_end_to_end_with_two_models(tmp_path, capsys, make_checkpoint):
    """A level model's checkpoint (its config names its level): eval defaults to the level's held-out
    episodes; a second model is scored on the same episodes; generalisation maps come as their own
    section; strafe probes, sharpness and stability are reported for both, every number finite."""
    from worldmodel.game.level import load_level

    level_ckpt = make_checkpoint(tmp_path / "level", seed=0, info={"level": {"wad": "freedoom2", "map": "MAP01"}})
    other = make_checkpoint(tmp_path / "other", seed=1)
    out = tmp_path / "ev"
    rc = main(["eval", "--checkpoint", level_ckpt, "--compare", other, "--device", "cpu", "--episodes", "2",
               "--horizons", "1,4", "--warmup", "20", "--probe-frames", "3", "--stability-frames", "8",
               "--sample-every", "4", "--generalisation", "MAP21", "--generalisation-episodes", "1",
               "--out", str(out), "--no-progress"])
    assert rc == 0
    shown = capsys.readouterr().out
    assert "held-out episodes of the level" in shown and "generalisation" in shown and "other" in shown
    r = json.loads((out / "eval.json").read_text())
    assert r["complete"] and r["mode"] == "level" and r["maps"] == ["MAP01"] and r["episodes"] == 2
    lv = load_level("freedoom2", "MAP01")
    ev_cells = {tuple(c) for c in lv.starts("eval")}
    assert {tuple(c) for c in r["level"]["eval_starts"]} == ev_cells
    for ep in r["episode_list"]:  # the player really started in an evaluation start cell, with an odd seed
        assert ep["seed"] % 2 == 1 and tuple(ep["start"]["cell"]) in ev_cells
        assert tuple(lv.cell_of(np.array([ep["start_position"]]))[0]) == tuple(ep["start"]["cell"])
        assert ep["start_position"][2] == pytest.approx(ep["start"]["heading"], abs=1.0)
        assert ep["frames"] == 4 and len(ep["real_sha256"]) == 64
    models = [r] + r["compared"]
    assert [m["model"]["name"] for m in models] == ["level", "other"]
    assert [row["model"] for row in r["comparison"]] == ["level", "other"]
    for h in ("1", "4"):  # the second model against the first, episode by episode
        gain = r["comparison"][1]["psnr_mean_1_to_h_vs_first"][h]
        want = [np.mean(o["psnr"][:int(h)]) - np.mean(f["psnr"][:int(h)])
                for o, f in zip(r["compared"][0]["fidelity"]["per_episode"], r["fidelity"]["per_episode"])]
        assert gain["n"] == 2 and gain["mean"] == pytest.approx(np.mean(want))
        assert gain["ci95"][0] <= gain["mean"] <= gain["ci95"][1] and gain["ahead"] == sum(w > 0 for w in want)
    assert "other against level, mean PSNR over 1..h episode by episode" in shown
    for m in models:
        assert m["fidelity"]["episodes"] == 2 and m["stability"]["frames"] == 8
        for h in ("1", "4"):
            row = m["fidelity"]["horizons"][h]
            assert row["n"] == 2 and row["sharpness"] >= 0 and row["sharpness_real"] > 0
            assert isinstance(row["sharpness_in_real_range"], bool) and isinstance(row["psnr_copy_mean_1_to_h"], float)
        probes = m["controllability"]["probes"]
        assert set(probes) == set(rollouts.PROBES)
        for name in ("strafe_right", "strafe_left"):
            assert probes[name]["n"] == 2 and probes[name]["field"] == "tx"
            assert isinstance(probes[name]["model_direction_correct"], float)
    # both models were scored against the same real frames: the copy-last baseline is the same
    assert r["fidelity"]["per_episode"] == [
        {**e, **{k: v for k, v in a.items() if k in ("psnr", "ssim", "sharpness")}}
        for e, a in zip(r["compared"][0]["fidelity"]["per_episode"], r["fidelity"]["per_episode"])]
    assert r["fidelity"]["horizons"]["1"]["psnr"] != r["compared"][0]["fidelity"]["horizons"]["1"]["psnr"]
    g = r["generalisation"]
    assert g["maps"] == ["MAP21"] and "generalis" in g["about"] and len(g["episode_list"]) == 1
    assert [row["model"] for row in g["comparison"]] == ["level", "other"]
    assert set(g["controllability"]["probes"]) == set(rollouts.PROBES) and g["compared"][0]["fidelity"]["episodes"] == 1
    assert not_finite(r) == []
    plots_written(r, out, {"fidelity.png", "controllability.png", "stability.png", "generalisation_fidelity.png",
                           "generalisation_controllability.png"})


def test_paired_gain_is_the_episodes_mean_difference_with_its_spread():
    """A model 1 dB ahead in every episode: +1 with a zero-width interval, ahead everywhere; ahead in some
    episodes and behind in others: an interval that spans the mean and zero; episodes shorter than the
    horizon are left out of both."""
    rng = np.random.default_rng(3)
    ref = [{"psnr": list(rng.uniform(12, 22, 10))} for _ in range(12)]
    up = [{"psnr": [x + 1.0 for x in e["psnr"]]} for e in ref]
    g = eval_report.paired_gain(up, ref, 10)
    assert g["n"] == 12 and g["ahead"] == 12 and g["mean"] == pytest.approx(1.0)
    assert g["ci95"] == pytest.approx([1.0, 1.0])
    mixed = [{"psnr": [x + (0.5 if i % 2 else -0.5) + 0.1 for x in e["psnr"]]} for i, e in enumerate(ref)]
    g = eval_report.paired_gain(mixed, ref, 10)
    assert g["mean"] == pytest.approx(0.1) and g["ahead"] == 6 and g["ci95"][0] < 0 < g["mean"] < g["ci95"][1]
    short = mixed[:11] + [{"psnr": mixed[11]["psnr"][:5]}]
    assert eval_report.paired_gain(short, ref, 10)["n"] == 11 and eval_report.paired_gain(short, ref, 5)["n"] == 12
    assert eval_report.paired_gain(short[11:], ref[11:], 10) is None


def test_models_in_one_run_share_the_real_frames(tmp_path, monkeypatch, make_checkpoint):
    """The real game is played once per episode, however many models are scored: two models step it
    exactly as often as one, and see bitwise the same real frames (the same hash, the same baseline),
    and the first model's numbers do not change when a second joins."""
    from worldmodel.game.doom import DoomEnv

    a, b = make_checkpoint(tmp_path / "a"), make_checkpoint(tmp_path / "b", seed=1)
    steps = []
    real_step = DoomEnv.step

    def counting_step(self, action):
        steps[-1] += 1
        return real_step(self, action)

    monkeypatch.setattr(DoomEnv, "step", counting_step)
    runs = []
    for extra in ([], ["--compare", b]):
        steps.append(0)
        out = tmp_path / f"ev{len(extra)}"
        assert main(["eval", "--checkpoint", a, *extra, "--level", "MAP01", "--device", "cpu", "--episodes", "1",
                     "--horizons", "1,5", "--warmup", "10", "--probe-frames", "3", "--stability-frames", "0",
                     "--out", str(out), "--no-progress"]) == 0
        runs.append(json.loads((out / "eval.json").read_text()))
    one, two = runs
    assert steps[0] == steps[1] > 0
    assert [e["real_sha256"] for e in one["episode_list"]] == [e["real_sha256"] for e in two["episode_list"]]
    assert one["fidelity"]["per_episode"] == two["fidelity"]["per_episode"]
    assert one["controllability"]["raw"] == two["controllability"]["raw"]
    assert not_finite(one) == not_finite(two) == []  # no stability run: null, not a number
    ours, theirs = two["fidelity"]["per_episode"][0], two["compared"][0]["fidelity"]["per_episode"][0]
    assert ours["psnr_copy"] == theirs["psnr_copy"] and ours["sharpness_real"] == theirs["sharpness_real"]
    assert ours["psnr"] != theirs["psnr"]
    real = lambda r: [{n: v["real"] for n, v in p.items()} for p in r["controllability"]["raw"]]  # noqa: E731
    assert real(two) == real(two["compared"][0])


@pytest.mark.parametrize("flags,message", [
    (["--level", "MAP21"], "training map"),
    (["--level", "MAP27"], "held-out"),
    (["--level", "MAP01", "--maps", "MAP21"], "exclude"),
    (["--maps", "MAP21", "--generalisation", "MAP22"], "--generalisation"),
    (["--level", "MAP01", "--generalisation", "MAP21,MAP30"], "held-out"),
    (["--level", "MAP01", "--generalisation", "MAP01"], "level itself"),
    (["--level", "MAP01", "--episodes", "0"], "--episodes"),
])
def test_eval_level_flags_refused(tmp_path, capsys, flags, message):
    rc = main(["eval", "--preset", "tiny", *flags, "--out", str(tmp_path / "ev")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and message in err
    assert not (tmp_path / "ev").exists()


def test_generalisation_needs_a_level_model(tmp_path, capsys, make_checkpoint):
    """Without --level, a checkpoint that is not a level model is evaluated on validation maps, where
    a generalisation section makes no sense."""
    ckpt = make_checkpoint(tmp_path / "plain")
    assert main(["eval", "--checkpoint", ckpt, "--device", "cpu", "--generalisation", "MAP21",
                 "--out", str(tmp_path / "ev")]) == 2
    assert "level model" in capsys.readouterr().err
