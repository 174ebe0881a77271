"""``POST /verify``: the preservation report of a patched checkpoint against its base (writes nothing).

The request is the two paths plus the report's options (:class:`adapter_surgery.report.VerifyOptions`); the
report itself, and what it measures, is :mod:`adapter_surgery.report`. This module only checks the request
(paths, device, a patched checkpoint derived from the base, memory) and answers a 4xx/503 where the report
would be skipped.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, Field, model_validator

from adapter_surgery import resources
from adapter_surgery.config_check import check_config, check_numbers, declared_layers
from adapter_surgery.devices import pick_device
from adapter_surgery.errors import InvalidSpec, NotEnoughMemory
from adapter_surgery.io import Checkpoint
from adapter_surgery.ops.attach_lora.spec import ADAPTER_CONFIG
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.runner import open_input
from adapter_surgery.report import PreservationReport, VerifyOptions, not_derived, preservation_report
from adapter_surgery.report.memory import estimate, float32_bytes
from adapter_surgery.spec import StrictModel
from adapter_surgery.tokenizer_cache import load_tokenizer

__all__ = ["VerifyOptions", "VerifyPaths", "VerifyResult", "VerifySpec", "verify"]


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
    base, base_ckpt = open_input(ctx, spec.checkpoint, "checkpoint")
    patched, patched_ckpt = open_input(ctx, spec.patched, "patched")
    for field, value, ckpt in (("checkpoint", spec.checkpoint, base_ckpt), ("patched", spec.patched, patched_ckpt)):
        _refuse_adapter(field, value, ckpt)
    pick_device(spec.device)
    check_config(base_ckpt)
    check_numbers(patched_ckpt, "patched.config")  # a value that is no number is named, not taken for another model
    if base_ckpt.config is not None and patched_ckpt.config is not None:
        reason = not_derived(base_ckpt, patched_ckpt, load_tokenizer(base_ckpt, lenient=True),
                             load_tokenizer(patched_ckpt, lenient=True))
        if reason is not None:
            _refuse_inserted_layers(base_ckpt, patched_ckpt, reason)
            raise InvalidSpec(f"the patched checkpoint is not derived from this base: {reason}", field="patched",
                              fix="Send as checkpoint the base the patched checkpoint was made from (the checkpoint "
                                  "of its extend-vocab, attach-head or surgery request).")
    check_config(patched_ckpt, "patched.config")
    options = VerifyOptions.model_validate(spec.model_dump(exclude={"checkpoint", "patched"}))
    _require_memory(base_ckpt, patched_ckpt, options, pick_device(spec.device), ctx.memory_limit_bytes)
    report = preservation_report(base, patched, options, progress=ctx.say, check=ctx.check_cancelled)
    return VerifyResult(checkpoint=spec.checkpoint, patched=spec.patched, report=report)


def _refuse_adapter(field: str, value: str, ckpt: Checkpoint) -> None:
    """An adapter directory (``adapter_config.json``) is no checkpoint to compare: a 422 naming ``field`` (the
    report would only be skipped for want of a config.json)."""
    if not ckpt.is_file and (ckpt.directory / ADAPTER_CONFIG).is_file():
        raise InvalidSpec(f"{field} {value!r} is a peft adapter (adapter_config.json), not a model checkpoint; "
                          "verify compares two checkpoints", field=field,
                          fix="Merge the adapter into its base first (POST /merge-lora) and verify the merged "
                              "checkpoint, or send \"verify\": true with the attach-lora request.")


def _refuse_inserted_layers(base: Checkpoint, patched: Checkpoint, reason: str) -> None:
    """A patched checkpoint with more layers than the base (an expand-blocks output): which layers were inserted is
    known only to the expand-blocks request (its step facts map each hidden state to the base's), so the 422 says
    where to get the report rather than naming another base."""
    before, after = declared_layers(base.config or {}), declared_layers(patched.config or {})
    if before is None or after is None or after <= before or "layer count" not in reason:
        return
    raise InvalidSpec(f"the patched checkpoint has {after} layers, the base {before} layers: layers were inserted "
                      "(an expand-blocks output?), and which ones cannot be told from the two checkpoints",
                      field="patched", fix='Send "verify": true with the expand-blocks (or surgery) request: its '
                                           "report compares each hidden state with the base's at the same depth.")


def _require_memory(base: Checkpoint, patched: Checkpoint, opts: VerifyOptions, dev: torch.device,
                    limit: int | None = None) -> None:
    """``POST /verify`` refuses (503, before loading anything) a report that cannot fit in the memory available to
    the process; a ``memory_limit_bytes`` of the request below the estimate still gives a skipped report."""
    if base.config is None or patched.config is None:
        return  # the report is skipped without loading anything
    needed, available = estimate(base, patched, opts, dev, limit)
    if needed <= available:
        return
    weights = resources.verify_bytes(max(float32_bytes(base), float32_bytes(patched)), 0, 0, 0, 0)
    per_token = max(1, (needed - weights) // max(1, opts.num_probes * opts.probe_length))
    fits = max(0, (available - weights) // per_token)
    if weights > available:
        field, fix = "patched", ("The models alone do not fit: run verify where more memory is available, or give "
                                 "the service more memory (its container limit, ADAPTER_SURGERY_MEMORY_LIMIT_BYTES).")
    else:
        field = "num_probes" if opts.num_probes > 1 else "probe_length"
        fix = (f"Lower num_probes or probe_length: {opts.num_probes} x {opts.probe_length} probe tokens need "
               f"{resources.size(needed - weights)} of activations; about {fits} tokens fit.")
    raise NotEnoughMemory(
        f"the report needs about {resources.size(needed)} in float32 (the larger model plus the probes' "
        f"activations) but only {resources.size(available)} is available on {dev.type} to the service",
        field=field, fix=fix)

