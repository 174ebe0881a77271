"""extend-vocab ``untie: true`` on MLM heads whose decoder bias transformers ties to the head's own bias."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForMaskedLM

from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, extend_vocab
from tests.coverage.families import FAMILIES, IDS

MLM = {f.name: f for f in FAMILIES if f.name in ("BERT", "RoBERTa", "DeBERTa-v2")}


@pytest.mark.parametrize("name", sorted(MLM))
def test_untie_stores_the_decoder_bias(tmp_path: Path, name: str) -> None:
    MLM[name].build(tmp_path / "base")
    result = extend_vocab(ExtendVocabSpec(checkpoint="base", output="out", tokens=["<x>"], untie=True),
                          RunContext(tmp_path))
    model, info = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "out"), output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and not info["mismatched_keys"]
    base = AutoModelForMaskedLM.from_pretrained(str(tmp_path / "base"))
    with torch.no_grad():
        assert torch.equal(model(IDS).logits[..., :base.config.vocab_size], base(IDS).logits)
    bias = next(c.name for c in result.changed_tensors if c.name.endswith("decoder.bias"))
    stored = load_file(str(tmp_path / "out" / "model.safetensors"))
    own = bias.removesuffix("decoder.bias") + "bias"
    assert torch.equal(stored[bias], stored[own])  # a copy of the (grown) output bias
    assert stored[bias].shape[0] == base.config.vocab_size + 1
