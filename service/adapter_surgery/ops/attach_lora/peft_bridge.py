"""The only module of the service that touches ``peft``'s internals (non-exported names, private methods, the
attributes of its LoRA layers, the names it gives saved tensors).

Everything else uses ``peft``'s public API (``LoraConfig``, ``get_peft_model_state_dict``) or the functions here.
``peft`` is pinned below its next minor in ``pyproject.toml``; ``tests/ops/attach_lora/test_peft_bridge.py`` checks
every internal listed in :data:`INTERNALS` on a tiny model and fails naming the one that changed, so that a ``peft``
upgrade cannot change the adapters silently.

``peft`` is imported inside the functions: importing it costs seconds, which the service pays once at start-up
(:data:`WARM_MODULES`) rather than on import of the operations.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

#: The adapter name ``get_peft_model`` uses; saved keys carry no adapter-name segment.
ADAPTER_NAME = "default"
#: What the service imports on start-up so that the first request does not pay for it.
WARM_MODULES = ("peft", "peft.tuners.lora", "peft.utils.transformers_weight_conversion")
#: The peft internals used here, and what for (the bridge test checks each).
INTERNALS = {
    "peft.tuners.lora.LoraModel._create_and_replace": "the hook that builds one target's adapter (inject)",
    "peft.tuners.tuners_utils.BaseTuner._cast_adapter_dtype": "adapters upcast as get_peft_model does",
    "peft.tuners.tuners_utils._maybe_include_all_linear_layers": "'all-linear' expanded as peft does",
    "peft.tuners.tuners_utils.check_target_module_exists": "target matching",
    "peft.utils.other.get_pattern_key": "rank_pattern/alpha_pattern key of a module",
    "peft.utils.transformers_weight_conversion.convert_peft_config_for_transformers": "v4 MoE names in v5",
    "peft.utils.transformers_weight_conversion.get_model_conversion_mapping": "v4 MoE names in v5",
    "peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING": "default target_modules",
    "peft.tuners.lora.dora.DoraLinearLayer.update_layer": "a DoRA magnitude from the current W, A, B",
    "LoraLayer.r/lora_alpha/scaling/lora_A/lora_B/lora_magnitude_vector[name]": "a target's factors",
    "TrainableTokensLayer.token_indices[name]": "the rows of trainable_token_indices",
    "get_peft_model_state_dict(shell)": "an object with base_model and peft_config stands for PeftModel",
    "PeftConfig.save_pretrained(auto_mapping_dict=...)": "adapter_config.json of a model without a task type",
    "saved key segments": "modules_to_save.<name>, base_layer, original_module, token_adapter.trainable_tokens_delta",
    "BaseTuner._inject_parameters matching": "which parameters target_parameters names (matched_parameters)",
    "ParamWrapper.parameter_name / is_transposed": "a target parameter's wrapper, and its (in, out) axes",
    "TrainableTokensLayer.tied_adapter on a biased Linear": "token adapters that drop a tied decoder's bias",
    "LoraModel(...) with a _create_and_replace that builds nothing": "the config and targets of the fast path "
                                                                     "(plan_layers)",
    "dispatch_default's fan_in_fan_out rule": "Linear/Conv1D set the config's fan_in_fan_out (plan_layers)",
    "LoraLayer.update_layer's draws": "per target: nn.Linear(in, r) and nn.Linear(r, out) constructed, then "
                                      "reset_lora_parameters on A, zeros on B (the fast path's RNG stream)",
}
#: Segments of a saved key that wrap the base module's own name (``peft``'s ``ModulesToSaveWrapper``,
#: ``BaseTunerLayer.base_layer``, ``AuxiliaryTrainingWrapper.original_module``).
WRAPPER_SEGMENTS = (f".modules_to_save.{ADAPTER_NAME}.", ".modules_to_save.", ".base_layer.", ".original_module.")
#: Suffix of the saved rows of ``trainable_token_indices`` (``TrainableTokensLayer``).
TOKEN_ROWS_SUFFIX = ".token_adapter.trainable_tokens_delta"
#: Prefix of every saved key (``PeftModel.base_model`` -> ``LoraModel.model``).
SAVED_PREFIX = "base_model.model."

#: ``hook(module_name, base_module, lora_config, create)``: ``create(config)`` builds the adapter of that target with
#: ``config`` (``peft``'s own code) and returns the LoRA layer that replaced ``base_module``.
CreateHook = Callable[[str, nn.Module, object, Callable[[object], nn.Module]], None]


# -- target matching ------------------------------------------------------------------------------------------
def default_target_modules(model_type: str | None) -> str | list[str] | None:
    """``peft``'s default ``target_modules`` for a model type (None: it has none)."""
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING as defaults

    return defaults.get(model_type)


