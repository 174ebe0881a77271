"""convert-adapter: a trained PiSSA/OLoRA adapter as a plain LoRA on the original base, equal to peft's conversion.

The reference is peft's own ``PeftModel.save_pretrained(path_initial_model_for_weight_conversion=...)``, run in the
test on the residual base with the trained adapter. lora_A/lora_B are compared bitwise (concatenation and negation
are exact); the converted adapter on the original base gives the trained adapter's logits on its residual base up
to the residual base's rounding (float32 base: 1e-5, measured 7e-8; bfloat16 base: 0.01, measured 1.2e-3).
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapter_surgery.errors import InvalidSpec
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.convert_adapter import ConvertAdapterSpec, convert_adapter
from tests.conftest import tree_digest
from tests.ops.test_merge_lora import IDS, attach, train

warnings.filterwarnings("ignore", module="peft")


def convert(data: Path, **kw):
    return convert_adapter(ConvertAdapterSpec(**{"adapter": "trained", "initial_adapter": "init",
                                                 "output": "converted", **kw}), RunContext(data))


def peft_model(base: Path, adapter: Path):
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    return PeftModel.from_pretrained(model, str(adapter)).eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits


@pytest.mark.parametrize(("fixture", "kw", "tol"), [
    ("FX-A", {"target_modules": ["c_attn", "c_fc"], "init_lora_weights": "pissa", "r": 4}, 1e-5),  # fp32, Conv1D
    ("FX-B", {"target_modules": ["q_proj", "v_proj", "down_proj"], "init_lora_weights": "olora", "r": 4,
              "rank_pattern": {"down_proj": 2}, "alpha_pattern": {"v_proj": 16}}, 0.01),  # bf16 residual
    ("FX-C", {"target_modules": ["q_proj", "up_proj"], "init_lora_weights": "pissa_niter_4", "r": 4,
              "use_rslora": True, "lora_alpha": 16}, 0.01),
], ids=["pissa-conv1d-fp32", "olora-patterns-bf16", "pissa-rslora-tied"])
def test_equal_to_peft_and_applies_to_the_original_base(data_dir: Path, build, fixture: str, kw: dict,
                                                        tol: float) -> None:
    base = build(fixture)
    init = attach(data_dir, base, "init", **kw)
    trained = data_dir / "trained"
    shutil.copytree(init, trained)
    train(trained, scale=0.02)
    before = tree_digest(init), tree_digest(trained)
    r = convert(data_dir, base=base)
    assert (tree_digest(init), tree_digest(trained)) == before
    out = data_dir / "converted"
    ours, cfg = load_file(str(out / "adapter_model.safetensors")), json.loads((out / "adapter_config.json").read_text())

    # peft's own conversion, on the residual base with the trained adapter (on a copy of the initial adapter: peft
    # rewrites its config)
    shutil.copytree(init, data_dir / "peft-init", ignore=shutil.ignore_patterns("base"))
    trained_on_residual = peft_model(data_dir / "init/base", trained)
    trained_on_residual.save_pretrained(str(data_dir / "peft-converted"),
                                        path_initial_model_for_weight_conversion=str(data_dir / "peft-init"))
    theirs = load_file(str(data_dir / "peft-converted/adapter_model.safetensors"))
    peft_cfg = json.loads((data_dir / "peft-converted/adapter_config.json").read_text())
    assert set(ours) == set(theirs)
    for k in theirs:
        assert ours[k].dtype == theirs[k].dtype and torch.equal(ours[k], theirs[k]), k
    for k in ("r", "lora_alpha", "rank_pattern", "alpha_pattern", "init_lora_weights", "use_rslora",
              "target_modules"):
        mine, peft_value = cfg[k], peft_cfg[k]
        assert (sorted(mine) == sorted(peft_value)) if isinstance(mine, list) else mine == peft_value, k
    assert cfg["r"] == 2 * kw["r"] and cfg["base_model_name_or_path"] == base and cfg["init_lora_weights"] is True
    assert r.r == cfg["r"] and r.converted_modules == len(theirs) // 2

    # the converted adapter on the ORIGINAL base = the trained adapter on its residual base
    converted_on_original = peft_model(data_dir / base, out)
    reference = logits(trained_on_residual)
    error = float((logits(converted_on_original) - reference).abs().max())
    assert error < tol
    # and training did change the model: the untrained base is far off (so the check above has teeth)
    plain = AutoModelForCausalLM.from_pretrained(str(data_dir / base), dtype=torch.float32).eval()
    effect = float((logits(plain) - reference).abs().max())
    assert effect > 0.01 and effect > 5 * error


def test_mismatched_pairs_are_refused(data_dir: Path, build) -> None:
    base = build("FX-B")
    attach(data_dir, base, "init", target_modules=["q_proj"], init_lora_weights="pissa", r=4)
    attach(data_dir, base, "trained", target_modules=["q_proj"], init_lora_weights="pissa", r=2)
    with pytest.raises(InvalidSpec) as e:
        convert(data_dir)
    assert e.value.field == "initial_adapter" and "r differs" in e.value.detail
    shutil.rmtree(data_dir / "trained")
    attach(data_dir, base, "trained", target_modules=["k_proj"], init_lora_weights="pissa", r=4)
    with pytest.raises(InvalidSpec) as e:
        convert(data_dir)
    assert e.value.field == "initial_adapter" and "target_modules differs" in e.value.detail
    attach(data_dir, base, "dora", target_modules=["q_proj"], init_lora_weights="pissa", r=4, use_dora=True)
    with pytest.raises(InvalidSpec) as e:
        convert(data_dir, adapter="dora")
    assert e.value.field == "adapter" and "DoRA" in e.value.detail
    assert not (data_dir / "converted").exists()


def test_an_initial_adapter_of_another_base_or_the_adapter_itself_is_refused(data_dir: Path, build) -> None:
    """Pairs with equal r, targets and shapes that do not belong together were converted with a 200: an OLoRA (or
    plain LoRA) initial adapter for a trained PiSSA one, or the trained adapter as its own initial state."""
    base = build("FX-B")
    init = attach(data_dir, base, "init", target_modules=["q_proj"], init_lora_weights="pissa", r=4)
    shutil.copytree(init, data_dir / "trained", ignore=shutil.ignore_patterns("base"))
    train(data_dir / "trained", scale=0.02)
    attach(data_dir, base, "olora", target_modules=["q_proj"], init_lora_weights="olora", r=4)
    attach(data_dir, base, "plain", target_modules=["q_proj"], r=4)
    before = tree_digest(data_dir)
    for other, names in (("olora", "'olora/base' and 'init/base'"), ("plain", f"{base!r} and 'init/base'")):
        with pytest.raises(InvalidSpec) as e:
            convert(data_dir, initial_adapter=other)
        assert e.value.field == "initial_adapter" and f"against other bases ({names}" in e.value.detail
    with pytest.raises(InvalidSpec) as e:
        convert(data_dir, initial_adapter="trained")
    assert e.value.field == "initial_adapter" and "same directory" in e.value.detail
    assert tree_digest(data_dir) == before and not (data_dir / "converted").exists()
    convert(data_dir)  # the real pair still converts


@pytest.mark.parametrize("output", ["BASE", "BASE/sub"], ids=["the-base", "inside-the-base"])
def test_an_output_overlapping_the_base_is_refused_even_with_overwrite(data_dir: Path, build, output: str) -> None:
    """``"output": <base>, "overwrite": true`` replaced the original checkpoint by the converted adapter (200)."""
    base = build("FX-B")
    init = attach(data_dir, base, "init", target_modules=["q_proj"], init_lora_weights="pissa", r=4)
    shutil.copytree(init, data_dir / "trained", ignore=shutil.ignore_patterns("base"))
    train(data_dir / "trained", scale=0.02)
    before = tree_digest(data_dir)
    with pytest.raises(InvalidSpec) as e:
        convert(data_dir, base=base, output=output.replace("BASE", base), overwrite=True)
    assert e.value.field == "output" and "overlaps the input checkpoint" in e.value.detail
    assert tree_digest(data_dir) == before


def _wide_llama(data_dir: Path) -> str:
    """A llama of the fixtures' layout but 64 wide (FX-B is 32 wide)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=16, tie_word_embeddings=False)
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(data_dir / "llama-wide")
    return "llama-wide"


def test_a_base_whose_shapes_do_not_fit_the_adapter_is_refused(data_dir: Path, build) -> None:
    """A 64-wide adapter with a 32-wide base was converted with a 200 (peft then failed with `size mismatch`); the
    shapes are read from the base's headers, and the 422 names `base`."""
    wide = _wide_llama(data_dir)
    narrow = build("FX-B")
    attach(data_dir, wide, "init", target_modules=["q_proj"], init_lora_weights="pissa", r=4)
    shutil.copytree(data_dir / "init", data_dir / "trained", ignore=shutil.ignore_patterns("base"))
    train(data_dir / "trained", scale=0.02)
    with pytest.raises(InvalidSpec) as e:
        convert(data_dir, base=narrow)
    assert e.value.field == "base" and "q_proj" in e.value.detail and "[32, 32]" in e.value.detail, e.value.detail
    assert "llama-untied-tiny" in e.value.detail
    gpt2 = build("FX-A")
    with pytest.raises(InvalidSpec) as e:
        convert(data_dir, base=gpt2)
    assert e.value.field == "base" and "q_proj" in e.value.detail, e.value.detail
    assert not (data_dir / "converted").exists()
    assert convert(data_dir, base=wide).converted_modules == 2  # the real base still converts
