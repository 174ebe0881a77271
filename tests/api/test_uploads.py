"""Bounded uploads: limits applied while the body is received, archives unpacked within limits in the data
directory's scratch area, answers streamed from disk, scratch removed in every case."""

from __future__ import annotations

import asyncio
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
import zipfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest
from fastapi import FastAPI, Request
from fastapi.testclient import TestClient
from safetensors.torch import load

from adapter_surgery.api import uploads
from adapter_surgery.api.app import RESULT_HEADER, create_app
from adapter_surgery.api.uploads import (
    ReceivedUpload,
    ScratchFileResponse,
    answer_upload,
    receive_upload,
    scratch_root,
)
from adapter_surgery.io.atomic import OWNER_FILE
from adapter_surgery.ops import OPERATIONS
from adapter_surgery.settings import Settings
from tests.fixtures import make

BOUNDARY = "bNd"
CHUNK = 4096


def make_client(data_dir: Path, **settings: object) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data_dir, **settings)), raise_server_exceptions=False)


def form(filename: str, payload: bytes, spec: str = "{}") -> bytes:
    return (f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{spec}\r\n'
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'
            f"Content-Type: application/octet-stream\r\n\r\n").encode() + payload + f"\r\n--{BOUNDARY}--\r\n".encode()


class Chunks:
    """A request body sent as it is pulled (without Content-Length unless given: chunked), recording how much of
    it the server pulled."""

    def __init__(self, data: bytes) -> None:
        self.data, self.pulled = data, 0

    async def __aiter__(self) -> AsyncIterator[bytes]:
        for i in range(0, len(self.data), CHUNK):
            piece = self.data[i:i + CHUNK]
            self.pulled += len(piece)
            yield piece


def stream_post(app: FastAPI, path: str, body: Chunks, headers: dict[str, str]) -> httpx.Response:
    """POST through httpx's ASGI transport, which hands the body to the app chunk by chunk as it asks (the test
    client would read it all first)."""
    async def go() -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as client:
            return await client.post(path, content=body, headers=headers)

    return asyncio.run(go())


MULTIPART = {"content-type": f"multipart/form-data; boundary={BOUNDARY}"}


