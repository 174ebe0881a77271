"""Attach a classification head: turn a causal LM or an encoder checkpoint into a ``transformers`` classifier.

The target class is the one ``AutoModelForSequenceClassification`` (or ``...ForTokenClassification``) maps the
config's ``model_type`` to. It is built on the ``meta`` device (no storage), and its state-dict names and
shapes are diffed against the checkpoint's keys:

- backbone tensors are kept, byte for byte; a checkpoint saved from the bare base model (``BertModel``: keys
  without ``bert.``) has its keys renamed to the target's (``bert.embeddings...``): only the headers change,
  the data are copied file to file by the kernel. The output's keys are then exactly the target's state dict,
  so ``transformers`` (or any loader that matches names strictly) reports no missing or unexpected key. Keys that
  ``transformers``' own loading rules map (:mod:`adapter_surgery.model.keys`: renamings such as Mixtral's
  ``block_sparse_moe.`` -> ``mlp.``, and converters such as the per-expert ``experts.<i>.w1`` tensors it stacks into
  fused 3-D experts) are kept as stored, in the input's layout, and ``transformers`` converts them at load;
- the LM head (``lm_head.weight``, ``cls.predictions.*``, a redundant tied copy), an old classification head,
  other heads outside the backbone, buffers loaders ignore (an old ``position_ids``, rotary ``inv_freq``, GPT-2's
  ``attn.bias``, keys of the class's ``_keys_to_ignore_on_load_unexpected``) and a pooler the token classifier
  has no use for are dropped and listed in ``dropped``. Any other backbone tensor the target lacks is a 422:
  config.json and the weights disagree (e.g. ``num_hidden_layers`` 20 over 30 layers of weights), and dropping
  layers would make another model. Tied embeddings stay: a tied checkpoint that stored only the head copy has
  it renamed to the input embedding;
- the head (``score.weight`` for Llama/Qwen2/GPT-2-style decoders, ``classifier.weight``/``bias`` for BERT,
  whatever the target names it) is created with ``init``, biases zero; a pooler the target needs and the
  checkpoint lacks (BERT MLM checkpoints) is created by the target's own ``_init_weights``, as ``transformers``
  would (N(0, initializer_range), zero bias).

``config.json`` gets ``architectures``, ``id2label``/``label2id``, ``problem_type`` (only when the request sets
it; otherwise ``transformers`` infers it from the labels at the first loss) and ``pad_token_id``, which agrees
with the tokenizer files (``pad_token`` policy below). Initializer formulas and their sources are in
:mod:`adapter_surgery.initializers`.
"""

from __future__ import annotations

from adapter_surgery import resources
from adapter_surgery.devices import pick_device
from adapter_surgery.errors import InvalidCheckpoint, InvalidSpec
from adapter_surgery.io import describe_files
from adapter_surgery.io.writer import write_checkpoint
from adapter_surgery.ops.attach_head.initialize import create_tensors
from adapter_surgery.ops.attach_head.keys import STALE_BUFFERS, config_mismatch, map_keys, unexpected_tensors
from adapter_surgery.ops.attach_head.output import changed_tensors, created_changes, key_changes, write_side_files
from adapter_surgery.ops.attach_head.pad import config_token_ids, plan_pad
from adapter_surgery.ops.attach_head.spec import (
    MAX_LABELS,
    AttachHeadOptions,
    AttachHeadResult,
    AttachHeadSpec,
    CreatedTensor,
    DroppedTensor,
    HeadInit,
    PadToken,
    ProblemType,
    RenamedTensor,
    Task,
    check_labels,
    check_problem_type,
)
from adapter_surgery.ops.attach_head.target import (
    TASK_MAPPINGS,
    auto_config,
    configured,
    embedding_dtype,
    meta_model,
    target_class,
)
from adapter_surgery.ops.attach_head.tokens import tokenizer_facts
from adapter_surgery.ops.common import FileInfo, RunContext
from adapter_surgery.ops.runner import begin
from adapter_surgery.paths import without_dirs

__all__ = ["MAX_LABELS", "STALE_BUFFERS", "TASK_MAPPINGS", "AttachHeadOptions", "AttachHeadResult", "AttachHeadSpec",
           "CreatedTensor", "DroppedTensor", "HeadInit", "PadToken", "ProblemType", "RenamedTensor", "Task",
           "attach_head", "config_mismatch", "unexpected_tensors", "without_dirs"]


