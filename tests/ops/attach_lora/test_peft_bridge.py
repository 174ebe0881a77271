"""The peft internals that :mod:`adapter_surgery.ops.attach_lora.peft_bridge` relies on, each checked on a tiny model.

One check per entry of ``peft_bridge.INTERNALS`` (a test fails when an entry has no check): each asserts that the
private name or signature still exists and still behaves as the bridge expects, and fails naming the internal, the
installed peft version and what it is used for, so that a peft upgrade cannot silently change the adapters the
service writes. The pin in ``pyproject.toml`` is checked against the installed peft too.
"""

from __future__ import annotations

import copy
import inspect
import json
import re
import tomllib
import warnings
from collections.abc import Callable
from pathlib import Path

import peft
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.utils import get_peft_model_state_dict
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from adapter_surgery.ops.attach_lora import peft_bridge as bridge

ROOT = Path(__file__).resolve().parents[3]
TARGETS = ["model.layers.0.self_attn.q_proj", "model.layers.0.self_attn.v_proj",
           "model.layers.1.self_attn.q_proj", "model.layers.1.self_attn.v_proj"]


def changed(internal: str, detail: str) -> None:
    """Fail loudly: which peft internal changed, what the bridge uses it for, what to do."""
    pytest.fail(f"peft {peft.__version__} changed {internal} (the bridge uses it for: "
                f"{bridge.INTERNALS.get(internal, '?')}): {detail}. Adapt adapter_surgery/ops/attach_lora/"
                "peft_bridge.py to the new peft and check the attach-lora tests before raising the pin in "
                "pyproject.toml.", pytrace=False)


def expect(internal: str, ok: bool, detail: str) -> None:
    if not ok:
        changed(internal, detail)


def attr(internal: str, obj: object, name: str) -> object:
    value = getattr(obj, name, None)
    if value is None:
        changed(internal, f"{getattr(obj, '__name__', obj)!s} has no attribute {name!r}")
    return value


def params(internal: str, fn: Callable, *names: str) -> None:
    got = list(inspect.signature(fn).parameters)
    expect(internal, all(n in got for n in names), f"signature is {got}, the bridge passes {list(names)}")


def tiny(dtype: torch.dtype = torch.float32) -> LlamaForCausalLM:
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=False)
    return LlamaForCausalLM(cfg).to(dtype).eval()


def lora(**kw) -> LoraConfig:
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"], **kw})


def inject(model: nn.Module, config: LoraConfig, seen: list[tuple[str, nn.Module]] | None = None) -> nn.Module:
    def hook(key: str, base: nn.Module, cfg: object, create: Callable[[object], nn.Module]) -> None:
        layer = create(cfg)
        if seen is not None:
            seen.append((key, layer))

    torch.manual_seed(0)
    return bridge.inject(model, config, hook)


# -- the checks, one per entry of INTERNALS ---------------------------------------------------------------------
def check_create_and_replace() -> None:
    name = "peft.tuners.lora.LoraModel._create_and_replace"
    from peft.tuners.lora import LoraModel

    params(name, attr(name, LoraModel, "_create_and_replace"), "lora_config", "adapter_name", "target", "target_name",
           "parent", "current_key")
    seen: list[tuple[str, nn.Module]] = []
    model = tiny()
    inject(model, lora(), seen)
    expect(name, [k for k, _ in seen] == TARGETS, f"the hook saw {[k for k, _ in seen]}, not {TARGETS}")
    expect(name, all(model.get_submodule(k) is layer for k, layer in seen),
           "create() did not return the layer that replaced the target in its parent")
    base = tiny()
    torch.manual_seed(0)  # as inject() does: the hook must not change what peft draws
    reference = get_peft_model(base, lora())
    ours = bridge.adapter_state_dict(inject(tiny(), lora()))
    theirs = get_peft_model_state_dict(reference)
    expect(name, ours.keys() == theirs.keys(), f"keys {sorted(ours)} != get_peft_model's {sorted(theirs)}")
    bad = [k for k in ours if not torch.equal(ours[k], theirs[k])]
    expect(name, not bad, f"tensors differ from get_peft_model's with the same seed: {bad}")


def check_cast_adapter_dtype() -> None:
    name = "peft.tuners.tuners_utils.BaseTuner._cast_adapter_dtype"
    from peft.tuners.tuners_utils import BaseTuner

    params(name, attr(name, BaseTuner, "_cast_adapter_dtype"), "adapter_name", "autocast_adapter_dtype")
    tuner = inject(tiny(torch.bfloat16), lora())
    dtypes = {p.dtype for n, p in tuner.model.named_parameters() if ".lora_" in n}
    expect(name, dtypes == {torch.float32}, f"adapters on a bf16 model are {dtypes}, not float32")


