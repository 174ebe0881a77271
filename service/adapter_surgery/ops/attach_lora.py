"""Attach a LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as ``peft`` saves them.

How it works
------------
The checkpoint's ``transformers`` model is built on the ``meta`` device (no storage, from ``config.json`` alone) and
``peft``'s own :class:`peft.tuners.lora.LoraModel` injects the adapter into it, so that target matching
(``target_modules``, ``"all-linear"``, ``exclude_modules``, ``layers_to_transform``), per-module ranks
(``rank_pattern``/``alpha_pattern``), the LoRA layers and every ``init_lora_weights`` value run ``peft``'s code, in
``peft``'s order, drawing from the global RNG as ``get_peft_model`` does after ``torch.manual_seed(seed)``. Only one
hook differs (``_create_and_replace``): while ``peft`` builds the adapter of one target, that target's base weight
is given to it, and taken back right after:

- data-free inits (``true``, ``"gaussian"``, ``"orthogonal"``) get a zero-storage stand-in of the right shape and
  dtype (``torch.empty(()).expand(shape)``): ``peft`` reads only its device and dtype, the checkpoint's tensor data is
  never read (``base_bytes_read`` is 0);
- inits that need the base weight (``pissa``, ``pissa_niter_N``, ``olora``, and ``use_dora``) get the real tensor,
  read from the checkpoint one target at a time onto ``device`` (``peft`` computes in float32); a changed base weight
  (PiSSA, OLoRA) is written at once at its offset in the residual base's shard (created beforehand with every other
  tensor copied and room for the targets) and the tensor freed, so at most one target is in memory and each residual
  byte is written once.

The adapter tensors are then taken from ``peft``'s ``get_peft_model_state_dict`` (keys
``base_model.model.<module>.lora_A.weight``, no adapter-name segment; DoRA's ``lora_magnitude_vector``) and written
with ``safetensors`` and ``{"format": "pt"}`` metadata, as ``PeftModel.save_pretrained`` does. Tensors ``peft``
copies from the base (``trainable_token_indices`` rows, ``modules_to_save`` modules, biases with ``bias="all"``)
are read from the checkpoint, and only those.

Initializations (``peft.tuners.lora.layer.LoraLayer``)
-----------------------------------------------------
- ``true``: A ~ Kaiming-uniform with a = sqrt(5), i.e. U(-1/sqrt(in), 1/sqrt(in)), B = 0 (Hu et al. 2021, "LoRA:
  Low-Rank Adaptation of Large Language Models"; ``reset_lora_parameters``).
- ``"gaussian"``: A ~ N(0, 1/r^2), B = 0 (``reset_lora_parameters``).
- ``"orthogonal"``: A and B from the odd and even rows of a random orthogonal r x r matrix, / 10, so that B A = 0
  while neither is 0; r must be even (``orthogonal_init``). peft casts both to the base dtype, so B A is 0 only up
  to that rounding.
- ``"pissa"`` / ``"pissa_niter_N"``: the top-r singular triplets of W, A = sqrt(S/s) V^T, B = U sqrt(S/s), base
  W - s B A (Meng et al. 2024, "PiSSA: Principal Singular Values and Singular Vectors Adaptation"; exact SVD, or
  ``torch.svd_lowrank`` with N power iterations; ``pissa_init``).
- ``"olora"``: W = Q R, B = Q[:, :r], A = R[:r], base W - s B A (Büyükakyüz 2024, "OLoRA: Orthonormal Low-Rank
  Adaptation"; ``olora_init``). ``peft``'s ``olora_init`` factors the stored matrix as is, which for GPT-2's Conv1D
  (stored (in, out)) gives A and B the wrong shapes; here Conv1D targets are factored as (out, in), as PiSSA does.
- ``use_dora``: a magnitude vector m = ||W + s B A||_row (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank
  Adaptation"; ``DoraLinearLayer.update_layer``). DoRA computes its scale m / ||W + s B A|| at run time from
  the base as loaded, so m must be the norm of that base to start as an identity. The service computes m as peft
  does on the base loaded in float32: peft gets the targeted weights in float32 (exact column norms of the stored
  values; A and B then stay unrounded too), and for PiSSA/OLoRA m is recomputed from the residual as written to
  ``base/``. m is stored in ``dtype`` (float32 by default). So a DoRA adapter at init is an exact identity on the
  base loaded in float32 (training pipelines, fp32 master weights), with the same tensors as ``peft``'s own
  ``get_peft_model`` there, and within half-precision rounding on a base loaded in bf16/fp16. (Building it on the
  bf16 model as loaded rounded m to bf16: up to 0.09 logits off on SmolLM2-135M loaded in float32.) Other inits
  see the weights in the dtype ``from_pretrained`` gives them, as ``get_peft_model`` on the stored dtype.
- ``use_rslora``: s = alpha / sqrt(r) instead of alpha / r (Kalajdzievski 2023, "A Rank Stabilization Scaling
  Factor for Fine-Tuning with LoRA").

PiSSA and OLoRA change the base: the residual W - s B A of each target is written (in the stored dtype) into
``<output>/base/`` by the streaming writer, every other shard linked; ``base_model_name_or_path`` points at it and
the saved ``init_lora_weights`` is ``true``, so that loading does not decompose again (``peft``'s own advice for
saving PiSSA/OLoRA adapters). That residual base is valid only with this adapter.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import os
import re
import shutil
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, Field, StringConstraints, field_validator
from torch import nn

from adapter_surgery import patterns, resources
from adapter_surgery.arch import Architecture, build_meta_model, resolve_architecture
from adapter_surgery.devices import DeviceName, pick_device
from adapter_surgery.errors import InvalidCheckpoint, InvalidSpec
from adapter_surgery.initializers import seeded_global_rng
from adapter_surgery.io import Checkpoint, atomic_output, describe_files
from adapter_surgery.io.atomic import check_output_path
from adapter_surgery.io.header import TORCH_TO_SAFETENSORS, TensorInfo
from adapter_surgery.io.writer import (
    Changes,
    ReservedTensor,
    WrittenFile,
    sha256_of,
    tensor_bytes,
    write_checkpoint,
)
from adapter_surgery.ops.attach_head import config_mismatch, unexpected_tensors, without_dirs
from adapter_surgery.ops.common import FileInfo, PathFields, RunContext, Seed, StrictModel
from adapter_surgery.paths import resolve_under

ADAPTER_NAME = "default"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
RESIDUAL_DIR = "base"
#: Inits that read nothing but the headers.
DATA_FREE_INITS = ("true", "gaussian", "orthogonal")
#: Inits that need data, gradients or quantization the service does not have, with the reason.
REFUSED_INITS = {
    "eva": "EVA derives A from the SVD of each layer's input activations, so it needs forward passes over your "
           "training data (peft's initialize_lora_eva_weights with a dataloader); the service has no data.",
    "corda": "CorDA builds A and B from input covariance collected by running calibration data through the model "
             "(peft's preprocess_corda); the service has no data.",
    "loftq": "LoftQ alternates quantizing the base weights with an SVD of the quantization error, so it needs a "
             "quantization backend and produces a quantized base, which the service does not write.",
    "lora_ga": "LoRA-GA initializes A and B from gradients estimated on training batches (peft's "
               "preprocess_loraga), which need data and a backward pass.",
}
FLOAT_STORAGE = ("F32", "F16", "BF16")
ADAPTER_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PISSA = re.compile(r"^pissa(_niter_(\d+))?$")
#: peft's global-RNG draws and the set-up of ``warnings`` are process-wide: one attach-lora at a time.
_LOCK = threading.Lock()
#: Extra ``modules_to_save`` that ``PeftModelFor<Task>.__init__`` adds (peft/peft_model.py).
TASK_MODULES_TO_SAVE = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
                        "QUESTION_ANS": ["qa_outputs"]}
TargetModules = list[str] | str


#: Largest LoRA rank, pissa_niter_N, list lengths, token ids accepted by the request model.
MAX_RANK = 1 << 16
MAX_PISSA_NITER = 64
MAX_NAMES = 1024
MAX_LAYERS = 1024
MAX_TOKEN_IDS = 1 << 20
Name = Annotated[str, StringConstraints(max_length=1000)]
Names = Annotated[list[Name], Field(max_length=MAX_NAMES)] | Name
LayerIndex = Annotated[int, Field(ge=0, lt=MAX_LAYERS)]
TokenIds = Annotated[list[Annotated[int, Field(ge=0, lt=1 << 26)]], Field(max_length=MAX_TOKEN_IDS)]


class AttachLoraOptions(StrictModel):
    """The adapter (everything but the paths). Field names and defaults are ``peft.LoraConfig``'s."""

    r: int = Field(8, le=MAX_RANK, description="LoRA rank: A is (r, in_features), B is (out_features, r). 1 <= r <= "
                                               "min(in, out) of every target (and <= 65536).")
    lora_alpha: float = Field(8, gt=0, allow_inf_nan=False,
                              description="Scaling numerator: s = lora_alpha / r (or / sqrt(r) with use_rslora); > 0.")
    lora_dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on the LoRA input during training.")
    target_modules: Names | None = Field(
        None, description="Module names or suffixes (e.g. ['q_proj', 'v_proj']), a regex string matched against "
                          "full names, or 'all-linear' (every Linear/Conv1D but the output head). None: peft's "
                          "default for the model type.")
    exclude_modules: Names | None = Field(None, description="Names/suffixes or a regex of modules to skip.")
    layers_to_transform: Annotated[list[LayerIndex], Field(max_length=MAX_LAYERS)] | LayerIndex | None = Field(
        None, description="Only these layer indices (0..1023).")
    layers_pattern: Names | None = Field(None, description="Name of the layer list for layers_to_transform "
                                                           "(e.g. 'layers'); None: any.")
    rank_pattern: dict[Name, Annotated[int, Field(le=MAX_RANK)]] = Field(
        default_factory=dict, max_length=MAX_NAMES, description="Regex of a module name -> its rank (1..65536).")
    alpha_pattern: dict[Name, Annotated[float, Field(gt=0, allow_inf_nan=False)]] = Field(
        default_factory=dict, max_length=MAX_NAMES, description="Regex of a module name -> its lora_alpha (> 0).")
    bias: Literal["none", "all", "lora_only"] = Field("none", description="Which biases are trained (and saved).")
    use_rslora: bool = Field(False, description="Rank-stabilized scaling lora_alpha / sqrt(r) (Kalajdzievski 2023).")
    use_dora: bool = Field(False, description="Weight-decomposed LoRA (Liu et al. 2024): reads the targeted weights.")
    init_lora_weights: bool | str = Field(
        True, description="true (Kaiming-uniform A, zero B), 'gaussian', 'orthogonal' (even r): headers only. "
                          "'pissa', 'pissa_niter_N' (1 <= N <= 64), 'olora': read the targeted weights and also "
                          "write a residual base into <output>/base.")
    modules_to_save: Annotated[list[Name], Field(max_length=MAX_NAMES)] | None = Field(
        None, description="Modules trained in full and saved with the adapter (e.g. ['embed_tokens', 'lm_head']).")
    trainable_token_indices: TokenIds | dict[Name, TokenIds] | None = Field(
        None, description="Token ids whose embedding rows are trained (e.g. the ids /extend-vocab added); a dict "
                          "maps embedding module names to ids.")
    ensure_weight_tying: bool | None = Field(
        None, description="Keep tied embedding/head copies tied (peft's ensure_weight_tying). None: on when the "
                          "model ties them and modules_to_save names one of them.")
    seed: Seed = Field(0, description="torch.manual_seed before peft initializes; same seed, identical files.")
    dtype: Literal["float32", "bfloat16", "float16"] = Field(
        "float32", description="dtype of the adapter tensors (lora_A/B, magnitude, trainable token rows).")
    device: DeviceName = Field("auto", description="Where inits that read weights compute: auto (GPU when "
                                                   "present), cpu, cuda.")


    _safe_patterns = field_validator("target_modules", "exclude_modules", "layers_pattern", "rank_pattern",
                                     "alpha_pattern")(patterns.checked)

    @field_validator("init_lora_weights")
    @classmethod
    def _bounded_niter(cls, value: bool | str) -> bool | str:
        m = PISSA.match(value.lower()) if isinstance(value, str) else None
        if m and m.group(2) is not None and int(m.group(2)) > MAX_PISSA_NITER:
            raise ValueError(f"init_lora_weights 'pissa_niter_N' takes at most N = {MAX_PISSA_NITER} power "
                             f"iterations (got {m.group(2)}; peft's usual value is 4)")
        return value


