"""POST /surgery: multi-step plans as one atomic job; the adapter names the patched base (case B09)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from fastapi.testclient import TestClient
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, AutoTokenizer

from adapter_surgery.api.app import create_app
from adapter_surgery.errors import InvalidSpec
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.surgery import SurgerySpec, surgery
from adapter_surgery.settings import Settings
from tests.conftest import config, tensors, tree_digest

LORA = {"op": "attach-lora", "r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "v_proj"]}


def run(data: Path, checkpoint: str, steps: list[dict], output: str = "out", **kw):
    return surgery(SurgerySpec.model_validate({"checkpoint": checkpoint, "output": output, "steps": steps, **kw}),
                   RunContext(data))


def load_with_info(cls, path: Path, **kw):
    model, info = cls.from_pretrained(path, output_loading_info=True, dtype=torch.float32, **kw)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    return model.eval()


def test_b09_tokens_and_lora_in_one_request(data_dir: Path, build) -> None:
    src = build("FX-B")
    before = tree_digest(data_dir / src)
    r = run(data_dir, src, [{"op": "extend-vocab", "tokens": ["<a>", "<b>", "<c>"]},
                            {**LORA, "trainable_token_indices": "added"}])
    out = data_dir / "out"
    assert r.base == "out" and r.adapter == "out/adapter"
    assert r.steps[1].result["base_model_name_or_path"] == "out"
    assert ".surgery-" not in json.dumps([s.result for s in r.steps])
    assert [s.op for s in r.steps] == ["extend-vocab", "attach-lora"]
    assert tensors(out)["model.embed_tokens.weight"].shape == (131, 32) and config(out)["vocab_size"] == 131
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["base_model_name_or_path"] == "out"
    assert adapter_cfg["trainable_token_indices"] == [128, 129, 130]
    keys = set(tensors(out / "adapter"))
    assert not any(k.endswith(("embed_tokens.weight", "lm_head.weight")) for k in keys)
    assert sum(k.endswith("lora_A.weight") for k in keys) == 4
    base = load_with_info(AutoModelForCausalLM, out)
    ids = torch.tensor([[1, 5, 17, 128, 129, 130, 40]])
    with torch.no_grad():
        expected = base(ids).logits
    peft_model = PeftModel.from_pretrained(load_with_info(AutoModelForCausalLM, out), out / "adapter")
    with torch.no_grad():
        got = peft_model(ids).logits
    assert (got - expected).abs().max() <= 1e-5
    trainable_model = PeftModel.from_pretrained(load_with_info(AutoModelForCausalLM, out), out / "adapter",
                                                is_trainable=True)
    trainable = {n for n, p in trainable_model.named_parameters() if p.requires_grad}
    assert any("trainable_tokens_delta" in n for n in trainable) and any("lora_A" in n for n in trainable)
    assert tree_digest(data_dir / src) == before
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([src, "out"])  # no work directory left


def test_three_step_plan_loads_end_to_end(data_dir: Path, build) -> None:
    src = build("FX-B")
    r = run(data_dir, src, [{"op": "extend-vocab", "tokens": ["<x>", "<y>"]},
                            {**LORA, "trainable_token_indices": "added"},
                            {"op": "attach-head", "num_labels": 3, "pad_token": "add"}], verify=True)
    out = data_dir / "out"
    assert [s.op for s in r.steps] == ["extend-vocab", "attach-head", "attach-lora"]
    assert len(config(out)["id2label"]) == 3 and config(out)["architectures"] == ["LlamaForSequenceClassification"]
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.convert_tokens_to_ids("<x>") == 128 and tok.pad_token == "<pad>"
    assert config(out)["pad_token_id"] == tok.pad_token_id == 130
    assert r.report is not None and r.report.status == "ok"
    adapter_cfg = json.loads((out / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["task_type"] == "SEQ_CLS" and adapter_cfg["base_model_name_or_path"] == "out"
    assert adapter_cfg["trainable_token_indices"] == [128, 129]
    base = load_with_info(AutoModelForSequenceClassification, out)
    ids = torch.tensor([[1, 5, 128, 129, 17]])
    with torch.no_grad():
        expected = base(ids).logits
    peft_model = PeftModel.from_pretrained(load_with_info(AutoModelForSequenceClassification, out), out / "adapter")
    with torch.no_grad():
        assert (peft_model(ids).logits - expected).abs().max() <= 1e-5


def test_a_failing_middle_step_leaves_nothing(data_dir: Path, build) -> None:
    src = build("FX-B")
    with pytest.raises(InvalidSpec) as err:
        run(data_dir, src, [{"op": "extend-vocab", "tokens": ["<a>"]},
                            {**LORA, "target_modules": ["c_attn"]},
                            {"op": "attach-head", "num_labels": 2}])
    assert err.value.field is not None and err.value.field.startswith("steps.1")
    assert sorted(p.name for p in data_dir.iterdir()) == [src]


def test_plan_validation(data_dir: Path, build) -> None:
    src = build("FX-B")
    client = TestClient(create_app(Settings(data_dir=data_dir)))
    bad = [
        ({"steps": []}, "steps"),
        ({"steps": [{"op": "extend-vocab", "tokens": [f"<t{i}>"]} for i in range(17)]}, "steps"),
        ({"steps": [{"op": "attach-head", "num_labels": 2}, {"op": "attach-head", "num_labels": 3}]}, "steps"),
        ({"steps": [{"op": "explode"}]}, "steps.0"),
        ({"steps": [LORA, LORA]}, "steps"),
        ({"steps": [{**LORA, "trainable_token_indices": "added"}]}, "steps"),
        ({"steps": [{"op": "extend-vocab", "tokenz": []}]}, "steps.0.tokenz"),
    ]
    for body, field in bad:
        r = client.post("/surgery", json={"checkpoint": src, "output": "out", **body})
        assert r.status_code == 422, r.text
        assert r.headers["content-type"] == "application/problem+json"
        assert r.json()["field"].startswith(field), (body, r.json())
    assert sorted(p.name for p in data_dir.iterdir()) == [src]
    ok = client.post("/surgery", json={"checkpoint": src, "output": "out",
                                       "steps": [{"op": "extend-vocab", "tokens": ["<z>"]}]})
    assert ok.status_code == 200 and ok.json()["adapter"] is None
    assert tensors(data_dir / "out")["lm_head.weight"].shape == (129, 32)


def test_a_failing_plan_leaves_no_parent_directory(data_dir: Path, build) -> None:
    src = build("FX-B")
    with pytest.raises(InvalidSpec):
        run(data_dir, src, [{"op": "extend-vocab", "tokens": [{"content": "<a>",
                                                                "init": {"strategy": "copy", "source": "nope"}}]}],
            output="new/sub/out")
    assert sorted(p.name for p in data_dir.iterdir()) == [src]


def test_steps_are_derived_from_the_registry() -> None:
    """The step models are the registry's entries with a step role (base steps first): no second table."""
    import dataclasses

    from adapter_surgery.ops import OPERATIONS, StepRole
    from adapter_surgery.ops.surgery import step_models

    def tags(models) -> list[str]:
        return [m.model_fields["op"].annotation.__args__[0] for m in models]

    assert tags(step_models(OPERATIONS)) == ["extend-vocab", "attach-head", "expand-blocks", "attach-lora"]
    assert [m.__name__ for m in step_models(OPERATIONS)] == ["ExtendVocabStep", "AttachHeadStep", "ExpandBlocksStep",
                                                             "AttachLoraStep"]
    # one registry entry with a step role is one more step, validated with its own options
    extra = dataclasses.replace(OPERATIONS["expand-blocks"], name="expand-more", step=StepRole("base"))
    models = step_models({**OPERATIONS, extra.name: extra})
    assert tags(models) == ["extend-vocab", "attach-head", "expand-blocks", "expand-more", "attach-lora"]
    step = models[3].model_validate({"op": "expand-more", "num_blocks": 2})
    assert step.num_blocks == 2 and step.op == "expand-more"  # type: ignore[attr-defined]
    # the adapter step's trainable_token_indices also takes "added"
    lora = models[-1].model_validate({"op": "attach-lora", "trainable_token_indices": "added"})
    assert lora.trainable_token_indices == "added"  # type: ignore[attr-defined]


