"""Merge LoRA adapters into their base: a plain checkpoint, shard by shard, equal to ``peft``'s ``merge_and_unload``.

How it works
------------
Each adapter (``adapter_config.json`` + ``adapter_model.safetensors``, as ``PeftModel.save_pretrained`` writes
them) is planned from headers alone: every key is mapped to the checkpoint tensor it changes, and shapes, ranks
and names are checked against the base's headers before any tensor data is read. The output is then written by
the streaming writer: a targeted tensor is read, merged and written one at a time when the writer reaches it
(:class:`adapter_surgery.io.writer.ComputedTensor`, a lazy source), untouched tensors are byte-copied, shards
without a target are hard-linked, config and tokenizer files copied. Plain LoRA on the CPU is folded in buffers
reused from one tensor to the next, on one core fewer than torch's default (:mod:`adapter_surgery.ops.lora_fold`:
the same values, bit for bit), each on a worker while the one before it is written
(:mod:`adapter_surgery.ops.lookahead`). Memory: a few copies of the largest targeted tensor in float32.

Formulas (``peft/tuners/lora/layer.py``, ``variants.py``, ``dora.py``, ``trainable_tokens/layer.py``)
----------------------------------------------------------------------------------------------------
Per target, s = lora_alpha / r (``use_rslora``: lora_alpha / sqrt(r); Kalajdzievski 2023), r and lora_alpha from
``rank_pattern``/``alpha_pattern`` (``peft.utils.other.get_pattern_key``) when a key matches; w the request's
``weight`` of the adapter. All arithmetic is float32 (on ``device``), cast once to the stored dtype:

- LoRA (Hu et al. 2021): W' = W + sum_i w_i s_i B_i A_i (``Linear.get_delta_weight``: ``(B @ A) * scaling``);
  GPT-2's Conv1D stores W as (in, out), so the delta is transposed (``fan_in_fan_out``). Embedding LoRA
  (``lora_embedding_A``/``_B``): delta (B A)^T s.
- DoRA (Liu et al. 2024): W' = m / ||W + w s B A||_row * (W + w s B A), the norm taken per output feature as
  ``DoraLinearVariant.merge_unsafe`` computes it (``DoraLinearLayer.get_weight_norm``); m is
  ``lora_magnitude_vector``.
- ``modules_to_save`` (and biases saved with ``bias="all"``/``"lora_only"``): the saved tensor replaces the base's.
- ``trainable_token_indices``: the saved rows (``trainable_tokens_delta``) replace those rows of the embedding
  (``TrainableTokensLayer.merge``: ``index_copy``); a tied head stays tied (only the embedding is stored).

With one adapter at weight 1 the arithmetic is peft's, operation for operation: bitwise equal to
``merge_and_unload`` on the CPU (except embedding LoRA: peft's ``Embedding.merge`` rounds the delta to the stored
dtype before adding it, merge-lora rounds once; within one unit). Several adapters are summed before the one
cast; peft merges them in turn, rounding to the stored dtype after each, so the two differ by at most one unit of
the stored dtype's rounding.

Which modules are merged (``peft/tuners/tuners_utils.py``, ``check_target_module_exists``)
------------------------------------------------------------------------------------------
adapter_config.json is read by peft's own ``LoraConfig.from_pretrained`` (its validation: e.g. ``layers_pattern``
without ``layers_to_transform`` is refused as peft refuses it), and a LoRA module of the weights file is merged
only when peft would create it on load: ``target_modules`` (names, or a regex string matched whole),
``layers_to_transform``/``layers_pattern``, ``exclude_modules`` and ``modules_to_save`` applied by peft's
``check_target_module_exists``. The keys of a module peft would not create are ignored, as peft's load ignores them
(unexpected keys), and named in a warning. ``lora_magnitude_vector`` keys are read only with ``use_dora``;
``use_dora`` with a module that has none is refused. ``fan_in_fan_out`` follows the module type, as in peft
(Conv1D: true, Linear: false, whatever the config says).

PiSSA and OLoRA adapters belong to the residual base attach-lora wrote beside them (``<adapter>/base``, named by
their ``base_model_name_or_path``): merging one onto another checkpoint is refused.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import re
import shutil
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Literal

import torch
from pydantic import BaseModel, Field, StrictBool

from adapter_surgery import patterns, resources
from adapter_surgery.devices import DeviceName, pick_device
from adapter_surgery.errors import InvalidCheckpoint, InvalidSpec, NotFound, SurgeryError
from adapter_surgery.io import Checkpoint, describe_files
from adapter_surgery.io.atomic import check_output_path
from adapter_surgery.io.writer import Changes, ComputedTensor, RowPatchedTensor, write_checkpoint
from adapter_surgery.model.keys import KeyMap
from adapter_surgery.model.roles import build_meta_model
from adapter_surgery.ops.attach_lora.spec import ADAPTER_CONFIG, ADAPTER_WEIGHTS
from adapter_surgery.ops.common import FileInfo, PathFields, RunContext, StrictModel
from adapter_surgery.ops.compute import Workspace
from adapter_surgery.ops.lookahead import Lookahead
from adapter_surgery.ops.lora_fold import Delta, all_finite, fold, fold_threads
from adapter_surgery.ops.runner import Run, begin
from adapter_surgery.paths import resolve_under

PREFIX = "base_model.model."
#: Adapters per request at most; |weight| at most.
MAX_ADAPTERS = 16
MAX_WEIGHT = 1e6
FLOAT_STORAGE = ("F32", "F16", "BF16")
#: adapter_config fields that select a LoRA variant merge-lora does not fold (truthy value -> refused).
UNSUPPORTED_CONFIG = ("lora_bias", "use_qalora", "use_bdlora", "alora_invocation_tokens", "arrow_config",
                      "velora_config", "monteclora_config", "mica", "kasa_config", "target_parameters",
                      "layer_replication", "megatron_config")
WRAPPERS = (".modules_to_save.default.", ".modules_to_save.", ".base_layer.", ".original_module.")
TOKEN_SUFFIX = ".token_adapter.trainable_tokens_delta"
Kind = Literal["lora", "dora", "embedding_lora", "replaced", "token_rows"]


class AdapterRef(StrictModel):
    path: str = Field(description="Adapter directory (adapter_config.json + adapter_model.safetensors), relative "
                                  "to the data directory.")
    weight: float = Field(1.0, ge=-MAX_WEIGHT, le=MAX_WEIGHT,
                          description="Multiplies the adapter's LoRA delta (its scaling); finite, |weight| <= 1e6. "
                                      "Must be 1 for an adapter that replaces tensors (modules_to_save, token rows).")


class MergeLoraOptions(StrictModel):
    adapters: Annotated[list[AdapterRef], Field(min_length=1, max_length=MAX_ADAPTERS)] = Field(
        description="peft LoRA adapters to fold in (1..16), summed with their weights.")
    safe_merge: StrictBool = Field(False, description="Refuse (422) when a merged tensor holds NaN or Inf, as peft's "
                                                "merge(safe_merge=True) does.")
    device: DeviceName = Field("auto", description="Where the arithmetic runs: auto (GPU when present), cpu, cuda.")


class MergeLoraSpec(PathFields, MergeLoraOptions):
    """The full ``POST /merge-lora`` request."""


class MergedTensor(BaseModel):
    name: str = Field(description="Checkpoint tensor.")
    how: list[str] = Field(description="What changed it, per adapter: 'lora', 'dora', 'embedding_lora', 'replaced', "
                                       "'token_rows' (with the adapter's index).")
    shape: list[int]
    dtype: str


class MergeLoraResult(BaseModel):
    output: str
    merged_tensors: list[MergedTensor]
    linked_shards: list[str] = Field(description="Shards linked (or copied) unchanged from the checkpoint.")
    files: list[FileInfo]
    base_bytes_read: int = Field(description="Bytes of base tensor data read (targeted tensors only).")
    adapter_bytes_read: int
    bytes_read: int = Field(description="Tensor data read in all: base and adapters.")
    bytes_written: int = Field(description="Bytes of the files written (linked shards not counted).")
    device: str
    warnings: list[str]
    seconds: float


# -- adapters -------------------------------------------------------------------------------------------------
@dataclass
class Adapter:
    """An adapter directory opened for reading: its config and its weights file (headers validated)."""

    index: int
    path: Path
    field: str
    config: dict[str, object]
    weights: Checkpoint
    lora_config: object = None  # peft's LoraConfig parsed from adapter_config.json

    def targets(self, module: str) -> bool:
        """Whether peft creates a LoRA layer at ``module`` on load (target_modules, layers_to_transform,
        layers_pattern, exclude_modules, modules_to_save)."""
        from adapter_surgery.ops.attach_lora.peft_bridge import target_module_exists

        try:
            return target_module_exists(self.lora_config, module)
        except re.error as exc:
            raise self._bad_regex("target_modules/exclude_modules/layers_pattern", exc) from None

    def r_alpha(self, module: str) -> tuple[int, float]:
        """peft's ``update_layer`` arguments for ``module``: r and lora_alpha, patterns applied."""
        from adapter_surgery.ops.attach_lora.peft_bridge import pattern_key

        r, alpha = self.config.get("r", 8), self.config.get("lora_alpha", 8)
        rank_pattern = self.config.get("rank_pattern") or {}
        alpha_pattern = self.config.get("alpha_pattern") or {}
        try:
            if rank_pattern:
                r = rank_pattern.get(pattern_key(rank_pattern, module), r)
            if alpha_pattern:
                alpha = alpha_pattern.get(pattern_key(alpha_pattern, module), alpha)
        except re.error as exc:
            raise self._bad_regex("rank_pattern/alpha_pattern", exc) from None
        if not (isinstance(r, int) and r >= 1 and isinstance(alpha, (int, float)) and math.isfinite(alpha)):
            raise InvalidSpec(f"adapter {str(self.path)!r}: r={r!r}, lora_alpha={alpha!r} for {module} are not a "
                              "rank >= 1 and a finite number", field=self.field, fix="Check adapter_config.json.")
        return r, float(alpha)

    def _bad_regex(self, fields: str, exc: re.error) -> InvalidSpec:
        return InvalidSpec(f"adapter {str(self.path)!r}: {ADAPTER_CONFIG}'s {fields} holds an invalid regular "
                           f"expression ({exc}); peft could not load it", field=self.field,
                           fix="Correct the pattern in adapter_config.json (or list module names).")

    def scaling(self, module: str) -> float:
        r, alpha = self.r_alpha(module)
        return alpha / math.sqrt(r) if self.config.get("use_rslora") else alpha / r


