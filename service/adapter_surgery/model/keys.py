"""Checkpoint keys against a model's parameter names, by ``transformers``' own loading rules.

A checkpoint's key layout may differ from the class ``config.json`` names: ``LlavaForConditionalGeneration``
holds ``model.language_model.embed_tokens.weight`` but ``save_pretrained`` (and the hub) write
``language_model.model.embed_tokens.weight``; Qwen2-VL writes ``model.layers.*`` / ``visual.*`` for
``model.language_model.layers.*`` / ``model.visual.*``; a checkpoint saved from the bare backbone (``LlamaModel``,
``GPT2Model``) lacks the base-model prefix (``model.``, ``transformer.``) its ``*ForCausalLM`` config names.
``from_pretrained`` maps every key the same way: the class's conversion rules (``get_model_conversion_mapping``:
renamings such as LLaVA's ``^language_model.model -> model.language_model``, scoped to sub-models, plus the
``legacy`` rules such as ``LayerNorm.gamma -> LayerNorm.weight``), then the base-model prefix added or removed
against the model's state dict (``rename_source_key`` in ``transformers.core_model_loading``, as
``convert_and_load_state_dict_in_model`` calls it). :func:`key_map` runs exactly those functions on the model built
on the ``meta`` device, so a role found by parameter (the input embedding, a layer list, a LoRA target) is found
under whatever name the checkpoint stores it.

This module is the only one that touches those ``transformers`` internals (private: ``transformers>=5,<6`` in
``pyproject.toml``; ``tests/model/test_keys.py`` checks them against real loads and fails if they change). Without
them (another ``transformers``) the base-model prefix rule alone is used, and :attr:`KeyMap.source` says so.

Outputs keep the input's layout: a changed tensor is written under the checkpoint key it was read from, and a new
one (an untied head) under :func:`layout_key`: as ``save_pretrained`` would name it when the checkpoint's keys are
renamed (LLaVA's ``lm_head.weight`` -> ``language_model.lm_head.weight``), else the model's own name.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from torch import nn

#: Where the rules came from: ``transformers``' conversion mapping, or the base-model prefix rule alone.
RuleSource = Literal["transformers", "prefix"]


@dataclass(frozen=True)
class KeyMap:
    """How one checkpoint's keys name one model's tensors.

    Attributes:
        renamed: checkpoint key -> model state-dict name, for the keys whose name differs (empty when the checkpoint
            has the class's own layout, the usual case).
        unmatched: checkpoint keys that name no tensor of the model (another head, stale buffers, a config that
            describes another model): ``from_pretrained`` reports them as unexpected.
        converted: checkpoint keys whose values ``transformers`` transforms on loading (a ``WeightConverter``: v4
            per-expert MoE weights fused into 3-D parameters, split qkv): no model tensor is stored as they are.
        converted_to: each key of :attr:`converted` -> the model tensor its conversion fills (many keys may fill
            one: ``experts.0.w1`` ... ``experts.3.w3`` -> ``mlp.experts.gate_up_proj``).
        source: ``"transformers"`` (its rules) or ``"prefix"`` (base-model prefix only; see the module docstring).
    """

    renamed: dict[str, str] = field(default_factory=dict)
    unmatched: frozenset[str] = frozenset()
    converted: frozenset[str] = frozenset()
    source: RuleSource = "transformers"
    converted_to: dict[str, str] = field(default_factory=dict)

    def model_name(self, key: str) -> str | None:
        """The model's name for checkpoint ``key``; ``None`` when it names none (or only after a conversion)."""
        if key in self.unmatched or key in self.converted:
            return None
        return self.renamed.get(key, key)

    def checkpoint_key(self, name: str, keys: Iterable[str] | object) -> str | None:
        """The checkpoint key holding model tensor ``name`` as it is; ``None`` when none does.

        ``keys`` is the checkpoint's key set (or the :class:`~adapter_surgery.io.checkpoint.Checkpoint`: ``in``).
        """
        if name in self._inverse:
            return self._inverse[name]
        if name in keys and name not in self.renamed and self.model_name(name) == name:  # type: ignore[operator]
            return name
        return None

    @functools.cached_property
    def _inverse(self) -> dict[str, str]:
        """Model name -> checkpoint key of :attr:`renamed`, built once (a LLaVA layout renames every key)."""
        return {v: k for k, v in self.renamed.items()}


def key_map(keys: Iterable[str], model: nn.Module) -> KeyMap:
    """Map checkpoint ``keys`` onto ``model`` (built on the meta device from the checkpoint's config.json) as
    ``from_pretrained`` does (see the module docstring)."""
    keys = list(keys)
    state = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    rules = _transformers_rules(model)
    if rules is None:
        pairs = {k: (_prefix_rule(k, prefix, state), False) for k in keys}
        source: RuleSource = "prefix"
    else:
        pairs = {k: rules(k, prefix, state) for k in keys}
        source = "transformers"
    renamed = {k: n for k, (n, conv) in pairs.items() if n != k and n in state and not conv}
    unmatched = frozenset(k for k, (n, _) in pairs.items() if n not in state)
    converted_to = {k: n for k, (n, conv) in pairs.items() if conv and n in state}
    return KeyMap(renamed=renamed, unmatched=unmatched, converted=frozenset(converted_to), source=source,
                  converted_to=converted_to)


def _prefix_rule(key: str, prefix: str, state: dict) -> str:
    """The base-model prefix added or removed when that names a tensor (``transformers``' last step)."""
    if key in state or not prefix:
        return key
    if key.startswith(prefix + ".") and key[len(prefix) + 1:] in state:
        return key[len(prefix) + 1:]
    return f"{prefix}.{key}" if f"{prefix}.{key}" in state else key


def _transformers_rules(model: nn.Module):  # -> Callable[[str, str, dict], tuple[str, bool]] | None
    """``transformers``' own renaming for ``model``: ``(key, prefix, state) -> (model name, converted)``, or
    ``None`` where this ``transformers`` lacks the functions (then the prefix rule alone applies).

    Private API, used here only: ``conversion_mapping.get_model_conversion_mapping`` (the class's transforms,
    scoped to sub-models, with the ``legacy`` rules) and ``core_model_loading.rename_source_key`` with
    ``WeightRenaming``/``WeightConverter``, called as ``convert_and_load_state_dict_in_model`` calls them: rename
    with every rule and the prefix step; if that names no tensor but the key as it is does, only the prefix step.
    """
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key
        from transformers.modeling_utils import PreTrainedModel
    except ImportError:
        return None
    if not isinstance(model, PreTrainedModel):
        return None
    transforms = get_model_conversion_mapping(model)
    renamings = [t for t in transforms if isinstance(t, WeightRenaming)]
    converters = [t for t in transforms if isinstance(t, WeightConverter)]

    def rename(key: str, prefix: str, state: dict) -> tuple[str, bool]:
        renamed, pattern = rename_source_key(key, renamings, converters, prefix, state)
        if renamed not in state and key in state:
            renamed, pattern = rename_source_key(key, [], [], base_model_prefix=prefix, meta_state_dict=state)
        return renamed, pattern is not None

    return rename



def layout_key(model: nn.Module, keys: KeyMap, name: str) -> str:
    """The key for model tensor ``name`` that the checkpoint does not hold yet (an untied head), in the checkpoint's
    layout: the key it would have if it did, else, when the checkpoint's keys are renamed, the name
    ``save_pretrained`` writes (``transformers``' reversed renamings, as ``revert_weight_conversion`` applies them),
    else ``name``."""
    inverse = {v: k for k, v in keys.renamed.items()}
    if name in inverse:
        return inverse[name]
    if not keys.renamed or keys.source != "transformers":
        return name
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming, apply_renamings
    except ImportError:
        return name
    transforms = get_model_conversion_mapping(model, add_legacy=False)[::-1]
    reverse = [t.reverse_transform() for t in transforms if isinstance(t, WeightRenaming)]
    return apply_renamings(name, reverse)
