"""Operations: one module each, with its pydantic spec and one function that does the work.

``OPERATIONS`` describes each one as data, so that the HTTP routes and CLI commands are generated from it and
only translate: a request body or ``--spec`` file becomes the spec model, the result model becomes JSON.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from pydantic import BaseModel

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
from adapter_surgery.ops.extend_vocab import ExtendVocabOptions, ExtendVocabResult, ExtendVocabSpec, extend_vocab
from adapter_surgery.ops.merge_lora import MergeLoraOptions, MergeLoraResult, MergeLoraSpec, merge_lora
from adapter_surgery.ops.surgery import SurgeryOptions, SurgeryResult, SurgerySpec, surgery
from adapter_surgery.ops.verify import VerifyOptions, VerifyResult, VerifySpec, verify


@dataclass(frozen=True)
class Operation:
    """One operation: its name (the URL path and CLI command), request models, result model, function.

    ``options`` is the spec without the path fields: the body of the upload form's ``spec`` part. ``upload``: whether
    the upload form applies (the uploaded checkpoint is the operation's whole input).
    """

    name: str
    summary: str
    spec: type[PathFields]
    options: type[BaseModel]
    result: type[BaseModel]
    run: Callable[[PathFields, RunContext], BaseModel]
    upload: bool = True


OPERATIONS: dict[str, Operation] = {
    op.name: op
    for op in [
        Operation("extend-vocab", "Add tokens: tokenizer updated, new rows of every vocabulary tensor initialized.",
                  ExtendVocabSpec, ExtendVocabOptions, ExtendVocabResult, extend_vocab),  # type: ignore[arg-type]
        Operation("attach-lora", "Write a peft LoRA adapter for the checkpoint; data-free inits read headers only.",
                  AttachLoraSpec, AttachLoraOptions, AttachLoraResult, attach_lora),  # type: ignore[arg-type]
        Operation("attach-head", "Attach a classification head (sequence or token): the LM head dropped, the head "
                  "initialized, config and tokenizer made consistent.",
                  AttachHeadSpec, AttachHeadOptions, AttachHeadResult, attach_head),  # type: ignore[arg-type]
        Operation("expand-blocks", "Insert new decoder blocks (LLaMA Pro): copies of the block before each, residual "
                  "projections zero (an identity: logits unchanged) or GPT-2's scaled normal; layers renumbered.",
                  ExpandBlocksSpec, ExpandBlocksOptions, ExpandBlocksResult, expand_blocks),  # type: ignore[arg-type]
        Operation("surgery", "Run several operations (extend-vocab, attach-head, attach-lora) as one job with one "
                  "atomic output: the patched base plus the adapter that names it.",
                  SurgerySpec, SurgeryOptions, SurgeryResult, surgery),  # type: ignore[arg-type]
        Operation("merge-lora", "Fold peft LoRA adapters (LoRA, rsLoRA, DoRA, modules_to_save, trainable tokens; "
                  "several, with weights) into the base: a plain checkpoint, only targeted tensors read and rewritten.",
                  MergeLoraSpec, MergeLoraOptions, MergeLoraResult, merge_lora, upload=False),  # type: ignore[arg-type]
        Operation("convert-adapter", "Convert a trained PiSSA/OLoRA adapter into a plain LoRA (rank doubled) for the "
                  "original base, as peft's path_initial_model_for_weight_conversion does.",
                  ConvertAdapterSpec, ConvertAdapterOptions, ConvertAdapterResult, convert_adapter,  # type: ignore[arg-type]
                  upload=False),
        Operation("verify", "The preservation report of a patched checkpoint against its base (writes nothing).",
                  VerifySpec, VerifyOptions, VerifyResult, verify),  # type: ignore[arg-type]
    ]
}
