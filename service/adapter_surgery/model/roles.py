"""Architecture resolution: which checkpoint tensors play which role, learned without loading weights.

With a usable ``config.json`` the model class named in ``architectures`` is built on the ``meta`` device
(``transformers`` allocates no storage there), and the roles come from the model itself:
``get_input_embeddings()``, ``get_output_embeddings()`` (and its bias, e.g. BERT's ``cls.predictions.bias``),
parameter identity for tying (``tie_word_embeddings`` of the text config decides it, as in ``transformers``),
and every ``nn.Linear``/``Conv1D`` with its in/out features. Without one, roles are guessed from tensor names
and shapes in the safetensors headers, and ``source`` says so.
"""

from __future__ import annotations

import contextlib
import io
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from adapter_surgery.config_check import check_config, text_config, transformers_config_error
from adapter_surgery.errors import InvalidCheckpoint
from adapter_surgery.io.checkpoint import Checkpoint
from adapter_surgery.lru import CopyingLRU
from adapter_surgery.model.keys import KeyMap, key_map, layout_key

EMBED_PATTERN = re.compile(r"(^|\.)(embed_tokens|wte|word_embeddings|embed_in|tok_embeddings|shared|"
                           r"token_embedding|embeddings)\.weight$")
HEAD_PATTERN = re.compile(r"(^|\.)(lm_head|embed_out|output|decoder)\.weight$")
#: Resolved architectures kept per process (see :func:`resolve_architecture`); each entry is a few KB.
ARCH_CACHE_SIZE = 64


@dataclass(frozen=True)
class LinearModule:
    """A Linear-like module: ``kind`` is ``linear`` (weight ``(out, in)``) or ``conv1d`` (GPT-2, ``(in, out)``)."""

    name: str
    in_features: int
    out_features: int
    kind: Literal["linear", "conv1d"]
    bias: bool


@dataclass
class Architecture:
    """The roles of a checkpoint's tensors.

    Attributes:
        source: ``"config"`` (built from ``config.json`` on the meta device) or ``"headers"`` (names/shapes).
        model_class: the ``transformers`` class used, when ``source == "config"``.
        input_embedding: checkpoint key of the input embedding, shape ``(vocab_rows, hidden)``.
        output_head: checkpoint key of the output head, ``None`` when tied or absent.
        head_param: the head's parameter name in the model (``lm_head.weight``), even when tied.
        tied: the head shares the input embedding (written once, as ``transformers`` saves it).
        output_bias: checkpoint key of a vocabulary-sized output bias (MLM heads), else ``None``.
        redundant_keys: checkpoint keys ``transformers`` ignores (a tied head stored anyway).
        vocab_rows: rows of the input embedding.
        config_vocab_size: ``vocab_size`` of the text config (``None`` without config).
        text_config_key: ``None`` if ``vocab_size`` sits at the top of ``config.json``, else the sub-config key.
        linear_modules: every Linear/Conv1D module by its full name (``source == "config"`` only).
        keys: how the checkpoint's keys name the model's tensors (:mod:`adapter_surgery.model.keys`; a checkpoint
            in another layout than the class, e.g. LLaVA's ``language_model.model.*``, has ``keys.renamed``).
        head_layout_key: the key the output head has, or would have once untied, in the checkpoint's layout
            (``language_model.lm_head.weight`` for a LLaVA checkpoint as ``save_pretrained`` writes it).
        text_module: the language model's module path inside a multimodal model (``model.language_model``; the
            module holding the input embedding, when config.json has a text sub-config), else ``None``.
        other_vocab_tensors: checkpoint keys of vocabulary-indexed buffers stored with the vocabulary along their
            last dimension after dimensions of 1 (BART's ``final_logits_bias``, shape ``(1, vocab)``): extend-vocab
            pads them with zeros, as ``transformers``' ``resize_token_embeddings`` does.
        ungrowable_vocab_tensors: checkpoint keys of other buffers with one value per vocabulary row in another
            shape (e.g. ``(2, vocab / 2)``): growing the vocabulary is refused (:meth:`check_growable`).
    """

    source: Literal["config", "headers"]
    model_class: str | None
    input_embedding: str
    output_head: str | None
    head_param: str | None
    tied: bool
    output_bias: str | None
    vocab_rows: int
    config_vocab_size: int | None
    text_config_key: str | None
    hidden_size: int
    linear_modules: dict[str, LinearModule] = field(default_factory=dict)
    redundant_keys: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    keys: KeyMap = field(default_factory=KeyMap)
    head_layout_key: str | None = None
    text_module: str | None = None
    other_vocab_tensors: list[str] = field(default_factory=list)
    ungrowable_vocab_tensors: list[str] = field(default_factory=list)

    def check_growable(self) -> None:
        """Refuse (422) growing a vocabulary that a tensor is indexed by in a shape extend-vocab cannot grow
        (:attr:`ungrowable_vocab_tensors`; those of :attr:`other_vocab_tensors` are padded along their last
        dimension).

        Raises:
            InvalidCheckpoint: :attr:`ungrowable_vocab_tensors` is not empty.
        """
        if self.ungrowable_vocab_tensors:
            key = self.ungrowable_vocab_tensors[0]
            raise InvalidCheckpoint(
                f"{key} holds one value per vocabulary id ({self.vocab_rows}, a {self.model_class} buffer) in a shape "
                "that is neither (vocab, ...) nor (1, ..., vocab); new entries could not be placed, so the output "
                "would not load", field="checkpoint",
                fix="Add tokens with transformers' resize_token_embeddings where the model class resizes this "
                    "buffer, or use attach-lora/attach-head, which do not change the vocabulary.")

    @property
    def vocab_tensors(self) -> list[str]:
        """Checkpoint keys of every tensor indexed by vocabulary id (dimension 0)."""
        keys = [self.input_embedding]
        keys += [k for k in (self.output_head, self.output_bias) if k is not None]
        return keys


