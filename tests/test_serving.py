"""The serving rules as data (adapter_surgery.serving): each vLLM rule on adapter_config.json values, ranks,
per-module scalings, residual inits and tensor names; torch-free."""

from __future__ import annotations

import subprocess
import sys

import pytest

from adapter_surgery import serving
from adapter_surgery.serving import ModuleRank, problems, unloadable_keys

PLAIN = {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"], "bias": "none", "modules_to_save": None,
         "use_dora": False, "use_rslora": False, "lora_bias": False, "layer_replication": None,
         "trainable_token_indices": None, "init_lora_weights": True, "rank_pattern": {}, "alpha_pattern": {}}
Q, V = "model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj"


def test_a_plain_lora_has_no_problem() -> None:
    assert problems("vllm", PLAIN, [ModuleRank(Q, 8, 16), ModuleRank(V, 8, 16)]) == []
    assert problems("vllm", {**PLAIN, "modules_to_save": [], "trainable_token_indices": []}) == []


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"use_dora": True}, "use_dora", ["DoRA", "/merge-lora"]),
    ({"modules_to_save": ["lm_head"]}, "modules_to_save", ["being None", "extend-vocab"]),
    ({"modules_to_save": ["score", "lm_head"]}, "modules_to_save", ["classifier", "lm_head"]),
    ({"init_lora_weights": "pissa"}, "init_lora_weights", ["/convert-adapter", "rank 2 r = 16 fits"]),
    ({"bias": "all"}, "bias", ['bias "none"']),
    ({"bias": "lora_only"}, "bias", ['bias "none"']),
    ({"lora_bias": True}, "lora_bias", ["lora_B.bias"]),
    ({"layer_replication": [[0, 2], [1, 2]]}, "layer_replication", ["expand-blocks"]),
    ({"trainable_token_indices": [3, 4]}, "trainable_token_indices", ["--max-lora-trainable-tokens", "extend-vocab"]),
    ({"trainable_token_indices": {"embed_tokens": [3]}}, "trainable_token_indices", ["trainable_tokens_delta"]),
    ({"r": 32}, "r", ["--max-lora-rank 32", "greater than max_lora_rank 16"]),
    ({"r": 17}, "r", ["--max-lora-rank 32"]),
    ({"r": 1024}, "r", ["512 at most"]),
    ({"rank_pattern": {"v_proj": 64}, "alpha_pattern": {"v_proj": 128}}, "rank_pattern.v_proj",
     ["rank 64", "--max-lora-rank 64"]),
], ids=lambda v: str(v)[:40])
def test_each_vllm_rule(change: dict, field: str, words: list[str]) -> None:
    found = problems("vllm", {**PLAIN, **change})
    assert [p.field for p in found] == [field] and found[0].blocking
    for w in words:
        assert w in found[0].reason + found[0].fix, w


def test_max_lora_rank_is_the_servers_limit() -> None:
    assert problems("vllm", {**PLAIN, "r": 32}, max_lora_rank=32) == []
    assert [p.field for p in problems("vllm", {**PLAIN, "r": 64}, max_lora_rank=32)] == ["r"]
    assert [serving.vllm_rank_flag(r) for r in (1, 2, 16, 17, 300, 321, 512, 513)] == [1, 8, 16, 32, 320, 512, 512,
                                                                                       None]


def test_one_scaling_for_every_module() -> None:
    # v_proj: r 4, alpha 16 -> 4.0 while vLLM applies 16 / 8 = 2.0 to every module
    found = problems("vllm", {**PLAIN, "rank_pattern": {"v_proj": 4}}, [ModuleRank(Q, 8, 16), ModuleRank(V, 4, 16)])
    assert [p.field for p in found] == ["rank_pattern"]
    assert "= 2," in found[0].reason and f"{V} (r=4, lora_alpha=16: 4)" in found[0].reason
    assert "lora_alpha 8" in found[0].fix  # 2.0 * 4
    assert problems("vllm", {**PLAIN, "rank_pattern": {"v_proj": 4}, "alpha_pattern": {"v_proj": 8}},
                    [ModuleRank(Q, 8, 16), ModuleRank(V, 4, 8)]) == []
    # rsLoRA: s = alpha / sqrt(r); r 4 needs alpha 16 / sqrt(8) * 2
    rs = {**PLAIN, "use_rslora": True}
    found = problems("vllm", {**rs, "alpha_pattern": {"v_proj": 8}}, [ModuleRank(Q, 8, 16), ModuleRank(V, 4, 8)])
    assert [p.field for p in found] == ["alpha_pattern"]
    assert problems("vllm", rs, [ModuleRank(Q, 8, 16), ModuleRank(V, 4, 16 / 8**0.5 * 2)]) == []


@pytest.mark.parametrize("init", ["pissa", "pissa_niter_4", "olora", "corda", "loftq"])
def test_residual_inits_are_refused_with_convert_adapter_as_the_fix(init: str) -> None:
    found = problems("vllm", {**PLAIN, "init_lora_weights": init})
    assert [(p.field, p.blocking) for p in found] == [("init_lora_weights", True)]
    assert "/convert-adapter" in found[0].fix and "rank 2 r = 16 fits max_lora_rank 16" in found[0].fix
    big = problems("vllm", {**PLAIN, "r": 16, "init_lora_weights": init})
    assert "rank 2 r = 32: serve with --max-lora-rank 32" in big[0].fix
    assert problems("vllm", {**PLAIN, "init_lora_weights": "gaussian"}) == []


def test_classification_heads_pass_with_a_note() -> None:
    found = problems("vllm", {**PLAIN, "modules_to_save": ["classifier", "score"]})
    assert [(p.field, p.blocking) for p in found] == [("modules_to_save", False)]
    assert "older releases refuse" in found[0].reason and "/merge-lora" in found[0].fix
    keys = ["base_model.model.score.weight", "base_model.model.classifier.out_proj.bias"]
    assert unloadable_keys("vllm", keys) == []


def test_tensor_names_vllm_maps() -> None:
    keys = ["base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight",
            "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight",
            "base_model.model.model.embed_tokens.lora_embedding_A",
            "base_model.model.model.embed_tokens.lora_embedding_B",
            "base_model.model.model.embed_tokens.base_layer.weight"]
    bad = ["base_model.model.model.layers.0.self_attn.q_proj.lora_magnitude_vector",
           "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta",
           "base_model.model.lm_head.weight", "base_model.model.model.layers.0.self_attn.q_proj.bias",
           "base_model.model.model.layers.0.self_attn.q_proj.lora_B.bias"]
    assert unloadable_keys("vllm", keys) == []
    assert unloadable_keys("vllm", keys + bad) == sorted(bad)


def test_unknown_runtime_and_no_torch() -> None:
    with pytest.raises(ValueError, match="unknown serving runtime"):
        problems("tgi", PLAIN)
    code = "import sys, adapter_surgery.serving; print('torch' in sys.modules or 'peft' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={"PYTHONPATH": "service"})
    assert out.stdout.strip() == "False"
