"""Host-side half of docker/smoke-test.sh: call the running container over HTTP, then check its outputs.

    python docker/smoke_check.py api    --url URL --data DIR --checkpoint REL --out REL
    python docker/smoke_check.py verify --data DIR --checkpoint REL --out REL
    python docker/smoke_check.py post   --url URL --route /extend-vocab --body JSON

``api`` calls /healthz, /openapi.json, POST /extend-vocab, POST /attach-lora and POST /attach-head (each of the last
two only when /openapi.json lists it, saying clearly when it is skipped) and writes what it did to
``<DIR>/<REL out>/smoke.json``. ``verify`` loads every output with transformers/peft, the way a trainer would, and
checks it against the base checkpoint. Only the standard library is needed for ``api``; ``verify`` needs torch,
transformers, peft and safetensors. Exit status 0 when every check passed, 1 otherwise.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

NEW_TOKENS = ["<|smoke_tool_call|>", "<|smoke_tool_result|>"]
PROMPT = "The capital of France is"
NUM_LABELS = 3


class CheckFailed(Exception):
    pass


def check(ok: bool, message: str) -> None:
    if not ok:
        raise CheckFailed(message)
    print(f"  ok: {message}", flush=True)


# ------------------------------------------------------------------------------------------------------------
# api: the HTTP calls


def request(url: str, method: str = "GET", body: dict[str, Any] | None = None, timeout: float = 900) -> tuple[int, Any]:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data is not None else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            status, raw = resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        status, raw = exc.code, exc.read()
    try:
        return status, json.loads(raw)
    except ValueError:
        return status, raw.decode(errors="replace")


def post(url: str, route: str, body: dict[str, Any]) -> dict[str, Any]:
    started = time.perf_counter()
    status, result = request(f"{url}{route}", "POST", body)
    took = time.perf_counter() - started
    if status != 200:
        raise CheckFailed(f"POST {route} returned {status}: {json.dumps(result, indent=2)[:3000]}")
    print(f"  ok: POST {route} -> 200 in {took:.1f} s", flush=True)
    for warning in result.get("warnings", []) if isinstance(result, dict) else []:
        print(f"     warning from the service: {warning}", flush=True)
    return result


def api(args: argparse.Namespace) -> dict[str, Any]:
    url = args.url.rstrip("/")
    out = args.out.rstrip("/")
    record: dict[str, Any] = {"checkpoint": args.checkpoint, "out": out, "skipped": []}

    status, health = request(f"{url}/healthz", timeout=30)
    check(status == 200 and isinstance(health, dict) and health.get("status") == "ok",
          f"GET /healthz -> {status} {health}")
    check(health.get("data_dir") == "/data", "the service's data directory is /data (ADAPTER_SURGERY_DATA_DIR)")
    record["health"] = health

    status, spec = request(f"{url}/openapi.json", timeout=30)
    check(status == 200 and isinstance(spec, dict), "GET /openapi.json -> 200")
    routes = sorted(spec.get("paths", {}))
    print(f"     routes: {', '.join(routes)}", flush=True)
    record["routes"] = routes

    check("/extend-vocab" in routes, "/extend-vocab is served")
    extended = f"{out}/extended"
    result = post(url, "/extend-vocab", {"checkpoint": args.checkpoint, "output": extended, "tokens": NEW_TOKENS,
                                         "overwrite": True})
    added = {t["token"]: t["id"] for t in result["added"]}
    check(sorted(added) == sorted(NEW_TOKENS), f"/extend-vocab added {added}")
    record["extend_vocab"] = {"output": extended, "added": added,
                              "vocab_size_before": result["vocab_size_before"],
                              "vocab_size_after": result["vocab_size_after"]}

    if "/attach-lora" in routes:
        lora = f"{out}/lora"
        body = {"checkpoint": extended, "output": lora, "r": 8, "lora_alpha": 16,
                "target_modules": ["q_proj", "v_proj"], "overwrite": True}
        result = post(url, "/attach-lora", body)
        record["attach_lora"] = {"output": lora, "request": body, "result": result}
    else:
        print("  SKIPPED: POST /attach-lora -- the route is not in /openapi.json (not implemented yet)", flush=True)
        record["skipped"].append("attach-lora")

    if "/attach-head" in routes:
        head = f"{out}/head"
        body = {"checkpoint": args.checkpoint, "output": head, "num_labels": NUM_LABELS, "overwrite": True}
        result = post(url, "/attach-head", body)
        record["attach_head"] = {"output": head, "request": body, "result": result}
    else:
        print("  SKIPPED: POST /attach-head -- the route is not in /openapi.json (not implemented yet)", flush=True)
        record["skipped"].append("attach-head")

    target = Path(args.data) / out / "smoke.json"
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    return record


# ------------------------------------------------------------------------------------------------------------
# verify: load the outputs as a trainer would


def verify(args: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    data = Path(args.data).resolve()
    # Like a trainer whose working directory is the shared volume (the image's WORKDIR is /data): the adapter's
    # base_model_name_or_path is relative to the data directory.
    os.chdir(data)
    record = json.loads((data / args.out / "smoke.json").read_text(encoding="utf-8"))
    base_dir = data / args.checkpoint
    ext = record["extend_vocab"]
    ext_dir = data / ext["output"]

    # --- extend-vocab: tokenizer and model load; new tokens are single ids; old-vocabulary logits unchanged.
    base_tok = AutoTokenizer.from_pretrained(base_dir)
    tok = AutoTokenizer.from_pretrained(ext_dir)
    check(len(tok) == len(base_tok) + len(NEW_TOKENS), f"extended tokenizer: {len(base_tok)} -> {len(tok)} tokens")
    for token, token_id in ext["added"].items():
        check(tok.convert_tokens_to_ids(token) == token_id, f"{token!r} has id {token_id} in the saved tokenizer")
    ids = tok(f"call {NEW_TOKENS[0]} then {NEW_TOKENS[1]}")["input_ids"]
    check(all(t in ids for t in ext["added"].values()), "the new tokens encode as single ids")

    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32).eval()
    model, info = AutoModelForCausalLM.from_pretrained(ext_dir, dtype=torch.float32, output_loading_info=True)
    model.eval()
    check(not info["missing_keys"] and not info["unexpected_keys"],
          f"extended model loads with no missing/unexpected keys ({info['missing_keys']}, {info['unexpected_keys']})")
    rows = model.get_input_embeddings().weight.shape[0]
    check(rows == ext["vocab_size_after"] and model.config.vocab_size == rows,
          f"embedding rows = config.vocab_size = {rows} (was {ext['vocab_size_before']})")
    check(model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
          or not base.config.tie_word_embeddings, "tied embeddings are still tied")

    enc = base_tok(PROMPT, return_tensors="pt")
    with torch.no_grad():
        base_logits = base(**enc).logits[0, -1]
        ext_logits = model(**enc).logits[0, -1]
    old = base_logits.shape[0]
    diff = (ext_logits[:old] - base_logits).abs().max().item()
    check(diff < 1e-3, f"logits over the old vocabulary unchanged (max |diff| = {diff:.2e})")
    top = tok.decode([int(ext_logits.argmax())])
    check(top.strip() == "Paris", f"{PROMPT!r} -> {top!r} (the real weights survived the round trip)")
    with torch.no_grad():
        new_ids = tok(f"{PROMPT} {NEW_TOKENS[0]}", return_tensors="pt")
        out = model(**new_ids).logits
    check(bool(torch.isfinite(out).all()), "a forward pass through the new tokens gives finite logits")

    # --- attach-lora: peft loads the adapter onto the extended base; at init the outputs equal the base's.
    if "attach_lora" in record:
        from peft import PeftModel
        from peft.utils import get_peft_model_state_dict
        from safetensors.torch import load_file

        lora_dir = data / record["attach_lora"]["output"]
        adapter_files = sorted(p.name for p in lora_dir.iterdir())
        check({"adapter_config.json", "adapter_model.safetensors"} <= set(adapter_files),
              f"adapter files: {adapter_files}")
        saved = load_file(lora_dir / "adapter_model.safetensors")
        peft_model = PeftModel.from_pretrained(model, lora_dir).eval()
        loaded = get_peft_model_state_dict(peft_model)
        check(set(saved) == set(loaded), f"peft loads all {len(saved)} adapter tensors, no missing/unexpected keys")
        check(all(torch.equal(saved[k].to(loaded[k].dtype), loaded[k].cpu()) for k in saved),
              "the loaded adapter tensors equal the file's")
        targets = {k.split(".lora_")[0].rsplit(".", 1)[-1] for k in saved if ".lora_" in k}
        check(targets >= {"q_proj", "v_proj"}, f"LoRA targets: {sorted(targets)}")
        with torch.no_grad():
            lora_logits = peft_model(**enc).logits[0, -1]
        diff = (lora_logits - ext_logits).abs().max().item()
        check(diff < 1e-4, f"adapter at init leaves the outputs unchanged (max |diff| = {diff:.2e})")
        trainable = sum(p.numel() for n, p in peft_model.named_parameters() if "lora_" in n)
        check(trainable > 0, f"{trainable} LoRA parameters to train")
    else:
        print("  SKIPPED: attach-lora outputs (the route was not served)", flush=True)

    # --- attach-head: the classifier loads with no missing/unexpected/newly initialized weights.
    if "attach_head" in record:
        from transformers import AutoModelForSequenceClassification

        head_dir = data / record["attach_head"]["output"]
        clf, info = AutoModelForSequenceClassification.from_pretrained(head_dir, dtype=torch.float32,
                                                                       output_loading_info=True)
        check(not info["missing_keys"] and not info["unexpected_keys"],
              f"classifier loads with no missing/unexpected keys ({info['missing_keys']}, {info['unexpected_keys']})")
        with torch.no_grad():
            logits = clf.eval()(**enc).logits
        check(tuple(logits.shape) == (1, NUM_LABELS) and bool(torch.isfinite(logits).all()),
              f"classifier logits shape {tuple(logits.shape)}")
    else:
        print("  SKIPPED: attach-head outputs (the route was not served)", flush=True)


def post_one(args: argparse.Namespace) -> None:
    """One POST, for the graceful-stop check: SIGTERM arrives while it runs, and it must still succeed."""
    post(args.url.rstrip("/"), args.route, json.loads(args.body))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("phase", choices=("api", "verify", "post"))
    parser.add_argument("--url", default="http://127.0.0.1:8000")
    parser.add_argument("--data", help="the host folder mounted at /data")
    parser.add_argument("--checkpoint", help="the base checkpoint, relative to --data")
    parser.add_argument("--out", help="where outputs go, relative to --data")
    parser.add_argument("--route", help="post: the route")
    parser.add_argument("--body", help="post: the JSON body")
    args = parser.parse_args()
    needed = ("route", "body") if args.phase == "post" else ("data", "checkpoint", "out")
    missing = [f"--{name}" for name in needed if getattr(args, name) is None]
    if missing:
        parser.error(f"{args.phase} needs {', '.join(missing)}")
    try:
        {"api": api, "verify": verify, "post": post_one}[args.phase](args)
    except CheckFailed as exc:
        print(f"  FAILED: {exc}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
