"""Attach a LoRA adapter: ``adapter_config.json`` + ``adapter_model.safetensors`` exactly as ``peft`` saves them.

The package, by concern (the plan flows one way, top to bottom): :mod:`.spec` (request, options, result),
:mod:`.targets` (request checks, ``LoraConfig``, which modules and ranks), :mod:`.direct` (the fast path of the
data-free inits ``true``/``"gaussian"``), :mod:`.decompose` (each target's base weight handed to peft;
PiSSA/OLoRA/DoRA), :mod:`.output` (the adapter files, the residual base, the result's targets), :mod:`.peft_bridge`
(the only module that touches peft's internals), and here the operation.

How it works
------------
The checkpoint's ``transformers`` model is built on the ``meta`` device (no storage, from ``config.json`` alone) and
``peft``'s own :class:`peft.tuners.lora.LoraModel` injects the adapter into it, so that target matching
(``target_modules``, ``"all-linear"``, ``exclude_modules``, ``layers_to_transform``), per-module ranks
(``rank_pattern``/``alpha_pattern``), the LoRA layers and every ``init_lora_weights`` value run ``peft``'s code, in
``peft``'s order, drawing from the global RNG as ``get_peft_model`` does after ``torch.manual_seed(seed)``. Only one
hook differs (``_create_and_replace``): while ``peft`` builds the adapter of one target, that target's base weight
is given to it, and taken back right after (:mod:`.decompose`):

- data-free inits (``true``, ``"gaussian"``, ``"orthogonal"``) get a zero-storage stand-in of the right shape and
  dtype (``torch.empty(()).expand(shape)``): ``peft`` reads only its device and dtype, the checkpoint's tensor data is
  never read (``base_bytes_read`` is 0);
- inits that need the base weight (``pissa``, ``pissa_niter_N``, ``olora``, and ``use_dora``) get the real tensor,
  read from the checkpoint one target at a time onto ``device`` (``peft`` computes in float32); a changed base weight
  (PiSSA, OLoRA) is written at once at its offset in the residual base's shard (created beforehand with every other
  tensor copied and room for the targets) and the tensor freed, so at most one target is in memory and each residual
  byte is written once.

The fast path (:mod:`.direct`): for ``true`` and ``"gaussian"`` on plain Linear/Conv1D targets with nothing that
needs peft's modules (no DoRA, biases, ``modules_to_save``, trainable tokens or parameter targets; base in
float32/bfloat16/float16), peft's ``LoraModel`` runs with a ``_create_and_replace`` that builds nothing
(:func:`peft_bridge.plan_layers`: peft's matching, config, ranks and alphas, in peft's order) and each target's
``lora_A``/``lora_B`` is computed directly with the draws, casts and dtypes peft's layers would give it (the
constructors' thrown-away draws only advance the generator). Its weights file is laid out from the plan (the
order and header ``save_file`` gives) and written while A is drawn: each A written at its offset and the file hashed
on a worker thread while the next is drawn, each (zero) B a hole (:mod:`adapter_surgery.io.planned`), so the digest
is ready with the file. The files are byte-identical to the injection path's (tested against each other and
``get_peft_model``); everything else takes the injection path below.

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

import threading
import warnings

import torch

from adapter_surgery.devices import pick_device
from adapter_surgery.errors import InvalidCheckpoint, InvalidSpec
from adapter_surgery.io import describe_files
from adapter_surgery.ops.attach_head import without_dirs
from adapter_surgery.ops.attach_lora import direct, servable
from adapter_surgery.ops.attach_lora import peft_bridge as bridge
from adapter_surgery.ops.attach_lora.decompose import Materializer, seeded_rng
from adapter_surgery.ops.attach_lora.output import (
    Residuals,
    adapter_state_dict,
    describe_targets,
    peft_warnings,
    residual_base,
    save_adapter,
    save_adapter_config,
)
from adapter_surgery.ops.attach_lora.spec import (
    ADAPTER_CONFIG,
    ADAPTER_DTYPES,
    ADAPTER_WEIGHTS,
    DATA_FREE_INITS,
    MAX_LAYERS,
    MAX_NAMES,
    MAX_PISSA_NITER,
    MAX_RANK,
    MAX_TOKEN_IDS,
    REFUSED_INITS,
    RESIDUAL_DIR,
    AttachLoraOptions,
    AttachLoraResult,
    AttachLoraSpec,
    Name,
    Names,
    ResidualBase,
    TargetModule,
    TokenIds,
)
from adapter_surgery.ops.attach_lora.targets import (
    check_init,
    check_memory,
    check_weights_fit_config,
    injection_config,
    lora_config,
    meta_model,
    model_dtype,
    plan,
    task_type_of,
)
from adapter_surgery.ops.common import FileInfo, RunContext
from adapter_surgery.ops.compute import intra_op_threads
from adapter_surgery.ops.runner import begin

__all__ = ["ADAPTER_CONFIG", "ADAPTER_WEIGHTS", "DATA_FREE_INITS", "MAX_LAYERS", "MAX_NAMES", "MAX_PISSA_NITER",
           "MAX_RANK", "MAX_TOKEN_IDS", "REFUSED_INITS", "RESIDUAL_DIR", "AttachLoraOptions", "AttachLoraResult",
           "AttachLoraSpec", "Name", "Names", "ResidualBase", "TargetModule", "TokenIds", "attach_lora"]

#: peft's global-RNG draws and the set-up of ``warnings`` are process-wide: one attach-lora at a time.
_LOCK = threading.Lock()


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
            token ids, a LoraConfig peft refuses, an adapter the ``serving`` runtime cannot load
            (:mod:`adapter_surgery.serving`). Nothing is written.
    """
    run = begin(spec, ctx)
    init = check_init(spec)
    decompose = init not in DATA_FREE_INITS
    needs_weights = decompose or spec.use_dora
    device = pick_device(spec.device)  # validated always; data-free inits compute on the CPU (nothing to move)
    if not needs_weights:
        device = torch.device("cpu")
    ckpt = run.open()
    if ckpt.is_file or ckpt.config is None:
        raise InvalidCheckpoint(f"attach-lora needs the model directory with its config.json ({ckpt.config_problem})",
                                field="checkpoint", fix="Send the save_pretrained directory, config.json included.")
    arch, built = run.architecture_and_model(ckpt)
    model = meta_model(ckpt, built)
    task_type = task_type_of(type(model).__name__)
    config = injection_config(lora_config(spec, init, task_type, arch), model, spec, arch)
    notes = [*ckpt.warnings, *arch.notes, *check_weights_fit_config(ckpt, model, arch)]
    targets, plan_notes = plan(config, model, ckpt, arch, spec)
    check_memory(targets, init, needs_weights, ctx.memory_limit_bytes)
    # the config as peft injects it: its transformers-v5 MoE conversion adds the fused experts' rank/alpha patterns
    serving_notes, unable = servable.check_config(spec, bridge.converted_for_transformers(config, model), targets)
    base_path = f"{spec.output.rstrip('/')}/{RESIDUAL_DIR}" if decompose else spec.checkpoint
    fast = fast_path_refusal(spec, init, config, targets, model, model_dtype(ckpt)) is None
    ctx.say(f"{len(targets)} target modules, init {init}")

    threads = torch.get_num_threads() if needs_weights else 1
    dtype = ADAPTER_DTYPES[spec.dtype]
    with (_LOCK, seeded_rng(spec.seed, device), intra_op_threads(threads),
          warnings.catch_warnings(record=True) as caught):
        warnings.simplefilter("always")
        with run.writing() as tmp:
            tmp.mkdir(parents=True)
            spill = Residuals(ckpt, targets, tmp / RESIDUAL_DIR, ctx) if decompose else None
            if fast:
                saved_config, layers, modules = _direct(model, config, targets)
                serving_notes += servable.check_keys(spec, direct.adapter_keys(layers), unable)
                known = {ADAPTER_WEIGHTS: direct.write_adapter(tmp / ADAPTER_WEIGHTS, layers, init, dtype,
                                                               ctx.check_cancelled)}
                parameters = direct.trainable_parameters(layers)
                save_adapter_config(tmp, saved_config, base_path, task_type, type(model), decompose)
            else:
                materializer = Materializer(ckpt, targets, device, init, spill, check=ctx.check_cancelled)
                tuner = _inject(model, config, materializer)
                state = adapter_state_dict(tuner, ckpt, arch, dtype)
                saved_config, modules = tuner.peft_config[bridge.ADAPTER_NAME], describe_targets(tuner, targets)
                serving_notes += servable.check_keys(spec, state, unable)
                save_adapter(tmp, state, saved_config, base_path, task_type, type(model), decompose)
                known, parameters = {}, sum(t.numel() for t in state.values())
            ctx.say("adapter initialized")
            residual = None
            if spill is not None:
                residual = residual_base(ckpt, spill, base_path)
            files = [f for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS) for f in describe_files(tmp / name, known)]
            ctx.check_cancelled()  # the last boundary before the output is published
    residual_note = [residual.note] if residual is not None else []
    warnings_out = [*notes, *plan_notes, *peft_warnings(caught), *residual_note, *serving_notes]
    return AttachLoraResult(
        output=spec.output, task_type=task_type, base_model_name_or_path=base_path,
        adapter_files=[FileInfo.of(f) for f in files], target_modules=modules,
        trainable_parameters=parameters, base_bytes_read=ckpt.bytes_read,
        residual_base=residual, warnings=list(dict.fromkeys(without_dirs(w, ctx.data_dir) for w in warnings_out)),
        seconds=run.seconds())


