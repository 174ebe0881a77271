"""Malformed and hostile requests, and the answer each gets: the table in ``docs/robustness.md`` is generated here.

Every case runs against a fresh data directory holding a tiny checkpoint; the answer must be the expected 4xx
``application/problem+json`` naming the expected field, with no traceback, nothing left in the data directory and
the input byte-identical. Run with ``ADAPTER_SURGERY_WRITE_DOCS=1`` to rewrite the document after changing a case.
"""

from __future__ import annotations

import io
import json
import os
import struct
import tarfile
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from fastapi.testclient import TestClient

from adapter_surgery.api.app import create_app
from adapter_surgery.settings import Settings
from tests.conftest import tree_digest
from tests.fixtures import make

DOC = Path(__file__).resolve().parents[2] / "docs" / "robustness.md"
SRC = "llama-untied-tiny"  # FX-B: two shards, untied head, tokenizer
GPT2 = "gpt2-tied-tiny"  # FX-A: one file, Conv1D


@dataclass
class Env:
    """What a case may use: the data directory, a directory outside it, and where the sources are."""

    data: Path
    outside: Path

    def shard(self, n: int = 1) -> Path:
        return sorted((self.data / SRC).glob("*.safetensors"))[n - 1]


@dataclass(frozen=True)
class Case:
    name: str
    what: str  # what the request does, for the document
    status: int
    field: str | None
    send: Callable[..., Any] | tuple[Callable[[Env], dict[str, Any] | None], Callable[..., Any]]
    mutates_input: bool = False
    settings: dict[str, Any] = field(default_factory=dict)


def post(op: str, **body: Any) -> Callable[[TestClient, Env], Any]:
    """A JSON request to ``op``: ``checkpoint`` defaults to the tiny Llama, ``output`` to ``out``."""
    def send(client: TestClient, env: Env) -> Any:
        return client.post(f"/{op}", json={"checkpoint": SRC, "output": "out", **body})
    return send


def raw(op: str, content: bytes, ctype: str = "application/json", **headers: str) -> Callable[..., Any]:
    return lambda client, env: client.post(f"/{op}", content=content, headers={"content-type": ctype, **headers})


def upload(filename: str, payload: bytes | Callable[[Env], bytes], spec: str | None = '{"num_new_tokens": 1}',
           op: str = "extend-vocab") -> Callable[..., Any]:
    def send(client: TestClient, env: Env) -> Any:
        data = payload(env) if callable(payload) else payload
        return client.post(f"/{op}", files={"file": (filename, data)}, data={} if spec is None else {"spec": spec})
    return send


def with_setup(setup: Callable[[Env], dict[str, Any] | None], op: str = "extend-vocab",
               **body: Any) -> tuple[Callable[[Env], dict[str, Any] | None], Callable[..., Any]]:
    """Prepare the data directory with ``setup`` (before the snapshot), then post ``body`` updated with what
    ``setup`` returned."""
    def send(client: TestClient, env: Env, extra: dict[str, Any]) -> Any:
        return client.post(f"/{op}", json={"checkpoint": SRC, "output": "out", **body, **extra})
    return setup, send


# -- checkpoint damage -------------------------------------------------------------------------------------------
def _rewrite_header(path: Path, edit: Callable[[dict], Any]) -> None:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + data[8 + n:])


def _first_tensor(header: dict) -> dict:
    return header[next(k for k in header if k != "__metadata__")]