class AttachLoraSpec(PathFields, AttachLoraOptions):
    """The full ``POST /attach-lora`` request."""


class TargetModule(BaseModel):
    name: str = Field(description="Full module name, e.g. model.layers.0.self_attn.q_proj.")
    kind: Literal["linear", "conv1d"]
    in_features: int
    out_features: int
    weight_dtype: str = Field(description="Stored dtype of the base weight.")
    r: int
    lora_alpha: float
    scaling: float
    lora_A: list[int] = Field(description="Shape of lora_A.weight: (r, in_features).")
    lora_B: list[int] = Field(description="Shape of lora_B.weight: (out_features, r).")


class ResidualBase(BaseModel):
    path: str = Field(description="The residual base, relative to the data directory.")
    replaced_tensors: list[str]
    rewritten_shards: list[FileInfo]
    linked_shards: list[str] = Field(description="Shards linked (or copied) unchanged from the checkpoint.")
    note: str


class AttachLoraResult(BaseModel):
    output: str
    task_type: str | None
    base_model_name_or_path: str = Field(description="The base this adapter belongs to (the residual base for "
                                                     "PiSSA/OLoRA), relative to the data directory.")
    adapter_files: list[FileInfo]
    target_modules: list[TargetModule]
    trainable_parameters: int = Field(description="Elements of every tensor in adapter_model.safetensors.")
    base_bytes_read: int = Field(description="Bytes of base tensor data read (0 for data-free inits).")
    residual_base: ResidualBase | None
    warnings: list[str]
    seconds: float


@dataclass
class _Target:
    """One module peft will adapt: its weight's checkpoint key, header entry and rank."""

    name: str
    kind: Literal["linear", "conv1d"]
    in_features: int
    out_features: int
    key: str
    info: TensorInfo
    r: int


