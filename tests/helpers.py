"""Shared test helpers."""
import torch


def make_checkpoint(folder, seed=0, info=None):
    """A shrunken random-weight model (fast on CPU; weights drawn with `seed`), saved as a checkpoint
    folder with `info` in its config."""
    from worldmodel.model.autoencoder import Autoencoder
    from worldmodel.inference.engine import WorldModel
    from worldmodel.model.sampler import SamplingDefaults
    from worldmodel.model.transformer import ModelConfig, WorldTransformer

    cfg = ModelConfig(dim=64, depth=2, heads=2, ae_channels=(8, 16, 32, 64), ae_res_blocks=(0, 0, 0, 0),
                      window_frames=3, max_draft=4)
    torch.manual_seed(seed)
    WorldModel(cfg, Autoencoder(cfg.autoencoder), WorldTransformer(cfg), device="cpu",
               sampling=SamplingDefaults(steps=2)).save_pretrained(folder, info)
    return str(folder)


def engines_of(pid: int) -> list[int]:
    """PIDs of the ViZDoom engines that process `pid` started (their config lives in its private
    `worldmodel-doom-<pid>-*` folder)."""
    from worldmodel.game.doom import find_engines

    return find_engines(f"worldmodel-doom-{pid}-")
