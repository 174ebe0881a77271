"""attach-lora's fast path (:mod:`adapter_surgery.ops.attach_lora.direct`) against peft's injection and
``get_peft_model``.

For each case the operation runs twice on the same checkpoint: as it chooses (the fast path, checked to be taken)
and with the fast path refused (peft's injection, the oracle): ``adapter_model.safetensors`` and
``adapter_config.json`` are byte-identical, the results equal; and the tensors equal what ``get_peft_model`` gives
after ``torch.manual_seed(seed)`` on the model loaded as ``from_pretrained(dtype="auto")`` loads it. Requests the
fast path cannot compute are checked to take peft's injection.
"""

from __future__ import annotations

import errno
import importlib
import json
import os
import threading
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from adapter_surgery.ops.attach_lora import AttachLoraSpec, attach_lora, direct
from adapter_surgery.ops.attach_lora import peft_bridge as bridge
from adapter_surgery.ops.common import RunContext
from tests.coverage.families import FAMILIES

warnings.filterwarnings("ignore", module="peft")
attach_lora_pkg = importlib.import_module("adapter_surgery.ops.attach_lora")  # the package (its name is the function's)
BY_NAME = {f.name: f for f in FAMILIES}
FILES = ("adapter_model.safetensors", "adapter_config.json")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Llama, GPT-2 (Conv1D), Qwen2 (q/k/v biases), Gemma 2 (tied embeddings), Falcon (FalconLinear, a subclass of
    nn.Linear), Mixtral (MoE: falls back), each in float32 and bfloat16."""
    root = tmp_path_factory.mktemp("direct")
    for name in ("Llama", "GPT-2", "Qwen2", "Gemma 2", "Falcon", "Mixtral"):
        src = BY_NAME[name].build(root / f"{name}-fp32")
        model = AutoModelForCausalLM.from_pretrained(str(src), dtype=torch.float32)
        model.to(torch.bfloat16).save_pretrained(str(root / f"{name}-bf16"))
    return root


class Taken:
    """Which path each run took: direct.write_adapter and bridge.inject calls counted."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.direct = self.inject = 0
        tensors, inject = direct.write_adapter, bridge.inject

        def counted_tensors(*a, **kw):
            self.direct += 1
            return tensors(*a, **kw)

        def counted_inject(*a, **kw):
            self.inject += 1
            return inject(*a, **kw)

        monkeypatch.setattr(direct, "write_adapter", counted_tensors)
        monkeypatch.setattr(bridge, "inject", counted_inject)


def run(data: Path, src: str, out: str, seed: int, **opts):
    return attach_lora(AttachLoraSpec(checkpoint=src, output=out, seed=seed, **opts), RunContext(data))


def reference(path: Path, seed: int, opts: dict) -> dict[str, torch.Tensor]:
    """``torch.manual_seed(seed); get_peft_model(from_pretrained(path, dtype="auto"), LoraConfig(...))``'s adapter
    (as ``save_pretrained`` gives it: float32)."""
    peft_opts = {k: v for k, v in opts.items() if k not in ("dtype",)}
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype="auto")
    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **peft_opts))
    from peft.utils import get_peft_model_state_dict

    return {k: v.detach().float() for k, v in get_peft_model_state_dict(peft_model).items()}


