"""config.json against the safetensors headers, on every operation, before any model is built.

On main, extend-vocab answered 200 for ``num_hidden_layers`` 40 on 2 layers of weights (342 missing keys on load),
``hidden_size`` 128 on narrower weights (the output did not load), and grew ~12 MB/s until OOM-killed for
``num_hidden_layers: 1000000000``.
"""

from __future__ import annotations

import json
import shutil
import tracemalloc
from pathlib import Path

import pytest
import torch
import transformers
from fastapi.testclient import TestClient
from safetensors.torch import save_file

from adapter_surgery.api.app import create_app
from adapter_surgery.config_check import MAX_LAYERS, check_config
from adapter_surgery.errors import InvalidCheckpoint
from adapter_surgery.io import Checkpoint
from adapter_surgery.ops import OPERATIONS
from adapter_surgery.ops.common import RunContext
from adapter_surgery.settings import Settings
from tests.conftest import tree_digest
from tests.fixtures import make


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for name in ("FX-A", "FX-B", "FX-F", "bert-plain-tiny", "qwen2-padded-tiny"):
        make(name, root)
    return root


def with_config(data: Path, src: str, name: str, **changes) -> str:
    if not (data / name).exists():
        shutil.copytree(data / src, data / name)
        cfg = json.loads((data / name / "config.json").read_text())
        cfg.update(changes)
        (data / name / "config.json").write_text(json.dumps(cfg))
    return name


#: (fixture, config changes, the field named, words of the detail)
DEFECTS = [
    ("llama-untied-tiny", {"num_hidden_layers": 1_000_000_000}, "config.num_hidden_layers",
     ["num_hidden_layers 1000000000", "(2 layers)"]),
    ("llama-untied-tiny", {"num_hidden_layers": 40}, "config.num_hidden_layers",
     ["num_hidden_layers 40", "model.layers.0 to model.layers.1 (2 layers)"]),
    ("llama-untied-tiny", {"hidden_size": 128}, "config.hidden_size",
     ["hidden_size 128", "model.embed_tokens.weight is 32 wide"]),
    ("llama-untied-tiny", {"vocab_size": 4096}, "config.vocab_size", ["vocab_size 4096", "has 128 rows"]),
    ("gpt2-tied-tiny", {"n_layer": 40}, "config.n_layer", ["n_layer 40", "transformer.h.0 to transformer.h.1"]),
    ("gpt2-tied-tiny", {"n_embd": 64}, "config.n_embd", ["n_embd 64", "32 wide"]),
    ("bert-mlm-tiny", {"num_hidden_layers": 12}, "config.num_hidden_layers", ["bert.encoder.layer.1 (2 layers)"]),
    ("llama-untied-tiny", {"max_position_embeddings": 10**12}, "config.max_position_embeddings", ["10000000000"]),
    # Fewer than the weights hold: expand-blocks wrote a corrupt file, extend-vocab 180 unexpected keys (review).
    ("llama-untied-tiny", {"num_hidden_layers": 1}, "config.num_hidden_layers",
     ["num_hidden_layers 1", "model.layers.0 to model.layers.1 (2 layers)"]),
    ("gpt2-tied-tiny", {"n_layer": 1}, "config.n_layer", ["n_layer 1", "transformer.h.0 to transformer.h.1"]),
    ("llama-untied-tiny", {"vocab_size": 100}, "config.vocab_size", ["vocab_size 100", "has 128 rows"]),
    # Not a number: extend-vocab blamed the tokenizer files ("Re-save the tokenizer"), verify the derivation.
    ("llama-untied-tiny", {"num_hidden_layers": "two"}, "config.num_hidden_layers",
     ["num_hidden_layers 'two'", "not a number"]),
    ("gpt2-tied-tiny", {"n_embd": True}, "config.n_embd", ["n_embd True", "not a number"]),
]


def request(op: str, src: str) -> dict:
    options = {"extend-vocab": {"tokens": ["<a>"]}, "attach-lora": {"target_modules": "all-linear"},
               "attach-head": {"num_labels": 2}, "surgery": {"steps": [{"op": "extend-vocab", "tokens": ["<a>"]}]},
               "expand-blocks": {"num_blocks": 1}, "merge-lora": {"adapters": [{"path": "adapter"}]},
               "verify": {}}[op]
    paths = {"checkpoint": src, "patched": src} if op == "verify" else {"checkpoint": src, "output": f"{src}-out"}
    return {**paths, **options}


@pytest.fixture
def no_model_built(monkeypatch):
    """Any transformers config or model built from the checkpoint fails the test: the check must come first."""

    def refuse(*_a, **_k):
        raise AssertionError("a transformers config was loaded before config.json was checked")

    monkeypatch.setattr(transformers.AutoConfig, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)


@pytest.mark.parametrize("op", [op for op in OPERATIONS if "checkpoint" in OPERATIONS[op].spec.model_fields])
@pytest.mark.parametrize(("fixture", "changes", "field", "words"), DEFECTS,
                         ids=[f"{d[0]}-{next(iter(d[1]))}" for d in DEFECTS])
