"""What every training loop (the autoencoder's, the transformer's, distillation) steps with: one
process or a torchrun process group (`Dist`), bf16 autocast and the hardware's name, the order of
data and noise, the learning-rate schedule, the EMA of the weights, what a loop records of its steps
(losses, time, rate: `StepRecord`) and the progress bar.

Determinism and resuming. Everything random in a step -- which clips, which noise levels, which noise
-- is drawn from generators seeded by (seed, step) (`step_generator`, `batch_indices`), for the
*global* batch, of which each DDP rank takes its slice. So the data order is a function of the step
alone, a run resumed from a checkpoint replays exactly the steps an uninterrupted run would have taken
(same losses, same weights), and N processes see the same batches as one."""
from __future__ import annotations

import argparse
import datetime
import math
import os
import time
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from worldmodel.device import cpu_name, native_bf16, parse_device
from worldmodel.errors import UserError
from worldmodel.progress import progress_bar

# --------------------------------------------------------------------------------------------------
# Distributed
# --------------------------------------------------------------------------------------------------


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def mean(self, x: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            x = x.detach().clone()
            torch.distributed.all_reduce(x)
            x /= self.world
        return x


def setup_distributed(device: str = "auto") -> Dist:
    """One process, or the process group torchrun describes (WORLD_SIZE, RANK, LOCAL_RANK): nccl on
    CUDA, gloo on CPU."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = parse_device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError("--device cuda was asked for but CUDA is not available")
        if dev.index is None:
            dev = torch.device("cuda", local % torch.cuda.device_count())
        torch.cuda.set_device(dev)
    if world > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if dev.type == "cuda" else "gloo",
                                             timeout=datetime.timedelta(minutes=30))
    return Dist(rank, world, local, dev)


def rank0_flag(ok: bool) -> bool:
    """Rank 0's `ok`, on every rank."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return ok
    t = torch.tensor([1 if ok else 0])
    if torch.distributed.get_backend() == "nccl":
        t = t.cuda()
    torch.distributed.broadcast(t, 0)
    return bool(t.item())


def amp_enabled(want: bool, device: torch.device) -> bool:
    """bf16 autocast for training: on CUDA, and on CPUs that do bf16 natively (a training step of the
    tiny model ran 1.56x faster than float32 on an AVX512-BF16 CPU); elsewhere float32."""
    return bool(want) and (device.type == "cuda" or (device.type == "cpu" and native_bf16()))


def add_amp_argument(parser: argparse.ArgumentParser) -> None:
    """`--no-amp` (`train model`, `train throughput`, `distill`): the switch of `amp_enabled`."""
    parser.add_argument("--no-amp", action="store_true",
                        help="no bf16 autocast (on by default on CUDA and on CPUs with native bf16: AVX512-BF16, AMX)")


def hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_name()} ({torch.get_num_threads()} threads)"


# --------------------------------------------------------------------------------------------------
# Deterministic data order, noise and schedule: functions of (seed, step) alone
# --------------------------------------------------------------------------------------------------


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step * 7_919 + stream * 104_729) % (2 ** 63))


def batch_indices(step: int, batch: int, n: int, seed: int) -> torch.Tensor:
    """The global batch of `step`: positions step*batch .. step*batch+batch-1 of an endless sequence of
    shuffled epochs (a fresh permutation of 0..n-1 per epoch, seeded by (seed, epoch))."""
    if n < 1:
        raise UserError("no training examples")
    out, pos, need = [], step * batch, batch
    while need:
        epoch, offset = divmod(pos, n)
        take = torch.randperm(n, generator=step_generator(seed, epoch, stream=1))[offset:offset + need]
        out.append(take)
        pos, need = pos + len(take), need - len(take)
    return torch.cat(out)


def lr_at(step: int, lr: float, warmup: int, total: int, min_ratio: float) -> float:
    """Linear warmup, then cosine decay to lr * min_ratio at `total` steps (constant after)."""
    if warmup and step < warmup:
        return lr * (step + 1) / warmup
    p = min(1.0, (step - warmup) / max(1, total - warmup))
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * p)))


def set_lr(opt: torch.optim.Optimizer, tcfg, step: int) -> float:
    """The learning rate of `step` on tcfg's schedule (`lr_at`), set in every group of `opt`."""
    lr = lr_at(step, tcfg.lr, tcfg.warmup, tcfg.steps, tcfg.min_lr_ratio)
    for group in opt.param_groups:
        group["lr"] = lr
    return lr


@torch.no_grad()
def ema_update(ema: nn.Module, model: nn.Module, decay: float, step: int | None = None) -> None:
    """ema <- d * ema + (1 - d) * model. With `step` (the transformer's EMA), d warms up as
    (1 + step) / (10 + step) up to `decay`; without (distillation's average, whose caller holds it at 0
    through its own warm-up), d is `decay`."""
    d = decay if step is None else min(decay, (1 + step) / (10 + step))
    e = [p for p in ema.parameters()]
    m = [p.detach() for p in model.parameters()]
    torch._foreach_lerp_(e, m, 1.0 - d)


class StepRecord:
    """What a training loop keeps of its steps: their losses, its time -- the steps' own (evaluation and
    checkpoints excluded), from `elapsed` on (a resumed run's time so far) -- and its rate at each
    logging step. `on_step(done, loss)` is called after every step (tests use it to kill a run)."""

    def __init__(self, tcfg, elapsed: float = 0.0, on_step=None):
        self.tcfg, self.on_step = tcfg, on_step
        self.losses: list[float] = []
        self.elapsed, self._window, self._n = elapsed, 0.0, 0

    def done(self, step: int, loss: float, t_step: float) -> int:
        """Step `step` (started at `time.perf_counter()` `t_step`) ended with `loss`; returns the steps done."""
        self.losses.append(loss)
        dt = time.perf_counter() - t_step
        self.elapsed, self._window, self._n = self.elapsed + dt, self._window + dt, self._n + self.tcfg.batch
        done = step + 1
        if self.on_step is not None:
            self.on_step(done, loss)
        return done

    def rate(self, done: int) -> float | None:
        """At a logging step (every `log_every` and the last): examples a second since the last one; else None."""
        if not (done % self.tcfg.log_every == 0 or done == self.tcfg.steps):
            return None
        r = self._n / max(self._window, 1e-9)
        self._window, self._n = 0.0, 0
        return r


def step_bar(tcfg, dist: Dist, start: int, what: str):
    """The progress bar of a training loop over `tcfg.steps` (the main process only, unless switched off)."""
    if not (tcfg.progress and dist.main):
        return None
    return progress_bar(total=tcfg.steps, initial=start, desc=f"train {what}", unit="step")
