"""attach-lora's target planning: the request checks, peft's ``LoraConfig``, and which modules peft will adapt
(with their ranks), all settled before any tensor is read or file written."""

from __future__ import annotations

import copy
import difflib
import math
import re
import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from adapter_surgery import resources
from adapter_surgery.errors import InvalidCheckpoint, InvalidSpec
from adapter_surgery.io import Checkpoint
from adapter_surgery.io.header import TensorInfo
from adapter_surgery.model.roles import Architecture, build_meta_model
from adapter_surgery.ops.attach_head import config_mismatch, unexpected_tensors
from adapter_surgery.ops.attach_lora import peft_bridge as bridge
from adapter_surgery.ops.attach_lora.spec import DATA_FREE_INITS, PISSA, REFUSED_INITS, AttachLoraSpec

FLOAT_STORAGE = ("F32", "F16", "BF16")
#: Extra ``modules_to_save`` that ``PeftModelFor<Task>.__init__`` adds (peft/peft_model.py).
TASK_MODULES_TO_SAVE = {"SEQ_CLS": ["classifier", "score"], "TOKEN_CLS": ["classifier", "score"],
                        "QUESTION_ANS": ["qa_outputs"]}


#: safetensors' name of a parameter dtype (the stored dtype of a target parameter).
SAFETENSORS_DTYPES = {torch.float32: "F32", torch.bfloat16: "BF16", torch.float16: "F16"}
#: The inits peft's ``lora.ParamWrapper`` runs without the module's ``weight`` (``reset_lora_parameters``).
PARAMETER_INITS = ("true", "gaussian")


@dataclass
class Target:
    """One module (or parameter) peft will adapt: its weight's checkpoint key, header entry and rank.

    ``kind`` ``parameter``: a parameter named by ``target_parameters`` (transformers 5's fused MoE experts, 3-D, and
    routers), adapted by ``lora.ParamWrapper`` with ``experts`` blocks of rank ``r``; ``key``/``info`` are None (its
    checkpoint tensors, possibly stored per expert, are never read: only data-free inits apply) and ``dtype`` is
    the model's.
    """

    name: str
    kind: Literal["linear", "conv1d", "parameter"]
    in_features: int
    out_features: int
    key: str | None
    info: TensorInfo | None
    r: int
    experts: int = 1
    dtype: str | None = None

    @property
    def weight_dtype(self) -> str:
        return self.info.dtype if self.info is not None else self.dtype or "F32"



def check_memory(targets: list[Target], init: str, needs_weights: bool, limit: int | None) -> None:
    """Refuse (503) before any weight is read when the adapter (float32, peft's copy and the saved one) plus the
    largest target's factorization (:func:`adapter_surgery.resources.decomposition_bytes`) cannot fit."""
    adapter = sum(2 * 4 * t.r * t.experts * (t.in_features + t.out_features) for t in targets)
    one = max((resources.decomposition_bytes(t.out_features, t.in_features, t.r, init if init not in DATA_FREE_INITS
                                             else "dora") for t in targets), default=0) if needs_weights else 0
    field = "r" if adapter >= one else ("init_lora_weights" if init not in DATA_FREE_INITS else "use_dora")
    resources.require(adapter + one, field=field, available=resources.available_memory(limit),
                      what=f"an adapter on {len(targets)} target(s)" + (f" with init {init}" if needs_weights else ""),
                      fix="Lower r (or rank_pattern), target fewer modules, use 'pissa_niter_N' instead of an exact "
                          "'pissa', or give the service more memory.")


def check_init(spec: AttachLoraSpec) -> str:
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


def meta_model(ckpt: Checkpoint, built: nn.Module | None = None) -> nn.Module:
    """The checkpoint's model on the meta device, in the dtype ``from_pretrained`` (dtype 'auto') would load;
    ``built``: the one resolving the architecture built (:meth:`Run.architecture_and_model`), used rather than a
    second build."""
    model, problem = (built, None) if built is not None else build_meta_model(ckpt)
    if model is None:
        raise InvalidCheckpoint(f"the model cannot be built from config.json ({problem})", field="checkpoint",
                                fix="attach-lora needs a config.json that transformers can instantiate.")
    return model.to(model_dtype(ckpt))