def converted_for_transformers(config, model: nn.Module):
    """A copy of ``config`` with old (transformers v4) MoE module names mapped to v5, as ``inject_adapter`` does;
    unchanged when ``peft`` cannot apply the conversion (it skips it then too)."""
    import copy

    out = copy.deepcopy(config)
    try:
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )

        convert_peft_config_for_transformers(out, model=model, conversions=get_model_conversion_mapping(model))
    except Exception:  # peft skips the conversion when it cannot apply it, so do we
        pass
    return out


def with_all_linear(config, model: nn.Module):
    """``config`` with ``"all-linear"`` expanded to the model's Linear/Conv1D names but the head (peft's rule)."""
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers

    return _maybe_include_all_linear_layers(config, model)


def target_module_exists(config, key: str) -> bool:
    """Whether ``peft`` adapts module ``key`` under ``config`` (``target_modules``, ``exclude_modules``,
    ``layers_to_transform``/``layers_pattern``). Raises ``re.error`` for an invalid regex."""
    from peft.tuners.tuners_utils import check_target_module_exists

    return bool(check_target_module_exists(config, key))


def matched_parameters(config, model: nn.Module) -> list[tuple[str, str, nn.Parameter]]:
    """The parameters ``target_parameters`` names, as ``BaseTuner._inject_parameters`` matches them: for each module
    (in model order), its own parameters whose ``<module>.<name>`` equals an entry or ends with ``.<entry>``.
    Returns ``(key, module name, parameter)``; ``exclude_modules`` and ``layers_to_transform`` are not applied
    (peft 0.21 does not apply them to parameters)."""
    names = sorted(set(getattr(config, "target_parameters", None) or ()))
    if not names:
        return []
    out = []
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            key = f"{module_name}.{param_name}"
            if key in names or any(key.endswith(f".{n}") for n in names):
                out.append((key, module_name, param))
    return out


def parameter_axes(module: nn.Module, shape: Sequence[int]) -> tuple[int, int, int]:
    """``(experts, in_features, out_features)`` of a target parameter as ``lora.ParamWrapper`` sees it: 2-D
    (out, in); 3-D (experts, out, in) unless the module is ``is_transposed`` (experts, in, out)
    (``ParamWrapper._get_in_out_features`` and ``update_layer``). Raises ValueError for another rank."""
    if len(shape) == 2:
        return 1, int(shape[1]), int(shape[0])
    if len(shape) != 3:
        raise ValueError(f"a {len(shape)}-D parameter (LoRA on parameters takes 2-D and 3-D ones)")
    experts, a, b = (int(x) for x in shape)
    return (experts, a, b) if getattr(module, "is_transposed", False) else (experts, b, a)


def parameter_holder(module: nn.Module) -> nn.Module:
    """The module that owns a target parameter: ``module`` itself, or the one a ``ParamWrapper`` (nested, for a
    second parameter of the same module) wraps."""
    return module.get_base_layer() if hasattr(module, "get_base_layer") else module


def wrapped_parameter(name: str, module: nn.Module) -> str | None:
    """For a ``lora.ParamWrapper`` at module ``name``, the key of the parameter it adapts
    (``model.layers.0.mlp.experts.base_layer`` -> ``model.layers.0.mlp.experts.gate_up_proj``); else None."""
    param = getattr(module, "parameter_name", None)
    if type(module).__name__ != "ParamWrapper" or not isinstance(param, str):
        return None
    return f"{name.replace('.base_layer', '')}.{param}"


def pattern_key(patterns: Sequence[str], key: str) -> str:
    """The ``rank_pattern``/``alpha_pattern`` key that applies to module ``key`` (``key`` itself when none does).
    Raises ``re.error`` for an invalid regex."""
    from peft.utils.other import get_pattern_key

    return get_pattern_key(list(patterns), key)


# -- injection ------------------------------------------------------------------------------------------------
def inject(model: nn.Module, config, hook: CreateHook) -> nn.Module:
    """``peft``'s ``LoraModel(model, config, "default")`` with ``hook`` around the creation of each target's adapter
    (``LoraModel._create_and_replace``); the adapters then upcast as ``get_peft_model(autocast_adapter_dtype=True)``.
    Returns the tuner (``LoraModel``: ``.model`` is ``model`` with the LoRA layers, ``.peft_config``)."""
    from peft.tuners.lora import LoraModel

    class _HookedLoraModel(LoraModel):
        def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key,
                                **kwargs):  # type: ignore[override]
            def create(cfg) -> nn.Module:
                super(_HookedLoraModel, self)._create_and_replace(cfg, adapter_name, target, target_name, parent,
                                                                  current_key, **kwargs)
                return getattr(parent, target_name)

            hook(current_key, target, lora_config, create)

    tuner = _HookedLoraModel(model, config, ADAPTER_NAME)
    tuner._cast_adapter_dtype(ADAPTER_NAME, autocast_adapter_dtype=True)
    return tuner