def attach_lora(spec: AttachLoraSpec, ctx: RunContext) -> AttachLoraResult:
    """Run ``spec``: write a ``peft`` LoRA adapter for the checkpoint (and a residual base for PiSSA/OLoRA).

    Shapes: per target, ``lora_A.weight`` (r, in), ``lora_B.weight`` (out, r), DoRA ``lora_magnitude_vector`` (out,),
    for Linear and Conv1D alike (Conv1D stores its weight (in, out); ``fan_in_fan_out`` is set). Dtypes: adapter
    tensors in ``spec.dtype`` (default float32, as ``peft`` upcasts them), copies of base modules in the base dtype,
    a residual base in the stored dtypes. Arithmetic on base weights is float32 on ``spec.device``.

    Raises:
        NotFound, PathOutsideDataDir, OutputExists: path problems.
        InvalidCheckpoint: no usable config.json, a target's weight is missing or has another shape, or the
            weights hold layers config.json does not declare (the adapter would leave them out).
        InvalidSpec: targets that match nothing, a ``target_modules`` list entry that matches no module (field
            ``target_modules.<i>``), targets that are not Linear/Conv1D, r < 1 or r > min(in, out), lora_alpha or
            an alpha_pattern value not > 0 and finite, an unsupported init, fp8/quantized targets, out-of-range
            token ids, a LoraConfig peft refuses. Nothing is written.
    """
    started = time.perf_counter()
    checkpoint = resolve_under(ctx.data_dir, spec.checkpoint, "checkpoint")
    output = resolve_under(ctx.data_dir, spec.output, "output")
    check_output_path(output, checkpoint, spec.overwrite)
    init = _check_init(spec)
    decompose = init not in DATA_FREE_INITS
    needs_weights = decompose or spec.use_dora
    device = pick_device(spec.device)  # validated always; data-free inits compute on the CPU (nothing to move)
    if not needs_weights:
        device = torch.device("cpu")
    ckpt = Checkpoint.open(checkpoint)
    if ckpt.is_file or ckpt.config is None:
        raise InvalidCheckpoint(f"attach-lora needs the model directory with its config.json ({ckpt.config_problem})",
                                field="checkpoint", fix="Send the save_pretrained directory, config.json included.")
    arch = resolve_architecture(ckpt, ctx.architectures)
    model = _meta_model(ckpt)
    task_type = _task_type(type(model).__name__)
    config = _lora_config(spec, init, task_type, arch)
    warnings_out = list(ckpt.warnings) + arch.notes
    warnings_out += _check_weights_fit_config(ckpt, model, arch)
    targets = _plan(config, model, ckpt, arch, spec, warnings_out)
    _check_memory(targets, init, spec, needs_weights, ctx.memory_limit_bytes)
    base_path = f"{spec.output.rstrip('/')}/{RESIDUAL_DIR}" if decompose else spec.checkpoint
    ctx.say(f"{len(targets)} target modules, init {init}")

    threads = torch.get_num_threads() if needs_weights else 1
    with _LOCK, _rng(spec.seed, device), _intra_op_threads(threads), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with atomic_output(output, spec.overwrite, owner=ctx.owner) as tmp:
            tmp.mkdir(parents=True)
            spill = _Residuals(ckpt, targets, tmp / RESIDUAL_DIR, ctx) if decompose else None
            materializer = _Materializer(ckpt, targets, device, init, spill)
            tuner = _inject(model, config, materializer)
            ctx.say("adapter initialized")
            state = _state_dict(tuner, ckpt, arch, ADAPTER_DTYPES[spec.dtype])
            _save_adapter(tmp, state, tuner.peft_config[ADAPTER_NAME], base_path, task_type, type(model), decompose)
            residual = None
            if spill is not None:
                residual = _residual_base(ckpt, spill, base_path)
            files = [f for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) for f in describe_files(tmp / name)]
            modules = _describe_targets(tuner, targets)
    warnings_out += _peft_warnings(caught)
    if residual is not None:
        warnings_out.append(residual.note)
    return AttachLoraResult(
        output=spec.output, task_type=task_type, base_model_name_or_path=base_path,
        adapter_files=[FileInfo.of(f) for f in files], target_modules=modules,
        trainable_parameters=sum(t.numel() for t in state.values()), base_bytes_read=ckpt.bytes_read,
        residual_base=residual, warnings=list(dict.fromkeys(without_dirs(w, ctx.data_dir) for w in warnings_out)),
        seconds=round(time.perf_counter() - started, 4))


# -- request checks -------------------------------------------------------------------------------------------
def _check_memory(targets: list[_Target], init: str, spec: AttachLoraSpec, needs_weights: bool,
                  limit: int | None) -> None:
    """Refuse (503) before any weight is read when the adapter (float32, peft's copy and the saved one) plus the
    largest target's factorization (:func:`adapter_surgery.resources.decomposition_bytes`) cannot fit."""
    adapter = sum(2 * 4 * t.r * (t.in_features + t.out_features) for t in targets)
    one = max((resources.decomposition_bytes(t.out_features, t.in_features, t.r, init if init not in DATA_FREE_INITS
                                             else "dora") for t in targets), default=0) if needs_weights else 0
    field = "r" if adapter >= one else ("init_lora_weights" if init not in DATA_FREE_INITS else "use_dora")
    resources.require(adapter + one, field=field, available=resources.available_memory(limit),
                      what=f"an adapter on {len(targets)} target(s)" + (f" with init {init}" if needs_weights else ""),
                      fix="Lower r (or rank_pattern), target fewer modules, use 'pissa_niter_N' instead of an exact "
                          "'pissa', or give the service more memory.")


def _check_init(spec: AttachLoraSpec) -> str:
    """The init's canonical name: ``true``, ``gaussian``, ``orthogonal``, ``pissa``, ``pissa_niter_N``, ``olora``."""
    value = spec.init_lora_weights
    if value is True:
        return "true"
    if value is False:
        raise InvalidSpec("init_lora_weights false leaves B random, so the adapter would not start as an identity",
                          field="init_lora_weights", fix="Send true (Kaiming-uniform A, zero B) or 'gaussian'.")
    name = value.lower()
    supported = "true, 'gaussian', 'orthogonal', 'pissa', 'pissa_niter_N', 'olora'"
    refused = next((k for k in REFUSED_INITS if name == k or name.startswith(k + "_")), None)
    if refused is not None:
        raise InvalidSpec(f"init_lora_weights {value!r} is not supported: {REFUSED_INITS[refused]}",
                          field="init_lora_weights", fix=f"Use one of {supported}.")
    if name in ("gaussian", "orthogonal", "olora") or PISSA.match(name):
        if name.startswith("pissa_niter_") and int(name.rsplit("_", 1)[1]) < 1:
            raise InvalidSpec("pissa_niter_N needs N >= 1 power iterations", field="init_lora_weights",
                              fix="Send 'pissa_niter_4' (peft's usual value) or 'pissa' for an exact SVD.")
        if name == "orthogonal":
            bad = [r for r in [spec.r, *spec.rank_pattern.values()] if r % 2]
            if bad:
                raise InvalidSpec(f"init_lora_weights 'orthogonal' needs an even rank; got r={bad[0]}",
                                  field="r" if spec.r % 2 else "rank_pattern",
                                  fix="Use an even r (it splits one r x r orthogonal matrix between A and B).")
        return name
    raise InvalidSpec(f"init_lora_weights {value!r} is not one this service supports", field="init_lora_weights",
                      fix=f"Use one of {supported}.")


