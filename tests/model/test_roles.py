"""Architecture resolution: resolved once per architecture in a process, copies handed out."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from adapter_surgery.io import Checkpoint
from adapter_surgery.model import roles as arch_module
from adapter_surgery.model.roles import resolve_architecture


def test_resolution_is_cached_per_config_and_headers(data_dir: Path, build, monkeypatch: pytest.MonkeyPatch) -> None:
    src = build("FX-B")
    cache = arch_module.ArchitectureCache()
    built: list[str] = []
    real = arch_module.build_meta_model
    monkeypatch.setattr(arch_module, "build_meta_model", lambda ckpt: built.append(ckpt.root.name) or real(ckpt))
    first = resolve_architecture(Checkpoint.open(data_dir / src), cache)
    first.notes.append("changed by a caller")
    second = resolve_architecture(Checkpoint.open(data_dir / src), cache)
    assert built == [src] and second.source == "config" and second.notes == []  # a copy, not the cached object
    assert (second.input_embedding, second.output_head, second.tied) == (
        first.input_embedding, first.output_head, first.tied)
    cfg = json.loads((data_dir / src / "config.json").read_text())
    cfg["tie_word_embeddings"] = True  # another config: resolved again (here: the stored head becomes redundant)
    (data_dir / src / "config.json").write_text(json.dumps(cfg))
    third = resolve_architecture(Checkpoint.open(data_dir / src), cache)
    assert built == [src, src] and third.tied and third.redundant_keys == [first.output_head]


def test_without_a_cache_each_call_resolves(data_dir: Path, build, monkeypatch: pytest.MonkeyPatch) -> None:
    src = build("FX-B")
    built: list[str] = []
    real = arch_module.build_meta_model
    monkeypatch.setattr(arch_module, "build_meta_model", lambda ckpt: built.append(ckpt.root.name) or real(ckpt))
    resolve_architecture(Checkpoint.open(data_dir / src))
    resolve_architecture(Checkpoint.open(data_dir / src))
    assert built == [src, src]  # no process-wide state: the owner of a cache passes it down


def test_the_service_keeps_one_cache_for_its_jobs(tmp_path: Path) -> None:
    from adapter_surgery.jobs import JobService
    from adapter_surgery.settings import Settings

    a, b = JobService(Settings(data_dir=tmp_path)), JobService(Settings(data_dir=tmp_path))
    assert isinstance(a.architectures, arch_module.ArchitectureCache) and a.architectures is not b.architectures


def test_check_growable_refuses_a_vocabulary_buffer_of_another_shape() -> None:
    """A ``(1, vocab)`` buffer is padded (growable); one value per row in any other shape is a 422 naming it."""
    from adapter_surgery.errors import InvalidCheckpoint
    from adapter_surgery.model.roles import Architecture

    fields = dict(source="config", model_class="M", input_embedding="e.weight", output_head=None, head_param=None,
                  tied=True, output_bias=None, vocab_rows=128, config_vocab_size=128, text_config_key=None,
                  hidden_size=8)
    Architecture(**fields, other_vocab_tensors=["final_logits_bias"]).check_growable()
    with pytest.raises(InvalidCheckpoint) as err:
        Architecture(**fields, ungrowable_vocab_tensors=["odd_bias"]).check_growable()
    assert err.value.field == "checkpoint" and "odd_bias" in str(err.value)
    assert "resize_token_embeddings" in err.value.fix


def test_resolve_with_model_hands_over_the_model_it_built(data_dir: Path, build,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """The model built to resolve the architecture is given to the caller (built once per operation); a cache hit
    built none (None), and the cached architecture stays a copy."""
    src = build("FX-B")
    built: list[object] = []
    real = arch_module.build_meta_model

    def counting(ckpt):
        model, problem = real(ckpt)
        built.append(model)
        return model, problem

    monkeypatch.setattr(arch_module, "build_meta_model", counting)
    arch, model = arch_module.resolve_with_model(Checkpoint.open(data_dir / src))
    assert model is built[0] and type(model).__name__ == arch.model_class == "LlamaForCausalLM"
    assert arch == resolve_architecture(Checkpoint.open(data_dir / src))
    cache = arch_module.ArchitectureCache()
    first, first_model = arch_module.resolve_with_model(Checkpoint.open(data_dir / src), cache)
    second, second_model = arch_module.resolve_with_model(Checkpoint.open(data_dir / src), cache)
    assert first_model is built[2] and second_model is None and len(built) == 3
    assert second == first and second is not first


def count_builds(monkeypatch: pytest.MonkeyPatch, *users: object) -> list[str]:
    """The names of the checkpoints whose meta model is built from now on (``build_meta_model`` counted in roles and
    in each module of ``users`` that imported it)."""
    built: list[str] = []
    real = arch_module.build_meta_model

    def counting(ckpt):
        built.append(ckpt.root.name)
        return real(ckpt)

    for module in (arch_module, *users):
        monkeypatch.setattr(module, "build_meta_model", counting)
    return built


def test_attach_lora_builds_the_meta_model_once(data_dir: Path, build, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a cache (the CLI) the operation reuses the architecture's model; with one, a hit builds it once."""
    from adapter_surgery.ops.attach_lora import AttachLoraSpec, attach_lora
    from adapter_surgery.ops.attach_lora import targets as lora_targets
    from adapter_surgery.ops.common import RunContext

    src = build("FX-B")
    built = count_builds(monkeypatch, lora_targets)
    spec = {"checkpoint": src, "r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    attach_lora(AttachLoraSpec(output="a", **spec), RunContext(data_dir))
    assert built == [src]
    cache = arch_module.ArchitectureCache()
    attach_lora(AttachLoraSpec(output="b", **spec), RunContext(data_dir, architectures=cache))
    attach_lora(AttachLoraSpec(output="c", **spec), RunContext(data_dir, architectures=cache))
    assert built == [src] * 3  # a miss (reused), then a hit (built once)
    assert (data_dir / "a" / "adapter_model.safetensors").read_bytes() == \
        (data_dir / "c" / "adapter_model.safetensors").read_bytes()


def test_merge_lora_builds_the_meta_model_once(data_dir: Path, build, monkeypatch: pytest.MonkeyPatch) -> None:
    """merge-lora, like attach-lora: the architecture's model is reused on a miss, built once on a cache hit."""
    import importlib

    from adapter_surgery.ops.attach_lora import AttachLoraSpec, attach_lora
    from adapter_surgery.ops.common import RunContext
    from adapter_surgery.ops.merge_lora import MergeLoraSpec, merge_lora

    src = build("FX-B")
    attach_lora(AttachLoraSpec(checkpoint=src, output="lora", r=4, lora_alpha=8, target_modules="all-linear"),
                RunContext(data_dir))
    built = count_builds(monkeypatch, importlib.import_module("adapter_surgery.ops.merge_lora"))
    spec = {"checkpoint": src, "adapters": [{"path": "lora"}]}
    merge_lora(MergeLoraSpec(output="m1", **spec), RunContext(data_dir))
    assert built == [src]
    cache = arch_module.ArchitectureCache()
    merge_lora(MergeLoraSpec(output="m2", **spec), RunContext(data_dir, architectures=cache))
    merge_lora(MergeLoraSpec(output="m3", **spec), RunContext(data_dir, architectures=cache))
    assert built == [src] * 3
    assert sorted(p.name for p in (data_dir / "m1").iterdir()) == sorted(p.name for p in (data_dir / "m3").iterdir())