def fast_path_refusal(spec: AttachLoraSpec, init: str, config, targets, model, dtype: torch.dtype) -> str | None:
    """Why ``spec`` goes through peft's injection rather than :mod:`.direct` (None: it does not)."""
    return direct.refusal(spec, init, config, targets, model, dtype)


def _direct(model, config, targets):
    """The fast path's plan (:mod:`.direct`): peft's config and targets without its layers. Returns the config to
    save, the layers to draw and the result's targets."""
    try:
        saved_config, layers = bridge.plan_layers(model, config)
    except (ValueError, TypeError) as exc:
        raise _peft_refused(exc) from None
    planned = [t.name for t in targets]
    if [layer.name for layer in layers] != planned:  # the planning pass and peft disagree: refuse rather than guess
        extra = sorted({layer.name for layer in layers} ^ set(planned)) or planned
        raise InvalidSpec(f"peft targets differ from the request check's ({extra[0]})", field="target_modules",
                          fix="Name the target modules explicitly.")
    return saved_config, layers, direct.describe(layers, targets)


def _peft_refused(exc: Exception) -> InvalidSpec:
    """peft's own refusal of an adapter (a ValueError/TypeError while it plans or builds it), as a 422."""
    return InvalidSpec(f"peft could not attach this adapter: {exc}", field="target_modules",
                       fix="Check target_modules, modules_to_save and trainable_token_indices.")


