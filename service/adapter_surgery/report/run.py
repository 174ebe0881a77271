"""Running one model on the probes: loaded with ``transformers`` in float32, its logits, hidden states and the
tensors the checks need kept as float32 CPU copies."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from adapter_surgery.model.roles import quiet_transformers
from adapter_surgery.report.models import Skip


@dataclass
class ModelRun:
    """What one model produced on the probes (float32, CPU)."""

    kind: Literal["lm", "classifier", "backbone"]
    logits: list[torch.Tensor | None]
    hidden: list[list[torch.Tensor]]  # per probe: per layer (length, hidden)
    state_names: list[str]
    prefix: str
    params: dict[str, torch.Tensor] = field(default_factory=dict)
    initializer_range: float = 0.02
    num_layers: int = 1
    load_problems: list[str] = field(default_factory=list)



def load_model(path: Path, device: torch.device | str = "cpu") -> tuple[torch.nn.Module, dict[str, Any]]:
    """Load the model directory ``path`` in float32 with the class its config names (``AutoModel`` fallback).

    Returns the model in eval mode on ``device`` and ``transformers``' loading info (missing/unexpected keys).
    """
    import transformers

    with quiet_transformers():
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        names = [n for n in (getattr(config, "architectures", None) or []) if hasattr(transformers, n)]
        candidates = [getattr(transformers, n) for n in names[:1]] or [transformers.AutoModelForCausalLM,
                                                                        transformers.AutoModel]
        last: Exception | None = None
        for cls in candidates:
            try:
                model, info = cls.from_pretrained(str(path), dtype=torch.float32, local_files_only=True,
                                                  output_loading_info=True)
                return model.to(device).eval(), info
            except ValueError as exc:  # an Auto class without a mapping for this model type
                last = exc
        raise RuntimeError(f"no transformers class could load {path.name}: {last}")


def _kind(model: torch.nn.Module) -> Literal["lm", "classifier", "backbone"]:
    if getattr(model, "get_output_embeddings", lambda: None)() is not None:
        return "lm"
    if type(model).__name__.endswith(("ForSequenceClassification", "ForTokenClassification")):
        return "classifier"
    return "backbone"


@torch.no_grad()
def run_model(path: Path, probes: list[torch.Tensor], device: torch.device,
              keep: Callable[[str, str], bool], check: Callable[[], None] | None = None) -> ModelRun:
    """Run the model at ``path`` on each probe; keep (float32 copies of) the tensors ``keep(name, prefix)`` picks.

    ``check`` (a run context's ``check_cancelled``) is called after the model is loaded and before each probe: what
    it raises (``Cancelled``) ends the run."""
    check = check or (lambda: None)
    try:
        model, info = load_model(path, device)
    except Exception as exc:
        raise Skip(f"{path.name} could not be loaded with transformers ({type(exc).__name__}: {exc})") from None
    problems = []
    for key in ("missing_keys", "unexpected_keys", "mismatched_keys"):
        found = sorted(str(k) for k in (info.get(key) or []))
        if found:
            problems.append(f"{len(found)} {key.replace('_', ' ')} when loading (e.g. {found[0]})")
    kind = _kind(model)
    logits: list[torch.Tensor | None] = []
    hidden: list[list[torch.Tensor]] = []
    for ids in probes:
        check()
        ids = ids.to(device)[None]
        out = model(input_ids=ids, attention_mask=torch.ones_like(ids), output_hidden_states=True)
        lg = getattr(out, "logits", None)
        logits.append(None if lg is None else lg[0].float().cpu())
        hs = getattr(out, "hidden_states", None) or ()
        hidden.append([h[0].float().cpu() for h in hs])
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    prefix = getattr(model, "base_model_prefix", "") or ""
    state = model.state_dict()
    params = {n: t.detach().float().cpu() for n, t in state.items() if t.is_floating_point() and keep(n, prefix)}
    run = ModelRun(kind=kind, logits=logits, hidden=hidden, state_names=list(state), prefix=prefix, params=params,
               initializer_range=float(getattr(cfg, "initializer_range", 0.02) or 0.02),
               num_layers=int(getattr(cfg, "num_hidden_layers", 1) or 1), load_problems=problems)
    del model
    return run

