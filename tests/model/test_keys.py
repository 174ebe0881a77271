"""model/keys.py: checkpoint keys mapped as from_pretrained maps them (transformers' private conversion rules).

These tests pin the ``transformers`` internals the module uses: if ``get_model_conversion_mapping`` or
``rename_source_key`` change or disappear, the rule source or the mapping compared with real loads fails here.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from adapter_surgery.io.checkpoint import Checkpoint
from adapter_surgery.model.keys import KeyMap, key_map, layout_key
from adapter_surgery.model.layers import layer_facts
from adapter_surgery.model.roles import build_meta_model, resolve_architecture
from tests.layouts import LAYOUTS, build, model_class


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("keys")


def test_the_transformers_internals_are_there() -> None:
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming, apply_renamings, rename_source_key

    assert list(inspect.signature(rename_source_key).parameters)[:5] == [
        "source_key", "weight_renamings", "weight_converters", "base_model_prefix", "meta_state_dict"]
    assert "add_legacy" in inspect.signature(get_model_conversion_mapping).parameters
    assert callable(apply_renamings) and issubclass(WeightConverter, object) and issubclass(WeightRenaming, object)


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_every_key_names_the_tensor_from_pretrained_loads_it_into(root: Path, name: str) -> None:
    src = build(name, root)
    ckpt = Checkpoint.open(src)
    meta, _ = build_meta_model(ckpt)
    keys = key_map(ckpt.weight_map, meta)
    assert keys.source == "transformers" and not keys.unmatched and not keys.converted
    loaded = model_class(src).from_pretrained(str(src)).state_dict()
    stored = load_file(str(src / "model.safetensors"))
    for key, value in stored.items():
        name_in_model = keys.model_name(key)
        assert torch.equal(loaded[name_in_model], value), (key, name_in_model)
        assert keys.checkpoint_key(name_in_model, ckpt) == key
    renamed = ("llava", "llava-tied", "llava-doubled", "qwen2vl", "llama-base-causal", "gpt2-old")  # prefix added
    assert bool(keys.renamed) == (name in renamed)


def test_layout_key_is_what_save_pretrained_writes(root: Path) -> None:
    ckpt = Checkpoint.open(build("llava-tied", root))
    meta, _ = build_meta_model(ckpt)
    keys = key_map(ckpt.weight_map, meta)
    assert keys.checkpoint_key("lm_head.weight", ckpt) is None  # tied: not stored
    assert layout_key(meta, keys, "lm_head.weight") == "language_model.lm_head.weight"
    assert "language_model.lm_head.weight" in Checkpoint.open(build("llava", root))  # untied, as transformers saved
    class_layout = Checkpoint.open(build("llava-class", root))
    assert layout_key(meta, key_map(class_layout.weight_map, meta), "lm_head.weight") == "lm_head.weight"


def test_unmatched_keys_and_the_identity_map() -> None:
    keys = KeyMap(renamed={"a.x": "b.x"}, unmatched=frozenset({"junk"}))
    assert keys.model_name("a.x") == "b.x" and keys.model_name("junk") is None and keys.model_name("c") == "c"
    assert keys.checkpoint_key("b.x", {"a.x"}) == "a.x" and keys.checkpoint_key("c", {"c"}) == "c"
    assert keys.checkpoint_key("a.x", {"a.x"}) is None  # a renamed key is not the model's a.x


@pytest.mark.parametrize(("name", "embed", "layers"), [
    ("llava", "language_model.model.embed_tokens.weight", "language_model.model.layers"),
    ("llava-class", "model.language_model.embed_tokens.weight", "model.language_model.layers"),
    ("llava-doubled", "model.language_model.model.embed_tokens.weight", "model.language_model.model.layers"),
    ("qwen2vl", "model.embed_tokens.weight", "model.layers"),
    ("qwen2vl-class", "model.language_model.embed_tokens.weight", "model.language_model.layers"),
    ("llama-base-causal", "embed_tokens.weight", "layers"),
    ("gpt2-old", "wte.weight", "h"),
])
def test_roles_and_layers_in_the_checkpoint_layout(root: Path, name: str, embed: str, layers: str) -> None:
    ckpt = Checkpoint.open(build(name, root))
    arch = resolve_architecture(ckpt)
    assert arch.input_embedding == embed
    assert layer_facts(ckpt).key_prefix == layers
    if name.startswith(("llava", "qwen2vl")):
        assert arch.text_module == "model.language_model"


def test_converted_keys_name_the_fused_tensor_they_fill(root: Path) -> None:
    """Mixtral as transformers 5 saves it (one tensor per expert, ``block_sparse_moe.``): every per-expert key is
    converted, into the fused tensor ``from_pretrained`` stacks it into (equal values: checked against a real load)."""
    from tests.coverage.families import FAMILIES

    src = next(f for f in FAMILIES if f.name == "Mixtral").build(root / "mixtral")
    ckpt = Checkpoint.open(src)
    meta, _ = build_meta_model(ckpt)
    keys = key_map(ckpt.weight_map, meta)
    assert keys.converted == {k for k in ckpt.weight_map if ".experts." in k} and set(keys.converted_to) == \
        set(keys.converted)
    assert keys.converted_to["model.layers.1.block_sparse_moe.experts.2.w3.weight"] == \
        "model.layers.1.mlp.experts.gate_up_proj"
    assert keys.converted_to["model.layers.0.block_sparse_moe.experts.3.w2.weight"] == \
        "model.layers.0.mlp.experts.down_proj"
    loaded = model_class(src).from_pretrained(str(src)).state_dict()
    stored = load_file(str(src / "model.safetensors"))
    assert torch.equal(loaded["model.layers.0.mlp.experts.down_proj"][3],
                       stored["model.layers.0.block_sparse_moe.experts.3.w2.weight"])
