"""expand-blocks on tiny fixtures: where blocks go, identity at zero init, scaled init, config lists, refusals."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma2ForCausalLM,
    Qwen2MoeConfig,
    Qwen2MoeForCausalLM,
    Qwen3Config,
    Qwen3ForCausalLM,
)

from adapter_surgery.api.app import create_app
from adapter_surgery.errors import InvalidSpec
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.expand_blocks import (
    ExpandBlocksOptions,
    ExpandBlocksSpec,
    expand_blocks,
    hidden_state_map,
    layer_sequence,
    new_block_positions,
)
from adapter_surgery.settings import Settings
from tests.conftest import config, tensors, tree_digest
from tests.fixtures import _randomize, _save_model


def run(data_dir: Path, **spec):
    return expand_blocks(ExpandBlocksSpec(**spec), RunContext(data_dir))


def logits(path: Path, ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    model, info = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32, output_loading_info=True)
    with torch.no_grad():
        return model(input_ids=ids).logits, info


def assert_loads_clean(info: dict) -> None:
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info


def probe(vocab: int = 100) -> torch.Tensor:
    return torch.randint(0, vocab, (2, 24), generator=torch.Generator().manual_seed(0))


# -- where the blocks go ---------------------------------------------------------------------------------------
@pytest.mark.parametrize(("layers", "k", "after"), [
    (4, 2, [1, 3]), (32, 8, [3, 7, 11, 15, 19, 23, 27, 31]),  # LLaMA Pro: one after every L/k blocks
    (30, 4, [6, 14, 21, 29]), (5, 5, [0, 1, 2, 3, 4]), (7, 1, [6]), (3, 2, [0, 2]),
])
def test_interleave_rule(layers: int, k: int, after: list[int]) -> None:
    assert new_block_positions(ExpandBlocksOptions(num_blocks=k), layers) == after


def test_sequence_and_output_indices() -> None:
    seq = layer_sequence(4, [1, 3])
    assert seq == [(0, False), (1, False), (1, True), (2, False), (3, False), (3, True)]
    assert [j for j, (_, new) in enumerate(seq) if new] == [2, 5]
    assert hidden_state_map(seq) == [0, 1, 2, 2, 3, None, 4]  # the last one is after the final norm


@pytest.mark.parametrize(("options", "field"), [
    ({"num_blocks": 3}, "num_blocks"),                       # more than the base's 2 blocks
    ({}, "num_blocks"),                                      # interleave without a count
    ({"positions": [0, 2]}, "positions.1"),                  # past the last block
    ({"positions": [1, 1]}, "positions.1"),                  # repeated
    ({"positions": [0, 1], "num_blocks": 1}, "num_blocks"),  # disagrees with the list
    ({"positions": []}, "positions"),
])
def test_bad_positions_refused_with_nothing_written(data_dir: Path, build, options: dict, field: str) -> None:
    src = build("FX-B")
    before = tree_digest(data_dir / src)
    with pytest.raises(InvalidSpec) as err:
        run(data_dir, checkpoint=src, output="out", **options)
    assert err.value.field == field
    assert sorted(p.name for p in data_dir.iterdir()) == [src]
    assert tree_digest(data_dir / src) == before


# -- zero init: an exact identity ------------------------------------------------------------------------------
def test_llama_sharded_zero_init_is_identity(data_dir: Path, build) -> None:
    src = build("FX-B")  # Llama, untied, bf16, 2 shards, 2 layers
    before = tree_digest(data_dir / src)
    r = run(data_dir, checkpoint=src, output="out", num_blocks=2)
    out = data_dir / "out"
    assert r.new_layers == [1, 3] and r.copied_from == [0, 1]
    assert (r.num_layers_before, r.num_layers_after) == (2, 4)
    assert r.residual_writers == ["self_attn.o_proj", "mlp.down_proj"] and r.layer_prefix == "model.layers"
    assert config(out)["num_hidden_layers"] == 4
    base, new = tensors(data_dir / src), tensors(out)
    # base block 1 is output block 2; every tensor byte-identical
    for name, t in base.items():
        target = name.replace("model.layers.1.", "model.layers.2.")
        assert torch.equal(new[target].view(torch.int16), t.view(torch.int16)), name
    for j, s in ((1, 0), (3, 1)):  # new blocks: copies of the block before, residual writers zero
        for name, t in base.items():
            if not name.startswith(f"model.layers.{s}."):
                continue
            got = new[name.replace(f"layers.{s}.", f"layers.{j}.")]
            if "o_proj" in name or "down_proj" in name:
                assert got.dtype == t.dtype and got.shape == t.shape and not got.any()
            else:
                assert torch.equal(got.view(torch.int16), t.view(torch.int16)), name
    assert len(new) == len(base) + 18 and r.renamed_tensors == 9
    new_blocks = {n for n in new if n.startswith(("model.layers.1.", "model.layers.3."))}
    assert {c.name for c in r.changed_tensors} == new_blocks
    ids = probe(128)
    lb, _ = logits(data_dir / src, ids)
    lp, info = logits(out, ids)
    assert_loads_clean(info)
    assert torch.equal(lb, lp)  # bitwise
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(new)
    assert tree_digest(data_dir / src) == before


def test_untouched_shard_is_linked(data_dir: Path, build) -> None:
    src = build("FX-B")
    base_index = json.loads((data_dir / src / "model.safetensors.index.json").read_text())["weight_map"]
    r = run(data_dir, checkpoint=src, output="out", positions=[1])  # after the last block: no key is renamed
    assert r.new_layers == [2] and r.renamed_tensors == 0
    holding = {base_index[n] for n in base_index if n.startswith("model.layers.1.")}
    for shard in set(base_index.values()):
        linked = (data_dir / "out" / shard).stat().st_ino == (data_dir / src / shard).stat().st_ino
        assert linked == (shard not in holding), shard
    lb, _ = logits(data_dir / src, probe(128))
    lp, info = logits(data_dir / "out", probe(128))
    assert_loads_clean(info)
    assert torch.equal(lb, lp)


def test_gpt2_conv1d_zero_init(data_dir: Path, build) -> None:
    src = build("FX-A")  # GPT-2, Conv1D, tied, n_layer 2
    r = run(data_dir, checkpoint=src, output="out", positions=[0], verify=True)
    out = data_dir / "out"
    assert r.new_layers == [1] and r.layer_prefix == "transformer.h"
    assert r.residual_writers == ["attn.c_proj", "mlp.c_proj"]
    assert config(out)["n_layer"] == 3 and "num_hidden_layers" not in config(out)
    new = tensors(out)
    for name in ("attn.c_proj.weight", "attn.c_proj.bias", "mlp.c_proj.weight", "mlp.c_proj.bias"):
        assert not new[f"transformer.h.1.{name}"].any()
    assert torch.equal(new["transformer.h.1.attn.c_attn.weight"], new["transformer.h.0.attn.c_attn.weight"])
    lb, _ = logits(data_dir / src, probe())
    lp, info = logits(out, probe())
    assert_loads_clean(info)
    assert torch.equal(lb, lp)
    report = r.report
    assert report is not None and report.status == "ok" and report.max_abs_logit_delta == 0.0 and report.passed
    assert [(h.layer, h.base_layer) for h in report.hidden_states] == [(0, 0), (1, 1), (2, 1), (3, 2)]
    assert all(h.max_abs_delta == 0.0 for h in report.hidden_states)


def test_qwen2_padded_list_positions(data_dir: Path, build) -> None:
    src = build("qwen2-padded-tiny")  # q/k/v biases, o_proj without one
    r = run(data_dir, checkpoint=src, output="out", positions=[1, 0])
    assert r.new_layers == [1, 3] and r.copied_from == [0, 1]
    new = tensors(data_dir / "out")
    assert torch.equal(new["model.layers.1.self_attn.q_proj.bias"].view(torch.int16),
                       new["model.layers.0.self_attn.q_proj.bias"].view(torch.int16))
    lb, _ = logits(data_dir / src, probe(120))
    lp, info = logits(data_dir / "out", probe(120))
    assert_loads_clean(info)
    assert torch.equal(lb, lp)


def _layer_types_model(data_dir: Path, kind: str) -> str:
    """A tiny Qwen3 (sliding window on alternate layers) or Gemma2 (its own layer_types), 4 layers, float32."""
    common = dict(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=8, max_position_embeddings=256, sliding_window=4)
    layer_types = ["sliding_attention", "full_attention", "full_attention", "sliding_attention"]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(7)
        if kind == "qwen3":
            model = Qwen3ForCausalLM(Qwen3Config(**common, use_sliding_window=True, layer_types=layer_types))
        else:
            model = Gemma2ForCausalLM(Gemma2Config(**common, layer_types=layer_types))
        _randomize(model)
    _save_model(model, data_dir / kind, dtype=torch.float32)
    return kind


@pytest.mark.parametrize("kind", ["qwen3", "gemma2"])
def test_layer_types_follow_the_blocks(data_dir: Path, kind: str) -> None:
    src = _layer_types_model(data_dir, kind)
    r = run(data_dir, checkpoint=src, output="out", positions=[0, 3])
    assert r.new_layers == [1, 5]
    cfg = config(data_dir / "out")
    assert cfg["num_hidden_layers"] == 6
    assert cfg["layer_types"] == ["sliding_attention", "sliding_attention", "full_attention", "full_attention",
                                  "sliding_attention", "sliding_attention"]
    ids = probe(128)  # 24 tokens: the 4-token sliding window matters
    lb, _ = logits(data_dir / src, ids)
    lp, info = logits(data_dir / "out", ids)
    assert_loads_clean(info)
    assert torch.equal(lb, lp)


def test_qwen2_derived_layer_types_written(data_dir: Path) -> None:
    """Qwen2 derives layer_types from max_window_layers and the layer count: the output states them."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True, sliding_window=4,
                      max_window_layers=1)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        model = Qwen2ForCausalLM(cfg)
        _randomize(model)
    _save_model(model, data_dir / "q2", dtype=torch.float32)
    saved = config(data_dir / "q2")
    saved.pop("layer_types", None)  # as an older config.json would have it
    (data_dir / "q2" / "config.json").write_text(json.dumps(saved))
    run(data_dir, checkpoint="q2", output="out", positions=[0])
    assert config(data_dir / "out")["layer_types"] == ["full_attention", "full_attention", "sliding_attention"]
    lb, _ = logits(data_dir / "q2", probe(128))
    lp, info = logits(data_dir / "out", probe(128))
    assert_loads_clean(info)
    assert torch.equal(lb, lp)


