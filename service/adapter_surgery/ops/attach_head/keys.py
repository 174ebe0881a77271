"""The checkpoint's keys against the target's state dict: kept (renamed to the target's names), dropped (the LM
head, an old head, stale buffers), missing (to create); the 422 when config.json and the weights disagree."""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from adapter_surgery.errors import InvalidCheckpoint
from adapter_surgery.io import Checkpoint
from adapter_surgery.io.writer import TensorSource
from adapter_surgery.model.keys import key_map
from adapter_surgery.model.roles import Architecture
from adapter_surgery.ops.attach_head.spec import DroppedTensor, RenamedTensor


@dataclass
class Keys:
    mapping: dict[str, str]  # checkpoint key -> target name (backbone tensors kept)
    missing: list[str]  # target names to create
    dropped: list[DroppedTensor]
    renamed: list[RenamedTensor]
    #: checkpoint keys kept under their own names, in the input's layout, that ``transformers`` maps onto the target
    #: when loading (its renamings, and its converters: per-expert MoE weights stacked into fused 3-D experts) ->
    #: the target tensor each one fills
    as_stored: dict[str, str] = field(default_factory=dict)


def map_keys(ckpt: Checkpoint, arch: Architecture, target: nn.Module, replaced: Mapping[str, TensorSource]) -> Keys:
    """Match checkpoint keys to the target's state-dict names (exact, then with/without the base-model prefix);
    ``replaced`` (tensors that change before, e.g. the grown input embedding) gives their new shapes.

    Raises:
        InvalidCheckpoint: a backbone tensor the target needs is missing or has another shape.
    """
    prefix = getattr(target, "base_model_prefix", "") or ""
    expected = {n: tuple(t.shape) for n, t in target.state_dict().items()}

    def is_head(name: str) -> bool:
        return not (prefix and name.startswith(prefix + "."))

    embed_w = target.get_input_embeddings().weight
    embed_name = next(n for n, p in target.named_parameters(remove_duplicate=False) if p is embed_w)
    mapping: dict[str, str] = {}
    claimed: set[str] = set()

    def claim(key: str, name: str) -> None:
        mapping[key] = name
        claimed.add(name)

    for key in ckpt.weight_map:
        if key in expected and not is_head(key):
            claim(key, key)
    if arch.input_embedding not in mapping and embed_name not in claimed:
        claim(arch.input_embedding, embed_name)
    for key in ckpt.weight_map:
        if key in mapping or not prefix:
            continue
        for cand in (f"{prefix}.{key}", key[len(prefix) + 1:] if key.startswith(prefix + ".") else None):
            if cand and cand in expected and cand not in claimed and not is_head(cand):
                claim(key, cand)
                break
    as_stored = _as_stored(ckpt, target, expected, claimed, set(mapping), is_head)
    claimed.update(as_stored.values())
    lm_roots = {k.split(".")[0] for k in (arch.output_head, arch.output_bias, arch.head_param, *arch.redundant_keys)
                if k}
    lm_roots.discard(prefix)
    dropped = []
    for key in ckpt.weight_map:
        if key in mapping or key in as_stored:
            continue
        as_target = key if key in expected else f"{prefix}.{key}" if f"{prefix}.{key}" in expected else None
        if key in (arch.output_head, arch.output_bias) or key in arch.redundant_keys or key.split(".")[0] in lm_roots:
            reason = "lm_head"
        elif as_target is not None and is_head(as_target):
            reason = "replaced_head"
        else:
            reason = "unused"
        dropped.append(DroppedTensor(name=key, shape=list(ckpt.info(key).shape), reason=reason))
    extra, _ = unexpected_tensors([d.name for d in dropped if d.reason == "unused"], target, expected)
    if extra:
        raise config_mismatch(extra, target, ckpt)
    shared = _tied_names(target)  # T5's encoder/decoder embed_tokens are its shared embedding: stored once
    missing = [n for n in expected if n not in claimed and not shared.get(n, set()) & claimed]
    backbone_missing = [n for n in missing if not is_head(n) and ".pooler." not in f".{n}"]
    if backbone_missing:
        raise InvalidCheckpoint(
            f"the checkpoint lacks {len(backbone_missing)} tensor(s) that {type(target).__name__} needs, e.g. "
            f"{backbone_missing[0]!r}", field="checkpoint",
            fix="Check that config.json belongs to these weights (layer count, model type).")
    for key, name in mapping.items():
        src = replaced.get(key)
        shape = tuple(src.shape) if src is not None else ckpt.info(key).shape
        if shape != expected[name]:
            raise InvalidCheckpoint(f"tensor {key!r} has shape {list(shape)} but {type(target).__name__} expects "
                                    f"{list(expected[name])} for {name!r}", field="checkpoint",
                                    fix="Check that config.json belongs to these weights.")
    renamed = [RenamedTensor(source=k, target=n) for k, n in mapping.items() if k != n]
    return Keys(mapping=mapping, missing=missing, dropped=dropped, renamed=renamed, as_stored=as_stored)


