"""torch.compile (inductor) of the per-frame step against eager, on CPU, on a tiny model: short enough
for every CI run (one graph: ~40 s on a busy 2-core CPU, most of it inductor's C++ build). The compiled pass is the
transformer's `forward_cached` with its KV cache (FrameSampler.compile); the slow test in test_engine.py
also compiles the decoder through the engine."""
from __future__ import annotations

import math
import shutil

import pytest
import torch

from worldmodel.inference.engine import compile_options, freeze_weights_when_compiling
from worldmodel.model.sampler import FrameSampler
from worldmodel.model.transformer import ModelConfig, WorldTransformer

CFG = ModelConfig(frame_size=(16, 16), latent_channels=4, ae_channels=(8, 8, 8, 8), ae_res_blocks=(0, 0, 0, 0),
                  dim=16, depth=1, heads=1, sink_frames=1, window_frames=2, max_draft=2)


def _no_compiler() -> str | None:
    if not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        return "inductor on CPU needs a C++ compiler (none found)"
    return None


def rollout(model: WorldTransformer, options: dict | None, n: int = 5) -> torch.Tensor:
    # two steps: both graphs run, the fused commit pass (writes the cache) and the plain one (only reads it)
    s = FrameSampler(model, CFG, steps=2, shift=1.0, seed=3)
    g = torch.Generator().manual_seed(0)
    C, (h, w) = CFG.latent_channels, CFG.latent_size
    s.reset(torch.randn(1, 2, C, h, w, generator=g), torch.zeros(1, 2, CFG.action_dim))
    s.next(torch.zeros(1, 1, CFG.action_dim))  # the first frame eager: from the second on, the steady-state pass
    s.compile(options)
    acts = torch.randn(n, CFG.action_dim, generator=g).clamp(-1, 1)
    return torch.cat([s.next(acts[i].view(1, 1, -1)) for i in range(n)], dim=1)


@pytest.mark.skipif(_no_compiler() is not None, reason=str(_no_compiler()))
def test_compiled_per_frame_step_matches_eager_on_cpu(monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setattr(inductor_config, "freezing", inductor_config.freezing)  # restored after the test
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = WorldTransformer(CFG).eval()
    with torch.no_grad():  # every weight random: adaLN-Zero would make the velocity zero
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * (1 / math.sqrt(p.shape[-1]) if p.ndim > 1 else 0.1))
    eager = rollout(model, None)
    freeze_weights_when_compiling()  # as the engine compiles on a CPU: inductor, weights frozen into the graph
    compiled = rollout(model, compile_options("on", torch.device("cpu")))
    assert compiled.shape == eager.shape and torch.isfinite(compiled).all()
    assert (compiled - eager).abs().max() < 1e-4
    assert (eager[:, 1] - eager[:, 2]).abs().max() > 1e-2  # the frames move: the comparison is not trivial
