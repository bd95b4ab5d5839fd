"""`worldmodel bench`: every field of the JSON for a small random model on CPU, the plot, the helpers."""
import json

import numpy as np
import pytest

from worldmodel import kernels
import torch

from worldmodel.evaluation.timing import percentiles, rollout_bins
from worldmodel.evaluation.traces import trace_summary
from worldmodel.game.action import Action
from worldmodel.cli import main
from worldmodel.device import native_bf16





RESULT_FIELDS = ("rounds", "fps_rounds", "fps", "latency_ms", "warmup_s", "reset_ms", "total_s", "peak_memory_mb", "acceptance_rate",
                 "engine_stats", "latency_ms_per_frame", "frames", "warmup_frames", "speedup", "by_rollout_length")


def test_bench_json_has_every_field(tmp_path, capsys, monkeypatch, make_checkpoint):
    monkeypatch.setattr("worldmodel.device.cpu_cores", lambda: 2)  # the engine's choice for a 2-core machine
    ckpt = make_checkpoint(tmp_path / "small")
    out = tmp_path / "b" / "bench_small_cpu.json"
    rc = main(["bench", "--checkpoint", ckpt, "--device", "cpu", "--frames", "12", "--warmup", "2",
               "--steps", "1,2", "--speculative", "2", "--attention", "torch,triton", "--compile", "off",
               "--pipeline", "off", "--threads", "2", "--profile-frames", "6",
               "--trace", "blind", "--rounds", "2", "--out", str(out), "--no-progress"])
    assert rc == 0
    shown = capsys.readouterr().out
    assert "baseline" in shown and "steps=1" in shown and "p99 ms" in shown
    r = json.loads(out.read_text())
    for k in ("schema", "command", "created", "commit", "torch", "python", "device", "model", "trace", "frames",
              "warmup_frames", "memory", "baseline_settings", "baseline", "variants", "plot", "profile"):
        assert k in r, k
    assert r["command"].startswith("worldmodel ") and r["torch"] == torch.__version__
    assert r["device"]["type"] == "cpu" and r["device"]["name"] and r["device"]["threads"] >= 1
    assert r["model"]["cache_frames"] == 4 and r["model"]["tokens_per_frame"] == 48
    assert r["memory"] == "process_peak_rss" and r["frames"] == 12 and r["warmup_frames"] == 2
    # the engine's choice on 2 cores: bfloat16 with the two-GEMM attention where the CPU has native bf16
    assert r["baseline_settings"] == {"steps": 2, "speculative": 1, "attention": "matmul" if native_bf16() else "sdpa",
                                      "compile": False, "threads": 1, "pipeline": True}
    b = r["baseline"]
    for k in RESULT_FIELDS:
        assert k in b, k
    assert set(b["latency_ms"]) >= {"mean", "p50", "p90", "p99", "max"}
    assert b["latency_ms"]["p50"] <= b["latency_ms"]["p90"] <= b["latency_ms"]["p99"] <= b["latency_ms"]["max"]
    assert len(b["latency_ms_per_frame"]) == 12 and b["fps"] > 0 and b["peak_memory_mb"] > 0
    assert r["rounds"] == 2 and b["rounds"] == 2 and len(b["fps_rounds"]) == 2 and b["frames"] == 24
    assert b["by_rollout_length"][0]["frames"] == [1, 1]
    assert sum(x["frames"][1] - x["frames"][0] + 1 for x in b["by_rollout_length"]) == 12
    # steps=2 is the baseline and compile=off too: not measured again
    got = {(v["factor"], v["value"]): v for v in r["variants"]}
    assert set(got) == {("steps", 1), ("speculative", 2), ("attention", "torch"), ("attention", "triton"),
                        ("pipeline", False), ("threads", 2)}
    for key in (("steps", 1), ("speculative", 2), ("attention", "torch"), ("pipeline", False), ("threads", 2)):
        v = got[key]
        assert v["status"] == "ok" and v["speedup"] == pytest.approx(v["fps"] / b["fps"])
        for k in RESULT_FIELDS:
            assert k in v, (key, k)
    # no CUDA here: said, not crashed -- unless the Triton interpreter is on (tests/test_kernels.py sets it)
    triton_status = got[("attention", "triton")]["status"]
    if "triton" in kernels.available_backends("cpu") and native_bf16():  # the interpreter refuses the bf16 engine
        assert triton_status.startswith("failed") and "bf16" in triton_status
    elif "triton" in kernels.available_backends("cpu"):
        assert triton_status == "ok"
    else:
        assert triton_status.startswith("unavailable")
    # where a frame's time goes: every stage timed, and the stages add up to the frame
    st = r["profile"]["stages"]
    assert r["profile"]["frames"] == 6 and set(st) == {"pass_1", "passes_2_on", "commit", "sampler_other", "decode",
                                                         "colour_conversion", "step"}
    parts = sum(st[k]["mean"] for k in ("pass_1", "passes_2_on", "sampler_other", "decode", "colour_conversion"))
    assert parts == pytest.approx(st["step"]["mean"], rel=0.02, abs=0.01)
    assert st["pass_1"]["p50"] > 0 and st["decode"]["p50"] > 0 and "where a frame's time goes" in shown
    png = out.with_suffix(".png")
    assert r["plot"] == png.name and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_unknown_preset_is_a_clear_error(tmp_path, capsys):
    rc = main(["bench", "--preset", "nope", "--frames", "5", "--out", str(tmp_path / "b.json")])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "unknown preset 'nope'" in err


