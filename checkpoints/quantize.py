"""int8 weights: moshi's q8 checkpoint layout, and `--quantize int8` for any bf16 checkpoint.

Kyutai's q8 checkpoints (`model.q8.safetensors`, `"quantize": true` in config.json) hold every
linear weight of the LM (temporal and depformer layers, `text_linear`, `depformer_in`, `linears`)
as int8 `X` quantised row by row to its absmax, with that absmax as float32 `X_scb`:
W = X * X_scb / 127. The fused/stacked attention weights keep their on-disk shapes, so one row of
scales per stacked row. Embeddings and norms stay in the model dtype.

`quantize_rows` is the moshi library's routine (bitsandbytes' `int8_vectorwise_quant` on the
weight cast to float16), so quantising a bf16 checkpoint here gives the bytes of a q8 one.
"""
from __future__ import annotations

import torch

SCALE_SUFFIX = "_scb"


def quantize_rows(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """weight [N, K] float -> (int8 [N, K], float32 absmax per row [N])."""
    w = weight.to(torch.float16)
    absmax = w.abs().amax(dim=1).float()
    # An all-zero row stays zero (bitsandbytes would divide by zero there).
    q = torch.round(w * (127.0 / absmax.clamp(min=torch.finfo(torch.float32).tiny)).unsqueeze(1))
    return q.to(torch.int8), absmax


def dequantize_rows(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """The float32 weight an int8 one stands for."""
    return weight.float() * (scale.float() / 127.0).unsqueeze(1)


def int8_weight_names(model: torch.nn.Module) -> list[str]:
    """State-dict names of a quantised model's int8 weights (each has an `_scb` twin)."""
    state = model.state_dict(keep_vars=True)
    return [k.removesuffix(SCALE_SUFFIX) for k in state if k.endswith(SCALE_SUFFIX)]


def quantize_state(state: dict[str, torch.Tensor], names: list[str],
                   device: torch.device) -> dict[str, torch.Tensor]:
    """Quantise the weights `names` of a float state dict (e.g. a bf16 checkpoint read on the
    CPU), one tensor at a time on `device`, so that no full-precision copy of the model is ever
    on the device; other tensors pass through."""
    out = dict(state)
    for name in names:
        q, scale = quantize_rows(out.pop(name).to(device))
        out[name], out[name + SCALE_SUFFIX] = q, scale
    return out


def cast_quantized(model: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    """`model.to(device, dtype)` for a quantised model: int8 weights and their float32 scales keep
    their dtypes (a plain `.to(dtype)` would round the scales to bf16)."""
    for module in model.modules():
        for name, t in list(module._parameters.items()) + list(module._buffers.items()):
            if t is None:
                continue
            keep = t.dtype == torch.int8 or name.endswith(SCALE_SUFFIX)
            moved = t.to(device) if keep else t.to(device=device, dtype=dtype)
            if isinstance(t, torch.nn.Parameter):
                module._parameters[name] = torch.nn.Parameter(moved, requires_grad=t.requires_grad)
            else:
                module._buffers[name] = moved
    return model


def weight_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as held in memory (int8 weights, scales, the rest)."""
    return sum(t.numel() * t.element_size() for t in model.state_dict().values())
