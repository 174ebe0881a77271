"""attach-lora on MoE models as transformers 5 builds them (fused 3-D experts, routers that are not nn.Linear).

Each case against peft's own ``get_peft_model`` on the loaded model with the same seed: the same adapter keys and
tensors; the adapter loads in peft with every key and, at init, changes no logit. ``exclude_modules`` leaves the
routers out; inits peft's ``lora.ParamWrapper`` cannot run are refused before anything is written.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file

from adapter_surgery.errors import InvalidSpec
from adapter_surgery.ops.attach_lora import AttachLoraSpec, attach_lora
from adapter_surgery.ops.common import RunContext
from tests.coverage.families import FAMILIES, IDS
from tests.coverage.test_matrix import load_adapter, load_clean

warnings.filterwarnings("ignore", module="peft")
MOE = {f.name: f for f in FAMILIES if f.name in ("Mixtral", "Qwen3-MoE")}
ROUTER = ".mlp.gate."


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("moe")
    for name, fam in MOE.items():
        fam.build(root / name)
    return root


def run(data: Path, src: str, out: str, **kw) -> object:
    return attach_lora(AttachLoraSpec(checkpoint=src, output=out, seed=0, **kw), RunContext(data))


def peft_own(data: Path, src: str, dest: Path, **opts) -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(0)
    model = load_clean(MOE[src].cls(), data / src)
    get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **opts)).save_pretrained(str(dest))
    return load_file(str(dest / "adapter_model.safetensors")), json.loads((dest / "adapter_config.json").read_text())


def identity_in_peft(data: Path, src: str, out: str) -> None:
    base = load_clean(MOE[src].cls(), data / src)
    with torch.no_grad():
        want = base(IDS).logits
        got = load_adapter(base, data / out)(IDS).logits  # loads every saved key, nothing missing
    assert torch.equal(got, want)


@pytest.mark.parametrize("src", sorted(MOE))
def test_all_linear_equals_peft(data: Path, tmp_path: Path, src: str) -> None:
    result = run(data, src, f"{src}-all", target_modules="all-linear")
    ours = load_file(str(data / f"{src}-all" / "adapter_model.safetensors"))
    theirs, cfg = peft_own(data, src, tmp_path / "peft", target_modules="all-linear")
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert torch.equal(ours[k], v), k
    saved = json.loads((data / f"{src}-all" / "adapter_config.json").read_text())
    for field in ("target_modules", "target_parameters", "rank_pattern", "alpha_pattern"):
        assert sorted(saved[field]) == sorted(cfg[field]), field
    kinds = {t.name: (t.kind, t.experts, t.r) for t in result.target_modules}
    assert kinds["model.layers.0.mlp.experts.gate_up_proj"] == ("parameter", 4, 16)  # fused gate+up: 2r
    assert kinds["model.layers.0.mlp.experts.down_proj"] == ("parameter", 4, 8)
    assert kinds["model.layers.1.mlp.gate.weight"] == ("parameter", 1, 8)
    assert any("mlp.gate.weight" in w and "exclude_modules" in w for w in result.warnings)  # r 8 > 4 experts
    identity_in_peft(data, src, f"{src}-all")


@pytest.mark.parametrize("src", sorted(MOE))
def test_exclude_modules_leaves_the_routers_out(data: Path, tmp_path: Path, src: str) -> None:
    run(data, src, f"{src}-norouter", target_modules="all-linear", exclude_modules=["gate"])
    ours = load_file(str(data / f"{src}-norouter" / "adapter_model.safetensors"))
    theirs, _ = peft_own(data, src, tmp_path / "peft", target_modules="all-linear")
    assert sorted(ours) == sorted(k for k in theirs if ROUTER not in k)
    assert any(".mlp.experts." in k for k in ours)
    saved = json.loads((data / f"{src}-norouter" / "adapter_config.json").read_text())
    assert not any("gate.weight" in p for p in saved["target_parameters"])
    identity_in_peft(data, src, f"{src}-norouter")


def test_mixtral_default_targets(data: Path, tmp_path: Path) -> None:
    """peft's default for mixtral (q_proj, v_proj): peft 0.21's own get_peft_model fails on it (its v5 conversion
    empties target_modules first); the service attaches the documented default."""
    run(data, "Mixtral", "mixtral-default")
    keys = load_file(str(data / "mixtral-default" / "adapter_model.safetensors"))
    assert {k.split(".")[-3] for k in keys} == {"q_proj", "v_proj"}
    theirs, _ = peft_own(data, "Mixtral", tmp_path / "peft", target_modules=["q_proj", "v_proj"])
    assert sorted(keys) == sorted(theirs)
    identity_in_peft(data, "Mixtral", "mixtral-default")


def test_v4_expert_names_reach_the_fused_experts(data: Path) -> None:
    result = run(data, "Mixtral", "mixtral-w", target_modules=["w1", "w2", "w3"])
    assert {t.name.rsplit(".", 1)[-1] for t in result.target_modules} == {"gate_up_proj", "down_proj"}
    identity_in_peft(data, "Mixtral", "mixtral-w")


@pytest.mark.parametrize(("opts", "field"), [({"init_lora_weights": "pissa"}, "init_lora_weights"),
                                             ({"use_dora": True}, "use_dora"),
                                             ({"lora_dropout": 0.1}, "lora_dropout")])
def test_parameter_targets_refuse_what_paramwrapper_cannot_do(data: Path, opts: dict, field: str) -> None:
    with pytest.raises(InvalidSpec) as info:
        run(data, "Qwen3-MoE", f"refused-{field}", target_modules="all-linear", **opts)
    assert info.value.field == field and "exclude_modules" in info.value.fix
    assert not (data / f"refused-{field}").exists()
    run(data, "Qwen3-MoE", f"ok-{field}", target_modules="all-linear", exclude_modules=["experts", "gate"], **opts)


def test_all_linear_for_vllm_checks_the_scaling_peft_writes(data: Path) -> None:
    """The fused gate_up_proj gets rank 2r and alpha 2·lora_alpha from peft's MoE conversion: the same scaling as
    every other module, so vLLM (one lora_alpha/r for all) can load it; the check reads the converted patterns."""
    result = run(data, "Mixtral", "Mixtral-vllm", target_modules="all-linear", serving="vllm")
    saved = json.loads((data / "Mixtral-vllm" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and saved["alpha_pattern"]
    assert all(saved["alpha_pattern"][k] / saved["rank_pattern"][k] == saved["lora_alpha"] / saved["r"]
               for k in saved["rank_pattern"])
    assert not any(w.startswith("vllm could not load") for w in result.warnings)


@pytest.mark.parametrize("pattern", ["rank_pattern", "alpha_pattern"])
def test_invalid_pattern_regex_on_parameter_targets_is_a_422(data: Path, pattern: str) -> None:
    """The fused experts' ranks are looked up before any module's: an invalid key was a re.error (500) there."""
    with pytest.raises(InvalidSpec) as info:
        run(data, "Mixtral", f"bad-{pattern}", target_modules="all-linear", **{pattern: {"(": 4}})
    assert info.value.field == "rank_pattern" and "regular expression" in info.value.detail
    assert not (data / f"bad-{pattern}").exists()
