"""Synthetic Llama-shaped checkpoints for the bench, built once and cached under ``.cache/bench/<size>/base``.

Random bf16 (N(0, 0.02), norms 1) streamed tensor by tensor straight into safetensors files (the header is written
from the shapes first), so memory stays at one tensor, never a shard or a model. Sharded like real releases: at most
5 GB per shard; where ``embed_alone`` is set the embedding sits alone in the first shard. With ``sparse`` (the 7B
shape) the shards that hold neither the embedding nor the LM head are header-correct files whose data regions are
holes (never written: no disk used, read back as zeros), which is enough for every operation that only rewrites the
embedding/head shards or reads headers.

Each size comes with ``config.json`` and a tokenizer whose length equals the embedding rows: the SmolLM2 tokenizer
for the 49152-row shapes, otherwise a byte-level BPE built from merges of byte pairs.

``python bench/checkpoints.py 0.13b 1b`` builds (or finds) the caches and prints their paths.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CACHE = ROOT / ".cache" / "bench"
SHARD_BYTES = 5_000_000_000


@dataclass(frozen=True)
class Shape:
    hidden: int
    inter: int
    layers: int
    heads: int
    kv: int
    vocab: int
    like: str  # the release whose shapes these are
    embed_alone: bool = False
    sparse: bool = False


SIZES: dict[str, Shape] = {
    "0.13b": Shape(576, 1536, 30, 9, 3, 49152, "SmolLM2-135M, untied"),
    "1b": Shape(2048, 5632, 22, 32, 4, 32000, "TinyLlama-1.1B"),
    "3b": Shape(3072, 8192, 28, 24, 8, 49152, "Llama-3.2-3B, vocab 49152, untied", embed_alone=True),
    "7b": Shape(4096, 11008, 32, 32, 32, 32000, "Llama-2-7B; layer shards sparse", embed_alone=True, sparse=True),
}

Tensor = tuple[str, tuple[int, ...]]


def groups(s: Shape) -> list[list[Tensor]]:
    """Tensor names and shapes in save order, one group per layer (embedding first, norm + head last)."""
    h, i, kv = s.hidden, s.inter, s.hidden // s.heads * s.kv
    out = [[("model.embed_tokens.weight", (s.vocab, h))]]
    for n in range(s.layers):
        p = f"model.layers.{n}."
        out.append([(p + "self_attn.q_proj.weight", (h, h)), (p + "self_attn.k_proj.weight", (kv, h)),
                    (p + "self_attn.v_proj.weight", (kv, h)), (p + "self_attn.o_proj.weight", (h, h)),
                    (p + "mlp.gate_proj.weight", (i, h)), (p + "mlp.up_proj.weight", (i, h)),
                    (p + "mlp.down_proj.weight", (h, i)), (p + "input_layernorm.weight", (h,)),
                    (p + "post_attention_layernorm.weight", (h,))])
    out.append([("model.norm.weight", (h,)), ("lm_head.weight", (s.vocab, h))])
    return out


def _nbytes(tensors: list[Tensor]) -> int:
    return sum(math.prod(sh) * 2 for _, sh in tensors)


def pack(s: Shape) -> list[list[Tensor]]:
    """Groups packed into shards of at most ``SHARD_BYTES`` (the embedding alone first where ``embed_alone``)."""
    gs = groups(s)
    shards: list[list[Tensor]] = [list(gs[0])] if s.embed_alone else [[]]
    if s.embed_alone:
        shards.append([])
        gs = gs[1:]
    for grp in gs:
        if shards[-1] and _nbytes(shards[-1]) + _nbytes(grp) > SHARD_BYTES:
            shards.append([])
        shards[-1].extend(grp)
    return shards


def model_bytes(size: str) -> int:
    return sum(_nbytes(g) for g in groups(SIZES[size]))


def parameters(size: str) -> int:
    return model_bytes(size) // 2


def _write_shard(path: Path, tensors: list[Tensor], real: bool) -> None:
    import torch

    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensors:
        n = math.prod(shape) * 2
        header[name] = {"dtype": "BF16", "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    with path.open("wb") as fh:
        fh.write(len(raw).to_bytes(8, "little") + raw)
        if not real:
            fh.truncate(8 + len(raw) + offset)
            return
        for name, shape in tensors:
            if len(shape) == 1:
                t = torch.ones(shape, dtype=torch.bfloat16)
            else:
                g = torch.Generator().manual_seed(zlib.crc32(name.encode()))
                t = torch.empty(shape, dtype=torch.bfloat16).normal_(0.0, 0.02, generator=g)
            fh.write(t.view(torch.uint8).numpy().data)
            del t
        fh.flush()
        os.fsync(fh.fileno())


def _byte_bpe(vocab_size: int):
    """A byte-level BPE with exactly ``vocab_size`` entries: 3 specials, the 256 byte symbols, then merges of
    symbol pairs (each merge's parts exist, so the model is valid)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {"<s>": 0, "</s>": 1, "<unk>": 2}
    for c in alphabet:
        vocab[c] = len(vocab)
    merges: list[tuple[str, str]] = []
    for a in alphabet:
        for b in alphabet:
            if len(vocab) >= vocab_size:
                break
            vocab[a + b] = len(vocab)
            merges.append((a, b))
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    return tok


def _tokenizer(dest: Path, s: Shape) -> tuple[int, int]:
    """Write the tokenizer files; return (bos, eos) ids."""
    if s.vocab == 49152:
        from adapter_surgery.demo.checkpoints import fetch_smollm2

        src = fetch_smollm2()
        for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
            if (src / name).exists():
                shutil.copyfile(src / name, dest / name)
        return 1, 2
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(tokenizer_object=_byte_bpe(s.vocab), bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")
    assert len(fast) == s.vocab, (len(fast), s.vocab)
    fast.save_pretrained(dest)
    return 0, 1


def build(size: str) -> Path:
    """The cached checkpoint directory of ``size`` (built on first use, atomically)."""
    s = SIZES[size]
    dest = CACHE / size / "base"
    if (dest / "config.json").exists():
        return dest
    from transformers import LlamaConfig

    tmp = dest.with_name("base.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    shards = pack(s)
    weight_map: dict[str, str] = {}
    for k, shard in enumerate(shards, 1):
        name = f"model-{k:05d}-of-{len(shards):05d}.safetensors" if len(shards) > 1 else "model.safetensors"
        names = {n for n, _ in shard}
        real = not s.sparse or bool(names & {"model.embed_tokens.weight", "lm_head.weight"})
        _write_shard(tmp / name, shard, real)
        weight_map.update(dict.fromkeys(names, name))
        print(f"  {size}: {name} ({_nbytes(shard) / 1e9:.2f} GB{'' if real else ', sparse'})", file=sys.stderr)
    if len(shards) > 1:
        index = {"metadata": {"total_size": model_bytes(size)}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    bos, eos = _tokenizer(tmp, s)
    LlamaConfig(hidden_size=s.hidden, intermediate_size=s.inter, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, num_key_value_heads=s.kv, vocab_size=s.vocab, bos_token_id=bos,
                eos_token_id=eos, tie_word_embeddings=False, dtype="bfloat16").save_pretrained(tmp)
    tmp.rename(dest)
    return dest


if __name__ == "__main__":
    for arg in sys.argv[1:] or list(SIZES):
        print(build(arg))
