"""The preservation report: measured proof that a patch did not disturb the base model.

:func:`preservation_report` loads the base and the patched checkpoint with ``transformers`` in float32 (one
after the other, never both at once), runs both on the same probe inputs and compares them:

- **Probes**: ``num_probes`` sequences of ``probe_length`` token ids drawn uniformly (``torch.Generator`` seeded
  with ``seed``) from the *old* vocabulary: ids below ``min(embedding rows, len(base tokenizer))``, special
  tokens excluded; plus, when ``text`` is given, that text tokenized by the base tokenizer. Every probe runs
  alone (batch of one, attention mask of ones), so no pad token is involved.
- **max |Δ logits|** over the old vocabulary (the base's output rows), when both models have an LM head. It is
  0 for LoRA at a data-free init and for input-side token rows; ``logits_preserved`` allows
  ``LOGIT_TOLERANCE`` relative to the largest base logit (float32 summation order).
- **Added tokens** (the patched LM head has ``n`` more rows than the base's ``V``): per probe position,
  ``KL(p_base || p_patched) = sum_i p_base(i) * (log p_base(i) - log p_patched(i))`` over the old tokens. Hewitt's
  bound ``log(1 + m / V)`` (Hewitt 2021, "Initializing New Word Embeddings for Pretrained Language Models") is a
  theorem only for *mean-initialized* output rows: with a new output row (and bias) equal to the mean of the old
  ones, its logit is the mean old logit, and by Jensen ``exp(mean l) <= Z / V``, so
  ``KL = log(1 + m exp(mean l) / Z) <= log(1 + m / V)``. Other rows (``subword_mean``, ``copy``, random) have no
  such bound. So the report finds which added output rows are the mean (read from the checkpoints: equal, to
  one unit in the last place of the stored dtype, to the float32 mean of the base's trained output rows, those
  with a tokenizer entry and not all zero, cast to that dtype, as extend-vocab's ``mean`` init writes them), lists
  them, and checks the bound over those ``m`` rows only (``V``: the rows the mean is over); the KL with every
  added row is reported without a pass/fail.
- **Derivation**: the patched checkpoint must be derived from the base (same ``model_type``, hidden size, layer
  count, tensor shapes but for vocabulary growth; the base tokenizer's ids unchanged; at least the base's
  vocabulary). ``POST /verify`` answers 422 (``field: patched``) otherwise; the report of another operation is
  skipped with that reason.
- **New head** (tensors of the patched model that the base checkpoint lacks): each weight's std against the
  formula of its init (:func:`adapter_surgery.initializers.expected_std`: He et al. 2015, Glorot & Bengio 2010,
  PyTorch ``nn.Linear.reset_parameters``, ``transformers`` ``_init_weights``), within
  ``max(2%, 3 / sqrt(2 N))`` (three standard errors of a sample std of ``N`` Gaussian values); biases and
  ``zeros`` must be exactly 0; and the std of the head's initial logits on the probes.
- **Hidden states**: per layer (``hidden_states[0]`` is the embedding output), the RMS over all probe positions
  of the base and of the patched model, their ratio and max |Δ|. A ratio outside
  ``[HIDDEN_RATIO_MIN, HIDDEN_RATIO_MAX]`` means a layer exploding or vanishing relative to the base.

The report never raises: a checkpoint without ``config.json``, a patched checkpoint not derived from the base, a
model that ``transformers`` cannot load, or models that do not fit in memory give ``status: "skipped"`` with the
reason (``POST /verify`` refuses the underived pair with a 422 first). Memory is estimated from the
safetensors headers (float32 copy of the larger model, plus activations:
:func:`adapter_surgery.resources.verify_bytes`) against the memory available to the process
(:func:`adapter_surgery.resources.available_memory`: its cgroup limit, ``MemAvailable``, or
``ADAPTER_SURGERY_MEMORY_LIMIT_BYTES``) or, on CUDA, the free device memory. ``POST /verify`` refuses a report
over it with ``NotEnoughMemory`` (503) before loading anything; ``"verify": true`` on another operation skips it.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator

from adapter_surgery import resources
from adapter_surgery.arch import quiet_transformers
from adapter_surgery.config_check import check_config
from adapter_surgery.devices import DeviceName, pick_device
from adapter_surgery.errors import InvalidSpec, NotEnoughMemory, SurgeryError
from adapter_surgery.initializers import WEIGHT_INITS, expected_std
from adapter_surgery.io import Checkpoint
from adapter_surgery.paths import resolve_under

if TYPE_CHECKING:  # adapter_surgery.ops imports this module: no runtime import back
    from adapter_surgery.ops.common import RunContext

WeightInitName = Literal["kaiming_normal", "kaiming_uniform", "xavier_uniform", "xavier_normal", "normal",
                         "zeros", "scaled_normal"]

#: max |Δ logits| allowed by ``logits_preserved``, relative to ``max(1, max |base logit|)``.
LOGIT_TOLERANCE = 1e-4
#: Slack on Hewitt's bound for float arithmetic.
KL_SLACK = 1e-6
#: Patched/base RMS ratio of every layer's hidden states must stay in this range.
HIDDEN_RATIO_MIN, HIDDEN_RATIO_MAX = 0.5, 2.0
#: Memory estimate: :func:`adapter_surgery.resources.verify_bytes` (1.25 x float32 model + activations + 64 MiB).
SAFETY = 1.25
FIXED_OVERHEAD = 64 * 1024 * 1024

log = logging.getLogger("adapter_surgery")


# -- request and report models -----------------------------------------------------------------------------
class StrictModel(BaseModel):
    """Refuses unknown fields (as ``adapter_surgery.ops.common.StrictModel``, which this module cannot import)."""

    model_config = ConfigDict(extra="forbid")


class VerifyOptions(StrictModel):
    """How to probe (everything but the paths)."""

    num_probes: int = Field(4, ge=1, le=64, description="Random probe sequences drawn from the old vocabulary.")
    probe_length: int = Field(16, ge=2, le=1024, description="Tokens per probe (capped at the model's maximum "
                                                             "positions).")
    seed: int = Field(0, ge=0, le=2**63 - 1,
                      description="Seeds the probe draw; the same seed gives the same probes.")
    text: str | None = Field(None, max_length=20_000, description="An extra probe: this text, tokenized by the "
                                                                  "base tokenizer.")
    head_init: WeightInitName | None = Field(None, description="The init of a new head's weights, to compare their "
                                                               "std with its formula; without it only the std is "
                                                               "reported.")
    memory_limit_bytes: int | None = Field(None, ge=0, description="Skip the report when the estimate exceeds this "
                                                                   "(default: the memory available).")
    device: DeviceName = Field("auto", description="Where the models run: auto (GPU when present), cpu, cuda.")


class VerifyPaths(StrictModel):
    """The two checkpoints, relative to the data directory."""

    checkpoint: str = Field(description="The base checkpoint (model directory), relative to the data directory.")
    patched: str = Field(description="The patched checkpoint (model directory), relative to the data directory.")

    @model_validator(mode="before")
    @classmethod
    def _no_output(cls, data: Any) -> Any:
        if isinstance(data, dict) and "output" in data:
            raise ValueError("verify writes nothing, so it has no output; it compares two checkpoints under the "
                             "data directory (the upload form is not supported): send JSON with checkpoint and "
                             "patched")
        return data


class VerifySpec(VerifyPaths, VerifyOptions):
    """The full ``POST /verify`` request."""


class ProbeSummary(BaseModel):
    sequences: int = Field(description="Probe sequences run (random ones plus the text, if any).")
    length: int = Field(description="Tokens per random probe.")
    seed: int
    text_tokens: int | None = Field(description="Tokens of the text probe; None without text.")
    old_vocab_size: int = Field(description="Ids below this (special tokens excluded) were drawn.")


class AddedTokensCheck(BaseModel):
    added_tokens: int = Field(description="n: ids of the patched tokenizer that the base's lacks (without "
                                          "tokenizers: output rows beyond the base's).")
    old_vocab_size: int = Field(description="V: the old vocabulary (ids below it, those with a tokenizer entry).")
    kl_max: float = Field(description="Largest KL(p_base || p_patched) over probe positions (nats), with every added "
                                      "token; for information (no bound holds for rows that are not the mean).")
    kl_mean: float
    mean_initialized_ids: list[int] = Field(
        description="Added ids whose output row (and bias) is the mean of the base's trained output rows: the rows "
                    "Hewitt's bound is a theorem for, and the only ones it is checked over.")
    mean_over_rows: int | None = Field(description="V of the bound: how many base rows that mean is taken over.")
    bound_kl_max: float | None = Field(description="Largest KL with only the mean-initialized tokens added; None "
                                                   "without such rows.")
    bound: float | None = Field(description="log(1 + m / V), Hewitt (2021), m = len(mean_initialized_ids); None "
                                            "without mean-initialized rows.")
    passed: bool | None = Field(description="bound_kl_max <= bound; None when no added row is mean-initialized "
                                            "(nothing to check).")


class TensorStd(BaseModel):
    name: str
    shape: list[int]
    init: str | None = Field(description="The init its values should follow; None when unknown.")
    std: float
    mean: float
    max_abs: float
    expected_std: float | None
    tolerance: float | None = Field(description="Allowed |std / expected - 1|.")
    passed: bool | None


class HeadCheck(BaseModel):
    tensors: list[TensorStd] = Field(description="Tensors of the patched model that the base checkpoint lacks.")
    logits_std: float | None = Field(description="Std of the patched model's logits on the probes.")
    logits_shape: list[int] | None = Field(description="Per probe: (num_labels,) or (length, num_labels).")
    passed: bool | None


class LayerRMS(BaseModel):
    layer: int = Field(description="Index into hidden_states: 0 is the embedding output.")
    base_layer: int | None = Field(None, description="The base's hidden state compared, when the patched model has "
                                                     "other layers (expand-blocks: the same number of base blocks "
                                                     "passed); None when it is the same index.")
    base: float
    patched: float
    ratio: float
    max_abs_delta: float


class PreservationReport(BaseModel):
    status: Literal["ok", "skipped"]
    reason: str | None = Field(None, description="Why the report was skipped.")
    passed: bool | None = Field(None, description="Every check that applies passed; None when skipped.")
    device: str | None = None
    memory_needed_bytes: int | None = None
    memory_available_bytes: int | None = None
    probes: ProbeSummary | None = None
    max_abs_logit_delta: float | None = Field(None, description="Over the old vocabulary; None when one model has "
                                                                "no LM head.")
    logits_preserved: bool | None = None
    added_tokens: AddedTokensCheck | None = None
    head: HeadCheck | None = None
    hidden_states: list[LayerRMS] = Field(default_factory=list)
    hidden_states_passed: bool | None = None
    warnings: list[str] = Field(default_factory=list)
    seconds: float = 0.0


class VerifyResult(BaseModel):
    checkpoint: str
    patched: str
    report: PreservationReport


# -- the operation -------------------------------------------------------------------------------------------
def verify(spec: VerifySpec, ctx: RunContext) -> VerifyResult:
    """``POST /verify``: the preservation report of ``spec.patched`` against ``spec.checkpoint``.

    Raises:
        NotFound, PathOutsideDataDir: a path does not exist or leaves the data directory.
        InvalidCheckpoint: a checkpoint is malformed (bad header or index).
        InvalidSpec: ``device: cuda`` without a CUDA device; a patched checkpoint that is not derived from the base
            (another architecture, size or vocabulary: :func:`not_derived`).
    Everything else (no config, a model that cannot be loaded, not enough memory) gives a skipped report.
    """
    base = resolve_under(ctx.data_dir, spec.checkpoint, "checkpoint")
    patched = resolve_under(ctx.data_dir, spec.patched, "patched")
    base_ckpt = Checkpoint.open(base)
    try:
        patched_ckpt = Checkpoint.open(patched)
    except SurgeryError as exc:
        exc.field = "patched"
        raise
    pick_device(spec.device)
    check_config(base_ckpt)
    if base_ckpt.config is not None and patched_ckpt.config is not None:
        reason = not_derived(base_ckpt, patched_ckpt, _tokenizer(base_ckpt), _tokenizer(patched_ckpt))
        if reason is not None:
            raise InvalidSpec(f"the patched checkpoint is not derived from this base: {reason}", field="patched",
                              fix="Send as checkpoint the base the patched checkpoint was made from (the checkpoint "
                                  "of its extend-vocab, attach-head or surgery request).")
    check_config(patched_ckpt, "patched.config")
    options = VerifyOptions.model_validate(spec.model_dump(exclude={"checkpoint", "patched"}))
    _require_memory(base_ckpt, patched_ckpt, options, pick_device(spec.device), ctx.memory_limit_bytes)
    report = preservation_report(base, patched, options, progress=ctx.say)
    return VerifyResult(checkpoint=spec.checkpoint, patched=spec.patched, report=report)


def _require_memory(base: Checkpoint, patched: Checkpoint, opts: VerifyOptions, dev: torch.device,
                    limit: int | None = None) -> None:
    """``POST /verify`` refuses (503, before loading anything) a report that cannot fit in the memory available to
    the process; a ``memory_limit_bytes`` of the request below the estimate still gives a skipped report."""
    if base.config is None or patched.config is None:
        return  # the report is skipped without loading anything
    needed, available = _memory(base, patched, opts, dev, limit)
    if needed <= available:
        return
    weights = resources.verify_bytes(max(_float32_bytes(base), _float32_bytes(patched)), 0, 0, 0, 0)
    per_token = max(1, (needed - weights) // max(1, opts.num_probes * opts.probe_length))
    fits = max(0, (available - weights) // per_token)
    if weights > available:
        field, fix = "patched", ("The models alone do not fit: run verify where more memory is available, or give "
                                 "the service more memory (its container limit, ADAPTER_SURGERY_MEMORY_LIMIT_BYTES).")
    else:
        field = "num_probes" if opts.num_probes > 1 else "probe_length"
        fix = (f"Lower num_probes or probe_length: {opts.num_probes} x {opts.probe_length} probe tokens need "
               f"{resources.gib(needed - weights)} GiB of activations; about {fits} tokens fit.")
    raise NotEnoughMemory(
        f"the report needs about {resources.gib(needed)} GiB in float32 (the larger model plus the probes' "
        f"activations) but only {resources.gib(available)} GiB is available on {dev.type} to the service",
        field=field, fix=fix)


# -- the core ------------------------------------------------------------------------------------------------
def preservation_report(base: Path, patched: Path, options: VerifyOptions | None = None, *,
                        head_init: str | None = None, device: DeviceName | None = None,
                        progress: Callable[[str], None] | None = None,
                        layer_map: list[int | None] | None = None) -> PreservationReport:
    """Compare ``patched`` with ``base`` on probe inputs (see the module docstring); never raises.

    Args:
        base, patched: model directories (``config.json`` + safetensors).
        options: probe settings; ``head_init`` / ``device`` override the ones in ``options`` when given.
        layer_map: for a patched model with inserted layers (expand-blocks), the base hidden-state index each
            patched hidden state is compared with (its length is the patched layer count + 1; ``None``: none).
    Returns:
        A report with ``status: "ok"``, or ``"skipped"`` and the reason.
    """
    started = time.perf_counter()
    opts = options or VerifyOptions()
    updates = {k: v for k, v in (("head_init", head_init), ("device", device)) if v is not None}
    if updates:
        opts = opts.model_copy(update=updates)
    try:
        report = _report(base, patched, opts, progress or (lambda _m: None), layer_map)
    except _Skip as skip:
        report = PreservationReport(status="skipped", reason=str(skip), **skip.extra)
    except Exception as exc:  # the report must never make a request fail
        log.warning("preservation report failed", exc_info=True)
        report = PreservationReport(status="skipped", reason=f"the report could not be computed "
                                                             f"({type(exc).__name__}: {exc})")
    report.reason = _scrub(report.reason, base, patched)
    report.warnings = [_scrub(w, base, patched) or w for w in report.warnings]
    report.seconds = round(time.perf_counter() - started, 4)
    return report


def _scrub(text: str | None, *paths: Path) -> str | None:
    """``text`` with the directories above ``paths`` removed (``/tmp/adapter-surgery-x1/output/config.json`` ->
    ``output/config.json``): messages quoted from ``transformers`` must not reveal server (or upload) paths."""
    if not text:
        return text
    for path in paths:
        for form in {str(path), str(path.resolve())}:
            parent = str(Path(form).parent)
            if parent not in ("", "/", "."):
                text = text.replace(parent + os.sep, "")
    return text


class _Skip(Exception):
    def __init__(self, reason: str, **extra: Any) -> None:
        super().__init__(reason)
        self.extra = extra


@dataclass
class _Run:
    """What one model produced on the probes (float32, CPU)."""

    kind: Literal["lm", "classifier", "backbone"]
    logits: list[torch.Tensor | None]
    hidden: list[list[torch.Tensor]]  # per probe: per layer (length, hidden)
    state_names: list[str]
    prefix: str
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    initializer_range: float = 0.02
    num_layers: int = 1
    load_problems: list[str] = field(default_factory=list)


def _report(base: Path, patched: Path, opts: VerifyOptions, say: Callable[[str], None],
            layer_map: list[int | None] | None = None) -> PreservationReport:
    ckpts = {}
    for role, path in (("base", base), ("patched", patched)):
        try:
            ckpts[role] = Checkpoint.open(path)
        except SurgeryError as exc:
            raise _Skip(f"the {role} checkpoint cannot be opened: {exc.detail}") from None
        try:
            check_config(ckpts[role])
        except SurgeryError as exc:
            raise _Skip(f"the {role} checkpoint's config.json contradicts its weights: {exc.detail}") from None
        if ckpts[role].config is None:
            raise _Skip(f"the {role} checkpoint has no usable config.json ({ckpts[role].config_problem}), so it "
                        "cannot be run")
    tok = _tokenizer(ckpts["base"])
    tok_p = _tokenizer(ckpts["patched"])
    reason = not_derived(ckpts["base"], ckpts["patched"], tok, tok_p,
                         patched_layers=None if layer_map is None else len(layer_map) - 1)
    if reason is not None:
        raise _Skip(f"the patched checkpoint is not derived from this base: {reason}")
    try:
        dev = pick_device(opts.device)
    except SurgeryError as exc:
        raise _Skip(exc.detail) from None
    needed, available = _memory(ckpts["base"], ckpts["patched"], opts, dev)
    limit = available if opts.memory_limit_bytes is None else min(available, opts.memory_limit_bytes)
    mem = {"memory_needed_bytes": needed, "memory_available_bytes": limit, "device": str(dev)}
    if needed > limit:
        raise _Skip(f"the models need about {needed / 2**30:.2f} GiB in float32 (the larger one plus activations) "
                    f"but only {limit / 2**30:.2f} GiB {'is' if limit == available else 'was allowed'} available "
                    f"on {dev.type}", **mem)
    probes, summary = _probes(ckpts["base"], tok, opts)
    say("verify: run base")
    b = _run(base, probes, dev, keep=lambda _name, _prefix: False)
    base_keys = set(ckpts["base"].weight_map)
    heads = [a for a in (ckpts["patched"].config or {}).get("architectures") or [] if isinstance(a, str)]
    classifier = any(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in heads)
    say("verify: run patched")
    p = _run(patched, probes, dev, keep=lambda name, prefix: classifier and _strip(name, prefix) not in base_keys
             and name not in base_keys and f"{prefix}.{name}" not in base_keys)
    report = PreservationReport(status="ok", probes=summary, **mem)
    report.warnings += [f"patched: {m}" for m in p.load_problems] + [f"base: {m}" for m in b.load_problems]
    new_ids = _new_token_ids(tok, tok_p, summary.old_vocab_size)
    _compare_logits(report, b, p, summary.old_vocab_size, new_ids,
                    mean_rows=lambda old, added: _mean_initialized(ckpts["base"], ckpts["patched"], tok, old, added))
    report.head = _head_check(p, opts.head_init)
    _compare_hidden(report, b, p, layer_map)
    checks = [report.logits_preserved, report.hidden_states_passed,
              None if report.added_tokens is None else report.added_tokens.passed,
              None if report.head is None else report.head.passed]
    known = [c for c in checks if c is not None]
    report.passed = all(known) if known else None
    return report


# -- memory --------------------------------------------------------------------------------------------------
def available_memory(device: torch.device, limit: int | None = None) -> int:
    """Bytes available for new allocations: free CUDA memory, else what the process may still allocate
    (:func:`adapter_surgery.resources.available_memory`: the cgroup limit, ``MemAvailable``, or the setting)."""
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return resources.available_memory(limit)


def _float32_bytes(ckpt: Checkpoint) -> int:
    return sum(4 * math.prod(shape) for shape in ckpt.shapes().values())


def _memory(base: Checkpoint, patched: Checkpoint, opts: VerifyOptions, dev: torch.device,
            limit: int | None = None) -> tuple[int, int]:
    cfg = patched.config or {}
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    hidden = int(text.get("hidden_size") or text.get("n_embd") or 1024)  # type: ignore[union-attr]
    layers = int(text.get("num_hidden_layers") or text.get("n_layer") or 1)  # type: ignore[union-attr]
    vocab = int(text.get("vocab_size") or 0)  # type: ignore[union-attr]
    tokens = opts.num_probes * opts.probe_length + (4 * len(opts.text) if opts.text else 0)
    needed = resources.verify_bytes(max(_float32_bytes(base), _float32_bytes(patched)), tokens, hidden, layers, vocab)
    available = available_memory(dev, limit)
    if dev.type != "cpu":  # the weights pass through host memory on the way to the device
        available = min(available, available_memory(torch.device("cpu"), limit))
    return needed, available


# -- probes --------------------------------------------------------------------------------------------------
def _tokenizer(ckpt: Checkpoint):  # -> PreTrainedTokenizerBase | None
    if not ckpt.has_tokenizer:
        return None
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(ckpt.directory), local_files_only=True)
    except Exception:  # a tokenizer that cannot load only costs the text probe and the special-token filter
        return None


def _max_positions(cfg: dict[str, Any]) -> int | None:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        if isinstance(text.get(key), int) and text[key] > 0:
            return int(text[key])
    return None


def _old_vocab(ckpt: Checkpoint, tok) -> int:
    from adapter_surgery.arch import resolve_architecture

    rows = resolve_architecture(ckpt).vocab_rows
    return min(rows, len(tok)) if tok is not None else rows


def probe_inputs(base: Path, options: VerifyOptions | None = None) -> list[torch.Tensor]:
    """The probe token ids (1-D int64 tensors) the report runs for ``base``: random ones, then the text."""
    ckpt = Checkpoint.open(base)
    return _probes(ckpt, _tokenizer(ckpt), options or VerifyOptions())[0]


def _probes(ckpt: Checkpoint, tok, opts: VerifyOptions) -> tuple[list[torch.Tensor], ProbeSummary]:
    vocab = _old_vocab(ckpt, tok)
    special = set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()
    pool = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    if pool.numel() == 0:
        raise _Skip("the base vocabulary has no ordinary token to draw probes from")
    max_pos = _max_positions(ckpt.config or {})
    length = min(opts.probe_length, max_pos) if max_pos else opts.probe_length
    gen = torch.Generator().manual_seed(opts.seed)
    probes = [pool[torch.randint(pool.numel(), (length,), generator=gen)] for _ in range(opts.num_probes)]
    text_tokens = None
    if opts.text and tok is not None:
        ids = tok(opts.text, add_special_tokens=True)["input_ids"][: max_pos or None]
        ids = [i for i in ids if i < vocab]
        if ids:
            probes.append(torch.tensor(ids, dtype=torch.long))
            text_tokens = len(ids)
    summary = ProbeSummary(sequences=len(probes), length=length, seed=opts.seed, text_tokens=text_tokens,
                           old_vocab_size=vocab)
    return probes, summary


# -- running a model -----------------------------------------------------------------------------------------
def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the model directory ``path`` in float32 with the class its config names (``AutoModel`` fallback).

    Returns the model in eval mode on ``device`` and ``transformers``' loading info (missing/unexpected keys).
    """
    import transformers

    with quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        names = [n for n in (getattr(config, "architectures", None) or []) if hasattr(transformers, n)]
        candidates = [getattr(transformers, n) for n in names[:1]] or [transformers.AutoModelForCausalLM,
                                                                        transformers.AutoModel]
        last: Exception | None = None
        for cls in candidates:
            try:
                model, info = cls.from_pretrained(str(path), dtype=torch.float32, local_files_only=True,
                                                  output_loading_info=True)
                return model.to(device).eval(), info
            except ValueError as exc:  # an Auto class without a mapping for this model type
                last = exc
        raise RuntimeError(f"no transformers class could load {path.name}: {last}")


