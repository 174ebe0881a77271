"""Check a chat template (Jinja text) before it is saved with a tokenizer: render a sample conversation with
``transformers``, bounded in time, memory and output size.

The sample is rendered by ``tokenizer.apply_chat_template(conversation, chat_template=..., tokenize=False,
add_generation_prompt=True)``: ``transformers`` compiles the template in Jinja's ``ImmutableSandboxedEnvironment``
(no attribute access to internals, ``range`` capped at 100000 items) and passes the tokenizer's special tokens
(``bos_token``, ``eos_token``, ...) as variables, as it does at training and serving time. Two conversations are
tried, with a system message and without one (templates such as Gemma's raise on a system role); the template is
accepted when one renders.

The sandbox bounds neither time nor memory: ``{% for i in range(100000) %}{% for j in range(100000) %}x{% endfor
%}{% endfor %}`` loops 10^10 times and ``{{ 'x' * 10**10 }}`` allocates 10 GB. So the rendering runs in a forked
child process (cheap: the tokenizer is already in memory, nothing is re-imported or pickled) with an address-space
limit of :data:`RENDER_MEMORY_BYTES` above the parent's size and a CPU-time limit; the parent waits at most
:data:`RENDER_SECONDS` and kills it. A rendered sample longer than :data:`MAX_RENDERED_CHARS` is refused too.
Failures are ``InvalidSpec`` naming ``chat_template`` with Jinja's own message.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import select
import signal
import time
from typing import Any

from adapter_surgery.errors import InvalidSpec

#: Longest template accepted (characters); real ones (Llama 3.1, Qwen3 with tools) are 5-10 KB.
MAX_CHAT_TEMPLATE_CHARS = 100_000
#: Longest rendered sample accepted (characters).
MAX_RENDERED_CHARS = 65_536
#: Longest error message passed on (characters; a template's raise_exception text is the template's own).
MAX_ERROR_CHARS = 2000
#: Wall-clock limit of one rendering (seconds), and what the child may allocate beyond the parent's size.
RENDER_SECONDS = 5.0
RENDER_MEMORY_BYTES = 256 << 20

SAMPLE_SYSTEM = {"role": "system", "content": "You are a helpful assistant."}
SAMPLE_TURNS = [{"role": "user", "content": "Hello!"},
                {"role": "assistant", "content": "Hi! How can I help you today?"},
                {"role": "user", "content": "What is 2 + 2?"}]
#: The conversations tried, in order: with a system message, then without.
SAMPLES = ([SAMPLE_SYSTEM, *SAMPLE_TURNS], SAMPLE_TURNS)

FIX = ("Correct the template (it must render a list of {'role', 'content'} messages with "
       "tokenizer.apply_chat_template), or leave chat_template out.")


def render_sample(tok: Any, template: str) -> str:
    """The sample conversation rendered by ``tok.apply_chat_template`` with ``template`` (see the module docstring).

    Raises:
        InvalidSpec: field ``chat_template``: a syntax error or an error the template raises (Jinja's message),
            more than :data:`RENDER_SECONDS` or :data:`RENDER_MEMORY_BYTES`, a sample longer than
            :data:`MAX_RENDERED_CHARS`.
    """
    # what the child's rendering imports, imported here: the child never takes an import lock
    import jinja2.ext
    import jinja2.sandbox  # noqa: F401

    message = _in_child(tok, template)
    kind = message.get("kind")
    if kind == "ok":
        return message["text"]
    if kind == "too_long":
        raise InvalidSpec(f"the chat template renders the sample conversation as {message['chars']} characters, "
                          f"more than {MAX_RENDERED_CHARS}", field="chat_template", fix=FIX)
    if kind == "error":
        raise InvalidSpec(f"the chat template does not render the sample conversation: {message['error']}",
                          field="chat_template", fix=FIX)
    raise InvalidSpec(f"rendering the sample conversation with the chat template {message['why']} (stopped); the "
                      "template loops or allocates without bound", field="chat_template",
                      fix="Bound the template's loops and repetitions by the messages, or leave chat_template out.")


def _in_child(tok: Any, template: str) -> dict[str, Any]:
    """Render in a forked child and return its message (``kind``: ok, too_long, error) or why it gave none."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns
        os.close(read_fd)
        _child(tok, template, write_fd)
    os.close(write_fd)
    data, deadline, done = b"", time.monotonic() + RENDER_SECONDS, False
    try:
        while not done and len(data) <= 4 * (MAX_RENDERED_CHARS + 2 * MAX_ERROR_CHARS) + 4096:  # UTF-8 JSON
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([read_fd], [], [], left)[0]:
                break
            chunk = os.read(read_fd, 1 << 16)
            data += chunk
            done = not chunk
    finally:
        os.close(read_fd)
        if not done:
            _kill(pid)
        _, status = os.waitpid(pid, 0)
    if done and data:
        try:
            return json.loads(data)
        except ValueError:
            pass
    if not done:
        return {"kind": "stopped", "why": f"took longer than {RENDER_SECONDS:g} s"}
    why = (f"exceeded {RENDER_MEMORY_BYTES >> 20} MiB or its CPU time" if os.WIFSIGNALED(status)
           else "ended without an answer")
    return {"kind": "stopped", "why": why}


def _kill(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _child(tok: Any, template: str, fd: int) -> None:
    """Limit this process, render, write one JSON message to ``fd``, exit (``os._exit``: nothing of the parent's
    state, atexit handlers or buffered output runs here)."""
    try:
        _limit_resources()
        message = _render(tok, template)
        payload = json.dumps(message, ensure_ascii=False).encode()  # UTF-8: at most 4 bytes a character
        view = memoryview(payload)
        while view:
            view = view[os.write(fd, view):]
    except BaseException:  # the parent reports a child that wrote nothing
        pass
    finally:
        os._exit(0)


def _limit_resources() -> None:
    import resource

    with open("/proc/self/statm", encoding="ascii") as f:
        size = int(f.read().split()[0]) * os.sysconf("SC_PAGE_SIZE")
    for which, value in ((resource.RLIMIT_AS, size + RENDER_MEMORY_BYTES),
                         (resource.RLIMIT_CPU, math.ceil(RENDER_SECONDS) + 1)):
        _, hard = resource.getrlimit(which)
        if hard != resource.RLIM_INFINITY:
            value = min(value, hard)
        resource.setrlimit(which, (value, value))


def _render(tok: Any, template: str) -> dict[str, Any]:
    errors: list[str] = []
    for conversation in SAMPLES:
        try:
            text = tok.apply_chat_template(conversation, chat_template=template, tokenize=False,
                                           add_generation_prompt=True)
        except MemoryError:
            return {"kind": "stopped", "why": f"exceeded {RENDER_MEMORY_BYTES >> 20} MiB"}
        except Exception as exc:  # jinja and transformers raise many kinds: each is reported
            errors.append(_describe(exc)[:MAX_ERROR_CHARS])
            continue
        if not isinstance(text, str):
            errors.append(f"apply_chat_template returned {type(text).__name__}, not text")
            continue
        if not text.strip():
            errors.append("it renders the conversation as empty text")
            continue
        if len(text) > MAX_RENDERED_CHARS:
            return {"kind": "too_long", "chars": len(text)}
        return {"kind": "ok", "text": text}
    unique = list(dict.fromkeys(errors))
    labels = ["with a system message", "without one"]
    text = unique[0] if len(unique) == 1 else "; ".join(f"{lab}: {e}" for lab, e in zip(labels, errors, strict=True))
    return {"kind": "error", "error": text}


def _describe(exc: Exception) -> str:
    """Jinja's message, with the line of a syntax error and the kind of anything else."""
    import jinja2

    if isinstance(exc, jinja2.TemplateSyntaxError):
        return f"syntax error on line {exc.lineno}: {exc.message}"
    return f"{type(exc).__name__}: {exc}"
