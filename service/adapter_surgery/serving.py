"""What serving runtimes load, as data: the LoRA adapters a runtime refuses, why, and what makes them loadable.

attach-lora and surgery take ``"serving": "vllm"``: an adapter that runtime cannot load is then refused (422, the
field at fault and the option that makes it loadable); without it, the result's warnings name the runtimes that
could not load it. Everything here reads plain values (``adapter_config.json`` as a dict, per-module ranks, tensor
names): no torch, no peft.

vLLM: what was checked, and where
---------------------------------
Read from ``vllm-project/vllm`` (commit 0332189ea9ba of ``vllm/lora/peft_helper.py`` and
``tests/lora/test_peft_helper.py``, the newest found; also e745bafffc44 of ``peft_helper.py``, 0fd157078c53 of
``vllm/lora/utils.py``, 0306474e9d1f of ``vllm/lora/lora_model.py``, 01230b40128e of ``vllm/config/lora.py``; vLLM
0.10-0.11 era main and after). The loader builds ``PEFTHelper.from_dict(adapter_config.json)`` (fields it does not
know are dropped), calls ``validate_legal(lora_config)``, then maps every tensor name with
``parse_fine_tuned_lora_name``. Rules, each with what was verified:

- ``use_dora`` true: ``_validate_features`` "vLLM does not yet support DoRA."; ``LoRAModel.from_lora_tensors``
  raises NotImplementedError for DoRA and for ``lora_magnitude_vector`` tensors. Verified (tests/lora ERROR_CASES).
- ``modules_to_save``: the newest ``peft_helper.py`` read (the version whose tests list ``test_pissa``,
  ``test_lora_bias``, ``test_rank_pattern``) refuses any module but the classification heads: "vLLM only supports
  modules_to_save being either None or ["classifier", "score"] for classification models". Older ones (0332189,
  e745baf) refuse any non-empty list: classification heads pass here with a note naming that. Verified.
- ``bias`` other than ``"none"``: "Adapter bias is not supported." (0332189; older versions: only with
  ``--enable-lora-bias``). Verified.
- ``lora_bias`` true (a bias on lora_B): not a PEFTHelper field (dropped), and its ``lora_B.bias`` tensors are not
  names ``parse_fine_tuned_lora_name`` maps ("... is unsupported LoRA weight"). Verified through the key parser.
- ``layer_replication``: not a PEFTHelper field (dropped): vLLM would apply the adapter to the original layers
  while the adapter's tensors name replicated ones. Inferred from the dataclass fields, not from an explicit check.
- ``trainable_token_indices``: their ``...token_adapter.trainable_tokens_delta`` tensors are not names the parser of
  ``utils.py`` (0fd157078c53) maps; vLLM main at 0332189 validates them and loads them only when started with
  ``--max-lora-trainable-tokens`` >= the number of ids. Refused here (released loaders fail), the flag named.
- ``r`` > ``max_lora_rank``: "LoRA rank R is greater than max_lora_rank M." vLLM's default is 16 and the flag takes
  1, 8, 16, 32, 64, 128, 256, 320 or 512 (``MaxLoRARanks`` in config/lora.py). ``rank_pattern`` is not a PEFTHelper
  field: every module's tensors are copied into buffers of ``max_lora_rank``, so any module's rank must fit too.
- one scaling for all modules: ``LoRALayerWeights.from_config`` gives every module
  ``vllm_lora_scaling_factor = lora_alpha / r`` (``/ sqrt(r)`` with rsLoRA); ``rank_pattern``/``alpha_pattern``
  are dropped. A module whose own scaling (its alpha over its rank) differs would be served with the wrong scale,
  silently. Refused. Inferred from the code paths above.
- tensor names: only ``*.lora_A.weight``, ``*.lora_B.weight``, ``*.lora_embedding_A``, ``*.lora_embedding_B`` (and
  the skipped ``*.embed_tokens.base_layer.weight`` / ``*.lm_head.base_layer.weight``) are mapped; anything else
  raises "is unsupported LoRA weight". :func:`unloadable_keys` checks the written adapter against this list.
- PiSSA / OLoRA / CorDA / LoftQ (``init_lora_weights``): the newest ``peft_helper.py`` read refuses them ("Inits
  such as PiSSA, OLoRA, CorDA and LoftQ modify the base model weights when PEFT loads the adapter. Convert it to a
  regular LoRA adapter"); older ones check nothing, and the adapter would be applied to the original base, wrongly.
  Refused: after training, ``POST /convert-adapter`` makes a plain LoRA of rank 2 r for the original base.
- per-module ranks and alphas: the newest version applies ``rank_pattern``/``alpha_pattern`` per module
  (``get_rank_and_scaling``); older ones do not (above), so a module whose scaling differs stays refused.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

#: The runtimes a request can name in ``serving``.
Runtime = Literal["vllm"]
RUNTIMES: tuple[str, ...] = ("vllm",)

#: vLLM's ``--max-lora-rank`` default, and the values the flag accepts (``MaxLoRARanks``, vllm/config/lora.py).
VLLM_DEFAULT_MAX_LORA_RANK = 16
VLLM_MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
#: Tensor names vLLM's ``parse_fine_tuned_lora_name`` maps, and the base copies its loader skips.
VLLM_LOADABLE_KEY = re.compile(r"\.(lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B)$"
                               r"|\.(embed_tokens|lm_head)\.base_layer\.weight$"
                               r"|\.(classifier|score)\.(.+\.)?(weight|bias)$")
#: ``modules_to_save`` entries vLLM loads (classification heads), in its newest loader.
VLLM_HEAD_MODULES = ("classifier", "score")
#: ``init_lora_weights`` values whose adapter applies to a changed (residual or quantized) base.
RESIDUAL_INITS = re.compile(r"^(pissa(_niter_\d+)?|olora|corda|loftq)$", re.IGNORECASE)

MERGE_FIX = "or, after training, fold the adapter into the base with POST /merge-lora and serve the merged model"


@dataclass(frozen=True)
class Rule:
    """One ``adapter_config.json`` field a runtime refuses: when (``refuses`` over the field's value), why, fix."""

    field: str
    refuses: Callable[[Any], bool]
    reason: str
    fix: str


@dataclass(frozen=True)
class Problem:
    """Why ``runtime`` cannot load the adapter (``blocking``), or what serving it needs (a note); ``field``: the
    request field at fault (dotted), ``fix``: the option that makes it loadable."""

    runtime: str
    field: str
    reason: str
    fix: str
    blocking: bool = True

    def text(self) -> str:
        return f"{self.field}: {self.reason} Fix: {self.fix}"


@dataclass(frozen=True)
class ModuleRank:
    """One adapted module's rank and lora_alpha, as peft sets them (``rank_pattern``/``alpha_pattern`` applied)."""

    name: str
    r: int
    lora_alpha: float


VLLM_RULES: tuple[Rule, ...] = (
    Rule("use_dora", bool,
         "vLLM does not yet support DoRA (its loader refuses use_dora and the lora_magnitude_vector tensors).",
         "Send use_dora false (plain LoRA), " + MERGE_FIX + "."),
    Rule("modules_to_save", lambda v: bool(v) and any(m not in VLLM_HEAD_MODULES for m in v),
         "vLLM only supports modules_to_save being None or the classification heads [\"classifier\", \"score\"]: "
         "other modules trained in full (embed_tokens, lm_head, qa_outputs) cannot be loaded as part of an adapter.",
         "Leave modules_to_save out: for new tokens, extend-vocab the base (their rows initialized there) and serve "
         "that base, with LoRA on lm_head through target_modules if the head must adapt; " + MERGE_FIX + "."),
    Rule("bias", lambda v: v not in (None, "none"),
         "vLLM refuses adapters with biases (\"Adapter bias is not supported\").",
         'Send bias "none".'),
    Rule("lora_bias", bool,
         "vLLM's loader does not map lora_B.bias tensors (\"unsupported LoRA weight\").",
         "Send lora_bias false."),
    Rule("layer_replication", bool,
         "vLLM ignores layer_replication: the adapter's tensors name layers its model does not have.",
         "Leave layer_replication out; expand the base itself (POST /expand-blocks) and adapt that base."),
    Rule("trainable_token_indices", lambda v: v is not None and len(v) > 0,
         "vLLM's released loaders do not map the trainable token rows (token_adapter.trainable_tokens_delta: "
         "\"unsupported LoRA weight\"); vLLM main loads them only when started with --max-lora-trainable-tokens at "
         "least the number of ids.",
         "Leave trainable_token_indices out: extend-vocab the base (the new rows initialized there, e.g. mean or "
         "hewitt) and serve that base; " + MERGE_FIX + "."),
)

RULES: dict[str, tuple[Rule, ...]] = {"vllm": VLLM_RULES}

#: ``modules_to_save`` that only holds the task head peft adds for a task type (not the request's own list).
TASK_HEAD_REASON = ("peft trains the {task} head ({heads}) in full and saves it in the adapter (modules_to_save), and "
                    "vLLM loads only the classification heads classifier/score that way.")
TASK_HEAD_FIX = ("After training, fold the adapter into the base with POST /merge-lora and serve the merged model; "
                 "an adapter for a {task} model always carries its head.")


def vllm_rank_flag(r: int) -> int | None:
    """The smallest ``--max-lora-rank`` value vLLM accepts that fits rank ``r`` (None above 512)."""
    return next((m for m in VLLM_MAX_LORA_RANKS if m >= r), None)


def problems(runtime: str, config: Mapping[str, Any], modules: Iterable[ModuleRank] = (), *,
             max_lora_rank: int | None = None) -> list[Problem]:
    """Everything ``runtime`` refuses in the adapter described by ``config`` (``adapter_config.json``'s fields as
    ``peft.LoraConfig.to_dict`` gives them, ``init_lora_weights`` as requested) and ``modules`` (each adapted
    module's rank and alpha); notes (``blocking`` false) for adapters it loads only on a condition.

    ``max_lora_rank``: the runtime's rank limit the adapter will be served with (vLLM: ``--max-lora-rank``,
    default 16)."""
    if runtime != "vllm":
        raise ValueError(f"unknown serving runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    found = [Problem(runtime, rule.field, rule.reason, rule.fix) for rule in RULES[runtime]
             if rule.refuses(config.get(rule.field))]
    limit = max_lora_rank or VLLM_DEFAULT_MAX_LORA_RANK
    modules = list(modules)
    found += _rank_problems(runtime, config, modules, limit)
    found += _scaling_problems(runtime, config, modules)
    found += _residual_problems(runtime, config, modules, limit)
    heads = config.get("modules_to_save") or []
    if heads and all(m in VLLM_HEAD_MODULES for m in heads):
        found.append(Problem(runtime, "modules_to_save", "vLLM loads a classification head saved in the adapter "
                             f"({', '.join(heads)}) since its loader accepts [\"classifier\", \"score\"]; older "
                             "releases refuse any modules_to_save.",
                             "Serve with a vLLM that accepts classification heads, or "
                             + MERGE_FIX.removeprefix("or, ") + ".", blocking=False))
    return found


def _largest_rank(config: Mapping[str, Any], modules: list[ModuleRank]) -> tuple[int, str]:
    """The adapter's largest rank (over ``modules``, or over ``r`` and ``rank_pattern`` without them) and the
    request field that sets it."""
    pattern = dict(config.get("rank_pattern") or {})
    r = int(config.get("r") or 0)
    ranks = [m.r for m in modules] or [r, *pattern.values()]
    rank = max(ranks, default=r)
    if rank == r:
        return rank, "r"
    key = next((k for k, v in pattern.items() if v == rank), None)
    return rank, f"rank_pattern.{key}" if key is not None else "rank_pattern"


def _rank_problems(runtime: str, config: Mapping[str, Any], modules: list[ModuleRank], limit: int) -> list[Problem]:
    rank, field = _largest_rank(config, modules)
    if rank <= limit:
        return []
    flag = vllm_rank_flag(rank)
    serve = (f"or serve with --max-lora-rank {flag} and send max_lora_rank {flag}" if flag is not None
             else f"vLLM accepts --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]} at most")
    return [Problem(runtime, field, f"LoRA rank {rank} is greater than max_lora_rank {limit} (vLLM's default is "
                                    f"{VLLM_DEFAULT_MAX_LORA_RANK}); every module's rank must fit.",
                    f"Send ranks <= {limit}, {serve}.")]


def _scale(r: float, alpha: float, rslora: bool) -> float:
    return alpha / math.sqrt(r) if rslora else alpha / r


def _scaling_problems(runtime: str, config: Mapping[str, Any], modules: list[ModuleRank]) -> list[Problem]:
    r, alpha, rslora = config.get("r"), config.get("lora_alpha"), bool(config.get("use_rslora"))
    if not r or alpha is None:
        return []
    served = _scale(r, alpha, rslora)
    odd = [m for m in modules if not math.isclose(_scale(m.r, m.lora_alpha, rslora), served, rel_tol=1e-9)]
    if not odd:
        return []
    m = odd[0]
    field = "alpha_pattern" if config.get("alpha_pattern") else "rank_pattern"
    formula = "lora_alpha / sqrt(r)" if rslora else "lora_alpha / r"
    return [Problem(runtime, field, f"vLLM applies one scaling, {formula} = {served:g}, to every module "
                                    f"(rank_pattern/alpha_pattern are dropped); {len(odd)} module(s) would be served "
                                    f"with the wrong scale, e.g. {m.name} (r={m.r}, lora_alpha={m.lora_alpha:g}: "
                                    f"{_scale(m.r, m.lora_alpha, rslora):g}).",
                    f"Keep every module's {formula} equal to {served:g}: give each rank_pattern entry the "
                    f"alpha_pattern entry that keeps it (for {m.name}: lora_alpha "
                    f"{served * (math.sqrt(m.r) if rslora else m.r):g}), or drop rank_pattern/alpha_pattern.")]


def _residual_problems(runtime: str, config: Mapping[str, Any], modules: list[ModuleRank],
                       limit: int) -> list[Problem]:
    init = config.get("init_lora_weights")
    if not (isinstance(init, str) and RESIDUAL_INITS.match(init)):
        return []
    rank, _ = _largest_rank(config, modules)
    converted = 2 * rank
    flag = vllm_rank_flag(converted)
    fits = (f"rank 2 r = {converted}: serve with --max-lora-rank {flag}" if flag else
            f"rank 2 r = {converted} is above vLLM's largest --max-lora-rank {VLLM_MAX_LORA_RANKS[-1]}: "
            "send a smaller r")
    fits = fits if converted > limit else f"rank 2 r = {converted} fits max_lora_rank {limit}"
    return [Problem(runtime, "init_lora_weights",
                    f"vLLM refuses init_lora_weights {init!r}: such an adapter applies to its residual base "
                    "(<output>/base), not to the checkpoint, and vLLM serves adapters on the original base.",
                    "Train it, then POST /convert-adapter: a plain LoRA of rank 2 r for the original base, which vLLM "
                    f"serves ({fits}), and leave serving out of this request; or send init_lora_weights true "
                    "(plain LoRA).")]


def unloadable_keys(runtime: str, keys: Iterable[str]) -> list[str]:
    """The adapter tensor names ``runtime``'s loader does not map (vLLM: ``parse_fine_tuned_lora_name``)."""
    if runtime != "vllm":
        raise ValueError(f"unknown serving runtime {runtime!r}; known: {', '.join(RUNTIMES)}")
    return sorted(k for k in keys if not VLLM_LOADABLE_KEY.search(k))
