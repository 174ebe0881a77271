"""chat_template.render_sample: transformers' apply_chat_template in a forked child, with Jinja's messages, and
bounded in time, memory and output (no test measures time: each case only has to end)."""

from __future__ import annotations

from pathlib import Path

import pytest
from transformers import AutoTokenizer

from adapter_surgery import chat_template
from adapter_surgery.chat_template import render_sample
from adapter_surgery.errors import InvalidSpec

CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
EXPECTED = ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\nHello!<|im_end|>\n"
            "<|im_start|>assistant\nHi! How can I help you today?<|im_end|>\n<|im_start|>user\nWhat is 2 + 2?"
            "<|im_end|>\n<|im_start|>assistant\n")


@pytest.fixture
def tok(data_dir: Path, build):
    return AutoTokenizer.from_pretrained(data_dir / build("FX-B"))


def test_renders_the_sample_as_transformers_does(tok) -> None:
    assert render_sample(tok, CHATML) == EXPECTED
    assert tok.apply_chat_template(list(chat_template.SAMPLES[0]), chat_template=CHATML, tokenize=False,
                                   add_generation_prompt=True) == EXPECTED
    # the tokenizer's special tokens are variables of the template (FX-B: bos <s>, eos </s>)
    assert render_sample(tok, "{{ bos_token }}{% for m in messages %}{{ m.content }}{{ eos_token }}{% endfor %}") == \
        "<s>You are a helpful assistant.</s>Hello!</s>Hi! How can I help you today?</s>What is 2 + 2?</s>"


def test_a_template_without_system_role_renders_the_second_sample(tok) -> None:
    gemma_like = ("{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
                  "{% endif %}{% for m in messages %}[{{ m.role }}] {{ m.content }}\n{% endfor %}")
    assert render_sample(tok, gemma_like) == ("[user] Hello!\n[assistant] Hi! How can I help you today?\n"
                                              "[user] What is 2 + 2?\n")


@pytest.mark.parametrize(("template", "words"), [
    ("{% for m in messages %}{{ m.content }}", ["syntax error on line 1", "endfor"]),
    ("{% for x in %}", ["syntax error on line 1", "Expected an expression"]),
    ("{{ raise_exception('only user messages') }}", ["TemplateError: only user messages"]),
    ("{{ messages[9].content }}", ["UndefinedError", "no element 9"]),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", ["SecurityError"]),
    ("{% if false %}x{% endif %}", ["empty text"]),
])
def test_errors_are_jinjas_messages(tok, template: str, words: list[str]) -> None:
    with pytest.raises(InvalidSpec) as exc:
        render_sample(tok, template)
    assert exc.value.field == "chat_template" and exc.value.fix
    for w in words:
        assert w in exc.value.detail, exc.value.detail


def test_unbounded_templates_are_stopped(tok, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chat_template, "RENDER_SECONDS", 1.0)
    cases = {  # 10^10 iterations; 10^10 iterations of output; 10 GB at once; 100 MB, over the output limit
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}": "longer than 1 s",
        "{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor %}{% endfor %}": "(stopped)",
        "{{ 'x' * 10000000000 }}": "exceeded 256 MiB",
    }
    for template, words in cases.items():
        with pytest.raises(InvalidSpec) as exc:
            render_sample(tok, template)
        assert exc.value.field == "chat_template" and words in exc.value.detail, exc.value.detail
    with pytest.raises(InvalidSpec) as exc:
        render_sample(tok, "{{ 'x' * 70000 }}")
    assert "70000 characters, more than 65536" in exc.value.detail
    assert render_sample(tok, CHATML) == EXPECTED  # the parent is unharmed


def test_a_long_sample_of_astral_characters_is_answered_not_stopped(tok) -> None:
    """65,536 characters at most, whatever they are: JSON's \\uXXXX escapes (12 bytes an emoji) overran what the
    parent reads from the child, which was then killed and the template reported as unbounded."""
    n = chat_template.MAX_RENDERED_CHARS - 10
    assert render_sample(tok, "{{ '\U0001F600' * " + str(n) + " }}") == "\U0001F600" * n
    with pytest.raises(InvalidSpec, match="more than 65536"):
        render_sample(tok, "{{ '\U0001F600' * " + str(chat_template.MAX_RENDERED_CHARS + 1) + " }}")


def test_a_long_error_message_is_cut(tok) -> None:
    with pytest.raises(InvalidSpec) as info:
        render_sample(tok, "{{ raise_exception('\U0001F600' * 300000) }}")
    assert "does not render" in info.value.detail
    assert len(info.value.detail) < 2 * chat_template.MAX_ERROR_CHARS + 200
