"""attach-lora's fast path for the data-free inits ``true`` and ``"gaussian"``: each target's ``lora_A``/``lora_B``
computed directly, with the same values ``peft``'s LoRA layers would get, without building them.

``peft`` (``LoraLayer.update_layer``, ``peft/tuners/lora/layer.py``) builds, per target and in its target order,
``nn.Linear(in, r, bias=False)`` and ``nn.Linear(r, out, bias=False)`` (each constructor draws Kaiming-uniform
weights from the global RNG: r*in then out*r float32 values, thrown away), then ``reset_lora_parameters`` draws A
(``kaiming_uniform_(a=sqrt(5))``, i.e. U(-1/sqrt(in), 1/sqrt(in)), for ``true``; ``normal_(std=1/r)`` for
``"gaussian"``) and zeroes B; ``_move_adapter_to_device_of_base_layer`` casts both to the base weight's dtype and
``get_peft_model``'s ``_cast_adapter_dtype(autocast_adapter_dtype=True)`` back to float32 when that dtype is
float16/bfloat16. Here the thrown-away draws only advance the generator (:func:`discard`), A is drawn on a tensor of
its shape with the same function, and both take the same casts, then the request's ``dtype``. Which modules, their
ranks and alphas, and the config saved still come from ``peft`` (:func:`peft_bridge.plan_layers`). The weights file
is laid out from the plan before any draw (:func:`adapter_layout`: ``save_file``'s order and header) and written
while A is drawn (:func:`write_adapter`), so the files are byte-identical to the injection path's
(``tests/ops/attach_lora/test_direct.py`` checks both against each other and against ``get_peft_model``).

Anything else (other inits, DoRA, biases, ``modules_to_save``, trainable tokens, parameter targets, other module
types or base dtypes) goes through ``peft``'s injection (:func:`refusal` says why).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from pathlib import Path

import torch
from torch import nn

from adapter_surgery.io.header import TORCH_TO_SAFETENSORS
from adapter_surgery.io.layout import Layout, layout
from adapter_surgery.io.planned import PlannedFile
from adapter_surgery.io.writer import WrittenFile
from adapter_surgery.ops.attach_lora import peft_bridge as bridge
from adapter_surgery.ops.attach_lora.output import SAFETENSORS_METADATA, in_target_order, target_module
from adapter_surgery.ops.attach_lora.spec import AttachLoraSpec, TargetModule
from adapter_surgery.ops.attach_lora.targets import Target

#: The inits computed here.
DIRECT_INITS = ("true", "gaussian")
#: Base dtypes whose casts are reproduced here (``_move_adapter_to_device_of_base_layer``, ``cast_adapter_dtype``).
BASE_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
#: What ``cast_adapter_dtype(autocast_adapter_dtype=True)`` upcasts to float32 among :data:`BASE_DTYPES`.
UPCAST = (torch.bfloat16, torch.float16)


def plain_module(module: nn.Module) -> bool:
    """An ``nn.Linear`` or ``Conv1D`` as ``torch``/``transformers`` define them (subclasses included, such as
    Falcon's ``FalconLinear``), which ``peft``'s ``dispatch_default`` wraps in its ``lora.Linear``; not a quantized or
    other library's subclass, which another ``peft`` dispatcher may take."""
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (nn.Linear, Conv1D)) and type(module).__module__.startswith(("torch.nn.",
                                                                                          "transformers."))


def refusal(spec: AttachLoraSpec, init: str, config, targets: list[Target], model: nn.Module,
            model_dtype: torch.dtype) -> str | None:
    """Why this request needs ``peft``'s injection (None: the fast path computes it)."""
    checks = (
        (init not in DIRECT_INITS, f"init {init}"),
        (spec.use_dora, "use_dora"),
        (bool(getattr(config, "lora_bias", False)), "lora_bias"),
        (config.bias != "none", f"bias {config.bias}"),
        (bool(config.modules_to_save), "modules_to_save"),
        (config.trainable_token_indices is not None, "trainable_token_indices"),
        (bool(getattr(config, "target_parameters", None)), "target_parameters"),
        (bool(config.ensure_weight_tying), "ensure_weight_tying"),
        (any(t.kind not in ("linear", "conv1d") for t in targets), "parameter targets"),
        (not all(plain_module(model.get_submodule(t.name)) for t in targets if t.kind != "parameter"),
         "a target of another Linear class"),
        (model_dtype not in BASE_DTYPES, f"base dtype {model_dtype}"),
    )
    return next((why for bad, why in checks if bad), None)


