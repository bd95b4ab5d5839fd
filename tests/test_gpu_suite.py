"""The GPU suite (benchmarks/gpu_suite.py, scripts/gpu_suite.sh) end to end on the CPU at tiny sizes: every
stage writes its JSON, a stage past its time limit is recorded as timed out and keeps what it wrote while
the later stages still run, the summary and the plot are written, and what comes back from a device fits
the device tool (at most eight files, none nested). Plus the pieces with their own logic: the batch search
past out-of-memory, the FLOP count behind MFU, the command-line errors."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "benchmarks"))

import gpu_suite  # noqa: E402

STAGES = ["device", "kernels", "attention", "engine", "training"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    """One run of the whole suite through the shell script, the device stage made to hang after its first
    result (--stall) so that its 25 s limit stops it."""
    out = tmp_path_factory.mktemp("suite")
    env = dict(os.environ, OUT=str(out), PYTHON=sys.executable)
    for k in ("TRITON_INTERPRET", "KERNELS_FLEX_COMPILE", "WORLDMODEL_COMMIT"):  # the stages decide these
        env.pop(k, None)
    p = subprocess.run(["bash", "scripts/gpu_suite.sh", "--smoke", "--stall", "device", "--limit", "device=25"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    return out, p


def _load(out, name):
    return json.loads((out / name).read_text())


def test_smoke_run_writes_every_stage_and_the_summary(smoke_run):
    out, p = smoke_run
    assert p.returncode == 1, p.stdout[-3000:] + p.stderr[-3000:]  # one stage timed out: incomplete
    files = sorted(x.name for x in out.iterdir())
    assert files == sorted([f"{s}.json" for s in STAGES] + ["summary.json", "gpu_suite.png", "suite.log"])
    assert all((out / f).is_file() for f in files)  # nothing nested: the device tool brings back <= 8 files
    summary = _load(out, "summary.json")
    assert summary["status"] == "incomplete" and summary["smoke"] is True
    assert summary["command"].startswith("bash scripts/gpu_suite.sh --smoke")
    assert [summary["stages"][s]["status"] for s in STAGES] == ["timed_out", "ok", "ok", "ok", "ok"]
    assert summary["source_digest"] == gpu_suite.source_digest()
    for s in STAGES:
        d = _load(out, f"{s}.json")
        assert d["status"] == summary["stages"][s]["status"], s
        for k in ("command", "created", "torch", "python", "source_digest", "device", "triton", "cuda"):
            assert k in d, (s, k)
        assert d["device"]["type"] == "cpu" and d["torch"] == torch.__version__
    assert (out / "gpu_suite.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    log = (out / "suite.log").read_text()
    assert all(f"=== stage {s}" in log for s in STAGES)
    assert "== GPU suite ==" in p.stdout and "engine rollout of 24 frames" in p.stdout


def test_a_stage_past_its_limit_is_timed_out_and_keeps_its_results(smoke_run):
    out, _ = smoke_run
    d = _load(out, "device.json")
    assert d["status"] == "timed_out" and d["suite"]["limit_s"] == 25 and 24 < d["suite"]["wall_s"] < 45
    assert d["ceilings"][0]["copy_gbps"] > 0  # written before the stage hung
    summary = _load(out, "summary.json")
    assert summary["stages"]["kernels"]["wall_s"] > 0  # the next stages ran


def test_kernels_stage_compares_against_the_float64_reference(smoke_run):
    out, _ = smoke_run
    d = _load(out, "kernels.json")
    rows = d["results"]
    ran = [r for r in rows if "ok" in r]
    assert d["failed"] == 0 and d["passed"] == len(ran) > 0
    sdpa = [r for r in ran if r["backend"] == "sdpa"]
    assert {r["kind"] for r in sdpa} == {"train", "cached"} and {r["dtype"] for r in sdpa} == {"float32", "bfloat16"}
    train = next(r for r in sdpa if r["kind"] == "train" and r["dtype"] == "float32")
    assert set(train["rel_err"]) == {"out", "dq", "dk", "dv"} and max(train["rel_err"].values()) < 1e-5
    bf16 = next(r for r in sdpa if r["kind"] == "train" and r["dtype"] == "bfloat16")
    assert 1e-4 < bf16["rel_err"]["out"] < gpu_suite.REL_TOL["bfloat16"]  # really against float64, not itself
    triton = [r for r in rows if r["backend"] == "triton"]
    assert any(r.get("written") is True for r in triton)  # the interpreter ran, NaN-poisoned outputs all written
    assert all("skipped" in r and "interpreter" in r["skipped"] for r in triton if r["dtype"] == "bfloat16")


def test_attention_stage_records_times_and_the_sdpa_kernel(smoke_run):
    out, _ = smoke_run
    d = _load(out, "attention.json")
    timed = [r for r in d["results"] if "ms" in r]
    assert {r["backend"] for r in timed} == {"sdpa", "flex"} and all(r["ms"] > 0 for r in timed)
    assert all(r["sdpa_kernels"] for r in timed if r["backend"] == "sdpa")
    assert all(r["max_abs_diff_vs_sdpa"] < 1e-4 for r in timed if r["backend"] == "flex")
    assert d["stage"] == "attention" and d["command"].startswith("bash scripts/gpu_suite.sh")


def test_engine_stage_measures_and_says_what_it_skipped(smoke_run):
    out, _ = smoke_run
    d = _load(out, "engine.json")
    by = {r["item"]: r for r in d["results"]}
    assert by["eager"]["status"] == "ok" and by["eager"]["fps"] > 0
    roll = by["rollout of 24 frames"]
    assert roll["status"] == "ok" and len(roll["latency_ms_per_frame"]) == 24
    assert roll["by_rollout_length"][-1]["frames"][1] == 24
    assert by["speculative 4"]["acceptance_rate"] is not None
    assert by["compiled (inductor + CUDA graphs)"]["status"].startswith("skipped: CPU smoke")
    assert {r["settings"]["steps"] for r in d["results"] if r["status"] == "ok"} >= {1, 2, 3, 4}


def test_training_stage_finds_a_batch_and_counts_flops(smoke_run):
    out, _ = smoke_run
    d = _load(out, "training.json")
    assert {r["preset"] for r in d["batch_search"]} == {"tiny", "small"}
    done = [r for r in d["results"] if "clips_per_s" in r]
    assert {r["preset"] for r in done} == {"tiny", "small"}
    for r in done:
        assert r["flops_per_step"] == d["flops_per_clip"][r["preset"]]["train_step"] * r["batch"]
        assert r["tflops"] == pytest.approx(r["flops_per_step"] / r["step_s_median"] / 1e12)
    assert d["profile"][0]["top_host_ops"]
    summary = _load(out, "summary.json")
    assert {t["preset"] for t in summary["headlines"]["training"]} == {"tiny", "small"}


def test_find_batch_steps_down_past_out_of_memory():
    tried = []

    def fake(b):
        tried.append(b)
        if b > 16:
            raise torch.cuda.OutOfMemoryError(f"CUDA out of memory. Tried to allocate {b} GiB")
        return {"clips_per_s": float(b)}

    batch, log = gpu_suite.find_batch(fake, [8, 64, 16, 32])
    assert batch == 16 and tried == [64, 32, 16]
    assert [x["fits"] for x in log] == [False, False, True] and "out of memory" in log[0]["error"]
    assert gpu_suite.find_batch(lambda b: (_ for _ in ()).throw(torch.cuda.OutOfMemoryError("out of memory")),
                                [2, 1])[0] is None
    with pytest.raises(ValueError):  # anything but running out of memory is a real error
        gpu_suite.find_batch(lambda b: (_ for _ in ()).throw(ValueError("bad shape")), [4])


def test_train_flops_counts_every_matrix_product():
    """The meta-device count equals a real forward's, equals a hand count from the model's linear layers
    (per token, or per frame for the conditioning), and the attention is counted block-causally."""
    from torch.utils.flop_counter import FlopCounterMode

    from worldmodel.model.transformer import ModelConfig, WorldTransformer

    cfg = ModelConfig(dim=64, depth=2, heads=2, window_frames=2, max_draft=1)
    B, F_ = 2, cfg.clip_frames
    f = gpu_suite.train_flops(cfg, B, F_)
    model = WorldTransformer(cfg)
    model.attention = "torch"
    h, w = cfg.latent_size
    with FlopCounterMode(display=False) as counter:  # with autograd: F.linear, not the uncounted oneDNN path
        model(torch.randn(B, F_, cfg.latent_channels, h, w), torch.rand(B, F_), torch.randn(B, F_, cfg.action_dim))
    assert f["forward_counted"] == counter.get_total_flops()
    T = cfg.tokens_per_frame
    per_frame = ("noise_embed", "action_embed", "modulation")
    linear = sum(2 * m.in_features * m.out_features * B * F_ * (1 if any(p in n for p in per_frame) else T)
                 for n, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    L = T * F_
    assert f["attention_dense"] == 4 * cfg.head_dim * cfg.heads * cfg.depth * B * L * L
    assert f["forward_counted"] == linear + f["attention_dense"]
    assert f["attention_visible"] == f["attention_dense"] * (F_ + 1) // (2 * F_)
    assert f["train_step"] == 3 * (linear + f["attention_visible"])
    one = gpu_suite.train_flops(cfg, B, 1)  # one frame: block-causal is all pairs
    assert one["attention_visible"] == one["attention_dense"]


@pytest.mark.parametrize("argv,err", [([], "pass --out DIR or set OUT"),
                                      (["--out", "X", "--stages", "nope"], "unknown stage"),
                                      (["--out", "X", "--limit", "engine"], "--limit wants STAGE=SECONDS"),
                                      (["--out", "X", "--budget-s", "0"], "--budget-s must be positive")])
def test_bad_arguments_are_one_clear_line(argv, err, capsys, monkeypatch, tmp_path):
    monkeypatch.delenv("OUT", raising=False)
    monkeypatch.chdir(tmp_path)
    assert gpu_suite.main(argv) == 2
    msg = capsys.readouterr().err.strip()
    assert err in msg and len(msg.splitlines()) == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_attention_timing_replays_a_cuda_graph_on_cuda():
    import bench_attention

    x = torch.randn(2048, 2048, device="cuda")
    r = bench_attention.time_fn([lambda: x @ x], torch.device("cuda"), repeats=5, warmup=1, budget_s=1.0)
    assert r["timing"].startswith("CUDA graph replay") and 0 < r["ms"] and 0 < r["ms_eager"]