def open_adapter(data_dir: Path, value: str, field: str, index: int = 0) -> Adapter:
    """Resolve and open an adapter directory; errors name ``field``.

    Raises:
        NotFound: no directory, or no adapter_config.json / adapter_model.safetensors in it.
        InvalidSpec: the config is not JSON, not a LoRA adapter, or selects a variant not supported.
        InvalidCheckpoint: the weights' header is malformed.
    """
    path = resolve_under(data_dir, value, field)
    fix = "Give the directory PeftModel.save_pretrained (or attach-lora) wrote, with adapter_config.json and " \
          "adapter_model.safetensors."
    if not path.is_dir():
        raise NotFound(f"adapter {value!r} is not a directory", field=field, fix=fix)
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        if not (path / name).is_file():
            raise NotFound(f"adapter {value!r} has no {name}", field=field, fix=fix)
    try:
        config = json.loads((path / ADAPTER_CONFIG).read_text(encoding="utf-8"))
    except (ValueError, RecursionError) as exc:  # JSONDecodeError, UnicodeDecodeError, over 4300 digits
        raise InvalidSpec(f"{value}/{ADAPTER_CONFIG} is not valid JSON ({exc})", field=field, fix=fix) from None
    if not isinstance(config, dict):
        raise InvalidSpec(f"{value}/{ADAPTER_CONFIG} is not a JSON object", field=field, fix=fix)
    if config.get("peft_type", "LORA") != "LORA":
        raise InvalidSpec(f"adapter {value!r} is a {config.get('peft_type')} adapter; only LoRA adapters are "
                          "supported", field=field, fix="Give a LoRA adapter (peft_type LORA).")
    bad = [k for k in UNSUPPORTED_CONFIG if config.get(k)]
    if bad:
        raise InvalidSpec(f"adapter {value!r} uses {bad[0]}={config[bad[0]]!r}, a LoRA variant this operation does "
                          "not support (LoRA, rsLoRA, DoRA, modules_to_save and trainable tokens are)", field=field,
                          fix="Merge it with peft's merge_and_unload instead.")
    for key in ("target_modules", "exclude_modules", "rank_pattern", "alpha_pattern", "layers_pattern"):
        try:  # peft matches these as regexes: one that backtracks exponentially would freeze the service
            patterns.check(config.get(key), key)
        except ValueError as exc:
            raise InvalidSpec(f"adapter {value!r}: {ADAPTER_CONFIG}'s {key}: {exc}", field=field,
                              fix=patterns.FIX) from None
    for key in ("rank_pattern", "alpha_pattern"):
        if not isinstance(config.get(key) or {}, dict):
            raise InvalidSpec(f"adapter {value!r}: {ADAPTER_CONFIG}'s {key} is a {type(config[key]).__name__}, "
                              "not an object (module pattern -> value)", field=field,
                              fix=f'Give {key} as peft writes it ({{"<module pattern>": <value>}}), or leave it out.')
    lora_config = _peft_config(path, value, field)
    try:
        weights = Checkpoint.open(path / ADAPTER_WEIGHTS)
    except SurgeryError as exc:
        exc.field = field
        raise
    return Adapter(index, path, field, config, weights, lora_config)