LLAMA_ALL = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
CASES = [
    ("Llama-fp32", 0, LLAMA_ALL),
    ("Llama-bf16", 7, {**LLAMA_ALL, "init_lora_weights": "gaussian", "dtype": "bfloat16"}),
    ("Llama-bf16", 3, {**LLAMA_ALL, "dtype": "float16"}),
    ("Llama-fp32", 1, {"r": 4, "lora_alpha": 8, "target_modules": r".*\.(q|k|down)_proj", "use_rslora": True,
                       "rank_pattern": {"k_proj": 2}, "alpha_pattern": {"q_proj": 16}}),
    ("Llama-bf16", 2, {"r": 2, "lora_alpha": 3.5, "target_modules": ["q_proj", "o_proj", "up_proj"],
                       "layers_to_transform": [1], "exclude_modules": ["o_proj"]}),
    ("GPT-2-fp32", 3, LLAMA_ALL),
    ("GPT-2-bf16", 4, {"r": 4, "lora_alpha": 16, "target_modules": ["c_attn", "c_fc"],
                       "init_lora_weights": "gaussian"}),
    ("Qwen2-fp32", 0, {**LLAMA_ALL, "dtype": "bfloat16"}),
    ("Qwen2-bf16", 5, {"r": 8, "lora_alpha": 16, "target_modules": ["q_proj", "k_proj", "v_proj"],
                       "lora_dropout": 0.1}),
    ("Gemma 2-fp32", 6, {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj", "v_proj"]}),
    ("Gemma 2-bf16", 0, LLAMA_ALL),
    ("Falcon-bf16", 8, LLAMA_ALL),
]


@pytest.mark.parametrize(("src", "seed", "opts"), CASES, ids=[f"{s}-{i}" for i, (s, _, _) in enumerate(CASES)])
def test_fast_path_equals_peft_injection_and_get_peft_model(data: Path, monkeypatch: pytest.MonkeyPatch, src: str,
                                                            seed: int, opts: dict) -> None:
    taken = Taken(monkeypatch)
    fast = run(data, src, f"fast-{src}-{seed}", seed, **opts)
    assert (taken.direct, taken.inject) == (1, 0), "the fast path was not taken"
    monkeypatch.setattr(attach_lora_pkg, "fast_path_refusal", lambda *a: "forced by the test")
    slow = run(data, src, f"slow-{src}-{seed}", seed, **opts)
    assert (taken.direct, taken.inject) == (1, 1), "peft's injection was not taken"
    for name in FILES:
        assert (data / fast.output / name).read_bytes() == (data / slow.output / name).read_bytes(), name
    assert fast.model_dump(exclude={"output", "seconds", "adapter_files"}) == \
        slow.model_dump(exclude={"output", "seconds", "adapter_files"})
    assert [f.sha256 for f in fast.adapter_files] == [f.sha256 for f in slow.adapter_files]

    mine = load_file(str(data / fast.output / FILES[0]))
    ref = reference(data / src, seed, opts)
    assert sorted(mine) == sorted(ref)
    dtype = getattr(torch, opts.get("dtype", "float32"))
    for k, v in ref.items():
        assert mine[k].dtype == dtype and torch.equal(mine[k], v.to(dtype)), k
        if ".lora_A." in k:
            assert mine[k].abs().max() > 0, k  # a drawn A, not zeros
    config = json.loads((data / fast.output / FILES[1]).read_text())
    assert config["base_model_name_or_path"] == src and config["init_lora_weights"] == \
        opts.get("init_lora_weights", True)


FALLBACKS = [
    ("Mixtral-fp32", {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}, "parameter targets"),
    ("Llama-fp32", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "use_dora": True}, "use_dora"),
    ("Llama-fp32", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "init_lora_weights": "orthogonal"},
     "init orthogonal"),
    ("Llama-bf16", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "modules_to_save": ["lm_head"]},
     "modules_to_save"),
    ("Llama-fp32", {"r": 4, "lora_alpha": 8, "target_modules": ["q_proj"], "trainable_token_indices": [3]},
     "trainable_token_indices"),
    ("GPT-2-fp32", {"r": 4, "lora_alpha": 8, "target_modules": ["c_attn"], "bias": "lora_only"}, "bias lora_only"),
]


class _OtherLinear(torch.nn.Linear):
    """A Linear subclass from another library (as a quantized Linear would be)."""


def test_other_libraries_linear_subclasses_are_not_plain() -> None:
    from transformers.models.falcon.modeling_falcon import FalconLinear
    from transformers.pytorch_utils import Conv1D

    assert direct.plain_module(torch.nn.Linear(2, 3)) and direct.plain_module(Conv1D(3, 2))
    assert direct.plain_module(FalconLinear(2, 3))
    assert not direct.plain_module(_OtherLinear(2, 3)) and not direct.plain_module(torch.nn.Embedding(4, 2))