@dataclass(frozen=True)
class PlannedLayer:
    """One target as ``LoraModel._create_and_replace`` would build it: its rank and alpha (``rank_pattern``/
    ``alpha_pattern`` via ``get_pattern_key``), the features of its ``nn.Linear``/``Conv1D`` (``Conv1D`` stores
    (in, out)) and the dtype of its base weight."""

    name: str
    r: int
    lora_alpha: float
    use_rslora: bool
    in_features: int
    out_features: int
    base_dtype: torch.dtype

    @property
    def scaling(self) -> float:
        """s = lora_alpha / r, or lora_alpha / sqrt(r) with ``use_rslora`` (``LoraLayer.update_layer``)."""
        return self.lora_alpha / math.sqrt(self.r) if self.use_rslora else self.lora_alpha / self.r


def plan_layers(model: nn.Module, config) -> tuple[object, list[PlannedLayer]]:
    """``peft``'s ``LoraModel(model, config, "default")`` with a ``_create_and_replace`` that builds nothing: peft's
    own matching, config preparation (the transformers-v5 conversion, ``"all-linear"`` expanded, the minimal
    ``target_modules``), checks and warnings run as in :func:`inject`, and each target it would build is listed,
    in peft's order, with what ``_create_and_replace`` would give it. ``dispatch_default``'s rule on
    ``fan_in_fan_out`` (True for ``Conv1D``, False for ``nn.Linear``, with its warning) is applied to the config as
    peft applies it. ``model`` is left unchanged but for ``requires_grad`` (peft freezes the base).

    Returns the config as peft leaves it (what ``PeftModel.save_pretrained`` saves) and the layers. Only for targets
    that ``dispatch_default`` wraps in ``lora.Linear``: ``nn.Linear``/``Conv1D`` modules (TypeError otherwise; the
    caller rules out other libraries' subclasses, :func:`direct.plain_module`).
    """
    import warnings

    from peft.tuners.lora import LoraModel
    from peft.utils.other import get_pattern_key
    from transformers.pytorch_utils import Conv1D

    layers: list[PlannedLayer] = []

    class _DryLoraModel(LoraModel):
        def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key,
                                **kwargs):  # type: ignore[override]
            if kwargs.get("parameter_name") is not None or not isinstance(target, (nn.Linear, Conv1D)):
                raise TypeError(f"the fast path builds nn.Linear/Conv1D targets only, not {current_key}")
            r = lora_config.rank_pattern.get(get_pattern_key(lora_config.rank_pattern.keys(), current_key),
                                             lora_config.r)
            alpha = lora_config.alpha_pattern.get(get_pattern_key(lora_config.alpha_pattern.keys(), current_key),
                                                  lora_config.lora_alpha)
            conv1d = isinstance(target, Conv1D)
            if conv1d and not lora_config.fan_in_fan_out:  # dispatch_default's words
                warnings.warn("fan_in_fan_out is set to False but the target module is `Conv1D`. Setting "
                              "fan_in_fan_out to True.", stacklevel=2)
                lora_config.fan_in_fan_out = True
            elif not conv1d and lora_config.fan_in_fan_out:
                warnings.warn("fan_in_fan_out is set to True but the target module is `torch.nn.Linear`. "
                              "Setting fan_in_fan_out to False.", stacklevel=2)
                lora_config.fan_in_fan_out = False
            n_in, n_out = tuple(target.weight.shape) if conv1d else (target.in_features, target.out_features)
            layers.append(PlannedLayer(current_key, r, alpha, lora_config.use_rslora, n_in, n_out,
                                       target.weight.dtype))

    tuner = _DryLoraModel(model, config, ADAPTER_NAME)
    return tuner.peft_config[ADAPTER_NAME], layers


def lora_keys(name: str) -> tuple[str, str]:
    """The saved keys of module ``name``'s ``lora_A`` and ``lora_B`` weights (``get_peft_model_state_dict``)."""
    return f"{SAVED_PREFIX}{name}.lora_A.weight", f"{SAVED_PREFIX}{name}.lora_B.weight"


class _PeftShell(nn.Module):
    """Stands for ``PeftModel`` in ``get_peft_model_state_dict``; ``base_model`` gives keys ``base_model.model.*``."""

    def __init__(self, tuner: nn.Module) -> None:
        super().__init__()
        self.base_model = tuner
        self.peft_config = tuner.peft_config


def adapter_state_dict(tuner: nn.Module) -> dict[str, torch.Tensor]:
    """What ``PeftModel.save_pretrained`` would save (``get_peft_model_state_dict``, no embedding layers); tensors
    ``peft`` copied from a meta-device base are still on meta."""
    from peft.utils import get_peft_model_state_dict

    return get_peft_model_state_dict(_PeftShell(tuner), adapter_name=ADAPTER_NAME, save_embedding_layers=False)