def check_all_linear() -> None:
    name = "peft.tuners.tuners_utils._maybe_include_all_linear_layers"
    from peft.tuners import tuners_utils

    params(name, attr(name, tuners_utils, "_maybe_include_all_linear_layers"), "peft_config", "model")
    model = tiny()
    cfg = bridge.with_all_linear(lora(target_modules="all-linear"), model)
    want = {k for k, m in model.named_modules() if isinstance(m, nn.Linear) and k != "lm_head"}
    expect(name, len(want) == 14 and set(cfg.target_modules) == want,
           f"'all-linear' became {sorted(cfg.target_modules)}, not every Linear but lm_head {sorted(want)}")


def check_target_module_exists() -> None:
    name = "peft.tuners.tuners_utils.check_target_module_exists"
    from peft.tuners import tuners_utils

    params(name, attr(name, tuners_utils, "check_target_module_exists"), "config", "key")
    cfg = lora(layers_to_transform=[1], layers_pattern="layers")
    found = [k for k, _ in tiny().named_modules() if k and bridge.target_module_exists(cfg, k)]
    expect(name, found == TARGETS[2:], f"matched {found}, not {TARGETS[2:]}")
    try:
        bridge.target_module_exists(lora(target_modules="(unclosed"), "model.layers.0.self_attn.q_proj")
    except re.error:
        return
    changed(name, "an invalid regex no longer raises re.error (the request check turns it into a 422)")


def check_pattern_key() -> None:
    name = "peft.utils.other.get_pattern_key"
    from peft.utils import other

    params(name, attr(name, other, "get_pattern_key"), "pattern_keys", "key_to_match")
    key = "model.layers.1.self_attn.v_proj"
    got = (bridge.pattern_key(["q_proj", "v_proj"], key), bridge.pattern_key(["q_proj"], key),
           bridge.pattern_key([r".*\.1\.self_attn\.v_proj"], key))
    expect(name, got == ("v_proj", key, r".*\.1\.self_attn\.v_proj"), f"returned {got}")


def check_convert_config() -> None:
    name = "peft.utils.transformers_weight_conversion.convert_peft_config_for_transformers"
    import peft.utils.transformers_weight_conversion as twc

    params(name, attr(name, twc, "convert_peft_config_for_transformers"), "peft_config", "model", "conversions")
    cfg = lora()
    out = bridge.converted_for_transformers(cfg, tiny())
    expect(name, out is not cfg and set(out.target_modules) == {"q_proj", "v_proj"},
           f"a Llama config's target_modules became {out.target_modules}")


def check_conversion_mapping() -> None:
    name = "peft.utils.transformers_weight_conversion.get_model_conversion_mapping"
    import peft.utils.transformers_weight_conversion as twc

    params(name, attr(name, twc, "get_model_conversion_mapping"), "model")
    mapping = twc.get_model_conversion_mapping(tiny())
    expect(name, isinstance(mapping, list), f"returned {type(mapping).__name__}, not a list of conversions")


def check_default_targets() -> None:
    name = "peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING"
    from peft.utils import constants

    attr(name, constants, "TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING")
    got = (bridge.default_target_modules("llama"), bridge.default_target_modules("gpt2"),
           bridge.default_target_modules("no-such-model"))
    expect(name, got == (["q_proj", "v_proj"], ["c_attn"], None), f"defaults are {got}")


def check_dora_update_layer() -> None:
    name = "peft.tuners.lora.dora.DoraLinearLayer.update_layer"
    from peft.tuners.lora import dora

    params(name, attr(name, attr(name, dora, "DoraLinearLayer"), "update_layer"), "base_layer", "lora_A", "lora_B",
           "scaling")
    seen: list[tuple[str, nn.Module]] = []
    inject(tiny(), lora(use_dora=True, init_lora_weights="gaussian"), seen)
    layer = seen[0][1]
    f = bridge.factors(layer)
    with torch.no_grad():
        f.lora_B.normal_()  # B != 0, so the norm depends on A and B too
        bridge.update_magnitude(layer)
        w = bridge.base_layer(layer).weight + f.scaling * f.lora_B @ f.lora_A
    m = layer.lora_magnitude_vector[bridge.ADAPTER_NAME].weight
    expect(name, torch.allclose(m, w.norm(dim=1), rtol=1e-6, atol=0), "the magnitude is not ||W + s B A||_row")