def _as_stored(ckpt: Checkpoint, target: nn.Module, expected: dict[str, tuple[int, ...]], claimed: set[str],
               mapped: set[str], is_head) -> dict[str, str]:  # is_head: Callable[[str], bool]
    """Backbone keys in another layout than the target's that ``transformers``' own rules map when loading
    (:func:`adapter_surgery.model.keys.key_map`): renamed keys (Mixtral's ``block_sparse_moe.`` -> ``mlp.``, legacy
    multimodal prefixes) and converted ones (a ``WeightConverter``, e.g. ``experts.<i>.w1``/``w3`` of every expert
    stacked into ``mlp.experts.gate_up_proj``: many keys, one tensor). They are kept as stored, byte for byte, so
    that the output keeps the input's layout. Returns checkpoint key -> the target tensor it fills.

    Raises:
        InvalidCheckpoint: a renamed key with another shape than its tensor, or keys converted into one tensor whose
            element counts do not add up to its (stacking and concatenation keep every element: a missing expert).
    """
    layout = key_map(ckpt.weight_map, target)
    found: dict[str, str] = {}
    for key in ckpt.weight_map:
        name = layout.model_name(key) if key not in layout.converted else layout.converted_to.get(key)
        if key in mapped or name is None or name not in expected or name in claimed or is_head(name):
            continue
        if key not in layout.converted:
            _check_shape(key, tuple(ckpt.info(key).shape), name, expected[name], target)
            claimed = claimed | {name}
        found[key] = name
    fills: dict[str, list[str]] = {}
    for key in layout.converted & set(found):
        fills.setdefault(found[key], []).append(key)
    for name, keys in fills.items():
        stored = sum(ckpt.info(k).numel for k in keys)
        if stored != math.prod(expected[name]):
            raise InvalidCheckpoint(
                f"{len(keys)} tensor(s) that transformers converts into {name!r} (e.g. {sorted(keys)[0]!r}) hold "
                f"{stored} values but {type(target).__name__} expects {list(expected[name])} "
                f"({math.prod(expected[name])})", field="checkpoint",
                fix="Check that config.json belongs to these weights (e.g. the number of experts).")
    return found


def _check_shape(key: str, shape: tuple[int, ...], name: str, want: tuple[int, ...], target: nn.Module) -> None:
    if shape != want:
        raise InvalidCheckpoint(f"tensor {key!r} has shape {list(shape)} but {type(target).__name__} expects "
                                f"{list(want)} for {name!r}", field="checkpoint",
                                fix="Check that config.json belongs to these weights.")


