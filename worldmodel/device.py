"""Devices, one home for every stage: picking one ("auto"), what this CPU can do (cores, native
bfloat16), and what a result file says about the machine (name, memory, synchronisation)."""
from __future__ import annotations

import ctypes
import functools
import os
import platform
from pathlib import Path

import torch


def parse_device(device: str | torch.device) -> torch.device:
    """torch.device(device), or a one-line ValueError for a name torch does not know (e.g. "gpu")."""
    try:
        return torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ValueError(f"unknown device {str(device)!r}: use auto, cpu, cuda, cuda:N or mps") from None


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """"auto": cuda, then mps, then cpu; anything else as torch.device, checked to be usable."""
    if str(device) != "auto":
        d = parse_device(device)
        if d.type == "cuda" and not torch.cuda.is_available():
            raise ValueError("device 'cuda' was asked for but CUDA is not available")
        if d.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise ValueError("device 'mps' was asked for but MPS is not available")
        return d
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameters (malloc.h)
_KEEP_BYTES = 32 << 20  # glibc's largest mmap threshold on 64-bit


@functools.lru_cache(maxsize=1)
def keep_freed_memory() -> bool:
    """Have glibc's allocator keep freed blocks of up to 32 MB for reuse instead of handing each back to the
    OS and faulting it in again at the next allocation. The per-frame passes allocate and free the same
    0.1-2 MB tensors every frame (attention scores of a speculative pass: 4 frames' queries against the
    cache), and each page fault on them cost more than the arithmetic: with it, attention over 4 new
    frames took 0.65 ms instead of 1.5-2.6 ms here. Process-wide, once; False where the C library is not
    glibc (nothing changed)."""
    if platform.system() != "Linux":
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES)) and bool(libc.mallopt(_M_TRIM_THRESHOLD,
                                                                                     2 * _KEEP_BYTES))
    except (OSError, AttributeError):
        return False


def cpu_cores() -> int:
    """CPU cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


@functools.lru_cache(maxsize=1)
def native_bf16() -> bool:
    """Does this CPU do bfloat16 arithmetic natively (AVX512-BF16 or AMX-BF16), and does oneDNN use
    it? torch's own check (cpuinfo) misses the flag on some AMD CPUs, so /proc/cpuinfo is asked too."""
    try:
        if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
            return False
        if torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported():
            return True
    except (AttributeError, RuntimeError):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16"})
    except OSError:
        pass
    return False


def resolve_dtype(dtype, device: torch.device) -> torch.dtype:
    """"auto": bfloat16 on CUDA and on CPUs with native bf16 (`native_bf16`), float32 elsewhere."""
    if dtype in (None, "auto"):
        if device.type == "cuda" or (device.type == "cpu" and native_bf16()):
            return torch.bfloat16
        return torch.float32
    if isinstance(dtype, str):
        dtype = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
                 "float16": torch.float16, "fp16": torch.float16, "float64": torch.float64}.get(dtype, dtype)
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise ValueError(f"dtype must be 'auto', float32, bfloat16, float16 or float64, got {dtype!r}")
    return dtype


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device) -> dict:
    device = torch.device(device)
    info = {"type": device.type, "device": str(device), "cpu": cpu_name(), "cpu_count": os.cpu_count(),
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        idx = device.index if device.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        info.update(name=torch.cuda.get_device_name(idx), memory_gb=round(p.total_memory / 2**30, 1),
                    capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda)
    else:
        info["name"] = info["cpu"] if device.type == "cpu" else device.type
    return info


def device_tag(info: dict) -> str:
    """A short name for file names: cpu, h100, a100, rtx4090, ..."""
    if info["type"] != "cuda":
        return info["type"]
    name = info.get("name", "cuda").lower().replace("nvidia", "").replace("geforce", "")
    for tok in name.replace("-", " ").split():
        if any(c.isdigit() for c in tok):
            return "".join(c for c in tok if c.isalnum())
    return "cuda"


def _read_status(field: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0  # kB -> MiB
    except (OSError, ValueError):
        pass
    return None


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
    else:
        try:  # Linux: "5" resets the peak resident set size (VmHWM) to the current one
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def memory_mb(device, peak: bool = False) -> float | None:
    """CUDA memory allocated (peak: max allocated since the last reset), or the process's RSS (peak: VmHWM)."""

    if torch.device(device).type == "cuda":
        f = torch.cuda.max_memory_allocated if peak else torch.cuda.memory_allocated
        return f(device) / 2**20
    v = _read_status("VmHWM" if peak else "VmRSS")
    if v is None and peak:
        import resource

        v = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    return v


def memory_kind(device) -> str:
    return "cuda_max_allocated" if torch.device(device).type == "cuda" else "process_peak_rss"


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
