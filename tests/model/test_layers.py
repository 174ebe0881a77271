"""Layer facts learned on the meta device: the layer list, its key prefix, the residual writers, config lists."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    AutoModelForCausalLM,
    FalconConfig,
    GPTNeoXConfig,
    LlamaConfig,
    LlamaModel,
    PhiConfig,
    Qwen2MoeConfig,
)

from adapter_surgery.io import Checkpoint
from adapter_surgery.model.layers import find_layer_list, layer_facts, renumbered_config, residual_writers
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.expand_blocks import ExpandBlocksSpec, expand_blocks
from tests.conftest import config
from tests.fixtures import _randomize, _save_model

SMALL = dict(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.mark.parametrize(("cfg", "path", "writers"), [
    (GPTNeoXConfig(**SMALL), "gpt_neox.layers", ["attention.dense", "mlp.dense_4h_to_h"]),
    (FalconConfig(**{k: v for k, v in SMALL.items() if k != "intermediate_size"}), "transformer.h",
     ["self_attention.dense", "mlp.dense_4h_to_h"]),
    (PhiConfig(**SMALL), "model.layers", ["self_attn.dense", "mlp.fc2"]),
    (Qwen2MoeConfig(**SMALL, moe_intermediate_size=16, shared_expert_intermediate_size=16, num_experts=4),
     "model.layers", ["self_attn.o_proj", "mlp.shared_expert.down_proj", "mlp.experts.down_proj"]),
])
def test_residual_writers_found_structurally(cfg, path: str, writers: list[str]) -> None:
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(cfg)
    name, layers = find_layer_list(model, 2)
    assert name == path
    assert residual_writers(layers[0], 32) == writers


def test_facts_of_fixtures(data_dir, build) -> None:
    gpt2 = layer_facts(Checkpoint.open(data_dir / build("FX-A")))
    assert (gpt2.key_prefix, gpt2.count, gpt2.count_key, gpt2.layer_class) == ("transformer.h", 2, "n_layer",
                                                                               "GPT2Block")
    assert gpt2.residual_writers == ("attn.c_proj", "mlp.c_proj")
    assert gpt2.residual_module("attn.c_proj.bias") == "attn.c_proj"
    assert gpt2.residual_module("attn.c_attn.weight") is None
    assert gpt2.split_key("transformer.h.1.ln_2.weight") == (1, "ln_2.weight")
    assert gpt2.split_key("lm_head.weight") is None
    llama = layer_facts(Checkpoint.open(data_dir / build("FX-B")))
    assert llama.key_prefix == "model.layers" and set(llama.params[0]) >= {"self_attn.o_proj.weight"}
    assert llama.residual_module("mlp.experts.3.down_proj.weight") is None


def test_renumbered_config_follows_sources() -> None:
    from adapter_surgery.model.layers import Layers

    layers = Layers(module_path="model.layers", key_prefix="model.layers", count=3, layer_class="X", params=[{}] * 3,
                    residual_writers=(), hidden_size=8, count_key="num_hidden_layers", config_path="text_config",
                    per_layer={"layer_types": ["a", "b", "c"]}, index_lists={"mlp_only_layers": [1]})
    cfg = {"model_type": "m", "text_config": {"num_hidden_layers": 3, "layer_types": ["a", "b", "c"],
                                              "mlp_only_layers": [1]}}
    out = renumbered_config(cfg, layers, [0, 1, 1, 2])
    assert out["text_config"] == {"num_hidden_layers": 4, "layer_types": ["a", "b", "b", "c"],
                                  "mlp_only_layers": [1, 2]}
    assert cfg["text_config"]["num_hidden_layers"] == 3  # the input is not modified


def test_bare_backbone_keys_without_prefix(data_dir) -> None:
    """A LlamaModel checkpoint stores layers.0... (no model. prefix): found, expanded, loads clean."""
    cfg = LlamaConfig(**SMALL, num_key_value_heads=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(2)
        model = LlamaModel(cfg)
        _randomize(model)
    _save_model(model, data_dir / "bare", dtype=torch.float32)
    assert layer_facts(Checkpoint.open(data_dir / "bare")).key_prefix == "layers"
    r = expand_blocks(ExpandBlocksSpec(checkpoint="bare", output="out", num_blocks=1), RunContext(data_dir))
    assert r.new_layers == [2] and config(data_dir / "out")["num_hidden_layers"] == 3
    ids = torch.randint(0, 100, (1, 10), generator=torch.Generator().manual_seed(0))
    base = LlamaModel.from_pretrained(data_dir / "bare", dtype=torch.float32)
    out, info = LlamaModel.from_pretrained(data_dir / "out", dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    with torch.no_grad():
        assert torch.equal(base(input_ids=ids).last_hidden_state, out(input_ids=ids).last_hidden_state)


def test_post_norm_writers_only_where_the_norm_takes_the_residual_sum() -> None:
    """BERT's ``*.output`` sub-modules hold ``dense`` then ``LayerNorm`` (post-LN); Llama and Gemma 2 (norms on the
    sub-block output, at the layer level) and Qwen3 (per-head ``q_norm``/``k_norm`` after ``o_proj``) are pre-LN."""
    from transformers import BertConfig, BertModel, Gemma2Config, Gemma2ForCausalLM, Qwen3Config, Qwen3ForCausalLM

    from adapter_surgery.model.layers import post_norm_writers

    sizes = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4)
    cases = [(BertModel(BertConfig(**sizes)), ["attention.output.dense", "output.dense"]),
             (Gemma2ForCausalLM(Gemma2Config(**sizes, head_dim=8, num_key_value_heads=2)), []),
             (Qwen3ForCausalLM(Qwen3Config(**sizes, head_dim=8, num_key_value_heads=2)), [])]
    for model, expected in cases:
        _, layers = find_layer_list(model, 2)
        writers = residual_writers(layers[0], 32)
        assert post_norm_writers(layers[0], writers, 32) == expected, type(model).__name__
