"""Attach a classification head: turn a causal LM or an encoder checkpoint into a ``transformers`` classifier.

The target class is the one ``AutoModelForSequenceClassification`` (or ``...ForTokenClassification``) maps the
config's ``model_type`` to. It is built on the ``meta`` device (no storage), and its state-dict names and
shapes are diffed against the checkpoint's keys:

- backbone tensors are kept, byte for byte; a checkpoint saved from the bare base model (``BertModel``: keys
  without ``bert.``) has its keys renamed to the target's (``bert.embeddings...``): only the headers change,
  the data are copied file to file by the kernel. The output's keys are then exactly the target's state dict,
  so ``transformers`` (or any loader that matches names strictly) reports no missing or unexpected key;
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

import dataclasses
import json
import re
import shutil
import time
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any, Literal

import torch
from pydantic import BaseModel, Field, StringConstraints
from torch import nn

from adapter_surgery import resources
from adapter_surgery.arch import Architecture, quiet_transformers, resolve_architecture
from adapter_surgery.devices import DeviceName, pick_device
from adapter_surgery.errors import InvalidCheckpoint, InvalidSpec
from adapter_surgery.initializers import WEIGHT_INITS, WeightInitArgs, expected_std, seeded_global_rng
from adapter_surgery.io import Checkpoint, CopiedTensor, NewTensor, atomic_output, describe_files
from adapter_surgery.io.atomic import check_output_path
from adapter_surgery.io.writer import Changes, write_checkpoint
from adapter_surgery.ops.common import ChangedTensor, FileInfo, PathFields, RunContext, Seed, StrictModel
from adapter_surgery.paths import resolve_under
from adapter_surgery.verify import PreservationReport, preservation_report

Task = Literal["sequence_classification", "token_classification"]
HeadInit = Literal["kaiming_normal", "kaiming_uniform", "xavier_uniform", "xavier_normal", "normal", "zeros"]
PadPolicy = Literal["auto", "eos", "add"]
ProblemType = Literal["single_label_classification", "multi_label_classification", "regression"]

#: transformers' auto-mapping (in ``transformers.models.auto.modeling_auto``) of each task.
TASK_MAPPINGS = {
    "sequence_classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token_classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
}


#: Labels per head at most; a label name's length at most.
MAX_LABELS = 1_000_000
Label = Annotated[str, StringConstraints(max_length=1000)]


class AttachHeadOptions(StrictModel):
    """The head to attach and how to initialize it (everything but the paths).

    ``init`` (formulas and sources in :mod:`adapter_surgery.initializers`): ``kaiming_normal`` (default,
    N(0, 2/fan_in), He et al. 2015), ``kaiming_uniform`` (PyTorch's ``nn.Linear`` default, a = √5, std
    1/√(3 fan_in)), ``xavier_uniform`` / ``xavier_normal`` (variance 2/(fan_in + fan_out), Glorot & Bengio 2010),
    ``normal`` (N(0, initializer_range²): what ``transformers`` does), ``zeros`` (every initial logit 0: uniform
    predictions; training still moves the head since its gradient does not depend on its own value).

    ``pad_token`` (decoders need ``pad_token_id`` to pool the last non-pad token, and to batch):
    ``auto``: the tokenizer's pad token, else the config's ``pad_token_id``, else eos with a warning (case B16:
    an input that ends in eos is then pooled one token earlier); ``eos``: eos even when the tokenizer has a pad
    token; ``add``: a dedicated ``pad_token_content`` token, added as extend-vocab adds tokens (new input row = the
    mean of the trained rows, id = the next free id).
    """

    task: Task = Field("sequence_classification", description="Which transformers head class to target.")
    num_labels: int | None = Field(None, ge=1, le=MAX_LABELS, description="Number of labels (or give id2label); "
                                                                          "at most 1,000,000.")
    id2label: Annotated[dict[int, Label], Field(max_length=MAX_LABELS)] | Annotated[
        list[Label], Field(max_length=MAX_LABELS)] | None = Field(
        None, description="Label names by id 0..n-1 (a list is taken in order); at most 1,000,000.")
    problem_type: ProblemType | None = Field(None, description="Written to the config when given; otherwise "
                                                               "transformers infers it from the labels.")
    init: HeadInit = Field("kaiming_normal", description="Init of the head's weight matrix; biases are zero.")
    pad_token: PadPolicy = Field("auto", description="Where pad_token_id comes from: auto, eos, add.")
    pad_token_content: str = Field("<pad>", min_length=1, max_length=1000, description="The token 'add' adds.")
    seed: Seed = Field(0, description="Seeds the head; the same seed gives byte-identical output.")
    device: DeviceName = Field("auto", description="Where the arithmetic runs: auto (GPU when present), cpu, cuda.")
    verify: bool = Field(False, description="Add the preservation report (base vs output) to the result.")


class AttachHeadSpec(PathFields, AttachHeadOptions):
    """The full ``POST /attach-head`` request."""


class CreatedTensor(BaseModel):
    name: str
    shape: list[int]
    dtype: str
    init: str = Field(description="The request's init, 'zeros' for biases, 'transformers' for modules the target "
                                  "initializes itself (a pooler).")
    std: float
    expected_std: float | None = Field(description="The init's formula (None for 'transformers' non-Linear "
                                                   "modules).")


class DroppedTensor(BaseModel):
    name: str
    shape: list[int]
    reason: Literal["lm_head", "replaced_head", "unused"] = Field(
        description="lm_head: the language-model head; replaced_head: an old classification head; unused: not a "
                    "tensor of the target class.")


class RenamedTensor(BaseModel):
    source: str
    target: str


class PadToken(BaseModel):
    token: str | None = Field(description="The pad token's text; None without a tokenizer.")
    id: int
    source: Literal["tokenizer", "config", "eos", "added", "existing"]


class AttachHeadResult(BaseModel):
    output: str
    task: Task
    model_class: str = Field(description="The transformers class the output loads as.")
    base_model_class: str | None
    num_labels: int
    id2label: dict[int, str]
    problem_type: ProblemType | None
    pad_token: PadToken | None
    created: list[CreatedTensor]
    dropped: list[DroppedTensor]
    renamed: list[RenamedTensor]
    changed_tensors: list[ChangedTensor]
    vocab_size_before: int
    vocab_size_after: int
    files: list[FileInfo]
    warnings: list[str]
    seconds: float
    report: PreservationReport | None = None


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
    started = time.perf_counter()
    checkpoint = resolve_under(ctx.data_dir, spec.checkpoint, "checkpoint")
    output = resolve_under(ctx.data_dir, spec.output, "output")
    check_output_path(output, checkpoint, spec.overwrite)
    id2label = _labels(spec)
    problem_type = _problem_type(spec, len(id2label))
    if output.suffix == ".safetensors":
        raise InvalidSpec("attach-head writes a model directory (config.json, tokenizer), not a bare file",
                          field="output", fix="Give a directory path as output.")
    device = pick_device(spec.device)
    ckpt = Checkpoint.open(checkpoint)
    if ckpt.is_file or ckpt.config is None:
        raise InvalidCheckpoint(f"attach-head needs the checkpoint's config.json ({ckpt.config_problem})",
                                field="checkpoint", fix="Send the model directory saved with save_pretrained.")
    arch = resolve_architecture(ckpt, ctx.architectures)
    if arch.source != "config":
        raise InvalidCheckpoint(f"config.json cannot be used to build the model: {'; '.join(arch.notes)}",
                                field="checkpoint", fix="Send a config.json that transformers can load.")
    warnings = list(ckpt.warnings)
    head = 2 * 4 * len(id2label) * arch.hidden_size + 4 * 4 * arch.hidden_size * arch.hidden_size  # + a pooler
    resources.require(head, available=resources.available_memory(ctx.memory_limit_bytes),
                      field="id2label" if spec.id2label is not None else "num_labels",
                      what=f"a head of {len(id2label)} labels over {arch.hidden_size} features",
                      fix="Use fewer labels, or give the service more memory.")
    config = _auto_config(ckpt)
    target_cls = _target_class(config, spec.task)
    tok = _load_tokenizer(ckpt)
    changes = Changes()
    pad = _pad(spec, ckpt, arch, config, tok, device, changes, warnings)
    ctx.say(f"target {target_cls.__name__}, pad id {pad.info.id if pad.info else None}")
    _configure(config, id2label, problem_type, pad, arch)
    target = _meta_model(target_cls, config)
    keys = _map_keys(ckpt, arch, target, changes)
    created = _create(keys.missing, target, spec, config, device, _dtype(ckpt, arch))
    changed = _apply(changes, ckpt, keys, created, pad.changed)
    with atomic_output(output, spec.overwrite, owner=ctx.owner) as tmp:
        digests = write_checkpoint(ckpt, tmp, changes, ctx, cache=ctx.digests)
        _write_side_files(ckpt, tmp, arch, target_cls.__name__, id2label, problem_type, pad, tok)
        files = describe_files(tmp, known=digests)
    report = None
    if spec.verify:
        ctx.say("preservation report")
        report = preservation_report(checkpoint, output, head_init=spec.init, device=spec.device, progress=ctx.say)
    return AttachHeadResult(
        output=spec.output, task=spec.task, model_class=target_cls.__name__, base_model_class=arch.model_class,
        num_labels=len(id2label), id2label=id2label, problem_type=problem_type, pad_token=pad.info,
        created=[c.result for c in created], dropped=keys.dropped, renamed=keys.renamed, changed_tensors=changed,
        vocab_size_before=arch.vocab_rows, vocab_size_after=pad.rows_after, files=[FileInfo.of(f) for f in files],
        warnings=[without_dirs(w, ctx.data_dir) for w in warnings], seconds=round(time.perf_counter() - started, 4),
        report=report)


def without_dirs(text: str, root: Path) -> str:
    """``text`` with the absolute directory ``root`` (and what lies above it) removed from paths it quotes, so
    that results and errors name paths relative to the data directory, never the server's (or an upload's
    temporary work directory)."""
    for form in dict.fromkeys((str(root), str(root.resolve()))):
        if form not in ("", "/", "."):
            text = text.replace(form.rstrip("/") + "/", "").replace(form, ".")
    return text


# -- request checks ------------------------------------------------------------------------------------------
def _labels(spec: AttachHeadOptions) -> dict[int, str]:
    """``id2label`` from ``num_labels`` / ``id2label``: ids exactly 0..n-1, names unique."""
    given = spec.id2label
    if given is None:
        if spec.num_labels is None:
            raise InvalidSpec("the request gives neither num_labels nor id2label", field="num_labels",
                              fix='Send "num_labels": 2 (labels LABEL_0, LABEL_1) or "id2label": {"0": "neg", ...}.')
        return {i: f"LABEL_{i}" for i in range(spec.num_labels)}
    labels = dict(enumerate(given)) if isinstance(given, list) else dict(sorted(given.items()))
    if not labels:
        raise InvalidSpec("id2label is empty", field="id2label", fix="Name at least one label.")
    if sorted(labels) != list(range(len(labels))):
        raise InvalidSpec(f"id2label ids must be 0..{len(labels) - 1}, got {sorted(labels)}", field="id2label",
                          fix="Number the labels from 0 without gaps.")
    if len(set(labels.values())) != len(labels):
        dup = next(v for v in labels.values() if list(labels.values()).count(v) > 1)
        raise InvalidSpec(f"id2label names label {dup!r} more than once, so label2id cannot invert it",
                          field="id2label", fix="Give every label a distinct name.")
    if spec.num_labels is not None and spec.num_labels != len(labels):
        raise InvalidSpec(f"num_labels is {spec.num_labels} but id2label has {len(labels)} labels",
                          field="num_labels", fix="Drop num_labels or make it match id2label.")
    return labels


def _problem_type(spec: AttachHeadOptions, n: int) -> ProblemType | None:
    pt = spec.problem_type
    if spec.task == "token_classification" and pt not in (None, "single_label_classification"):
        raise InvalidSpec(f"problem_type {pt!r} is not supported by transformers' token classifiers (they always "
                          "use cross-entropy)", field="problem_type",
                          fix='Drop problem_type or send "single_label_classification".')
    if pt == "single_label_classification" and n == 1:
        raise InvalidSpec("single_label_classification needs at least 2 labels", field="problem_type",
                          fix='Use num_labels 2 for binary classification, or problem_type "regression".')
    return pt


# -- transformers --------------------------------------------------------------------------------------------
def _auto_config(ckpt: Checkpoint):  # -> PretrainedConfig
    import transformers

    try:
        with quiet_transformers():
            return transformers.AutoConfig.from_pretrained(str(ckpt.root), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds for broken configs
        raise InvalidCheckpoint(f"config.json cannot be loaded ({type(exc).__name__}: "
                                f"{without_dirs(str(exc), ckpt.directory)})", field="checkpoint",
                                fix="Send a config.json that transformers can load.") from None


def _target_class(config, task: str) -> type[nn.Module]:
    import transformers
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, TASK_MAPPINGS[task])
    name = names.get(config.model_type)
    if not isinstance(name, str) or not hasattr(transformers, name):
        raise InvalidSpec(f"transformers has no {task} class for model_type {config.model_type!r}", field="task",
                          fix="Choose the other task, or a checkpoint whose architecture has such a class.")
    return getattr(transformers, name)


def _meta_model(cls: type[nn.Module], config) -> nn.Module:
    with quiet_transformers(), torch.device("meta"):
        return cls(config)


def _load_tokenizer(ckpt: Checkpoint):  # -> PreTrainedTokenizerBase | None
    if not ckpt.has_tokenizer:
        return None
    from transformers import AutoTokenizer

    try:
        with quiet_transformers():
            return AutoTokenizer.from_pretrained(str(ckpt.directory), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds for broken tokenizer files
        raise InvalidCheckpoint(f"the tokenizer files could not be loaded ({type(exc).__name__}: "
                                f"{without_dirs(str(exc), ckpt.directory)})",
                                field="checkpoint", fix="Re-save the tokenizer with save_pretrained.") from None


def _dtype(ckpt: Checkpoint, arch: Architecture) -> torch.dtype:
    dtype = ckpt.info(arch.input_embedding).torch_dtype
    return dtype if dtype is not None and dtype.is_floating_point else torch.float32


def _text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


# -- pad token -----------------------------------------------------------------------------------------------
@dataclass
class _Pad:
    info: PadToken | None
    rows_after: int
    tokenizer_grew: bool = False  # the tokenizer object has a new token: save it
    changed: list[ChangedTensor] = field(default_factory=list)


def _first_id(value: Any) -> int | None:
    if isinstance(value, list):
        value = value[0] if value else None
    return value if isinstance(value, int) and value >= 0 else None


def _pad(spec: AttachHeadSpec, ckpt: Checkpoint, arch: Architecture, config, tok, device: torch.device,
         changes: Changes, warnings: list[str]) -> _Pad:
    rows = arch.vocab_rows
    text = _text_config(config)
    if spec.pad_token == "add":
        return _add_pad(spec, ckpt, arch, tok, device, changes, warnings)
    if spec.pad_token == "auto":
        if tok is not None and tok.pad_token is not None and tok.pad_token_id < rows:
            cfg_pad = _first_id(getattr(text, "pad_token_id", None))
            if cfg_pad is not None and cfg_pad != tok.pad_token_id:
                warnings.append(f"config.json said pad_token_id {cfg_pad} but the tokenizer pads with "
                                f"{tok.pad_token!r} (id {tok.pad_token_id}); the config now follows the tokenizer")
            return _Pad(PadToken(token=tok.pad_token, id=tok.pad_token_id, source="tokenizer"), rows)
        cfg_pad = _first_id(getattr(text, "pad_token_id", None))
        if cfg_pad is not None and cfg_pad < rows and (tok is None or cfg_pad < len(tok)):
            token = tok.convert_ids_to_tokens(cfg_pad) if tok is not None else None
            return _Pad(PadToken(token=token, id=cfg_pad, source="config"), rows)
    eos_id, eos_tok = None, None
    if tok is not None and tok.eos_token is not None and tok.eos_token_id < rows:
        eos_id, eos_tok = tok.eos_token_id, tok.eos_token
    else:
        raw = getattr(text, "eos_token_id", None)
        eos_id = _first_id(raw)
        if isinstance(raw, list) and len(raw) > 1:
            warnings.append(f"config.json lists several eos ids {raw}; the first, {eos_id}, is the pad id")
        if eos_id is not None and tok is not None and eos_id < len(tok):
            eos_tok = tok.convert_ids_to_tokens(eos_id)
    if eos_id is None or eos_id >= rows:
        raise InvalidSpec("the checkpoint has no pad token and no eos token to pad with", field="pad_token",
                          fix='Send "pad_token": "add" to add a dedicated pad token.')
    if spec.pad_token == "auto":
        warnings.append(f"no pad token: the eos token {eos_tok!r} (id {eos_id}) pads; the classifier pools the last "
                        "token that is not the pad id, so an input that ends in eos is pooled one token earlier. "
                        'Send "pad_token": "add" for a dedicated pad token')
    return _Pad(PadToken(token=eos_tok, id=eos_id, source="eos"), rows)


def _add_pad(spec: AttachHeadSpec, ckpt: Checkpoint, arch: Architecture, tok, device: torch.device,
             changes: Changes, warnings: list[str]) -> _Pad:
    """Add ``spec.pad_token_content`` with extend-vocab's planning and initialization (mean row).

    Only the input embedding grows: the LM head, whose rows extend-vocab would also extend, is dropped.
    """
    from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, TokenSpec, plan_vocab, vocab_changes

    ev = ExtendVocabSpec(checkpoint=spec.checkpoint, output=spec.output, overwrite=spec.overwrite,
                         tokens=[TokenSpec(content=spec.pad_token_content, special=True)] if tok is not None else [],
                         num_new_tokens=None if tok is not None else 1, init="mean", seed=spec.seed,
                         device=spec.device)
    input_only = dataclasses.replace(arch, output_head=None, output_bias=None, redundant_keys=[])
    plan = plan_vocab(ev, ckpt, input_only, tok)
    ev_changes, changed = vocab_changes(ev, ckpt, input_only, plan, tok=tok, device=device, warnings=warnings)
    changes.replace.update(ev_changes.replace)
    if plan.added:
        info = PadToken(token=plan.added[0].token, id=plan.added[0].id, source="added")
    else:
        info = PadToken(token=plan.existing[0].token, id=plan.existing[0].id, source="existing")
        warnings.append(f"pad token {info.token!r} already exists (id {info.id}); it is used as it is")
    return _Pad(info, plan.rows_after, tokenizer_grew=bool(plan.added) and tok is not None, changed=changed)


def _configure(config, id2label: dict[int, str], problem_type: str | None, pad: _Pad, arch: Architecture) -> None:
    """Set on the transformers config what the target class is built from (labels, pad id, vocab size)."""
    config.id2label = dict(id2label)
    config.label2id = {v: k for k, v in id2label.items()}
    config.problem_type = problem_type
    text = _text_config(config)
    if pad.info is not None:
        config.pad_token_id = pad.info.id
        text.pad_token_id = pad.info.id
    if pad.rows_after != arch.vocab_rows:
        text.vocab_size = pad.rows_after


# -- key mapping ---------------------------------------------------------------------------------------------
@dataclass
class _Keys:
    mapping: dict[str, str]  # checkpoint key -> target name (backbone tensors kept)
    missing: list[str]  # target names to create
    dropped: list[DroppedTensor]
    renamed: list[RenamedTensor]


def _map_keys(ckpt: Checkpoint, arch: Architecture, target: nn.Module, changes: Changes) -> _Keys:
    """Match checkpoint keys to the target's state-dict names (exact, then with/without the base-model prefix).

    Raises:
        InvalidCheckpoint: a backbone tensor the target needs is missing or has another shape.
    """
    prefix = getattr(target, "base_model_prefix", "") or ""
    expected = {n: tuple(t.shape) for n, t in target.state_dict().items()}

    def is_head(name: str) -> bool:
        return not (prefix and name.startswith(prefix + "."))

    embed_w = target.get_input_embeddings().weight
    embed_name = next(n for n, p in target.named_parameters(remove_duplicate=False) if p is embed_w)
    mapping: dict[str, str] = {}
    claimed: set[str] = set()

    def claim(key: str, name: str) -> None:
        mapping[key] = name
        claimed.add(name)

    for key in ckpt.weight_map:
        if key in expected and not is_head(key):
            claim(key, key)
    if arch.input_embedding not in mapping and embed_name not in claimed:
        claim(arch.input_embedding, embed_name)
    for key in ckpt.weight_map:
        if key in mapping or not prefix:
            continue
        for cand in (f"{prefix}.{key}", key[len(prefix) + 1:] if key.startswith(prefix + ".") else None):
            if cand and cand in expected and cand not in claimed and not is_head(cand):
                claim(key, cand)
                break
    lm_roots = {k.split(".")[0] for k in (arch.output_head, arch.output_bias, arch.head_param, *arch.redundant_keys)
                if k}
    lm_roots.discard(prefix)
    dropped = []
    for key in ckpt.weight_map:
        if key in mapping:
            continue
        as_target = key if key in expected else f"{prefix}.{key}" if f"{prefix}.{key}" in expected else None
        if key in (arch.output_head, arch.output_bias) or key in arch.redundant_keys or key.split(".")[0] in lm_roots:
            reason = "lm_head"
        elif as_target is not None and is_head(as_target):
            reason = "replaced_head"
        else:
            reason = "unused"
        dropped.append(DroppedTensor(name=key, shape=list(ckpt.info(key).shape), reason=reason))
    extra, _ = unexpected_tensors([d.name for d in dropped if d.reason == "unused"], target, expected)
    if extra:
        raise config_mismatch(extra, target, ckpt)
    missing = [n for n in expected if n not in claimed]
    backbone_missing = [n for n in missing if not is_head(n) and ".pooler." not in f".{n}"]
    if backbone_missing:
        raise InvalidCheckpoint(
            f"the checkpoint lacks {len(backbone_missing)} tensor(s) that {type(target).__name__} needs, e.g. "
            f"{backbone_missing[0]!r}", field="checkpoint",
            fix="Check that config.json belongs to these weights (layer count, model type).")
    for key, name in mapping.items():
        src = changes.replace.get(key)
        shape = tuple(src.shape) if src is not None else ckpt.info(key).shape
        if shape != expected[name]:
            raise InvalidCheckpoint(f"tensor {key!r} has shape {list(shape)} but {type(target).__name__} expects "
                                    f"{list(expected[name])} for {name!r}", field="checkpoint",
                                    fix="Check that config.json belongs to these weights.")
    renamed = [RenamedTensor(source=k, target=n) for k, n in mapping.items() if k != n]
    return _Keys(mapping=mapping, missing=missing, dropped=dropped, renamed=renamed)


#: Buffers that older ``transformers`` versions saved with the weights and every loader ignores.
STALE_BUFFERS = ("position_ids", "inv_freq", "masked_bias")


def _generic(name: str) -> str:
    """``model.layers.3.mlp.up_proj.weight`` -> ``model.layers.*.mlp.up_proj.weight``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def unexpected_tensors(keys: list[str], model: nn.Module,
                       known: dict[str, Any] | set[str]) -> tuple[list[str], list[str]]:
    """Split checkpoint ``keys`` that ``model`` (built from config.json) lacks into (backbone, other).

    ``keys`` are checkpoint keys matched to no tensor of ``model`` (``known``: its state-dict names). A key is in
    the backbone when it lies under the base-model prefix (``model.``, ``bert.``) or, for a checkpoint saved from
    the bare base model, under one of the base model's own submodules (``encoder.``, ``layers.``). Left out, as
    ``transformers`` ignores them when loading: buffers (``position_ids``, rotary ``inv_freq``, the model's own
    buffers), keys matching the class's ``_keys_to_ignore_on_load_unexpected`` (e.g. DeepSeek-V3's multi-token
    prediction layer ``model.layers.61``) and a pooler that the model has none of (token classifiers).
    Backbone tensors beyond those mean config.json describes another model than the weights (e.g. fewer layers);
    ``other`` are tensors outside the backbone (another task's head).
    """
    prefix = getattr(model, "base_model_prefix", "") or ""
    base = getattr(model, prefix, None) if prefix else None
    is_base = not isinstance(base, nn.Module)  # the model is the bare base model (BertModel, LlamaModel)
    children = {n for n, _ in (model if is_base else base).named_children()}
    ignore = [re.compile(p) for p in (getattr(model, "_keys_to_ignore_on_load_unexpected", None) or [])]
    buffers = {_generic(n) for n, _ in model.named_buffers()}
    has_pooler = any(".pooler." in f".{n}." for n in known)
    out: list[str] = []
    other: list[str] = []
    for key in keys:
        under_prefix = bool(prefix) and key.startswith(prefix + ".")
        full = key if is_base or under_prefix else f"{prefix}.{key}"
        if not (under_prefix or key.split(".", 1)[0] in children):
            other.append(key)
            continue
        if key.rsplit(".", 1)[-1] in STALE_BUFFERS or _generic(full) in buffers or _generic(key) in buffers:
            continue
        if any(p.search(key) or p.search(full) for p in ignore):
            continue
        if not has_pooler and ".pooler." in f".{key}":
            continue
        out.append(key)
    return out, other