def _peft_config(path: Path, value: str, field: str) -> object:
    """adapter_config.json parsed as ``PeftModel.from_pretrained`` parses it (``LoraConfig.from_pretrained``, a local
    file: no hub), so a config peft refuses is refused here too (422 with peft's reason)."""
    import warnings

    from peft import LoraConfig

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            config = LoraConfig.from_pretrained(str(path))
    except (ValueError, TypeError, KeyError) as exc:
        raise InvalidSpec(f"adapter {value!r}: peft refuses its {ADAPTER_CONFIG} ({exc})", field=field,
                          fix="Give the adapter_config.json peft wrote, or correct the field named.") from None
    target = getattr(config, "target_modules", None)
    if target is None or (not isinstance(target, str) and not target):
        raise InvalidSpec(f"adapter {value!r}: {ADAPTER_CONFIG} has no target_modules", field=field,
                          fix="Give the adapter_config.json PeftModel.save_pretrained wrote (it lists the resolved "
                              "target_modules).")
    return config


# -- planning -------------------------------------------------------------------------------------------------
@dataclass
class _Change:
    """One adapter's change to one checkpoint tensor."""

    adapter: Adapter
    kind: Kind
    module: str
    keys: dict[str, str] = field(default_factory=dict)  # role -> adapter key (A, B, m, value, rows)
    ids: list[int] = field(default_factory=list)


@dataclass
class _Base:
    """The checkpoint with what is needed to map adapter names onto its tensors."""

    ckpt: Checkpoint
    prefix: str
    conv1d: set[str]
    embeddings: set[str]
    input_embedding: str
    head_param: str | None
    tied: bool
    keys: KeyMap = field(default_factory=KeyMap)  # another layout (LLaVA's language_model.model.*)

    def key(self, param: str) -> str | None:
        """The checkpoint key of model parameter ``param`` (base-model prefix added or removed, tied head)."""
        candidates = [param]
        if self.prefix and param.startswith(self.prefix + "."):
            candidates.append(param[len(self.prefix) + 1:])
        elif self.prefix:
            candidates.append(f"{self.prefix}.{param}")
        found = next((c for c in candidates if c in self.ckpt), None) or self.keys.checkpoint_key(param, self.ckpt)
        if found is None and self.tied and param == self.head_param:
            return self.input_embedding
        return found