def _meta_model(ckpt: Checkpoint) -> nn.Module:
    """The checkpoint's model on the meta device, in the dtype ``from_pretrained`` (dtype 'auto') would load."""
    model, problem = build_meta_model(ckpt)
    if model is None:
        raise InvalidCheckpoint(f"the model cannot be built from config.json ({problem})", field="checkpoint",
                                fix="attach-lora needs a config.json that transformers can instantiate.")
    return model.to(_model_dtype(ckpt))


def _model_dtype(ckpt: Checkpoint) -> torch.dtype:
    """config's ``dtype``/``torch_dtype``, else the first floating tensor's, as ``from_pretrained(dtype='auto')``."""
    cfg = ckpt.config or {}
    for key in ("dtype", "torch_dtype"):
        value = cfg.get(key)
        if isinstance(value, str) and isinstance(getattr(torch, value, None), torch.dtype):
            dt = getattr(torch, value)
            if dt.is_floating_point:
                return dt
    for name in ckpt.weight_map:
        dt = ckpt.info(name).torch_dtype
        if dt is not None and dt.is_floating_point and ckpt.info(name).dtype in FLOAT_STORAGE:
            return dt
    return torch.float32


def _task_type(class_name: str) -> str | None:
    """peft's task_type for a transformers class (``LlamaForCausalLM`` -> ``CAUSAL_LM``); None for others (MLM)."""
    from transformers.models.auto import modeling_auto as auto

    def names(mapping: dict) -> set[str]:
        out: set[str] = set()
        for v in mapping.values():
            out.update(v if isinstance(v, (list, tuple)) else [v])
        return out

    for task, mapping in (("CAUSAL_LM", auto.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES),
                          ("SEQ_2_SEQ_LM", auto.MODEL_FOR_SEQ_TO_SEQ_CAUSAL_LM_MAPPING_NAMES),
                          ("SEQ_CLS", auto.MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES),
                          ("TOKEN_CLS", auto.MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES),
                          ("QUESTION_ANS", auto.MODEL_FOR_QUESTION_ANSWERING_MAPPING_NAMES),
                          ("FEATURE_EXTRACTION", auto.MODEL_MAPPING_NAMES)):
        if class_name in names(mapping):
            return task
    if class_name.endswith(("ForCausalLM", "LMHeadModel")):
        return "CAUSAL_LM"
    return None


def _lora_config(spec: AttachLoraSpec, init: str, task_type: str | None, arch: Architecture):
    """``peft.LoraConfig`` from the request (``init`` canonical); peft's validation errors become 422s naming the
    field."""
    from peft import LoraConfig

    for key, r in spec.rank_pattern.items():
        if r < 1:
            raise InvalidSpec(f"rank_pattern[{key!r}] is {r}; a LoRA rank must be at least 1",
                              field=f"rank_pattern.{key}", fix="Send a rank >= 1.")
    if spec.r < 1:
        raise InvalidSpec(f"r is {spec.r}; a LoRA rank must be at least 1", field="r",
                          fix="Send r >= 1 (8 or 16 are common).")
    # the request model refuses these already; checked again for specs built without validation
    for where, alpha in [("lora_alpha", spec.lora_alpha), *((f"alpha_pattern.{k}", a)
                                                            for k, a in spec.alpha_pattern.items())]:
        if not (math.isfinite(alpha) and alpha > 0):
            raise InvalidSpec(f"{where} is {alpha}; the LoRA scaling lora_alpha / r must be a positive finite "
                              "number", field=where, fix="Send a positive lora_alpha (commonly r or 2 r).")
    modules_to_save = list(spec.modules_to_save) if spec.modules_to_save is not None else None
    if task_type in TASK_MODULES_TO_SAVE:
        modules_to_save = (modules_to_save or []) + TASK_MODULES_TO_SAVE[task_type]
    tying = spec.ensure_weight_tying
    if tying is None:
        names = {n.rsplit(".", 1)[0].rsplit(".", 1)[-1] for n in (arch.input_embedding, arch.head_param or "")}
        tying = arch.tied and any(m.rsplit(".", 1)[-1] in names for m in spec.modules_to_save or [])
    kwargs = {
        "r": spec.r, "lora_alpha": spec.lora_alpha, "lora_dropout": spec.lora_dropout,
        "target_modules": spec.target_modules, "exclude_modules": spec.exclude_modules,
        "layers_to_transform": spec.layers_to_transform, "layers_pattern": spec.layers_pattern,
        "rank_pattern": dict(spec.rank_pattern), "alpha_pattern": dict(spec.alpha_pattern), "bias": spec.bias,
        "use_rslora": spec.use_rslora, "use_dora": spec.use_dora, "init_lora_weights": True if init == "true" else init,
        "modules_to_save": modules_to_save, "trainable_token_indices": spec.trainable_token_indices,
        "ensure_weight_tying": tying, "task_type": task_type,
    }
    if isinstance(kwargs["lora_alpha"], float) and kwargs["lora_alpha"].is_integer():
        kwargs["lora_alpha"] = int(kwargs["lora_alpha"])
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return LoraConfig(**kwargs)
    except (ValueError, TypeError) as exc:
        text = str(exc)
        named = [(text.index(f"`{f}`"), f) for f in kwargs if f"`{f}`" in text]  # the first field the message names
        named += [(m.start(), f) for f in kwargs if len(f) > 1 and (m := re.search(rf"\b{f}\b", text))]
        field = min(named)[1] if named else None
        raise InvalidSpec(f"peft refuses this LoRA configuration: {text}", field=field,
                          fix="Change the named field as the message says.") from None


def _linear_names(arch: Architecture) -> list[str]:
    """Short names of the Linear/Conv1D modules, in model order (q_proj, k_proj, ...)."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in arch.linear_modules))


def _generic(name: str) -> str:
    """``model.layers.3.self_attn.k_proj`` -> ``model.layers.*.self_attn.k_proj``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def _check_weights_fit_config(ckpt: Checkpoint, model: nn.Module, arch: Architecture) -> list[str]:
    """Refuse a config.json that describes fewer layers (or other repeated blocks) than the weights hold.

    peft adapts only the modules config.json builds, so the adapter would silently leave the other layers out.
    Backbone tensors the model lacks although it has the same tensor at other indices
    (``model.layers.25.mlp.up_proj.weight`` for a 20-layer model) are a 422 with attach-head's wording; buffers and
    keys ``transformers`` ignores on loading are fine (attach-head's rule). Other tensors the model lacks (another
    head; names ``transformers`` converts on loading, such as v4 MoE expert weights or ``LayerNorm.gamma``) only
    get a warning: the adapter, keyed by module names, does not depend on them.
    """
    names = set(model.state_dict())
    prefix = getattr(model, "base_model_prefix", "") or ""
    unknown = [k for k in ckpt.weight_map if k not in arch.redundant_keys and _ckpt_name(k, names, prefix) is None
               and arch.keys.model_name(k) not in names]  # another layout (LLaVA's language_model.model.*)
    if not unknown:
        return []
    extra, other = unexpected_tensors(unknown, model, names)
    kinds = {_generic(n) for n in names}
    repeated = [k for k in extra if _generic(k) in kinds or (prefix and _generic(f"{prefix}.{k}") in kinds)]
    if repeated:
        raise config_mismatch(repeated, model, ckpt)
    ignored = [k for k in unknown if k in set(extra) | set(other)]
    if not ignored:
        return []
    return [f"{len(ignored)} checkpoint tensor(s) are not part of {type(model).__name__} as config.json builds it "
            f"(e.g. {ignored[0]!r}); transformers ignores (or converts) them when loading, and the adapter does not "
            "target them"]