def test_index_dependent_layers_refused(data_dir: Path) -> None:
    """Qwen2-MoE with decoder_sparse_step 2: layer 1 is sparse, layer 0 dense; a copy of 0 at index 1 would not load."""
    cfg = Qwen2MoeConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=2, intermediate_size=64, moe_intermediate_size=16,
                         shared_expert_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
                         decoder_sparse_step=2)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        model = Qwen2MoeForCausalLM(cfg)
        _randomize(model)
    _save_model(model, data_dir / "moe", dtype=torch.float32)
    with pytest.raises(InvalidSpec) as err:
        run(data_dir, checkpoint="moe", output="out", positions=[0])
    assert err.value.field == "positions" and "output layer 1" in err.value.detail
    assert not (data_dir / "out").exists()


# -- scaled_normal ----------------------------------------------------------------------------------------------
def test_scaled_normal_values_and_determinism(data_dir: Path, build) -> None:
    src = build("FX-A")
    a = run(data_dir, checkpoint=src, output="a", num_blocks=2, init="scaled_normal", seed=3, verify=True)
    b = run(data_dir, checkpoint=src, output="b", num_blocks=2, init="scaled_normal", seed=3)
    c = run(data_dir, checkpoint=src, output="c", num_blocks=2, init="scaled_normal", seed=4)
    digest = {f.path: f.sha256 for f in a.files}
    assert digest == {f.path: f.sha256 for f in b.files}
    assert digest["model.safetensors"] != {f.path: f.sha256 for f in c.files}["model.safetensors"]
    assert a.init_std == pytest.approx(0.02 / math.sqrt(2 * 4))
    new = tensors(data_dir / "a")
    for j in a.new_layers:
        for m in ("attn.c_proj", "mlp.c_proj"):
            assert not new[f"transformer.h.{j}.{m}.bias"].any()
            w = new[f"transformer.h.{j}.{m}.weight"]
            assert w.std() > 0 and w.abs().max() < 8 * a.init_std  # drawn at this scale, not copied
    report = a.report
    assert report is not None and report.status == "ok" and report.max_abs_logit_delta > 0
    assert report.logits_preserved is None and report.hidden_states