def config_mismatch(extra: list[str], model: nn.Module, ckpt: Checkpoint) -> InvalidCheckpoint:
    """The 422 for the backbone tensors of :func:`unexpected_tensors`: config.json and the weights disagree, with
    an example, the count and, when they are entries of a layer list beyond its length, the layer counts."""
    cls = type(model).__name__
    hint = ""
    indices: dict[str, list[int]] = {}
    for key in extra:
        m = re.match(r"^(.*?)\.(\d+)\.", key)
        if m:
            indices.setdefault(m.group(1), []).append(int(m.group(2)))
    prefix = getattr(model, "base_model_prefix", "") or ""
    for path, idx in indices.items():
        module = None
        for cand in (path, f"{prefix}.{path}" if prefix else None):
            try:
                module = model.get_submodule(cand) if cand else None
            except AttributeError:
                continue
            if module is not None:
                break
        if isinstance(module, nn.ModuleList) and max(idx) >= len(module):
            cfg = ckpt.config or {}
            text = next((cfg[k] for k in ("text_config", "llm_config", "language_config")
                         if isinstance(cfg.get(k), dict)), cfg)
            declared = next((f"{k} {text[k]}" for k in ("num_hidden_layers", "n_layer", "num_layers")
                             if isinstance(text.get(k), int)), f"{len(module)} entries")
            hint = (f"; config.json declares {declared} but the weights hold {path}.0 to {path}.{max(idx)} "
                    f"({max(idx) + 1} layers)")
            break
    return InvalidCheckpoint(
        f"config.json and the weights disagree: the checkpoint holds {len(extra)} tensor(s) of the backbone that "
        f"{cls}, built from config.json, does not have, e.g. {extra[0]!r}{hint}", field="checkpoint",
        fix="Send the config.json that belongs to these weights (e.g. the right num_hidden_layers), or remove "
            "the extra tensors from the checkpoint.")


