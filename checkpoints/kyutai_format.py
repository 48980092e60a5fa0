"""Kyutai's on-disk key naming for the LM (the names in `model.safetensors`).

On disk, attention projections are fused legacy names (`self_attn.in_proj_weight`,
`self_attn.out_proj.weight`); the depformer stacks its 8 per-step matrices along dim 0. The moshi
library's in-memory modules name them `in_projs.{s}.weight` / `out_projs.{s}.weight`. Our model
uses the on-disk names directly, so this module only bridges to and from the moshi library.
"""
from __future__ import annotations

import re

import torch

# `_scb`: the row scales of a q8 (int8) weight, stacked like the weight.
_IN_MEMORY = re.compile(r"^(.*\.self_attn)\.(in_projs|out_projs)\.(\d+)\.weight(_scb)?$")


def moshi_to_disk(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """moshi `LMModel.state_dict()` (in-memory names) -> on-disk names, as kyutai ships them."""
    out: dict[str, torch.Tensor] = {}
    stacked: dict[str, dict[int, torch.Tensor]] = {}
    for key, value in state.items():
        m = _IN_MEMORY.match(key)
        if m is None:
            out[key] = value
            continue
        prefix, kind, step, scb = m.groups()
        name = f"{prefix}.in_proj_weight" if kind == "in_projs" else f"{prefix}.out_proj.weight"
        name += scb or ""
        stacked.setdefault(name, {})[int(step)] = value
    for name, steps in stacked.items():
        out[name] = torch.cat([steps[s] for s in sorted(steps)], dim=0).contiguous()
    return out