def _ckpt_name(key: str, names: set[str], prefix: str) -> str | None:
    """The model's name for checkpoint ``key`` (as is, or with the base-model prefix added or removed)."""
    candidates = [key, f"{prefix}.{key}"] if prefix else [key]
    if prefix and key.startswith(prefix + "."):
        candidates.append(key[len(prefix) + 1:])
    return next((c for c in candidates if c in names), None)


def _check_entries(config, model: nn.Module, spec: AttachLoraSpec, names: list[str], notes: list[str]) -> None:
    """Every ``target_modules`` list entry must name a module (peft ignores a typo silently when another entry
    matches); ``exclude_modules`` entries that match nothing get a warning. Regex strings and ``"all-linear"`` keep
    peft's semantics (checked as a whole by the caller)."""
    import difflib

    keys = [k for k, _ in model.named_modules() if k]
    cls = type(model).__name__

    def matches(entry: str) -> bool:
        if any(k == entry or k.endswith(f".{entry}") for k in keys):
            return True
        cfg = copy.deepcopy(config)  # an old (transformers v4) MoE name the v5 conversion maps: valid
        cfg.target_modules, cfg.exclude_modules = {entry}, None
        with contextlib.suppress(Exception):
            from peft.utils.transformers_weight_conversion import (
                convert_peft_config_for_transformers,
                get_model_conversion_mapping,
            )

            convert_peft_config_for_transformers(cfg, model=model, conversions=get_model_conversion_mapping(model))
        return set(cfg.target_modules or ()) != {entry} or bool(getattr(cfg, "target_parameters", None))

    listing = ", ".join(names)
    if isinstance(spec.target_modules, list):
        for i, entry in enumerate(spec.target_modules):
            if matches(entry):
                continue
            close = difflib.get_close_matches(entry, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidSpec(f"target_modules entry {entry!r} matches no module of this {cls}{hint}; its "
                              f"Linear/Conv1D modules are: {listing}", field=f"target_modules.{i}",
                              fix=f"Correct or remove {entry!r}: use names from {listing} (a module name or a "
                                  "dotted suffix of one), or send 'all-linear'.")
    if isinstance(spec.exclude_modules, list):
        for i, entry in enumerate(spec.exclude_modules):
            if not any(k == entry or k.endswith(f".{entry}") for k in keys):
                notes.append(f"exclude_modules entry {i} ({entry!r}) matches no module of this {cls}, so it "
                             "excludes nothing")


def _plan(config, model: nn.Module, ckpt: Checkpoint, arch: Architecture, spec: AttachLoraSpec,
          notes: list[str]) -> list[_Target]:
    """The modules peft will adapt, matched with peft's own functions on a copy of the config, all checked.

    Mirrors ``BaseTuner.inject_adapter``'s matching (default targets per model type, the transformers-v5 config
    conversion, ``"all-linear"``, ``check_target_module_exists``, ``rank_pattern`` via ``get_pattern_key``) so that
    every refusal happens before any tensor is read or file written. Warnings go to ``notes``.
    """
    from peft.tuners.tuners_utils import _maybe_include_all_linear_layers, check_target_module_exists
    from peft.utils.constants import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
    from peft.utils.other import get_pattern_key
    from transformers.pytorch_utils import Conv1D

    cfg = copy.deepcopy(config)
    names = _linear_names(arch)
    listing = ", ".join(names)
    _check_entries(config, model, spec, names, notes)
    model_type = getattr(model.config, "model_type", None)
    if cfg.target_modules is None:
        default = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type)
        if default is None:
            raise InvalidSpec(f"peft has no default target_modules for model type {model_type!r}",
                              field="target_modules", fix=f"Name the modules to adapt, from: {listing}; "
                                                          "or send 'all-linear'." + _text_only_hint(arch, names))
        cfg.target_modules = default if isinstance(default, str) else set(default)
    with contextlib.suppress(Exception):  # peft skips the conversion when it cannot apply it, so do we
        from peft.utils.transformers_weight_conversion import (
            convert_peft_config_for_transformers,
            get_model_conversion_mapping,
        )

        convert_peft_config_for_transformers(cfg, model=model, conversions=get_model_conversion_mapping(model))
    cfg = _maybe_include_all_linear_layers(cfg, model)
    matched: list[tuple[str, nn.Module]] = []
    for key, module in model.named_modules():
        if not key:
            continue
        try:
            found = check_target_module_exists(cfg, key)
        except re.error as exc:
            raise InvalidSpec(f"target_modules/exclude_modules is not a valid regular expression ({exc})",
                              field="target_modules", fix="Fix the pattern, or send a list of names.") from None
        if found:
            matched.append((key, module))
    if not matched and spec.layers_to_transform is not None and not spec.exclude_modules:
        layers = getattr(model.config.get_text_config(), "num_hidden_layers", None)
        raise InvalidSpec(f"layers_to_transform {spec.layers_to_transform!r} leaves no module of target_modules "
                          f"to adapt (the model has {layers} layers)", field="layers_to_transform",
                          fix=f"Use layer indices from 0 to {layers - 1}." if layers else
                              "Use the model's layer indices, or drop layers_to_transform.")
    if not matched:
        what = spec.target_modules if spec.target_modules is not None else sorted(cfg.target_modules)
        extra = " after exclude_modules/layers_to_transform" if (spec.exclude_modules or
                                                                spec.layers_to_transform is not None) else ""
        raise InvalidSpec(f"target_modules {what!r} match no module of this {type(model).__name__}{extra}; its "
                          f"Linear/Conv1D modules are: {listing}", field="target_modules",
                          fix=f"Use names from: {listing} (e.g. [{', '.join(repr(n) for n in names[:2])}]), "
                              "or 'all-linear'.")
    targets: list[_Target] = []
    prefix = getattr(model, "base_model_prefix", "") or ""
    for key, module in matched:
        if isinstance(module, nn.Linear):
            kind, n_in, n_out = "linear", module.in_features, module.out_features
            shape = (n_out, n_in)
        elif isinstance(module, Conv1D):
            kind, (n_in, n_out) = "conv1d", module.weight.shape
            shape = (n_in, n_out)
        else:
            hint = (" For embeddings, send trainable_token_indices (new token rows) or modules_to_save."
                    if isinstance(module, nn.Embedding) else "")
            raise InvalidSpec(f"target_modules matches {key} ({type(module).__name__}), which is not a Linear or "
                              f"Conv1D layer; LoRA is attached to those only.{hint}", field="target_modules",
                              fix=f"Target Linear/Conv1D names: {listing}.")
        try:
            r_key = get_pattern_key(cfg.rank_pattern.keys(), key)
            get_pattern_key(cfg.alpha_pattern.keys(), key)
        except re.error as exc:
            raise InvalidSpec(f"a rank_pattern/alpha_pattern key is not a valid regular expression ({exc})",
                              field="rank_pattern", fix="Use module names such as 'k_proj' or valid regexes.") \
                from None
        r = cfg.rank_pattern.get(r_key, cfg.r)
        limit = min(n_in, n_out)
        if r > limit:
            field = f"rank_pattern.{r_key}" if r_key in cfg.rank_pattern else "r"
            raise InvalidSpec(f"r={r} is larger than min(in_features, out_features) = {limit} of "
                              f"{_generic(key)} (in {n_in}, out {n_out}); a rank above that adds no expressive "
                              "power and some loaders refuse it", field=field,
                              fix=f"Send r <= {limit}, or a rank_pattern entry for {key.rsplit('.', 1)[-1]!r} "
                                  f"with at most {limit}, or leave that module out of target_modules.")
        wkey = _ckpt_key(ckpt, f"{key}.weight", prefix, arch)
        if wkey is None:
            raise InvalidCheckpoint(f"the checkpoint has no weight for target {key} (expected {key}.weight)",
                                    field="checkpoint", fix="Check that config.json belongs to these weights.")
        info = ckpt.info(wkey)
        if info.dtype not in FLOAT_STORAGE:
            what = "fp8" if info.dtype.startswith("F8") else "a quantized/integer format"
            raise InvalidSpec(f"target {key} is stored in {what} ({info.dtype}); peft's LoRA layers for such weights "
                              "need the matching quantized Linear and a dequantizing loader, which this service does "
                              "not build, so the adapter could not be loaded as made", field="target_modules",
                              fix="Dequantize the checkpoint to bf16/fp16/fp32 first, or leave these modules out.")
        if tuple(info.shape) != shape:
            raise InvalidCheckpoint(f"{wkey} has shape {list(info.shape)} but config.json implies {list(shape)}",
                                    field="checkpoint", fix="Check that config.json belongs to these weights.")
        targets.append(_Target(key, kind, n_in, n_out, wkey, info, r))
    _check_extra_modules(spec, model, arch)
    return targets


