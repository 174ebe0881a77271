"""The coverage matrix: every operation on a tiny random model of every family ``transformers`` builds and saves.

A cell passes when the output loads in ``transformers`` / ``peft`` with no missing, unexpected or mismatched keys
and its outputs equal the base's where they must (old-vocabulary logits after extend-vocab and surgery; a LoRA at
init changes nothing: the peft model's logits equal the base's; a new head loads with nothing newly initialized, so
two loads give the same logits; verify's report passes), or when the answer is a 422 that this module accepts as
"not supported" (``ACCEPTED_422``: the reason is part of the README). Anything else fails the cell: a 500 or any
other exception, a load with missing or unexpected keys, different logits, a 422 not accepted here. Cells that fail
today are strict xfails naming the defect (``DEFECTS``), so fixing one turns its xfail into an error to update.

``test_readme_matrix`` renders the answers as the README's table (between the ``coverage-matrix`` markers) and
fails when the README differs; ``ADAPTER_SURGERY_WRITE_DOCS=1`` rewrites it. Each family's model is built once per
module; each cell runs once (cached), whichever test asks first.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file
from transformers import AutoModelForSequenceClassification, AutoModelForTokenClassification, AutoTokenizer

from adapter_surgery.errors import SurgeryError
from adapter_surgery.ops import OPERATIONS
from adapter_surgery.ops.common import RunContext
from tests.coverage.families import FAMILIES, Family

warnings.filterwarnings("ignore", module="peft")

README = Path(__file__).resolve().parents[2] / "README.md"
START, END = "<!-- coverage-matrix:start -->", "<!-- coverage-matrix:end -->"
NEW_TOKENS = ["<tool_a>", {"content": "<tool_b>", "special": True}]

OPS = ["extend-vocab", "attach-lora", "attach-lora all-linear", "attach-head sequence", "attach-head token",
       "surgery", "verify"]

#: 422s that are a correct answer: the family lacks what the operation needs. (family, op) -> why.
_NO_PEFT_DEFAULT = "peft has no default target_modules for this model type: name them (or all-linear)"
_TIED_BIAS = ("trainable_token_indices on a tied MLM decoder with a bias: peft 0.21's TrainableTokensLayer computes "
              "the decoder without its bias, so the adapter at init would change every logit; the 422 names "
              'trainable_token_indices and gives modules_to_save: ["word_embeddings"] (an identity at init)')
ACCEPTED_422: dict[tuple[str, str], str] = {
    ("Qwen3-MoE", "attach-lora"): _NO_PEFT_DEFAULT,
    ("Qwen3-MoE", "surgery"): _NO_PEFT_DEFAULT,
    ("Phi-3", "attach-lora"): _NO_PEFT_DEFAULT,
    ("Phi-3", "surgery"): _NO_PEFT_DEFAULT,
    ("Gemma 3 (text)", "attach-head token"): "transformers has no token classification class for gemma3_text",
    ("BART", "attach-head token"): "transformers has no token classification class for bart",
    **{(fam, op): why for fam in ("LLaVA", "Qwen2-VL") for op, why in [
        ("attach-lora", _NO_PEFT_DEFAULT + "; the 422 gives the text-only regex"),
        ("surgery", _NO_PEFT_DEFAULT + "; the 422 gives the text-only regex"),
        ("attach-head sequence", "transformers has no sequence classification class for this model type"),
        ("attach-head token", "transformers has no token classification class for this model type")]},
    **{(fam, "surgery"): _TIED_BIAS for fam in ("BERT", "RoBERTa", "DeBERTa-v2")},
}

#: Cells that fail today: (family, op) -> the defect. Strict xfails: a fixed cell must leave this list.
DEFECTS: dict[tuple[str, str], str] = {}


@dataclass(frozen=True)
class Outcome:
    kind: str  # "ok" | "422" | "fail"
    text: str = ""


class Cells:
    """Runs each (family, op) cell once and keeps its outcome; the families are built on first use."""

    def __init__(self, root: Path) -> None:
        self.data = root / "data"
        self.data.mkdir()
        self.outcomes: dict[tuple[str, str], Outcome] = {}
        self.built: dict[str, str] = {}
        self.base_logits: dict[str, torch.Tensor] = {}

    def source(self, fam: Family) -> str:
        if fam.name not in self.built:
            name = re.sub(r"[^a-z0-9]+", "-", fam.name.lower()).strip("-")
            fam.build(self.data / name)
            self.built[fam.name] = name
            model = load_clean(fam.cls(), self.data / name)
            self.base_logits[fam.name] = logits(model, fam.inputs())
        return self.built[fam.name]

    def outcome(self, fam: Family, op: str) -> Outcome:
        key = (fam.name, op)
        if key not in self.outcomes:
            self.outcomes[key] = self._run(fam, op)
        return self.outcomes[key]

    def _run(self, fam: Family, op: str) -> Outcome:
        src = self.source(fam)
        out = f"{src}--{op.replace(' ', '-')}"
        try:
            CHECKS[op](self, fam, src, out)
        except SurgeryError as exc:
            if exc.status == 422:
                return Outcome("422", self._clean(exc.detail))
            return Outcome("fail", f"{exc.status} {type(exc).__name__}: {self._clean(exc.detail)}")
        except Exception as exc:  # a cell records every failure
            return Outcome("fail", f"{type(exc).__name__}: {self._clean(str(exc))}")
        return Outcome("ok")

    def _clean(self, text: str) -> str:
        return text.replace(str(self.data) + "/", "").replace(str(self.data), "")

    def call(self, op: str, body: dict[str, Any]) -> Any:
        operation = OPERATIONS[op]
        return operation.run(operation.spec.model_validate(body), RunContext(self.data))


# -- loading and comparing ----------------------------------------------------------------------------------------
def load_clean(cls: Any, path: Path) -> Any:
    """``cls.from_pretrained`` with no missing, unexpected or mismatched keys."""
    model, info = cls.from_pretrained(str(path), output_loading_info=True)
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
    assert not bad, f"{cls.__name__} load: {bad}"
    return model.eval()


@torch.no_grad()
def logits(model: Any, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**inputs).logits.float()


def assert_equal(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert torch.equal(got, want), f"{what}: max |delta| {(got - want).abs().max().item():.3g}"


def assert_old_vocab(new: torch.Tensor, base: torch.Tensor, added: list[int]) -> None:
    """The logits of every base row that no new token took equal the base's (new tokens may take spare rows)."""
    keep = [i for i in range(base.shape[-1]) if i not in set(added)]
    assert new.shape[-1] >= base.shape[-1], f"logits shrank: {new.shape[-1]} < {base.shape[-1]}"
    assert_equal(new[..., keep], base[..., keep], "old-vocabulary logits")