def _kind(model: torch.nn.Module) -> Literal["lm", "classifier", "backbone"]:
    if getattr(model, "get_output_embeddings", lambda: None)() is not None:
        return "lm"
    if type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return "classifier"
    return "backbone"


@torch.no_grad()
def _run(path: Path, probes: list[torch.Tensor], device: torch.device, keep: Callable[[str, str], bool]) -> _Run:
    """Run the model at ``path`` on each probe; keep (float32 copies of) the tensors ``keep(name, prefix)`` picks."""
    try:
        model, info = load_model(path, device)
    except Exception as exc:
        raise _Skip(f"{path.name} could not be loaded with transformers ({type(exc).__name__}: {exc})") from None
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        found = sorted(str(k) for k in (info.get(key) or []))
        if found:
            problems.append(f"{len(found)} {key.replace('_', ' ')} when loading (e.g. {found[0]})")
    kind = _kind(model)
    logits: list[torch.Tensor | None] = []
    hidden: list[list[torch.Tensor]] = []
    for ids in probes:
        ids = ids.to(device)[None]
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        lg = getattr(out, "logits", None)
        logits.append(None if lg is None else lg[0].float().cpu())
        hs = getattr(out, "hidden_states", None) or ()
        hidden.append([h[0].float().cpu() for h in hs])
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    prefix = getattr(model, "base_model_prefix", "") or ""
    state = model.state_dict()
    params = {n: t.detach().float().cpu() for n, t in state.items() if t.is_floating_point() and keep(n, prefix)}
    run = _Run(kind=kind, logits=logits, hidden=hidden, state_names=list(state), prefix=prefix, params=params,
               initializer_range=float(getattr(cfg, "initializer_range", 0.02) or 0.02),
               num_layers=int(getattr(cfg, "num_hidden_layers", 1) or 1), load_problems=problems)
    del model
    return run