def discard(words: int, scratch: torch.Tensor) -> None:
    """Advance the global CPU generator by ``words`` 32-bit outputs, as ``words`` float32 ``uniform_`` draws do.

    On the CPU, ``uniform_`` takes one 32-bit output of the mt19937 engine per float32 element, whatever the bounds,
    and ``random_()`` on int64 two (``random64``) per element: an int64 ``random_()`` over half as many elements
    consumes the same outputs at about a third of the cost (no float transform; measured 1.7 against 5.5 ns per
    output). ``tests/ops/attach_lora/test_direct.py`` checks the stream after it. ``scratch``: int64, at least
    ``words // 2`` elements.
    """
    if words >= 2:
        scratch[: words // 2].random_()
    if words % 2:
        torch.empty(1, dtype=torch.float32).uniform_()


@torch.no_grad()
def drawn(layers: list[bridge.PlannedLayer], init: str, dtype: torch.dtype) -> Iterator[tuple[str, torch.Tensor]]:
    """Each ``lora_A`` (its saved key, as ``get_peft_model_state_dict``'s, and the tensor in ``dtype``), drawn from
    the global RNG as ``peft`` draws it (module docstring), in ``layers``' order; each ``lora_B`` is zero and not
    drawn. Lazily: each draw happens when the consumer asks for the next tensor (nothing else may use the global
    RNG meanwhile)."""
    most = max((layer.r * (layer.in_features + layer.out_features) for layer in layers), default=0)
    scratch = torch.empty(most // 2 + 1, dtype=torch.int64)
    for layer in layers:
        discard(layer.r * layer.in_features + layer.out_features * layer.r, scratch)  # the two constructors
        a = torch.empty(layer.r, layer.in_features)
        if init == "true":
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))
        else:
            nn.init.normal_(a, std=1 / layer.r)
        a = a.to(layer.base_dtype)
        if a.dtype in UPCAST:
            a = a.to(torch.float32)
        yield bridge.lora_keys(layer.name)[0], a.to(dtype)


def adapter_keys(layers: list[bridge.PlannedLayer]) -> list[str]:
    """The adapter's tensor names in ``get_peft_model_state_dict``'s order: per target (``layers``' order) lora_A,
    then lora_B."""
    return [key for layer in layers for key in bridge.lora_keys(layer.name)]


def adapter_layout(layers: list[bridge.PlannedLayer], dtype: torch.dtype) -> Layout:
    """The adapter file as ``save_file`` lays out ``get_peft_model_state_dict``'s tensors (``lora_A`` (r, in),
    ``lora_B`` (out, r), all in ``dtype``) with peft's ``{"format": "pt"}`` metadata."""
    shapes = [shape for layer in layers for shape in ((layer.r, layer.in_features), (layer.out_features, layer.r))]
    name = TORCH_TO_SAFETENSORS[dtype]
    return layout([(key, name, shape) for key, shape in zip(adapter_keys(layers), shapes, strict=True)],
                  SAFETENSORS_METADATA)


def write_adapter(path: Path, layers: list[bridge.PlannedLayer], init: str, dtype: torch.dtype,
                  check_cancelled: Callable[[], None]) -> WrittenFile:
    """Write the adapter's weights file at ``path``, byte-identical to ``save_file`` of its tensors: each
    ``lora_A`` written and hashed on a worker thread while the next one is drawn, each ``lora_B`` (zero) a hole
    (:class:`PlannedFile`). ``check_cancelled`` runs after each ``lora_A`` is handed over, before the next draw; on
    any error the file is removed and the worker has ended."""
    zeros = {bridge.lora_keys(layer.name)[1] for layer in layers}
    with PlannedFile(path, adapter_layout(layers, dtype), zeros) as out:
        for key, a in drawn(layers, init, dtype):
            out.put(key, a)
            check_cancelled()
        return out.finish()


def trainable_parameters(layers: list[bridge.PlannedLayer]) -> int:
    """The adapter's parameter count: r * (in + out) per target."""
    return sum(layer.r * (layer.in_features + layer.out_features) for layer in layers)


def describe(layers: list[bridge.PlannedLayer], targets: list[Target]) -> list[TargetModule]:
    """Each adapted target as the result lists it (as :func:`output.describe_targets` does from peft's layers)."""
    by_name = {t.name: t for t in targets}
    return in_target_order([target_module(by_name[layer.name], layer.r, float(layer.lora_alpha), float(layer.scaling),
                                          [layer.r, layer.in_features], [layer.out_features, layer.r])
                            for layer in layers], targets)
