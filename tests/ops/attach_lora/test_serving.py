"""attach-lora and surgery with ``serving``: what vLLM cannot load is refused with the field and the fix; without
the field the adapter is written and the warnings name vLLM, and the written adapter (adapter_config.json, tensor
names) is what the rules say."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapter_surgery import serving
from adapter_surgery.api.app import create_app
from adapter_surgery.errors import InvalidSpec
from adapter_surgery.ops.attach_lora import AttachLoraResult, AttachLoraSpec, attach_lora
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.surgery import SurgerySpec, surgery
from adapter_surgery.settings import Settings

warnings.filterwarnings("ignore", module="peft")
QV = {"target_modules": ["q_proj", "v_proj"]}

#: (id, options, field, words in detail + fix, whether the written tensors hold names vLLM's parser refuses)
REFUSED = [
    ("dora", {"use_dora": True}, "use_dora", ["does not yet support DoRA", "/merge-lora"], True),
    ("modules_to_save", {"modules_to_save": ["lm_head"]}, "modules_to_save", ["being None", "extend-vocab"], True),
    ("trainable_tokens", {"trainable_token_indices": [3, 4]}, "trainable_token_indices",
     ["trainable_tokens_delta", "extend-vocab"], True),
    ("bias", {"bias": "all"}, "bias", ['bias "none"'], False),  # FX-B has no biases: the config alone
    ("rank", {"r": 32, "target_modules": ["q_proj"]}, "r", ["greater than max_lora_rank 16", "--max-lora-rank 32"],
     False),
    ("scaling", {"rank_pattern": {"v_proj": 4}}, "rank_pattern", ["one scaling", "lora_alpha 4"], False),
    ("pissa", {"init_lora_weights": "pissa", "r": 16}, "init_lora_weights",
     ["/convert-adapter", "--max-lora-rank 32"], False),
]


def run(data: Path, checkpoint: str, output: str = "out", **kw) -> AttachLoraResult:
    return attach_lora(AttachLoraSpec(checkpoint=checkpoint, output=output, **{**QV, **kw}), RunContext(data))


@pytest.mark.parametrize(("opts", "field", "words", "bad_keys"), [c[1:] for c in REFUSED], ids=[c[0] for c in REFUSED])
def test_refused_for_vllm_and_warned_without_serving(data_dir: Path, build, opts: dict, field: str,
                                                     words: list[str], bad_keys: bool) -> None:
    src = build("FX-B")
    with pytest.raises(InvalidSpec) as exc:
        run(data_dir, src, serving="vllm", **opts)
    assert exc.value.field == field and exc.value.fix
    assert exc.value.detail.startswith("vllm cannot load this adapter")
    for w in words:
        assert w in exc.value.detail + exc.value.fix, w
    assert not (data_dir / "out").exists() and not list(data_dir.glob(".out*"))

    r = run(data_dir, src, **opts)  # without serving: written, and the warning names vLLM and the field
    mentions = [w for w in r.warnings if w.startswith(f"vllm could not load this adapter: {field}:")]
    assert len(mentions) == 1, r.warnings
    saved = json.loads((data_dir / "out" / "adapter_config.json").read_text())
    keys = load_file(str(data_dir / "out" / "adapter_model.safetensors")).keys()
    assert bool(serving.unloadable_keys("vllm", keys)) is bad_keys
    if field != "init_lora_weights":  # the saved config of a PiSSA adapter says true (already decomposed)
        on_file = serving.problems("vllm", saved, max_lora_rank=None)  # the file vLLM's PEFTHelper reads
        assert field.split(".")[0] in {p.field.split(".")[0] for p in on_file} or field == "rank_pattern"


def test_a_plain_lora_passes_and_loads(data_dir: Path, build) -> None:
    src = build("FX-B")
    r = run(data_dir, src, serving="vllm", r=16, lora_alpha=32, rank_pattern={"v_proj": 8},
            alpha_pattern={"v_proj": 16})
    assert not [w for w in r.warnings if "vllm" in w]
    out = data_dir / "out"
    keys = load_file(str(out / "adapter_model.safetensors")).keys()
    assert serving.unloadable_keys("vllm", keys) == [] and len(keys) == 8
    saved = json.loads((out / "adapter_config.json").read_text())
    assert serving.problems("vllm", saved) == []
    assert {t.name.rsplit(".", 1)[-1]: t.scaling for t in r.target_modules} == {"q_proj": 2.0, "v_proj": 2.0}
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(data_dir / src, dtype=torch.float32), out)
    assert sum("lora_A" in n for n, _ in model.named_parameters()) == 4
    # the rank limit is the server's: r 32 passes with max_lora_rank 32
    r = run(data_dir, src, "out32", serving="vllm", r=32, max_lora_rank=32, target_modules=["q_proj"])
    assert [t.r for t in r.target_modules] == [32] * 2 and not [w for w in r.warnings if "vllm" in w]
    with pytest.raises(InvalidSpec) as exc:
        run(data_dir, src, "out8", serving="vllm", r=16, max_lora_rank=8)
    assert exc.value.field == "r" and "--max-lora-rank 16" in exc.value.fix


def test_a_sequence_classification_adapter_passes_with_a_note(data_dir: Path, build) -> None:
    """peft saves the SEQ_CLS head (score) in the adapter; vLLM's newest loader takes classifier/score."""
    src = build("FX-B")
    plan = {"checkpoint": src, "output": "cls", "serving": "vllm",
            "steps": [{"op": "attach-head", "num_labels": 2, "pad_token": "add"}, {"op": "attach-lora", **QV}]}
    r = surgery(SurgerySpec.model_validate(plan), RunContext(data_dir))
    notes = [w for w in r.warnings if "vllm: modules_to_save" in w]
    assert len(notes) == 1 and "older releases refuse" in notes[0]
    assert not [w for w in r.warnings if "could not load" in w]