def load_adapter(base_model: Any, adapter_dir: Path) -> PeftModel:
    """``PeftModel.from_pretrained``: every saved key loads (peft's state dict has exactly the saved keys)."""
    model = PeftModel.from_pretrained(base_model, str(adapter_dir)).eval()
    saved = load_file(str(adapter_dir / "adapter_model.safetensors"))
    loaded = get_peft_model_state_dict(model, save_embedding_layers=False)
    assert set(loaded) == set(saved), f"peft load: missing {sorted(set(saved) - set(loaded))}, " \
                                      f"unexpected {sorted(set(loaded) - set(saved))}"
    for k, v in saved.items():
        assert torch.equal(loaded[k].to(v.dtype), v), f"peft load: {k} differs"
    return model


# -- the cells ----------------------------------------------------------------------------------------------------
def check_extend_vocab(cells: Cells, fam: Family, src: str, out: str) -> None:
    result = cells.call("extend-vocab", {"checkpoint": src, "output": out, "tokens": NEW_TOKENS})
    model = load_clean(fam.cls(), cells.data / out)
    assert_old_vocab(logits(model, fam.inputs()), cells.base_logits[fam.name], [a.id for a in result.added])
    tok = AutoTokenizer.from_pretrained(str(cells.data / out))
    ids = {a.token: a.id for a in result.added}
    assert {t: tok.convert_tokens_to_ids(t) for t in ids} == ids, "tokenizer ids != reported ids"


def _check_lora(body: dict[str, Any]) -> Callable[[Cells, Family, str, str], None]:
    def check(cells: Cells, fam: Family, src: str, out: str) -> None:
        cells.call("attach-lora", {"checkpoint": src, "output": out, **body})
        base = load_clean(fam.cls(), cells.data / src)
        peft_model = load_adapter(base, cells.data / out)
        assert_equal(logits(peft_model, fam.inputs()), cells.base_logits[fam.name], "LoRA at init: logits")
    return check


def _check_head(task: str) -> Callable[[Cells, Family, str, str], None]:
    auto = AutoModelForSequenceClassification if task == "sequence_classification" else \
        AutoModelForTokenClassification

    def check(cells: Cells, fam: Family, src: str, out: str) -> None:
        cells.call("attach-head", {"checkpoint": src, "output": out, "task": task, "num_labels": 3})
        inputs = {"input_ids": torch.cat([fam.inputs()["input_ids"], torch.tensor([[fam.config().eos_token_id or 2]])],
                                         dim=1)} if fam.seq2seq else {"input_ids": fam.inputs()["input_ids"]}
        first = logits(load_clean(auto, cells.data / out), inputs)
        second = logits(load_clean(auto, cells.data / out), inputs)
        assert_equal(first, second, "two loads of the head (something newly initialized)")
        assert first.shape[-1] == 3, f"logits shape {tuple(first.shape)}"
    return check


