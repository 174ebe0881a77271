"""The preservation report library: measured proof that a patch did not disturb the base model.

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

Modules: :mod:`.models` (options and report models), :mod:`.probes`, :mod:`.run` (one model on the probes),
:mod:`.checks` (derivation and every comparison), :mod:`.memory` (the estimate); the operation ``POST /verify`` is
:mod:`adapter_surgery.ops.verify`.
"""

from __future__ import annotations

import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path

from adapter_surgery import resources
from adapter_surgery.config_check import check_config
from adapter_surgery.devices import pick_device
from adapter_surgery.errors import Cancelled, SurgeryError
from adapter_surgery.io import Checkpoint
from adapter_surgery.report.checks import (
    HIDDEN_RATIO_MAX,
    HIDDEN_RATIO_MIN,
    KL_SLACK,
    LOGIT_TOLERANCE,
    compare_hidden,
    compare_logits,
    head_check,
    mean_initialized,
    new_token_ids,
    not_derived,
    reinitialized_rows,
    strip_prefix,
)
from adapter_surgery.report.memory import available_memory, estimate
from adapter_surgery.report.models import (
    AddedTokensCheck,
    HeadCheck,
    LayerRMS,
    PreservationReport,
    ProbeSummary,
    Skip,
    StepFacts,
    TensorStd,
    VerifyOptions,
    WeightInitName,
)
from adapter_surgery.report.probes import draw_probes, probe_inputs
from adapter_surgery.report.run import load_model, run_model
from adapter_surgery.spec import DeviceName
from adapter_surgery.tokenizer_cache import load_tokenizer

__all__ = ["HIDDEN_RATIO_MAX", "HIDDEN_RATIO_MIN", "KL_SLACK", "LOGIT_TOLERANCE", "AddedTokensCheck", "HeadCheck",
           "LayerRMS", "PreservationReport", "ProbeSummary", "StepFacts", "TensorStd", "VerifyOptions",
           "WeightInitName", "available_memory", "compose_layer_maps", "load_model", "not_derived",
           "preservation_report", "probe_inputs"]

log = logging.getLogger("adapter_surgery")


def preservation_report(base: Path, patched: Path, options: VerifyOptions | None = None, *,
                        head_init: str | None = None, device: DeviceName | None = None,
                        progress: Callable[[str], None] | None = None,
                        layer_map: list[int | None] | None = None,
                        changes_output: str | None = None, check: Callable[[], None] | None = None,
                        patched_name: str | None = None) -> PreservationReport:
    """Compare ``patched`` with ``base`` on probe inputs (see the module docstring); never raises, but for what
    ``check`` raises.

    Args:
        base, patched: model directories (``config.json`` + safetensors).
        options: probe settings; ``head_init`` / ``device`` override the ones in ``options`` when given.
        layer_map: for a patched model with inserted layers (expand-blocks), the base hidden-state index each
            patched hidden state is compared with (its length is the patched layer count + 1; ``None``: none).
        changes_output: why the patched logits differ by design (e.g. scaled_normal blocks): max |Δ logits| is
            reported without a pass/fail, with this reason as a warning.
        check: a run context's ``check_cancelled``, called between the report's steps and before each probe of
            each model; what it raises (``Cancelled``) is raised.
        patched_name: what the report's messages call ``patched`` (default: its own name): an operation verifies
            its temporary output before it publishes it under its final name.
    Returns:
        A report with ``status: "ok"``, or ``"skipped"`` and the reason.
    """
    started = time.perf_counter()
    opts = options or VerifyOptions()
    updates = {k: v for k, v in (("head_init", head_init), ("device", device)) if v is not None}
    if updates:
        opts = opts.model_copy(update=updates)
    try:
        report = _report(base, patched, opts, progress or (lambda _m: None), layer_map, check or (lambda: None))
        if changes_output and report.status == "ok":
            report.logits_preserved = None
            report.warnings.append(f"{changes_output}: max |Δ logits| is reported without a pass/fail")
            report.passed = _verdict(report)
    except Skip as skip:
        report = PreservationReport(status="skipped", reason=str(skip), **skip.extra)
    except Cancelled:
        raise
    except Exception as exc:  # the report must never make a request fail
        log.warning("preservation report failed", exc_info=True)
        report = PreservationReport(status="skipped", reason=f"the report could not be computed "
                                                             f"({type(exc).__name__}: {exc})")
    report.reason = _renamed(_scrub(report.reason, base, patched), patched, patched_name)
    report.warnings = [_renamed(_scrub(w, base, patched) or w, patched, patched_name) or w for w in report.warnings]
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


def _renamed(text: str | None, patched: Path, name: str | None) -> str | None:
    """``text`` with ``patched``'s name replaced by ``name`` (a temporary output's by the output's)."""
    if not text or not name or name == patched.name:
        return text
    return text.replace(patched.name, name)


