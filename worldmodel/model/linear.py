"""Linear layers at inference speed, for the world model's transformer (worldmodel/model/transformer.py):
on CPU without autograd they run through oneDNN, with the weights packed once (`pack_linears`)."""
from __future__ import annotations

import weakref

import torch
import torch.nn as nn
import torch.nn.functional as F


def _onednn_linear_dtypes() -> tuple[torch.dtype, ...]:
    """The dtypes oneDNN's linear runs natively here: float32 wherever oneDNN is built in, bfloat16 only
    on CPUs with bf16 instructions (elsewhere oneDNN refuses bf16 linears: they go to F.linear)."""
    try:
        if not (torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")):
            return ()
        return (torch.float32, torch.bfloat16) if torch.ops.mkldnn._is_mkldnn_bf16_supported() else (torch.float32,)
    except (AttributeError, RuntimeError):
        return ()


_ONEDNN_LINEAR = _onednn_linear_dtypes()
_PACK_ROWS = 64  # rows a packed weight is laid out for (any row count works): a frame is 48 tokens at the tiny tier


def pack_linears(module: nn.Module, pack: bool = True) -> int:
    """Inference on CPU: give every nn.Linear in `module` a copy of its weight in oneDNN's blocked
    layout (what inductor's freezing does), so that `linear` does not reorder the weight on every call
    (5-15% faster GEMMs at this model's shapes, much more for a 1-2 row modulation GEMV; the result is
    bitwise the same). The copy is used only while the weight is unchanged (its version counter):
    a weight changed or replaced later silently goes back to the plain path. The copies live beside the
    layers (`_PACKED`), not in them: a deep copy of the model (gymnasium's checker, `.float()` copies)
    gets none. pack=False drops the copies (for benchmarks). Returns the number of layers packed (or
    unpacked)."""
    n = 0
    for m in module.modules():
        if not pack and isinstance(m, nn.Linear) and _PACKED.pop(m, None) is not None:
            n += 1
        elif pack and isinstance(m, nn.Linear) and m.weight.device.type == "cpu" and m.weight.dtype in _ONEDNN_LINEAR:
            with torch.no_grad():
                _PACKED[m] = (_weight_key(m), torch.ops.mkldnn._reorder_linear_weight(m.weight.detach(), _PACK_ROWS))
            n += 1
    return n


_PACKED: "weakref.WeakKeyDictionary[nn.Linear, tuple]" = weakref.WeakKeyDictionary()  # layer -> (its weight's key, packed copy)


def _weight_key(layer: nn.Linear) -> tuple[int, int]:
    """Which weight a packed copy was made from: its storage and version counter."""
    return layer.weight.data_ptr(), layer.weight._version


def linear(x: torch.Tensor, layer: nn.Linear, gelu: bool = False) -> torch.Tensor:
    """`layer(x)`, optionally followed by tanh-GELU. On CPU without autograd (inference) this runs
    through oneDNN's linear with the GELU fused in (with the weight packed by `pack_linears`, if it
    was): about 2x faster than the BLAS (MKL) path on AMD CPUs with AVX-512 at these small shapes, equal
    to float rounding (~1e-6). Under torch.compile: F.linear (inductor picks its own GEMM); under autocast
    (validation during bf16 training: a bf16 input, a float32 weight) too, so that autocast casts."""
    if (x.dtype in _ONEDNN_LINEAR and x.dtype == layer.weight.dtype and x.device.type == "cpu"
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.compiler.is_compiling()):
        packed = _PACKED.get(layer)
        w = packed[1] if packed is not None and packed[0] == _weight_key(layer) else layer.weight
        return torch.ops.mkldnn._linear_pointwise(x, w, layer.bias, "gelu" if gelu else "none", [],
                                                  "tanh" if gelu else "")
    y = F.linear(x, layer.weight, layer.bias)
    return F.gelu(y, approximate="tanh") if gelu else y
