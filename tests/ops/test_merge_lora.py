"""merge-lora against peft's own ``merge_and_unload`` + ``save_pretrained``, computed in each test.

Adapters are made with attach-lora, then "trained": B (and DoRA magnitudes, token rows, saved modules) get random
values written into adapter_model.safetensors, so every delta is non-zero. Comparisons:

- one adapter at weight 1: **bitwise** equal to peft, tensor by tensor (the same float32 operations in the same
  order on the CPU, cast once to the stored dtype), and the merged model's logits equal peft's exactly;
- several adapters: **within one unit of the stored dtype's rounding** (peft merges them in turn, rounding to the
  stored dtype after each; merge-lora sums the deltas in float32 and casts once).
"""

from __future__ import annotations

import json
import shutil
import threading
import warnings
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM

from adapter_surgery.api.app import create_app
from adapter_surgery.errors import InvalidSpec, NotFound, OutputExists
from adapter_surgery.ops.attach_lora import AttachLoraSpec, attach_lora
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.merge_lora import MergeLoraSpec, merge_lora
from adapter_surgery.settings import Settings
from tests.conftest import tensors, tree_digest

IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 90, 7, 3, 4]])
MANTISSA = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10}

warnings.filterwarnings("ignore", module="peft")


# -- helpers --------------------------------------------------------------------------------------------------
def attach(data: Path, checkpoint: str, output: str, **kw) -> Path:
    attach_lora(AttachLoraSpec(checkpoint=checkpoint, output=output, **kw), RunContext(data))
    return data / output


def train(adapter: Path, seed: int = 0, scale: float = 0.05) -> None:
    """Simulate training: random B (A perturbed too), DoRA magnitudes, token rows and saved modules changed."""
    g = torch.Generator().manual_seed(seed)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    for k, v in state.items():
        noise = torch.randn(v.shape, generator=g, dtype=torch.float32) * scale
        if ".lora_B" in k:
            state[k] = noise.to(v.dtype)
        elif ".lora_A" in k or "magnitude" in k or "trainable_tokens" in k or not k.endswith("lora_A.weight"):
            state[k] = (v.float() + noise).to(v.dtype)
    save_file(state, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})


def merge(data: Path, checkpoint: str, adapters: list, output: str = "merged", **kw):
    refs = [{"path": a, "weight": 1.0} if isinstance(a, str) else {"path": a[0], "weight": a[1]} for a in adapters]
    return merge_lora(MergeLoraSpec(checkpoint=checkpoint, adapters=refs, output=output, **kw), RunContext(data))


def peft_merged(base: Path, adapters: list[tuple[Path, float]]):
    """peft's merge: the base as stored (dtype auto), every adapter loaded, LoRA scaling times the weight."""
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype="auto")
    names = [f"a{i}" for i in range(len(adapters))]
    peft_model = PeftModel.from_pretrained(model, str(adapters[0][0]), adapter_name=names[0])
    for name, (path, _) in zip(names[1:], adapters[1:], strict=True):
        peft_model.load_adapter(str(path), adapter_name=name)
    for module in peft_model.modules():
        scaling = getattr(module, "scaling", None)
        if isinstance(scaling, dict):
            for name, (_, weight) in zip(names, adapters, strict=True):
                if name in scaling:
                    scaling[name] *= weight
    return peft_model.merge_and_unload(adapter_names=names).eval()


def save(model, dest: Path) -> dict[str, torch.Tensor]:
    model.save_pretrained(str(dest))
    return tensors(dest)


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """One unit in the last place of ``dtype`` at |x| (float64)."""
    _, e = torch.frexp(x.double().abs().clamp_min(torch.finfo(dtype).tiny))
    return torch.ldexp(torch.ones_like(x, dtype=torch.float64), e - 1 - MANTISSA[dtype])