def model_dtype(ckpt: Checkpoint) -> torch.dtype:
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


def task_type_of(class_name: str) -> str | None:
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


def lora_config(spec: AttachLoraSpec, init: str, task_type: str | None, arch: Architecture):
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


def linear_names(arch: Architecture) -> list[str]:
    """Short names of the Linear/Conv1D modules, in model order (q_proj, k_proj, ...)."""
    return list(dict.fromkeys(n.rsplit(".", 1)[-1] for n in arch.linear_modules))


def generic(name: str) -> str:
    """``model.layers.3.self_attn.k_proj`` -> ``model.layers.*.self_attn.k_proj``."""
    return re.sub(r"(?<=\.)\d+(?=\.|$)", "*", name)


def check_weights_fit_config(ckpt: Checkpoint, model: nn.Module, arch: Architecture) -> list[str]:
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
    unknown = [k for k in ckpt.weight_map if k not in arch.redundant_keys and ckpt_name(k, names, prefix) is None
               and arch.keys.model_name(k) not in names]  # another layout (LLaVA's language_model.model.*)
    if not unknown:
        return []
    extra, other = unexpected_tensors(unknown, model, names)
    kinds = {generic(n) for n in names}
    repeated = [k for k in extra if generic(k) in kinds or (prefix and generic(f"{prefix}.{k}") in kinds)]
    if repeated:
        raise config_mismatch(repeated, model, ckpt)
    ignored = [k for k in unknown if k in set(extra) | set(other)]
    if not ignored:
        return []
    return [f"{len(ignored)} checkpoint tensor(s) are not part of {type(model).__name__} as config.json builds it "
            f"(e.g. {ignored[0]!r}); transformers ignores (or converts) them when loading, and the adapter does not "
            "target them"]


def ckpt_name(key: str, names: set[str], prefix: str) -> str | None:
    """The model's name for checkpoint ``key`` (as is, or with the base-model prefix added or removed)."""
    candidates = [key, f"{prefix}.{key}"] if prefix else [key]
    if prefix and key.startswith(prefix + "."):
        candidates.append(key[len(prefix) + 1:])
    return next((c for c in candidates if c in names), None)


