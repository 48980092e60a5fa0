"""LoRA adapters (moshi-finetune's `lora.safetensors`), fused into the LM weights at load.

moshi-finetune saves the trainable leaves of moshi's in-memory model: for every linear,
`<name>.lora_A.weight` [rank, in] and `<name>.lora_B.weight` [out, rank], under the moshi
library's in-memory names (per-step attention projections `self_attn.in_projs.{i}` /
`out_projs.{i}`; the fused `in_proj` / `out_proj` form is accepted too, as moshi's load hook
does). With `ft_embed`, trained embeddings are saved beside them under their plain names. The
fused weight is W + scaling * B @ A, as `moshi.models.loaders.get_lora_moshi` computes it, added
to the rows of our stacked on-disk weight that the linear owns. Like moshi, it is kept at the
model's compute dtype: a bf16 checkpoint run in fp32 must not have its fused weights rounded back
to bf16 (that alone made greedy text drift from moshi's after a few dozen tokens).
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

DEFAULT_SCALING = 2.0  # moshi's lora_scaling default

_ATTN = re.compile(r"^(.*\.self_attn)\.(in_projs|out_projs)\.(\d+)$")
_ATTN_FUSED = re.compile(r"^(.*\.self_attn)\.(in_proj|out_proj)$")


class AdapterMismatch(ValueError):
    """The adapter's keys or shapes do not fit the model. The message names them."""


def read_adapter(path: str | Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    path = Path(path)
    if path.suffix not in (".safetensors", ".sft", ".sfts"):
        raise AdapterMismatch(f"{path}: LoRA weights must be a .safetensors file")
    if not path.is_file():
        raise AdapterMismatch(f"{path}: no such LoRA file")
    return load_file(str(path), device="cpu")


def _target(linear: str, state: dict[str, torch.Tensor]) -> tuple[str, int, bool] | None:
    """On-disk weight that the moshi linear `linear` is part of: (key, step, fused)."""
    m = _ATTN.match(linear)
    if m:
        prefix, kind, step = m.groups()
        return (f"{prefix}.in_proj_weight" if kind == "in_projs" else f"{prefix}.out_proj.weight",
                int(step), False)
    m = _ATTN_FUSED.match(linear)
    if m:
        prefix, kind = m.groups()
        return (f"{prefix}.in_proj_weight" if kind == "in_proj" else f"{prefix}.out_proj.weight",
                0, True)
    key = f"{linear}.weight"
    return (key, 0, False) if key in state else None


def fuse_lora(state: dict[str, torch.Tensor], adapter: dict[str, torch.Tensor], scaling: float,
              steps_of: dict[str, int], rank: int | None = None,
              dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Return `state` (on-disk names, float weights) with the adapter fused in; the weights it
    changes are `dtype` (the model's compute dtype), whatever the checkpoint stores.

    `steps_of[key]`: how many per-step matrices the on-disk weight `key` stacks (the depformer's
    attention weights stack one per step; everything else 1). `rank`: the configured
    `lora_rank`, checked against the adapter's. Raises AdapterMismatch naming the keys that do not
    fit."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    plain: dict[str, torch.Tensor] = {}
    for key, value in adapter.items():
        m = re.match(r"^(.*)\.lora_([AB])\.weight$", key)
        if m:
            pairs.setdefault(m.group(1), {})[m.group(2)] = value
        else:
            plain[key] = value
    targets = {name: _target(name, state) for name in pairs}
    unknown = sorted(k for k in plain if k not in state)
    unknown += sorted(f"{name}.lora_A/B.weight" for name, target in targets.items()
                      if target is None or target[0] not in state)
    if unknown:
        raise AdapterMismatch(f"{len(unknown)} LoRA keys match no weight of the model: "
                              f"{', '.join(unknown[:8])}{' ...' if len(unknown) > 8 else ''}")
    unpaired = sorted(name for name, ab in pairs.items() if set(ab) != {"A", "B"})
    if unpaired:
        raise AdapterMismatch(f"LoRA keys without their A/B twin: {', '.join(unpaired[:8])}")

    out = dict(state)
    bad: list[str] = []
    for key, value in plain.items():  # trained embeddings (ft_embed) replace the base ones
        if value.shape != state[key].shape:
            bad.append(f"{key} {tuple(value.shape)} (model {tuple(state[key].shape)})")
        out[key] = value.to(dtype)
    for name, ab in sorted(pairs.items()):
        key, step, fused = targets[name]
        base = out[key]
        steps = steps_of.get(key, 1)
        rows = base.shape[0] // steps
        A, B = ab["A"].float(), ab["B"].float()
        if fused:  # one A/B per step stacked along dim 0, as on disk
            As, Bs = A.view(steps, -1, A.shape[-1]), B.view(steps, -1, B.shape[-1])
        else:
            As, Bs = A.unsqueeze(0), B.unsqueeze(0)
        r = As.shape[1]
        if (As.shape[2] != base.shape[1] or Bs.shape[1] != rows or Bs.shape[2] != r
                or (not fused and step >= steps) or (rank is not None and r != rank)):
            bad.append(f"{name}.lora_A {tuple(ab['A'].shape)} / lora_B {tuple(ab['B'].shape)} "
                       f"(model weight {key} {tuple(base.shape)}"
                       + (f", lora_rank {rank})" if rank is not None else ")"))
            continue
        merged = base.float().clone()
        first = 0 if fused else step
        for i in range(As.shape[0]):
            s = first + i
            merged[s * rows:(s + 1) * rows] += scaling * (Bs[i] @ As[i])
        out[key] = merged.to(dtype)
    if bad:
        raise AdapterMismatch(f"LoRA shapes do not fit the model: {'; '.join(bad[:6])}"
                              f"{' ...' if len(bad) > 6 else ''}")
    return out