def assert_same_tensors(ours: dict[str, torch.Tensor], theirs: dict[str, torch.Tensor], bitwise: bool,
                        intermediate: dict[str, torch.Tensor] | None = None) -> None:
    """Bitwise, or within one unit of the stored dtype at the largest magnitude involved (ours, peft's, and peft's
    intermediate result after its first merge, which it rounds to the stored dtype before adding the next)."""
    assert set(ours) == set(theirs)
    for k in theirs:
        a, b = ours[k], theirs[k]
        assert a.dtype == b.dtype and a.shape == b.shape, k
        if bitwise:
            assert torch.equal(a, b), k
        else:
            big = torch.maximum(a.double().abs(), b.double().abs())
            if intermediate is not None:
                big = torch.maximum(big, intermediate[k].double().abs())
            assert bool(((a.double() - b.double()).abs() <= ulp(big, a.dtype)).all()), k


def load(path: Path):
    model, info = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto", output_loading_info=True)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set() and not info["mismatched_keys"]
    return model.eval()


def logits(model) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS).logits.float()


def check_against_peft(data: Path, base: str, adapters: list[tuple[str, float]], bitwise: bool,
                       output: str = "merged", intermediate: str | None = None) -> dict:
    ref = peft_merged(data / base, [(data / a, w) for a, w in adapters])
    theirs = save(ref, data / "peft-merged")
    ours = tensors(data / output)
    assert_same_tensors(ours, theirs, bitwise, tensors(data / intermediate) if intermediate else None)
    mine = load(data / output)
    if bitwise:
        assert torch.equal(logits(mine), logits(ref))
    else:
        assert float((logits(mine) - logits(ref)).abs().max()) < 1e-2
    return ours


# -- equal to peft --------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("fixture", "kw"), [
    ("FX-B", {"target_modules": "all-linear"}),  # bf16, 2 shards, untied
    ("FX-B", {"target_modules": ["q_proj", "v_proj"], "use_rslora": True, "r": 4, "lora_alpha": 16}),
    ("FX-B", {"target_modules": "all-linear", "use_dora": True}),
    ("FX-A", {"target_modules": "all-linear"}),  # GPT-2 Conv1D (fan_in_fan_out), fp32, tied
    ("FX-A", {"target_modules": "all-linear", "use_dora": True}),  # DoRA on Conv1D
    ("FX-C", {"target_modules": ["q_proj", "down_proj"], "rank_pattern": {"q_proj": 2}, "alpha_pattern":
              {"down_proj": 32}}),
    ("FX-B", {"target_modules": ["o_proj"], "modules_to_save": ["lm_head"], "trainable_token_indices": [3, 120]}),
    ("FX-C", {"target_modules": ["k_proj"], "trainable_token_indices": [4, 7, 127]}),  # tied: stays tied
    ("qwen2-padded-tiny", {"target_modules": "all-linear", "r": 4}),
    ("FX-C", {"target_modules": ["q_proj"], "modules_to_save": ["lm_head"]}),  # tied head saved: stays tied
], ids=["lora", "rslora", "dora", "conv1d", "dora-conv1d", "patterns", "modules-to-save+tokens", "tokens-tied",
        "qwen2", "modules-to-save-tied"])
def test_one_adapter_bitwise_equal_to_peft(data_dir: Path, build, fixture: str, kw: dict) -> None:
    base = build(fixture)
    adapter = attach(data_dir, base, "lora", **kw)
    train(adapter)
    before = tree_digest(data_dir / base), tree_digest(adapter)
    r = merge(data_dir, base, ["lora"])
    assert r.merged_tensors and r.base_bytes_read > 0
    ours = check_against_peft(data_dir, base, [("lora", 1.0)], bitwise=True)
    # the input is untouched; shards without a target are linked
    assert (tree_digest(data_dir / base), tree_digest(adapter)) == before
    for shard in r.linked_shards:
        assert (data_dir / "merged" / shard).stat().st_ino == (data_dir / base / shard).stat().st_ino
    if kw.get("trainable_token_indices"):
        emb = "model.embed_tokens.weight"
        assert "lm_head.weight" not in ours or fixture == "FX-B"
        rows = load_file(str(adapter / "adapter_model.safetensors"))[
            "base_model.model.model.embed_tokens.token_adapter.trainable_tokens_delta"]
        assert torch.equal(ours[emb][kw["trainable_token_indices"]], rows.to(ours[emb].dtype))
    assert json.loads((data_dir / "merged/config.json").read_text()) == \
        json.loads((data_dir / base / "config.json").read_text())
    assert (data_dir / "merged/tokenizer.json").read_bytes() == (data_dir / base / "tokenizer.json").read_bytes()


