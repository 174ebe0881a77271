"""The pad token: the tokenizer's, the config's, eos, or a dedicated one added as extend-vocab adds tokens."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from adapter_surgery.errors import InvalidSpec
from adapter_surgery.io import Checkpoint
from adapter_surgery.io.writer import Changes
from adapter_surgery.model.roles import Architecture
from adapter_surgery.ops.attach_head.spec import AttachHeadSpec, PadToken
from adapter_surgery.ops.attach_head.target import text_config
from adapter_surgery.ops.attach_head.tokens import TokenizerFacts
from adapter_surgery.ops.common import ChangedTensor


@dataclass(frozen=True)
class Pad:
    """The pad token's part of the output: its id, the rows after, and with a token added, the grown input
    embedding (writer changes, changed tensors) and the tokenizer to save; the warnings the choice gives."""

    info: PadToken | None
    rows_after: int
    tokenizer: Any = None  # with a pad token added: a new tokenizer that holds it and pads with it (saved)
    changed: list[ChangedTensor] = field(default_factory=list)
    changes: Changes = field(default_factory=Changes)
    warnings: list[str] = field(default_factory=list)


def first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and value >= 0 else None


def config_token_ids(config) -> set[int | None]:
    """The ids whose tokens :func:`plan_pad` may name: the config's ``pad_token_id`` and (first) ``eos_token_id``."""
    text = text_config(config)
    return {first_id(getattr(text, "pad_token_id", None)), first_id(getattr(text, "eos_token_id", None))}


def plan_pad(spec: AttachHeadSpec, ckpt: Checkpoint, arch: Architecture, config, tok: TokenizerFacts | None,
             device: torch.device) -> Pad:
    """The pad token of ``spec.pad_token``: the tokenizer's, the config's, eos, or (``add``) a new one; ``tok`` (the
    checkpoint's tokenizer's facts, with the tokens of :func:`config_token_ids`, or ``None``) and ``config`` are only
    read.

    Raises:
        InvalidSpec: no pad token and no eos token to pad with.
    """
    rows = arch.vocab_rows
    text = text_config(config)
    if spec.pad_token == "add":
        return _add_pad(spec, ckpt, arch, tok, device)
    warnings: list[str] = []
    if spec.pad_token == "auto":
        if tok is not None and tok.pad_token is not None and tok.pad_token_id < rows:
            cfg_pad = first_id(getattr(text, "pad_token_id", None))
            if cfg_pad is not None and cfg_pad != tok.pad_token_id:
                warnings.append(f"config.json said pad_token_id {cfg_pad} but the tokenizer pads with "
                                f"{tok.pad_token!r} (id {tok.pad_token_id}); the config now follows the tokenizer")
            return Pad(PadToken(token=tok.pad_token, id=tok.pad_token_id, source="tokenizer"), rows,
                       warnings=warnings)
        cfg_pad = first_id(getattr(text, "pad_token_id", None))
        if cfg_pad is not None and cfg_pad < rows and (tok is None or cfg_pad < tok.size):
            token = tok.tokens[cfg_pad] if tok is not None else None
            return Pad(PadToken(token=token, id=cfg_pad, source="config"), rows, warnings=warnings)
    eos_id, eos_tok = None, None
    if tok is not None and tok.eos_token is not None and tok.eos_token_id < rows:
        eos_id, eos_tok = tok.eos_token_id, tok.eos_token
    else:
        raw = getattr(text, "eos_token_id", None)
        eos_id = first_id(raw)
        if isinstance(raw, list) and len(raw) > 1:
            warnings.append(f"config.json lists several eos ids {raw}; the first, {eos_id}, is the pad id")
        if eos_id is not None and tok is not None and eos_id < tok.size:
            eos_tok = tok.tokens[eos_id]
    if eos_id is None or eos_id >= rows:
        raise InvalidSpec("the checkpoint has no pad token and no eos token to pad with", field="pad_token",
                          fix='Send "pad_token": "add" to add a dedicated pad token.')
    if spec.pad_token == "auto":
        warnings.append(f"no pad token: the eos token {eos_tok!r} (id {eos_id}) pads; the classifier pools the last "
                        "token that is not the pad id, so an input that ends in eos is pooled one token earlier. "
                        'Send "pad_token": "add" for a dedicated pad token')
    return Pad(PadToken(token=eos_tok, id=eos_id, source="eos"), rows, warnings=warnings)


def _add_pad(spec: AttachHeadSpec, ckpt: Checkpoint, arch: Architecture, tok: TokenizerFacts | None,
             device: torch.device) -> Pad:
    """Add ``spec.pad_token_content`` with extend-vocab's planning and initialization (mean row).

    Only the input embedding grows: the LM head, whose rows extend-vocab would also extend, is dropped.
    """
    from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, TokenSpec, plan_vocab, vocab_changes

    ev = ExtendVocabSpec(checkpoint=spec.checkpoint, output=spec.output, overwrite=spec.overwrite,
                         tokens=[TokenSpec(content=spec.pad_token_content, special=True)] if tok is not None else [],
                         num_new_tokens=None if tok is not None else 1, init="mean", seed=spec.seed,
                         device=spec.device)
    input_only = dataclasses.replace(arch, output_head=None, output_bias=None, redundant_keys=[],
                                     other_vocab_tensors=[])
    planned = plan_vocab(ev, ckpt, input_only)  # loads the tokenizer again: ``tok`` stays as it is
    plan = planned.plan
    derived = vocab_changes(ev, ckpt, input_only, plan, tok=planned.tokenizer, device=device)
    warnings = list(derived.warnings)
    grown = None
    if plan.added:
        info = PadToken(token=plan.added[0].token, id=plan.added[0].id, source="added")
        grown = planned.tokenizer
        if grown is not None:  # plan_vocab's own new tokenizer, which no one else holds: it pads with the new token
            grown.pad_token = info.token
    else:
        info = PadToken(token=plan.existing[0].token, id=plan.existing[0].id, source="existing")
        warnings.append(f"pad token {info.token!r} already exists (id {info.id}); it is used as it is")
    return Pad(info, plan.rows_after, tokenizer=grown, changed=derived.changed,
               changes=Changes(replace=derived.changes.replace), warnings=warnings)