def test_bench_refuses_a_bad_sweep(tmp_path, capsys):
    rc = main(["bench", "--preset", "tiny", "--compile", "maybe", "--out", str(tmp_path / "b.json")])
    assert rc == 2 and "--compile" in capsys.readouterr().err


def test_percentiles_and_rollout_bins():
    p = percentiles(np.arange(1, 101))
    assert p["p50"] == pytest.approx(50.5) and p["p99"] == pytest.approx(99.01) and p["max"] == 100
    bins = rollout_bins(list(range(1, 21)), cache_frames=8)
    assert [b["frames"] for b in bins] == [[1, 1], [2, 3], [4, 7], [8, 8], [9, 15], [16, 20]]
    assert bins[0]["p50_ms"] == 1 and bins[0]["fps"] == pytest.approx(1000.0)


def test_trace_summary():
    t = [Action(move=1)] * 3 + [Action(turn=1.0)] + [Action(turn=1.0)]
    s = trace_summary(t)
    assert s["frames"] == 5 and s["repeat_fraction"] == pytest.approx(3 / 4)
    assert s["mean_run_length"] == pytest.approx(2.5) and s["turning_fraction"] == pytest.approx(0.4)


def test_speed_benchmark_runs_the_ladder_old_to_new_in_one_run(tmp_path, capsys, monkeypatch, make_checkpoint):
    """benchmarks/bench_speed.py (issue 15's one-command benchmark): every row of the old -> new ladder
    measured, ratios to the old arrangement, the profile, and the Markdown tables for the README."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("bench_speed", "benchmarks/bench_speed.py")
    bs = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bs)
    monkeypatch.setattr("worldmodel.device.cpu_cores", lambda: 2)
    ckpt = make_checkpoint(tmp_path / "small")
    out = tmp_path / "speed.json"
    assert bs.main(["--checkpoint", ckpt, "--only", "engine,profile", "--frames", "6", "--warmup", "1",
                    "--rounds", "1", "--profile-frames", "4", "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    names = [row["name"] for row in r["engine"]["idle"]]
    assert names[:4] == ["old", "1 thread", "+ packed weights", "+ pipeline"]
    assert {"new, 1 step", "new, speculative 2", "new, speculative 4", "new, 2 threads"} <= set(names)
    rows = {row["name"]: row for row in r["engine"]["idle"]}
    assert rows["old"]["x_old"] == 1.0 and rows["old"]["threads_used"] == 2
    assert rows["+ pipeline"]["settings"]["pipeline"] and rows["+ pipeline"]["threads_used"] == 1
    assert rows["+ pipeline"]["fps_cpu_time"] > 0 and rows["+ pipeline"]["x_old"] > 0
    assert [row["name"] for row in r["engine"]["one_core_busy"]] == ["old", r["engine"]["new_default"]]
    assert r["box"]["cores"] >= 1 and "native_bf16" in r["box"] and r["profile"]["stages"]["decode"]["p50"] > 0
    assert r["summary"]["bench_target_60_fps"] in (True, False)
    capsys.readouterr()
    bs.main(["--markdown", str(out)])
    md = capsys.readouterr().out
    assert "| + pipeline |" in md and "| pass_1 |" in md


def test_the_shipped_trace_is_the_default():
    """benchmarks/traces/ is found from worldmodel/evaluation/ (not recorded anew: the numbers of a run compare)."""
    from worldmodel.evaluation.traces import DEFAULT_TRACE, TRACE_DIR, load_trace

    assert (TRACE_DIR / DEFAULT_TRACE).is_file()
    actions, source = load_trace(None, 5)
    assert len(actions) == 5 and source.endswith(DEFAULT_TRACE) and "recorded now" not in source