def test_untargeted_tensors_are_byte_copies_and_untouched_shards_linked(data_dir: Path, build) -> None:
    base = build("FX-B")
    train(attach(data_dir, base, "lora", target_modules=["q_proj"], layers_to_transform=[0]))
    r = merge(data_dir, base, ["lora"])
    assert [t.name for t in r.merged_tensors] == ["model.layers.0.self_attn.q_proj.weight"]
    assert len(r.linked_shards) == 1
    src, out = tensors(data_dir / base), tensors(data_dir / "merged")
    changed = {k for k in src if not torch.equal(src[k], out[k])}
    assert changed == {"model.layers.0.self_attn.q_proj.weight"}
    assert r.base_bytes_read == 32 * 32 * 2  # the one targeted bf16 tensor, nothing else


def test_two_adapters_with_weights_within_one_unit(data_dir: Path, build) -> None:
    base = build("FX-B")
    train(attach(data_dir, base, "one", target_modules="all-linear", seed=1), seed=1)
    train(attach(data_dir, base, "two", target_modules=["q_proj", "k_proj"], r=4, use_rslora=True, seed=2), seed=2)
    r = merge(data_dir, base, [("one", 0.7), ("two", -1.5)])
    q = next(t for t in r.merged_tensors if t.name == "model.layers.0.self_attn.q_proj.weight")
    assert q.how == ["lora (0)", "lora (1)"]
    merge(data_dir, base, [("one", 0.7)], output="only-one")  # = peft's state after its first merge (bitwise)
    check_against_peft(data_dir, base, [("one", 0.7), ("two", -1.5)], bitwise=False, intermediate="only-one")
    # the second adapter really counts: without it the result differs
    assert not torch.equal(tensors(data_dir / "merged")[q.name], tensors(data_dir / "only-one")[q.name])


def test_weight_scales_the_delta(data_dir: Path, build) -> None:
    base = build("FX-A")  # fp32: the delta is visible exactly
    train(attach(data_dir, base, "lora", target_modules=["c_attn"]))
    merge(data_dir, base, [("lora", 0.0)], output="zero")
    merge(data_dir, base, [("lora", 0.5)], output="half")
    src, zero, half = (tensors(data_dir / n) for n in (base, "zero", "half"))
    key = "transformer.h.0.attn.c_attn.weight"
    assert torch.equal(zero[key], src[key]) and not torch.equal(half[key], src[key])
    check_against_peft(data_dir, base, [("lora", 0.5)], bitwise=True, output="half")


# -- PiSSA / OLoRA ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_pissa_onto_its_residual_base(data_dir: Path, build, init: str) -> None:
    base = build("FX-B")
    adapter = attach(data_dir, base, "pissa", target_modules=["q_proj", "up_proj"], r=4, init_lora_weights=init)
    residual = "pissa/base"
    # untrained: residual + s B A gives the original model back (up to bf16 rounding of the residual)
    merge(data_dir, residual, ["pissa"], output="untrained")
    original = logits(load(data_dir / base))
    assert float((logits(load(data_dir / "untrained")) - original).abs().max()) < 0.02
    # trained: bitwise peft's merge on the residual base
    train(adapter)
    merge(data_dir, residual, ["pissa"])
    check_against_peft(data_dir, residual, [("pissa", 1.0)], bitwise=True)
    # onto the original base it would count the decomposed part twice: refused
    with pytest.raises(InvalidSpec) as e:
        merge(data_dir, base, ["pissa"], output="wrong")
    assert e.value.field == "adapters.0.path" and "residual base" in e.value.detail
    assert not (data_dir / "wrong").exists()