def _open_base(ckpt: Checkpoint, run: Run) -> _Base:
    """The base's facts merge-lora needs: its architecture (the service's cache) and, from the meta-device model
    (built once: the one resolving the architecture built, on a cache miss), its Conv1D and embedding modules."""
    if ckpt.is_file or ckpt.config is None:
        raise InvalidCheckpoint(f"merge-lora needs the model directory with its config.json ({ckpt.config_problem})",
                                field="checkpoint", fix="Send the save_pretrained directory, config.json included.")
    from transformers.pytorch_utils import Conv1D

    arch, built = run.architecture_and_model(ckpt)
    model, problem = (built, None) if built is not None else build_meta_model(ckpt)
    if model is None:
        raise InvalidCheckpoint(f"the model cannot be built from config.json ({problem})", field="checkpoint",
                                fix="merge-lora needs a config.json that transformers can instantiate.")
    conv1d = {n for n, m in model.named_modules() if isinstance(m, Conv1D)}
    embeddings = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Embedding)}
    return _Base(ckpt, getattr(model, "base_model_prefix", "") or "", conv1d, embeddings, arch.input_embedding,
                 arch.head_param, arch.tied, arch.keys)


def _mismatch(adapter: Adapter, what: str, fix: str = "Merge the adapter into the checkpoint it was trained on "
                                                      "(its base_model_name_or_path).") -> InvalidSpec:
    return InvalidSpec(f"adapter {str(adapter.path)!r} does not fit the checkpoint: {what}", field=adapter.field,
                       fix=fix)


def plan_against_base(adapter: Adapter, ckpt: Checkpoint, run: Run) -> None:
    """Check ``adapter``'s modules and shapes against checkpoint ``ckpt`` (headers and a meta-device model only), as
    a merge does: ``InvalidSpec``/``InvalidCheckpoint`` naming the first mismatch."""
    _plan_adapter(adapter, _open_base(ckpt, run))


def _token_ids(adapter: Adapter, module: str) -> list[int]:
    """The token ids whose rows ``module``'s ``trainable_tokens_delta`` holds (adapter_config's
    ``trainable_token_indices``: a list for the input embedding, or module name -> ids)."""
    tti = adapter.config.get("trainable_token_indices")
    ids: object = None
    if isinstance(tti, list):
        ids = tti
    elif isinstance(tti, dict):
        ids = next((v for k, v in tti.items() if module == k or module.endswith(f".{k}")), None)
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise InvalidSpec(f"adapter {str(adapter.path)!r} saves trainable token rows for {module} but its "
                          "trainable_token_indices names no ids for it", field=adapter.field,
                          fix="Check adapter_config.json's trainable_token_indices.")
    return list(ids)


@dataclass(frozen=True)
class _AdapterPlan:
    changes: dict[str, _Change]  # checkpoint tensor -> this adapter's change to it
    ignored: list[str]  # keys peft's load would ignore (modules it does not target, a magnitude without use_dora)


def _plan_adapter(adapter: Adapter, base: _Base) -> _AdapterPlan:
    """Map every key of the adapter onto the checkpoint tensor it changes; check names and shapes (headers only)."""
    ckpt, w = base.ckpt, adapter.weights
    groups: dict[str, dict[str, str]] = {}
    changes: dict[str, _Change] = {}
    for key in sorted(w.weight_map):
        if not key.startswith(PREFIX):
            raise _mismatch(adapter, f"tensor {key!r} is not a peft adapter key (base_model.model.<module>...)",
                            "Give an adapter written by PeftModel.save_pretrained.")
        name = key.removeprefix(PREFIX)
        for role, suffix in (("A", ".lora_A.weight"), ("B", ".lora_B.weight"), ("m", ".lora_magnitude_vector"),
                             ("eA", ".lora_embedding_A"), ("eB", ".lora_embedding_B")):
            if name.endswith(suffix):
                groups.setdefault(name[: -len(suffix)], {})[role] = key
                break
        else:
            if name.endswith(TOKEN_SUFFIX):
                module = name[: -len(TOKEN_SUFFIX)]
                target = base.key(f"{module}.weight")
                if target is None:
                    raise _mismatch(adapter, f"it trains token rows of {module}, which the checkpoint lacks")
                ids = _token_ids(adapter, module)
                info, delta = ckpt.info(target), w.info(key)
                rows = info.shape[0] if info.shape else 0
                if delta.shape != (len(ids), *info.shape[1:]) or any(not 0 <= i < rows for i in ids):
                    raise _mismatch(adapter, f"{key} holds rows of shape {list(delta.shape)} for token ids "
                                             f"{ids[:8]}..., but {target} is {list(info.shape)}")
                if len(set(ids)) != len(ids):
                    raise _mismatch(adapter, f"trainable_token_indices of {module} repeat an id", "Check the ids.")
                changes[target] = _new_change(changes, target, _Change(adapter, "token_rows", module, {"rows": key},
                                                                       ids))
                continue
            if ".lora_" in name or "lora_" in name.rsplit(".", 1)[-1]:
                raise _mismatch(adapter, f"tensor {key!r} is not one merge-lora folds (LoRA A/B, DoRA magnitude, "
                                         "embedding LoRA, modules_to_save, trainable token rows)",
                                "Merge it with peft's merge_and_unload instead.")
            param = name
            for wrapper in WRAPPERS:
                param = param.replace(wrapper, ".")
            target = base.key(param)
            if target is None:
                raise _mismatch(adapter, f"it saves {param} (modules_to_save or a bias), which the checkpoint lacks")
            if tuple(ckpt.info(target).shape) != tuple(w.info(key).shape):
                raise _mismatch(adapter, f"{key} has shape {list(w.info(key).shape)} but {target} is "
                                         f"{list(ckpt.info(target).shape)}")
            if target in changes and changes[target].kind == "replaced":  # a tied pair saved twice: the first
                # key (sorted) wins, as in peft's merge_and_unload + save_pretrained (tested)
                continue
            changes[target] = _new_change(changes, target, _Change(adapter, "replaced", param, {"value": key}))
    if groups and not any(adapter.targets(m) for m in groups):  # peft's load raises NoMatchingPeftModuleError
        fields = [f for f in ("target_modules", "layers_to_transform", "layers_pattern", "exclude_modules")
                  if getattr(adapter.lora_config, f, None)]
        raise InvalidSpec(f"adapter {str(adapter.path)!r}: its {ADAPTER_CONFIG} ({', '.join(fields)}) selects none of "
                          f"the {len(groups)} LoRA modules its weights hold, e.g. {next(iter(groups))}; peft refuses "
                          "to load it", field=adapter.field,
                          fix="Correct target_modules / layers_to_transform / layers_pattern / exclude_modules.")
    ignored: list[str] = []
    for module, keys in groups.items():
        if not adapter.targets(module):  # peft creates no LoRA layer here: its load ignores these keys
            ignored.extend(sorted(keys.values()))
            continue
        target, change, unused = _plan_lora(adapter, base, module, keys, changes)
        ignored += unused
        if "base" in change.keys:  # the adapter's own copy of the base weight, which the delta is added to
            del changes[target]
        changes[target] = _new_change(changes, target, change)
    return _AdapterPlan(changes, ignored)