def _text_only_hint(arch: Architecture, names: list[str]) -> str:
    """For a multimodal model: the regex that adapts the language model only (names match its vision tower too)."""
    picked = [n for n in ("q_proj", "v_proj") if n in names] or names[:2]
    return (f" To adapt only the language model: \"{re.escape(arch.text_module)}\\..*\\.({'|'.join(picked)})$\""
            if arch.text_module and picked else "")


def _find_module(model: nn.Module, name: str) -> nn.Module | None:
    """The first module whose full name is ``name`` or ends with ``.name`` (peft's suffix matching)."""
    return next((m for k, m in model.named_modules() if k == name or k.endswith(f".{name}")), None)


def _check_extra_modules(spec: AttachLoraSpec, model: nn.Module, arch: Architecture) -> None:
    """``modules_to_save`` names must exist (peft ignores a typo silently); token ids must be embedding rows."""
    for i, name in enumerate(spec.modules_to_save or []):
        if _find_module(model, name) is None:
            top = ", ".join(dict.fromkeys(k.rsplit(".", 1)[-1] for k, m in model.named_modules()
                                          if k and not any(True for _ in m.children())))
            raise InvalidSpec(f"modules_to_save names {name!r}, which is no module of this {type(model).__name__}",
                              field=f"modules_to_save.{i}", fix=f"Name modules of the model, e.g. from: {top}.")
    tti = spec.trainable_token_indices
    if tti is None:
        return
    groups = {"": tti} if isinstance(tti, list) else tti
    for module_name, ids in groups.items():
        where = "trainable_token_indices" + (f".{module_name}" if module_name else "")
        rows = arch.vocab_rows
        if module_name:
            module = _find_module(model, module_name)
            weight = getattr(module, "weight", None)
            if module is None or weight is None or weight.dim() != 2:
                raise InvalidSpec(f"trainable_token_indices names {module_name!r}, which is no embedding of this "
                                  "model", field=where, fix=f"Use the input embedding, e.g. "
                                                            f"{arch.input_embedding.rsplit('.', 2)[-2]!r}, or a list.")
            rows = weight.shape[0]
        if not ids:
            raise InvalidSpec("trainable_token_indices lists no token id", field=where, fix="List token ids.")
        bad = [i for i in ids if not 0 <= i < rows]
        if bad:
            raise InvalidSpec(f"token id {bad[0]} is not a row of the embedding (0..{rows - 1})", field=where,
                              fix="Use ids below the embedding's row count (the ids /extend-vocab reported).")


def _ckpt_key(ckpt: Checkpoint, param: str, prefix: str, arch: Architecture) -> str | None:
    """The checkpoint key of model parameter ``param`` (base-model prefix added/removed, a tied head's embedding)."""
    candidates = [param]
    if prefix and param.startswith(prefix + "."):
        candidates.append(param[len(prefix) + 1:])
    elif prefix:
        candidates.append(f"{prefix}.{param}")
    found = next((c for c in candidates if c in ckpt), None) or arch.keys.checkpoint_key(param, ckpt)
    if found is None and arch.tied and param == arch.head_param:
        return arch.input_embedding
    return found


# -- injection ------------------------------------------------------------------------------------------------
@contextlib.contextmanager
def _rng(seed: int, device: torch.device) -> Iterator[None]:
    """Seed the global RNG as ``torch.manual_seed(seed); get_peft_model(...)`` would, and restore it afterwards."""
    with seeded_global_rng(seed, device):
        yield