# -- refusals ---------------------------------------------------------------------------------------------------
def test_mismatched_base_is_refused_naming_the_first_mismatch(data_dir: Path, build) -> None:
    llama, gpt2 = build("FX-B"), build("FX-A")
    train(attach(data_dir, llama, "lora", target_modules=["k_proj", "q_proj"]))
    before = tree_digest(data_dir / gpt2)
    with pytest.raises(InvalidSpec) as e:  # GPT-2 has no k_proj
        merge(data_dir, gpt2, ["lora"])
    assert e.value.field == "adapters.0.path" and "model.layers.0.self_attn.k_proj" in e.value.detail
    # an adapter made for a model with 6 kv heads: k_proj's B is (48, r), the base's k_proj (16, 32)
    wide = data_dir / "wide"
    shutil.copytree(data_dir / "lora", wide)
    state = load_file(str(wide / "adapter_model.safetensors"))
    state["base_model.model.model.layers.1.self_attn.k_proj.lora_B.weight"] = torch.zeros(48, 8)
    save_file(state, str(wide / "adapter_model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidSpec) as e:
        merge(data_dir, llama, [("lora", 1.0), ("wide", 1.0)])
    assert e.value.field == "adapters.1.path" and "model.layers.1.self_attn.k_proj.weight has shape [16, 32]" in \
        e.value.detail
    assert not (data_dir / "merged").exists() and tree_digest(data_dir / gpt2) == before
    with pytest.raises(NotFound) as e:
        merge(data_dir, llama, ["lora", "nope"])
    assert e.value.field == "adapters.1.path"


def test_safe_merge_refuses_nan_and_leaves_nothing(data_dir: Path, build) -> None:
    base = build("FX-B")
    adapter = attach(data_dir, base, "lora", target_modules=["v_proj"])
    train(adapter)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    state["base_model.model.model.layers.1.self_attn.v_proj.lora_B.weight"][0, 0] = float("nan")
    save_file(state, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    before = tree_digest(data_dir)
    threads, intra_op = set(threading.enumerate()), torch.get_num_threads()
    with pytest.raises(InvalidSpec) as e:
        merge(data_dir, base, ["lora"], safe_merge=True)
    assert e.value.field == "adapters.0.path" and "model.layers.1.self_attn.v_proj.weight" in e.value.detail
    assert tree_digest(data_dir) == before and sorted(p.name for p in data_dir.iterdir()) == [base, "lora"]
    # no thread of the request is left, and torch's intra-op thread count is restored (the fold runs on fewer)
    assert set(threading.enumerate()) <= threads and torch.get_num_threads() == intra_op
    r = merge(data_dir, base, ["lora"])  # without safe_merge, as peft: the NaN is written, and said (it was silent)
    assert torch.isnan(tensors(data_dir / "merged")["model.layers.1.self_attn.v_proj.weight"]).any()
    [warning] = [w for w in r.warnings if "NaN" in w]
    assert warning.startswith("1 merged tensor(s) hold NaN or Inf: model.layers.1.self_attn.v_proj.weight;")
    assert "safe_merge" in warning


def test_conflicts_and_bounds(data_dir: Path, build) -> None:
    base = build("FX-B")
    train(attach(data_dir, base, "dora", target_modules=["q_proj"], use_dora=True))
    train(attach(data_dir, base, "lora", target_modules=["q_proj"]))
    train(attach(data_dir, base, "head", target_modules=["k_proj"], modules_to_save=["lm_head"]))
    with pytest.raises(InvalidSpec) as e:  # DoRA does not add up with another delta
        merge(data_dir, base, ["lora", "dora"])
    assert e.value.field == "adapters.1.path"
    with pytest.raises(InvalidSpec) as e:  # a weight cannot scale a replaced tensor
        merge(data_dir, base, [("head", 0.5)])
    assert e.value.field == "adapters.0.weight"
    with pytest.raises(OutputExists):
        merge(data_dir, base, ["lora"], output="lora")
    with pytest.raises(InvalidSpec) as e:  # an input adapter is never replaced, even with overwrite
        merge(data_dir, base, ["lora"], output="lora", overwrite=True)
    assert e.value.field == "output" and "overlaps" in e.value.detail
    with pytest.raises(ValueError):
        MergeLoraSpec(checkpoint=base, output="o", adapters=[{"path": "lora"}] * 17)
    with pytest.raises(ValueError):
        MergeLoraSpec(checkpoint=base, output="o", adapters=[{"path": "lora", "weight": float("inf")}])


def test_http_and_cli_route(data_dir: Path, build) -> None:
    base = build("FX-B")
    train(attach(data_dir, base, "lora", target_modules=["q_proj"]))
    client = TestClient(create_app(Settings(data_dir=data_dir)))
    r = client.post("/merge-lora", json={"checkpoint": base, "output": "m", "adapters": [{"path": "lora"}]})
    assert r.status_code == 200, r.text
    assert r.json()["merged_tensors"][0]["name"] == "model.layers.0.self_attn.q_proj.weight"
    r = client.post("/merge-lora", json={"checkpoint": base, "output": "m2", "adapters": [{"path": "../x"}]})
    assert r.status_code == 403 and r.json()["field"] == "adapters.0.path"
    r = client.post("/merge-lora", json={"checkpoint": base, "output": "m2", "adapters": []})
    assert r.status_code == 422 and r.json()["field"] == "adapters"
    shutil.rmtree(data_dir / "m")


def test_embedding_lora_made_by_peft_bitwise_equal(data_dir: Path, build) -> None:
    """An adapter on the embedding (lora_embedding_A/B; attach-lora does not make these, peft does)."""
    from peft import LoraConfig, get_peft_model

    base = build("FX-B")
    model = AutoModelForCausalLM.from_pretrained(str(data_dir / base), dtype="auto")
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["embed_tokens", "q_proj"],
                                                  init_lora_weights=False))  # random A and B: a non-zero delta
    peft_model.save_pretrained(str(data_dir / "emb"))
    keys = set(load_file(str(data_dir / "emb/adapter_model.safetensors")))
    assert "base_model.model.model.embed_tokens.lora_embedding_A" in keys
    r = merge(data_dir, base, ["emb"])
    emb = "model.embed_tokens.weight"
    assert "embedding_lora (0)" in next(t.how for t in r.merged_tensors if t.name == emb)
    ref = peft_merged(data_dir / base, [(data_dir / "emb", 1.0)])
    theirs, ours = save(ref, data_dir / "peft-merged"), tensors(data_dir / "merged")
    # peft's Embedding.merge rounds the delta to bf16 before adding it (W += delta.to(bf16)); merge-lora adds in
    # float32 and rounds once: within one unit at the larger of |W| + |delta|. Every other tensor: bitwise.
    state = load_file(str(data_dir / "emb/adapter_model.safetensors"))
    a, b = (state[f"base_model.model.model.embed_tokens.lora_embedding_{x}"] for x in "AB")
    magnitude = tensors(data_dir / base)[emb].double().abs() + ((b @ a).T * 2.0).double().abs()
    assert_same_tensors({emb: ours.pop(emb)}, {emb: theirs.pop(emb)}, bitwise=False, intermediate={emb: magnitude})
    assert_same_tensors(ours, theirs, bitwise=True)
    assert float((logits(load(data_dir / "merged")) - logits(ref)).abs().max()) < 0.05


# -- adapter_config.json fields: honoured as peft honours them, or refused ---------------------------------------
def peft_adapter(data_dir: Path, base: str, name: str, edit: dict | None = None, **kw) -> Path:
    """An adapter made by peft's get_peft_model (random A and B: a non-zero delta), saved by peft; ``edit`` then
    overwrites fields of its adapter_config.json (a config written by another tool, or edited by hand)."""
    from peft import LoraConfig, get_peft_model

    model = AutoModelForCausalLM.from_pretrained(str(data_dir / base), dtype="auto")
    torch.manual_seed(0)
    kw.setdefault("target_modules", ["q_proj", "v_proj"])
    peft_model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, **kw))
    peft_model.save_pretrained(str(data_dir / name))
    if edit:
        path = data_dir / name / "adapter_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    return data_dir / name