@pytest.mark.parametrize("steps", [
    [{"op": "attach-head", "num_labels": 2}],  # the embedding's shard untouched: linked
    # both shards rewritten by the first step; the second links the first shard: its digest carried from step 0
    [{"op": "extend-vocab", "tokens": ["<x>"]}, {"op": "attach-head", "num_labels": 2}],
])
def test_files_report_digests_of_what_was_written_and_links_unread(data_dir: Path, build, steps: list) -> None:
    src = build("FX-B")
    r = run(data_dir, src, steps)
    out = data_dir / "out"
    actual = tree_digest(out)
    assert sorted(f.path for f in r.files) == sorted(actual)
    for f in r.files:
        if f.linked:  # untouched by every step: the input's file, not read (no digest cache in this context)
            assert (out / f.path).stat().st_ino == (data_dir / src / f.path).stat().st_ino and f.sha256 is None
        else:
            assert f.sha256 == actual[f.path], f.path
    assert [f.path for f in r.files if f.linked] == (["model-00001-of-00002.safetensors"] if len(steps) == 1 else [])


def test_report_with_expand_blocks_steps_maps_old_layers_to_new(data_dir: Path, build) -> None:
    """Two expand-blocks steps (and extend-vocab between): the plan's report compares every hidden state of the final
    model with the base's at the same depth, as one expand-blocks request with the same blocks reports it."""
    from adapter_surgery.ops.expand_blocks import ExpandBlocksSpec, expand_blocks

    src = build("FX-B")  # 2 layers
    r = run(data_dir, src, [{"op": "expand-blocks", "positions": [0]},  # 3 layers: new 1
                            {"op": "extend-vocab", "tokens": ["<x>"]},
                            {"op": "expand-blocks", "positions": [2]}], verify=True)  # 4 layers: new 1, 3
    assert [s.result["new_layers"] for s in r.steps if s.op == "expand-blocks"] == [[1], [3]]
    report = r.report
    assert report is not None and report.status == "ok", report
    assert report.max_abs_logit_delta == 0.0 and report.logits_preserved and report.passed
    # hidden state i of the output (0: embeddings) against the base's after as many base blocks; the state after
    # output layer 2 (= after every base block, before the trailing new block) has none, the last is the final norm's
    assert [(h.layer, h.base_layer) for h in report.hidden_states] == [(0, 0), (1, 1), (2, 1), (4, 2)]
    assert all(h.max_abs_delta == 0.0 and h.ratio == 1.0 for h in report.hidden_states)
    single = expand_blocks(ExpandBlocksSpec(checkpoint=src, output="single", num_blocks=2, verify=True),
                           RunContext(data_dir))
    assert single.new_layers == [1, 3] and single.report is not None
    assert [h.model_dump() for h in report.hidden_states] == [h.model_dump() for h in single.report.hidden_states]


