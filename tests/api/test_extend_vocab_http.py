"""POST /extend-vocab over HTTP: the JSON form, the upload form, and problem+json for every bad input."""

from __future__ import annotations

import io
import json
import struct
import tarfile
import zipfile
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from safetensors.torch import load

from adapter_surgery.api.app import RESULT_HEADER, create_app
from adapter_surgery.settings import Settings
from tests.conftest import tree_digest


@pytest.fixture
def client(data_dir: Path) -> TestClient:
    app = create_app(Settings(data_dir=data_dir))
    app.state.jobs.start()  # the service's own directory (.adapter-surgery: queue, scratch) exists from the start
    return TestClient(app, raise_server_exceptions=False)


def assert_problem(r, status: int, field: str | None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == status and body["detail"] and "Traceback" not in r.text
    if field is not None:
        assert body["field"] == field
    return body


def user_entries(data_dir: Path) -> list[str]:
    """The data directory's entries besides the service's own area, which must hold no upload scratch left."""
    scratch = data_dir / ".adapter-surgery" / "scratch"
    assert not scratch.is_dir() or list(scratch.iterdir()) == []
    return sorted(p.name for p in data_dir.iterdir() if p.name != ".adapter-surgery")


def test_json_form(client: TestClient, data_dir: Path, build) -> None:
    src = build("FX-B")
    r = client.post("/extend-vocab", json={"checkpoint": src, "output": "out", "tokens": ["<a>", "hello"]})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["vocab_size_before"] == 128 and body["vocab_size_after"] == 129
    assert body["added"] == [{"token": "<a>", "id": 128}] and body["existing"][0]["token"] == "hello"
    assert {c["name"] for c in body["changed_tensors"]} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert {f["path"] for f in body["files"]} >= {"config.json", "model.safetensors.index.json", "tokenizer.json"}
    assert client.get("/healthz").json()["status"] == "ok"


def test_upload_single_file_returns_the_file(client: TestClient, data_dir: Path, build) -> None:
    src = build("FX-A")
    raw = (data_dir / src / "model.safetensors").read_bytes()
    r = client.post("/extend-vocab", files={"file": ("gpt2.safetensors", raw)}, data={"spec": '{"num_new_tokens": 2}'})
    assert r.status_code == 200, r.text
    assert load(r.content)["transformer.wte.weight"].shape == (102, 32)
    assert json.loads(r.headers[RESULT_HEADER])["vocab_size_after"] == 102


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_upload_archive_returns_an_archive(client: TestClient, data_dir: Path, build, kind: str) -> None:
    src = data_dir / build("FX-B")
    buf = io.BytesIO()
    if kind == "zip":
        with zipfile.ZipFile(buf, "w") as zf:
            for p in src.iterdir():
                zf.write(p, f"model/{p.name}")
    else:
        with tarfile.open(fileobj=buf, mode="w") as tf:
            tf.add(src, arcname="model")
    spec = json.dumps({"tokens": ["<a>", "<b>"], "pad_to_multiple_of": 8})
    r = client.post("/extend-vocab", files={"file": (f"m.{kind}", buf.getvalue())}, data={"spec": spec})
    assert r.status_code == 200, r.text
    result = json.loads(r.headers[RESULT_HEADER])
    assert result["vocab_size_after"] == 136 and [a["id"] for a in result["added"]] == [128, 129]
    if kind == "zip":
        names = zipfile.ZipFile(io.BytesIO(r.content)).namelist()
    else:
        with tarfile.open(fileobj=io.BytesIO(r.content)) as tf:
            names = tf.getnames()
    assert "config.json" in names and "model.safetensors.index.json" in names


def test_upload_refusals(client: TestClient, data_dir: Path) -> None:
    assert_problem(client.post("/extend-vocab", files={"file": ("m.bin", b"\x80\x04")}), 422, "file")
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        info = tarfile.TarInfo("../evil.safetensors")
        info.size = 3
        tf.addfile(info, io.BytesIO(b"abc"))
    assert_problem(client.post("/extend-vocab", files={"file": ("m.tar", buf.getvalue())}), 422, "file")
    r = client.post("/extend-vocab", files={"file": ("m.safetensors", b"123")}, data={"spec": '{"bogus": 1}'})
    assert_problem(r, 422, "spec.bogus")
    assert_problem(client.post("/extend-vocab", files={"spec": (None, "{}")}), 422, "file")
    assert user_entries(data_dir) == []


def _corrupt_header(path: Path) -> None:
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    name = next(k for k in header if k != "__metadata__")
    header[name]["data_offsets"][1] += 4
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize(
    ("case", "status", "field"),
    [
        ("header", 422, "checkpoint"),
        ("missing_shard", 422, "checkpoint"),
        ("escape", 403, "checkpoint"),
        ("absolute", 403, "output"),
        ("symlink", 403, "checkpoint"),
        ("pickle", 422, "checkpoint"),
        ("unknown_field", 422, "tokenz"),
        ("bad_type", 422, "pad_to_multiple_of"),
        ("empty_token", 422, "tokens.0"),
        ("exists", 409, "output"),
        ("missing", 404, "checkpoint"),
        ("no_tokenizer_tokens", 422, "tokens"),
        ("cuda", 422, "device"),
        ("nul", 422, "output"),
        ("long_name", 422, "output"),
        ("under_a_file", 422, "output"),
        ("inner_symlink", 403, "checkpoint"),
        ("fifo", 422, "checkpoint"),
        ("nan", 422, "pad_to_multiple_of"),
        ("huge_pad", 422, "pad_to_multiple_of"),
        ("whitespace_token", 422, "tokens.0"),
    ],
)
def test_bad_input_gets_a_problem_and_leaves_nothing(client: TestClient, data_dir: Path, build, tmp_path: Path,
                                                     case: str, status: int, field: str) -> None:
    src = build("FX-B")
    body: dict = {"checkpoint": src, "output": "out", "tokens": ["<a>"]}
    if case == "header":
        _corrupt_header(next((data_dir / src).glob("*.safetensors")))
    elif case == "missing_shard":
        next((data_dir / src).glob("*-00002-*.safetensors")).unlink()
    elif case == "escape":
        body["checkpoint"] = f"../{src}"
    elif case == "absolute":
        body["output"] = str(tmp_path / "abs")
    elif case == "symlink":
        (tmp_path / "outside").mkdir()
        (data_dir / "link").symlink_to(tmp_path / "outside")
        body["checkpoint"] = "link"
    elif case == "pickle":
        (data_dir / "pk").mkdir()
        (data_dir / "pk" / "pytorch_model.bin").write_bytes(b"\x80\x04")
        body["checkpoint"] = "pk"
    elif case == "unknown_field":
        body["tokenz"] = body.pop("tokens")
    elif case == "bad_type":
        body["pad_to_multiple_of"] = "eight"
    elif case == "empty_token":
        body["tokens"] = [""]
    elif case == "exists":
        (data_dir / "out").mkdir()
    elif case == "missing":
        body["checkpoint"] = "nope"
    elif case == "no_tokenizer_tokens":
        body["checkpoint"] = f"{src}/" + next((data_dir / src).glob("*.safetensors")).name
    elif case == "nul":
        body["output"] = "a\u0000b"
    elif case == "long_name":
        body["output"] = "x" * 300
    elif case == "under_a_file":
        body["output"] = f"{src}/config.json/sub"
        body["checkpoint"] = build("FX-A")
    elif case == "inner_symlink":
        (tmp_path / "secret.txt").write_text("SECRET")
        (data_dir / src / "notes.txt").symlink_to(tmp_path / "secret.txt")
    elif case == "fifo":
        import os

        os.mkfifo(data_dir / "fifo.safetensors")
        body["checkpoint"] = "fifo.safetensors"
    elif case == "nan":
        body["pad_to_multiple_of"] = float("nan")
    elif case == "huge_pad":
        body["pad_to_multiple_of"] = 10**9
    elif case == "whitespace_token":
        body["tokens"] = [" "]
    elif case == "cuda":
        body["device"] = "cuda"
        import torch

        if torch.cuda.is_available():
            pytest.skip("a GPU is present")
    before = tree_digest(data_dir / src)
    listing = sorted(p.name for p in data_dir.iterdir())
    if case == "nan":
        raw = json.dumps(body).encode()  # NaN: not valid JSON for httpx's json=, sent as Python writes it
        r = client.post("/extend-vocab", content=raw, headers={"content-type": "application/json"})
    else:
        r = client.post("/extend-vocab", json=body)
    problem = assert_problem(r, status, field)
    assert problem.get("fix") or problem.get("errors")
    assert sorted(p.name for p in data_dir.iterdir()) == listing
    if case not in ("header", "missing_shard"):
        assert tree_digest(data_dir / src) == before


def test_wrong_media_type(client: TestClient) -> None:
    assert_problem(client.post("/extend-vocab", content=b"x", headers={"content-type": "text/plain"}), 415, None)
    assert_problem(client.post("/extend-vocab", content=b"{nope", headers={"content-type": "application/json"}),
                   422, "body")


def test_concurrent_requests_for_one_output_get_one_winner(client: TestClient, data_dir: Path, build) -> None:
    from concurrent.futures import ThreadPoolExecutor

    src = build("FX-B")
    body = {"checkpoint": src, "output": "same"}
    with ThreadPoolExecutor(4) as pool:
        answers = list(pool.map(lambda i: client.post("/extend-vocab", json={**body, "tokens": [f"<t{i}>"]}),
                                range(4)))
    codes = sorted(r.status_code for r in answers)
    assert codes.count(200) == 1 and set(codes) <= {200, 409}, codes
    winner = next(r for r in answers if r.status_code == 200).json()["added"][0]["token"]
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(data_dir / "same").convert_tokens_to_ids(winner) == 128


def test_large_results_fit_in_the_header(client: TestClient, data_dir: Path, build) -> None:
    src = build("FX-A")
    raw = (data_dir / src / "model.safetensors").read_bytes()
    r = client.post("/extend-vocab", files={"file": ("m.safetensors", raw)},
                    data={"spec": json.dumps({"num_new_tokens": 1, "pad_to_multiple_of": 4096})})
    assert r.status_code == 200, r.text
    header = r.headers[RESULT_HEADER]
    assert len(header) <= 7 * 1024
    result = json.loads(header)
    assert result["truncated"] is True and result["vocab_size_after"] == 4096
    assert result["padding_rows_total"] == 4096 - 101
    whole = client.get(f"/jobs/{result['job']}").json()["result"]  # where the whole result is
    assert len(whole["padding_rows"]) == 4096 - 101 and whole["files"] and "truncated" not in whole


def test_hostile_files_get_422_not_500(client: TestClient, data_dir: Path) -> None:
    deep = b"[" * 100_000 + b"]" * 100_000
    r = client.post("/extend-vocab", files={"file": ("m.safetensors", struct.pack("<Q", len(deep)) + deep)},
                    data={"spec": '{"num_new_tokens": 1}'})
    assert_problem(r, 422, "checkpoint")
    (data_dir / "deep").mkdir()
    (data_dir / "deep" / "config.json").write_bytes(deep)
    (data_dir / "deep" / "model.safetensors").write_bytes(struct.pack("<Q", len(deep)) + deep)
    assert_problem(client.post("/extend-vocab", json={"checkpoint": "deep", "output": "o", "num_new_tokens": 1}),
                   422, "checkpoint")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:  # a file and a directory of one name
        zf.writestr("a", b"x")
        zf.writestr("a/model.safetensors", b"y")
    assert_problem(client.post("/extend-vocab", files={"file": ("m.zip", buf.getvalue())}), 422, "file")
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("m/model.safetensors", b"y" * 64)
    raw = bytearray(buf.getvalue())
    for sig in (b"PK\x03\x04", b"PK\x01\x02"):  # mark every entry encrypted
        at = raw.find(sig)
        flag_at = at + (6 if sig == b"PK\x03\x04" else 8)
        raw[flag_at] |= 1
    assert_problem(client.post("/extend-vocab", files={"file": ("m.zip", bytes(raw))}), 422, "file")
    r = client.post("/extend-vocab", content=b"x", headers={"content-type": "multipart/form-data; boundary=x",
                                                             "content-length": "abc"})
    assert r.status_code in (400, 422) and r.headers["content-type"] == "application/problem+json"
    assert user_entries(data_dir) == ["deep"]


def test_seed_out_of_range_is_refused(client: TestClient, data_dir: Path, build) -> None:
    src = build("FX-B")
    r = client.post("/attach-lora", json={"checkpoint": src, "output": "s", "seed": 2**64 + 5})
    assert_problem(r, 422, "seed")