def resolve_architecture(ckpt: Checkpoint, cache: ArchitectureCache | None = None) -> Architecture:
    """Resolve tensor roles for ``ckpt``: from its config on the meta device, else from headers.

    ``cache`` (the service keeps one, passed down in the run context) answers an architecture seen before.

    Raises:
        InvalidCheckpoint: no input embedding can be found, the config says the head is untied but the
            checkpoint has no head tensor, or config.json contradicts the weights
            (:func:`adapter_surgery.config_check.check_config`; the input embedding's shape in the model it builds).
    """
    check_config(ckpt)
    return cache.get(ckpt) if cache is not None else _resolve(ckpt)


def resolve_with_model(ckpt: Checkpoint, cache: ArchitectureCache | None = None,
                       ) -> tuple[Architecture, nn.Module | None]:
    """:func:`resolve_architecture`, and the meta-device model built for it (:func:`build_meta_model`), so that an
    operation that needs that model too builds it once; None when none was built (an answer from ``cache``, roles
    from headers). The model is the caller's (nothing else keeps it)."""
    check_config(ckpt)
    return cache.get_with_model(ckpt) if cache is not None else _resolve_with_model(ckpt)


def _resolve(ckpt: Checkpoint) -> Architecture:
    return _resolve_with_model(ckpt)[0]


def _resolve_with_model(ckpt: Checkpoint) -> tuple[Architecture, nn.Module | None]:
    if ckpt.config is not None:
        model, problem = build_meta_model(ckpt)
        if model is not None:
            return _from_model(ckpt, model), model
        arch = _from_headers(ckpt)
        arch.notes.append(f"config.json could not be used ({problem}); roles were taken from tensor names")
        return arch, None
    arch = _from_headers(ckpt)
    arch.notes.append(f"roles were taken from tensor names ({ckpt.config_problem})")
    return arch, None


class ArchitectureCache:
    """Architectures resolved by its owner (the service, which passes it down in the run context), keyed by what
    determines them: ``config.json``'s content, every tensor's name, dtype and shape, and whether the checkpoint is
    a bare file (never by path or weight values).

    Resolution builds the model on the meta device, which costs tens of ms per request and, the first time per
    model type, the import of its ``transformers`` modeling module; a service sees the same few architectures
    again and again. Bounded (LRU, :data:`ARCH_CACHE_SIZE` entries), thread-safe; callers get a deep copy.
    Only clean results from config.json are kept: errors and header-guessed roles are computed again each time.
    """

    def __init__(self, capacity: int = ARCH_CACHE_SIZE) -> None:
        self._entries: CopyingLRU[Architecture] = CopyingLRU(capacity)

    @staticmethod
    def key(ckpt: Checkpoint) -> str:
        tensors = sorted((n, i.dtype, i.shape) for n, i in ((n, ckpt.info(n)) for n in ckpt.weight_map))
        return json.dumps([ckpt.config, ckpt.config_problem, ckpt.is_file, tensors], sort_keys=True,
                          default=str)

    def get(self, ckpt: Checkpoint) -> Architecture:
        return self.get_with_model(ckpt)[0]

    def get_with_model(self, ckpt: Checkpoint) -> tuple[Architecture, nn.Module | None]:
        """The architecture, and the meta-device model when this call built one (a miss; :func:`resolve_with_model`);
        None on a hit."""
        key = self.key(ckpt)
        hit = self._entries.get(key)
        if hit is not None:
            return hit, None
        arch, model = _resolve_with_model(ckpt)
        if arch.source == "config" and not arch.notes:  # headers-only is cheap; notes may quote paths
            self._entries.put(key, arch)
        return arch, model

    def clear(self) -> None:
        self._entries.clear()


