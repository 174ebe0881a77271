"""extend-vocab's chat_template (and surgery's extend-vocab step): checked by rendering, saved as transformers 5
saves it, loaded back equal; the new special tokens render and tokenize as their ids."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from transformers import AutoTokenizer

from adapter_surgery.api.app import create_app
from adapter_surgery.chat_template import MAX_CHAT_TEMPLATE_CHARS
from adapter_surgery.errors import InvalidSpec
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, extend_vocab
from adapter_surgery.ops.surgery import SurgerySpec, surgery
from adapter_surgery.settings import Settings
from tests.conftest import tree_digest

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
SAMPLE = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
          "<|im_start|>assistant\nHi! How can I help you today?<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?"
          "<|im_end|>\n<|im_start|>assistant\n")
CHAT_TOKENS = [{"content": "<|im_start|>", "special": True}, {"content": "<|im_end|>", "special": True}]


def run(data: Path, checkpoint: str, output: str = "out", **kw):
    return extend_vocab(ExtendVocabSpec(checkpoint=checkpoint, output=output, **kw), RunContext(data))


def test_saved_with_the_tokenizer_and_loaded_back_equal(data_dir: Path, build) -> None:
    src = build("FX-B")
    r = run(data_dir, src, tokens=CHAT_TOKENS, chat_template=CHATML)
    out = data_dir / "out"
    assert [(a.token, a.id) for a in r.added] == [("<|im_start|>", 128), ("<|im_end|>", 129)]
    assert r.chat_template_sample == SAMPLE and not [w for w in r.warnings if "chat_template" in w]
    assert (out / "chat_template.jinja").read_text(encoding="utf-8") == CHATML  # transformers 5's file
    assert "chat_template" not in json.loads((out / "tokenizer_config.json").read_text())
    tok = AutoTokenizer.from_pretrained(out)
    assert tok.chat_template == CHATML
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\nworld<|im_end|>\n"
    ids = tok(text, add_special_tokens=False).input_ids
    assert ids.count(128) == 2 and ids.count(129) == 2  # each new special token is one id, never split
    assert ids[0] == 128 and ids[-1] == 129
    assert tok.convert_ids_to_tokens(ids).count("hello") == 1  # the content is tokenized as text between them


def test_a_template_on_its_own_and_a_warning_when_it_ignores_the_new_tokens(data_dir: Path, build) -> None:
    src = build("FX-B")
    r = run(data_dir, src, chat_template=CHATML)  # no tokens: the template is still saved
    assert r.added == [] and AutoTokenizer.from_pretrained(data_dir / "out").chat_template == CHATML
    assert not [w for w in r.warnings if w.startswith("nothing to add")]
    plain = "{% for m in messages %}{{ m.role }}: {{ m.content }}\n{% endfor %}"
    r = run(data_dir, src, "out2", tokens=CHAT_TOKENS, chat_template=plain)
    assert [w for w in r.warnings if w.startswith("chat_template: ") and "<|im_start|>, <|im_end|>" in w]


@pytest.mark.parametrize(("template", "words"), [
    ("{% for m in messages %}{{ m.content }}", ["syntax error on line 1"]),
    ("{{ raise_exception('bad roles') }}", ["TemplateError: bad roles"]),
    ("{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}", ["(stopped)"]),
])
def test_a_bad_template_is_refused_before_anything_is_written(data_dir: Path, build, template: str,
                                                               words: list[str]) -> None:
    src = build("FX-B")
    before = tree_digest(data_dir / src)
    with pytest.raises(InvalidSpec) as exc:
        run(data_dir, src, tokens=CHAT_TOKENS, chat_template=template)
    assert exc.value.field == "chat_template" and all(w in exc.value.detail for w in words), exc.value.detail
    assert not (data_dir / "out").exists() and tree_digest(data_dir / src) == before


def test_no_tokenizer(data_dir: Path, build) -> None:
    src = build("FX-B")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (data_dir / src / name).unlink()
    with pytest.raises(InvalidSpec) as exc:
        run(data_dir, src, num_new_tokens=2, chat_template=CHATML)
    assert exc.value.field == "chat_template"


def test_over_http_bounded_by_the_schema(data_dir: Path, build) -> None:
    src = build("FX-B")
    client = TestClient(create_app(Settings(data_dir=data_dir)), raise_server_exceptions=False)
    r = client.post("/extend-vocab", json={"checkpoint": src, "output": "out", "tokens": ["<a>"],
                                           "chat_template": "x" * (MAX_CHAT_TEMPLATE_CHARS + 1)})
    assert r.status_code == 422 and r.json()["field"] == "chat_template"
    r = client.post("/extend-vocab", json={"checkpoint": src, "output": "out", "tokens": ["<a>"],
                                           "chat_template": "{{ raise_exception('no') }}"})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
    assert r.json()["field"] == "chat_template" and "TemplateError: no" in r.json()["detail"]
    assert not (data_dir / "out").exists()


def test_surgery_extend_vocab_step(data_dir: Path, build) -> None:
    src = build("FX-B")
    steps = [{"op": "extend-vocab", "tokens": CHAT_TOKENS, "chat_template": CHATML},
             {"op": "attach-lora", "target_modules": ["q_proj"]}]
    r = surgery(SurgerySpec.model_validate({"checkpoint": src, "output": "s", "steps": steps}), RunContext(data_dir))
    assert r.steps[0].result["chat_template_sample"] == SAMPLE
    assert AutoTokenizer.from_pretrained(data_dir / "s").chat_template == CHATML
    steps[0]["chat_template"] = "{% for m in messages %}"
    with pytest.raises(InvalidSpec) as exc:
        surgery(SurgerySpec.model_validate({"checkpoint": src, "output": "s2", "steps": steps}), RunContext(data_dir))
    assert exc.value.field == "steps.0.chat_template" and "syntax error" in exc.value.detail
    assert not (data_dir / "s2").exists()