def _config(env: Env, **changes: Any) -> None:
    path = env.data / SRC / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def _tar(*members: tuple[str, bytes | None, bytes]) -> bytes:
    """A tar of ``(name, link target or None, data)`` members."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, link, data in members:
            info = tarfile.TarInfo(name)
            if link is not None:
                info.type, info.linkname = tarfile.SYMTYPE, link.decode()
            else:
                info.size = len(data)
            tf.addfile(info, io.BytesIO(data) if link is None else None)
    return buf.getvalue()


def _zip(*members: tuple[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in members:
            zf.writestr(name, data)
    return buf.getvalue()


def _encrypted_zip() -> bytes:
    data = bytearray(_zip(("m/model.safetensors", b"y" * 64)))
    for sig, flag in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        data[data.find(sig) + flag] |= 1
    return bytes(data)


def _zip_bomb_header() -> bytes:
    """A zip whose central directory claims a 2^40-byte member (never inflated: refused from the listing)."""
    data = bytearray(_zip(("m/model.safetensors", b"y" * 64)))
    at = data.find(b"PK\x01\x02")
    data[at + 24:at + 28] = struct.pack("<I", 0xFFFFFFF0)  # uncompressed size
    return bytes(data)


DEEP = b"[" * 100_000 + b"]" * 100_000
ST_HEADER_ONLY = struct.pack("<Q", 2) + b"{}"
HUGE_HEADER_LEN = struct.pack("<Q", 2**62) + b"{}"


def _symlink_out(env: Env) -> dict:
    (env.outside / "elsewhere").mkdir()
    (env.data / "link").symlink_to(env.outside / "elsewhere")
    return {"checkpoint": "link"}


def _inner_symlink(env: Env) -> None:
    (env.outside / "secret.txt").write_text("SECRET")
    (env.data / SRC / "notes.txt").symlink_to(env.outside / "secret.txt")


def _pickle(env: Env) -> dict:
    (env.data / "pk").mkdir()
    (env.data / "pk" / "pytorch_model.bin").write_bytes(b"\x80\x04N.")
    return {"checkpoint": "pk"}


def _fifo(env: Env) -> dict:
    os.mkfifo(env.data / "fifo.safetensors")
    return {"checkpoint": "fifo.safetensors"}


def _file(name: str, content: bytes) -> Callable[[Env], dict]:
    def setup(env: Env) -> dict:
        (env.data / name).write_bytes(content)
        return {"checkpoint": name, "num_new_tokens": 1}
    return setup


def _damage(edit: Callable[[dict], Any]) -> Callable[[Env], None]:
    return lambda env: _rewrite_header(env.shard(), edit)


def _set(key: str, value: Any) -> Callable[[dict], None]:
    return lambda header: _first_tensor(header).__setitem__(key, value)


def _grow_end(header: dict) -> None:
    _first_tensor(header)["data_offsets"][1] += 4


def _index_lies(env: Env) -> None:
    index = env.data / SRC / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.norm.weight"] = sorted(set(doc["weight_map"].values()))[0]
    doc["weight_map"]["ghost.weight"] = sorted(set(doc["weight_map"].values()))[0]
    index.write_text(json.dumps(doc))


def _exists(env: Env) -> None:
    (env.data / "out").mkdir()
    (env.data / "out" / "keep.txt").write_text("mine")


def _output_link(env: Env) -> dict:
    (env.data / "linkin").symlink_to(GPT2)
    return {"output": "linkin", "overwrite": True}


def _huge_number(env: Env) -> None:
    text = (env.data / SRC / "config.json").read_text()
    (env.data / SRC / "config.json").write_text(text.replace("{", '{"huge": ' + "9" * 5000 + ", ", 1))


def _lora_out(**opts: Any) -> Callable[..., Any]:
    return post("attach-lora", output="lora", **opts)


TOK = {"tokens": ["<a>"]}
CASES: list[Case] = [
    # paths
    Case("path-dotdot", "checkpoint `../<name>` (escapes the data directory)", 403, "checkpoint",
         post("extend-vocab", checkpoint=f"../{SRC}", **TOK)),
    Case("path-absolute", "output an absolute path outside the data directory", 403, "output",
         lambda c, e: c.post("/extend-vocab", json={"checkpoint": SRC, "output": str(e.outside / "x"), **TOK})),
    Case("path-symlink-out", "checkpoint a symlink to a directory outside the data directory", 403, "checkpoint",
         with_setup(_symlink_out, **TOK)),
    Case("path-inner-symlink", "a file inside the checkpoint is a symlink to a file outside", 403, "checkpoint",
         with_setup(_inner_symlink, **TOK), mutates_input=True),
    Case("path-missing", "checkpoint that does not exist", 404, "checkpoint", post("extend-vocab", checkpoint="nope",
                                                                                   **TOK)),
    Case("path-nul", "output holds a NUL byte", 422, "output", post("extend-vocab", output="a\u0000b", **TOK)),
    Case("path-long", "output a 300-character name", 422, "output", post("extend-vocab", output="x" * 300, **TOK)),
    Case("path-under-file", "output under an existing file (`config.json/sub`)", 422, "output",
         post("extend-vocab", checkpoint=GPT2, output=f"{SRC}/config.json/sub", num_new_tokens=1)),
    Case("path-inside-input", "output inside the input checkpoint", 422, "output",
         post("extend-vocab", output=f"{SRC}/patched", **TOK)),
    Case("path-output-is-input", "output equal to the checkpoint, with overwrite", 422, "output",
         post("extend-vocab", output=SRC, overwrite=True, **TOK)),
    Case("path-exists", "output exists and overwrite is false", 409, "output", with_setup(_exists, **TOK)),
    Case("path-fifo", "checkpoint a FIFO named `.safetensors` (a read would hang)", 422, "checkpoint",
         with_setup(_fifo, **TOK)),
    Case("path-state-dir", "output the service's state directory `.adapter-surgery`, with overwrite", 403, "output",
         post("extend-vocab", output=".adapter-surgery", overwrite=True, **TOK)),
    Case("path-output-symlink", "output a symlink to another model in the data directory, with overwrite", 422,
         "output", with_setup(_output_link, **TOK)),
    Case("path-deep", "output of 2000 path components (`d/d/d/...`)", 422, "output",
         post("extend-vocab", output="/".join(["d"] * 2000), **TOK)),
    # checkpoint files
    Case("ckpt-pickle", "a directory holding only `pytorch_model.bin` (never unpickled)", 422, "checkpoint",
         with_setup(_pickle, **TOK)),
    Case("ckpt-offsets", "a tensor's data offsets run 4 bytes past its neighbour", 422, "checkpoint",
         with_setup(_damage(_grow_end), **TOK), mutates_input=True),
    Case("ckpt-dtype", "a tensor with dtype `Q7`", 422, "checkpoint", with_setup(_damage(_set("dtype", "Q7")), **TOK),
         mutates_input=True),
    Case("ckpt-shape", "a tensor whose shape disagrees with its byte length", 422, "checkpoint",
         with_setup(_damage(_set("shape", [3, 3])), **TOK), mutates_input=True),
    Case("ckpt-negative-shape", "a tensor with a negative dimension", 422, "checkpoint",
         with_setup(_damage(_set("shape", [-1, 64])), **TOK), mutates_input=True),
    Case("ckpt-header-len", "a header length of 2^62 bytes", 422, "checkpoint",
         with_setup(_file("huge.safetensors", HUGE_HEADER_LEN))),
    Case("ckpt-header-json", "a header that is not JSON", 422, "checkpoint",
         with_setup(_file("bad.safetensors", struct.pack("<Q", 4) + b"{{{{"))),
    Case("ckpt-header-deep", "a header of 100,000 nested JSON arrays", 422, "checkpoint",
         with_setup(_file("deep.safetensors", struct.pack("<Q", len(DEEP)) + DEEP))),
    Case("ckpt-truncated", "a file shorter than its 8-byte length prefix", 422, "checkpoint",
         with_setup(_file("short.safetensors", b"\x01\x02"))),
    Case("ckpt-empty", "a `.safetensors` file with no tensors", 422, "checkpoint",
         with_setup(_file("empty.safetensors", ST_HEADER_ONLY))),
    Case("ckpt-missing-shard", "the index names a shard that is missing", 422, "checkpoint",
         with_setup(lambda e: e.shard(2).unlink(), **TOK), mutates_input=True),
    Case("ckpt-index-lies", "the index maps tensors to a shard that does not hold them", 422, "checkpoint",
         with_setup(_index_lies, **TOK), mutates_input=True),
    Case("ckpt-config-deep", "`config.json` of 100,000 nested arrays", 422, "checkpoint",
         with_setup(lambda e: (e.data / SRC / "config.json").write_bytes(DEEP), **TOK), mutates_input=True),
    Case("ckpt-config-digits", "`config.json` holding a number of 5000 digits", 422, "checkpoint",
         with_setup(_huge_number, **TOK), mutates_input=True),
    # config.json that contradicts the weights (checked against the headers before anything is built)
    Case("config-layers-1e9", "`num_hidden_layers` 10^9 in config.json (2 layers in the weights)", 422,
         "config.num_hidden_layers", with_setup(lambda e: _config(e, num_hidden_layers=10**9), **TOK),
         mutates_input=True),
    Case("config-layers-40", "`num_hidden_layers` 40 in config.json (2 in the weights)", 422,
         "config.num_hidden_layers", with_setup(lambda e: _config(e, num_hidden_layers=40), **TOK),
         mutates_input=True),
    Case("config-hidden", "`hidden_size` 128 on 32-wide weights", 422, "config.hidden_size",
         with_setup(lambda e: _config(e, hidden_size=128), **TOK), mutates_input=True),
    Case("config-vocab", "`vocab_size` 4096 on 128 embedding rows", 422, "config.vocab_size",
         with_setup(lambda e: _config(e, vocab_size=4096), **TOK), mutates_input=True),
    Case("config-layers-fewer", "expand-blocks on `num_hidden_layers` 1 (2 in the weights)", 422,
         "config.num_hidden_layers", with_setup(lambda e: _config(e, num_hidden_layers=1), "expand-blocks",
                                                num_blocks=1), mutates_input=True),
    Case("config-vocab-smaller", "expand-blocks on `vocab_size` 100 over 128 embedding rows", 422,
         "config.vocab_size", with_setup(lambda e: _config(e, vocab_size=100), "expand-blocks", num_blocks=1),
         mutates_input=True),
    Case("config-lora-layers", "attach-lora on a config claiming 10^9 layers", 422, "config.num_hidden_layers",
         with_setup(lambda e: _config(e, num_hidden_layers=10**9), "attach-lora"), mutates_input=True),
    Case("config-head-layers", "attach-head on a config claiming 10^9 layers", 422, "config.num_hidden_layers",
         with_setup(lambda e: _config(e, num_hidden_layers=10**9), "attach-head", num_labels=2),
         mutates_input=True),
    # request bodies
    Case("body-too-large", "a JSON body over `max_json_bytes`", 413, None,
         raw("extend-vocab", b'{"tokens": ["' + b"a" * 4096 + b'"]}'), settings={"max_json_bytes": 1024}),
    Case("body-not-json", "a body that is not JSON", 422, "body", raw("extend-vocab", b"{nope")),
    Case("body-array", "a JSON array instead of an object", 422, "body", raw("extend-vocab", b"[1, 2]")),
    Case("body-empty", "an empty body", 422, "body", raw("extend-vocab", b"")),
    Case("body-media-type", "`text/plain` body", 415, None, raw("extend-vocab", b"x", "text/plain")),
    Case("body-deep", "a JSON body of 100,000 nested arrays", 422, "body", raw("extend-vocab", DEEP)),
    Case("body-unknown-field", "an unknown field (`tokenz`)", 422, "tokenz",
         post("extend-vocab", tokenz=["<a>"])),
    Case("body-nan", "`NaN` as a number", 422, "pad_to_multiple_of",
         raw("extend-vocab", f'{{"checkpoint": "{SRC}", "output": "out", "tokens": ["<a>"], '
                             f'"pad_to_multiple_of": NaN}}'.encode())),
    Case("body-bad-type", "a string where an integer is expected", 422, "pad_to_multiple_of",
         post("extend-vocab", pad_to_multiple_of="eight", **TOK)),
    Case("body-null-path", "`checkpoint: null`", 422, "checkpoint", post("extend-vocab", checkpoint=None, **TOK)),
    Case("seed-huge", "seed 2^64 + 5", 422, "seed", post("extend-vocab", seed=2**64 + 5, **TOK)),
    Case("seed-negative", "seed -1", 422, "seed", post("extend-vocab", seed=-1, **TOK)),
    # extend-vocab values
    Case("ev-empty-token", "an empty token", 422, "tokens.0", post("extend-vocab", tokens=[""])),
    Case("ev-space-token", "a whitespace-only token", 422, "tokens.0", post("extend-vocab", tokens=[" \n"])),
    Case("ev-control-token", "a token holding a control character", 422, "tokens.0",
         post("extend-vocab", tokens=["a\u0007b"])),
    Case("ev-huge-pad", "`pad_to_multiple_of` 10^9", 422, "pad_to_multiple_of",
         post("extend-vocab", pad_to_multiple_of=10**9, **TOK)),
    Case("ev-too-many-rows", "`num_new_tokens` 2^20 + 1", 422, "num_new_tokens",
         post("extend-vocab", checkpoint=GPT2, output="o.safetensors", num_new_tokens=2**20 + 1)),
    Case("ev-tokens-and-count", "both `tokens` and `num_new_tokens`", 422, "num_new_tokens",
         post("extend-vocab", tokens=["<a>"], num_new_tokens=2)),
    Case("ev-no-tokenizer", "`tokens` for a bare `.safetensors` file without a tokenizer", 422, "tokens",
         lambda c, e: c.post("/extend-vocab", json={"checkpoint": f"{SRC}/{e.shard().name}", "output": "o",
                                                    "tokens": ["<a>"]})),
    Case("ev-copy-unknown", "copy init from a token that does not exist", 422, "tokens.0.init.source",
         post("extend-vocab", tokens=[{"content": "<a>", "init": {"strategy": "copy", "source": "<nope>"}}])),
    Case("ev-copy-row-range", "copy init from row id 10^6", 422, "tokens.0.init.source",
         post("extend-vocab", tokens=[{"content": "<a>", "init": {"strategy": "copy", "source": 10**6}}])),
    Case("ev-unknown-init", "init `magic`", 422, "init", post("extend-vocab", init="magic", **TOK)),
    # attach-lora
    Case("lora-r-zero", "`r` 0", 422, "r", _lora_out(r=0)),
    Case("lora-r-too-big", "`r` above min(in, out) of a target", 422, "r", _lora_out(r=4096)),
    Case("lora-no-match", "`target_modules` that match nothing", 422, "target_modules.0",
         _lora_out(target_modules=["nothing_here"])),
    Case("lora-typo", "one typo'd entry among valid `target_modules`", 422, "target_modules.1",
         _lora_out(target_modules=["q_proj", "v_prj"])),
    Case("lora-regex-backtracking", "`target_modules` regex `(.*)*z$` (nested quantifiers: exponential matching)",
         422, "target_modules", _lora_out(target_modules="(.*)*z$")),
    Case("lora-alpha-zero", "`lora_alpha` 0", 422, "lora_alpha", _lora_out(lora_alpha=0)),
    Case("lora-dropout", "`lora_dropout` 1.5", 422, "lora_dropout", _lora_out(lora_dropout=1.5)),
    Case("lora-pissa-niter", "`init_lora_weights` `pissa_niter_999999999`", 422, "init_lora_weights",
         _lora_out(init_lora_weights="pissa_niter_999999999")),
    Case("lora-memory", "PiSSA whose SVD does not fit the memory limit", 503, "init_lora_weights",
         _lora_out(init_lora_weights="pissa"), settings={"memory_limit_bytes": 1024}),
    Case("lora-data-init", "`init_lora_weights` `eva` (needs data)", 422, "init_lora_weights",
         _lora_out(init_lora_weights="eva")),
    Case("lora-layers", "`layers_to_transform` names a layer the model lacks", 422, "layers_to_transform",
         _lora_out(layers_to_transform=[99])),
    Case("lora-token-range", "`trainable_token_indices` past the vocabulary", 422, "trainable_token_indices",
         _lora_out(trainable_token_indices=[10**6])),
    # attach-head
    Case("head-task", "task `regression_tree`", 422, "task", post("attach-head", task="regression_tree")),
    Case("head-labels-zero", "`num_labels` 0", 422, "num_labels", post("attach-head", num_labels=0)),
    Case("head-labels-gap", "`id2label` with ids 0 and 5 only", 422, "id2label",
         post("attach-head", id2label={"0": "a", "5": "b"})),
    Case("head-init", "init `lecun`", 422, "init", post("attach-head", num_labels=2, init="lecun")),
    # surgery
    Case("surgery-empty", "no steps", 422, "steps", post("surgery", steps=[])),
    Case("surgery-17-steps", "17 steps (limit 16)", 422, "steps",
         post("surgery", steps=[{"op": "extend-vocab", "tokens": [f"<t{i}>"]} for i in range(17)])),
    Case("surgery-two-loras", "two attach-lora steps", 422, "steps",
         post("surgery", steps=[{"op": "attach-lora"}, {"op": "attach-lora"}])),
    Case("surgery-unknown-op", "a step `op: merge-everything`", 422, "steps.0",
         post("surgery", steps=[{"op": "merge-everything"}])),
    Case("surgery-bad-step", "a step field error is named with its index", 422, "steps.1.r",
         post("surgery", steps=[{"op": "extend-vocab", "tokens": ["<a>"]}, {"op": "attach-lora", "r": 0}])),
    # verify
    Case("verify-output", "verify with an `output` field", 422, "body",
         lambda c, e: c.post("/verify", json={"checkpoint": SRC, "patched": SRC, "output": "x"})),
    Case("verify-unrelated", "verify a checkpoint against an unrelated one", 422, "patched",
         lambda c, e: c.post("/verify", json={"checkpoint": SRC, "patched": GPT2})),
    Case("verify-probes", "`num_probes` 10^6", 422, "num_probes",
         lambda c, e: c.post("/verify", json={"checkpoint": SRC, "patched": SRC, "num_probes": 10**6})),
    Case("verify-memory", "`num_probes` 44 x `probe_length` 711 with 100 MiB available", 503, "num_probes",
         lambda c, e: c.post("/verify", json={"checkpoint": SRC, "patched": SRC, "num_probes": 44,
                                              "probe_length": 711}), settings={"memory_limit_bytes": 100 << 20}),
    Case("ev-memory", "2^20 new tokens with 1 MiB available", 503, "num_new_tokens",
         post("extend-vocab", checkpoint=f"{GPT2}/model.safetensors", output="o", num_new_tokens=2**20),
         settings={"memory_limit_bytes": 1 << 20}),
    # authentication
    Case("auth-missing", "no `Authorization` header on a service with a token", 401, None,
         post("extend-vocab", **TOK), settings={"api_token": "s3cret"}),
    Case("auth-wrong", "a wrong bearer token", 401, None,
         lambda c, e: c.post("/extend-vocab", json={"checkpoint": SRC, "output": "out", **TOK},
                             headers={"authorization": "Bearer guess"}), settings={"api_token": "s3cret"}),
    Case("auth-scheme", "`Authorization: Basic ...` instead of a bearer token", 401, None,
         lambda c, e: c.post("/extend-vocab", json={"checkpoint": SRC, "output": "out", **TOK},
                             headers={"authorization": "Basic czNjcmV0"}), settings={"api_token": "s3cret"}),
    # upload form
    Case("up-pickle", "upload of a `.bin` file", 422, "file", upload("m.bin", b"\x80\x04N.")),
    Case("up-tar-escape", "a tar member `../evil.safetensors`", 422, "file",
         upload("m.tar", _tar(("../evil.safetensors", None, b"abc")))),
    Case("up-tar-symlink", "a tar member that is a symlink to `/etc/passwd`", 422, "file",
         upload("m.tar", _tar(("m/model.safetensors", b"/etc/passwd", b"")))),
    Case("up-zip-clash", "a zip with a file and a directory of one name", 422, "file",
         upload("m.zip", _zip(("a", b"x"), ("a/model.safetensors", b"y")))),
    Case("up-zip-encrypted", "an encrypted zip", 422, "file", upload("m.zip", _encrypted_zip())),
    Case("up-zip-bomb", "a zip claiming a 4 GiB member (over the upload limit)", 413, "file",
         upload("m.zip", _zip_bomb_header()), settings={"max_upload_bytes": 1 << 20}),
    Case("up-no-weights", "an archive without a `.safetensors` file", 422, "file",
         upload("m.zip", _zip(("readme.txt", b"hello")))),
    Case("up-bad-safetensors", "an uploaded `.safetensors` with a broken header", 422, "checkpoint",
         upload("m.safetensors", struct.pack("<Q", 4) + b"{{{{")),
    Case("up-no-file", "a form without the `file` part", 422, "file",
         lambda c, e: c.post("/extend-vocab", files={"spec": (None, "{}")})),
    Case("up-spec-field", "a form `spec` with an unknown field", 422, "spec.bogus",
         upload("m.safetensors", b"123", spec='{"bogus": 1}')),
    Case("up-spec-json", "a form `spec` that is not JSON", 422, "spec", upload("m.safetensors", b"123", spec="{")),
    Case("up-spec-paths", "a form `spec` naming `checkpoint`", 422, "spec.checkpoint",
         upload("m.safetensors", b"123", spec='{"checkpoint": "/etc"}')),
    Case("up-content-length", "`Content-Length: abc`", 400, None,
         raw("extend-vocab", b"x", "multipart/form-data; boundary=x", **{"content-length": "abc"})),
    Case("up-too-large", "`Content-Length` over the upload limit", 413, "file",
         upload("m.safetensors", b"x" * 2048), settings={"max_upload_bytes": 1024}),
    Case("up-no-boundary", "multipart without a boundary", 400, None, raw("extend-vocab", b"--x--",
                                                                             "multipart/form-data")),
    # routes
    Case("route-method", "`GET /extend-vocab`", 405, None, lambda c, e: c.get("/extend-vocab")),
    Case("route-unknown", "`POST /merge-everything`", 404, None, lambda c, e: c.post("/merge-everything", json={})),
]


def _problem_check(case: Case, r: Any) -> str | None:
    """What is wrong with the answer ``r`` for ``case``, or None."""
    if r.status_code != case.status:
        return f"status {r.status_code}, expected {case.status}: {r.text[:300]}"
    if r.headers.get("content-type") != "application/problem+json":
        return f"content-type {r.headers.get('content-type')!r}"
    body = r.json()
    if body.get("status") != case.status or not body.get("detail") or "Traceback" in r.text:
        return f"not a problem body: {body}"
    if case.field is not None and body.get("field") != case.field:
        return f"field {body.get('field')!r}, expected {case.field!r}: {body.get('detail')}"
    return None


def _row(case: Case, r: Any, env: Env) -> str:
    body = r.json() if r.headers.get("content-type") == "application/problem+json" else {}
    detail = str(body.get("detail", "")).replace(str(env.outside), "<outside>").replace(str(env.data), "<data>")
    detail = detail.replace("|", "\\|").replace("\n", " ")
    if len(detail) > 140:
        detail = detail[:137] + "..."
    field_ = f"`{body['field']}`" if body.get("field") else ""
    return f"| {case.name} | {case.what} | {r.status_code} | {field_} | {detail} |"


def render(rows: list[str]) -> str:
    return "\n".join([
        "# Robustness: malformed and hostile inputs",
        "",
        "Generated by `tests/api/test_robustness.py` (`ADAPTER_SURGERY_WRITE_DOCS=1 pytest "
        "tests/api/test_robustness.py` rewrites it; the test fails when this file and the service's answers differ).",
        "Each request ran against a fresh data directory holding a tiny Llama (two shards, untied) and a tiny GPT-2;",
        "every answer is `application/problem+json` with no traceback, nothing was left in the data directory, and the",
        "input checkpoint was byte-identical afterwards (except where the case damages it first).",
        "",
        f"{len(rows)} cases.",
        "",
        "| case | request | status | field | detail |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ])


@pytest.fixture(scope="module")
def sources(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("robustness-sources")
    make("FX-B", root)
    make("FX-A", root)
    return root


def _fresh(sources: Path, tmp: Path) -> Env:
    import shutil

    env = Env(tmp / "data", tmp / "outside")
    env.outside.mkdir(parents=True)
    shutil.copytree(sources, env.data)
    return env


def test_hostile_inputs_table(sources: Path, tmp_path: Path) -> None:
    assert len(CASES) >= 60 and len({c.name for c in CASES}) == len(CASES)
    rows, failures = [], []
    for i, case in enumerate(CASES):
        env = _fresh(sources, tmp_path / str(i))
        client = TestClient(create_app(Settings(data_dir=env.data, **case.settings)), raise_server_exceptions=False)
        setup, send = case.send if isinstance(case.send, tuple) else (None, case.send)
        extra = setup(env) if setup else None
        extra = extra if isinstance(extra, dict) else {}
        before_listing = sorted(p.name for p in env.data.iterdir())
        before = tree_digest(env.data / SRC)
        r = send(client, env, extra) if setup else send(client, env)
        problem = _problem_check(case, r)
        if problem is None:
            after = sorted(p.name for p in env.data.iterdir() if p.name != ".adapter-surgery")
            if after != before_listing:
                problem = f"data directory changed: {sorted(set(after) ^ set(before_listing))}"
            elif any(".tmp-" in p.name or p.name.startswith(".surgery-") for p in env.data.rglob(".*")):
                problem = "a temporary output was left"
            elif not case.mutates_input and tree_digest(env.data / SRC) != before:
                problem = "the input checkpoint changed"
        if problem is not None:
            failures.append(f"{case.name}: {problem}")
        rows.append(_row(case, r, env))
    assert not failures, "\n".join(failures)
    text = render(rows)
    if os.environ.get("ADAPTER_SURGERY_WRITE_DOCS"):
        DOC.parent.mkdir(exist_ok=True)
        DOC.write_text(text)
    assert DOC.exists() and DOC.read_text() == text, \
        "docs/robustness.md is stale: run ADAPTER_SURGERY_WRITE_DOCS=1 pytest tests/api/test_robustness.py"