@contextlib.contextmanager
def _intra_op_threads(n: int) -> Iterator[None]:
    """Run torch's CPU ops of this thread with ``n`` intra-op threads, restored afterwards.

    A data-free adapter is hundreds of small tensors (r x features each): on each of them an OpenMP parallel region
    costs more than the work, the more so on a loaded machine, where the second thread waits for a core (measured
    at 1B, 2 cores: 1.4 s of CPU with 2 threads, 0.35 s with 1). Weight-reading inits keep every thread.
    """
    before = torch.get_num_threads()
    if n == before:
        yield
        return
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Residuals:
    """The residual base, each byte written once: a residual has its original's name, dtype and shape, so the
    rewritten shards' layout is known before peft runs. They are created first (every other tensor copied by the
    kernel, room reserved for each decomposed target, the index and side files as they are); each residual is then
    written at its offset as peft produces it (memory: one target), and each rewritten shard hashed once at the end.
    Untouched shards are linked."""

    def __init__(self, ckpt: Checkpoint, targets: list[_Target], dest: Path, ctx: RunContext) -> None:
        self.planned = {t.key: t.info for t in targets}
        self.cache = ctx.digests
        reserved = {k: ReservedTensor(i.dtype, i.shape, i.nbytes) for k, i in self.planned.items()}
        self.files = write_checkpoint(ckpt, dest, Changes(replace=dict(reserved)), ctx, cache=ctx.digests,
                                      hash_rewritten=False)
        for path in ckpt.other_files():
            shutil.copyfile(path, dest / path.name)
        out = Checkpoint.open(dest)  # the headers just written: where each residual goes
        self._at = {k: (out.path_of(k), out.info(k)) for k in self.planned}
        self._fds = {path: os.open(path, os.O_WRONLY) for path, _ in self._at.values()}
        self.done: set[str] = set()
        self.dest = dest

    def add(self, key: str, tensor: torch.Tensor) -> None:
        path, info = self._at[key]
        planned = self.planned[key]
        if TORCH_TO_SAFETENSORS[tensor.dtype] != planned.dtype or tuple(tensor.shape) != planned.shape:
            raise RuntimeError(f"the residual of {key} is {tensor.dtype} {tuple(tensor.shape)}, not its original's "
                               f"{planned.dtype} {planned.shape}")
        view, done = tensor_bytes(tensor), 0
        while done < len(view):
            done += os.pwrite(self._fds[path], view[done:], info.begin + done)
        self.done.add(key)

    def close(self) -> None:
        for fd in self._fds.values():
            os.fsync(fd)
            os.close(fd)
        self._fds = {}

    def finish(self) -> dict[str, WrittenFile]:
        """Every output shard with its digest (the rewritten ones hashed now, once each)."""
        self.close()
        if self.done != set(self.planned):  # a reserved range never written would read as zeros: refuse
            raise RuntimeError(f"peft produced no residual for {sorted(set(self.planned) - self.done)}")
        todo = [f for f in self.files.values() if not f.linked and f.sha256 is None]
        with ThreadPoolExecutor(max_workers=min(2, len(todo) or 1)) as pool:
            digests = list(pool.map(lambda f: sha256_of(self.dest / f.path, self.cache), todo))
        return {**self.files, **{f.path: dataclasses.replace(f, sha256=d) for f, d in zip(todo, digests, strict=True)}}


class _Materializer:
    """Gives peft each target's base weight for the duration of its adapter's creation, then takes it back.

    Data-free inits get a zero-storage stand-in (right shape, dtype and device; peft reads only those). Others get
    the weight read from the checkpoint onto ``device``; a changed weight (PiSSA, OLoRA) goes to ``spill``.
    """

    def __init__(self, ckpt: Checkpoint, targets: list[_Target], device: torch.device, init: str,
                 spill: _Residuals | None) -> None:
        self.ckpt = ckpt
        self.targets = {t.name: t for t in targets}
        self.device = device
        self.init = init
        self.spill = spill
        self.needs_weights = init not in DATA_FREE_INITS

    def create(self, key: str, base: nn.Module, config, create: Callable[[object], nn.Module]) -> None:
        target = self.targets.get(key)
        if target is None:  # the planning pass and peft disagree: refuse rather than guess
            raise InvalidSpec(f"peft targeted {key}, which the request check did not expect", field="target_modules",
                              fix="Name the target modules explicitly.")
        dtype = base.weight.dtype
        shape = tuple(base.weight.shape)
        weights_needed = self.needs_weights or config.use_dora
        if weights_needed:
            stored = self.ckpt.read(target.key)
            # DoRA: peft sees the base as loaded in float32, so that the magnitude is the exact norm (see the
            # module docstring); other inits see it in the dtype from_pretrained gives it, as before
            weight = stored.to(self.device, torch.float32 if config.use_dora else dtype)
            del stored
        else:  # a stand-in that owns no storage: peft reads its device and dtype only
            weight = torch.empty((), dtype=dtype).expand(shape)
        base.weight = nn.Parameter(weight, requires_grad=False)
        olora_conv1d = self.init == "olora" and target.kind == "conv1d"
        used = config
        if olora_conv1d:  # peft's olora_init factors the (in, out) Conv1D matrix: do it on the right axis below
            used = copy.copy(config)
            used.init_lora_weights = True
        lora = create(used)
        if olora_conv1d:
            config.fan_in_fan_out = used.fan_in_fan_out
            _olora_conv1d(lora)
        if self.spill is not None:
            residual = base.weight.detach().to(target.info.torch_dtype)
            self.spill.add(target.key, residual.cpu())
            if config.use_dora and residual.dtype != base.weight.dtype:  # the norm of the residual as written
                base.weight.data = residual.to(base.weight.dtype)
                _update_magnitude(lora)
            del residual
        base.weight = nn.Parameter(torch.empty(shape, dtype=dtype, device="meta"), requires_grad=False)
        for name, p in lora.named_parameters():
            if "base_layer" not in name and p.device.type not in ("cpu", "meta"):
                p.data = p.data.cpu()
        del weight
        if weights_needed:
            _release_freed_memory()


def _release_freed_memory() -> None:
    """Give freed heap memory back to the OS (glibc ``malloc_trim``) so that RSS stays at one target.

    glibc serves allocations below its (adaptive, up to 32 MB) mmap threshold from the heap; the weight-sized
    temporaries of each target, freed between adapters that stay alive, would otherwise fragment it and RSS would
    grow with every target although no tensor outlives its target.
    """
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


def _load_libc():  # -> ctypes.CDLL | None
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        libc.malloc_trim.argtypes = [ctypes.c_size_t]
        return libc
    except (OSError, AttributeError):  # not glibc (macOS, musl): nothing to do
        return None


_LIBC = _load_libc()


@torch.no_grad()
def _olora_conv1d(lora) -> None:
    """OLoRA on a Conv1D (weight (in, out)): ``olora_init``'s formulas on W^T (out, in), the residual transposed back.

    W^T = Q R; B = Q[:, :r] (out, r), A = R[:r] (r, in); W - s (B A)^T. A DoRA magnitude is recomputed afterwards
    with ``DoraLinearLayer.update_layer``, as peft's ``update_layer`` does after the init.
    """
    base = lora.get_base_layer()
    dtype = base.weight.dtype
    r, s = lora.r[ADAPTER_NAME], lora.scaling[ADAPTER_NAME]
    w = base.weight.detach().to(torch.float32).T
    q, rr = torch.linalg.qr(w)
    b, a = q[:, :r].contiguous(), rr[:r].contiguous()
    base.weight.data = (w - s * b @ a).T.contiguous().to(dtype)
    lora.lora_A[ADAPTER_NAME].weight.data = a.to(dtype)
    lora.lora_B[ADAPTER_NAME].weight.data = b.to(dtype)
    _update_magnitude(lora)


@torch.no_grad()
def _update_magnitude(lora) -> None:
    """Recompute a DoRA magnitude ||W + s B A||_row from the layer's current base weight, A and B (peft's
    ``DoraLinearLayer.update_layer``); no-op without DoRA."""
    if ADAPTER_NAME in lora.lora_magnitude_vector:
        lora.lora_magnitude_vector[ADAPTER_NAME].update_layer(
            base_layer=lora.get_base_layer(), lora_A=lora.lora_A[ADAPTER_NAME].weight,
            lora_B=lora.lora_B[ADAPTER_NAME].weight, scaling=lora.scaling[ADAPTER_NAME])