# -- comparisons ---------------------------------------------------------------------------------------------
def _new_token_ids(tok_b, tok_p, old_vocab: int) -> list[int] | None:
    """Ids the patched tokenizer has and the base's lacks; ``None`` (use the appended rows) without tokenizers."""
    if tok_b is None or tok_p is None:
        return None
    base_ids = set(tok_b.get_vocab().values()) | set(range(old_vocab))
    return sorted(i for i in tok_p.get_vocab().values() if i not in base_ids)


def _compare_logits(report: PreservationReport, b: _Run, p: _Run, old_vocab: int, new_ids: list[int] | None,
                    mean_rows: Callable[[int, list[int]], tuple[list[int], int | None]] | None = None) -> None:
    """max |Δ logits| over the old vocabulary; with new tokens, KL(base || patched), and over the mean-initialized
    ones (``mean_rows(old, added)``: those ids and the rows their mean is over) against Hewitt's bound.

    The next-token distributions are over tokens: the base's over its old vocabulary (ids below ``old_vocab``),
    the patched model's over the old vocabulary and the new ids. Rows without a token (spare rows of a padded
    vocabulary, ``pad_to_multiple_of`` rows) are left out of both, as serving masks them; without tokenizers every
    row counts and the new ids are the appended rows.
    """
    if b.kind == p.kind == "classifier" and all(
            x is not None and y is not None and x.shape == y.shape for x, y in zip(b.logits, p.logits, strict=True)):
        report.max_abs_logit_delta = max(float((x - y).abs().max())  # type: ignore[operator]
                                         for x, y in zip(b.logits, p.logits, strict=True))
        scale = max(1.0, *(float(x.abs().max()) for x in b.logits))  # type: ignore[union-attr]
        report.logits_preserved = report.max_abs_logit_delta <= LOGIT_TOLERANCE * scale
        return
    if b.kind != "lm" or p.kind != "lm":
        report.warnings.append(f"max |Δ logits| not computed: the base is {_KINDS[b.kind]} and the patched model "
                               f"{_KINDS[p.kind]}, so they share no output; the hidden states are compared instead")
        return
    base_rows = b.logits[0].shape[-1]  # type: ignore[union-attr]
    new_rows = p.logits[0].shape[-1]  # type: ignore[union-attr]
    old = min(old_vocab, base_rows, new_rows)
    if new_rows < base_rows:
        report.warnings.append(f"the patched model has fewer output rows ({new_rows}) than the base ({base_rows})")
    added = list(range(base_rows, new_rows)) if new_ids is None else [i for i in new_ids if old <= i < new_rows]
    mean_ids: list[int] = []
    mean_over: int | None = None
    if added and mean_rows is not None:
        try:
            mean_ids, mean_over = mean_rows(old, added)
        except Exception as exc:  # the rows could not be read: report the KL without claiming the bound
            report.warnings.append(f"which added rows are mean-initialized could not be determined "
                                   f"({type(exc).__name__}: {exc}); Hewitt's bound is not checked")
    delta, scale = 0.0, 1.0
    kls: list[torch.Tensor] = []
    bound_kls: list[torch.Tensor] = []

    def kl_with(lb: torch.Tensor, lp: torch.Tensor, extra: list[int]) -> torch.Tensor:
        logp_b = torch.log_softmax(lb[..., :old].double(), dim=-1)
        support = torch.cat([lp[..., :old], lp[..., extra]], dim=-1).double()
        logp_p = torch.log_softmax(support, dim=-1)[..., :old]
        return (logp_b.exp() * (logp_b - logp_p)).sum(dim=-1).reshape(-1)

    for lb, lp in zip(b.logits, p.logits, strict=True):
        assert lb is not None and lp is not None
        delta = max(delta, float((lb[..., :old] - lp[..., :old]).abs().max()))
        scale = max(scale, float(lb[..., :old].abs().max()))
        if added:
            kls.append(kl_with(lb, lp, added))
            if mean_ids:
                bound_kls.append(kls[-1] if mean_ids == added else kl_with(lb, lp, mean_ids))
    report.max_abs_logit_delta = delta
    report.logits_preserved = delta <= LOGIT_TOLERANCE * scale
    if kls:
        kl = torch.cat(kls)
        bound = bound_kl = passed = None
        if bound_kls and mean_over:
            bound = math.log1p(len(mean_ids) / mean_over)
            bound_kl = float(torch.cat(bound_kls).max())
            passed = bound_kl <= bound + KL_SLACK
        others = len(added) - len(mean_ids)
        if others:
            report.warnings.append(
                f"{others} of the {len(added)} added token(s) have output rows that are not the mean of the old "
                "rows (e.g. subword_mean, copy or random rows): Hewitt's bound does not apply to them, so their KL "
                "is reported without a pass/fail" + ("" if mean_ids else "; no row is checked against the bound"))
        report.added_tokens = AddedTokensCheck(added_tokens=len(added), old_vocab_size=old, kl_max=float(kl.max()),
                                               kl_mean=float(kl.mean()), mean_initialized_ids=mean_ids,
                                               mean_over_rows=mean_over if mean_ids else None, bound_kl_max=bound_kl,
                                               bound=bound, passed=passed)


