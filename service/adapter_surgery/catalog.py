"""The operations' names and one-line summaries, free of ``torch``: what the CLI needs to build its commands and
print ``--help`` (importing an operation module pulls in ``torch`` and ``transformers``, seconds of start-up).

``adapter_surgery.ops.OPERATIONS`` takes its names, order and summaries from here (a test checks they agree).
"""

from __future__ import annotations

SUMMARIES: dict[str, str] = {
    "extend-vocab": "Add tokens: tokenizer updated, new rows of every vocabulary tensor initialized.",
    "attach-lora": "Write a peft LoRA adapter for the checkpoint; data-free inits read headers only.",
    "attach-head": "Attach a classification head (sequence or token): the LM head dropped, the head initialized, "
                   "config and tokenizer made consistent.",
    "expand-blocks": "Insert new decoder blocks (LLaMA Pro): copies of the block before each, residual projections "
                     "zero (an identity: logits unchanged) or GPT-2's scaled normal; layers renumbered.",
    "surgery": "Run several operations (extend-vocab, attach-head, expand-blocks, attach-lora) as one job with one "
               "atomic output: the patched base plus the adapter that names it.",
    "merge-lora": "Fold peft LoRA adapters (LoRA, rsLoRA, DoRA, modules_to_save, trainable tokens; several, with "
                  "weights) into the base: a plain checkpoint, only targeted tensors read and rewritten.",
    "convert-adapter": "Convert a trained PiSSA/OLoRA adapter into a plain LoRA (rank doubled) for the original base, "
                       "as peft's path_initial_model_for_weight_conversion does.",
    "verify": "The preservation report of a patched checkpoint against its base (writes nothing).",
}