# -- new tensors ---------------------------------------------------------------------------------------------
@dataclass
class _Created:
    name: str
    tensor: torch.Tensor
    result: CreatedTensor


def _seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)


def _create(missing: list[str], target: nn.Module, spec: AttachHeadOptions, config, device: torch.device,
            dtype: torch.dtype) -> list[_Created]:
    """Values for the target's tensors the checkpoint lacks: the head (``spec.init``, zero biases) and a
    pooler (the target's ``_init_weights``), in ``dtype``."""
    from transformers.pytorch_utils import Conv1D

    text = _text_config(config)
    init_range = float(getattr(text, "initializer_range", None) or 0.02)
    num_layers = int(getattr(text, "num_hidden_layers", None) or 1)
    prefix = getattr(target, "base_model_prefix", "") or ""
    by_module: dict[str, list[str]] = {}
    for name in missing:
        by_module.setdefault(name.rsplit(".", 1)[0] if "." in name else "", []).append(name)
    created: list[_Created] = []
    for mod_name, names in by_module.items():
        module = target.get_submodule(mod_name)
        in_backbone = bool(prefix) and mod_name.startswith(prefix + ".")
        if not in_backbone and isinstance(module, nn.Linear | Conv1D):
            values = _init_linear(module, mod_name, spec, init_range, num_layers, device)
        else:
            values = _transformers_init(target, mod_name, spec.seed)
        for name in names:
            local = name[len(mod_name) + 1:] if mod_name else name
            t = values[local].to(dtype).cpu().contiguous()
            created.append(_Created(name, t, _describe(name, t, module, mod_name, in_backbone, spec.init, init_range,
                                                       num_layers)))
    return created


