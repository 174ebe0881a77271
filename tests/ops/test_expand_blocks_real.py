"""expand-blocks on the real SmolLM2-135M-Instruct (30 layers, tied, bf16): LLaMA Pro's interleaved identity blocks
and GPT-2's scaled init, checked with transformers."""

from __future__ import annotations

import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from adapter_surgery.demo.checkpoints import fetch_smollm2
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.expand_blocks import ExpandBlocksSpec, expand_blocks
from tests.conftest import config, link_tree, tree_digest


@pytest.fixture(scope="module")
def real_data() -> Iterator[Path]:
    smol = fetch_smollm2()
    root = smol.parent.parent / f"expand-data-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    link_tree(smol, root / "smollm2")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_smollm2_interleaved_zero_blocks_keep_logits(real_data: Path) -> None:
    before = tree_digest(real_data / "smollm2")
    r = expand_blocks(ExpandBlocksSpec(checkpoint="smollm2", output="pro", num_blocks=3, verify=True),
                      RunContext(real_data))
    out = real_data / "pro"
    assert r.new_layers == [10, 21, 32] and r.copied_from == [9, 19, 29] and r.num_layers_after == 33
    assert config(out)["num_hidden_layers"] == 33 and config(out)["tie_word_embeddings"] is True
    with safe_open(str(real_data / "smollm2/model.safetensors"), "pt") as fb, \
            safe_open(str(out / "model.safetensors"), "pt") as fp:
        assert len(fp.keys()) == len(fb.keys()) + 3 * 9
        for name in ("self_attn.q_proj.weight", "mlp.up_proj.weight", "input_layernorm.weight"):
            assert torch.equal(fp.get_tensor(f"model.layers.10.{name}").view(torch.int16),
                               fb.get_tensor(f"model.layers.9.{name}").view(torch.int16))
        for name in ("self_attn.o_proj.weight", "mlp.down_proj.weight"):
            assert not fp.get_tensor(f"model.layers.21.{name}").any()
        assert torch.equal(fp.get_tensor("model.layers.30.mlp.down_proj.weight").view(torch.int16),  # renumbered
                           fb.get_tensor("model.layers.28.mlp.down_proj.weight").view(torch.int16))
    ids = torch.randint(0, 49152, (2, 20), generator=torch.Generator().manual_seed(0))
    base = AutoModelForCausalLM.from_pretrained(real_data / "smollm2", dtype=torch.float32)
    with torch.no_grad():
        lb = base(input_ids=ids).logits
    del base
    patched, info = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    with torch.no_grad():
        assert torch.equal(patched(input_ids=ids).logits, lb)  # bitwise
    assert r.report is not None and r.report.status == "ok" and r.report.max_abs_logit_delta == 0.0
    assert r.report.passed and len(r.report.hidden_states) == 33  # of 34: one has no base twin
    assert tree_digest(real_data / "smollm2") == before


def test_smollm2_scaled_normal_std(real_data: Path) -> None:
    r = expand_blocks(ExpandBlocksSpec(checkpoint="smollm2", output="scaled", positions=[4, 20],
                                       init="scaled_normal", seed=1), RunContext(real_data))
    assert r.new_layers == [5, 22]
    expected = 0.02 / math.sqrt(2 * 32)
    assert r.init_std == pytest.approx(expected)
    with safe_open(str(real_data / "scaled" / "model.safetensors"), "pt") as f:
        values = torch.cat([f.get_tensor(f"model.layers.{j}.{m}.weight").float().reshape(-1)
                            for j in r.new_layers for m in ("self_attn.o_proj", "mlp.down_proj")])
    assert values.numel() == 2 * (576 * 576 + 576 * 1536)
    assert abs(float(values.std()) / expected - 1) < 0.02 and abs(float(values.mean())) < 0.01 * expected