def changed_tensors(data_dir: Path, base: str, output: str = "merged") -> set[str]:
    src, out = tensors(data_dir / base), tensors(data_dir / output)
    return {k for k in src if not torch.equal(src[k], out[k])}


ALL_LAYERS = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in (0, 1) for p in "qv"}


@pytest.mark.parametrize(("kw", "edit", "changed"), [
    # peft saves only the layers it transformed
    ({"layers_to_transform": [0]}, None, {"model.layers.0.self_attn.q_proj.weight",
                                          "model.layers.0.self_attn.v_proj.weight"}),
    # the reviewer's case: keys for every layer, a config that selects layer 0: peft's load ignores layer 1
    ({}, {"layers_to_transform": [0]}, {"model.layers.0.self_attn.q_proj.weight",
                                        "model.layers.0.self_attn.v_proj.weight"}),
    ({}, {"layers_to_transform": 1, "layers_pattern": "layers"}, {"model.layers.1.self_attn.q_proj.weight",
                                                                  "model.layers.1.self_attn.v_proj.weight"}),
    ({}, {"target_modules": r"model\.layers\.1\.self_attn\.q_proj"}, {"model.layers.1.self_attn.q_proj.weight"}),
    ({}, {"exclude_modules": r".*\.0\.self_attn\.v_proj"}, ALL_LAYERS - {"model.layers.0.self_attn.v_proj.weight"}),
    ({}, {"exclude_modules": ["model.layers.1.self_attn.q_proj"]}, ALL_LAYERS - {
        "model.layers.1.self_attn.q_proj.weight"}),
    ({"rank_pattern": {r"layers\.1\.self_attn\.q_proj": 2}, "alpha_pattern": {r".*\.0\.self_attn\.v_proj": 32},
      "use_rslora": True}, None, ALL_LAYERS),
    ({}, {"fan_in_fan_out": True}, ALL_LAYERS),  # peft sets it false on a Linear (warns), as merge-lora does
    ({"use_dora": True}, {"use_dora": False}, ALL_LAYERS),  # peft builds plain LoRA: the magnitudes are unused
], ids=["layers_to_transform", "layers_to_transform-edited", "layers_pattern-int",
        "target_modules-regex", "exclude_modules-regex", "exclude_modules-list", "patterns-regex-rslora",
        "fan_in_fan_out-on-linear", "magnitudes-without-use_dora"])
