"""Extend the vocabulary: add tokens to the tokenizer and rows to every vocabulary-indexed tensor.

Only the tensors indexed by vocabulary id change (input embedding, untied output head, MLM output bias; a
``(1, vocab)`` buffer such as BART's ``final_logits_bias`` is padded with zeros, as ``transformers`` does); every
other tensor is copied byte for byte and shards without a changed tensor are linked. The tokenizer is updated
with ``transformers`` (``add_tokens`` / ``add_special_tokens``) and saved with the output.
Initialization strategies and their sources are in :mod:`adapter_surgery.initializers`.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import shutil
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, Field, StrictBool, StrictInt

from adapter_surgery import resources
from adapter_surgery.chat_template import MAX_CHAT_TEMPLATE_CHARS, render_sample
from adapter_surgery.config_check import text_config
from adapter_surgery.devices import DeviceName, pick_device
from adapter_surgery.errors import InvalidCheckpoint, InvalidSpec
from adapter_surgery.initializers import (
    ROW_INITS,
    RowContext,
    RowStats,
    hewitt_needs_covariance,
    row_generator,
    row_stats,
    trained_blocks,
)
from adapter_surgery.io import Checkpoint, describe_files
from adapter_surgery.io.writer import (
    Changes,
    DeferredRows,
    NewTensor,
    RowPatchedTensor,
    TensorSource,
    write_checkpoint,
    write_single_file,
)
from adapter_surgery.model.roles import Architecture
from adapter_surgery.ops.common import (
    ChangedTensor,
    FileInfo,
    PathFields,
    ProgressEvent,
    RunContext,
    Seed,
    StrictModel,
)
from adapter_surgery.ops.runner import begin
from adapter_surgery.report import PreservationReport
from adapter_surgery.spec import TokenText
from adapter_surgery.tokenizer_cache import TokenizerCache, load_tokenizer

#: New rows per request at most (pad_to_multiple_of or num_new_tokens beyond this is a mistake, not a model).
MAX_NEW_ROWS = 1 << 20
#: float32 bytes of new row values held at once, at most.
MAX_NEW_BYTES = 4 << 30


RowStrategy = Literal["mean", "subword_mean", "hewitt", "normal", "zeros"]


class CopyInit(StrictModel):
    """Copy the row(s) of an existing token."""

    strategy: Literal["copy"]
    source: str | StrictInt = Field(description="An existing token's text, or a row id (for checkpoints without "
                                                "tokenizer).")


InitSpec = Annotated[
    RowStrategy | CopyInit, Field(description="A strategy name, or {'strategy': 'copy', 'source': ...}.")
]


class TokenSpec(StrictModel):
    content: TokenText = Field(description="The token's text (not whitespace-only, no control characters).")
    special: StrictBool = Field(False, description="Add as a special token (never split, skipped when decoding).")
    description: str | None = Field(None, max_length=10_000,
                                    description="Text whose subword pieces define the row for subword_mean.")
    init: InitSpec | None = Field(None, description="Overrides the request's init for this token.")


class ExtendVocabOptions(StrictModel):
    """What to add and how to initialize it (everything but the paths)."""

    tokens: list[TokenText | TokenSpec] = Field(default_factory=list, max_length=MAX_NEW_ROWS,
                                                description="Tokens to add, in id order.")
    num_new_tokens: StrictInt | None = Field(None, ge=0, le=MAX_NEW_ROWS,
                                       description="Rows to add to a checkpoint without tokenizer (instead of tokens).")
    init: InitSpec = "mean"
    pad_to_multiple_of: StrictInt | None = Field(None, ge=1, le=65536,
                                           description="Round the row count up to a multiple of this (<= 65536).")
    reinit_existing: StrictBool = Field(False, description="Re-initialize existing tokens whose rows are all zero.")
    untie: StrictBool = Field(False, description="Write the output head as its own tensor and set "
                                                "tie_word_embeddings false.")
    seed: Seed = Field(0, description="Seeds the random strategies; the same seed gives byte-identical output.")
    device: DeviceName = Field("auto", description="Where the arithmetic runs: auto (GPU when present), cpu, cuda.")
    verify: StrictBool = Field(False, description="Add the preservation report (base vs output) to the result.")
    chat_template: str | None = Field(
        None, min_length=1, max_length=MAX_CHAT_TEMPLATE_CHARS,
        description="A chat template (Jinja, as tokenizer.chat_template) saved with the tokenizer, e.g. one that uses "
                    "the special tokens added; checked first by rendering a sample conversation with transformers' "
                    "apply_chat_template (bounded in time, memory and output).")


class ExtendVocabSpec(PathFields, ExtendVocabOptions):
    """The full ``POST /extend-vocab`` request."""


class TokenId(BaseModel):
    token: str | None
    id: int


class ExtendVocabResult(BaseModel):
    output: str
    architecture_source: Literal["config", "headers"]
    vocab_size_before: int
    vocab_size_after: int
    tokenizer_size_before: int | None
    tokenizer_size_after: int | None
    added: list[TokenId]
    existing: list[TokenId]
    untrained_existing: list[TokenId] = Field(description="Existing tokens whose rows are all zero.")
    reinitialized: list[TokenId]
    padding_rows: list[int] = Field(description="New rows with no tokenizer entry (from pad_to_multiple_of).")
    rows_without_token: list[int] = Field(description="All rows of the output with no tokenizer entry; "
                                                      "serving can mask them.")
    changed_tensors: list[ChangedTensor]
    files: list[FileInfo]
    warnings: list[str]
    bytes_read: int = Field(0, description="Bytes of the input's tensor data read into memory (rows for the "
                                           "statistics and the copied rows); the kernel's file-to-file copies of "
                                           "unchanged tensors are not counted.")
    seconds: float
    report: PreservationReport | None = Field(None, description="With verify: true, the preservation report.")
    chat_template_sample: str | None = Field(None, description="With chat_template: the sample conversation as "
                                                               "the saved template renders it.")


@dataclass
class _Row:
    """One row to write: its id, strategy, and source ids (copy / subword pieces)."""

    id: int
    strategy: str
    sources: list[int] = field(default_factory=list)


def extend_vocab(spec: ExtendVocabSpec, ctx: RunContext) -> ExtendVocabResult:
    """Run ``spec``: add its tokens and rows, write the output atomically, return what changed.

    Shapes: every vocabulary tensor grows from ``(V, ...)`` to ``(V', ...)`` with ``V' = max(V, len(tokenizer))``
    rounded up to ``pad_to_multiple_of``; new ids take spare rows (ids past the tokenizer's length) first;
    tensors never shrink. Dtypes are kept; arithmetic is float32 on ``spec.device``.

    Raises:
        NotFound, PathOutsideDataDir, OutputExists: path problems.
        InvalidCheckpoint: the checkpoint is malformed.
        InvalidSpec: the request does not fit the checkpoint (no tokenizer for ``tokens``, unknown copy source...).
    """
    run = begin(spec, ctx)
    output = run.output
    device = pick_device(spec.device)
    ckpt = run.open()
    _refuse_unreadable_config(ckpt)
    arch = run.architecture(ckpt)
    arch.check_growable()
    warnings = list(ckpt.warnings) + arch.notes
    planned = plan_vocab(spec, ckpt, arch, ctx, check_memory=True)
    plan, tok = planned.plan, planned.tokenizer
    sample, template_warnings = _check_chat_template(spec, tok, plan)
    warnings += template_warnings
    if not plan.rows and plan.rows_after == arch.vocab_rows and not spec.reinit_existing and not spec.untie \
            and spec.chat_template is None:
        warnings.append("nothing to add: every token already exists (or none was given); the output is the input, "
                        "its weights hard-linked")
    warnings += _first_rows_warning(spec, plan)
    ctx.say(f"planned {len(plan.added)} new tokens, {arch.vocab_rows} -> {plan.rows_after} rows")
    single_file = output.suffix == ".safetensors"
    # a directory's vocabulary statistics run on a worker while the writer copies what precedes the rows they change
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="row-stats")
    try:
        derived = vocab_changes(spec, ckpt, arch, plan, tok, device, ctx, pool=None if single_file else pool)
        changes, changed = derived.changes, derived.changed
        if single_file and not ckpt.is_file:
            raise InvalidSpec("a .safetensors output needs a bare .safetensors checkpoint", field="output",
                              fix="Give a directory as output for a model directory.")
        with run.writing() as tmp:
            if single_file:
                ctx.say("write single file")
                write_single_file(ckpt, tmp, changes, ctx)
                digests = {}
            else:
                shard_name = "model.safetensors" if ckpt.is_file else None
                digests = write_checkpoint(ckpt, tmp, changes, ctx, shard_name=shard_name, cache=ctx.digests)
                derived = derived.settled()  # every statistic has run (raises here, before the rename, if one failed)
                _write_side_files(ckpt, tmp, arch, derived.plan, spec, tok)
            files = describe_files(tmp, known=digests)
            if single_file:  # the file's final name, not the temporary one
                files = [dataclasses.replace(f, path=output.name) for f in files]
            report = run.verify(tmp, device=spec.device) if spec.verify else None  # before the output is published
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
    plan = derived.plan
    warnings += derived.warnings
    return ExtendVocabResult(
        output=spec.output, architecture_source=arch.source,
        vocab_size_before=arch.vocab_rows, vocab_size_after=plan.rows_after,
        tokenizer_size_before=plan.tok_before, tokenizer_size_after=None if tok is None else len(tok),
        added=plan.added, existing=plan.existing, untrained_existing=plan.untrained, reinitialized=plan.reinit,
        padding_rows=plan.padding_rows, rows_without_token=plan.rows_without_token, changed_tensors=changed,
        files=[FileInfo.of(f) for f in files], warnings=warnings, bytes_read=ckpt.bytes_read,
        seconds=run.seconds(),
        report=report, chat_template_sample=sample)


def _first_rows_warning(spec: ExtendVocabSpec, plan: VocabPlan) -> list[str]:
    """Existing tokens that had no row (a tokenizer longer than the embedding) get their first rows: say so."""
    without = set(plan.rows_without_token)
    existing = [i for i in plan.padding_rows if i not in without]
    if not existing:
        return []
    init = "mean" if spec.init == "subword_mean" else spec.init
    how = init if isinstance(init, str) else init.strategy
    shown = f"{existing[:8]}{'...' if len(existing) > 8 else ''}"
    return [f"{len(existing)} existing token(s) of the tokenizer had no embedding row (the tokenizer is longer than "
            f"the embedding): ids {shown} got their first rows, initialized as {how}; the model could not produce "
            "them before and can now"]


# -- planning ------------------------------------------------------------------------------------------------
@dataclass
class VocabPlan:
    """Which rows get which values: new tokens, padding rows, re-initialized rows; what the result reports."""

    rows_after: int
    rows: list[_Row]
    added: list[TokenId]
    existing: list[TokenId]
    untrained: list[TokenId]
    reinit: list[TokenId]
    padding_rows: list[int]
    rows_without_token: list[int]
    tok_before: int | None
    has_entry: torch.Tensor  # bool (V,): rows with a tokenizer entry in the base


@dataclass(frozen=True)
class PlannedVocab:
    """What :func:`plan_vocab` returns: the plan, and the checkpoint's tokenizer with the new tokens added (a new
    object, loaded by :func:`plan_vocab`; ``None`` for a checkpoint without tokenizer files)."""

    plan: VocabPlan
    tokenizer: Any  # PreTrainedTokenizerBase | None


def _load_tokenizer(ckpt: Checkpoint, spec: ExtendVocabSpec,
                    cache: TokenizerCache | None = None):  # -> PreTrainedTokenizerBase | None
    if not ckpt.has_tokenizer:
        if spec.tokens:
            raise InvalidSpec("the checkpoint has no tokenizer files, so tokens cannot be added by text",
                              field="tokens", fix="Send num_new_tokens instead, or include the tokenizer files.")
        return None
    if spec.num_new_tokens:
        raise InvalidSpec("num_new_tokens is for checkpoints without a tokenizer; this one has one",
                          field="num_new_tokens", fix="List the new tokens in tokens.")
    return load_tokenizer(ckpt, cache=cache, fast_without_config=True)


#: The planning loops check for a cancel and report progress every this many tokens or rows.
PLAN_STEP = 1024


def _planning(ctx: RunContext | None, stage: str, done: int, total: int) -> None:
    """At a planning loop boundary: raise :class:`Cancelled` when asked to stop; report ``done`` of ``total`` (unit
    ``tokens``, apart from the byte tally of the writes that follow)."""
    if ctx is None:
        return
    ctx.check_cancelled()
    if ctx.progress is not None:
        ctx.progress(ProgressEvent(stage, done, max(total, done), "tokens"))


def plan_vocab(spec: ExtendVocabSpec, ckpt: Checkpoint, arch: Architecture, ctx: RunContext | None = None, *,
               check_memory: bool = False) -> PlannedVocab:
    """Load the checkpoint's tokenizer and plan the rows: ids of the new tokens, padding, the final row count.

    The tokenizer is loaded here (in the service, a private copy of the one ``ctx.tokenizers`` keeps), and here only
    it grows (and takes ``spec.chat_template``): the one returned is no object a caller held before. The request's
    tokens are read against it before it grows (existing tokens, copy sources, the subword pieces of
    ``subword_mean``); the new tokens' ids are read from it after. With ``check_memory``, the request is refused
    (503) before the tokenizer grows when its rows cannot fit in the memory available (``ctx.memory_limit_bytes``).
    With ``ctx``, every :data:`PLAN_STEP` tokens or rows checks for a cancel and reports progress.

    Used by extend-vocab and by attach-head (for a dedicated pad token).

    Raises:
        InvalidSpec: a copy source that does not exist, subword_mean without tokenizer, ``tokens`` without
            tokenizer files, ``num_new_tokens`` with them.
        InvalidCheckpoint: tokenizer files that ``transformers`` cannot load.
        NotEnoughMemory: with ``check_memory``, rows that cannot fit.
        Cancelled: the job was asked to stop.
    """
    if ctx is not None:
        ctx.say("loading the tokenizer")
    tok = _load_tokenizer(ckpt, spec, None if ctx is None else ctx.tokenizers)
    if ctx is not None:
        ctx.check_cancelled()
    if check_memory:
        _check_memory(spec, ckpt, arch, tok, None if ctx is None else ctx.memory_limit_bytes)
    if tok is None:
        return PlannedVocab(_plan_without_tokenizer(spec, ckpt, arch, ctx), None)
    read = _read_tokens(spec, arch, tok, ctx)
    n_tokens = len(spec.tokens)
    _planning(ctx, f"adding {len(read.pending)} tokens to the tokenizer", n_tokens, 2 * n_tokens)
    from transformers import AddedToken

    # runs of ordinary / special tokens are added in one call each, so ids follow the request's order; one call per
    # token made 2^20 tokens quadratic (the tokenizer rebuilds its added-token matcher on every call)
    for special, run in itertools.groupby(read.pending, key=lambda t: t[1]):
        batch = [AddedToken(content, special=special, normalized=False) for content, _, _ in run]
        if special:
            tok.add_special_tokens({"extra_special_tokens": batch}, replace_extra_special_tokens=False)
        else:
            tok.add_tokens(batch)
    if spec.chat_template is not None:  # saved with the tokenizer (checked by extend_vocab before any write)
        tok.chat_template = spec.chat_template
    return PlannedVocab(_plan_with_tokenizer(spec, ckpt, arch, read, tok, ctx), tok)


@dataclass(frozen=True)
class _TokensRead:
    """The request's tokens read against the base tokenizer, before it grows."""

    vocab: dict[str, int]  # the base tokenizer's
    size: int  # len() of the base tokenizer
    has_entry: torch.Tensor  # bool (V,): rows with a tokenizer entry in the base
    existing: list[TokenId]
    pending: list[tuple[str, bool, tuple[str, list[int]]]]  # (content, special, (strategy, sources)) to add


def _read_tokens(spec: ExtendVocabSpec, arch: Architecture, tok, ctx: RunContext | None) -> _TokensRead:
    """Which of the request's tokens ``tok`` has, and the strategy and source rows of the others."""
    rows_before = arch.vocab_rows
    vocab = tok.get_vocab()
    has_entry = torch.zeros(max(rows_before, 1), dtype=torch.bool)
    ids = torch.tensor([i for i in vocab.values() if i < rows_before], dtype=torch.long)
    has_entry[ids] = True
    seen: set[str] = set()
    existing: list[TokenId] = []
    pending: list[tuple[str, bool, tuple[str, list[int]]]] = []  # plain tuples: 2^20 objects would cost seconds
    n_tokens = len(spec.tokens)
    for i, raw in enumerate(spec.tokens):
        if i % PLAN_STEP == 0:
            _planning(ctx, f"planning tokens {i}/{n_tokens}", i, 2 * n_tokens)
        content = raw if isinstance(raw, str) else raw.content
        if content in seen:
            continue
        seen.add(content)
        if content in vocab:
            existing.append(TokenId(token=content, id=vocab[content]))
            continue
        if isinstance(raw, str):
            init, special, text = spec.init, False, content
        else:
            init, special, text = raw.init or spec.init, raw.special, raw.description or content
        pending.append((content, special, _source_for(init, text, vocab, tok, f"tokens.{i}", rows_before)))
    return _TokensRead(vocab=vocab, size=len(tok), has_entry=has_entry, existing=existing, pending=pending)


def _plan_with_tokenizer(spec: ExtendVocabSpec, ckpt: Checkpoint, arch: Architecture, read: _TokensRead, tok,
                         ctx: RunContext | None) -> VocabPlan:
    """The plan once ``tok`` (the base tokenizer of ``read``) holds the new tokens: their ids from it."""
    size = read.size
    pending = read.pending
    n_tokens = len(spec.tokens)
    first, last = (tok.convert_tokens_to_ids(pending[i][0]) for i in (0, -1)) if pending else (0, -1)
    consecutive = first == size and last == size + len(pending) - 1 == len(tok) - 1
    rows: list[_Row] = []
    added: list[TokenId] = []
    for i, (content, _special, (strategy, sources)) in enumerate(pending):  # consecutive but for odd tokenizers
        if i % PLAN_STEP == 0:
            _planning(ctx, f"assigning ids {i}/{len(pending)}", n_tokens + i * n_tokens // max(len(pending), 1),
                      2 * n_tokens)
        row_id = size + i if consecutive else tok.convert_tokens_to_ids(content)
        rows.append(_Row(row_id, strategy, sources))
        added.append(TokenId(token=content, id=row_id))
    needed = max(arch.vocab_rows, len(tok))
    return _plan_padding(spec, ckpt, arch, rows, added, read.existing, needed, read, ctx)


def _plan_without_tokenizer(spec: ExtendVocabSpec, ckpt: Checkpoint, arch: Architecture,
                            ctx: RunContext | None) -> VocabPlan:
    """The plan of ``num_new_tokens`` rows for a checkpoint without tokenizer."""
    rows_before = arch.vocab_rows
    n_new = spec.num_new_tokens or 0
    rows: list[_Row] = []
    added: list[TokenId] = []
    for i in range(n_new):
        if i % PLAN_STEP == 0:
            _planning(ctx, f"planning new rows {i}/{n_new}", i, n_new)
        rows.append(_row_for(rows_before + i, spec.init, None, None, None, "num_new_tokens", rows_before))
        added.append(TokenId(token=None, id=rows_before + i))
    return _plan_padding(spec, ckpt, arch, rows, added, [], rows_before + n_new, None, ctx)


def _plan_padding(spec: ExtendVocabSpec, ckpt: Checkpoint, arch: Architecture, token_rows: list[_Row],
                  added: list[TokenId], existing: list[TokenId], needed: int, read: _TokensRead | None,
                  ctx: RunContext | None) -> VocabPlan:
    """The plan: ``token_rows`` (the new tokens' rows, ``needed`` rows in all), then padding rows up to
    ``pad_to_multiple_of``; ``read`` is ``None`` without tokenizer."""
    rows_before = arch.vocab_rows
    rows_after = needed
    if spec.pad_to_multiple_of:
        rows_after = math.ceil(needed / spec.pad_to_multiple_of) * spec.pad_to_multiple_of
    rows_after = max(rows_after, rows_before)
    _check_size(rows_after - rows_before, ckpt, arch, spec)
    pad_strategy = "mean" if spec.init == "subword_mean" else spec.init
    taken = {r.id for r in token_rows}
    padding = [i for i in range(rows_before, rows_after) if i not in taken]
    rows = list(token_rows)
    for k, r in enumerate(padding):
        if k % PLAN_STEP == 0:
            _planning(ctx, f"planning padding rows {k}/{len(padding)}", k, len(padding))
        rows.append(_row_for(r, pad_strategy, None, None, None, "init", rows_before))
    if read is None:
        rows_without_token = []
        has_entry = torch.ones(rows_before, dtype=torch.bool)
    else:  # the base's ids and the added ones (get_vocab of a tokenizer with 2^20 added tokens takes seconds)
        has_id = torch.zeros(rows_after, dtype=torch.bool)
        has_id[torch.tensor([i for i in read.vocab.values() if i < rows_after], dtype=torch.long)] = True
        has_id[torch.tensor([a.id for a in added if 0 <= a.id < rows_after], dtype=torch.long)] = True
        rows_without_token = torch.nonzero(~has_id).flatten().tolist()
        has_entry = read.has_entry
    return VocabPlan(rows_after=rows_after, rows=rows, added=added, existing=existing, untrained=[], reinit=[],
                     padding_rows=padding, rows_without_token=rows_without_token,
                     tok_before=None if read is None else read.size, has_entry=has_entry)


def _check_size(new_rows: int, ckpt: Checkpoint, arch: Architecture, spec: ExtendVocabSpec) -> None:
    row = ckpt.info(arch.input_embedding).numel // max(arch.vocab_rows, 1)
    field = "pad_to_multiple_of" if spec.pad_to_multiple_of else ("tokens" if spec.tokens else "num_new_tokens")
    if new_rows > MAX_NEW_ROWS or new_rows * row * 4 > MAX_NEW_BYTES:
        raise InvalidSpec(f"the request would add {new_rows} rows of {row} values ({new_rows * row * 4 / 2**30:.1f} "
                          f"GiB in float32) to a vocabulary of {arch.vocab_rows}", field=field,
                          fix=f"Add at most {MAX_NEW_ROWS} rows and {MAX_NEW_BYTES >> 30} GiB per request.")


def _check_memory(spec: ExtendVocabSpec, ckpt: Checkpoint, arch: Architecture, tok, limit: int | None) -> None:
    """Refuse (503) before the tokenizer grows when the new rows cannot fit in the memory available
    (:func:`adapter_surgery.resources.extend_vocab_bytes`; an upper bound: every token new)."""
    info = ckpt.info(arch.input_embedding)
    n = len(spec.tokens) if tok is not None else (spec.num_new_tokens or 0)
    needed = max(arch.vocab_rows, (len(tok) if tok is not None else arch.vocab_rows) + n)
    if spec.pad_to_multiple_of:
        needed = math.ceil(needed / spec.pad_to_multiple_of) * spec.pad_to_multiple_of
    new_rows = needed - arch.vocab_rows
    row = info.numel // max(arch.vocab_rows, 1)
    inits = [spec.init] + [t.init for t in spec.tokens if not isinstance(t, str) and t.init is not None]
    estimate = resources.extend_vocab_bytes(
        new_rows, row, len(arch.vocab_tensors), max(1, info.nbytes // max(info.numel, 1)),
        covariance_of=row if "hewitt" in inits else 0, tokens=n)
    field = "pad_to_multiple_of" if spec.pad_to_multiple_of else ("tokens" if spec.tokens else "num_new_tokens")
    resources.require(estimate, available=resources.available_memory(limit), field=field,
                      what=f"adding up to {new_rows} rows of {row} values",
                      fix="Add fewer tokens per request (several requests, each on the previous output), or give "
                          "the service more memory (ADAPTER_SURGERY_MEMORY_LIMIT_BYTES, the container's limit).")


def _row_for(row_id: int, init, text: str | None, vocab: dict[str, int] | None, tok, where: str,
             rows_before: int) -> _Row:
    return _Row(row_id, *_source_for(init, text, vocab, tok, where, rows_before))


def _source_for(init, text: str | None, vocab: dict[str, int] | None, tok, where: str,
                rows_before: int) -> tuple[str, list[int]]:
    """A row's strategy and source rows (copy: the source; subword_mean: the pieces of ``text`` in ``tok``)."""
    if isinstance(init, CopyInit):
        src = init.source
        if isinstance(src, int):
            if not 0 <= src < rows_before:
                raise InvalidSpec(f"copy source row {src} is not a row of the checkpoint (0..{rows_before - 1})",
                                  field=f"{where}.init.source", fix="Name an existing row id or token.")
            return "copy", [src]
        if vocab is None or src not in vocab:
            raise InvalidSpec(f"copy source {src!r} is not a token of the base tokenizer",
                              field=f"{where}.init.source", fix="Name a token that exists before this request.")
        return "copy", [vocab[src]]
    if init == "subword_mean":
        if tok is None:
            raise InvalidSpec("subword_mean needs a tokenizer to split the token's text",
                              field=f"{where}.init", fix="Use mean, or include the tokenizer files.")
        if text is None:
            return "mean", []
        pieces = [i for i in tok(text, add_special_tokens=False)["input_ids"] if i < rows_before]
        return "subword_mean", pieces
    return init, []


# -- values ---------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VocabChanges:
    """What :func:`vocab_changes` derives from a plan: the tensor changes, the changed tensors as the result lists
    them, the plan completed with what the row statistics found (untrained rows; re-initialized ones), warnings.

    With statistics still running (:func:`vocab_changes` given a ``pool``), ``changes`` holds :class:`DeferredRows`
    and ``plan``/``warnings`` are those known before the statistics: :meth:`settled` waits for them and completes
    both (call it once the changes are written)."""

    changes: Changes
    changed: list[ChangedTensor]
    plan: VocabPlan
    warnings: list[str]
    pending: Callable[[], tuple[VocabPlan, list[str]]] | None = None

    def settled(self) -> VocabChanges:
        """These changes with the statistics' findings in ``plan`` and ``warnings`` (waits for them)."""
        if self.pending is None:
            return self
        plan, warnings = self.pending()
        return dataclasses.replace(self, plan=plan, warnings=warnings, pending=None)


def vocab_changes(spec: ExtendVocabSpec, ckpt: Checkpoint, arch: Architecture, plan: VocabPlan, tok,
                  device: torch.device, ctx: RunContext | None = None,
                  pool: Executor | None = None) -> VocabChanges:
    """The tensor changes of ``plan``: every vocabulary tensor of ``arch`` row-patched with its strategy values.

    Also finds existing tokens with all-zero rows (re-initialized with ``reinit_existing``: the returned plan has
    them; ``plan`` itself is left as it is), drops redundant tied heads and unties on request.

    With ``pool`` (and without ``reinit_existing``, whose rows are known only from the statistics), each vocabulary
    tensor's statistics and new rows are computed there, in the order the writer reaches the tensors, while the
    caller writes: the tensors are :class:`DeferredRows` (their unchanged leading rows are copied meanwhile) and
    the result's :meth:`VocabChanges.settled` completes the plan and warnings. The values are the same either way.

    Raises:
        InvalidCheckpoint: a vocabulary tensor without any trained row (with ``pool``: from the write, or from
            :meth:`VocabChanges.settled`).
    """
    warnings: list[str] = []
    changes = Changes()
    for key in arch.redundant_keys:
        changes.remove.add(key)
        warnings.append(f"dropped {key!r}: the config ties it to {arch.input_embedding!r}, so transformers "
                        "ignores the stored copy")
    n_hewitt = sum(r.strategy == "hewitt" for r in plan.rows)
    reinit_hewitt = spec.reinit_existing and spec.init == "hewitt"  # how many rows: known after the statistics

    def need_cov(key: str) -> bool:
        row_shape = tuple(ckpt.info(key).shape[1:])
        return reinit_hewitt or (n_hewitt > 0 and hewitt_needs_covariance(n_hewitt, row_shape))

    def stats_of(n: int, k: str) -> RowStats:
        _planning(ctx, f"row statistics of {k}", n, len(arch.vocab_tensors))
        cov = need_cov(k)  # few hewitt rows: their draws are summed in the statistics pass (no second pass)
        draws = (n_hewitt, row_generator(spec.seed, k, "hewitt", device)) if n_hewitt and not cov else None
        return _stats(ckpt, k, plan, device, cov, draws)

    grows = bool(plan.rows) or plan.rows_after != arch.vocab_rows
    if pool is not None and not spec.reinit_existing and grows \
            and all(ckpt.info(k).shape and ckpt.info(k).shape[0] for k in arch.vocab_tensors):
        return _vocab_changes_overlapped(spec, ckpt, arch, plan, tok, device, ctx, pool, changes, warnings, stats_of)
    stats = {k: stats_of(n, k) for n, k in enumerate(arch.vocab_tensors)}
    plan, found = _untrained(spec, plan, stats, tok, arch)
    warnings += found
    changed: list[ChangedTensor] = []
    if plan.rows or plan.rows_after != arch.vocab_rows:
        for n, key in enumerate(arch.vocab_tensors):
            _planning(ctx, f"initializing the rows of {key}", n, len(arch.vocab_tensors))
            src = _patched(ckpt, key, stats[key], plan, spec, device, ctx)
            changes.replace[key] = src
            changed.append(ChangedTensor(name=key, shape_before=list(ckpt.info(key).shape), shape=list(src.shape)))
    return _vocab_changes_rest(spec, ckpt, arch, plan, changes, changed, warnings)


def _vocab_changes_rest(spec: ExtendVocabSpec, ckpt: Checkpoint, arch: Architecture, plan: VocabPlan,
                        changes: Changes, changed: list[ChangedTensor], warnings: list[str],
                        pending: Callable[[], tuple[VocabPlan, list[str]]] | None = None) -> VocabChanges:
    """After the vocabulary tensors: the other vocabulary tensors zero-padded, the head untied on request."""
    for key in arch.other_vocab_tensors if plan.rows_after != arch.vocab_rows else []:
        src = zero_padded(ckpt, key, plan.rows_after)
        changes.replace[key] = src
        changed.append(ChangedTensor(name=key, shape_before=list(ckpt.info(key).shape), shape=list(src.shape)))
    if spec.untie:
        head, untied, note = _untie(changes.replace, ckpt, arch)
        changes = changes.merged(head)
        changed += untied
        warnings += note
    return VocabChanges(changes, changed, plan, warnings, pending)


def _untrained(spec: ExtendVocabSpec, plan: VocabPlan, stats: dict[str, RowStats], tok,
               arch: Architecture) -> tuple[VocabPlan, list[str]]:
    """``plan`` with the existing tokens whose rows are all zero (untrained; re-initialized with
    ``reinit_existing``), and the warning that says so."""
    warnings: list[str] = []
    zero = sorted(set().union(*(set(s.zero_rows) for s in stats.values())))
    names = [None] * len(zero) if tok is None else tok.convert_ids_to_tokens(zero)
    untrained = [TokenId(token=name, id=i) for name, i in zip(names, zero, strict=True)]
    plan = dataclasses.replace(plan, untrained=untrained)
    if zero:
        warnings.append(f"{len(zero)} existing token(s) have all-zero rows (reserved or untrained), e.g. id {zero[0]}"
                        + ("; re-initialized" if spec.reinit_existing else "; send reinit_existing: true to "
                           "initialize them"))
    if spec.reinit_existing:
        strategy = spec.init if spec.init != "subword_mean" else "mean"
        reinit = [_row_for(i, strategy, None, None, None, "init", arch.vocab_rows) for i in zero]
        plan = dataclasses.replace(plan, rows=[*plan.rows, *reinit], reinit=list(untrained))
    return plan, warnings


def _vocab_changes_overlapped(spec: ExtendVocabSpec, ckpt: Checkpoint, arch: Architecture, plan: VocabPlan, tok,
                              device: torch.device, ctx: RunContext | None, pool: Executor, changes: Changes,
                              warnings: list[str], stats_of: Callable[[int, str], RowStats]) -> VocabChanges:
    """:func:`vocab_changes` with each vocabulary tensor's statistics and rows computed on ``pool`` (submitted in
    the order the writer reaches the tensors: shard order, then offset) behind a :class:`DeferredRows`."""
    shard_rank = {shard: i for i, shard in enumerate(ckpt.shards)}
    order = sorted(arch.vocab_tensors, key=lambda k: (shard_rank[ckpt.weight_map[k]], ckpt.info(k).begin))
    index = {k: n for n, k in enumerate(arch.vocab_tensors)}

    failed_stats: set[str] = set()  # keys whose statistics (not their rows) raised

    def job(key: str) -> tuple[RowStats, RowPatchedTensor]:
        try:
            stats = stats_of(index[key], key)
        except BaseException:
            failed_stats.add(key)
            raise
        return stats, _patched(ckpt, key, stats, plan, spec, device, ctx)

    futures = {k: pool.submit(job, k) for k in order}

    def result(key: str) -> tuple[RowStats, RowPatchedTensor]:
        """``key``'s job; when it failed, the error the statistics computed first would raise: the first tensor
        (arch order) whose statistics failed, else the first whose rows failed (waits for every job)."""
        try:
            return futures[key].result()
        except BaseException:
            errors = {k: futures[k].exception() for k in arch.vocab_tensors}
            failed = [k for k in arch.vocab_tensors if errors[k] is not None]
            raise errors[next((k for k in failed if k in failed_stats), failed[0])] from None

    changed: list[ChangedTensor] = []
    for key in arch.vocab_tensors:
        info = ckpt.info(key)
        ready = min([r.id for r in plan.rows if r.id < info.shape[0]], default=info.shape[0])
        src = DeferredRows(info, ckpt.path_of(key), (max(plan.rows_after, info.shape[0]), *info.shape[1:]), ready,
                           lambda k=key: result(k)[1])
        changes.replace[key] = src
        changed.append(ChangedTensor(name=key, shape_before=list(info.shape), shape=list(src.shape)))

    derived = _vocab_changes_rest(spec, ckpt, arch, plan, changes, changed, [])
    before, notes = list(warnings), derived.warnings

    def pending() -> tuple[VocabPlan, list[str]]:  # the warnings in the order vocab_changes gives them
        found, more = _untrained(spec, plan, {k: result(k)[0] for k in futures}, tok, arch)
        return found, before + more + notes

    return dataclasses.replace(derived, warnings=before + notes, pending=pending)


def _untie(replaced: dict[str, TensorSource], ckpt: Checkpoint,
           arch: Architecture) -> tuple[Changes, list[ChangedTensor], list[str]]:
    """The output head written as its own tensor: a copy of the input embedding (``replaced``'s, when it grew), as
    (changes, changed tensors, warnings)."""
    if not arch.tied:
        return Changes(), [], ["untie: the output head is already untied; nothing to do"]
    if arch.head_param is None:
        raise InvalidSpec("untie: this model has no output head to untie", field="untie", fix="Send untie: false.")
    embed = replaced.get(arch.input_embedding) or RowPatchedTensor(ckpt.info(arch.input_embedding),
                                                                 ckpt.path_of(arch.input_embedding))
    head = arch.head_layout_key or arch.head_param  # in the input's layout (LLaVA: language_model.lm_head.weight)
    add: dict[str, tuple[TensorSource, str]] = {head: (embed, arch.input_embedding)}
    bias = _untied_head_bias(head, ckpt, arch)
    if bias is not None and arch.output_bias is not None:  # MLM heads: the decoder's bias was tied to the head's
        add[bias] = (replaced.get(arch.output_bias) or RowPatchedTensor(ckpt.info(arch.output_bias),
                                                                         ckpt.path_of(arch.output_bias)),
                     arch.output_bias)
    return (Changes(add=add), [ChangedTensor(name=k, shape_before=None, shape=list(src.shape))
                               for k, (src, _) in add.items()], [])


def _untied_head_bias(head: str, ckpt: Checkpoint, arch: Architecture) -> str | None:
    """The untied head's own bias key, for an MLM head whose decoder bias ``transformers`` ties to the head's
    ``output_bias`` (BERT: ``cls.predictions.decoder.bias`` = ``cls.predictions.bias``). With the embeddings untied
    (``tie_word_embeddings`` false) ``transformers`` no longer ties it, so it must be stored: a copy of the output
    bias (grown with it), else loading initializes it fresh and every logit moves."""
    if arch.output_bias is None or not head.endswith(".weight"):
        return None
    key = head.removesuffix(".weight") + ".bias"
    return None if key == arch.output_bias or key in ckpt else key


def zero_padded(ckpt: Checkpoint, key: str, rows_after: int) -> NewTensor:
    """``key`` (shape ``(1, ..., V)``: vocabulary along the last dimension, e.g. BART's ``final_logits_bias``)
    padded with zeros to ``(1, ..., rows_after)`` in its own dtype; existing entries unchanged.

    As ``transformers`` does in ``resize_token_embeddings``: ``BartForConditionalGeneration._resize_final_logits_bias``
    concatenates ``torch.zeros((1, new_num_tokens - old_num_tokens))`` along dim 1. The tensor holds one value per
    row (a few MB at most), so it is read whole.
    """
    old = ckpt.read(key)
    extra = torch.zeros(*old.shape[:-1], rows_after - old.shape[-1], dtype=old.dtype)
    return NewTensor(torch.cat([old, extra], dim=-1))


def _trained_mask(ckpt: Checkpoint, key: str, plan: VocabPlan) -> Callable[[int, int], torch.Tensor]:
    """``trained(first, count)``: which of rows ``first:first+count`` of ``key`` have a tokenizer entry."""
    rows = ckpt.info(key).shape[0]
    entry = plan.has_entry

    def trained(first: int, count: int) -> torch.Tensor:
        mask = torch.zeros(count, dtype=torch.bool)
        hi = min(first + count, entry.numel(), rows)
        if hi > first:
            mask[: hi - first] = entry[first:hi]
        return mask

    return trained


def _stats(ckpt: Checkpoint, key: str, plan: VocabPlan, device: torch.device, covariance: bool,
           draws: tuple[int, torch.Generator] | None = None) -> RowStats:
    try:
        return row_stats(ckpt.scan_rows(key), _trained_mask(ckpt, key, plan), device, covariance, draws)
    except ValueError:
        raise InvalidCheckpoint(f"tensor {key!r} has no trained rows (every row with a token is all zero)",
                                field="checkpoint", fix="Use init 'normal' or 'zeros', which need no trained rows.") \
            from None


def _patched(ckpt: Checkpoint, key: str, stats: RowStats, plan: VocabPlan, spec: ExtendVocabSpec,
             device: torch.device, ctx: RunContext | None = None) -> TensorSource:
    info = ckpt.info(key)
    dtype = info.torch_dtype
    row_shape = tuple(info.shape[1:])

    def read_rows(ids: list[int]) -> torch.Tensor:
        return torch.cat([ckpt.read_rows(key, i, i + 1) for i in ids]).to(device).float()

    def trained_rows() -> Iterator[torch.Tensor]:  # the rows row_stats counted, read again block by block
        for _, x, _, keep in trained_blocks(ckpt.scan_rows(key), _trained_mask(ckpt, key, plan), device):
            sel = x if bool(keep.all()) else x[keep]
            yield sel.reshape(sel.shape[0], -1)

    by_strategy: dict[str, list[_Row]] = {}
    for row in plan.rows:
        by_strategy.setdefault(row.strategy, []).append(row)
    init_range = float((ckpt.config or {}).get("initializer_range", 0.02) or 0.02)
    rows_before = info.shape[0]
    overrides: dict[int, torch.Tensor] = {}
    appended = None
    if plan.rows_after > rows_before:  # filled by index below: no per-row tensors for 2^20 new rows
        appended = torch.empty(plan.rows_after - rows_before, *row_shape, dtype=dtype)
    for strategy, group in by_strategy.items():
        if ctx is not None:
            ctx.check_cancelled()
        rctx = RowContext(name=key, stats=stats, row_shape=row_shape, read_rows=read_rows,
                          initializer_range=init_range, seed=spec.seed, device=device,
                          source_ids=[r.sources for r in group], trained_rows=trained_rows)
        out = ROW_INITS[strategy](rctx, len(group)).to(dtype).cpu()
        ids = torch.tensor([r.id for r in group], dtype=torch.long)
        new = ids >= rows_before
        if appended is not None and bool(new.any()):
            appended[ids[new] - rows_before] = out[new]
        for j in torch.nonzero(~new).flatten().tolist():
            overrides[int(ids[j])] = out[j].clone()
        del out
    return RowPatchedTensor(info, ckpt.path_of(key), overrides, appended)


def _check_chat_template(spec: ExtendVocabSpec, tok, plan: VocabPlan) -> tuple[str | None, list[str]]:
    """The sample conversation rendered with ``spec.chat_template`` by the grown tokenizer (its special tokens
    passed to the template), and a warning when special tokens were added and the sample uses none of them."""
    if spec.chat_template is None:
        return None, []
    if tok is None:
        raise InvalidSpec("chat_template is saved with the tokenizer, and this checkpoint has none",
                          field="chat_template", fix="Include the tokenizer files, or leave chat_template out.")
    sample = render_sample(tok, spec.chat_template)
    added = {a.token for a in plan.added}
    special = [t.content for t in spec.tokens if isinstance(t, TokenSpec) and t.special and t.content in added]
    if special and not any(t in sample for t in special):
        return sample, [f"chat_template: the sample conversation it renders uses none of the special tokens added "
                        f"({', '.join(special[:5])})"]
    return sample, []


def _refuse_unreadable_config(ckpt: Checkpoint) -> None:
    """A model directory whose config.json cannot be read as a JSON object: the output's ``vocab_size`` could not
    be made to equal its rows (the file would be copied as it is), so the request is refused before any work."""
    if ckpt.config is None and not ckpt.is_file and (ckpt.root / "config.json").exists():
        raise InvalidCheckpoint(f"{ckpt.config_problem}: the output's config.json could not record the new "
                                "vocabulary size", field="checkpoint",
                                fix="Repair config.json (save it again with save_pretrained), or remove it: without "
                                    "one, roles come from the tensor names.")


# -- side files -----------------------------------------------------------------------------------------------
def _write_side_files(ckpt: Checkpoint, out: Path, arch: Architecture, plan: VocabPlan, spec: ExtendVocabSpec,
                      tok) -> None:
    for path in ckpt.other_files():  # small files, copied (never linked) since some are rewritten below
        shutil.copyfile(path, out / path.name)
    if ckpt.config is not None:
        config = json.loads(json.dumps(ckpt.config))
        if arch.source == "config":
            target = config[arch.text_config_key] if arch.text_config_key else config
            target["vocab_size"] = plan.rows_after
        else:  # roles from the headers (transformers cannot build this config): every vocab_size it declares
            text, _ = text_config(config)
            holders = [h for h in {id(text): text, id(config): config}.values() if "vocab_size" in h]
            for holder in holders or [config]:
                holder["vocab_size"] = plan.rows_after
        if spec.untie and arch.tied:
            config["tie_word_embeddings"] = False
            if arch.text_config_key and "tie_word_embeddings" in target:
                target["tie_word_embeddings"] = False
        if config != ckpt.config:
            (out / "config.json").unlink(missing_ok=True)
            (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tok is not None and (plan.added or spec.chat_template is not None):
        tok.save_pretrained(str(out))  # with spec.chat_template, which plan_vocab set (saved as chat_template.jinja)