def _inject(model: nn.Module, config, materializer: _Materializer):
    """peft's ``LoraModel`` injection with :class:`_Materializer` around each target; adapters upcast like
    ``get_peft_model(autocast_adapter_dtype=True)``."""
    from peft.tuners.lora import LoraModel

    class _StreamingLoraModel(LoraModel):
        def _create_and_replace(self, lora_config, adapter_name, target, target_name, parent, current_key,
                                **kwargs):  # type: ignore[override]
            def create(cfg) -> nn.Module:
                super(_StreamingLoraModel, self)._create_and_replace(cfg, adapter_name, target, target_name, parent,
                                                                     current_key, **kwargs)
                return getattr(parent, target_name)

            materializer.create(current_key, target, lora_config, create)

    try:
        tuner = _StreamingLoraModel(model, config, ADAPTER_NAME)
    except (ValueError, TypeError) as exc:
        raise InvalidSpec(f"peft could not attach this adapter: {exc}", field="target_modules",
                          fix="Check target_modules, modules_to_save and trainable_token_indices.") from None
    finally:
        if materializer.spill is not None:
            materializer.spill.close()
    tuner._cast_adapter_dtype(ADAPTER_NAME, autocast_adapter_dtype=True)
    return tuner


class _PeftShell(nn.Module):
    """Stands for ``PeftModel`` in ``get_peft_model_state_dict``; ``base_model`` gives keys ``base_model.model.*``."""

    def __init__(self, tuner: nn.Module) -> None:
        super().__init__()
        self.base_model = tuner
        self.peft_config = tuner.peft_config


def _state_dict(tuner, ckpt: Checkpoint, arch: Architecture, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """``get_peft_model_state_dict`` of the adapter; tensors peft copies from the base are read from the checkpoint.

    Adapter tensors (lora_*, trainable token rows) are cast to ``dtype``; copies of base modules keep the base dtype.
    """
    from peft.utils import get_peft_model_state_dict

    state = get_peft_model_state_dict(_PeftShell(tuner), adapter_name=ADAPTER_NAME, save_embedding_layers=False)
    model = tuner.model
    prefix = getattr(model, "base_model_prefix", "") or ""
    out: dict[str, torch.Tensor] = {}
    cache: dict[str, torch.Tensor] = {}  # a tied embedding/head saved under two names is read once
    for key, value in state.items():
        read = value.is_meta
        if read:
            value = _from_checkpoint(key, value, model, ckpt, prefix, arch, cache)
        if ".lora_" in key or key.endswith("trainable_tokens_delta"):
            value = value.to(dtype)
        value = value.detach().cpu().contiguous()
        out[key] = value.clone() if read else value  # one checkpoint read may back two keys: never share storage
    return out


def _from_checkpoint(key: str, meta: torch.Tensor, model: nn.Module, ckpt: Checkpoint, prefix: str,
                     arch: Architecture, cache: dict[str, torch.Tensor]) -> torch.Tensor:
    """The value of a saved tensor that peft copied from the base (still on meta here), read from the checkpoint."""
    name = key.removeprefix("base_model.model.")
    suffix = ".token_adapter.trainable_tokens_delta"
    if name.endswith(suffix):
        module_name = name[: -len(suffix)]
        layer = model.get_submodule(f"{module_name}.token_adapter")
        src = _ckpt_key(ckpt, f"{module_name}.weight", prefix, arch)
        if src is None:
            raise InvalidCheckpoint(f"no checkpoint tensor for {module_name}.weight", field="checkpoint")
        ids = list(layer.token_indices[ADAPTER_NAME])
        rows = torch.cat([ckpt.read_rows(src, i, i + 1) for i in ids]) if ids else torch.empty(0)
        return rows.to(meta.dtype).reshape(meta.shape)
    for wrapper in (f".modules_to_save.{ADAPTER_NAME}.", ".modules_to_save.", ".base_layer.", ".original_module."):
        name = name.replace(wrapper, ".")
    src = _ckpt_key(ckpt, name, prefix, arch)
    if src is None:
        raise InvalidCheckpoint(f"the adapter saves {name}, which is not a tensor of the checkpoint",
                                field="checkpoint", fix="Check modules_to_save and bias against the checkpoint.")
    if src not in cache:
        cache[src] = ckpt.read(src)
    value = cache[src]
    if tuple(value.shape) != tuple(meta.shape):
        raise InvalidCheckpoint(f"{src} has shape {list(value.shape)}; the model expects {list(meta.shape)}",
                                field="checkpoint")
    return value.to(meta.dtype)


# -- writing --------------------------------------------------------------------------------------------------
def _save_adapter(out: Path, state: dict[str, torch.Tensor], config, base_path: str, task_type: str | None,
                  model_class: type, decompose: bool) -> None:
    """Write the adapter as ``PeftModel.save_pretrained`` does (safetensors + ``{"format": "pt"}``, config JSON)."""
    from safetensors.torch import save_file

    save_file(state, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    cfg = copy.deepcopy(config)
    cfg.base_model_name_or_path = base_path
    cfg.inference_mode = True
    if decompose:  # the adapter is already decomposed: loading must not run PiSSA/OLoRA again
        cfg.init_lora_weights = True
    for f in dataclasses.fields(cfg):  # sets in sorted order, so that the same request gives the same bytes
        value = getattr(cfg, f.name)
        if isinstance(value, set):
            setattr(cfg, f.name, sorted(value))
    auto_mapping = None
    if task_type is None:
        auto_mapping = {"base_model_class": model_class.__name__, "parent_library": model_class.__module__}
    cfg.save_pretrained(str(out), auto_mapping_dict=auto_mapping)


def _residual_base(ckpt: Checkpoint, residuals: _Residuals, base_path: str) -> ResidualBase:
    """The base with each decomposed target replaced by its residual W - s B A; other shards linked."""
    written = residuals.finish()
    note = (f"{base_path} holds the residual base W - s*B*A of the {len(residuals.planned)} decomposed target(s); "
            "it is valid only with this adapter (use the original checkpoint for anything else)")
    return ResidualBase(path=base_path, replaced_tensors=sorted(residuals.planned),
                        rewritten_shards=[FileInfo.of(f) for f in written.values()
                                          if not f.linked and f.path in ckpt.shards],
                        linked_shards=sorted(f.path for f in written.values() if f.linked), note=note)


def _describe_targets(tuner, targets: list[_Target]) -> list[TargetModule]:
    by_name = {t.name: t for t in targets}
    out = []
    for name, module in tuner.model.named_modules():
        if name not in by_name or not hasattr(module, "lora_A") or ADAPTER_NAME not in module.lora_A:
            continue
        t = by_name[name]
        out.append(TargetModule(
            name=name, kind=t.kind, in_features=t.in_features, out_features=t.out_features, weight_dtype=t.info.dtype,
            r=module.r[ADAPTER_NAME], lora_alpha=float(module.lora_alpha[ADAPTER_NAME]),
            scaling=float(module.scaling[ADAPTER_NAME]),
            lora_A=list(module.lora_A[ADAPTER_NAME].weight.shape),
            lora_B=list(module.lora_B[ADAPTER_NAME].weight.shape)))
    return out


def _peft_warnings(caught: list[warnings.WarningMessage]) -> list[str]:
    keep = []
    for w in caught:
        if issubclass(w.category, (DeprecationWarning, PendingDeprecationWarning, FutureWarning)):
            continue
        text = str(w.message).strip()
        if text:
            keep.append(f"peft: {text}")
    return keep