def test_every_operation_refuses_a_config_that_contradicts_the_weights(
        data: Path, no_model_built, op: str, fixture: str, changes: dict, field: str, words: list[str]) -> None:
    name = f"{fixture}-{'-'.join(f'{k}{v}' for k, v in changes.items())}"
    src = with_config(data, fixture, name, **changes)
    before = tree_digest(data / src)
    listing = sorted(p.name for p in data.iterdir())
    spec = OPERATIONS[op].spec.model_validate(request(op, src))
    tracemalloc.start()
    try:
        with pytest.raises(InvalidCheckpoint) as err:
            OPERATIONS[op].run(spec, RunContext(data))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert err.value.field == field, (err.value.field, err.value.detail)
    assert all(w in err.value.detail for w in words), err.value.detail
    assert err.value.fix and "config.json that belongs to these weights" in err.value.fix
    assert peak < 16 << 20  # flat: nothing built per declared layer
    assert sorted(p.name for p in data.iterdir()) == listing and tree_digest(data / src) == before


def test_over_http_a_billion_layers_is_a_422_naming_the_field(data: Path) -> None:
    src = with_config(data, "llama-untied-tiny", "billion", num_hidden_layers=1_000_000_000)
    client = TestClient(create_app(Settings(data_dir=data)), raise_server_exceptions=False)
    r = client.post("/extend-vocab", json={"checkpoint": src, "output": "billion-out", "tokens": ["<a>"]})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
    body = r.json()
    assert body["field"] == "config.num_hidden_layers" and "num_hidden_layers 2" in body["fix"]
    assert not (data / "billion-out").exists()


def test_absurd_numbers_outside_the_text_model_hit_the_ceiling(data: Path) -> None:
    src = with_config(data, "llama-untied-tiny", "vision-billion", vision_config={"num_hidden_layers": 10**9})
    with pytest.raises(InvalidCheckpoint) as err:
        check_config(Checkpoint.open(data / src))
    assert err.value.field == "config.vision_config.num_hidden_layers" and f"0..{MAX_LAYERS}" in err.value.detail


def test_text_config_of_a_multimodal_config_is_named(data: Path) -> None:
    src = with_config(data, "llama-untied-tiny", "mm", text_config={"num_hidden_layers": 40, "vocab_size": 128})
    with pytest.raises(InvalidCheckpoint) as err:
        check_config(Checkpoint.open(data / src))
    assert err.value.field == "config.text_config.num_hidden_layers"


@pytest.mark.parametrize(("changes", "field", "words"), [
    ({"hidden_size": 16}, "config.hidden_size", ["[128, 16]", "[128, 32]", "hidden_size 32"]),
])
def test_a_narrower_width_is_refused_once_the_model_is_built(data: Path, changes: dict, field: str,
                                                             words: list[str]) -> None:
    """Narrower than the weights: the meta-device model (no storage) has another embedding shape. (A smaller
    ``vocab_size`` or layer count is refused from the headers, see DEFECTS.)"""
    src = with_config(data, "llama-untied-tiny", f"small-{next(iter(changes))}", **changes)
    for op in ("extend-vocab", "attach-head", "attach-lora"):
        spec = OPERATIONS[op].spec.model_validate(request(op, src))
        with pytest.raises(InvalidCheckpoint) as err:
            OPERATIONS[op].run(spec, RunContext(data))
        assert err.value.field == field and all(w in err.value.detail + err.value.fix for w in words), \
            err.value.detail


@pytest.mark.parametrize("fixture", ["llama-untied-tiny", "gpt2-tied-tiny", "bert-mlm-tiny", "bert-plain-tiny",
                                     "qwen2-padded-tiny"])
def test_fixtures_with_legit_quirks_pass(data: Path, fixture: str) -> None:
    """Padded vocabularies (rows > tokenizer), tied heads, keys without the bert. prefix, GPT-2's n_layer."""
    check_config(Checkpoint.open(data / fixture))


def _moe(tmp_path: Path, experts_in_weights: int, declared: int, fused: bool) -> Checkpoint:
    root = tmp_path / f"moe-{experts_in_weights}-{declared}-{fused}"
    root.mkdir()
    t = {"model.embed_tokens.weight": torch.zeros(16, 8)}
    for layer in range(2):
        if fused:
            t[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.zeros(experts_in_weights, 8, 32)
        else:
            for e in range(experts_in_weights):
                t[f"model.layers.{layer}.mlp.experts.{e}.w1.weight"] = torch.zeros(4, 8)
    save_file(t, str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"model_type": "mixtral", "num_hidden_layers": 2, "hidden_size": 8,
                                                  "vocab_size": 16, "num_local_experts": declared}))
    return Checkpoint.open(root)


@pytest.mark.parametrize("fused", [False, True])
def test_experts(tmp_path: Path, fused: bool) -> None:
    check_config(_moe(tmp_path, 4, 4, fused))
    with pytest.raises(InvalidCheckpoint) as err:
        check_config(_moe(tmp_path, 4, 64, fused))
    assert err.value.field == "config.num_local_experts" and "hold 4 experts" in err.value.detail


