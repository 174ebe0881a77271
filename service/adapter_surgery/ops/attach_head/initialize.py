"""Values for the tensors the checkpoint lacks: the head (the request's init, zero biases, seeded per tensor) and
a pooler (the target's own ``_init_weights``), with their std against the init's formula."""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from torch import nn

from adapter_surgery.initializers import WEIGHT_INITS, WeightInitArgs, expected_std, seeded_global_rng
from adapter_surgery.ops.attach_head.spec import AttachHeadOptions, CreatedTensor
from adapter_surgery.ops.attach_head.target import text_config


@dataclass
class Created:
    name: str
    tensor: torch.Tensor
    result: CreatedTensor


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def create_tensors(missing: list[str], target: nn.Module, spec: AttachHeadOptions, config, device: torch.device,
                   dtype: torch.dtype) -> list[Created]:
    """Values for the target's tensors the checkpoint lacks: the head (``spec.init``, zero biases) and a
    pooler (the target's ``_init_weights``), in ``dtype``."""
    from transformers.pytorch_utils import Conv1D

    text = text_config(config)
    init_range = float(getattr(text, "initializer_range", None) or 0.02)
    num_layers = int(getattr(text, "num_hidden_layers", None) or 1)
    prefix = getattr(target, "base_model_prefix", "") or ""
    by_module: dict[str, list[str]] = {}
    for name in missing:
        by_module.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(name)
    created: list[Created] = []
    for mod_name, names in by_module.items():
        module = target.get_submodule(mod_name)
        in_backbone = bool(prefix) and mod_name.startswith(prefix + ".")
        if not in_backbone and isinstance(module, nn.Linear | Conv1D):
            values = _init_linear(module, mod_name, spec, init_range, num_layers, device)
        else:
            values = _transformers_init(target, mod_name, spec.seed)
        for name in names:
            local = name[len(mod_name) + 1:] if mod_name else name
            t = values[local].to(dtype).cpu().contiguous()
            created.append(Created(name, t, _describe(name, t, module, in_backbone, spec.init, init_range, num_layers)))
    return created


def _init_linear(module: nn.Module, mod_name: str, spec: AttachHeadOptions, init_range: float, num_layers: int,
                 device: torch.device) -> dict[str, torch.Tensor]:
    conv1d = not isinstance(module, nn.Linear)  # transformers' Conv1D stores (in, out)
    shape = tuple(module.weight.shape)
    out_f, in_f = (shape[1], shape[0]) if conv1d else shape
    gen = torch.Generator(device=device).manual_seed(_seed(spec.seed, f"{mod_name}.weight"))
    w = torch.empty(out_f, in_f, device=device, dtype=torch.float32)
    WEIGHT_INITS[spec.init](w, WeightInitArgs(generator=gen, initializer_range=init_range, num_layers=num_layers))
    values = {"weight": w.T if conv1d else w}
    if getattr(module, "bias", None) is not None:
        values["bias"] = torch.zeros(module.bias.shape, dtype=torch.float32)
    return values


def _transformers_init(target: nn.Module, mod_name: str, seed: int) -> dict[str, torch.Tensor]:
    """Materialize ``mod_name`` on the CPU and initialize it with the target's ``_init_weights``, as
    ``transformers`` does for weights a checkpoint lacks; the global RNG is seeded and restored."""
    module = target.get_submodule(mod_name)
    module.to_empty(device="cpu")
    for t in [*module.parameters(), *module.buffers()]:
        if hasattr(t, "_is_hf_initialized"):
            delattr(t, "_is_hf_initialized")
    with seeded_global_rng(_seed(seed, mod_name)), torch.no_grad():
        for sub in module.modules():
            if hasattr(sub, "_is_hf_initialized"):
                delattr(sub, "_is_hf_initialized")
            target._init_weights(sub)  # type: ignore[operator]
    return {k: v.detach().float() for k, v in module.state_dict().items()}


def _describe(name: str, t: torch.Tensor, module: nn.Module, in_backbone: bool, init: str,
              init_range: float, num_layers: int) -> CreatedTensor:
    is_weight = name.endswith("weight") and t.dim() >= 2
    if not is_weight:
        how = "zeros" if name.endswith("bias") else "transformers"
        expected = 0.0 if how == "zeros" else None
    elif in_backbone:
        how = "transformers"
        expected = init_range if isinstance(module, nn.Linear) else None
    else:
        how = init
        fan_out, fan_in = (t.shape[1], t.shape[0]) if not isinstance(module, nn.Linear) else (t.shape[0], t.shape[1])
        expected = expected_std(init, fan_in, fan_out, init_range, num_layers)
    std = float(t.float().std()) if t.numel() > 1 else 0.0
    return CreatedTensor(name=name, shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."), init=how,
                         std=std, expected_std=expected)