def _init_linear(module: nn.Module, mod_name: str, spec: AttachHeadOptions, init_range: float, num_layers: int,
                 device: torch.device) -> dict[str, torch.Tensor]:
    conv1d = not isinstance(module, nn.Linear)  # transformers' Conv1D stores (in, out)
    shape = tuple(module.weight.shape)
    out_f, in_f = (shape[1], shape[0]) if conv1d else shape
    gen = torch.Generator(device=device).manual_seed(_seed(spec.seed, f"{mod_name}.weight"))
    w = torch.empty(out_f, in_f, device=device, dtype=torch.float32)
    WEIGHT_INITS[spec.init](w, WeightInitArgs(generator=gen, initializer_range=init_range, num_layers=num_layers))
    values = {"weight": w.T if conv1d else w}
    if getattr(module, "bias", None) is not None:
        values["bias"] = torch.zeros(module.bias.shape, dtype=torch.float32)
    return values


def _transformers_init(target: nn.Module, mod_name: str, seed: int) -> dict[str, torch.Tensor]:
    """Materialize ``mod_name`` on the CPU and initialize it with the target's ``_init_weights``, as
    ``transformers`` does for weights a checkpoint lacks; the global RNG is seeded and restored."""
    module = target.get_submodule(mod_name)
    module.to_empty(device="cpu")
    for t in [*module.parameters(), *module.buffers()]:
        if hasattr(t, "_is_hf_initialized"):
            delattr(t, "_is_hf_initialized")
    with seeded_global_rng(_seed(seed, mod_name)), torch.no_grad():
        for sub in module.modules():
            if hasattr(sub, "_is_hf_initialized"):
                delattr(sub, "_is_hf_initialized")
            target._init_weights(sub)  # type: ignore[operator]
    return {k: v.detach().float() for k, v in module.state_dict().items()}