def _mean_initialized(base: Checkpoint, patched: Checkpoint, tok_b, old: int,
                      added: list[int]) -> tuple[list[int], int | None]:
    """The ``added`` ids whose output row (and output bias) is the mean of the base's trained output rows, and how
    many rows that mean is over.

    The mean is extend-vocab's: float32, over the base rows below ``old`` that have a base-tokenizer entry and are
    not all zero (:func:`adapter_surgery.initializers.row_stats`), cast to the patched tensor's dtype; a row
    matches when every value is within one unit in the last place of it (a mean summed in another order, e.g. on
    a GPU, may differ there). A tied head's rows are the input embedding's.
    """
    from adapter_surgery.arch import resolve_architecture
    from adapter_surgery.initializers import row_stats

    arch_b, arch_p = resolve_architecture(base), resolve_architecture(patched)

    def head(arch) -> str | None:
        return arch.output_head or (arch.input_embedding if arch.tied else None)

    pairs = [(head(arch_b), head(arch_p)), (arch_b.output_bias, arch_p.output_bias)]
    if pairs[0][0] is None or pairs[0][1] is None or (pairs[1][0] is None) != (pairs[1][1] is None):
        return [], None
    entry = torch.zeros(old, dtype=torch.bool)
    if tok_b is None:
        entry[:] = True
    else:
        ids = [i for i in tok_b.get_vocab().values() if i < old]
        entry[torch.tensor(ids, dtype=torch.long)] = True

    def trained(first: int, count: int) -> torch.Tensor:
        mask = torch.zeros(count, dtype=torch.bool)
        hi = min(first + count, old)
        if hi > first:
            mask[: hi - first] = entry[first:hi]
        return mask

    keep = set(added)
    over: int | None = None
    zero_rows: list[int] | None = None
    for kb, kp in pairs:
        if kb is None or kp is None:
            continue
        try:
            stats = row_stats(base.iter_rows(kb), trained, torch.device("cpu"), covariance=False)
        except ValueError:  # no trained row
            return [], None
        if zero_rows is not None and stats.zero_rows != zero_rows:  # weight and bias averaged over other rows
            return [], None
        zero_rows = stats.zero_rows
        over = stats.count if over is None else over
        dtype = patched.info(kp).torch_dtype or torch.float32
        mean = stats.mean.to(dtype).float()
        tol = torch.finfo(dtype).eps * mean.abs() + torch.finfo(dtype).tiny
        rows = patched.info(kp).shape[0]
        for i in sorted(keep):
            if i >= rows or not bool(((patched.read_rows(kp, i, i + 1)[0].float() - mean).abs() <= tol).all()):
                keep.discard(i)
    return [i for i in added if i in keep], over