def attach_head(spec: AttachHeadSpec, ctx: RunContext) -> AttachHeadResult:
    """Run ``spec``: write the checkpoint with the head attached (atomically) and return what changed.

    Shapes: the head's weight is ``(num_labels, hidden)`` (``nn.Linear`` layout), its bias ``(num_labels,)``; with
    ``pad_token: add`` the input embedding grows by one row (more with spare rows, as extend-vocab does). New
    tensors take the dtype of the input embedding; arithmetic is float32 on ``spec.device``.

    Raises:
        NotFound, PathOutsideDataDir, OutputExists: path problems.
        InvalidCheckpoint: no usable config.json, or the weights do not fit the target class (missing backbone
            tensors, wrong shapes, backbone tensors it does not have: config.json declaring fewer layers than the
            weights hold).
        InvalidSpec: labels inconsistent (``num_labels`` vs ``id2label``, ids not 0..n-1, duplicate names), a
            ``problem_type`` the task cannot use, no transformers class for the task, no pad/eos token to use, a
            ``.safetensors`` output.
    """
    run = begin(spec, ctx)
    output = run.output
    id2label = check_labels(spec)
    problem_type = check_problem_type(spec, len(id2label))
    if output.suffix == ".safetensors":
        raise InvalidSpec("attach-head writes a model directory (config.json, tokenizer), not a bare file",
                          field="output", fix="Give a directory path as output.")
    device = pick_device(spec.device)
    ckpt = run.open()
    if ckpt.is_file or ckpt.config is None:
        raise InvalidCheckpoint(f"attach-head needs the checkpoint's config.json ({ckpt.config_problem})",
                                field="checkpoint", fix="Send the model directory saved with save_pretrained.")
    arch = run.architecture(ckpt)
    if arch.source != "config":
        raise InvalidCheckpoint(f"config.json cannot be used to build the model: {'; '.join(arch.notes)}",
                                field="checkpoint", fix="Send a config.json that transformers can load.")
    head = 2 * 4 * len(id2label) * arch.hidden_size + 4 * 4 * arch.hidden_size * arch.hidden_size  # + a pooler
    resources.require(head, available=resources.available_memory(ctx.memory_limit_bytes),
                      field="id2label" if spec.id2label is not None else "num_labels",
                      what=f"a head of {len(id2label)} labels over {arch.hidden_size} features",
                      fix="Use fewer labels, or give the service more memory.")
    config = auto_config(ckpt)
    target_cls = target_class(config, spec.task)
    tok = tokenizer_facts(ckpt, config_token_ids(config), ctx.tokenizers)  # read off the cache's, no copy
    pad = plan_pad(spec, ckpt, arch, config, tok, device)
    ctx.say(f"target {target_cls.__name__}, pad id {pad.info.id if pad.info else None}")
    config = configured(config, id2label, problem_type, pad, arch)
    target = meta_model(target_cls, config)
    keys = map_keys(ckpt, arch, target, pad.changes.replace)
    created = create_tensors(keys.missing, target, spec, config, device, embedding_dtype(ckpt, arch))
    # the writer's changes, each part from its own step: the grown embedding, then drops and renames, then new tensors
    kept = pad.changes.merged(key_changes(ckpt, keys, pad.changes.replace))
    changes = kept.merged(created_changes(ckpt, created, kept))
    changed = changed_tensors(keys, created, pad.changed)
    warnings = [*ckpt.warnings, *pad.warnings]
    with run.writing() as tmp:
        digests = write_checkpoint(ckpt, tmp, changes, ctx, cache=ctx.digests)
        write_side_files(ckpt, tmp, arch, target_cls.__name__, id2label, problem_type, pad, tok)
        files = describe_files(tmp, known=digests)
        report = None
        if spec.verify:  # before the output is published
            ctx.say("preservation report")
            report = run.verify(tmp, head_init=spec.init, device=spec.device)
    return AttachHeadResult(
        output=spec.output, task=spec.task, model_class=target_cls.__name__, base_model_class=arch.model_class,
        num_labels=len(id2label), id2label=id2label, problem_type=problem_type, pad_token=pad.info,
        created=[c.result for c in created], dropped=keys.dropped, renamed=keys.renamed, changed_tensors=changed,
        vocab_size_before=arch.vocab_rows, vocab_size_after=pad.rows_after, files=[FileInfo.of(f) for f in files],
        warnings=[without_dirs(w, ctx.data_dir) for w in warnings], seconds=run.seconds(),
        report=report)