def _describe(name: str, t: torch.Tensor, module: nn.Module, mod_name: str, in_backbone: bool, init: str,
              init_range: float, num_layers: int) -> CreatedTensor:
    is_weight = name.endswith("weight") and t.dim() >= 2
    if not is_weight:
        how = "zeros" if name.endswith("bias") else "transformers"
        expected = 0.0 if how == "zeros" else None
    elif in_backbone:
        how = "transformers"
        expected = init_range if isinstance(module, nn.Linear) else None
    else:
        how = init
        fan_out, fan_in = (t.shape[1], t.shape[0]) if not isinstance(module, nn.Linear) else (t.shape[0], t.shape[1])
        expected = expected_std(init, fan_in, fan_out, init_range, num_layers)
    std = float(t.float().std()) if t.numel() > 1 else 0.0
    return CreatedTensor(name=name, shape=list(t.shape), dtype=str(t.dtype).removeprefix("torch."), init=how,
                         std=std, expected_std=expected)


# -- assembling the changes ----------------------------------------------------------------------------------
def _apply(changes: Changes, ckpt: Checkpoint, keys: _Keys, created: list[_Created],
           vocab_changed: list[ChangedTensor]) -> list[ChangedTensor]:
    """Turn drops, renames and new tensors into ``changes``; return the changed tensors (output names)."""
    for d in keys.dropped:
        changes.remove.add(d.name)
        changes.replace.pop(d.name, None)
    for key in ckpt.weight_map:  # source order, so renamed tensors keep their order
        name = keys.mapping.get(key)
        if name is None or name == key:
            continue
        src = changes.replace.pop(key, None) or CopiedTensor(ckpt.info(key), ckpt.path_of(key))
        changes.remove.add(key)
        changes.add[name] = (src, key)
    busy = changes.changed_shards(ckpt)
    shards = list(ckpt.shards)
    shard = next((s for s in reversed(shards) if s in busy), shards[-1])
    anchor = next(k for k, s in ckpt.weight_map.items() if s == shard)
    for c in created:
        changes.add[c.name] = (NewTensor(c.tensor), anchor)
    out = [ChangedTensor(name=keys.mapping.get(c.name, c.name), shape_before=c.shape_before, shape=c.shape)
           for c in vocab_changed]
    out += [ChangedTensor(name=c.name, shape_before=None, shape=list(c.tensor.shape)) for c in created]
    return out