def test_config_fields_bitwise_equal_to_peft(data_dir: Path, build, kw: dict, edit: dict | None,
                                             changed: set[str]) -> None:
    base = build("FX-B")
    peft_adapter(data_dir, base, "lora", edit, **kw)
    r = merge(data_dir, base, ["lora"])
    check_against_peft(data_dir, base, [("lora", 1.0)], bitwise=True)
    assert changed_tensors(data_dir, base) == changed == {t.name for t in r.merged_tensors}
    ignored = [w for w in r.warnings if "not merged" in w]
    saved = len(load_file(str(data_dir / "lora/adapter_model.safetensors")))
    per_module = 3 if kw.get("use_dora") else 2
    if edit and "use_dora" not in edit and "fan_in_fan_out" not in edit:  # keys peft ignores: named
        assert ignored and f"{saved - per_module * len(changed)} tensor(s) not merged" in ignored[0]
    elif edit and "use_dora" in edit:
        assert ignored and f"{len(changed)} tensor(s) not merged" in ignored[0]
    else:
        assert not ignored


@pytest.mark.parametrize("bias", ["all", "lora_only"])
def test_bias_saved_with_the_adapter_bitwise_equal_to_peft(data_dir: Path, build, bias: str) -> None:
    base = build("FX-A")  # GPT-2: Conv1D layers with biases
    adapter = peft_adapter(data_dir, base, "lora", target_modules=["c_attn"], bias=bias)
    state = load_file(str(adapter / "adapter_model.safetensors"))
    biases = [k for k in state if k.endswith(".bias")]
    assert biases and all(".c_attn." in k for k in biases) == (bias == "lora_only")
    g = torch.Generator().manual_seed(3)
    for k in biases:  # trained biases
        state[k] = state[k] + torch.randn(state[k].shape, generator=g)
    save_file(state, str(adapter / "adapter_model.safetensors"), metadata={"format": "pt"})
    r = merge(data_dir, base, ["lora"])
    check_against_peft(data_dir, base, [("lora", 1.0)], bitwise=True)
    assert {k.removeprefix("base_model.model.").replace(".base_layer.", ".") for k in biases} <= \
        changed_tensors(data_dir, base)
    assert {t.name for t in r.merged_tensors} == changed_tensors(data_dir, base)