def _inject(model, config, materializer: Materializer):
    """peft's injection with :class:`Materializer` around each target (:func:`peft_bridge.inject`); peft's
    refusals become a 422; the residual base's files are closed whatever happens."""
    try:
        tuner = bridge.inject(model, config, materializer.create)
    except (ValueError, TypeError) as exc:
        raise _peft_refused(exc) from None
    finally:
        if materializer.spill is not None:
            materializer.spill.close()
    _refuse_dropped_bias(tuner, model)
    return tuner


def _refuse_dropped_bias(tuner, model) -> None:
    """A 422 when peft's token adapter would drop a tied output layer's bias (:func:`peft_bridge.
    token_layers_dropping_bias`): with the adapter at init every logit would differ from the base's, silently."""
    dropped = bridge.token_layers_dropping_bias(tuner)
    if not dropped:
        return
    embed = next((n for n, m in model.named_modules() if m is model.get_input_embeddings()), "")
    short = embed.rsplit(".", 1)[-1] or "the input embedding"
    raise InvalidSpec(
        f"trainable_token_indices on this model ties a token adapter to {dropped[0]}, the output layer that shares "
        f"the input embedding ({embed}) and has a bias; peft's TrainableTokensLayer computes that layer without its "
        "bias, so the adapter at init would change every logit of the base (by minus the bias)",
        field="trainable_token_indices",
        fix=f'Send modules_to_save: ["{short}"] instead (the whole embedding trains; peft ties {dropped[0]} to it, '
            "bias kept: an identity at init), or attach LoRA without trainable_token_indices.")