def _plan_lora(adapter: Adapter, base: _Base, module: str, keys: dict[str, str],
               changes: Mapping[str, _Change]) -> tuple[str, _Change, list[str]]:
    """The LoRA (embedding LoRA, DoRA) change of ``module``: its target, the change and the keys peft's load would
    ignore; ``changes`` (the adapter's other changes, read only) gives the base weight a targeted embedding saved
    beside its delta."""
    ckpt, w = base.ckpt, adapter.weights
    embedding = "eA" in keys or "eB" in keys
    a_key, b_key = (keys.get("eA"), keys.get("eB")) if embedding else (keys.get("A"), keys.get("B"))
    if a_key is None or b_key is None:
        raise _mismatch(adapter, f"{module} has only one of lora_A/lora_B", "Give a complete adapter.")
    target = base.key(f"{module}.weight")
    if target is None:
        raise _mismatch(adapter, f"target module {module} has no weight in the checkpoint ({module}.weight)")
    info = ckpt.info(target)
    if info.dtype not in FLOAT_STORAGE:
        raise _mismatch(adapter, f"{target} is stored as {info.dtype}; only F32/F16/BF16 weights are merged",
                        "Dequantize the checkpoint first.")
    a, b = w.info(a_key).shape, w.info(b_key).shape
    r, _ = adapter.r_alpha(module)
    if len(a) != 2 or len(b) != 2 or a[0] != r or b[1] != r:
        raise _mismatch(adapter, f"{module}: lora A {list(a)} and B {list(b)} do not have the configured rank {r}",
                        "Check the adapter's r and rank_pattern.")
    if embedding:
        expected = (a[1], b[0])  # (num_embeddings, dim)
    elif module in base.conv1d:
        expected = (a[1], b[0])  # Conv1D stores (in, out)
    else:
        expected = (b[0], a[1])
    if len(info.shape) != 2 or tuple(info.shape) != expected:
        raise _mismatch(adapter, f"{target} has shape {list(info.shape)}, but the adapter's {module} (A {list(a)}, "
                                 f"B {list(b)}) needs {list(expected)}")
    kind: Kind = "embedding_lora" if embedding else "lora"
    roles = {"A": a_key, "B": b_key}
    saved = changes.get(target)
    if saved is not None and saved.kind == "replaced" and ".base_layer." in saved.keys["value"]:
        # peft saves the targeted embedding itself too (save_embedding_layers): loading puts that copy into the
        # base layer, then the delta is added to it
        roles["base"] = saved.keys["value"]
    ignored: list[str] = []
    use_dora = bool(getattr(adapter.lora_config, "use_dora", False))
    if "m" in keys and not use_dora:  # peft builds a plain LoRA layer: the magnitude is an unexpected key
        ignored.append(keys["m"])
    elif use_dora and "m" not in keys:
        raise InvalidSpec(f"adapter {str(adapter.path)!r} has use_dora=true but no lora_magnitude_vector for "
                          f"{module}", field=adapter.field,
                          fix="Give the adapter as peft saved it (DoRA saves a magnitude per targeted module), or "
                              "set use_dora to false in adapter_config.json if it is plain LoRA.")
    if "m" in keys and use_dora:
        if embedding:
            raise _mismatch(adapter, f"{module}: DoRA on an embedding is not supported",
                            "Merge it with peft's merge_and_unload instead.")
        out = info.shape[1] if module in base.conv1d else info.shape[0]
        if tuple(w.info(keys["m"]).shape) != (out,):
            raise _mismatch(adapter, f"{module}: lora_magnitude_vector has shape {list(w.info(keys['m']).shape)}, "
                                     f"expected [{out}]")
        kind, roles["m"] = "dora", keys["m"]
    return target, _Change(adapter, kind, module, roles), ignored