def check_layer_attributes() -> None:
    name = "LoraLayer.r/lora_alpha/scaling/lora_A/lora_B/lora_magnitude_vector[name]"
    seen: list[tuple[str, nn.Module]] = []
    inject(tiny(), lora(rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6}, use_rslora=True), seen)
    try:
        got = [(bridge.is_lora_layer(layer), bridge.factors(layer)) for _, layer in seen]
        magnitudes = [len(layer.lora_magnitude_vector) for _, layer in seen]
    except (AttributeError, KeyError, TypeError) as exc:
        changed(name, f"{type(exc).__name__}: {exc}")
    q, v = got[0][1], got[1][1]
    expect(name, all(ok for ok, _ in got), "is_lora_layer() is false on a LoRA layer")
    expect(name, (q.r, q.lora_alpha, q.scaling) == (4, 8.0, 8 / 2) and (v.r, v.lora_alpha) == (2, 6.0)
           and v.scaling == pytest.approx(6 / 2**0.5), f"r/alpha/scaling are {q} / {v}")
    expect(name, tuple(q.lora_A.shape) == (4, 32) and tuple(q.lora_B.shape) == (32, 4),
           f"lora_A/lora_B shapes {tuple(q.lora_A.shape)} / {tuple(q.lora_B.shape)}")
    expect(name, magnitudes == [0] * len(seen), "lora_magnitude_vector is not an empty container without DoRA")


def check_token_indices() -> None:
    name = "TrainableTokensLayer.token_indices[name]"
    model = tiny()
    inject(model, lora(trainable_token_indices=[3, 7]))
    try:
        got = bridge.token_indices(model, "model.embed_tokens")
    except (AttributeError, KeyError) as exc:
        changed(name, f"{type(exc).__name__}: {exc}")
    expect(name, got == [3, 7], f"token indices {got}")


def check_state_dict_shell() -> None:
    name = "get_peft_model_state_dict(shell)"
    params(name, get_peft_model_state_dict, "model", "adapter_name", "save_embedding_layers")
    state = bridge.adapter_state_dict(inject(tiny(), lora()))
    want = {f"base_model.model.{t}.lora_{ab}.weight" for t in TARGETS for ab in "AB"}
    expect(name, set(state) == want, f"keys {sorted(state)}, not {sorted(want)}")


def check_saved_keys() -> None:
    name = "saved key segments"
    base = tiny()
    names = set(base.state_dict())
    state = bridge.adapter_state_dict(inject(base, lora(modules_to_save=["lm_head"], bias="all",
                                                        trainable_token_indices=[3, 7])))
    copies = {k: bridge.saved_key(k) for k in state if not bridge.is_adapter_tensor(k)}
    expect(name, any(k.endswith(bridge.TOKEN_ROWS_SUFFIX) for k in state),
           f"the trainable token rows are saved as {[k for k in state if 'token' in k]}")
    unknown = {k: s.name for k, s in copies.items() if s.name not in names}
    expect(name, not unknown, f"saved keys that map to no base parameter: {unknown}")
    expect(name, "lm_head.weight" in {s.name for s in copies.values()}, f"no lm_head copy among {sorted(copies)}")
    token_key = next(k for k in state if k.endswith(bridge.TOKEN_ROWS_SUFFIX))
    token = bridge.saved_key(token_key)
    expect(name, token.token_rows and token.name == "model.embed_tokens.weight",
           f"{token_key} maps to {token}")


def check_save_config() -> None:
    name = "PeftConfig.save_pretrained(auto_mapping_dict=...)"
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        mapping = {"base_model_class": "BertModel", "parent_library": "transformers.models.bert.modeling_bert"}
        bridge.save_config(copy.deepcopy(lora()), Path(tmp), mapping)
        saved = json.loads((Path(tmp) / "adapter_config.json").read_text())
    expect(name, saved.get("auto_mapping") == mapping, f"adapter_config.json has auto_mapping "
                                                       f"{saved.get('auto_mapping')!r}")


def tiny_moe() -> nn.Module:
    from transformers import MixtralConfig, MixtralForCausalLM

    torch.manual_seed(0)
    cfg = MixtralConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)
    return MixtralForCausalLM(cfg).eval()


def check_inject_parameters() -> None:
    name = "BaseTuner._inject_parameters matching"
    model = tiny_moe()
    cfg = bridge.with_all_linear(bridge.converted_for_transformers(lora(target_modules="all-linear"), model), model)
    ours = sorted(k for k, _, _ in bridge.matched_parameters(cfg, model))
    seen: list[tuple[str, nn.Module]] = []
    inject(model, cfg, seen)
    theirs = sorted(k for k, layer in seen if bridge.wrapped_parameter("m", layer) is not None)
    expect(name, ours == theirs and ours, f"target_parameters {sorted(cfg.target_parameters or [])} matched {ours} "
                                          f"here, peft wrapped {theirs}")