def check_entries(config, model: nn.Module, spec: AttachLoraSpec, names: list[str]) -> list[str]:
    """Every ``target_modules`` list entry must name a module (peft ignores a typo silently when another entry
    matches); ``exclude_modules`` entries that match nothing get a warning (returned). Regex strings and
    ``"all-linear"`` keep peft's semantics (checked as a whole by the caller)."""
    keys = [k for k, _ in model.named_modules() if k]
    cls = type(model).__name__

    def matches(entry: str) -> bool:
        if any(k == entry or k.endswith(f".{entry}") for k in keys):
            return True
        cfg = copy.deepcopy(config)  # an old (transformers v4) MoE name the v5 conversion maps: valid
        cfg.target_modules, cfg.exclude_modules = {entry}, None
        cfg = bridge.converted_for_transformers(cfg, model)
        return set(cfg.target_modules or ()) != {entry} or bool(getattr(cfg, "target_parameters", None))

    listing = ", ".join(names)
    if isinstance(spec.target_modules, list):
        whole = copy.deepcopy(config)  # v4 names fused together (w1 + w3 -> gate_up_proj) convert as a list only
        whole.target_modules, whole.exclude_modules = set(spec.target_modules), None
        kept = set(bridge.converted_for_transformers(whole, model).target_modules or ())
        for i, entry in enumerate(spec.target_modules):
            if entry not in kept or matches(entry):
                continue
            close = difflib.get_close_matches(entry, names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise InvalidSpec(f"target_modules entry {entry!r} matches no module of this {cls}{hint}; its "
                              f"Linear/Conv1D modules are: {listing}", field=f"target_modules.{i}",
                              fix=f"Correct or remove {entry!r}: use names from {listing} (a module name or a "
                                  "dotted suffix of one), or send 'all-linear'.")
    notes = []
    if isinstance(spec.exclude_modules, list):
        for i, entry in enumerate(spec.exclude_modules):
            if not any(k == entry or k.endswith(f".{entry}") for k in keys):
                notes.append(f"exclude_modules entry {i} ({entry!r}) matches no module of this {cls}, so it "
                             "excludes nothing")
    return notes


def plan(config, model: nn.Module, ckpt: Checkpoint, arch: Architecture,
         spec: AttachLoraSpec) -> tuple[list[Target], list[str]]:
    """The modules peft will adapt, matched with peft's own functions on a copy of the config, all checked.

    Mirrors ``BaseTuner.inject_adapter``'s matching (default targets per model type, the transformers-v5 config
    conversion, ``"all-linear"``, ``check_target_module_exists``, ``rank_pattern`` via ``get_pattern_key``) so that
    every refusal happens before any tensor is read or file written. Returns the targets and warnings.
    """
    names = linear_names(arch)
    notes = check_entries(config, model, spec, names)
    cfg = matching_config(config, model, names, arch)
    prefix = getattr(model, "base_model_prefix", "") or ""
    parameters, rank_notes = parameter_targets(cfg, model, spec)
    notes = [*notes, *rank_notes]
    modules = matched_modules(cfg, model, spec, names) if cfg.target_modules or not parameters else []
    targets = [target_of(key, module, cfg, ckpt, arch, prefix, names) for key, module in modules]
    check_extra_modules(spec, model, arch)
    return [*targets, *parameters], notes


def injection_config(config, model: nn.Module, spec: AttachLoraSpec, arch: Architecture):
    """The ``LoraConfig`` handed to peft: ``config`` itself, except

    - without ``target_modules``: peft's default targets for the model type, set explicitly (what ``peft`` itself
      saves). peft 0.21's transformers-v5 MoE conversion runs before the default is filled in and turns ``None``
      into an empty set, so that ``get_peft_model`` fails on Mixtral ("No `target_modules` passed");
    - with ``exclude_modules``: parameters of ``target_parameters`` (MoE experts and routers, which ``"all-linear"``
      and the v5 conversion add) whose module ``exclude_modules`` names are left out (peft 0.21 applies
      ``exclude_modules`` to modules only): ``target_parameters`` then lists the kept parameters by full name, the
      rest of the matching config as peft resolves it (the v5 conversion, ``"all-linear"`` expanded).
    """
    out = config
    model_type = getattr(model.config, "model_type", None)
    default = bridge.default_target_modules(model_type) if config.target_modules is None else None
    if default is not None:
        out = copy.deepcopy(config)
        out.target_modules = default if isinstance(default, str) else set(default)
    if not spec.exclude_modules:
        return out
    cfg = matching_config(out, model, linear_names(arch))
    found = bridge.matched_parameters(cfg, model)
    kept = [key for key, module_name, _ in found if not _excluded(cfg, module_name)]
    if len(kept) == len(found):
        return out
    cfg.target_parameters = kept or None
    return cfg


def _excluded(cfg, module_name: str) -> bool:
    """Whether ``exclude_modules`` names module ``module_name`` (peft's own rule: a regex in full, or a name or a
    dotted suffix of one)."""
    probe = copy.copy(cfg)
    probe.target_modules, probe.modules_to_save = {module_name}, None
    probe.layers_to_transform, probe.layers_pattern = None, None
    return not bridge.target_module_exists(probe, module_name)


def parameter_targets(cfg, model: nn.Module, spec: AttachLoraSpec) -> tuple[list[Target], list[str]]:
    """The parameters ``target_parameters`` names (after the v5 conversion: fused MoE experts, routers), each
    checked as peft's ``lora.ParamWrapper`` needs it: a data-free init, no DoRA, no dropout, 2-D or 3-D, float.
    A rank above min(in, out) (a router has as many outputs as experts) is built as peft builds it, with a warning
    (returned): refusing it would make ``"all-linear"`` differ from peft's own."""
    found = bridge.matched_parameters(cfg, model)
    if not found:
        return [], []
    where = ", ".join(dict.fromkeys(generic(k) for k, _, _ in found))
    leave_out = ("or leave them out with exclude_modules (e.g. ['experts', 'gate']: the fused experts and the "
                 "routers)")
    init = check_init(spec)
    for bad, field, what in ((init not in PARAMETER_INITS, "init_lora_weights", f"init_lora_weights {init!r}"),
                             (spec.use_dora, "use_dora", "use_dora"),
                             (spec.lora_dropout > 0, "lora_dropout", f"lora_dropout {spec.lora_dropout}")):
        if bad:
            raise InvalidSpec(f"{what} is not supported on the parameters this request targets ({where}: "
                              "target_parameters, as peft maps MoE experts and routers in transformers 5); peft's "
                              "lora.ParamWrapper takes the inits true and 'gaussian' only, without DoRA or dropout",
                              field=field, fix=f"Send init_lora_weights true, no use_dora and lora_dropout 0, "
                                               f"{leave_out}.")
    targets: list[Target] = []
    over: dict[str, int] = {}
    for key, module_name, param in found:
        try:
            experts, n_in, n_out = bridge.parameter_axes(model.get_submodule(module_name), param.shape)
        except ValueError as exc:
            raise InvalidSpec(f"target_parameters names {key}, {exc}", field="target_modules",
                              fix=f"Target 2-D or 3-D parameters, {leave_out}.") from None
        if not param.dtype.is_floating_point:
            raise InvalidSpec(f"target parameter {key} is {param.dtype}, not a float", field="target_modules",
                              fix=f"Dequantize the checkpoint first, {leave_out}.")
        r = cfg.rank_pattern.get(pattern_keys(cfg, key), cfg.r)
        if r > min(n_in, n_out):
            over.setdefault(f"{generic(key)} (in {n_in}, out {n_out}, r={r})", min(n_in, n_out))
        targets.append(Target(key, "parameter", n_in, n_out, None, None, r, experts,
                              SAFETENSORS_DTYPES.get(param.dtype, str(param.dtype))))
    notes = [f"r exceeds min(in_features, out_features) = {limit} of {what}; peft builds it so, but the rank adds no "
             "expressive power there (exclude_modules ['gate'] leaves the routers out)" for what, limit in over.items()]
    return targets, notes


def matching_config(config, model: nn.Module, names: list[str], arch: Architecture | None = None):
    """A copy of ``config`` as ``inject_adapter`` matches with it: peft's default targets for the model type, the
    transformers-v5 conversion, ``"all-linear"`` expanded."""
    cfg = copy.deepcopy(config)
    model_type = getattr(model.config, "model_type", None)
    if cfg.target_modules is None:
        default = bridge.default_target_modules(model_type)
        if default is None:
            raise InvalidSpec(f"peft has no default target_modules for model type {model_type!r}",
                              field="target_modules", fix=f"Name the modules to adapt, from: {', '.join(names)}; "
                                                          "or send 'all-linear'." + text_only_hint(arch, names))
        cfg.target_modules = default if isinstance(default, str) else set(default)
    return bridge.with_all_linear(bridge.converted_for_transformers(cfg, model), model)


def text_only_hint(arch: Architecture | None, names: list[str]) -> str:
    """For a multimodal model: the regex that adapts the language model only (names match its vision tower too)."""
    picked = [n for n in ("q_proj", "v_proj") if n in names] or names[:2]
    return (f" To adapt only the language model: \"{re.escape(arch.text_module)}\\..*\\.({'|'.join(picked)})$\""
            if arch is not None and arch.text_module and picked else "")


def _invalid_regex_field(spec: AttachLoraSpec) -> str:
    """The request field whose pattern peft could not compile: ``target_modules``/``exclude_modules`` given as one
    string are regexes, and so is each ``layers_pattern`` (peft puts it in its layer regex)."""
    layers = spec.layers_pattern
    fields = [("target_modules", [spec.target_modules] if isinstance(spec.target_modules, str) else []),
              ("exclude_modules", [spec.exclude_modules] if isinstance(spec.exclude_modules, str) else []),
              ("layers_pattern", [layers] if isinstance(layers, str) else list(layers or []))]
    for field, patterns in fields:
        for pattern in patterns:
            try:
                re.compile(pattern)
            except re.error:
                return field
    return "target_modules"


def matched_modules(cfg, model: nn.Module, spec: AttachLoraSpec, names: list[str]) -> list[tuple[str, nn.Module]]:
    """The (name, module) pairs peft's ``check_target_module_exists`` accepts; none is a 422."""
    listing = ", ".join(names)
    matched: list[tuple[str, nn.Module]] = []
    for key, module in model.named_modules():
        if not key:
            continue
        try:
            found = bridge.target_module_exists(cfg, key)
        except re.error as exc:
            field = _invalid_regex_field(spec)
            raise InvalidSpec(f"{field} is not a valid regular expression ({exc})", field=field,
                              fix="Fix the pattern, or send a list of names.") from None
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
    return matched


def target_of(key: str, module: nn.Module, cfg, ckpt: Checkpoint, arch: Architecture, prefix: str,
              names: list[str]) -> Target:
    """One matched module as a :class:`Target`: Linear/Conv1D, its rank (``rank_pattern``) within min(in, out), its
    weight in the checkpoint in a float dtype with the shape config.json implies."""
    from transformers.pytorch_utils import Conv1D

    listing = ", ".join(names)
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
    r_key = pattern_keys(cfg, key)
    r = cfg.rank_pattern.get(r_key, cfg.r)
    limit = min(n_in, n_out)
    if r > limit:
        field = f"rank_pattern.{r_key}" if r_key in cfg.rank_pattern else "r"
        raise InvalidSpec(f"r={r} is larger than min(in_features, out_features) = {limit} of "
                          f"{generic(key)} (in {n_in}, out {n_out}); a rank above that adds no expressive "
                          "power and some loaders refuse it", field=field,
                          fix=f"Send r <= {limit}, or a rank_pattern entry for {key.rsplit('.', 1)[-1]!r} "
                              f"with at most {limit}, or leave that module out of target_modules.")
    wkey = ckpt_key(ckpt, f"{key}.weight", prefix, arch)
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
    return Target(key, kind, n_in, n_out, wkey, info, r)


def pattern_keys(cfg, key: str) -> str:
    """The ``rank_pattern`` key that applies to ``key`` (module or parameter), both patterns checked as regexes."""
    try:
        r_key = bridge.pattern_key(cfg.rank_pattern.keys(), key)
        bridge.pattern_key(cfg.alpha_pattern.keys(), key)
    except re.error as exc:
        raise InvalidSpec(f"a rank_pattern/alpha_pattern key is not a valid regular expression ({exc})",
                          field="rank_pattern", fix="Use module names such as 'k_proj' or valid regexes.") \
            from None
    return r_key


def find_module(model: nn.Module, name: str) -> nn.Module | None:
    """The first module whose full name is ``name`` or ends with ``.name`` (peft's suffix matching)."""
    return next((m for k, m in model.named_modules() if k == name or k.endswith(f".{name}")), None)


def check_extra_modules(spec: AttachLoraSpec, model: nn.Module, arch: Architecture) -> None:
    """``modules_to_save`` names must exist (peft ignores a typo silently); token ids must be embedding rows."""
    for i, name in enumerate(spec.modules_to_save or []):
        if find_module(model, name) is None:
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
            module = find_module(model, module_name)
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


def ckpt_key(ckpt: Checkpoint, param: str, prefix: str, arch: Architecture) -> str | None:
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