def _new_change(changes: Mapping[str, _Change], target: str, change: _Change) -> _Change:
    """``change``, refused when ``changes`` (the adapter's others) already change ``target``."""
    if target in changes:
        raise _mismatch(change.adapter, f"{target} is changed twice by this adapter ({changes[target].kind} of "
                                        f"{changes[target].module} and {change.kind} of {change.module})",
                        "Give an adapter peft can load.")
    return change


def _combine(per_adapter: list[dict[str, _Change]], weights: list[float]) -> dict[str, list[_Change]]:
    """Every tensor with the changes to it, in request order; only LoRA deltas, or token rows with disjoint ids,
    combine. Weights other than 1 scale LoRA and DoRA deltas only."""
    out: dict[str, list[_Change]] = {}
    for changes, weight in zip(per_adapter, weights, strict=True):
        for target, change in changes.items():
            if change.kind in ("replaced", "token_rows") and weight != 1:
                raise InvalidSpec(f"adapter {str(change.adapter.path)!r} replaces {target} ({change.kind}); a weight "
                                  f"({weight}) cannot scale a replaced tensor", field=f"adapters.{change.adapter.index}"
                                  ".weight", fix="Send weight 1 for this adapter, or merge it in its own request.")
            out.setdefault(target, []).append(change)
    for target, changes in out.items():
        kinds = {c.kind for c in changes}
        if len(changes) == 1 or kinds <= {"lora", "embedding_lora"}:
            continue
        if kinds == {"token_rows"}:
            seen: set[int] = set()
            for c in changes:
                if seen & set(c.ids):
                    raise InvalidSpec(f"adapters {changes[0].adapter.index} and {c.adapter.index} both replace rows "
                                      f"{sorted(seen & set(c.ids))[:8]} of {target}", field=c.adapter.field,
                                      fix="Merge adapters whose trainable tokens do not overlap.")
                seen |= set(c.ids)
            continue
        first, second = changes[0], changes[1]
        raise InvalidSpec(f"adapters {first.adapter.index} ({first.kind}) and {second.adapter.index} ({second.kind}) "
                          f"both change {target}; only plain LoRA deltas add up", field=second.adapter.field,
                          fix="Merge these adapters in two requests, in the order you want them applied.")
    return out


def _check_residual_base(adapter: Adapter, checkpoint: Path, data_dir: Path) -> None:
    """A PiSSA/OLoRA adapter attach-lora wrote names its residual base ``<adapter>/base``: only that base fits."""
    named = adapter.config.get("base_model_name_or_path")
    residual = adapter.path / "base"
    if not isinstance(named, str) or not residual.is_dir():
        return
    try:
        target = (data_dir / named).resolve()
    except (OSError, RuntimeError, ValueError):
        return
    if target == residual.resolve() and checkpoint.resolve() != target:
        rel = residual.resolve().relative_to(data_dir.resolve())
        raise InvalidSpec(f"adapter {str(adapter.path)!r} is a PiSSA/OLoRA adapter made against its residual base "
                          f"{str(rel)!r}; merged onto another checkpoint it would count the decomposed part twice",
                          field=adapter.field, fix=f"Send \"checkpoint\": {str(rel)!r}, or convert the adapter to "
                                                   "plain LoRA first (POST /convert-adapter).")


def _other_base_warning(adapter: Adapter, checkpoint: Path, data_dir: Path) -> list[str]:
    """A warning when the adapter names another checkpoint of the data directory as its base (shapes may match by
    chance: two fine-tunes of one model). A name outside the data directory (a hub id, another machine's path) says
    nothing here."""
    named = adapter.config.get("base_model_name_or_path")
    if not isinstance(named, str) or not named or Path(named).is_absolute():
        return []
    root = data_dir.resolve()
    try:
        target = (root / named).resolve()
        if not target.is_relative_to(root) or not target.exists() or target == checkpoint.resolve():
            return []
    except (OSError, RuntimeError, ValueError):
        return []
    return [f"adapter {adapter.index} ({adapter.path.name!r}) names {named!r} as its base (base_model_name_or_path), "
            f"not the checkpoint it is merged into: check that it was trained on this checkpoint's weights"]