def check_surgery(cells: Cells, fam: Family, src: str, out: str) -> None:
    result = cells.call("surgery", {"checkpoint": src, "output": out, "steps": [
        {"op": "extend-vocab", "tokens": NEW_TOKENS},
        {"op": "attach-lora", "trainable_token_indices": "added"}]})
    patched = load_clean(fam.cls(), cells.data / result.base)
    new = logits(patched, fam.inputs())
    added = [a["id"] for a in result.steps[0].result["added"]]
    assert_old_vocab(new, cells.base_logits[fam.name], added)
    peft_model = load_adapter(patched, cells.data / result.adapter)
    assert_equal(logits(peft_model, fam.inputs()), new, "LoRA at init on the patched base: logits")


def check_verify(cells: Cells, fam: Family, src: str, out: str) -> None:
    patched = f"{src}--extend-vocab"
    if cells.outcome(fam, "extend-vocab").kind != "ok":
        patched = out
        shutil.copytree(cells.data / src, cells.data / out)
    result = cells.call("verify", {"checkpoint": src, "patched": patched})
    report = result.report
    assert report.status == "ok", f"report skipped: {report.reason}"
    assert report.passed is True, f"report did not pass: {json.dumps(report.model_dump(), default=str)[:400]}"


CHECKS: dict[str, Callable[[Cells, Family, str, str], None]] = {
    "extend-vocab": check_extend_vocab,
    "attach-lora": _check_lora({}),
    "attach-lora all-linear": _check_lora({"target_modules": "all-linear"}),
    "attach-head sequence": _check_head("sequence_classification"),
    "attach-head token": _check_head("token_classification"),
    "surgery": check_surgery,
    "verify": check_verify,
}


# -- tests --------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cells(tmp_path_factory: pytest.TempPathFactory) -> Cells:
    return Cells(tmp_path_factory.mktemp("coverage"))


def _params() -> list[Any]:
    params = []
    for fam in FAMILIES:
        for op in OPS:
            defect = DEFECTS.get((fam.name, op))
            marks = [pytest.mark.xfail(strict=True, reason=defect)] if defect else []
            params.append(pytest.param(fam, op, marks=marks, id=f"{fam.name}|{op}"))
    return params


@pytest.mark.parametrize(("fam", "op"), _params())
def test_cell(cells: Cells, fam: Family, op: str) -> None:
    got = cells.outcome(fam, op)
    if got.kind == "422":
        assert (fam.name, op) in ACCEPTED_422, f"422 not accepted as unsupported: {got.text}"
    else:
        assert got.kind == "ok", got.text


def _cell(key: tuple[str, str], got: Outcome, notes: dict[str, str]) -> str:
    """``✓``, or ``422`` / ``✗`` with a footnote mark: the reason is listed once below the table."""
    if key in DEFECTS:
        kind, reason = "✗", DEFECTS[key]
    elif got.kind == "ok":
        return "✓"
    elif got.kind == "422":
        kind, reason = "422", ACCEPTED_422.get(key, got.text)
    else:
        kind, reason = "✗", got.text
    mark = notes.setdefault(reason, f"{'abcdefghijklmnopqrstuvwxyz'[len(notes)]}")
    return f"{kind} ({mark})"


def render(cells: Cells) -> str:
    notes: dict[str, str] = {}
    lines = ["| family | " + " | ".join(OPS) + " |", "|---" * (len(OPS) + 1) + "|"]
    for fam in FAMILIES:
        row = [_cell((fam.name, op), cells.outcome(fam, op), notes) for op in OPS]
        lines.append(f"| {fam.name}" + (f" ({fam.notes})" if fam.notes else "") + " | " + " | ".join(row) + " |")
    lines.append("")
    lines += [f"- ({mark}) {reason.replace(chr(10), ' ')}" for reason, mark in notes.items()]
    return "\n".join(lines)


def test_readme_matrix(cells: Cells) -> None:
    table = render(cells)
    text = README.read_text()
    assert START in text and END in text, f"README lacks the {START} / {END} markers"
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    new = f"{head}{START}\n{table}\n{END}{tail}"
    if os.environ.get("ADAPTER_SURGERY_WRITE_DOCS"):
        README.write_text(new)
    assert README.read_text() == new, \
        "README's coverage matrix is stale: run ADAPTER_SURGERY_WRITE_DOCS=1 pytest tests/coverage/test_matrix.py"
