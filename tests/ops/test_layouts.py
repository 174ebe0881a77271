"""extend-vocab, attach-lora and attach-head on checkpoints whose key layout differs from their class (issue 10).

Models from :mod:`tests.layouts`, each saved by ``transformers`` itself (LLaVA and Qwen2-VL as ``save_pretrained``
writes them and in the class's own names, LLaVA's doubled ``model.language_model.model`` layout, T5 and BART with
shared embeddings, bare ``LlamaModel``/``GPT2Model`` backbones, a ``*ForCausalLM`` config over a backbone's keys).
Every output loads in ``transformers``/``peft`` with no missing, unexpected or mismatched keys; extend-vocab keeps
the input's key names and every other tensor (the vision tower included) is unchanged; old-vocabulary logits and
LoRA-at-init outputs equal the base; what a family cannot do is a 422 naming the field.
"""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file
from transformers import AutoModelForSequenceClassification

from adapter_surgery.errors import InvalidSpec
from adapter_surgery.io.checkpoint import Checkpoint
from adapter_surgery.model.roles import resolve_architecture
from adapter_surgery.ops.attach_head import AttachHeadSpec, attach_head
from adapter_surgery.ops.attach_lora import AttachLoraSpec, attach_lora
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, extend_vocab
from tests.layouts import IDS, LAYOUTS, NON_TEXT, VOCAB, build, model_class

warnings.filterwarnings("ignore", module="peft")
MULTIMODAL = [n for n in LAYOUTS if n.startswith(("llava", "qwen2vl"))]
TEXT_ONLY = [n for n in LAYOUTS if n not in MULTIMODAL]
ENCODER_DECODER = ("t5", "bart")
NEW = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("layouts")


def tensors(path: Path) -> dict[str, torch.Tensor]:
    files = [path] if path.is_file() else sorted(path.glob("*.safetensors"))
    return {k: v for f in files for k, v in load_file(str(f)).items()}


