"""Example trainer for docker/compose.yaml: prepares a checkpoint through the service, then trains it with peft.

It shares the /data volume with the adapter-surgery service and talks to it over the compose network:

1. POST /extend-vocab adds task tokens to ``BASE_CHECKPOINT`` (a model directory under /data);
2. POST /attach-lora writes a LoRA adapter for the extended model, with the new token rows trainable;
3. loads both with transformers/peft, exactly as a training job would, checks that the adapter starts as an
   identity, and runs a few optimizer steps on text that uses the new tokens.

When ``BASE_CHECKPOINT`` does not exist, a tiny random Llama is written there first so that the example runs
anywhere; mount your own data (ADAPTER_SURGERY_DATA) to run it on a real model. Standard library + torch,
transformers and peft only (the service image has them; so does any training image that uses peft).

Environment: ADAPTER_SURGERY_URL (default http://adapter-surgery:8000), BASE_CHECKPOINT (default models/base),
RUN_DIR (default runs/example), DATA_DIR (default /data), STEPS (default 3).
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

URL = os.environ.get("ADAPTER_SURGERY_URL", "http://adapter-surgery:8000").rstrip("/")
DATA = Path(os.environ.get("DATA_DIR", "/data"))
BASE = os.environ.get("BASE_CHECKPOINT", "models/base")
RUN = os.environ.get("RUN_DIR", "runs/example").rstrip("/")
STEPS = int(os.environ.get("STEPS", "3"))
NEW_TOKENS = ["<|tool_call|>", "<|tool_result|>"]


def log(message: str) -> None:
    print(f"[trainer] {message}", flush=True)


def call(method: str, route: str, body: dict | None = None, timeout: float = 3600) -> dict:
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"{URL}{route}", data=data, method=method,
                                 headers={"Content-Type": "application/json"} if data else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        sys.exit(f"[trainer] {method} {route} failed with {exc.code}: {exc.read().decode(errors='replace')}")


def wait_for_service(seconds: float = 300) -> dict:
    deadline = time.monotonic() + seconds
    while True:
        try:
            return call("GET", "/healthz", timeout=5)
        except (urllib.error.URLError, ConnectionError, TimeoutError) as exc:
            if time.monotonic() > deadline:
                sys.exit(f"[trainer] {URL} did not answer: {exc}")
            time.sleep(2)


def make_demo_checkpoint(path: Path) -> None:
    """A tiny random Llama with a word-level tokenizer: a stand-in when no real checkpoint is mounted."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    plain = ["a", "an", "and", "answer", "calls", "for", "in", "is", "model", "of", "on", "question", "result",
             "returns", "the", "then", "to", "tool", "with"]
    words = ["<unk>", "<s>", "</s>", *plain]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", bos_token="<s>", eos_token="</s>")
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(words), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    LlamaForCausalLM(config).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, path)


def main() -> int:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    health = wait_for_service()
    log(f"service at {URL}: {health}")
    routes = call("GET", "/openapi.json", timeout=30)["paths"]

    base_dir = DATA / BASE
    if not (base_dir / "config.json").is_file():
        log(f"no checkpoint at {base_dir}: writing a tiny random Llama there for the demo "
            "(set ADAPTER_SURGERY_DATA to a folder with your own models/base to use a real one)")
        base_dir.parent.mkdir(parents=True, exist_ok=True)
        make_demo_checkpoint(base_dir)

    # 1. New tokens: the service resizes every vocabulary tensor and initializes the new rows.
    extended = f"{RUN}/extended"
    t0 = time.perf_counter()
    ev = call("POST", "/extend-vocab", {"checkpoint": BASE, "output": extended, "tokens": NEW_TOKENS,
                                        "init": "mean", "overwrite": True})
    added = [t["id"] for t in ev["added"]]
    log(f"/extend-vocab: vocab {ev['vocab_size_before']} -> {ev['vocab_size_after']}, added ids {added} "
        f"({time.perf_counter() - t0:.1f} s)")

    # 2. A LoRA adapter for the extended model; the new rows are trained too (peft's trainable_token_indices).
    lora = f"{RUN}/lora"
    if "/attach-lora" not in routes:
        log("/attach-lora is not served by this version of the service; stopping after /extend-vocab")
        return 0
    t0 = time.perf_counter()
    al = call("POST", "/attach-lora", {"checkpoint": extended, "output": lora, "r": 16, "lora_alpha": 32,
                                       "target_modules": "all-linear", "trainable_token_indices": added,
                                       "overwrite": True})
    log(f"/attach-lora: {len(al['target_modules'])} target modules, {al['trainable_parameters']} adapter "
        f"parameters, {al['base_bytes_read']} base bytes read ({time.perf_counter() - t0:.1f} s)")

    # 3. Load the results like a training job: base from the shared volume, adapter on top, then train.
    os.chdir(DATA)  # the adapter names its base relative to the data directory
    device = "cuda" if torch.cuda.is_available() else "cpu"
    tok = AutoTokenizer.from_pretrained(extended)
    model = AutoModelForCausalLM.from_pretrained(extended, dtype=torch.float32).to(device)
    text = f"the model calls {NEW_TOKENS[0]} tool and then {NEW_TOKENS[1]} result is the answer"
    batch = tok(text, return_tensors="pt").to(device)
    assert all(i in batch["input_ids"][0].tolist() for i in added), "new tokens are not single ids"
    with torch.no_grad():
        before = model(**batch).logits
    peft_model = PeftModel.from_pretrained(model, lora, is_trainable=True)
    with torch.no_grad():
        at_init = peft_model(**batch).logits
    drift = (at_init - before).abs().max().item()
    log(f"adapter loaded on {device}; max |logits change| at init = {drift:.2e} (an identity until trained)")
    if drift > 1e-4:
        sys.exit("[trainer] the adapter does not start as an identity")
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    log(f"trainable parameters: {trainable}")

    optim = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-3)
    peft_model.train()
    for step in range(STEPS):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optim.step()
        optim.zero_grad()
        log(f"step {step + 1}/{STEPS}: loss {loss.item():.4f}")
        if not torch.isfinite(loss):
            sys.exit("[trainer] the loss is not finite")
    trained = f"{RUN}/lora-trained"
    peft_model.save_pretrained(DATA / trained)
    log(f"saved the trained adapter to /data/{trained}; done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
