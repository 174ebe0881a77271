"""``config.json`` against the safetensors headers, before any model is built or anything allocated.

Every number in ``config.json`` that sizes work must be plausible and agree with the weights, or the request is
refused (422, ``field`` naming the config field, e.g. ``config.num_hidden_layers``, and a fix saying what the
weights hold). Checked from the raw JSON and the headers only (no ``transformers``: its config classes already
allocate per declared layer):

- **types**: those numbers must be numbers (``"num_hidden_layers": "two"`` is named here, not left to the first
  ``transformers`` class that reads the config: its tokenizer, say); a field ``transformers``' config classes refuse
  otherwise (``"vocab_size": null``) is named the same way wherever they read it (:func:`transformers_config_error`);
- **ceilings** (:data:`CEILINGS`): layer, width, head, expert, vocabulary and position counts beyond any model
  (``num_hidden_layers: 1000000000`` would build a billion modules on the meta device), in every sub-config;
- **layers**: the text config's ``num_hidden_layers`` (``n_layer``, ``num_layers``) may not exceed the layers the
  weights hold (the largest ``<list>.<i>.`` index + 1 of a layer list outside vision/audio towers), nor fall
  short of what a transformer layer list (``layers``, ``layer``, ``h``, ``block``, ``blocks``) holds: a
  layer list may hold the largest declared layer count (``num_decoder_layers`` and the like of an
  encoder-decoder) plus the multi-token-prediction layers the config names (``num_nextn_predict_layers``);
- **width**: ``hidden_size`` (``n_embd``, ``d_model``) may not exceed the input embedding's width unless another
  declared width (``embedding_size``, ``word_embed_proj_dim``) is that width;
- **vocabulary**: ``vocab_size`` must equal the input embedding's rows (``padded_vocab_size`` may stand for it);
- **experts**: ``num_local_experts`` (``num_experts``, ``n_routed_experts``, ``moe_num_experts``) may not exceed
  the experts the weights hold, where they hold expert tensors (``.experts.<i>.`` or fused 3-D ``.experts.*``).

Exact agreement of the input embedding's shape with the model that config.json builds is checked after the
(meta-device, storage-free) build, in :mod:`adapter_surgery.model.roles`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from typing import Any

from adapter_surgery.errors import InvalidCheckpoint
from adapter_surgery.io.checkpoint import Checkpoint

MAX_LAYERS = 1024
MAX_WIDTH = 1 << 17
MAX_INTERMEDIATE = 1 << 20
MAX_HEADS = 1 << 14
MAX_EXPERTS = 1 << 14
MAX_VOCAB = 1 << 26
MAX_POSITIONS = 1 << 24

#: Config keys that size work, with the largest value accepted (real models stay far below).
CEILINGS: dict[str, int] = {
    **dict.fromkeys(("num_hidden_layers", "n_layer", "num_layers", "num_decoder_layers", "num_encoder_layers",
                     "encoder_layers", "decoder_layers"), MAX_LAYERS),
    **dict.fromkeys(("hidden_size", "n_embd", "d_model", "embedding_size", "word_embed_proj_dim", "head_dim",
                     "d_kv"), MAX_WIDTH),
    **dict.fromkeys(("intermediate_size", "n_inner", "ffn_dim", "d_ff", "moe_intermediate_size",
                     "shared_expert_intermediate_size", "encoder_ffn_dim", "decoder_ffn_dim"), MAX_INTERMEDIATE),
    **dict.fromkeys(("num_attention_heads", "n_head", "num_key_value_heads", "num_heads",
                     "encoder_attention_heads", "decoder_attention_heads"), MAX_HEADS),
    **dict.fromkeys(("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts", "n_shared_experts",
                     "num_experts_per_tok"), MAX_EXPERTS),
    "vocab_size": MAX_VOCAB,
    **dict.fromkeys(("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len", "seq_length"), MAX_POSITIONS),
}
TEXT_KEYS = ("text_config", "llm_config", "language_config")
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
WIDTH_KEYS = ("hidden_size", "n_embd", "d_model")
OTHER_WIDTH_KEYS = ("embedding_size", "word_embed_proj_dim")
#: Every layer count a config may declare (an encoder-decoder's decoder may be deeper than its encoder).
ALL_LAYER_KEYS = (*LAYER_KEYS, "num_decoder_layers", "num_encoder_layers", "encoder_layers", "decoder_layers")
#: Layers the weights hold beyond the declared ones, legitimately (multi-token prediction, DeepSeek-V3 and GLM).
EXTRA_LAYER_KEYS = ("num_nextn_predict_layers",)
#: Names of the lists that hold a transformer's layers (``model.layers``, ``transformer.h``, ``encoder.block``):
#: other numbered lists (``conv_layers``, ``mtp_block``, ``altup_projections``) are not counted as missing layers.
LAYER_LISTS = ("layers", "layer", "h", "block", "blocks")
EXPERT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts", "moe_num_experts")
#: Layer lists of these towers are not the text model's.
NOT_TEXT = re.compile(r"(^|[._])(vision|visual|audio|image|speech|mm_projector|multi_modal)", re.IGNORECASE)
LAYER_INDEX = re.compile(r"^(.*?)\.(\d+)\.")
EXPERT_INDEX = re.compile(r"\.experts\.(\d+)\.")
MAX_DEPTH = 4


def text_config(config: dict[str, Any]) -> tuple[dict[str, Any], str]:
    """The text sub-config (``text_config`` and the like) if there is one, else ``config``; and its dotted path."""
    for key in TEXT_KEYS:
        if isinstance(config.get(key), dict):
            return config[key], f"{key}."
    return config, ""


def _declared(cfg: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, int] | None:
    for key in keys:
        value = cfg.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return key, value
    return None


def _walk(cfg: dict[str, Any], path: str, depth: int = 0) -> Iterator[tuple[str, str, Any]]:
    for key, value in cfg.items():
        if isinstance(value, dict) and depth < MAX_DEPTH:
            yield from _walk(value, f"{path}{key}.", depth + 1)
        else:
            yield path, key, value


def check_config(ckpt: Checkpoint, where: str = "config") -> None:
    """Refuse a ``config.json`` whose sizing numbers are absurd or contradict the headers (see the module doc).

    ``where`` prefixes the ``field`` of the error (``config``; ``patched.config`` for verify's second checkpoint).
    A checkpoint without a usable ``config.json`` passes (nothing to contradict).

    Raises:
        InvalidCheckpoint: with ``field`` ``<where>.<path of the config key>``.
    """
    config = ckpt.config
    if config is None:
        return
    check_numbers(ckpt, where)  # first: a value that is no number is named, not compared
    text, text_path = text_config(config)
    shapes = ckpt.shapes()
    _check_layers(config, text, text_path, shapes, where)  # first: their fix says what the weights hold
    _check_embedding(text, text_path, config, shapes, where)
    _check_experts(text, text_path, config, shapes, where)
    for path, key, value in _walk(config, ""):
        ceiling = CEILINGS.get(key)
        if ceiling is None or value is None:
            continue
        if not (math.isfinite(value) and 0 <= value <= ceiling):
            raise InvalidCheckpoint(
                f"config.json declares {path}{key} {value}, outside 0..{ceiling} (no model is that large)",
                field=f"{where}.{path}{key}", fix=f"Send the config.json that belongs to these weights; "
                                                  f"{key} is at most {ceiling}.")


def check_numbers(ckpt: Checkpoint, where: str = "config") -> None:
    """Refuse a sizing number of ``config.json`` (:data:`CEILINGS`, in every sub-config) that is no number (``"two"``,
    ``true``); part of :func:`check_config`, which verify runs on its patched checkpoint only
    after comparing the two (a config that is another model's is named as such). ``null`` passes (GPT-2's
    ``n_inner``): ``transformers`` refuses it where it must not be (:func:`transformers_config_error`)."""
    config = ckpt.config
    if config is None:
        return
    for path, key, value in _walk(config, ""):
        ceiling = CEILINGS.get(key)
        if ceiling is None or value is None:  # null: legitimate for some (GPT-2's n_inner); transformers judges
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise InvalidCheckpoint(
                f"config.json declares {path}{key} {value!r}, not a number", field=f"{where}.{path}{key}",
                fix=f"Send the config.json that belongs to these weights; {key} is a whole number.")


#: How transformers' config classes (huggingface_hub's strict dataclasses) name a field of the wrong type.
CONFIG_FIELD_ERROR = re.compile(r"Validation error for field '([^']+)'")


def transformers_config_error(exc: BaseException, where: str = "config") -> InvalidCheckpoint | None:
    """``exc``, raised by ``transformers`` while reading ``config.json`` (a config, tokenizer or model built from
    it), as the 422 naming the config field it refuses (``"vocab_size": null``, ``"num_hidden_layers": "two"``), as
    :func:`check_config` names a field; None when ``exc`` is not about one field of config.json."""
    found = CONFIG_FIELD_ERROR.search(str(exc))
    if found is None:
        return None
    key = found.group(1)
    reason = str(exc).strip().splitlines()[-1].strip()
    value = reason.rsplit("(value: ", 1)[-1].rstrip(")") if "(value: " in reason else "a value"
    return InvalidCheckpoint(f"config.json declares {key} {value}, which transformers refuses ({reason})",
                             field=f"{where}.{key}",
                             fix=f"Send the config.json that belongs to these weights; correct its {key}.")


def _field(where: str, text_path: str, key: str, in_text: bool) -> str:
    return f"{where}.{text_path if in_text else ''}{key}"


def _find(text: dict[str, Any], config: dict[str, Any], keys: tuple[str, ...]) -> tuple[str, int, bool] | None:
    """The first of ``keys`` declared in the text config, else at the top: ``(key, value, in_text)``."""
    found = _declared(text, keys)
    if found is not None:
        return found[0], found[1], text is not config
    found = _declared(config, keys)
    return None if found is None else (found[0], found[1], False)


def declared_layers(config: dict[str, Any]) -> int | None:
    """The layer count ``config`` declares (text config first, as :func:`check_config` reads it), or None."""
    text, _ = text_config(config)
    found = _find(text, config, LAYER_KEYS)
    return None if found is None else found[1]


def _check_layers(config: dict[str, Any], text: dict[str, Any], text_path: str,
                  shapes: dict[str, tuple[int, ...]], where: str) -> None:
    found = _find(text, config, LAYER_KEYS)
    if found is None or config.get("model_type") == "albert" or "num_hidden_groups" in config:
        return  # ALBERT shares one group of layer weights across all its layers
    key, declared, in_text = found
    lists: dict[str, int] = {}
    for name in shapes:
        m = LAYER_INDEX.match(name)
        if m and not NOT_TEXT.search(m.group(1)):
            lists[m.group(1)] = max(lists.get(m.group(1), 0), int(m.group(2)) + 1)
    held = max(lists.values(), default=0)
    field = _field(where, text_path, key, in_text)
    if declared > held:
        if lists:
            path = max(lists, key=lambda p: lists[p])
            holds = f"{path}.0 to {path}.{held - 1} ({held} layers)"
        else:
            holds = "no numbered layers at all"
        raise InvalidCheckpoint(
            f"config.json declares {key} {declared} but the weights hold {holds}", field=field,
            fix=f"Send the config.json that belongs to these weights ({key} {held}, what the weights hold).")
    deepest = max(v for cfg in (text, config) for k in ALL_LAYER_KEYS
                  if isinstance(v := cfg.get(k), int) and not isinstance(v, bool))
    merged = {**config, **text}
    extra = sum(v for k in EXTRA_LAYER_KEYS if isinstance(v := merged.get(k), int) and not isinstance(v, bool)
                and v > 0)
    layer_lists = {p: n for p, n in lists.items() if p.rsplit(".", 1)[-1] in LAYER_LISTS}
    if not layer_lists or max(layer_lists.values()) <= deepest + extra:
        return
    path = max(layer_lists, key=lambda p: layer_lists[p])
    n = layer_lists[path]
    mtp = f" ({extra} of them multi-token-prediction layers the config names)" if extra else ""
    raise InvalidCheckpoint(
        f"config.json declares {key} {declared} but the weights hold {path}.0 to {path}.{n - 1} ({n} layers); "
        "the layers past the declared ones would be dropped or misread", field=field,
        fix=f"Send the config.json that belongs to these weights ({key} {n - extra}, what the weights hold{mtp}).")


def header_embedding(shapes: dict[str, tuple[int, ...]]) -> str | None:
    """The input embedding's key guessed from names and shapes (the largest 2-D ``embed_tokens``-like tensor)."""
    from adapter_surgery.model.roles import EMBED_PATTERN

    embeds = [k for k, s in shapes.items() if len(s) == 2 and EMBED_PATTERN.search(k)
              and "position" not in k and "token_type" not in k and not NOT_TEXT.search(k)]
    return max(embeds, key=lambda k: shapes[k][0]) if embeds else None


def _check_embedding(text: dict[str, Any], text_path: str, config: dict[str, Any],
                     shapes: dict[str, tuple[int, ...]], where: str) -> None:
    embed = header_embedding(shapes)
    if embed is None:
        return
    rows, width = shapes[embed]
    found = _find(text, config, ("vocab_size",))
    padded = _find(text, config, ("padded_vocab_size",))  # ChatGLM: the embedding has the padded rows
    if found is not None and (found[1] > rows or (found[1] < rows and (padded is None or padded[1] != rows))):
        key, declared, in_text = found
        raise InvalidCheckpoint(
            f"config.json declares {key} {declared} but {embed} has {rows} rows",
            field=_field(where, text_path, key, in_text),
            fix=f"Send the config.json that belongs to these weights ({key} {rows}, the embedding's rows).")
    found = _find(text, config, WIDTH_KEYS)
    if found is not None and found[1] > width:
        others = {v for k in OTHER_WIDTH_KEYS for cfg in (text, config)
                  if isinstance(v := cfg.get(k), int) and not isinstance(v, bool)}
        if width not in others:
            key, declared, in_text = found
            raise InvalidCheckpoint(
                f"config.json declares {key} {declared} but {embed} is {width} wide",
                field=_field(where, text_path, key, in_text),
                fix=f"Send the config.json that belongs to these weights ({key} {width}, the embedding's width).")


def _check_experts(text: dict[str, Any], text_path: str, config: dict[str, Any],
                   shapes: dict[str, tuple[int, ...]], where: str) -> None:
    found = _find(text, config, EXPERT_KEYS)
    if found is None:
        return
    held = 0
    seen = False
    for name, shape in shapes.items():
        if ".experts." not in name or NOT_TEXT.search(name):
            continue
        m = EXPERT_INDEX.search(name)
        if m:
            seen, held = True, max(held, int(m.group(1)) + 1)
        elif len(shape) == 3:  # fused experts: (num_experts, ..., ...)
            seen, held = True, max(held, shape[0])
    key, declared, in_text = found
    if seen and declared > held:
        raise InvalidCheckpoint(
            f"config.json declares {key} {declared} but the weights hold {held} experts per layer",
            field=_field(where, text_path, key, in_text),
            fix=f"Send the config.json that belongs to these weights ({key} {held}, what the weights hold).")