def test_surgery_passes_serving_to_its_adapter_step(data_dir: Path, build) -> None:
    src = build("FX-B")
    steps = [{"op": "extend-vocab", "tokens": ["<a>", "<b>"]},
             {"op": "attach-lora", **QV, "trainable_token_indices": "added"}]
    with pytest.raises(InvalidSpec) as exc:
        surgery(SurgerySpec.model_validate({"checkpoint": src, "output": "s", "steps": steps, "serving": "vllm"}),
                RunContext(data_dir))
    assert exc.value.field == "steps.1.trainable_token_indices" and "extend-vocab" in exc.value.fix
    assert not (data_dir / "s").exists()
    steps[1].pop("trainable_token_indices")
    r = surgery(SurgerySpec.model_validate({"checkpoint": src, "output": "s", "steps": steps, "serving": "vllm"}),
                RunContext(data_dir))
    assert r.steps[1].op == "attach-lora" and not [w for w in r.warnings if "vllm" in w]
    # without serving the warning comes through, prefixed by the step
    steps[1]["use_dora"] = True
    r = surgery(SurgerySpec.model_validate({"checkpoint": src, "output": "s2", "steps": steps}), RunContext(data_dir))
    assert [w for w in r.warnings if w.startswith("steps.1: vllm could not load this adapter: use_dora:")]


def test_refusal_over_http(data_dir: Path, build) -> None:
    src = build("FX-B")
    client = TestClient(create_app(Settings(data_dir=data_dir)), raise_server_exceptions=False)
    r = client.post("/attach-lora", json={"checkpoint": src, "output": "out", **QV, "use_dora": True,
                                          "serving": "vllm"})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["field"] == "use_dora" and "merge-lora" in r.json()["fix"]
    r = client.post("/attach-lora", json={"checkpoint": src, "output": "out", "serving": "tgi"})
    assert r.status_code == 422 and r.json()["field"] == "serving"
    # a --max-lora-rank vLLM does not take (it was accepted, and r 4 <= 7 passed the rank check)
    r = client.post("/attach-lora", json={"checkpoint": src, "output": "out", **QV, "r": 4, "serving": "vllm",
                                          "max_lora_rank": 7})
    assert r.status_code == 422 and r.json()["field"] == "max_lora_rank"
    assert "1, 8, 16, 32, 64, 128, 256, 320, 512, not 7" in r.json()["detail"] and "e.g. 8" in r.json()["detail"]
    r = client.post("/surgery", json={"checkpoint": src, "output": "out", "steps": [
        {"op": "attach-lora", **QV, "r": 4, "max_lora_rank": 1000}]})
    assert r.status_code == 422 and r.json()["field"] == "steps.0.max_lora_rank", r.json()
    assert not (data_dir / "out").exists()