@contextlib.contextmanager
def quiet_transformers() -> Iterator[None]:
    """Silence ``transformers``' info/warning logs and prints while building or loading models."""
    logger = logging.getLogger("transformers")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        logger.setLevel(level)


def build_meta_model(ckpt: Checkpoint) -> tuple[nn.Module | None, str | None]:
    """Build the checkpoint's ``transformers`` model on the ``meta`` device; ``(None, why)`` if impossible.

    Raises:
        InvalidCheckpoint: config.json contradicts the weights (checked first: :func:`check_config`), or
            ``transformers`` refuses one of its fields (:func:`transformers_config_error`).
    """
    import transformers

    check_config(ckpt)

    try:
        with quiet_transformers():
            config = transformers.AutoConfig.from_pretrained(str(ckpt.root), local_files_only=True)
            names = list(getattr(config, "architectures", None) or [])
            classes = [getattr(transformers, n) for n in names if hasattr(transformers, n)]
            with torch.device("meta"):
                for cls in classes:
                    return cls(config), None
                for auto in (transformers.AutoModelForCausalLM, transformers.AutoModel):
                    try:
                        return auto.from_config(config), None
                    except ValueError:
                        continue
        return None, f"no transformers class for model_type {config.model_type!r}"
    except Exception as exc:  # transformers raises many kinds for unknown or broken configs
        refused = transformers_config_error(exc)
        if refused is not None:  # a field of config.json is wrong: the checkpoint's fault, not an unknown model
            raise refused from None
        return None, f"{type(exc).__name__}: {exc}"


def _param_names(model: nn.Module, tensor: torch.Tensor | None) -> list[str]:
    if tensor is None:
        return []
    return [n for n, p in model.named_parameters(remove_duplicate=False) if p is tensor]


def _from_model(ckpt: Checkpoint, model: nn.Module) -> Architecture:
    keys = key_map(ckpt.weight_map, model)
    cfg = model.config
    text_cfg = cfg.get_text_config() if hasattr(cfg, "get_text_config") else cfg
    text_key = next((k for k in ("text_config", "llm_config", "language_config")
                     if isinstance((ckpt.config or {}).get(k), dict)
                     and "vocab_size" in ckpt.config[k]), None)  # type: ignore[index]
    embed_mod = model.get_input_embeddings()
    embed_names = _param_names(model, embed_mod.weight)
    embed_key = next((k for n in embed_names if (k := keys.checkpoint_key(n, ckpt))), None)
    if embed_key is None:
        raise InvalidCheckpoint(f"the checkpoint has no input embedding tensor (expected one of {embed_names}, "
                                f"or a key transformers maps to one: {_layout_hint(ckpt, keys)})",
                                field="checkpoint", fix="Check that config.json belongs to these weights.")
    head_mod = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head_w = getattr(head_mod, "weight", None)
    tied = head_w is not None and head_w is embed_mod.weight
    head_names = [n for n in _param_names(model, head_w) if n not in embed_names]
    if head_mod is not None and not head_names:
        head_names = [f"{n}.weight" for n, m in model.named_modules(remove_duplicate=False) if m is head_mod]
    head_key = next((k for n in head_names if (k := keys.checkpoint_key(n, ckpt))), None)
    _check_embedding_shape(ckpt, embed_key, embed_mod.weight, text_cfg)
    rows = ckpt.info(embed_key).shape[0]
    bias_key = None
    others = _other_vocab_tensors(model, keys, ckpt, rows)
    head_b = getattr(head_mod, "bias", None)
    if head_b is not None and head_b.shape == (rows,):
        bias_key = next((k for n in _param_names(model, head_b) if (k := keys.checkpoint_key(n, ckpt))), None)
    arch = Architecture(
        source="config", model_class=type(model).__name__, input_embedding=embed_key,
        output_head=None if tied else head_key, head_param=head_names[0] if head_names else None, tied=tied,
        output_bias=bias_key, vocab_rows=rows, config_vocab_size=getattr(text_cfg, "vocab_size", None),
        text_config_key=text_key, hidden_size=ckpt.info(embed_key).shape[1],
        linear_modules=_linear_modules(model), keys=keys,
        head_layout_key=head_key or (layout_key(model, keys, head_names[0]) if head_names else None),
        text_module=_text_module(embed_names[0]) if text_key else None,
        other_vocab_tensors=[k for k, last in others.items() if last],
        ungrowable_vocab_tensors=[k for k, last in others.items() if not last])
    if keys.renamed:
        arch.notes.append(f"{len(keys.renamed)} checkpoint key(s) are in another layout than {type(model).__name__}'s "
                          f"(e.g. {next(iter(keys.renamed))!r} is {next(iter(keys.renamed.values()))!r}); mapped with "
                          f"transformers' own key conversion rules, and outputs keep the checkpoint's names")
    if tied and head_key is not None:
        arch.redundant_keys.append(head_key)
    if head_w is not None and not tied and head_key is None:
        raise InvalidCheckpoint(
            f"config.json says the output head is not tied (tie_word_embeddings false) but the checkpoint has "
            f"no {head_names[0] if head_names else 'output head'} tensor",
            field="checkpoint", fix="Set tie_word_embeddings to true in config.json, or add the head's weights.")
    return arch