def test_report_with_a_scaled_normal_step(data_dir: Path, build) -> None:
    src = build("FX-A")  # GPT-2, 2 layers
    r = run(data_dir, src, [{"op": "expand-blocks", "num_blocks": 2, "init": "scaled_normal", "seed": 3}],
            verify=True)
    assert r.report is not None and r.report.status == "ok"
    assert r.report.max_abs_logit_delta > 0 and r.report.logits_preserved is None
    assert any("scaled_normal blocks change the output by design" in w for w in r.report.warnings)
    assert [(h.layer, h.base_layer) for h in r.report.hidden_states] == [(0, 0), (1, 1), (2, 1), (4, 2)]
    # the new blocks write into the stream: states after them differ from the base's at that depth
    assert r.report.hidden_states[2].max_abs_delta > 0 and r.report.passed == r.report.hidden_states_passed


def test_report_checks_the_head_of_an_attach_head_step_as_attach_head_does(data_dir: Path, build) -> None:
    """The plan's report knows the head step's init (it showed init/expected_std/passed null): the same head
    section as a standalone attach-head with verify, on the same base."""
    from adapter_surgery.initializers import expected_std
    from adapter_surgery.ops.attach_head import AttachHeadSpec, attach_head

    src = build("FX-B")
    head = {"num_labels": 4, "init": "xavier_uniform", "pad_token": "add", "seed": 5}
    r = run(data_dir, src, [{"op": "attach-head", **head}], verify=True)
    assert r.report is not None and r.report.status == "ok" and r.report.head is not None
    weight = next(t for t in r.report.head.tensors if t.name.endswith("score.weight"))
    assert weight.shape == [4, 32] and weight.init == "xavier_uniform"
    assert weight.expected_std == pytest.approx(expected_std("xavier_uniform", 32, 4)) and weight.passed is True
    assert r.report.head.passed is True and r.report.passed is True
    alone = attach_head(AttachHeadSpec(checkpoint=src, output="alone", verify=True, **head), RunContext(data_dir))
    assert alone.report is not None and alone.report.head is not None
    assert r.report.head.model_dump() == alone.report.head.model_dump()


def test_report_with_expand_blocks_and_a_head_checks_only_the_head(data_dir: Path, build) -> None:
    """expand-blocks + attach-head: the inserted blocks are copies (zero residual writers), not new head tensors;
    the report checked them against transformers' normal init (o_proj/down_proj std 0 != 0.02) and failed a correct
    output."""
    src = build("FX-B")  # Llama, 2 layers, untied
    r = run(data_dir, src, [{"op": "expand-blocks", "num_blocks": 1},
                            {"op": "attach-head", "num_labels": 3, "init": "kaiming_normal"}], verify=True)
    report = r.report
    assert report is not None and report.status == "ok", report
    assert report.head is not None
    assert [t.name for t in report.head.tensors] == ["score.weight"]
    assert report.head.tensors[0].init == "kaiming_normal" and report.head.passed
    assert report.hidden_states_passed and report.passed