def assert_problem(r, status: int, field: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    if field is not None:
        assert body["field"] == field
    return body


def assert_no_scratch(data_dir: Path) -> None:
    root = scratch_root(data_dir)
    assert not root.exists() or list(root.iterdir()) == []


def test_oversize_content_length_is_refused_before_reading(data_dir: Path) -> None:
    app = create_app(Settings(data_dir=data_dir, max_upload_bytes=64 * 1024))
    body = Chunks(form("m.safetensors", b"x" * 100_000))
    r = stream_post(app, "/extend-vocab", body, {**MULTIPART, "content-length": str(len(body.data))})
    problem = assert_problem(r, 413, "file")
    assert str(len(body.data)) in problem["detail"] and "65536" in problem["detail"]
    assert body.pulled == 0
    assert_no_scratch(data_dir)


def test_chunked_upload_over_the_limit_stops_at_the_limit(data_dir: Path) -> None:
    limit = 64 * 1024
    app = create_app(Settings(data_dir=data_dir, max_upload_bytes=limit))
    body = Chunks(form("m.safetensors", b"x" * (10 * limit)))
    r = stream_post(app, "/extend-vocab", body, MULTIPART)
    assert "content-length" not in r.request.headers
    assert_problem(r, 413, "file")
    assert limit < body.pulled <= limit + CHUNK  # one chunk past the limit at most
    assert_no_scratch(data_dir)


def test_upload_limit_of_the_receiver_itself(data_dir: Path) -> None:
    """receive_upload counts too (it does not rely on the middleware)."""
    settings = Settings(data_dir=data_dir, max_upload_bytes=64 * 1024)
    app = FastAPI()

    @app.post("/r")
    async def receive(request: Request) -> dict:
        await receive_upload(request, settings, OPERATIONS["extend-vocab"].options)
        return {}

    from adapter_surgery.api import problems

    problems.install(app)
    body = Chunks(form("m.safetensors", b"x" * (10 * 64 * 1024)))
    r = stream_post(app, "/r", body, MULTIPART)
    assert_problem(r, 413, "file")
    assert body.pulled <= 64 * 1024 + CHUNK
    assert_no_scratch(data_dir)


@pytest.mark.parametrize("chunked", [False, True])
def test_json_body_over_max_json_bytes(data_dir: Path, build, chunked: bool) -> None:
    app = create_app(Settings(data_dir=data_dir, max_json_bytes=10_000))
    src = build("FX-B")
    doc = json.dumps({"checkpoint": src, "output": "o", "tokens": [f"<t{i}>" for i in range(5000)]}).encode()
    body = Chunks(doc)
    headers = {"content-type": "application/json"}
    if not chunked:
        headers["content-length"] = str(len(doc))
    r = stream_post(app, "/extend-vocab", body, headers)
    assert ("content-length" in r.request.headers) is not chunked
    problem = assert_problem(r, 413, "body")
    assert problem["title"] == "Request too large" and "10000" in problem["detail"]
    assert body.pulled == (0 if not chunked else 12_288)  # chunked: read until past the limit, then stopped
    assert not (data_dir / "o").exists()
    small = {"checkpoint": src, "output": "o", "tokens": ["<a>"]}
    assert TestClient(app).post("/extend-vocab", json=small).status_code == 200  # under the limit: as before


def test_bad_content_length_is_400(data_dir: Path) -> None:
    r = make_client(data_dir).post("/extend-vocab", content=b"{}", headers={"content-type": "application/json",
                                                                            "content-length": "12x"})
    assert_problem(r, 400, "Content-Length")


def _zip(members: dict[str, bytes], compression: int = zipfile.ZIP_STORED) -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", compression) as zf:
        for name, data in members.items():
            zf.writestr(name, data)
    return buf.getvalue()


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    return buf.getvalue()


@pytest.mark.parametrize("kind", ["zip", "tar"])
def test_archive_member_count_limit(data_dir: Path, kind: str) -> None:
    client = make_client(data_dir, max_archive_members=10)
    members = {f"m/f{i}.txt": b"x" for i in range(11)}
    payload = _zip(members) if kind == "zip" else _tar(members)
    problem = assert_problem(client.post("/extend-vocab", files={"file": (f"m.{kind}", payload)}), 413, "file")
    assert "10" in problem["detail"] and "members" in problem["detail"]
    assert_no_scratch(data_dir)
    ten = dict(list(members.items())[:10])  # at the limit: past the count, refused only for holding no weights
    payload = _zip(ten) if kind == "zip" else _tar(ten)
    problem = assert_problem(client.post("/extend-vocab", files={"file": (f"m.{kind}", payload)}), 422, "file")
    assert "no .safetensors" in problem["detail"]


@pytest.mark.parametrize("members", [["a/model.safetensors", "b/model.safetensors"],
                                     ["a/model.safetensors", "b/c/model.safetensors"]], ids=["siblings", "uneven"])
def test_an_archive_of_two_model_directories_is_refused(tmp_path: Path, members: list[str]) -> None:
    """One of them was patched silently (the shallowest first found)."""
    src = tmp_path / "u.zip"
    src.write_bytes(_zip(dict.fromkeys(members, b"x")))
    with pytest.raises(uploads.InvalidCheckpoint) as e:
        uploads.unpack_upload("m.zip", src, tmp_path / "w", 10**9, 100)
    assert e.value.field == "file" and "2 model directories ('a/', " in e.value.detail


def test_an_adapter_archive_with_its_residual_base_inside_is_one_checkpoint(tmp_path: Path) -> None:
    src = tmp_path / "u.zip"
    src.write_bytes(_zip(dict.fromkeys(["ad/adapter_model.safetensors", "ad/base/model.safetensors"], b"x")))
    assert uploads.unpack_upload("m.zip", src, tmp_path / "w", 10**9, 100) == "input/ad"


def test_zip_end_record_claiming_too_many_members(tmp_path: Path) -> None:
    raw = bytearray(_zip({"a": b"1"}))
    end = raw.rfind(b"PK\x05\x06")
    raw[end + 8:end + 12] = (60000).to_bytes(2, "little") * 2  # entries on this disk, entries in total
    src = tmp_path / "u.bin"
    src.write_bytes(bytes(raw))
    with pytest.raises(uploads.PayloadTooLarge, match="60000 members"):
        uploads.unpack_upload("m.zip", src, tmp_path / "w", 10**9, 100)


@pytest.mark.parametrize("kind", ["zip", "tgz"])
def test_archive_unpacked_size_limit(data_dir: Path, kind: str) -> None:
    limit = 256 * 1024
    client = make_client(data_dir, max_upload_bytes=limit)
    bomb = {"m/model.safetensors": bytes(4 * limit)}  # compresses to a few KB
    if kind == "zip":
        payload = _zip(bomb, zipfile.ZIP_DEFLATED)
    else:
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w:gz") as tf:
            info = tarfile.TarInfo("m/model.safetensors")
            info.size = 4 * limit
            tf.addfile(info, io.BytesIO(bomb["m/model.safetensors"]))
        payload = buf.getvalue()
    assert len(payload) < limit // 4
    problem = assert_problem(client.post("/extend-vocab", files={"file": (f"m.{kind}", payload)}), 413, "file")
    assert "unpacks to more than" in problem["detail"]
    assert_no_scratch(data_dir)


@pytest.mark.parametrize(("case", "status", "field"), [
    ("no_boundary", 400, "body"),
    ("two_files", 400, "file"),
    ("many_fields", 400, "body"),
    ("garbage", 400, "body"),
    ("truncated", 422, "file"),
    ("file_named_other", 422, "file"),
    ("huge_spec", 413, "spec"),
    ("bad_spec", 422, "spec.num_new_tokens"),
])
def test_form_refusals(data_dir: Path, case: str, status: int, field: str) -> None:
    client = make_client(data_dir, max_json_bytes=1000)
    part = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="%s"%s\r\n\r\n%s\r\n'
    end = f"--{BOUNDARY}--\r\n"
    body = {
        "no_boundary": form("m.safetensors", b"123"),
        "two_files": part % ("file", '; filename="a.safetensors"', "1") + part % ("file", '; filename="b.zip"', "2")
        + end,
        "many_fields": "".join(part % (f"f{i}", "", "x") for i in range(5)) + end,
        "garbage": b"this is not multipart at all\r\n" * 3,
        "truncated": (part % ("file", '; filename="a.safetensors"', "123"))[:-8],
        "file_named_other": part % ("upload", '; filename="a.safetensors"', "1") + end,
        "huge_spec": part % ("spec", "", "x" * 2000) + end,
        "bad_spec": part % ("spec", "", '{"num_new_tokens": "many"}') + part % ("file", '; filename="a.safetensors"',
                                                                                "1") + end,
    }[case]
    headers = {"content-type": "multipart/form-data"} if case == "no_boundary" else MULTIPART
    r = client.post("/extend-vocab", content=body.encode() if isinstance(body, str) else body, headers=headers)
    problem = assert_problem(r, status, field)
    assert problem["detail"] and "Traceback" not in r.text
    assert_no_scratch(data_dir)


def test_upload_is_received_in_the_data_directory(data_dir: Path) -> None:
    settings = Settings(data_dir=data_dir)
    app = FastAPI()
    seen: list[ReceivedUpload] = []

    @app.post("/r")
    async def receive(request: Request) -> dict:
        upload = await receive_upload(request, settings, OPERATIONS["extend-vocab"].options)
        seen.append(upload)
        return {"listing": sorted(str(p.relative_to(upload.work)) for p in upload.work.rglob("*"))}

    r = TestClient(app).post("/r", files={"file": ("x.zip", _zip({"m/model.safetensors": b"abc", "m/c.json": b"{}"}))},
                             data={"spec": '{"num_new_tokens": 3}'})
    assert r.status_code == 200, r.text
    (upload,) = seen
    assert upload.work.parent == data_dir / ".adapter-surgery" / "scratch"
    assert upload.data_dir_rel == f".adapter-surgery/scratch/{upload.work.name}"
    assert r.json()["listing"] == [OWNER_FILE, "input", "input/m", "input/m/c.json", "input/m/model.safetensors"]
    assert upload.checkpoint == "input/m" and upload.filename == "x.zip"
    assert upload.spec_fields()["num_new_tokens"] == 3 and upload.spec_fields()["output"] == "output"
    owner = json.loads((upload.work / OWNER_FILE).read_text())
    assert owner["pid"] == os.getpid() and owner["job"] is None
    upload.discard()
    assert_no_scratch(data_dir)


def test_the_answer_is_a_file_streamed_from_disk(tmp_path: Path) -> None:
    asyncio.run(_answer_streamed(tmp_path))


async def _answer_streamed(tmp_path: Path) -> None:
    work = tmp_path / "w"
    (work / "output").mkdir(parents=True)
    (work / "output" / "config.json").write_text("{}")
    (work / "output" / "model.safetensors").write_bytes(b"z" * 300_000)
    upload = ReceivedUpload(work=work, data_dir_rel="w", filename="m.zip", checkpoint="input", options=None)  # type: ignore[arg-type]
    response = await answer_upload(upload, {"vocab_size_after": 3})
    assert isinstance(response, ScratchFileResponse)  # a FileResponse: sent in 64 KiB chunks from the file
    assert Path(response.path) == work / "output.zip" and not hasattr(response, "body")  # nothing in memory
    assert response.headers["content-disposition"] == 'attachment; filename="output.zip"'
    assert json.loads(response.headers[RESULT_HEADER]) == {"vocab_size_after": 3}
    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    async def receive() -> dict:
        return {"type": "http.request", "body": b""}

    await response({"type": "http", "method": "GET", "headers": [], "asgi": {"spec_version": "2.4"}}, receive, send)
    chunks = [m["body"] for m in sent if m["type"] == "http.response.body" and m.get("body")]
    assert len(chunks) >= 5 and max(len(c) for c in chunks) <= 64 * 1024
    assert set(zipfile.ZipFile(io.BytesIO(b"".join(chunks))).namelist()) == {"config.json", "model.safetensors"}
    assert not work.exists()  # removed once sent


def test_scratch_removed_after_answers_and_failures(data_dir: Path, build) -> None:
    client = make_client(data_dir)
    src = data_dir / build("FX-A")
    raw = (src / "model.safetensors").read_bytes()
    r = client.post("/extend-vocab", files={"file": ("m.safetensors", raw)}, data={"spec": '{"num_new_tokens": 2}'})
    assert r.status_code == 200 and r.headers["content-length"] == str(len(r.content))
    assert load(r.content)["transformer.wte.weight"].shape == (102, 32)
    assert_no_scratch(data_dir)
    tar = io.BytesIO()
    with tarfile.open(fileobj=tar, mode="w") as tf:
        tf.add(src, arcname="model")
    r = client.post("/extend-vocab", files={"file": ("m.tar", tar.getvalue())}, data={"spec": '{"tokens": ["<z>"]}'})
    assert r.status_code == 200 and r.headers["content-type"] == "application/x-tar"
    with tarfile.open(fileobj=io.BytesIO(r.content)) as tf:
        assert "model.safetensors" in tf.getnames()
    assert_no_scratch(data_dir)
    r = client.post("/extend-vocab", files={"file": ("m.safetensors", raw)},  # fails in the operation
                    data={"spec": '{"tokens": ["<a>"]}'})
    assert_problem(r, 422, "tokens")
    assert_no_scratch(data_dir)
    assert sorted(p.name for p in data_dir.iterdir()) == [".adapter-surgery", src.name]


def test_sweep_removes_scratch_of_dead_processes_only(data_dir: Path) -> None:
    live = uploads.new_scratch(data_dir)
    dead = uploads.new_scratch(data_dir)
    owner = json.loads((dead / OWNER_FILE).read_text())
    (dead / OWNER_FILE).write_text(json.dumps({**owner, "pid_start": 1}))  # this pid, another process's start
    other_host = uploads.new_scratch(data_dir)
    (other_host / OWNER_FILE).write_text(json.dumps({**owner, "host": "elsewhere"}))
    old_other = uploads.new_scratch(data_dir)
    (old_other / OWNER_FILE).write_text(json.dumps({**owner, "host": "elsewhere"}))
    os.utime(old_other, (0, 0))
    jobs = create_app(Settings(data_dir=data_dir)).state.jobs
    assert sorted(jobs.sweep()) == sorted([dead, old_other])
    assert live.is_dir() and other_host.is_dir()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _memory_mib(pid: int) -> dict[str, int]:
    """Peak (VmHWM) and current RSS of a process, MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {k: int(fields[k].split()[0]) // 1024 for k in ("VmHWM", "VmRSS")}


def _streamed_upload(base: str, path: Path, name: str) -> tuple[int, int]:
    """Send ``path`` as the form's file (chunked, 1 MiB pieces), read the answer as it comes; (status, bytes)."""
    def body() -> Iterator[bytes]:
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="spec"\r\n\r\n{{"num_new_tokens": 1}}\r\n'.encode()
        yield f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n\r\n'.encode()
        with path.open("rb") as fh:
            while chunk := fh.read(1 << 20):
                yield chunk
        yield f"\r\n--{BOUNDARY}--\r\n".encode()

    received = 0
    with httpx.stream("POST", f"{base}/extend-vocab", content=body(), headers=MULTIPART, timeout=300) as r:
        for piece in r.iter_bytes():
            received += len(piece)
        return r.status_code, received


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc/<pid>/status")
def test_memory_stays_flat_for_a_64_mb_upload(tmp_path: Path) -> None:
    """A real server (uvicorn, in a subprocess) receives a 64 MiB upload, runs the operation and answers the patched
    file, then a 64 MiB zip: its peak RSS grows by a few MiB, not by the upload's size (before: +196 MiB)."""
    import torch
    from safetensors.torch import load_file, save_file

    import adapter_surgery

    fixture = make("FX-A", tmp_path / "fx") / "model.safetensors"
    tensors = load_file(str(fixture))
    big = tmp_path / "big.safetensors"
    save_file({**tensors, "extra.weight": torch.ones(4096, 4096)}, str(big))  # 64 MiB that the operation copies
    assert big.stat().st_size > 64 * 2**20
    big_zip, small_zip = tmp_path / "big.zip", tmp_path / "small.zip"
    for archive, weights in ((big_zip, big), (small_zip, fixture)):
        with zipfile.ZipFile(archive, "w") as zf:
            zf.write(weights, "m/model.safetensors")
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": str(Path(adapter_surgery.__file__).parents[1]),
           "ADAPTER_SURGERY_DATA_DIR": str(tmp_path / "served"), "ADAPTER_SURGERY_DEVICE": "cpu",
           "ADAPTER_SURGERY_WARM_IMPORTS": "false"}  # what the upload costs, not the start-up imports' fixed ~100 MB
    server = subprocess.Popen([sys.executable, "-m", "uvicorn", "--factory", "adapter_surgery.api.app:app_from_env",
                               "--port", str(port), "--log-level", "warning"], env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(1200):
            try:
                if httpx.get(f"{base}/healthz").status_code == 200:
                    break
            except httpx.HTTPError:
                time.sleep(0.05)
        for _ in range(1):  # warm up: every import and first-call cost paid before the baseline
            assert _streamed_upload(base, fixture, "m.safetensors")[0] == 200
            assert _streamed_upload(base, small_zip, "m.zip")[0] == 200
        baseline = _memory_mib(server.pid)
        status, answered = _streamed_upload(base, big, "m.safetensors")
        assert status == 200 and answered > 64 * 2**20
        after_file = _memory_mib(server.pid)
        status, answered = _streamed_upload(base, big_zip, "m.zip")
        assert status == 200 and answered > 64 * 2**20
        after_zip = _memory_mib(server.pid)
    finally:
        server.terminate()
        server.wait(30)
    growth = after_zip["VmHWM"] - baseline["VmHWM"]
    print(f"peak RSS MiB: baseline {baseline}, after the file {after_file}, after the zip {after_zip}")
    assert growth <= 24, (baseline, after_file, after_zip)
    assert list((tmp_path / "served" / ".adapter-surgery" / "scratch").iterdir()) == []
