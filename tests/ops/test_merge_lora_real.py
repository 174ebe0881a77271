"""merge-lora and convert-adapter on real weights: SmolLM2-135M-Instruct (Llama, tied, bf16) and all-MiniLM-L6-v2
(BertModel), a few target modules each, against peft computed in the test (bitwise: one adapter at weight 1)."""

from __future__ import annotations

import json
import os
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from adapter_surgery.demo.checkpoints import fetch_minilm, fetch_smollm2
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.convert_adapter import ConvertAdapterSpec, convert_adapter
from tests.conftest import link_tree, tensors, tree_digest
from tests.ops.test_merge_lora import assert_same_tensors, attach, merge, train

warnings.filterwarnings("ignore", module="peft")


@pytest.fixture(scope="module")
def real_data() -> Iterator[Path]:
    smol, minilm = fetch_smollm2(), fetch_minilm()
    root = smol.parent.parent / f"test-merge-data-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    link_tree(smol, root / "smollm2")
    link_tree(minilm, root / "minilm")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_smollm2_dora_and_token_rows_bitwise_equal_to_peft(real_data: Path) -> None:
    before = tree_digest(real_data / "smollm2")
    adapter = attach(real_data, "smollm2", "smol-lora", target_modules=["q_proj", "o_proj"], layers_to_transform=[0, 1],
                     use_dora=True, trainable_token_indices=[0, 5, 49151])
    train(adapter)
    r = merge(real_data, "smollm2", ["smol-lora"], output="smol-merged")
    assert len(r.merged_tensors) == 5  # 4 projections + the embedding's rows
    # 4 projections of 576 x 576 bf16 read; the embedding's rows are patched without reading it
    assert r.base_bytes_read == 4 * 576 * 576 * 2
    model = AutoModelForCausalLM.from_pretrained(str(real_data / "smollm2"), dtype="auto")
    ref = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    ref.save_pretrained(str(real_data / "smol-peft"))
    assert_same_tensors(tensors(real_data / "smol-merged"), tensors(real_data / "smol-peft"), bitwise=True)
    ours, info = AutoModelForCausalLM.from_pretrained(str(real_data / "smol-merged"), dtype="auto",
                                                      output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    ids = AutoTokenizer.from_pretrained(str(real_data / "smollm2"))("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(ours.eval()(**ids).logits, ref(**ids).logits)
    assert tree_digest(real_data / "smollm2") == before


def test_smollm2_pissa_converted_applies_to_the_original(real_data: Path) -> None:
    init = attach(real_data, "smollm2", "smol-pissa", target_modules=["v_proj"], layers_to_transform=[3],
                  init_lora_weights="pissa_niter_2", r=4)
    trained = real_data / "smol-pissa-trained"
    shutil.copytree(init, trained, ignore=shutil.ignore_patterns("base"))
    train(trained, scale=0.05)
    convert_adapter(ConvertAdapterSpec(adapter=trained.name, initial_adapter=init.name, base="smollm2",
                                       output="smol-pissa-lora"), RunContext(real_data))
    converted = real_data / "smol-pissa-lora"
    assert json.loads((converted / "adapter_config.json").read_text())["r"] == 8
    ids = AutoTokenizer.from_pretrained(str(real_data / "smollm2"))("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        residual = AutoModelForCausalLM.from_pretrained(str(init / "base"), dtype=torch.float32)
        want = PeftModel.from_pretrained(residual, str(trained)).eval()(**ids).logits
        original = AutoModelForCausalLM.from_pretrained(str(real_data / "smollm2"), dtype=torch.float32)
        got = PeftModel.from_pretrained(original, str(converted)).eval()(**ids).logits
    # the residual base is stored in bf16: the two differ by its rounding only
    assert float((got - want).abs().max()) < 0.05
    # merging the converted adapter into the original base gives the same model as peft's merge of it
    merge(real_data, "smollm2", ["smol-pissa-lora"], output="smol-pissa-merged")
    key = "model.layers.3.self_attn.v_proj.weight"
    merged = load_file(str(real_data / "smol-pissa-merged/model.safetensors"))[key]
    original = AutoModelForCausalLM.from_pretrained(str(real_data / "smollm2"), dtype="auto")
    ref = PeftModel.from_pretrained(original, str(converted)).merge_and_unload()
    assert torch.equal(merged, ref.state_dict()[key])


def test_minilm_encoder_bitwise_equal_to_peft(real_data: Path) -> None:
    adapter = attach(real_data, "minilm", "mini-lora", target_modules=["query", "value"], r=4,
                     layers_to_transform=[0, 5])
    train(adapter)
    r = merge(real_data, "minilm", ["mini-lora"], output="mini-merged")
    assert len(r.merged_tensors) == 4
    model = AutoModel.from_pretrained(str(real_data / "minilm"), dtype="auto")
    ref = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload().eval()
    ours, info = AutoModel.from_pretrained(str(real_data / "mini-merged"), dtype="auto", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set()
    theirs = ref.state_dict()
    merged = tensors(real_data / "mini-merged")
    for t in r.merged_tensors:
        key = next(k for k in theirs if t.name.endswith(k) or k.endswith(t.name))
        assert torch.equal(merged[t.name], theirs[key]), t.name
    ids = AutoTokenizer.from_pretrained(str(real_data / "minilm"))("a sentence to embed", return_tensors="pt")
    with torch.no_grad():
        assert torch.equal(ours.eval()(**ids).last_hidden_state, ref(**ids).last_hidden_state)
