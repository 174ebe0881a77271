"""Operations: one module each, with its pydantic spec and one function that does the work.

``OPERATIONS`` describes each one as data, so that the HTTP routes and CLI commands are generated from it and
only translate: a request body or ``--spec`` file becomes the spec model, the result model becomes JSON. An
entry with a ``step`` role can also be a step of ``POST /surgery``, whose step models are derived from these
entries (:func:`adapter_surgery.ops.surgery.bind_steps`): adding an operation is one module plus one line here. Names
and summaries come from :mod:`adapter_surgery.catalog` (torch-free, for the CLI's ``--help``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel

from adapter_surgery.catalog import SUMMARIES
from adapter_surgery.ops.attach_head import AttachHeadOptions, AttachHeadResult, AttachHeadSpec, attach_head
from adapter_surgery.ops.attach_lora import AttachLoraOptions, AttachLoraResult, AttachLoraSpec, attach_lora
from adapter_surgery.ops.common import PathFields, RunContext
from adapter_surgery.ops.convert_adapter import (
    ConvertAdapterOptions,
    ConvertAdapterResult,
    ConvertAdapterSpec,
    convert_adapter,
)
from adapter_surgery.ops.expand_blocks import ExpandBlocksOptions, ExpandBlocksResult, ExpandBlocksSpec, expand_blocks
from adapter_surgery.ops.expand_blocks import step_facts as expand_blocks_facts
from adapter_surgery.ops.extend_vocab import ExtendVocabOptions, ExtendVocabResult, ExtendVocabSpec, extend_vocab
from adapter_surgery.ops.merge_lora import MergeLoraOptions, MergeLoraResult, MergeLoraSpec, merge_lora
from adapter_surgery.ops.surgery import SurgeryOptions, SurgeryResult, SurgerySpec, bind_steps, surgery
from adapter_surgery.ops.verify import VerifyOptions, VerifyResult, VerifySpec, verify
from adapter_surgery.report import StepFacts


@dataclass(frozen=True)
class StepRole:
    """How an operation runs as a step of ``POST /surgery``.

    ``kind``: ``base`` steps patch the base, in order, each on the previous one's output; the ``adapter`` step (at
    most one) is built on the final base. ``once``: at most one such step per plan, and why. ``adds_tokens``: its
    result lists the ``added`` ids that an adapter step's ``"trainable_token_indices": "added"`` takes.
    ``report_facts``: ``(step options, step result as JSON) -> StepFacts``, what the plan's preservation report must
    know of the step (a head's init, inserted layers, an output changed by design), as its own ``verify`` knows.
    """

    kind: Literal["base", "adapter"]
    once: str | None = None
    adds_tokens: bool = False
    report_facts: Callable[[Any, dict[str, Any]], StepFacts] | None = None


def _attach_head_facts(options: AttachHeadOptions, result: dict[str, Any]) -> StepFacts:
    """attach-head's ``verify`` checks the new head against its ``init``: so does a plan's report."""
    return StepFacts(head_init=options.init)


@dataclass(frozen=True)
class Operation:
    """One operation: its name (the URL path and CLI command), request models, result model, function.

    ``options`` is the spec without the path fields: the body of the upload form's ``spec`` part. ``upload``: whether
    the upload form applies (the uploaded checkpoint is the operation's whole input). ``step``: how it runs as a
    surgery step; ``None``: it cannot be one.
    """

    name: str
    summary: str
    spec: type[PathFields]
    options: type[BaseModel]
    result: type[BaseModel]
    run: Callable[[PathFields, RunContext], BaseModel]
    upload: bool = True
    step: StepRole | None = None


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in [
        Operation("extend-vocab", SUMMARIES["extend-vocab"], ExtendVocabSpec, ExtendVocabOptions, ExtendVocabResult,
                  extend_vocab, step=StepRole("base", adds_tokens=True)),  # type: ignore[arg-type]
        Operation("attach-lora", SUMMARIES["attach-lora"], AttachLoraSpec, AttachLoraOptions, AttachLoraResult,
                  attach_lora, step=StepRole("adapter")),  # type: ignore[arg-type]
        Operation("attach-head", SUMMARIES["attach-head"], AttachHeadSpec, AttachHeadOptions, AttachHeadResult,
                  attach_head, step=StepRole("base", once="a later head would replace the earlier one",
                                             report_facts=_attach_head_facts)),  # type: ignore[arg-type]
        Operation("expand-blocks", SUMMARIES["expand-blocks"], ExpandBlocksSpec, ExpandBlocksOptions,
                  ExpandBlocksResult, expand_blocks, step=StepRole("base", report_facts=expand_blocks_facts)),  # type: ignore[arg-type]
        Operation("surgery", SUMMARIES["surgery"], SurgerySpec, SurgeryOptions, SurgeryResult,
                  surgery),  # type: ignore[arg-type]
        Operation("merge-lora", SUMMARIES["merge-lora"], MergeLoraSpec, MergeLoraOptions, MergeLoraResult,
                  merge_lora, upload=False),  # type: ignore[arg-type]
        Operation("convert-adapter", SUMMARIES["convert-adapter"], ConvertAdapterSpec, ConvertAdapterOptions,
                  ConvertAdapterResult, convert_adapter, upload=False),  # type: ignore[arg-type]
        Operation("verify", SUMMARIES["verify"], VerifySpec, VerifyOptions, VerifyResult,
                  verify),  # type: ignore[arg-type]
    ]
}
bind_steps(OPERATIONS)
