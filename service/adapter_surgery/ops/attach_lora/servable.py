"""attach-lora against the serving runtimes of :mod:`adapter_surgery.serving`: refuse what the requested runtime
(``serving``) cannot load, and name in the warnings every other runtime that could not load the adapter.

Two checks: :func:`check_config` on the ``LoraConfig`` and the planned targets, before any tensor is read; then
:func:`check_keys` on the adapter's tensor names, before the output is committed (a backstop: it finds what the
rules did not foresee)."""

from __future__ import annotations

from collections.abc import Iterable

from adapter_surgery import serving
from adapter_surgery.errors import InvalidSpec
from adapter_surgery.ops.attach_lora import peft_bridge as bridge
from adapter_surgery.ops.attach_lora.spec import AttachLoraSpec
from adapter_surgery.ops.attach_lora.targets import Target


def module_ranks(config, targets: Iterable[Target]) -> list[serving.ModuleRank]:
    """Each target's rank and lora_alpha as peft sets them (``rank_pattern``/``alpha_pattern`` applied)."""
    out = []
    for t in targets:
        key = bridge.pattern_key(config.alpha_pattern.keys(), t.name)
        out.append(serving.ModuleRank(t.name, t.r, float(config.alpha_pattern.get(key, config.lora_alpha))))
    return out


def check_config(spec: AttachLoraSpec, config, targets: list[Target]) -> tuple[list[str], set[str]]:
    """Refuse (``InvalidSpec``, the field at fault and the fix) what ``spec.serving`` cannot load; return the
    warnings (what the other runtimes refuse, the requested runtime's notes) and the runtimes found unable to load
    the adapter."""
    facts = config.to_dict()
    ranks = module_ranks(config, targets)
    warnings: list[str] = []
    unable: set[str] = set()
    for runtime in serving.RUNTIMES:
        found = [_explained(p, spec, config) for p in
                 serving.problems(runtime, facts, ranks, max_lora_rank=spec.max_lora_rank)]
        blocking = [p for p in found if p.blocking]
        if runtime == spec.serving and blocking:
            raise refusal(runtime, blocking)
        if blocking:
            unable.add(runtime)
            warnings += [f"{runtime} could not load this adapter: {p.text()}" for p in blocking]
        warnings += [f"{runtime}: {p.text()}" for p in found if not p.blocking]
    return warnings, unable


def check_keys(spec: AttachLoraSpec, keys: Iterable[str], unable: set[str]) -> list[str]:
    """The adapter's tensor names against each runtime's loader (runtimes already found unable are skipped)."""
    keys = list(keys)
    warnings = []
    for runtime in serving.RUNTIMES:
        bad = [] if runtime in unable else serving.unloadable_keys(runtime, keys)
        if not bad:
            continue
        problem = serving.Problem(runtime, "serving", f"{runtime}'s loader does not map {len(bad)} tensor(s) of "
                                  f"this adapter, e.g. {bad[0]}.", "Leave out the option that adds these tensors.")
        if runtime == spec.serving:
            raise refusal(runtime, [problem])
        warnings.append(f"{runtime} could not load this adapter: {problem.text()}")
    return warnings


def refusal(runtime: str, problems: list[serving.Problem]) -> InvalidSpec:
    detail = "; ".join(f"{p.field}: {p.reason}" for p in problems)
    fix = problems[0].fix if len(problems) == 1 else " ".join(f"{p.field}: {p.fix}" for p in problems)
    return InvalidSpec(f"{runtime} cannot load this adapter (serving {runtime!r}): {detail}",
                       field=problems[0].field, fix=fix)


def _explained(p: serving.Problem, spec: AttachLoraSpec, config) -> serving.Problem:
    """A ``modules_to_save`` refusal the request did not cause (peft adds the task head) says so."""
    if p.field != "modules_to_save" or spec.modules_to_save or not p.blocking:
        return p
    task = str(getattr(config.task_type, "value", config.task_type))
    heads = ", ".join(sorted(config.modules_to_save or []))
    return serving.Problem(p.runtime, p.field, serving.TASK_HEAD_REASON.format(task=task, heads=heads),
                           serving.TASK_HEAD_FIX.format(task=task), p.blocking)
