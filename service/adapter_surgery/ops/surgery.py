"""Surgery: several operations as one job with one atomic output (``POST /surgery``).

``{"checkpoint", "output", "steps": [{"op": "extend-vocab", ...}, {"op": "attach-head", ...},
{"op": "attach-lora", ...}]}``. Steps that patch the base (``extend-vocab``, ``attach-head``, ``expand-blocks``) run
in order, each on the previous one's output, in a work directory beside the destination (unchanged shards are
hard-linked from step to step, so the cost still grows with what changes). An ``attach-lora`` step then builds its
adapter on the *final* patched base, wherever it stands in the list: an adapter made on an intermediate base would
not load on the final one (a head added later changes the model class). ``"trainable_token_indices": "added"`` makes
the rows added by the plan's extend-vocab steps trainable.

The output holds the patched base (as saved by its last step) and, with an ``attach-lora`` step, the adapter in
``<output>/adapter/`` whose ``base_model_name_or_path`` names ``<output>``. No intermediate result ever appears at
the destination; a failing step leaves nothing (the work directory is removed, the destination untouched).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import shutil
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union

from pydantic import BaseModel, Field, StrictBool, create_model, field_validator

from adapter_surgery.config_check import check_config
from adapter_surgery.errors import InvalidSpec, SurgeryError
from adapter_surgery.io import describe_files
from adapter_surgery.io.atomic import make_work_dir
from adapter_surgery.io.writer import WrittenFile
from adapter_surgery.ops.attach_lora import Name, TokenIds
from adapter_surgery.ops.common import FileInfo, PathFields, RunContext, StrictModel
from adapter_surgery.ops.runner import begin
from adapter_surgery.report import PreservationReport, VerifyOptions, compose_layer_maps
from adapter_surgery.serving import Runtime

if TYPE_CHECKING:
    from adapter_surgery.ops import Operation

ADAPTER_DIR = "adapter"
#: Steps per plan at most.
MAX_STEPS = 16

Added = Literal["added"]
#: An adapter step's ``trainable_token_indices`` also takes ``"added"``.
ADDED_FIELD: Any = (Added | TokenIds | dict[Name, TokenIds | Added] | None, Field(
    None, description='As in attach-lora, or "added" (per module too): the ids the plan\'s extend-vocab steps '
                      "added."))


def _operations() -> Mapping[str, Operation]:
    from adapter_surgery.ops import OPERATIONS  # the registry imports this module: looked up when a plan runs

    return OPERATIONS


def step_models(operations: Mapping[str, Operation]) -> list[type[BaseModel]]:
    """One step model per operation that can be a step (``Operation.step``): its options plus ``op``, named
    ``<Name>Step`` after its options class; the base steps in registry order, then the adapter steps."""
    steps = [(op, op.step) for op in operations.values() if op.step is not None]
    ordered = [(op, r) for op, r in steps if r.kind == "base"] + [(op, r) for op, r in steps if r.kind == "adapter"]
    models = []
    for op, role in ordered:
        fields: dict[str, Any] = {"op": (Literal[op.name], ...)}  # type: ignore[valid-type]
        if role.kind == "adapter" and "trainable_token_indices" in op.options.model_fields:
            fields["trainable_token_indices"] = ADDED_FIELD
        name = op.options.__name__.removesuffix("Options") + "Step"
        models.append(create_model(name, __base__=op.options, __module__=__name__, **fields))
    return models


class SurgeryOptions(StrictModel):
    steps: list[Step] = Field(min_length=1, max_length=MAX_STEPS,  # noqa: F821 (Step: set by bind_steps)
                              description="Operations in order; attach-lora applies to the final base.")
    verify: StrictBool = Field(False, description="Add the preservation report (base vs final patched base).")
    serving: Runtime | None = Field(None, description="As in attach-lora, for the adapter step (unless it names "
                                                      "its own): an adapter this runtime cannot load is refused.")

    @field_validator("steps")
    @classmethod
    def _check(cls, steps: list[BaseModel]) -> list[BaseModel]:
        ops = _operations()
        roles = {name: op.step for name, op in ops.items() if op.step is not None}
        adapters = [s for s in steps if roles[s.op].kind == "adapter"]  # type: ignore[attr-defined,union-attr]
        if len(adapters) > 1:
            names = " or ".join(n for n, r in roles.items() if r.kind == "adapter")
            raise ValueError(f"at most one {names} step: one plan writes one adapter")
        for name, role in roles.items():
            if role.once is not None and sum(s.op == name for s in steps) > 1:  # type: ignore[attr-defined]
                raise ValueError(f"at most one {name} step: {role.once}")
        grows = any(roles[s.op].adds_tokens for s in steps)  # type: ignore[attr-defined]
        if adapters and _uses_added(getattr(adapters[0], "trainable_token_indices", None)) and not grows:
            names = " or ".join(n for n, r in roles.items() if r.adds_tokens)
            raise ValueError(f'trainable_token_indices "added" needs an {names} step in the plan')
        return steps


class SurgerySpec(PathFields, SurgeryOptions):
    """The full ``POST /surgery`` request."""


def bind_steps(operations: Mapping[str, Operation]) -> None:
    """Complete :class:`SurgeryOptions` and :class:`SurgerySpec` with the union of :func:`step_models` (the
    ``op`` field tells them apart). :mod:`adapter_surgery.ops` calls it once, right after its registry."""
    models = step_models(operations)
    step = Annotated[Union[tuple(models)], Field(discriminator="op")]  # type: ignore[valid-type]  # noqa: UP007
    for model in (SurgeryOptions, SurgerySpec):
        model.model_rebuild(force=True, _types_namespace={"Step": step})


class StepResult(BaseModel):
    op: str
    result: dict[str, Any] = Field(description="The step's own result, as its endpoint returns it.")


class SurgeryResult(BaseModel):
    output: str
    base: str = Field(description="The patched base (the output itself, or the checkpoint if no step patched it).")
    adapter: str | None = Field(description="The adapter directory, with an attach-lora step.")
    steps: list[StepResult]
    report: PreservationReport | None = None
    files: list[FileInfo]
    warnings: list[str]
    seconds: float


def _uses_added(value: object) -> bool:
    return value == "added" or (isinstance(value, dict) and "added" in value.values())


def surgery(spec: SurgerySpec, ctx: RunContext) -> SurgeryResult:
    """Run every step of ``spec`` as one job; write one output atomically (see the module docstring).

    Raises:
        NotFound, PathOutsideDataDir, OutputExists: path problems (checked before any step runs).
        InvalidCheckpoint, InvalidSpec: from the failing step, with ``field`` prefixed by ``steps.<i>``; a
            ``.safetensors`` output.
    """
    run = begin(spec, ctx)
    output = run.output
    if output.suffix == ".safetensors":
        raise InvalidSpec("a surgery output is a directory (the patched base, and the adapter beside it)",
                          field="output", fix="Name the output without the .safetensors suffix.")
    check_config(run.open())  # before any step: config.json against the weights
    root = ctx.data_dir.resolve()
    work = output.parent / f".{output.name}.surgery-{uuid.uuid4().hex[:12]}"
    work_rel = str(work.relative_to(root))
    results: list[StepResult] = []  # base steps in order, then the adapter
    warnings: list[str] = []
    added: list[int] = []
    created = [p for p in [output.parent, *output.parent.parents] if not p.exists()]
    done = False
    try:
        make_work_dir(work, ctx.owner)
        current = spec.checkpoint
        roles = {i: _operations()[s.op].step for i, s in enumerate(spec.steps)}  # type: ignore[attr-defined]
        base_steps = [(i, s) for i, s in enumerate(spec.steps) if roles[i].kind == "base"]  # type: ignore[union-attr]
        lora = next(((i, s) for i, s in enumerate(spec.steps) if roles[i].kind == "adapter"),  # type: ignore[union-attr]
                    None)
        known: dict[str, WrittenFile] = {}  # the files of the patched base, as the base steps described them
        facts = _ReportFacts()
        for i, step in base_steps:
            out_rel = f"{work_rel}/step{i}"
            result = _run_step(i, step, current, out_rel, ctx)
            facts.add(roles[i], step, result)  # type: ignore[arg-type]
            known = _carry_files(known, result.get("files", []))
            added += [a["id"] for a in result.get("added", []) if a.get("id") is not None]
            results.append(StepResult(op=step.op, result={**result, "output": spec.output}))
            warnings += [f"steps.{i}: {w}" for w in result.get("warnings", [])]
            if current != spec.checkpoint:  # the previous intermediate base is no longer needed
                shutil.rmtree(root / current, ignore_errors=True)
            current = out_rel
        patched = current != spec.checkpoint
        if lora is not None:
            i, step = lora
            if spec.serving is not None and getattr(step, "serving", spec.serving) is None:
                step = step.model_copy(update={"serving": spec.serving})
            if "trainable_token_indices" in type(step).model_fields:
                step = step.model_copy(update={"trainable_token_indices": _resolve_added(
                    step.trainable_token_indices, added)})  # type: ignore[attr-defined]
            result = _run_step(i, step, current, f"{work_rel}/{ADAPTER_DIR}", ctx)
            base_name = spec.output if patched else spec.checkpoint
            _rename_base(work / ADAPTER_DIR, f"{work_rel}/{ADAPTER_DIR}", f"{spec.output}/{ADAPTER_DIR}", current,
                         base_name)
            final_cfg = json.loads((work / ADAPTER_DIR / "adapter_config.json").read_text(encoding="utf-8"))
            result = {**result, "output": f"{spec.output}/{ADAPTER_DIR}",
                      "base_model_name_or_path": final_cfg["base_model_name_or_path"]}
            results.append(StepResult(op=step.op, result=result))
            warnings += [f"steps.{i}: {w}" for w in result.get("warnings", [])]
        with run.writing() as tmp:
            if patched:
                os.replace(root / current, tmp)
            else:
                tmp.mkdir()
            if lora is not None:
                os.replace(work / ADAPTER_DIR, tmp / ADAPTER_DIR)
            files = describe_files(tmp, known=known if patched else None)
            report = None
            if spec.verify and patched:  # before the output is published
                report = run.verify(tmp, options=VerifyOptions(), **facts.kwargs())
        done = True
    finally:
        shutil.rmtree(work, ignore_errors=True)
        if not done:  # leave no directory behind that this plan created
            for p in created:
                with contextlib.suppress(OSError):
                    p.rmdir()
    return SurgeryResult(
        output=spec.output, base=spec.output if patched else spec.checkpoint,
        adapter=f"{spec.output}/{ADAPTER_DIR}" if lora is not None else None, steps=results, report=report,
        files=[FileInfo.of(f) for f in files], warnings=warnings, seconds=run.seconds())


@dataclasses.dataclass
class _ReportFacts:
    """What the base steps tell the plan's preservation report, gathered in order (``StepRole.report_facts``)."""

    head_init: str | None = None
    layer_map: list[int | None] | None = None
    changes_output: list[str] = dataclasses.field(default_factory=list)

    def add(self, role: Any, step: BaseModel, result: dict[str, Any]) -> None:
        if role.report_facts is None:
            return
        facts = role.report_facts(step, result)
        self.head_init = facts.head_init or self.head_init
        self.layer_map = compose_layer_maps(self.layer_map, facts.layer_map)
        if facts.changes_output:
            self.changes_output.append(facts.changes_output)

    def kwargs(self) -> dict[str, Any]:
        return {"head_init": self.head_init, "layer_map": self.layer_map,
                "changes_output": "; ".join(self.changes_output) or None}