# -- computing ------------------------------------------------------------------------------------------------
class _Merger:
    def __init__(self, base: _Base, device: torch.device, safe_merge: bool, weights: list[float],
                 order: list[str]) -> None:
        self.base = base
        self.device = device
        self.safe_merge = safe_merge
        self.weights = weights
        self.adapter_bytes = 0
        self.nonfinite: list[str] = []  # without safe_merge: merged tensors written with NaN/Inf (warned)
        self.work = Workspace(0, torch.device("cpu"))  # lora_fold's buffers, sized by the largest target on its way
        self.following = dict(itertools.pairwise(order))  # target -> the one computed next (read hinted ahead)

    def read(self, adapter: Adapter, key: str) -> torch.Tensor:
        before = adapter.weights.bytes_read
        t = adapter.weights.read(key)
        self.adapter_bytes += adapter.weights.bytes_read - before
        return t

    def source(self, target: str, changes: list[_Change], lookahead: Lookahead):
        """What the writer writes for ``target``: token rows patched in place, else values :meth:`merge` computes on
        ``lookahead``'s worker while the tensor before it is written."""
        info = self.base.ckpt.info(target)
        if changes[0].kind == "token_rows":
            overrides: dict[int, torch.Tensor] = {}
            for c in changes:
                rows = self.read(c.adapter, c.keys["rows"]).to(info.torch_dtype)
                self._check(rows, target, c)
                overrides.update({i: rows[n] for n, i in enumerate(c.ids)})
            return RowPatchedTensor(info, self.base.ckpt.path_of(target), overrides)
        return ComputedTensor(info, lambda: lookahead.get(target))

    @torch.no_grad()
    def merge(self, target: str, changes: list[_Change], slot: int = 0) -> torch.Tensor:
        info = self.base.ckpt.info(target)
        dtype = info.torch_dtype
        if changes[0].kind == "replaced":
            value = self.read(changes[0].adapter, changes[0].keys["value"]).to(dtype)
            self._check(value, target, changes[0])
            return value
        if self.device.type == "cpu" and all(c.kind in ("lora", "embedding_lora") for c in changes):
            return self._fold(target, changes, slot)
        saved = changes[0].keys.get("base")
        if saved is not None:  # the adapter's own copy of the base weight (see _plan_lora)
            weight = self.read(changes[0].adapter, saved).to(self.device, dtype)
        else:
            weight = self.base.ckpt.read(target).to(self.device)
        merged = weight.to(torch.float32)
        for c in changes:
            a = self.read(c.adapter, c.keys["A"]).to(self.device, torch.float32)
            b = self.read(c.adapter, c.keys["B"]).to(self.device, torch.float32)
            scale = c.adapter.scaling(c.module) * self.weights[c.adapter.index]
            transposed = c.kind == "embedding_lora" or c.module in self.base.conv1d
            delta = (b @ a).T * scale if transposed else (b @ a) * scale
            del a, b
            if c.kind == "dora":  # DoraLinearVariant.merge_unsafe; the norm per output feature of W + delta
                m = self.read(c.adapter, c.keys["m"]).to(self.device, torch.float32)
                conv = c.module in self.base.conv1d
                norm = torch.linalg.norm((merged.T if conv else merged) + (delta.T if conv else delta), dim=1)
                factor = (m / norm).view(-1, 1)
                merged = (factor.T if conv else factor) * (merged + delta)
            else:
                merged = merged + delta
            del delta
        out = merged.to(dtype).cpu()
        del merged, weight
        self._check(out, target, changes[-1])
        return out

    def _fold(self, target: str, changes: list[_Change], slot: int) -> torch.Tensor:
        """Plain LoRA deltas on the CPU (:func:`lora_fold.fold`: the same values as :meth:`merge`'s general path, in
        reused buffers): the result aliases :attr:`work`'s ``slot`` until the next use of that slot, which
        :class:`Lookahead` starts only once this tensor is written."""
        info = self.base.ckpt.info(target)
        self._will_need(self.following.get(target))
        stored = self.work.take(f"stored{slot}", info.shape, info.torch_dtype)
        saved = changes[0].keys.get("base")
        if saved is not None:  # the adapter's own copy of the base weight (see _plan_lora), rounded as .to() rounds
            stored.copy_(self.read(changes[0].adapter, saved))
        else:
            self.base.ckpt.read_into(target, stored)
        deltas = [Delta(self.read(c.adapter, c.keys["A"]).to(torch.float32),
                        self.read(c.adapter, c.keys["B"]).to(torch.float32),
                        c.adapter.scaling(c.module) * self.weights[c.adapter.index],
                        c.kind == "embedding_lora" or c.module in self.base.conv1d) for c in changes]
        out = fold(stored, deltas, self.work)
        self._check(out, target, changes[-1])
        return out

    def _will_need(self, target: str | None) -> None:
        """Have the kernel start reading ``target``'s base weight into the page cache (``posix_fadvise(WILLNEED)``, not
        waited for), so that on a cold page cache its read overlaps this tensor's fold and write. A hint: where it
        cannot be given, nothing happens."""
        if target is None or not hasattr(os, "posix_fadvise"):
            return
        info = self.base.ckpt.info(target)
        try:
            fd = os.open(self.base.ckpt.path_of(target), os.O_RDONLY)
            try:
                os.posix_fadvise(fd, info.begin, info.nbytes, os.POSIX_FADV_WILLNEED)
            finally:
                os.close(fd)
        except OSError:
            pass

    def _check(self, value: torch.Tensor, target: str, change: _Change) -> None:
        if all_finite(value):
            return
        if not self.safe_merge:
            self.nonfinite.append(target)
            return
        raise InvalidSpec(f"merging adapter {str(change.adapter.path)!r} gives NaN or Inf in {target}",
                              field=change.adapter.field,
                              fix="The adapter seems broken (check its lora_A/lora_B for NaN/Inf or huge values); "
                                  "or send a smaller weight.")


