"""The decoder layers of an architecture, as data: where they sit, what each holds, what writes into the stream.

Learned from ``transformers`` on the ``meta`` device (no storage), as :mod:`adapter_surgery.model.roles` learns roles:

- **the layer list**: the ``nn.ModuleList`` whose length is the text config's layer count (``num_hidden_layers``,
  ``n_layer``) and whose entries are all one class (preferring the model's ``_no_split_modules`` class; lists under
  vision/audio towers are skipped): ``model.layers`` (Llama, Qwen, Gemma), ``transformer.h`` (GPT-2, Falcon),
  ``gpt_neox.layers`` (GPT-NeoX). Its checkpoint key prefix is found in the safetensors headers by
  ``transformers``' own key conversion (:mod:`adapter_surgery.model.keys`: the base model prefix added or
  removed, legacy multimodal layouts such as LLaVA's ``language_model.model.layers``; else the numbered key list
  whose tensor names best match the layer's parameters), so a checkpoint saved from the bare backbone
  (``layers.0...``) is mapped too.
- **each layer's parameters** (names within the layer, and shapes), which may differ between layers (MoE every
  k-th layer, dense first layers).
- **the residual writers**: the projections whose output is added to the residual stream. Found structurally:
  within each sub-block of a layer (``self_attn``, ``mlp``, ``attention``...), the last ``nn.Linear``/``Conv1D``
  whose output width is the hidden size (``self_attn.o_proj``, ``mlp.down_proj``, GPT-2 ``attn.c_proj`` /
  ``mlp.c_proj``, NeoX/Falcon ``attention.dense`` / ``mlp.dense_4h_to_h``, Phi ``mlp.fc2``). Completed by
  :data:`RESIDUAL_NAMES`, a table of the usual names, for a second writer in one sub-block (an MoE's shared expert
  beside its experts) and for fused 3-D expert parameters that are no ``Linear`` (``mlp.experts.down_proj``).
- **the per-layer config entries**: lists in the (text) config with one entry per layer (``layer_types``,
  ``no_rope_layers``, any scalar list whose length is the layer count), including those ``transformers`` derives
  when ``config.json`` omits them (Qwen2's ``layer_types`` from ``max_window_layers``), and lists of layer indices
  (:data:`INDEX_LISTS`, ``mlp_only_layers``).

:func:`renumbered_config` writes a config for another sequence of layers (each output layer named by the base
layer it comes from): the layer count and every per-layer entry follow.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from adapter_surgery.config_check import LAYER_KEYS, NOT_TEXT, text_config
from adapter_surgery.errors import InvalidCheckpoint
from adapter_surgery.io.checkpoint import Checkpoint
from adapter_surgery.model.keys import key_map

#: Usual names of residual-writing projections (the last projection of an attention or MLP sub-block).
RESIDUAL_NAMES = frozenset({"o_proj", "out_proj", "down_proj", "c_proj", "dense", "dense_4h_to_h", "fc2", "wo",
                            "w2", "proj_out"})
#: Config lists whose values are layer indices (not one entry per layer).
INDEX_LISTS = ("mlp_only_layers",)
#: Config lists known to be per layer, also when the model has a single layer.
KNOWN_PER_LAYER = ("layer_types", "no_rope_layers", "layers_block_type", "block_types", "sliding_window_layers")
#: Lists that are never per layer, whatever their length.
NOT_PER_LAYER = frozenset({"architectures", "bos_token_id", "eos_token_id", "pad_token_id", "suppress_tokens",
                           "begin_suppress_tokens", "bad_words_ids", "forced_decoder_ids", "label2id", "id2label"})
#: Config keys whose effect depends on the layer count or on a layer's index: a new layer cannot be an exact
#: identity of the base with them set (key -> why).
DEPTH_DEPENDENT = {
    "scale_attn_by_inverse_layer_idx": "attention is scaled by 1/(layer index + 1), and layers after a new one move",
    "scale_depth": "residual branches are scaled by scale_depth / sqrt(num_hidden_layers)",
}
_NUMBERED = re.compile(r"^(.*?)\.(\d+)\.(.+)$")


@dataclass(frozen=True)
class Layers:
    """The decoder layers of a checkpoint.

    Attributes:
        module_path: the layer list in the ``transformers`` model (``model.layers``).
        key_prefix: the layer list in the checkpoint's keys (``model.layers``, or ``layers`` for a bare backbone).
        count: number of layers.
        layer_class: the layers' class (``LlamaDecoderLayer``).
        params: per layer, parameter name within the layer -> shape (model names, e.g. ``self_attn.o_proj.weight``).
        residual_writers: module paths within a layer whose output is added to the residual stream
            (``self_attn.o_proj``; a fused expert parameter's own path, ``mlp.experts.down_proj``).
        hidden_size: the residual stream's width.
        count_key: the config key holding the count (``num_hidden_layers``; ``n_layer`` for GPT-2).
        config_path: where that key lives: ``""`` (top level) or the text sub-config key (``text_config``).
        per_layer: config entries with one value per layer (key -> list), as the model's config has them.
        index_lists: config entries listing layer indices (key -> list).
        initializer_range: the text config's ``initializer_range`` (0.02 when it has none).
        depth_dependent: config keys set that make the model depend on layer count or index (key -> why).
    """

    module_path: str
    key_prefix: str
    count: int
    layer_class: str
    params: list[dict[str, tuple[int, ...]]]
    residual_writers: tuple[str, ...]
    hidden_size: int
    count_key: str
    config_path: str
    per_layer: dict[str, list[Any]] = field(default_factory=dict)
    index_lists: dict[str, list[int]] = field(default_factory=dict)
    initializer_range: float = 0.02
    depth_dependent: dict[str, str] = field(default_factory=dict)

    def key(self, layer: int, suffix: str) -> str:
        """The checkpoint key of ``suffix`` (``mlp.down_proj.weight``) in layer ``layer``."""
        return f"{self.key_prefix}.{layer}.{suffix}"

    def split_key(self, key: str) -> tuple[int, str] | None:
        """``(layer, suffix)`` of a checkpoint key inside the layer list, else ``None``."""
        head = self.key_prefix + "."
        if not key.startswith(head):
            return None
        index, _, suffix = key[len(head):].partition(".")
        return (int(index), suffix) if index.isdigit() and suffix else None

    def residual_module(self, suffix: str) -> str | None:
        """The residual writer a checkpoint key suffix belongs to (``mlp.down_proj.weight`` -> ``mlp.down_proj``),
        also for experts stored one by one (``mlp.experts.3.down_proj.weight`` -> ``mlp.experts.down_proj``)."""
        module = suffix.rsplit(".", 1)[0] if "." in suffix else suffix
        for path in (module, suffix, re.sub(r"\.experts\.\d+\.", ".experts.", module)):
            if path in self.residual_writers:
                return path
        return None


def layer_facts(ckpt: Checkpoint, model: nn.Module | None = None) -> Layers:
    """The layers of ``ckpt``, from its config on the meta device (``model``: one already built from it).

    Raises:
        InvalidCheckpoint: no usable config.json, no layer list of the declared count, or none in the checkpoint.
    """
    from adapter_surgery.model.roles import build_meta_model

    if ckpt.config is None:
        raise InvalidCheckpoint(f"the checkpoint has no usable config.json ({ckpt.config_problem}), so its layers "
                                "are unknown", field="checkpoint", fix="Send the model directory with its config.json.")
    if model is None:
        model, problem = build_meta_model(ckpt)
        if model is None:
            raise InvalidCheckpoint(f"transformers cannot build this config ({problem}), so its layers are unknown",
                                    field="checkpoint", fix="Send a checkpoint whose config.json transformers knows.")
    raw_text, path = text_config(ckpt.config)
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    count = int(getattr(text_cfg, "num_hidden_layers", 0) or 0)
    module_path, layers = find_layer_list(model, count)
    params = [{n: tuple(p.shape) for n, p in layer.named_parameters()} for layer in layers]
    hidden = int(getattr(text_cfg, "hidden_size", 0) or 0)
    writers = residual_writers(layers[0], hidden)
    for layer in layers[1:]:
        writers += [w for w in residual_writers(layer, hidden) if w not in writers]
    count_key = next((k for k in LAYER_KEYS if k in raw_text), None)
    if count_key is None:
        count_key = getattr(text_cfg, "attribute_map", {}).get("num_hidden_layers", "num_hidden_layers")
    derived = text_cfg.to_dict() if hasattr(text_cfg, "to_dict") else {}
    per_layer = {k: list(v) for k, v in {**derived, **raw_text}.items() if _is_per_layer(k, v, count)}
    index_lists = {k: list(v) for k, v in {**derived, **raw_text}.items()
                   if k in INDEX_LISTS and isinstance(v, list) and all(isinstance(i, int) for i in v)}
    depth = {k: why for k, why in DEPTH_DEPENDENT.items() if derived.get(k, raw_text.get(k))}
    return Layers(module_path=module_path, key_prefix=_key_prefix(ckpt, model, module_path, params[0], count),
                  count=count, layer_class=type(layers[0]).__name__, params=params, residual_writers=tuple(writers),
                  hidden_size=hidden, count_key=count_key, config_path=path.rstrip("."), per_layer=per_layer,
                  index_lists=index_lists,
                  initializer_range=float(getattr(text_cfg, "initializer_range", 0.02) or 0.02),
                  depth_dependent=depth)


def find_layer_list(model: nn.Module, count: int) -> tuple[str, nn.ModuleList]:
    """The model's decoder layer list: ``count`` entries of one class, outside vision/audio towers.

    Raises:
        InvalidCheckpoint: no such list.
    """
    preferred = set(getattr(model, "_no_split_modules", None) or [])
    found = []
    for name, mod in model.named_modules():
        if (isinstance(mod, nn.ModuleList) and len(mod) == count > 0 and not NOT_TEXT.search(name)
                and len({type(m) for m in mod}) == 1):
            found.append((type(mod[0]).__name__ not in preferred, name.count("."), name, mod))
    if not found:
        raise InvalidCheckpoint(f"{type(model).__name__} has no list of {count} layers of one class (the config's "
                                "layer count)", field="checkpoint",
                                fix="Send a decoder checkpoint whose config.json declares its layer count.")
    _, _, name, mod = min(found, key=lambda f: f[:3])
    return name, mod


def residual_writers(layer: nn.Module, hidden: int) -> list[str]:
    """Module paths within ``layer`` whose output is added to the residual stream (see the module docstring)."""
    from transformers.pytorch_utils import Conv1D

    def out_width(m: nn.Module) -> int:
        return m.out_features if isinstance(m, nn.Linear) else int(m.weight.shape[1])  # Conv1D: (in, out)

    found: list[str] = []
    for child_name, child in layer.named_children():
        linears = [(n, m) for n, m in child.named_modules() if isinstance(m, nn.Linear | Conv1D)]
        writing = [n for n, m in linears if out_width(m) == hidden]
        if writing:
            found.append(f"{child_name}.{writing[-1]}" if writing[-1] else child_name)
        for n, m in linears:
            path = f"{child_name}.{n}" if n else child_name
            if n.rsplit(".", 1)[-1] in RESIDUAL_NAMES and out_width(m) == hidden and path not in found:
                found.append(path)
        linear_params = {f"{n}.{p}" if n else p for n, m in linears for p, _ in m.named_parameters(recurse=False)}
        for pname, p in child.named_parameters():
            if p.dim() >= 3 and pname not in linear_params and pname.rsplit(".", 1)[-1] in RESIDUAL_NAMES:
                found.append(f"{child_name}.{pname}")  # a fused expert weight: (experts, ..., ...)
    return found


def post_norm_writers(layer: nn.Module, writers: Sequence[str], hidden: int) -> list[str]:
    """The residual writers of ``layer`` followed, in their own sub-module, by a norm of the hidden width: the
    post-LN layout of BERT/RoBERTa/DeBERTa (``BertSelfOutput``: ``LayerNorm(dense(x) + residual)``), where the norm
    applies to the residual sum, so a zero writer leaves ``LayerNorm(residual)``, not ``residual`` (Xiong et al.
    2020, *On Layer Normalization in the Transformer Architecture*, contrast Post-LN and Pre-LN). Norms applied to
    the sub-block's output before the sum (Gemma 2's ``post_attention_layernorm``, a sibling at the layer level)
    and per-head norms (``q_norm``, head width) are not such norms; nor are writers directly under the layer, where
    registration order says nothing of the forward's (OPT registers ``final_layer_norm`` after ``fc2`` but applies it
    first)."""
    found = []
    modules = dict(layer.named_modules())
    for path in writers:
        parent_path, _, name = path.rpartition(".")
        parent = modules.get(parent_path) if parent_path else None  # layer-level order is no execution order (OPT)
        if parent is None or name not in dict(parent.named_children()):
            continue
        names = [n for n, _ in parent.named_children()]
        after = [m for n, m in parent.named_children() if names.index(n) > names.index(name)]
        if any(_is_norm(m, hidden) for m in after):
            found.append(path)
    return found


def _is_norm(m: nn.Module, hidden: int) -> bool:
    shape = getattr(m, "normalized_shape", None)
    if shape is None:
        weight = getattr(m, "weight", None)
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else None
    return "norm" in type(m).__name__.lower() and tuple(shape or ()) == (hidden,)


def _is_per_layer(key: str, value: Any, count: int) -> bool:
    if key in NOT_PER_LAYER or key.endswith("_token_id") or not isinstance(value, list) or len(value) != count:
        return False
    if key in INDEX_LISTS:
        return False
    scalar = all(isinstance(v, str | int | float | bool) or v is None for v in value)
    return scalar and (count > 1 or key in KNOWN_PER_LAYER)


def _key_prefix(ckpt: Checkpoint, model: nn.Module, module_path: str, params: dict[str, tuple[int, ...]],
                count: int) -> str:
    keys = key_map(ckpt.weight_map, model)
    for p in params:
        found = keys.checkpoint_key(f"{module_path}.0.{p}", ckpt)
        if found is not None and found.endswith(f".0.{p}"):
            return found[: -len(f".0.{p}")]
    # another layout than the class's: the numbered list of `count` layers whose names best match the layer's
    lists: dict[str, tuple[set[int], set[str]]] = {}
    for key in ckpt.weight_map:
        m = _NUMBERED.match(key)
        if m and not NOT_TEXT.search(m.group(1)):
            idx, suffixes = lists.setdefault(m.group(1), (set(), set()))
            idx.add(int(m.group(2)))
            suffixes.add(m.group(3))
    scored = [(len(sfx & set(params)), prefix) for prefix, (idx, sfx) in lists.items() if idx == set(range(count))]
    best = max(scored, default=(0, ""))
    if best[0] == 0:
        raise InvalidCheckpoint(f"the checkpoint holds no layer list matching {module_path} ({count} layers of "
                                f"{', '.join(list(params)[:3])}, ...)", field="checkpoint",
                                fix="Check that config.json belongs to these weights.")
    return best[1]


def renumbered_config(config: dict[str, Any], layers: Layers, sources: Sequence[int]) -> dict[str, Any]:
    """``config`` (the raw ``config.json``) for the layer sequence ``sources``: output layer ``j`` comes from base
    layer ``sources[j]``. The layer count becomes ``len(sources)``; each per-layer entry takes its source layer's
    value (written explicitly even where ``transformers`` derived it: derived from the new count it could differ);
    an index list keeps every output layer whose source it listed."""
    out = copy.deepcopy(config)
    holder = out[layers.config_path] if layers.config_path else out
    holder[layers.count_key] = len(sources)
    for key, values in layers.per_layer.items():
        holder[key] = [values[s] for s in sources]
    for key, indices in layers.index_lists.items():
        listed = set(indices)
        holder[key] = [j for j, s in enumerate(sources) if s in listed]
    return out


def meta_model_for(config: dict[str, Any], like: nn.Module) -> nn.Module:
    """The model class of ``like`` built on the meta device from the raw config dict ``config``."""
    cfg = type(like.config).from_dict(config)
    with torch.device("meta"):
        return type(like)(cfg)