def load(path: Path, cls=None):
    """``from_pretrained`` asserting that no key is missing, unexpected or mismatched."""
    cls = cls or model_class(path)
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    assert not any(info.get(k) for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    return model.eval()


@torch.no_grad()
def outputs(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    """Logits over the old vocabulary (a model with a head), else the last hidden state."""
    kw = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    out = model(input_ids=ids, **kw)
    logits = getattr(out, "logits", None)
    return logits[..., :VOCAB].float() if logits is not None else out.last_hidden_state.float()


@torch.no_grad()
def backbone(model, ids: torch.Tensor = IDS) -> torch.Tensor:
    """What a new head reads: the encoder's states (encoder-decoders), else the base model's last hidden state."""
    if model.config.is_encoder_decoder:
        return model.get_encoder()(input_ids=ids).last_hidden_state
    return model.base_model(input_ids=ids).last_hidden_state


def text_config(path: Path) -> dict:
    cfg = json.loads((path / "config.json").read_text())
    return cfg.get("text_config", cfg)


# -- extend-vocab ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [n for n in LAYOUTS if n != "bart"])
def test_extend_vocab_keeps_the_layout_and_the_base(data: Path, name: str) -> None:
    src = build(name, data)
    result = extend_vocab(ExtendVocabSpec(checkpoint=name, output=f"{name}-ev", num_new_tokens=NEW), RunContext(data))
    out = data / f"{name}-ev"
    before, after = tensors(src), tensors(out)
    assert set(after) == set(before)  # the input's names, nothing added or renamed
    changed = {c.name for c in result.changed_tensors}
    assert changed and changed <= set(before)
    for key, value in before.items():
        if key in changed:
            assert after[key].shape[0] == value.shape[0] + NEW and torch.equal(after[key][:VOCAB], value), key
        else:
            assert after[key].dtype == value.dtype and torch.equal(after[key], value), key
    assert any(k.startswith(NON_TEXT) for k in before) == (name in MULTIMODAL)  # the vision tower: unchanged above
    assert text_config(out)["vocab_size"] == VOCAB + NEW
    torch.testing.assert_close(outputs(load(out)), outputs(load(src)), rtol=0, atol=0)


def test_extend_vocab_pads_bart_final_logits_bias(data: Path) -> None:
    """BART's ``final_logits_bias`` (1, vocab) is added to the logits: padded with zeros along its last dimension,
    as ``resize_token_embeddings`` pads it; old-vocabulary logits equal the base's (a non-zero bias here)."""
    src = data / "bart-bias"
    shutil.copytree(build("bart", data), src)
    weights = tensors(src)
    weights["final_logits_bias"] = torch.randn(1, VOCAB, generator=torch.Generator().manual_seed(0))
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    result = extend_vocab(ExtendVocabSpec(checkpoint="bart-bias", output="bart-bias-ev", num_new_tokens=NEW),
                          RunContext(data))
    out = data / "bart-bias-ev"
    before, after = tensors(src), tensors(out)
    assert set(after) == set(before)
    changed = {c.name: (c.shape_before, c.shape) for c in result.changed_tensors}
    assert changed["final_logits_bias"] == ([1, VOCAB], [1, VOCAB + NEW])
    assert torch.equal(after["final_logits_bias"][:, :VOCAB], before["final_logits_bias"])
    assert torch.equal(after["final_logits_bias"][:, VOCAB:], torch.zeros(1, NEW))
    resized = load(src)
    resized.resize_token_embeddings(VOCAB + NEW)
    assert torch.equal(resized.final_logits_bias, after["final_logits_bias"])  # transformers' own padding
    torch.testing.assert_close(outputs(load(out)), outputs(load(src)), rtol=0, atol=0)


def test_extend_vocab_untie_writes_the_head_in_the_input_layout(data: Path) -> None:
    src = build("llava-tied", data)
    extend_vocab(ExtendVocabSpec(checkpoint="llava-tied", output="llava-untied", num_new_tokens=NEW, untie=True),
                 RunContext(data))
    out = data / "llava-untied"
    after = tensors(out)
    assert set(after) - set(tensors(src)) == {"language_model.lm_head.weight"}  # as save_pretrained names it
    assert torch.equal(after["language_model.lm_head.weight"], after["language_model.model.embed_tokens.weight"])
    model = load(out)
    assert model.lm_head.weight.data_ptr() != model.get_input_embeddings().weight.data_ptr()
    torch.testing.assert_close(outputs(model), outputs(load(src)), rtol=0, atol=0)


def test_extend_vocab_bare_backbone_file(data: Path) -> None:
    shutil.copy(build("llama-base", data) / "model.safetensors", data / "bare.safetensors")
    result = extend_vocab(ExtendVocabSpec(checkpoint="bare.safetensors", output="bare-ev.safetensors",
                                          num_new_tokens=NEW), RunContext(data))
    before, after = tensors(data / "bare.safetensors"), tensors(data / "bare-ev.safetensors")
    assert [c.name for c in result.changed_tensors] == ["embed_tokens.weight"] and set(after) == set(before)
    assert after["embed_tokens.weight"].shape == (VOCAB + NEW, 32)


# -- attach-lora ----------------------------------------------------------------------------------------------
def lora_targets(name: str) -> dict:
    """Default targets where peft has them; the language model's q/v projections for multimodal models."""
    return {"target_modules": r"model\.language_model\..*\.(q_proj|v_proj)$"} if name in MULTIMODAL else {}


@pytest.mark.parametrize("name", list(LAYOUTS))
def test_attach_lora_loads_in_peft_and_is_identity(data: Path, name: str, tmp_path: Path) -> None:
    src = build(name, data)
    opts = lora_targets(name)
    attach_lora(AttachLoraSpec(checkpoint=name, output=f"{name}-lora", overwrite=True, seed=0, **opts),
                RunContext(data))
    out = data / f"{name}-lora"
    saved = load_file(str(out / "adapter_model.safetensors"))
    task_type = json.loads((out / "adapter_config.json").read_text())["task_type"]
    torch.manual_seed(0)  # what peft itself writes, on the base transformers loads
    reference = get_peft_model(load(src), LoraConfig(task_type=task_type, **opts))
    expected = get_peft_model_state_dict(reference)
    assert set(saved) == set(expected)
    for key, value in saved.items():
        assert torch.equal(value, expected[key]), key
    if name in MULTIMODAL:
        assert not any("vision" in k or "visual" in k for k in saved)
    adapted = PeftModel.from_pretrained(load(src), str(out)).eval()
    loaded = get_peft_model_state_dict(adapted)
    assert set(loaded) == set(saved)
    torch.testing.assert_close(outputs(adapted), outputs(load(src)), rtol=0, atol=0)


@pytest.mark.parametrize("name", ["llava", "qwen2vl"])
def test_attach_lora_default_targets_on_multimodal_is_a_422_with_the_text_only_regex(data: Path, name: str) -> None:
    build(name, data)
    with pytest.raises(InvalidSpec) as err:
        attach_lora(AttachLoraSpec(checkpoint=name, output=f"{name}-default"), RunContext(data))
    assert err.value.field == "target_modules"
    assert "peft has no default target_modules" in str(err.value)
    assert r"model\.language_model\..*\.(q_proj|v_proj)$" in err.value.fix
    assert not (data / f"{name}-default").exists()


# -- attach-head ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", TEXT_ONLY)
def test_attach_head_sequence_loads_with_the_base_backbone(data: Path, name: str) -> None:
    src = build(name, data)
    attach_head(AttachHeadSpec(checkpoint=name, output=f"{name}-head", num_labels=3), RunContext(data))
    out = data / f"{name}-head"
    head = load(out, AutoModelForSequenceClassification)
    assert head.config.num_labels == 3
    torch.testing.assert_close(backbone(head), backbone(load(src)), rtol=0, atol=0)
    eos = head.config.eos_token_id if name in ENCODER_DECODER else None
    ids = torch.cat([IDS, torch.tensor([[eos]])], 1) if eos is not None else IDS  # T5/BART pool the last eos
    assert torch.isfinite(head(input_ids=ids).logits).all()


@pytest.mark.parametrize("name", ["llava", "qwen2vl"])
def test_attach_head_on_multimodal_is_a_422(data: Path, name: str) -> None:
    build(name, data)
    with pytest.raises(InvalidSpec) as err:
        attach_head(AttachHeadSpec(checkpoint=name, output=f"{name}-head", num_labels=3), RunContext(data))
    assert err.value.field == "task" and "no sequence_classification class" in str(err.value)
    assert not (data / f"{name}-head").exists()


# -- merge-lora -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["llava", "qwen2vl"])
def test_merge_lora_writes_merged_tensors_under_the_input_keys(data: Path, name: str) -> None:
    from adapter_surgery.ops.merge_lora import MergeLoraSpec, merge_lora

    src = build(name, data)
    attach_lora(AttachLoraSpec(checkpoint=name, output=f"{name}-trained", overwrite=True, **lora_targets(name)),
                RunContext(data))
    weights = data / f"{name}-trained" / "adapter_model.safetensors"  # "trained": B != 0, a real delta
    save_file({k: torch.full_like(v, 0.01) if ".lora_B." in k else v for k, v in load_file(str(weights)).items()},
              str(weights), metadata={"format": "pt"})
    merge_lora(MergeLoraSpec.model_validate({"checkpoint": name, "output": f"{name}-merged",
                                             "adapters": [{"path": f"{name}-trained"}]}), RunContext(data))
    out = data / f"{name}-merged"
    before, after = tensors(src), tensors(out)
    assert set(after) == set(before)
    reference = PeftModel.from_pretrained(load(src), str(data / f"{name}-trained")).merge_and_unload().state_dict()
    keys = resolve_architecture(Checkpoint.open(src)).keys
    changed = [k for k in before if not torch.equal(before[k], after[k])]
    assert changed and all("q_proj" in k or "v_proj" in k for k in changed)
    for key, value in after.items():
        assert torch.equal(value, reference[keys.model_name(key)]), key