def _run_step(i: int, step: BaseModel, checkpoint: str, output: str, ctx: RunContext) -> dict[str, Any]:
    """Run one step on ``checkpoint`` into ``output``; errors name the step (``steps.<i>.<field>``)."""
    op = _operations()[step.op]  # type: ignore[attr-defined]
    options = step.model_dump(exclude={"op"}, exclude_unset=True)
    ctx.say(f"step {i}: {step.op}")  # type: ignore[attr-defined]
    try:
        spec = op.spec.model_validate({**options, "checkpoint": checkpoint, "output": output})
        return op.run(spec, ctx).model_dump(mode="json")
    except SurgeryError as exc:
        if exc.field not in ("checkpoint", "output") and not (exc.field or "").startswith("config."):
            exc.field = f"steps.{i}" + (f".{exc.field}" if exc.field else "")
        exc.detail = f"step {i} ({step.op}): {exc.detail}"  # type: ignore[attr-defined]
        raise


def _carry_files(before: dict[str, WrittenFile], files: list[dict[str, Any]]) -> dict[str, WrittenFile]:
    """The files of a step's output as :class:`WrittenFile`, relative to the surgery's input: a file the step
    linked keeps what the step before said of it (linked to the input, or rewritten with its digest)."""
    out = {}
    for f in files:
        prev = before.get(f["path"])
        if f.get("linked") and prev is not None:
            out[f["path"]] = dataclasses.replace(prev, sha256=f["sha256"] or prev.sha256)
        else:
            out[f["path"]] = WrittenFile(f["path"], f["bytes"], f["sha256"], bool(f.get("linked")))
    return out


def _resolve_added(value: object, added: list[int]) -> object:
    if value == "added":
        return list(added)
    if isinstance(value, dict):
        return {k: (list(added) if v == "added" else v) for k, v in value.items()}
    return value


def _rename_base(adapter: Path, old_prefix: str, new_prefix: str, work_base: str, base_name: str) -> None:
    """Point the adapter (and a PiSSA/OLoRA residual base) at their final locations."""
    for cfg_path in [adapter / "adapter_config.json", adapter / "base" / "adapter_config.json"]:
        if not cfg_path.is_file():
            continue
        cfg = json.loads(cfg_path.read_text(encoding="utf-8"))
        name = cfg.get("base_model_name_or_path")
        if name == work_base:
            cfg["base_model_name_or_path"] = base_name
        elif isinstance(name, str) and name.startswith(old_prefix):
            cfg["base_model_name_or_path"] = new_prefix + name[len(old_prefix):]
        cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n", encoding="utf-8")