def test_patched_checkpoint_of_verify_is_named(data: Path) -> None:
    src = with_config(data, "llama-untied-tiny", "verify-wide", hidden_size=128)
    with pytest.raises(InvalidCheckpoint) as err:
        check_config(Checkpoint.open(data / src), "patched.config")
    assert err.value.field == "patched.config.hidden_size"


def _layers(tmp_path: Path, name: str, tensors: list[str], config: dict) -> Checkpoint:
    root = tmp_path / name
    root.mkdir()
    save_file({k: torch.zeros(16, 8) for k in ["model.embed_tokens.weight", *tensors]},
              str(root / "model.safetensors"))
    (root / "config.json").write_text(json.dumps({"hidden_size": 8, "vocab_size": 16, **config}))
    return Checkpoint.open(root)


def test_extra_layers_the_config_names_pass(tmp_path: Path) -> None:
    """Multi-token-prediction layers after the declared ones (DeepSeek-V3, GLM-4.5), a deeper decoder (T5), other
    numbered lists (wav2vec2's conv_layers), a padded vocabulary that ChatGLM declares as padded_vocab_size."""
    layers = [f"model.layers.{i}.mlp.weight" for i in range(3)]
    check_config(_layers(tmp_path, "mtp", layers, {"num_hidden_layers": 2, "num_nextn_predict_layers": 1}))
    check_config(_layers(tmp_path, "t5", ["encoder.block.0.w.weight", *(f"decoder.block.{i}.w.weight"
                                                                           for i in range(3))],
                         {"num_layers": 1, "num_decoder_layers": 3}))
    check_config(_layers(tmp_path, "conv", [*layers[:1], *(f"fe.conv_layers.{i}.w.weight" for i in range(7))],
                         {"num_hidden_layers": 1}))
    check_config(_layers(tmp_path, "glm", [], {"vocab_size": 12, "padded_vocab_size": 16}))
    with pytest.raises(InvalidCheckpoint) as err:
        check_config(_layers(tmp_path, "mtp-short", layers, {"num_hidden_layers": 1, "num_nextn_predict_layers": 1}))
    assert err.value.field == "config.num_hidden_layers" and "num_hidden_layers 2" in err.value.fix


def test_expand_blocks_refuses_a_config_declaring_fewer_layers_over_http(data: Path) -> None:
    """The reviewer's case: expand-blocks answered 200 (a corrupt output) for num_hidden_layers below the weights'."""
    src = with_config(data, "llama-untied-tiny", "one-layer", num_hidden_layers=1)
    before = tree_digest(data / src)
    client = TestClient(create_app(Settings(data_dir=data)), raise_server_exceptions=False)
    r = client.post("/expand-blocks", json={"checkpoint": src, "output": "one-layer-out", "num_blocks": 1})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
    assert r.json()["field"] == "config.num_hidden_layers" and "num_hidden_layers 2" in r.json()["fix"]
    assert not (data / "one-layer-out").exists() and tree_digest(data / src) == before


@pytest.mark.parametrize("op", [op for op in OPERATIONS if "checkpoint" in OPERATIONS[op].spec.model_fields
                                and op not in ("verify", "merge-lora")])
@pytest.mark.parametrize("changes", [{"vocab_size": None}, {"hidden_size": None}], ids=["vocab_size", "hidden_size"])
def test_a_field_transformers_refuses_is_named_as_config_json_s(data: Path, op: str, changes: dict) -> None:
    """``"vocab_size": null`` (a type transformers' config class refuses, legitimate for other fields such as GPT-2's
    ``n_inner``): extend-vocab answered "the tokenizer files could not be loaded", fix "Re-save the tokenizer";
    attach-lora and attach-head named ``checkpoint``. Each names the config field now, as the checks above do."""
    key = next(iter(changes))
    src = with_config(data, "llama-untied-tiny", f"null-{key}", **changes)
    before = tree_digest(data / src)
    spec = OPERATIONS[op].spec.model_validate(request(op, src))
    with pytest.raises(InvalidCheckpoint) as err:
        OPERATIONS[op].run(spec, RunContext(data))
    assert err.value.field == f"config.{key}", (err.value.field, err.value.detail)
    assert f"config.json declares {key} None" in err.value.detail and "tokenizer" not in err.value.detail
    assert err.value.fix and "config.json" in err.value.fix and "tokenizer" not in err.value.fix
    assert tree_digest(data / src) == before and not (data / f"{src}-out").exists()


def test_verify_names_the_patched_config_before_comparing_the_two(data: Path) -> None:
    """``"num_hidden_layers": "two"`` in the patched config was a 422 "not derived from this base: layer count"."""
    src = with_config(data, "llama-untied-tiny", "verify-two", num_hidden_layers="two")
    spec = OPERATIONS["verify"].spec.model_validate({"checkpoint": "llama-untied-tiny", "patched": src})
    with pytest.raises(InvalidCheckpoint) as err:
        OPERATIONS["verify"].run(spec, RunContext(data))
    assert err.value.field == "patched.config.num_hidden_layers" and "not a number" in err.value.detail