def _other_vocab_tensors(model: nn.Module, keys: KeyMap, ckpt: Checkpoint, rows: int) -> dict[str, bool]:
    """Checkpoint keys of model buffers holding one value per vocabulary row in another shape than ``(rows, ...)``,
    each with whether the vocabulary is its last dimension after dimensions of 1 (``(1, rows)``: BART's
    ``final_logits_bias``)."""
    found = {}
    for name, buf in model.named_buffers():
        key = keys.checkpoint_key(name, ckpt)
        if key is not None and buf.dim() >= 2 and buf.numel() == rows and buf.shape[0] != rows:
            found[key] = buf.shape[-1] == rows
    return found


def _text_module(embed_name: str) -> str | None:
    """``model.language_model.embed_tokens.weight`` -> ``model.language_model`` (None at the top level)."""
    parts = embed_name.split(".")
    return ".".join(parts[:-2]) or None


def _layout_hint(ckpt: Checkpoint, keys: KeyMap) -> str:
    """A few checkpoint keys that name no model tensor (what the checkpoint holds instead)."""
    sample = sorted(keys.unmatched)[:3] or list(ckpt.weight_map)[:3]
    return ", ".join(repr(k) for k in sample) or "none"


def _check_embedding_shape(ckpt: Checkpoint, key: str, weight: torch.Tensor, text_cfg: object) -> None:
    """The input embedding the model built from config.json has must be the checkpoint's, else config.json
    describes another model (``vocab_size``, ``hidden_size``): a 422 naming the config field."""
    stored = tuple(ckpt.info(key).shape)
    built = tuple(weight.shape)
    if stored == built:
        return
    cfg = ckpt.config or {}
    text, text_path = text_config(cfg)

    def field_of(keys: tuple[str, ...]) -> str:
        for holder, path in ((text, text_path), (cfg, "")):
            found = next((k for k in keys if k in holder), None)
            if found is not None:
                return f"config.{path}{found}"
        return f"config.{text_path}{keys[0]}"

    if len(stored) == len(built) == 2 and stored[0] != built[0]:
        field = field_of(("vocab_size",))
        what, value = "rows", stored[0]
    else:
        field = field_of(("embedding_size", "word_embed_proj_dim", "hidden_size", "n_embd", "d_model"))
        what, value = "columns", stored[-1]
    name = field.rsplit(".", 1)[-1]
    raise InvalidCheckpoint(
        f"config.json and the weights disagree: {type(text_cfg).__name__} builds an input embedding of shape "
        f"{list(built)} but {key} has shape {list(stored)}", field=field,
        fix=f"Send the config.json that belongs to these weights ({name} {value}: the embedding's {what}).")


def _linear_modules(model: nn.Module) -> dict[str, LinearModule]:
    from transformers.pytorch_utils import Conv1D

    found = {}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            found[name] = LinearModule(name, mod.in_features, mod.out_features, "linear", mod.bias is not None)
        elif isinstance(mod, Conv1D):
            n_in, n_out = mod.weight.shape
            found[name] = LinearModule(name, n_in, n_out, "conv1d", mod.bias is not None)
    return found


def _from_headers(ckpt: Checkpoint) -> Architecture:
    shapes = ckpt.shapes()
    embeds = [k for k, s in shapes.items() if len(s) == 2 and EMBED_PATTERN.search(k)
              and "position" not in k and "token_type" not in k]
    if not embeds:
        raise InvalidCheckpoint(
            "no input embedding found: without a usable config.json, a 2-D tensor named like "
            "'embed_tokens.weight', 'wte.weight' or 'word_embeddings.weight' is needed",
            field="checkpoint", fix="Send the model directory with its config.json.")
    embed = max(embeds, key=lambda k: shapes[k][0])
    rows, hidden = shapes[embed]
    heads = [k for k, s in shapes.items() if k != embed and s == (rows, hidden) and HEAD_PATTERN.search(k)]
    head = heads[0] if heads else None
    biases = [k for k, s in shapes.items() if s == (rows,) and k.endswith("bias")]
    return Architecture(source="headers", model_class=None, input_embedding=embed, output_head=head,
                        head_param=head, tied=head is None, output_bias=biases[0] if biases else None,
                        vocab_rows=rows, config_vocab_size=None, text_config_key=None, hidden_size=hidden)