@pytest.mark.parametrize(("kw", "edit", "named"), [
    ({}, {"lora_bias": True}, "lora_bias"),
    ({}, {"megatron_config": {"tensor_model_parallel_size": 2}}, "megatron_config"),
    ({}, {"target_parameters": ["mlp.down_proj.weight"]}, "target_parameters"),
    ({}, {"layers_pattern": "layers", "layers_to_transform": None}, "layers_to_transform"),
    ({}, {"target_modules": ".*q_proj", "layers_to_transform": [0]}, "layers_to_transform"),
    ({"use_dora": False}, {"use_dora": True}, "use_dora"),
    ({}, {"target_modules": None}, "target_modules"),
    ({}, {"exclude_modules": "(a+)+b"}, "exclude_modules"),
    ({}, {"layers_to_transform": [1], "layers_pattern": ["blocks"]}, "layers_pattern"),  # no "blocks": peft raises
    ({}, {"target_modules": "("}, "target_modules"),  # invalid regexes: re.error was a 500
    ({}, {"exclude_modules": "["}, "exclude_modules"),
    ({}, {"layers_to_transform": [0], "layers_pattern": "("}, "layers_pattern"),
    ({}, {"rank_pattern": {"(": 4}}, "rank_pattern"),
    ({}, {"alpha_pattern": {"[": 4}}, "alpha_pattern"),
    ({}, {"rank_pattern": ["q_proj"]}, "rank_pattern"),  # not an object: AttributeError was a 500
], ids=["lora_bias", "megatron", "target_parameters", "layers_pattern-alone", "regex+layers_to_transform",
        "use_dora-without-magnitudes", "no-target_modules", "catastrophic-regex",
        "nothing-selected", "invalid-target-regex", "invalid-exclude-regex", "invalid-layers_pattern",
        "invalid-rank_pattern-key", "invalid-alpha_pattern-key", "rank_pattern-not-object"])
def test_config_fields_not_honoured_are_refused_naming_them(data_dir: Path, build, kw: dict, edit: dict,
                                                            named: str) -> None:
    base = build("FX-B")
    peft_adapter(data_dir, base, "lora", edit, **kw)
    client = TestClient(create_app(Settings(data_dir=data_dir)))
    r = client.post("/merge-lora", json={"checkpoint": base, "output": "m", "adapters": [{"path": "lora"}]})
    assert r.status_code == 422, r.text
    assert r.json()["field"] == "adapters.0.path" and named in r.json()["detail"]
    assert not (data_dir / "m").exists()


def test_adapter_of_another_base_in_the_data_dir_is_warned(data_dir: Path, build) -> None:
    base = build("FX-B")
    shutil.copytree(data_dir / base, data_dir / "other-finetune")  # same shapes: only the name tells them apart
    train(attach(data_dir, base, "lora", target_modules=["q_proj"]))
    own = merge(data_dir, base, ["lora"], output="onto-own")
    assert not any("base_model_name_or_path" in w for w in own.warnings)
    other = merge(data_dir, "other-finetune", ["lora"], output="onto-other")
    assert [w for w in other.warnings if "base_model_name_or_path" in w] == [
        f"adapter 0 ('lora') names {base!r} as its base (base_model_name_or_path), not the checkpoint it is merged "
        "into: check that it was trained on this checkpoint's weights"]
