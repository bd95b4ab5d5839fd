"""Shared test setup: one thread, and the small model the command-level tests run on (a shrunken
architecture with random weights: fast on a CPU), as a checkpoint maker and a ready checkpoint."""
import pytest
import torch

# a shrunken architecture: every part of the real one (autoencoder, sink + window cache, drafts),
# small enough that a frame takes milliseconds on one CPU thread
SMALL = dict(dim=64, depth=2, heads=2, ae_channels=(8, 16, 32, 64), ae_res_blocks=(0, 0, 0, 0), window_frames=3,
             max_draft=4)
SMALL_STEPS = 2  # the sampling steps its checkpoints say


def small_config(**overrides):
    from worldmodel.model.transformer import ModelConfig

    return ModelConfig(**{**SMALL, **overrides})


def save_small_checkpoint(folder, seed: int = 0, info: dict | None = None) -> str:
    """The small model with weights drawn with `seed`, saved as a checkpoint folder with `info` in its
    config; returns the folder."""
    from worldmodel.inference.engine import WorldModel
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.model.sampler import SamplingDefaults
    from worldmodel.model.transformer import WorldTransformer

    cfg = small_config()
    torch.manual_seed(seed)
    WorldModel(cfg, Autoencoder(cfg.autoencoder), WorldTransformer(cfg), device="cpu",
               sampling=SamplingDefaults(steps=SMALL_STEPS)).save_pretrained(folder, info)
    return str(folder)


@pytest.fixture(scope="session")
def make_checkpoint():
    """The checkpoint maker: make_checkpoint(folder, seed=0, info=None) -> folder."""
    return save_small_checkpoint


@pytest.fixture(scope="session")
def ckpt(tmp_path_factory):
    """One small checkpoint for the whole session (tests only read it)."""
    return save_small_checkpoint(tmp_path_factory.mktemp("ckpt") / "small")


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: the tiny shapes of the tests gain nothing from more, and a shared 2-core
    machine with OpenMP spinning on both cores is many times slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