def _report(base: Path, patched: Path, opts: VerifyOptions, say: Callable[[str], None],
            layer_map: list[int | None] | None, check: Callable[[], None]) -> PreservationReport:
    ckpts = {}
    for role, path in (("base", base), ("patched", patched)):
        try:
            ckpts[role] = Checkpoint.open(path)
        except SurgeryError as exc:
            raise Skip(f"the {role} checkpoint cannot be opened: {exc.detail}") from None
        try:
            check_config(ckpts[role])
        except SurgeryError as exc:
            raise Skip(f"the {role} checkpoint's config.json contradicts its weights: {exc.detail}") from None
        if ckpts[role].config is None:
            raise Skip(f"the {role} checkpoint has no usable config.json ({ckpts[role].config_problem}), so it "
                        "cannot be run")
    tok = load_tokenizer(ckpts["base"], lenient=True)
    tok_p = load_tokenizer(ckpts["patched"], lenient=True)
    reason = not_derived(ckpts["base"], ckpts["patched"], tok, tok_p,
                         patched_layers=None if layer_map is None else len(layer_map) - 1)
    if reason is not None:
        raise Skip(f"the patched checkpoint is not derived from this base: {reason}")
    try:
        dev = pick_device(opts.device)
    except SurgeryError as exc:
        raise Skip(exc.detail) from None
    needed, available = estimate(ckpts["base"], ckpts["patched"], opts, dev)
    limit = available if opts.memory_limit_bytes is None else min(available, opts.memory_limit_bytes)
    mem = {"memory_needed_bytes": needed, "memory_available_bytes": limit, "device": str(dev)}
    if needed > limit:
        raise Skip(f"the models need about {resources.size(needed)} in float32 (the larger one plus activations) "
                    f"but only {resources.size(limit)} {'is' if limit == available else 'was allowed'} available "
                    f"on {dev.type}", **mem)
    probes, summary = draw_probes(ckpts["base"], tok, opts)
    check()
    say("verify: run base")
    b = run_model(base, probes, dev, keep=lambda _name, _prefix: False, check=check)
    base_keys = set(ckpts["base"].weight_map)
    heads = [a for a in (ckpts["patched"].config or {}).get("architectures") or [] if isinstance(a, str)]
    classifier = any(a.endswith(("ForSequenceClassification", "ForTokenClassification")) for a in heads)
    # inserted blocks (layer_map given) are copies of base blocks under new layer numbers, not a new head
    copied = {_any_layer(k) for k in base_keys} if layer_map is not None else set()
    check()
    say("verify: run patched")
    p = run_model(patched, probes, dev, check=check,
                  keep=lambda name, prefix: classifier and strip_prefix(name, prefix) not in base_keys
                  and name not in base_keys and f"{prefix}.{name}" not in base_keys
                  and not {_any_layer(name), _any_layer(f"{prefix}.{name}")} & copied)
    report = PreservationReport(status="ok", probes=summary, **mem)
    report.warnings += [f"patched: {m}" for m in p.load_problems] + [f"base: {m}" for m in b.load_problems]
    new_ids = new_token_ids(tok, tok_p, summary.old_vocab_size)
    existing = sorted(i for i in set(tok.get_vocab().values()) if i >= summary.old_vocab_size) if tok else None
    compare_logits(report, b, p, summary.old_vocab_size, new_ids,
                   mean_rows=lambda old, added: mean_initialized(ckpts["base"], ckpts["patched"], tok, old, added),
                   reinit_rows=lambda old: reinitialized_rows(ckpts["base"], ckpts["patched"], tok, old),
                   existing=existing)
    report.head = head_check(p, opts.head_init)
    compare_hidden(report, b, p, layer_map)
    report.passed = _verdict(report)
    return report


def _any_layer(name: str) -> str:
    """``name`` with its layer numbers replaced (``model.layers.7.mlp`` -> ``model.layers.#.mlp``)."""
    return re.sub(r"\.\d+(?=\.|$)", ".#", name)


def _verdict(report: PreservationReport) -> bool | None:
    """Every check that applies passed; ``None`` when none applies."""
    checks = [report.logits_preserved, report.hidden_states_passed,
              None if report.added_tokens is None else report.added_tokens.passed,
              None if report.head is None else report.head.passed]
    known = [c for c in checks if c is not None]
    return all(known) if known else None


def compose_layer_maps(first: list[int | None] | None,
                       then: tuple[int | None, ...] | list[int | None] | None) -> list[int | None] | None:
    """The hidden-state map of two steps in turn: ``then`` maps its output's hidden states onto its input's,
    ``first`` its input's onto the base's (``None``: the identity)."""
    if then is None:
        return first
    if first is None:
        return list(then)
    return [None if j is None else first[j] for j in then]