@pytest.mark.parametrize(("src", "opts", "why"), FALLBACKS, ids=[w for _, _, w in FALLBACKS])
def test_other_requests_take_peft_injection(data: Path, monkeypatch: pytest.MonkeyPatch, src: str, opts: dict,
                                            why: str) -> None:
    taken = Taken(monkeypatch)
    reasons: list[str | None] = []
    refusal = attach_lora_pkg.fast_path_refusal

    def recorded(*a):
        reasons.append(refusal(*a))
        return reasons[-1]

    monkeypatch.setattr(attach_lora_pkg, "fast_path_refusal", recorded)
    run(data, src, f"fallback-{why}", 0, **opts)
    assert reasons == [why] and (taken.direct, taken.inject) == (0, 1)


@pytest.mark.parametrize("words", [0, 1, 2, 7, 64, 1001])
def test_discard_advances_the_generator_as_float32_uniform_draws(words: int) -> None:
    """:func:`direct.discard` leaves the global generator where ``words`` float32 ``uniform_`` draws leave it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(123)
        torch.empty(words).uniform_(-0.3, 0.3)
        expected = (torch.empty(100).uniform_(-1, 1), torch.randn(40))
        torch.manual_seed(123)
        direct.discard(words, torch.empty(words // 2 + 1, dtype=torch.int64))
        got = (torch.empty(100).uniform_(-1, 1), torch.randn(40))
    assert all(torch.equal(a, b) for a, b in zip(expected, got, strict=True))


def test_peft_refusing_the_plan_is_a_422_on_the_fast_path(data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ValueError/TypeError from peft while it plans the targets is a 422 naming target_modules, as in the
    injection path, with nothing written."""
    from adapter_surgery.errors import InvalidSpec

    def refusing(model, config):
        raise ValueError("Target modules {'nope'} not found in the base model.")

    monkeypatch.setattr(bridge, "plan_layers", refusing)
    with pytest.raises(InvalidSpec) as caught:
        run(data, "Llama-fp32", "refused", 0, r=4, lora_alpha=8, target_modules="all-linear")
    assert caught.value.field == "target_modules"
    assert "peft could not attach this adapter" in str(caught.value) and "nope" in str(caught.value)
    assert not (data / "refused").exists()


@pytest.mark.parametrize("failure", ["full disk", "cancel"])
def test_a_failure_while_the_fast_path_writes_leaves_nothing(data: Path, monkeypatch: pytest.MonkeyPatch,
                                                             failure: str) -> None:
    """ENOSPC from a lora_A write on the worker thread, or a cancel between draws: the error reaches the caller,
    the worker thread has ended, no output (or temporary) is left, and the next request's RNG stream is its own
    (its files equal a run that never saw the failure)."""
    from adapter_surgery.errors import Cancelled

    before = {p.name for p in data.iterdir()}
    threads = set(threading.enumerate())
    opts = {"r": 4, "lora_alpha": 8, "target_modules": "all-linear"}
    taken = Taken(monkeypatch)
    polls: list[int] = []
    if failure == "full disk":
        real = os.pwrite

        def pwrite(fd: int, view, at: int) -> int:
            if at > 0:  # a tensor's bytes (the header is written at 0)
                raise OSError(errno.ENOSPC, "No space left on device")
            return real(fd, view, at)

        monkeypatch.setattr(os, "pwrite", pwrite)
        ctx, expected = RunContext(data), OSError
    else:
        ctx = RunContext(data, should_cancel=lambda: polls.append(1) or len(polls) > 3)
        expected = Cancelled
    with pytest.raises(expected):
        attach_lora(AttachLoraSpec(checkpoint="Llama-fp32", output="failed", seed=0, **opts), ctx)
    assert taken.direct == 1 and {p.name for p in data.iterdir()} == before
    assert set(threading.enumerate()) <= threads
    monkeypatch.undo()
    again = run(data, "Llama-fp32", f"after-{failure}", 0, **opts)
    fresh = run(data, "Llama-fp32", f"fresh-{failure}", 0, **opts)
    for name in FILES:
        assert (data / again.output / name).read_bytes() == (data / fresh.output / name).read_bytes(), name