def _tied_names(model: nn.Module) -> dict[str, set[str]]:
    """Each parameter name -> the other names of the same tensor (tied weights ``transformers`` saves once)."""
    by_tensor: dict[int, set[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_tensor.setdefault(id(p), set()).add(name)
    return {n: names - {n} for names in by_tensor.values() for n in names if len(names) > 1}


#: Buffers that older ``transformers`` versions saved with the weights and every loader ignores.
STALE_BUFFERS = ("position_ids", "inv_freq", "masked_bias")


def _generic(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.*.mlp.up_proj.weight``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def unexpected_tensors(keys: list[str], model: nn.Module,
                       known: dict[str, Any] | set[str]) -> tuple[list[str], list[str]]:
    """Split checkpoint ``keys`` that ``model`` (built from config.json) lacks into (backbone, other).

    ``keys`` are checkpoint keys matched to no tensor of ``model`` (``known``: its state-dict names). A key is in
    the backbone when it lies under the base-model prefix (``model.``, ``bert.``) or, for a checkpoint saved from
    the bare base model, under one of the base model's own submodules (``encoder.``, ``layers.``). Left out, as
    ``transformers`` ignores them when loading: buffers (``position_ids``, rotary ``inv_freq``, the model's own
    buffers), keys matching the class's ``_keys_to_ignore_on_load_unexpected`` (e.g. DeepSeek-V3's multi-token
    prediction layer ``model.layers.61``) and a pooler that the model has none of (token classifiers).
    Backbone tensors beyond those mean config.json describes another model than the weights (e.g. fewer layers);
    ``other`` are tensors outside the backbone (another task's head).
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    is_base = not isinstance(base, nn.Module)  # the model is the bare base model (BertModel, LlamaModel)
    children = {n for n, _ in (model if is_base else base).named_children()}
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    buffers = {_generic(n) for n, _ in model.named_buffers()}
    has_pooler = any(".pooler." in f".{n}." for n in known)
    out: list[str] = []
    other: list[str] = []
    for key in keys:
        under_prefix = bool(prefix) and key.startswith(prefix + ".")
        full = key if is_base or under_prefix else f"{prefix}.{key}"
        if not (under_prefix or key.split(".", 1)[0] in children):
            other.append(key)
            continue
        if key.rsplit(".", 1)[-1] in STALE_BUFFERS or _generic(full) in buffers or _generic(key) in buffers:
            continue
        if any(p.search(key) or p.search(full) for p in ignore):
            continue
        if not has_pooler and ".pooler." in f".{key}":
            continue
        out.append(key)
    return out, other


def config_mismatch(extra: list[str], model: nn.Module, ckpt: Checkpoint) -> InvalidCheckpoint:
    """The 422 for the backbone tensors of :func:`unexpected_tensors`: config.json and the weights disagree, with
    an example, the count and, when they are entries of a layer list beyond its length, the layer counts."""
    cls = type(model).__name__
    hint = ""
    indices: dict[str, list[int]] = {}
    for key in extra:
        m = re.match(r"^(.*?)\.(\d+)\.", key)
        if m:
            indices.setdefault(m.group(1), []).append(int(m.group(2)))
    prefix = getattr(model, "base_model_prefix", "") or ""
    for path, idx in indices.items():
        module = None
        for cand in (path, f"{prefix}.{path}" if prefix else None):
            try:
                module = model.get_submodule(cand) if cand else None
            except AttributeError:
                continue
            if module is not None:
                break
        if isinstance(module, nn.ModuleList) and max(idx) >= len(module):
            cfg = ckpt.config or {}
            text = next((cfg[k] for k in ("text_config", "llm_config", "language_config")
                         if isinstance(cfg.get(k), dict)), cfg)
            declared = next((f"{k} {text[k]}" for k in ("num_hidden_layers", "n_layer", "num_layers")
                             if isinstance(text.get(k), int)), f"{len(module)} entries")
            hint = (f"; config.json declares {declared} but the weights hold {path}.0 to {path}.{max(idx)} "
                    f"({max(idx) + 1} layers)")
            break
    return InvalidCheckpoint(
        f"config.json and the weights disagree: the checkpoint holds {len(extra)} tensor(s) of the backbone that "
        f"{cls}, built from config.json, does not have, e.g. {extra[0]!r}{hint}", field="checkpoint",
        fix="Send the config.json that belongs to these weights (e.g. the right num_hidden_layers), or remove "
            "the extra tensors from the checkpoint.")