def check_param_wrapper() -> None:
    name = "ParamWrapper.parameter_name / is_transposed"
    model = tiny_moe()
    cfg = bridge.with_all_linear(bridge.converted_for_transformers(lora(target_modules="all-linear"), model), model)
    experts = model.model.layers[0].mlp.experts
    want = bridge.parameter_axes(experts, experts.down_proj.shape)
    inject(model, cfg)
    found = {bridge.wrapped_parameter(n, m): m for n, m in model.named_modules()}
    layer = found.get("model.layers.0.mlp.experts.down_proj")
    expect(name, layer is not None, f"no ParamWrapper names down_proj: {sorted(k for k in found if k)}")
    got = (layer.num_experts, layer.in_features, layer.out_features)
    expect(name, got == want, f"(experts, in, out) is {got}, the bridge computes {want}")


def check_tied_token_bias() -> None:
    name = "TrainableTokensLayer.tied_adapter on a biased Linear"
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=4)).eval()
    with torch.no_grad():
        model.cls.predictions.bias.normal_(0.0, 0.5)
        ids = torch.tensor([[5, 9, 17]])
        want = model(ids).logits
        bias = model.cls.predictions.bias.clone()
        peft_model = get_peft_model(model, lora(target_modules=["query"], trainable_token_indices=[3]))
        got = peft_model(ids).logits
    found = bridge.token_layers_dropping_bias(peft_model.base_model)
    expect(name, found == ["cls.predictions.decoder"], f"the tied biased decoder found as {found}")
    expect(name, torch.allclose(got, want - bias, atol=1e-5),
           "the tied token adapter no longer drops the decoder's bias (max |logits - (base - bias)| "
           f"{(got - (want - bias)).abs().max().item():.3g}): attach-lora's refusal of trainable_token_indices on "
           "tied biased decoders can go, and token_layers_dropping_bias with it")


def check_plan_layers() -> None:
    name = "LoraModel(...) with a _create_and_replace that builds nothing"
    cfg = lora(rank_pattern={"v_proj": 2}, alpha_pattern={"q_proj": 3}, use_rslora=True)
    planned = tiny(torch.bfloat16)
    saved, layers = bridge.plan_layers(planned, copy.deepcopy(cfg))
    reference = inject(tiny(torch.bfloat16), copy.deepcopy(cfg))
    expect(name, [x.name for x in layers] == TARGETS, f"planned {[x.name for x in layers]}, not {TARGETS}")
    for layer in layers:
        f = bridge.factors(reference.model.get_submodule(layer.name))
        got = (layer.r, float(layer.lora_alpha), layer.scaling, [layer.r, layer.in_features],
               [layer.out_features, layer.r], layer.base_dtype)
        want = (f.r, f.lora_alpha, f.scaling, list(f.lora_A.shape), list(f.lora_B.shape), torch.bfloat16)
        expect(name, got == want, f"{layer.name} planned as {got}, peft builds {want}")
    mine, theirs = saved.to_dict(), reference.peft_config[bridge.ADAPTER_NAME].to_dict()
    expect(name, mine == theirs, f"the config after planning {mine} differs from peft's after injection {theirs}")
    expect(name, not any(bridge.is_lora_layer(m) for m in planned.modules()), "planning built LoRA layers")


def check_fan_in_fan_out() -> None:
    name = "dispatch_default's fan_in_fan_out rule"
    from transformers import GPT2Config, GPT2LMHeadModel

    def gpt2() -> GPT2LMHeadModel:
        torch.manual_seed(0)
        return GPT2LMHeadModel(GPT2Config(vocab_size=50, n_embd=16, n_layer=1, n_head=2, n_positions=16))

    for model_fn, cfg in ((gpt2, lora(target_modules=["c_attn"])),
                          (tiny, lora(fan_in_fan_out=True))):
        with warnings.catch_warnings(record=True) as mine:
            warnings.simplefilter("always")
            saved, _ = bridge.plan_layers(model_fn(), copy.deepcopy(cfg))
        with warnings.catch_warnings(record=True) as theirs:
            warnings.simplefilter("always")
            reference = inject(model_fn(), copy.deepcopy(cfg))
        want = reference.peft_config[bridge.ADAPTER_NAME].fan_in_fan_out
        expect(name, saved.fan_in_fan_out == want, f"fan_in_fan_out planned {saved.fan_in_fan_out}, peft sets {want}")
        texts = [sorted({str(w.message) for w in ws if "fan_in_fan_out" in str(w.message)}) for ws in (mine, theirs)]
        expect(name, texts[0] == texts[1] and texts[0], f"warnings {texts[0]} differ from peft's {texts[1]}")