def save_config(config, out: Path, auto_mapping: dict[str, str] | None) -> None:
    """Write ``adapter_config.json`` as ``PeftModel.save_pretrained`` does (``auto_mapping`` for a model that has
    no task type: its class and module)."""
    config.save_pretrained(str(out), auto_mapping_dict=auto_mapping)


# -- LoRA layers ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Factors:
    """One LoRA layer's adapter: rank, alpha, scaling s, and the ``lora_A``/``lora_B`` weights (the parameters)."""

    r: int
    lora_alpha: float
    scaling: float
    lora_A: nn.Parameter
    lora_B: nn.Parameter


def is_lora_layer(module: nn.Module) -> bool:
    """Whether ``module`` holds this adapter's LoRA factors."""
    return hasattr(module, "lora_A") and ADAPTER_NAME in module.lora_A


def factors(layer: nn.Module) -> Factors:
    return Factors(r=layer.r[ADAPTER_NAME], lora_alpha=float(layer.lora_alpha[ADAPTER_NAME]),
                   scaling=float(layer.scaling[ADAPTER_NAME]), lora_A=layer.lora_A[ADAPTER_NAME].weight,
                   lora_B=layer.lora_B[ADAPTER_NAME].weight)


def base_layer(layer: nn.Module) -> nn.Module:
    """The module a LoRA layer wraps (whose ``weight`` is W)."""
    return layer.get_base_layer()


@torch.no_grad()
def update_magnitude(layer: nn.Module) -> None:
    """Recompute a DoRA magnitude ||W + s B A||_row from the layer's current base weight, A and B (peft's
    ``DoraLinearLayer.update_layer``); no-op without DoRA."""
    if ADAPTER_NAME in layer.lora_magnitude_vector:
        f = factors(layer)
        layer.lora_magnitude_vector[ADAPTER_NAME].update_layer(base_layer=base_layer(layer), lora_A=f.lora_A,
                                                               lora_B=f.lora_B, scaling=f.scaling)


def token_indices(model: nn.Module, module_name: str) -> list[int]:
    """The ``trainable_token_indices`` rows of embedding ``module_name`` (its ``TrainableTokensLayer``)."""
    return list(model.get_submodule(f"{module_name}.token_adapter").token_indices[ADAPTER_NAME])


def token_layers_dropping_bias(tuner: nn.Module) -> list[str]:
    """The modules whose output ``trainable_token_indices`` would change at init: a ``TrainableTokensLayer`` that
    peft ties to the input embedding's (``tied_adapter``, set when ``tie_word_embeddings`` is true) around an
    ``nn.Linear`` with a bias: a tied MLM decoder (BERT's, RoBERTa's, DeBERTa-v2's ``cls.predictions.decoder``).

    peft 0.21's ``TrainableTokensLayer.forward_adapters`` computes ``F.linear(x, W)`` for such a layer and leaves
    the layer's bias out, so every logit moves by minus the bias with the adapter at init (``tests/ops/attach_lora/
    test_peft_bridge.py`` checks that it still does: when peft keeps the bias, this list must become empty).
    Names as in the model (``cls.predictions.decoder``)."""
    from peft.tuners.trainable_tokens.layer import TrainableTokensLayer

    found = []
    for name, module in tuner.model.named_modules():
        if not isinstance(module, TrainableTokensLayer) or module.tied_adapter is None:
            continue
        base = module.get_base_layer()
        if isinstance(base, nn.Linear) and base.bias is not None:
            found.append(name.removesuffix(".token_adapter"))
    return found


# -- saved keys -----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class SavedKey:
    """A key of the saved adapter that ``peft`` copied from the base: which base tensor it is.

    ``token_rows``: the rows of ``trainable_token_indices`` of embedding ``module`` (``name`` is its weight); else
    ``name`` is the base parameter the tensor copies (``modules_to_save``, biases).
    """

    name: str
    module: str
    token_rows: bool


def saved_key(key: str) -> SavedKey:
    name = key.removeprefix(SAVED_PREFIX)
    if name.endswith(TOKEN_ROWS_SUFFIX):
        module = name[: -len(TOKEN_ROWS_SUFFIX)]
        return SavedKey(f"{module}.weight", module, True)
    for wrapper in WRAPPER_SEGMENTS:
        name = name.replace(wrapper, ".")
    return SavedKey(name, name.rsplit(".", 1)[0], False)


def is_adapter_tensor(key: str) -> bool:
    """A tensor the adapter creates (lora_A/B, DoRA magnitude, trainable token rows), not a copy of a base module."""
    return ".lora_" in key or key.endswith("trainable_tokens_delta")