def test_scaled_normal_std_on_a_wide_block(data_dir: Path) -> None:
    """The drawn std is the formula's within 2% on 2 x 2 x 256 x 512 values (std error ~0.3%)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=64, hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, initializer_range=0.05)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(1)
        model = LlamaForCausalLM(cfg)
    _save_model(model, data_dir / "wide", dtype=torch.bfloat16)
    r = run(data_dir, checkpoint="wide", output="out", num_blocks=2, init="scaled_normal")
    expected = 0.05 / math.sqrt(2 * 4)
    assert r.init_std == pytest.approx(expected)
    new = tensors(data_dir / "out")
    values = torch.cat([new[f"model.layers.{j}.{m}.weight"].float().reshape(-1) for j in r.new_layers
                        for m in ("self_attn.o_proj", "mlp.down_proj")])
    assert abs(float(values.std()) / expected - 1) < 0.02 and abs(float(values.mean())) < 0.05 * expected


# -- over HTTP ----------------------------------------------------------------------------------------------------
def test_http_route(data_dir: Path, build) -> None:
    src = build("FX-B")
    client = TestClient(create_app(Settings(data_dir=data_dir)), raise_server_exceptions=False)
    r = client.post("/expand-blocks", json={"checkpoint": src, "output": "out", "num_blocks": 1})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["new_layers"] == [2] and body["num_layers_after"] == 3 and body["init_std"] == 0.0
    r = client.post("/expand-blocks", json={"checkpoint": src, "output": "out2", "positions": [0, 7]})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["field"] == "positions.1" and not (data_dir / "out2").exists()
    r = client.post("/expand-blocks", json={"checkpoint": src, "output": "out2", "num_blocks": 5000})
    assert r.status_code == 422 and r.json()["field"] == "num_blocks"
    with safe_open(str(data_dir / "out" / "model-00001-of-00002.safetensors"), "pt") as f:
        assert f.keys()


def test_surgery_step_then_lora_on_the_new_block(data_dir: Path, build) -> None:
    from peft import PeftModel

    from adapter_surgery.ops.surgery import SurgerySpec, surgery

    src = build("FX-B")
    r = surgery(SurgerySpec(checkpoint=src, output="out", steps=[
        {"op": "expand-blocks", "positions": [0]},
        {"op": "attach-lora", "r": 4, "target_modules": ["q_proj", "o_proj"], "layers_to_transform": [1]}]),
        RunContext(data_dir))
    assert r.steps[0].op == "expand-blocks" and r.steps[0].result["new_layers"] == [1]
    assert config(data_dir / "out")["num_hidden_layers"] == 3
    base = AutoModelForCausalLM.from_pretrained(data_dir / "out", dtype=torch.float32)
    lora = PeftModel.from_pretrained(base, data_dir / "out" / "adapter")
    names = [n for n, _ in lora.named_parameters() if "lora_A" in n]
    assert names and all(".layers.1." in n for n in names)


def test_post_ln_encoder_refused_with_nothing_written(data_dir: Path, build) -> None:
    """BERT normalizes residual + sub-block output (post-LN): a copied block with zero writers is no identity. It was
    written with a 200 (no warning) and changed the logits (max |Δ| 0.019 on the tiny MLM, hidden states 0.18),
    where the README promises zero-init blocks leave them bitwise equal."""
    src = build("FX-F")  # BertForMaskedLM, 2 layers
    before = tree_digest(data_dir / src)
    with pytest.raises(InvalidSpec) as err:
        run(data_dir, checkpoint=src, output="out", num_blocks=1)
    assert err.value.field == "checkpoint" and "post-LN" in err.value.detail
    assert "attention.output.dense" in err.value.detail and "pre-LN" in err.value.fix
    assert not (data_dir / "out").exists() and tree_digest(data_dir / src) == before


def test_a_full_disk_shows_small_sizes_and_the_margin(data_dir: Path, build, monkeypatch) -> None:
    """On a tiny model the 507 said "needs about 0.00 GiB ... has 0.00 GiB free", and not that a safety margin
    (DISK_MARGIN) is kept free beyond the estimate."""
    import importlib
    from collections import namedtuple

    from adapter_surgery.errors import DiskFull

    module = importlib.import_module("adapter_surgery.ops.expand_blocks")

    build("FX-B")
    usage = namedtuple("usage", "total used free")
    monkeypatch.setattr(module.shutil, "disk_usage", lambda _p: usage(1 << 40, 0, 1 << 20))
    with pytest.raises(DiskFull) as err:
        run(data_dir, checkpoint="llama-untied-tiny", output="out", num_blocks=1)
    assert "0.00" not in err.value.detail and "KiB" in err.value.detail and "1.0 MiB free" in err.value.detail
    assert "64.0 MiB" in err.value.detail and "margin" in err.value.detail
    assert not (data_dir / "out").exists()