def check_update_layer_draws() -> None:
    name = "LoraLayer.update_layer's draws"
    from adapter_surgery.ops.attach_lora import direct

    for dtype, init in ((torch.float32, True), (torch.bfloat16, "gaussian"), (torch.float16, True)):
        cfg = lora(init_lora_weights=init, rank_pattern={"v_proj": 2})
        _, layers = bridge.plan_layers(tiny(dtype), copy.deepcopy(cfg))
        torch.manual_seed(5)
        mine = dict(direct.drawn(layers, "true" if init is True else init, torch.float32))
        mine |= {bridge.lora_keys(layer.name)[1]: torch.zeros(layer.out_features, layer.r) for layer in layers}
        after_mine = torch.rand(8)
        model = tiny(dtype)
        torch.manual_seed(5)
        theirs = get_peft_model_state_dict(get_peft_model(model, copy.deepcopy(cfg)))
        after_theirs = torch.rand(8)
        bad = [k for k in theirs if k not in mine or not torch.equal(mine[k], theirs[k])]
        expect(name, not bad and mine.keys() == theirs.keys(), f"{dtype} {init}: tensors differ from "
                                                              f"get_peft_model's: {bad or sorted(mine)}")
        expect(name, torch.equal(after_mine, after_theirs), f"{dtype} {init}: the RNG stream differs afterwards")


CHECKS: dict[str, Callable[[], None]] = {
    "LoraModel(...) with a _create_and_replace that builds nothing": check_plan_layers,
    "dispatch_default's fan_in_fan_out rule": check_fan_in_fan_out,
    "LoraLayer.update_layer's draws": check_update_layer_draws,
    "BaseTuner._inject_parameters matching": check_inject_parameters,
    "ParamWrapper.parameter_name / is_transposed": check_param_wrapper,
    "TrainableTokensLayer.tied_adapter on a biased Linear": check_tied_token_bias,
    "peft.tuners.lora.LoraModel._create_and_replace": check_create_and_replace,
    "peft.tuners.tuners_utils.BaseTuner._cast_adapter_dtype": check_cast_adapter_dtype,
    "peft.tuners.tuners_utils._maybe_include_all_linear_layers": check_all_linear,
    "peft.tuners.tuners_utils.check_target_module_exists": check_target_module_exists,
    "peft.utils.other.get_pattern_key": check_pattern_key,
    "peft.utils.transformers_weight_conversion.convert_peft_config_for_transformers": check_convert_config,
    "peft.utils.transformers_weight_conversion.get_model_conversion_mapping": check_conversion_mapping,
    "peft.utils.constants.TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING": check_default_targets,
    "peft.tuners.lora.dora.DoraLinearLayer.update_layer": check_dora_update_layer,
    "LoraLayer.r/lora_alpha/scaling/lora_A/lora_B/lora_magnitude_vector[name]": check_layer_attributes,
    "TrainableTokensLayer.token_indices[name]": check_token_indices,
    "get_peft_model_state_dict(shell)": check_state_dict_shell,
    "saved key segments": check_saved_keys,
    "PeftConfig.save_pretrained(auto_mapping_dict=...)": check_save_config,
}


def test_every_internal_has_a_check() -> None:
    assert set(CHECKS) == set(bridge.INTERNALS), (
        f"peft_bridge.INTERNALS and this test disagree: unchecked {sorted(set(bridge.INTERNALS) - set(CHECKS))}, "
        f"stale {sorted(set(CHECKS) - set(bridge.INTERNALS))}")


@pytest.mark.parametrize("internal", sorted(CHECKS))
def test_peft_internal_unchanged(internal: str) -> None:
    CHECKS[internal]()


def test_installed_peft_within_the_pin() -> None:
    """The bridge is checked against the installed peft only: it must lie within pyproject.toml's pin, which has
    an upper bound (a newer minor may change the internals: raise the bound only with these checks green)."""
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pin = next(d for d in deps if re.match(r"peft\b", d))
    upper = re.search(r"<\s*([\d.]+)", pin)
    assert upper, f"pyproject.toml pins {pin!r} with no upper bound; the peft bridge needs one"
    installed = tuple(int(x) for x in re.findall(r"\d+", peft.__version__)[:2])
    bound = tuple(int(x) for x in upper.group(1).split(".")[:2])
    assert installed < bound, f"peft {peft.__version__} is installed, above the pin {pin!r}"