# -- side files ----------------------------------------------------------------------------------------------
def _write_side_files(ckpt: Checkpoint, out: Path, arch: Architecture, model_class: str, id2label: dict[int, str],
                      problem_type: str | None, pad: _Pad, tok) -> None:
    for path in ckpt.other_files():  # small files, copied (never linked) since some are rewritten below
        shutil.copyfile(path, out / path.name)
    config = json.loads(json.dumps(ckpt.config))
    config["architectures"] = [model_class]
    config["id2label"] = {str(i): label for i, label in id2label.items()}
    config["label2id"] = {label: i for i, label in id2label.items()}
    if "num_labels" in config:
        config["num_labels"] = len(id2label)
    if problem_type is None:
        config.pop("problem_type", None)
    else:
        config["problem_type"] = problem_type
    text = config[arch.text_config_key] if arch.text_config_key else config
    if pad.info is not None:
        config["pad_token_id"] = pad.info.id
        text["pad_token_id"] = pad.info.id
    if pad.rows_after != arch.vocab_rows:
        text["vocab_size"] = pad.rows_after
    (out / "config.json").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tok is None or pad.info is None or pad.info.token is None:
        return
    if pad.tokenizer_grew:
        tok.pad_token = pad.info.token
        tok.save_pretrained(str(out))
    if tok.pad_token != pad.info.token or pad.tokenizer_grew:
        _set_pad_in_tokenizer_files(out, pad.info.token)


def _set_pad_in_tokenizer_files(out: Path, token: str) -> None:
    """Write ``pad_token`` into ``tokenizer_config.json`` (created if absent) and ``special_tokens_map.json``."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = out / name
        if not path.is_file() and name == "special_tokens_map.json":
            continue
        doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        doc["pad_token"] = token
        path.unlink(missing_ok=True)  # never write through a link to the source's file
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
