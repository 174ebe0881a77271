"""The probe inputs: random sequences drawn from the old vocabulary (seeded), plus an optional text."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from adapter_surgery.io import Checkpoint
from adapter_surgery.model.roles import resolve_architecture
from adapter_surgery.report.models import ProbeSummary, Skip, VerifyOptions
from adapter_surgery.tokenizer_cache import load_tokenizer


def _max_positions(cfg: dict[str, Any]) -> int | None:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else cfg
    for key in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        if isinstance(text.get(key), int) and text[key] > 0:
            return int(text[key])
    return None


def _old_vocab(ckpt: Checkpoint, tok) -> int:
    rows = resolve_architecture(ckpt).vocab_rows
    return min(rows, len(tok)) if tok is not None else rows


def probe_inputs(base: Path, options: VerifyOptions | None = None) -> list[torch.Tensor]:
    """The probe token ids (1-D int64 tensors) the report runs for ``base``: random ones, then the text."""
    ckpt = Checkpoint.open(base)
    return draw_probes(ckpt, load_tokenizer(ckpt, lenient=True), options or VerifyOptions())[0]


def draw_probes(ckpt: Checkpoint, tok, opts: VerifyOptions) -> tuple[list[torch.Tensor], ProbeSummary]:
    vocab = _old_vocab(ckpt, tok)
    special = set(getattr(tok, "all_special_ids", []) or []) if tok is not None else set()
    pool = torch.tensor([i for i in range(vocab) if i not in special], dtype=torch.long)
    if pool.numel() == 0:
        raise Skip("the base vocabulary has no ordinary token to draw probes from")
    max_pos = _max_positions(ckpt.config or {})
    length = min(opts.probe_length, max_pos) if max_pos else opts.probe_length
    gen = torch.Generator().manual_seed(opts.seed)
    probes = [pool[torch.randint(pool.numel(), (length,), generator=gen)] for _ in range(opts.num_probes)]
    text_tokens = None
    if opts.text and tok is not None:
        ids = tok(opts.text, add_special_tokens=True)["input_ids"][: max_pos or None]
        ids = [i for i in ids if i < vocab]
        if ids:
            probes.append(torch.tensor(ids, dtype=torch.long))
            text_tokens = len(ids)
    summary = ProbeSummary(sequences=len(probes), length=length, seed=opts.seed, text_tokens=text_tokens,
                           old_vocab_size=vocab)
    return probes, summary