# -- the operation --------------------------------------------------------------------------------------------
def merge_lora(spec: MergeLoraSpec, ctx: RunContext) -> MergeLoraResult:
    """Run ``spec``: fold the adapters into the checkpoint and write a plain checkpoint at ``output``.

    Raises:
        NotFound, PathOutsideDataDir, OutputExists: path problems (``adapters.<i>.path`` for an adapter).
        InvalidCheckpoint: no usable config.json, malformed headers.
        InvalidSpec: an adapter whose base does not match (a target missing, another shape or rank; field
            ``adapters.<i>.path``, naming the first mismatch), a LoRA variant not supported, a weight on a replaced
            tensor, adapters that change one tensor in ways that do not add up, NaN/Inf with ``safe_merge``.
    """
    run = begin(spec, ctx)
    checkpoint, output = run.checkpoint, run.output
    device = pick_device(spec.device)
    weights = [a.weight for a in spec.adapters]
    if not all(math.isfinite(w) for w in weights):  # the request model refuses these; specs built without it
        raise InvalidSpec("adapter weights must be finite", field="adapters", fix="Send finite weights.")
    ckpt = run.open()
    base = _open_base(ckpt, run)  # config.json checked against the weights first
    adapters = [open_adapter(ctx.data_dir, a.path, f"adapters.{i}.path", i) for i, a in enumerate(spec.adapters)]
    for a in adapters:
        check_output_path(output, a.path, spec.overwrite, field="output")
    for a in adapters:
        _check_residual_base(a, checkpoint, ctx.data_dir)
    planned = [_plan_adapter(a, base) for a in adapters]
    plan = _combine([p.changes for p in planned], weights)
    _check_memory(plan, base)
    warnings = list(ckpt.warnings) + [_ignored_warning(a, p.ignored) for a, p in zip(adapters, planned, strict=True)
                                      if p.ignored]
    warnings += [w for a in adapters for w in _other_base_warning(a, checkpoint, ctx.data_dir)]
    ctx.say(f"{len(plan)} tensors to merge from {len(adapters)} adapter(s)")
    order = _write_order(ckpt, plan)
    merger = _Merger(base, device, spec.safe_merge, weights, order)
    threads = fold_threads() if device.type == "cpu" else torch.get_num_threads()
    lookahead = Lookahead(order, lambda t, slot: merger.merge(t, plan[t], slot), threads)
    changes = Changes(replace={t: merger.source(t, cs, lookahead) for t, cs in plan.items()})
    with run.writing() as tmp, lookahead:
        digests = write_checkpoint(ckpt, tmp, changes, ctx, cache=ctx.digests)
        for path in ckpt.other_files():
            shutil.copyfile(path, tmp / path.name)
        files = describe_files(tmp, known=digests)
    if merger.nonfinite:
        more = f" and {len(merger.nonfinite) - 4} more" if len(merger.nonfinite) > 4 else ""
        warnings.append(f"{len(merger.nonfinite)} merged tensor(s) hold NaN or Inf: {', '.join(merger.nonfinite[:4])}"
                        f"{more}; the output will not compute (send \"safe_merge\": true to refuse such a merge)")
    linked = sorted(set(ckpt.shards) - changes.changed_shards(ckpt))
    written = sum(f.bytes for f in files if f.path not in linked)
    merged = [MergedTensor(name=t, how=[f"{c.kind} ({c.adapter.index})" for c in cs],
                           shape=list(ckpt.info(t).shape), dtype=ckpt.info(t).dtype) for t, cs in sorted(plan.items())]
    return MergeLoraResult(
        output=spec.output, merged_tensors=merged, linked_shards=linked, files=[FileInfo.of(f) for f in files],
        base_bytes_read=ckpt.bytes_read, adapter_bytes_read=merger.adapter_bytes,
        bytes_read=ckpt.bytes_read + merger.adapter_bytes, bytes_written=written, device=str(device),
        warnings=warnings, seconds=run.seconds())


def _write_order(ckpt: Checkpoint, plan: Mapping[str, list[_Change]]) -> list[str]:
    """The computed targets in the order the writer reaches them (shard by shard, each in its header's order)."""
    return [n for shard, header in ckpt.shards.items() for n in header.order
            if n in plan and ckpt.weight_map.get(n) == shard and plan[n][0].kind != "token_rows"]


def _ignored_warning(adapter: Adapter, ignored: list[str]) -> str:
    shown = ", ".join(k.removeprefix(PREFIX) for k in ignored[:4])
    more = f" and {len(ignored) - 4} more" if len(ignored) > 4 else ""
    return (f"adapter {adapter.index} ({adapter.path.name}): {len(ignored)} tensor(s) not merged, as peft's "
            f"load ignores them (its adapter_config.json's target_modules/layers_to_transform/layers_pattern/"
            f"exclude_modules/use_dora do not select them): {shown}{more}")


def _check_memory(plan: dict[str, list[_Change]], base: _Base) -> None:
    """Refuse (503) before any tensor is read when the largest targeted tensor's merge cannot fit: the stored tensor,
    W, the delta and the sum in float32, the cast result, plus the largest adapter pair."""
    if not plan:
        return
    largest = max(math.prod(base.ckpt.info(t).shape) for t in plan)
    itemsize = max(base.ckpt.info(t).nbytes // max(1, math.prod(base.ckpt.info(t).shape)) for t in plan)
    adapter = max(c.adapter.weights.info(k).nbytes * 2 for cs in plan.values() for c in cs for k in c.keys.values())
    resources.require(largest * (3 * 4 + 2 * itemsize) + adapter, field="checkpoint",
                      what="merging the largest targeted tensor",
                      fix="Give the service more memory (the merge holds a few copies of one tensor at a time).")


__all__ = ["Adapter", "MergeLoraOptions", "MergeLoraResult", "MergeLoraSpec",
           "merge_lora", "open_adapter"]
