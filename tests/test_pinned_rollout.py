"""A short rollout of a shipped model pinned by hash (`doom-tiny`, whose network the default
`doom-map01-guided` shares): moving code around must not change what a player sees. The hash is exact
on the kind of CPU it was pinned on (the same torch CPU capability and CPU vendor: float reductions
differ between instruction sets, and an Intel Xeon with the same AVX512 capability as the AMD EPYC that
pinned it rounds differently); everywhere, the frames must match pinned 8x8-block means within a level of
uint8 (a real change of behaviour moves them by far more)."""
import hashlib
import platform
from pathlib import Path

import numpy as np
import pytest
import torch

from worldmodel.game.action import Action

ROOT = Path(__file__).resolve().parent.parent
CHECKPOINT = ROOT / "checkpoints" / "doom-tiny"
PINNED = Path(__file__).parent / "data" / "pinned_rollout.npz"
# forward, a turn while walking, strafing, backing up: each changes what the model draws
ACTIONS = ([Action(move=1)] * 3 + [Action(move=1, turn=4.0)] * 3 + [Action(strafe=1)] * 2
           + [Action(move=-1)] * 2)
BLOCK = 8


def rollout(speculative: int = 1) -> np.ndarray:
    from worldmodel.inference.engine import WorldModel

    # float32 whatever the CPU: the pin is of the code; bfloat16 (the default on CPUs with native bf16)
    # rounds differently and its rollouts part from float32's by a few levels within ten frames, as
    # any two roundings of it do (its quality is measured against the real game: bench_speed.py)
    wm = WorldModel.from_pretrained(CHECKPOINT, device="cpu", seed=0, speculative=speculative, dtype="float32")
    frames, actions = wm.start_clips()[0]
    wm.reset(frames, actions)
    return np.stack([wm.step(a) for a in ACTIONS])  # (F, H, W, 3) uint8


def block_means(frames: np.ndarray) -> np.ndarray:
    f, h, w, c = frames.shape
    return frames.reshape(f, h // BLOCK, BLOCK, w // BLOCK, BLOCK, c).astype(np.float64).mean(axis=(2, 4))


def cpu_vendor() -> str:
    """The CPU's vendor (GenuineIntel, AuthenticAMD) from /proc/cpuinfo, else what platform knows."""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("vendor_id"):
                return line.split(":", 1)[1].strip()
    return platform.processor()


def digest(frames: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(frames).tobytes()).hexdigest()


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="the shipped checkpoint is not in this tree")
def test_the_shipped_models_rollout_is_pinned():
    frames = rollout()
    pinned = np.load(PINNED)
    means = block_means(frames)
    assert means.shape == pinned["block_means"].shape
    diff = np.abs(means - pinned["block_means"])
    assert diff.max() < 1.0, f"frames moved: block means differ by up to {diff.max():.2f} levels"
    if str(pinned["capability"]) == torch.backends.cpu.get_cpu_capability() \
            and str(pinned["torch"]) == torch.__version__ and str(pinned["vendor"]) == cpu_vendor():
        assert digest(frames) == str(pinned["sha256"])


@pytest.mark.skipif(not CHECKPOINT.exists(), reason="the shipped checkpoint is not in this tree")
def test_the_pin_catches_a_changed_rollout():
    """The tolerance is tight enough to see a real change: a different action sequence fails it."""
    from worldmodel.inference.engine import WorldModel

    wm = WorldModel.from_pretrained(CHECKPOINT, device="cpu", seed=0, dtype="float32")
    frames, actions = wm.start_clips()[0]
    wm.reset(frames, actions)
    other = np.stack([wm.step(Action(turn=-8.0)) for _ in ACTIONS])
    assert np.abs(block_means(other) - np.load(PINNED)["block_means"]).max() >= 1.0


if __name__ == "__main__":  # re-pin (only when a change of the frames is intended): python tests/test_pinned_rollout.py
    torch.set_num_threads(1)
    frames = rollout()
    np.savez_compressed(PINNED, block_means=block_means(frames), sha256=digest(frames),
                        capability=torch.backends.cpu.get_cpu_capability(), torch=torch.__version__,
                        vendor=cpu_vendor())
    print(f"pinned {len(frames)} frames: {digest(frames)}")