def not_derived(base: Checkpoint, patched: Checkpoint, tok_b, tok_p, patched_layers: int | None = None) -> str | None:
    """Why ``patched`` cannot have been made from ``base`` by this service, or ``None``.

    Derived checkpoints keep the model type, hidden size and layer count, every tensor's shape but for a grown
    vocabulary (dimension 0), the base tokenizer's ids, and at least the base's vocabulary rows. Anything else
    (e.g. SmolLM2 against MiniLM) cannot be compared probe by probe. ``patched_layers``: the layer count the
    patched checkpoint must have instead of the base's (expand-blocks).
    """
    cb, cp = base.config or {}, patched.config or {}

    def text(cfg: dict[str, Any]) -> dict[str, Any]:
        sub = next((cfg[k] for k in ("text_config", "llm_config", "language_config") if isinstance(cfg.get(k), dict)),
                   None)
        return sub if sub is not None else cfg

    def first(cfg: dict[str, Any], keys: tuple[str, ...]) -> Any:
        return next((cfg[k] for k in keys if cfg.get(k) is not None), None)

    for what, keys in (("model_type", ("model_type",)), ("hidden size", ("hidden_size", "n_embd", "d_model")),
                       ("layer count", ("num_hidden_layers", "n_layer", "num_layers"))):
        vb, vp = first(text(cb), keys), first(text(cp), keys)
        if vb is None:
            vb, vp = first(cb, keys), first(cp, keys)
        if what == "layer count" and patched_layers is not None and vp is not None:
            if vp != patched_layers:
                return f"the patched checkpoint has {what} {vp!r}, not the {patched_layers} expected"
            continue
        if vb is not None and vp is not None and vb != vp:
            return f"the base has {what} {vb!r}, the patched checkpoint {vp!r}"
    shapes_b = base.shapes()
    for key, shape in patched.shapes().items():
        src = next((c for c in (key, key.split(".", 1)[-1]) if c in shapes_b), None)
        if src is None:
            continue
        sb = shapes_b[src]
        if shape != sb and not (len(shape) == len(sb) and shape[1:] == sb[1:] and shape[0] >= sb[0]):
            return f"tensor {key!r} has shape {list(shape)} in the patched checkpoint but {list(sb)} in the base"
    if tok_b is not None and tok_p is not None:
        vb, vp = tok_b.get_vocab(), tok_p.get_vocab()
        moved = [(t, i, vp.get(t)) for t, i in vb.items() if vp.get(t) != i]
        if len(moved) > max(1, len(vb) // 100):
            t, i, j = moved[0]
            return (f"{len(moved)} of the base tokenizer's {len(vb)} tokens have another id (or none) in the "
                    f"patched tokenizer, e.g. {t!r}: {i} in the base, {j} in the patched one")
    try:
        from adapter_surgery.arch import resolve_architecture

        rows_b, rows_p = resolve_architecture(base).vocab_rows, resolve_architecture(patched).vocab_rows
    except SurgeryError:
        return None
    if rows_p < min(rows_b, len(tok_b) if tok_b is not None else rows_b):
        return f"the patched input embedding has {rows_p} rows, fewer than the base's {rows_b}"
    return None


_KINDS = {"lm": "a language model", "classifier": "a classifier", "backbone": "a bare backbone (no head)"}


def _strip(name: str, prefix: str) -> str:
    return name[len(prefix) + 1:] if prefix and name.startswith(prefix + ".") else name


def _head_check(p: _Run, head_init: str | None) -> HeadCheck | None:
    """Std of every tensor of the patched model absent from the base checkpoint, against its init's formula."""
    new = [n for n in p.state_names if n in p.params]
    if p.kind != "classifier" or not new:
        return None
    tensors = []
    for name in new:
        t = p.params[name]
        in_base_model = bool(p.prefix) and name.startswith(p.prefix + ".")
        init: str | None
        if name.endswith("bias") or t.dim() < 2:
            init = "zeros" if name.endswith("bias") else None
        else:
            init = "normal" if in_base_model else head_init  # transformers' _init_weights vs the request
        std = float(t.std()) if t.numel() > 1 else 0.0
        expected = tolerance = None
        passed: bool | None = None
        if init == "zeros":
            expected, tolerance, passed = 0.0, 0.0, bool(t.abs().max() == 0)
        elif init in WEIGHT_INITS and t.dim() >= 2:
            fan_out, fan_in = t.shape[0], t[0].numel()
            expected = expected_std(init, fan_in, fan_out, p.initializer_range, p.num_layers)
            tolerance = max(0.02, 3.0 / math.sqrt(2.0 * t.numel()))
            passed = abs(std / expected - 1.0) <= tolerance if expected > 0 else std == 0.0
        tensors.append(TensorStd(name=name, shape=list(t.shape), init=init, std=std, mean=float(t.mean()),
                                 max_abs=float(t.abs().max()), expected_std=expected, tolerance=tolerance,
                                 passed=passed))
    logits = [lg for lg in p.logits if lg is not None]
    logits_std = float(torch.cat([lg.reshape(-1) for lg in logits]).std()) if logits else None
    verdicts = [t.passed for t in tensors if t.passed is not None]
    return HeadCheck(tensors=tensors, logits_std=logits_std, logits_shape=list(logits[0].shape) if logits else None,
                     passed=all(verdicts) if verdicts else None)


def _rms(xs: list[torch.Tensor]) -> float:
    flat = torch.cat([x.reshape(-1) for x in xs]).double()
    return float(flat.pow(2).mean().sqrt())


def _compare_hidden(report: PreservationReport, b: _Run, p: _Run, layer_map: list[int | None] | None = None) -> None:
    nb, np_ = len(b.hidden[0]), len(p.hidden[0])
    if not nb or not np_:
        report.warnings.append("hidden states not compared: a model returned none")
        return
    if layer_map is not None and len(layer_map) == np_ and all(j is None or j < nb for j in layer_map):
        _compare_mapped(report, b, p, layer_map)
        return
    if nb != np_:
        report.warnings.append(f"the models have different depths ({nb - 1} vs {np_ - 1} layers); the first "
                               f"{min(nb, np_)} hidden states are compared")
    layers = []
    for i in range(min(nb, np_)):
        hb = [h[i] for h in b.hidden]
        hp = [h[i] for h in p.hidden]
        rb, rp = _rms(hb), _rms(hp)
        delta = max(float((x - y).abs().max()) for x, y in zip(hb, hp, strict=True))
        ratio = rp / rb if rb > 0 else (1.0 if rp == 0 else math.inf)
        layers.append(LayerRMS(layer=i, base=rb, patched=rp, ratio=ratio, max_abs_delta=delta))
    report.hidden_states = layers
    report.hidden_states_passed = all(HIDDEN_RATIO_MIN <= layer.ratio <= HIDDEN_RATIO_MAX for layer in layers)


def _compare_mapped(report: PreservationReport, b: _Run, p: _Run, layer_map: list[int | None]) -> None:
    """Every patched hidden state against the base's at index ``layer_map[i]`` (inserted layers; ``None``: no
    counterpart, not compared)."""
    layers = []
    for i, j in enumerate(layer_map):
        if j is None:
            continue
        hb = [h[j] for h in b.hidden]
        hp = [h[i] for h in p.hidden]
        rb, rp = _rms(hb), _rms(hp)
        delta = max(float((x - y).abs().max()) for x, y in zip(hb, hp, strict=True))
        ratio = rp / rb if rb > 0 else (1.0 if rp == 0 else math.inf)
        layers.append(LayerRMS(layer=i, base_layer=j, base=rb, patched=rp, ratio=ratio, max_abs_delta=delta))
    report.hidden_states = layers
    report.hidden_states_passed = all(HIDDEN_RATIO_MIN <= layer.ratio <= HIDDEN_RATIO_MAX for layer in layers)
