"""Operations: one module each, with its pydantic spec and one function that does the work.

``OPERATIONS`` describes each one as data, so that the HTTP routes and CLI commands are generated from it and
only translate: a request body or ``--spec`` file becomes the spec model, the result model becomes JSON. Names and
summaries come from :mod:`adapter_surgery.catalog` (torch-free, for the CLI's ``--help``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

from adapter_surgery.catalog import SUMMARIES
from adapter_surgery.ops.attach_head import AttachHeadOptions, AttachHeadResult, AttachHeadSpec, attach_head
from adapter_surgery.ops.attach_lora import AttachLoraOptions, AttachLoraResult, AttachLoraSpec, attach_lora
from adapter_surgery.ops.common import PathFields, RunContext
from adapter_surgery.ops.expand_blocks import ExpandBlocksOptions, ExpandBlocksResult, ExpandBlocksSpec, expand_blocks
from adapter_surgery.ops.extend_vocab import ExtendVocabOptions, ExtendVocabResult, ExtendVocabSpec, extend_vocab
from adapter_surgery.ops.surgery import SurgeryOptions, SurgeryResult, SurgerySpec, surgery
from adapter_surgery.verify import VerifyOptions, VerifyResult, VerifySpec, verify


@dataclass(frozen=True)
class Operation:
    """One operation: its name (the URL path and CLI command), request models, result model, function.

    ``options`` is the spec without the path fields: the body of the upload form's ``spec`` part.
    """

    name: str
    summary: str
    spec: type[PathFields]
    options: type[BaseModel]
    result: type[BaseModel]
    run: Callable[[PathFields, RunContext], BaseModel]


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in [
        Operation("extend-vocab", SUMMARIES["extend-vocab"], ExtendVocabSpec, ExtendVocabOptions, ExtendVocabResult,
                  extend_vocab),  # type: ignore[arg-type]
        Operation("attach-lora", SUMMARIES["attach-lora"], AttachLoraSpec, AttachLoraOptions, AttachLoraResult,
                  attach_lora),  # type: ignore[arg-type]
        Operation("attach-head", SUMMARIES["attach-head"], AttachHeadSpec, AttachHeadOptions, AttachHeadResult,
                  attach_head),  # type: ignore[arg-type]
        Operation("expand-blocks", SUMMARIES["expand-blocks"], ExpandBlocksSpec, ExpandBlocksOptions,
                  ExpandBlocksResult, expand_blocks),  # type: ignore[arg-type]
        Operation("surgery", SUMMARIES["surgery"], SurgerySpec, SurgeryOptions, SurgeryResult,
                  surgery),  # type: ignore[arg-type]
        Operation("verify", SUMMARIES["verify"], VerifySpec, VerifyOptions, VerifyResult,
                  verify),  # type: ignore[arg-type]
    ]
}
