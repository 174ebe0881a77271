"""``adapter_surgery.client`` and ``adapter-surgery <op> --server``, against a real service: ``adapter-surgery
serve`` in a subprocess on a free localhost port, with tiny fixtures in its data directory.

The job tests follow the contract of issue 8 (``Prefer: respond-async`` → 202 + ``Location``, ``/jobs``) and skip
while the service has no ``/jobs`` route; the token tests skip while it has no authentication.
"""

from __future__ import annotations

import inspect
import io
import json
import os
import socket
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from safetensors.torch import load_file

from adapter_surgery import client as client_module
from adapter_surgery.cli import main
from adapter_surgery.client import (
    OPERATION_NAMES,
    Cancelled,
    Client,
    InvalidRequest,
    Job,
    JobFailed,
    JobState,
    NotFound,
    OutputExists,
    PathOutsideDataDir,
    ProblemError,
    QueueFull,
    ServiceUnreachable,
    Unauthorized,
    problem_error,
)
from adapter_surgery.ops import OPERATIONS
from adapter_surgery.ops.attach_lora import AttachLoraResult, AttachLoraSpec
from adapter_surgery.ops.extend_vocab import ExtendVocabResult
from tests.conftest import tensors, tree_digest
from tests.fixtures import make

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "s3cret-token-for-tests"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """``adapter-surgery serve`` in a subprocess; ``url``, ``data_dir``."""

    def __init__(self, data_dir: Path, log: Path, **env: str) -> None:
        self.data_dir, self.port, self.log = data_dir, free_port(), log
        self.url = f"http://127.0.0.1:{self.port}"
        full_env = {k: v for k, v in os.environ.items() if not k.startswith("ADAPTER_SURGERY_")}
        full_env |= {"PYTHONPATH": str(ROOT / "service"), "ADAPTER_SURGERY_DEVICE": "cpu", **env}
        with log.open("wb") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "adapter_surgery.cli", "serve", "--host", "127.0.0.1", "--port",
                 str(self.port), "--data-dir", str(data_dir)], env=full_env, cwd=ROOT, stdout=out,
                stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}):\n{log.read_text()[-4000:]}")
            try:
                if httpx.get(f"{self.url}/healthz", timeout=2).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError(f"the server did not start in 120 s:\n{log.read_text()[-4000:]}")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("client-server")
    data = root / "data"
    data.mkdir()
    for name in ("FX-A", "FX-B", "FX-F"):
        make(name, data)
    srv = Server(data, root / "server.log", ADAPTER_SURGERY_WORKERS="1")
    yield srv
    srv.stop()


@pytest.fixture
def client(server: Server) -> Iterator[Client]:
    with Client(server.url, token="") as c:
        yield c


@pytest.fixture
def jobs_api(server: Server, client: Client) -> Client:
    if httpx.get(f"{server.url}/jobs", timeout=10).status_code == 404:
        pytest.skip("the service has no /jobs yet (the jobs branch is not merged): job tests wait for it")
    return client


# --- without a service ------------------------------------------------------------------------------------------

def test_importing_the_client_loads_no_heavy_library() -> None:
    code = ("import sys, adapter_surgery.client; "
            "print(sorted(m for m in ('torch', 'transformers', 'peft', 'safetensors', 'fastapi', 'huey') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT / "service")}).stdout
    assert out.strip() == "[]"


def test_one_method_per_operation_with_its_models() -> None:
    assert tuple(OPERATIONS) == OPERATION_NAMES
    for op in OPERATIONS.values():
        method = getattr(Client, op.name.replace("-", "_"))
        sig = inspect.signature(method)
        assert sig.return_annotation == op.result.__name__
        assert sig.parameters["spec"].annotation == f"{op.spec.__name__} | Mapping[str, Any]"


def test_the_client_job_model_matches_the_service_one() -> None:
    jobs = pytest.importorskip("adapter_surgery.jobs", reason="adapter_surgery.jobs is not merged yet")
    # every field the client reads is the service's (a service's extra fields are kept, in model_extra)
    assert set(Job.model_fields) <= set(jobs.Job.model_fields)
    assert set(client_module.JobProgress.model_fields) <= set(jobs.JobProgress.model_fields)
    assert {s.value for s in jobs.JobState} == {s.value for s in JobState}


def test_problem_statuses_map_to_typed_exceptions() -> None:
    def answer(request: httpx.Request) -> httpx.Response:
        status = int(request.url.path.rsplit("/", 1)[-1])
        body = {"type": "about:blank", "title": "T", "status": status, "detail": "d", "field": "f", "fix": "x"}
        return httpx.Response(status, json=body,
                              headers={"Retry-After": "7", "content-type": "application/problem+json"})

    with Client("http://service", transport=httpx.MockTransport(answer)) as c:
        with pytest.raises(QueueFull) as full:
            c.get_job("429")
        assert full.value.retry_after == 7.0 and full.value.status == 429 and full.value.field == "f"
        assert full.value.fix == "x" and full.value.problem["detail"] == "d"
        for status, name in [(401, "Unauthorized"), (403, "PathOutsideDataDir"), (413, "PayloadTooLarge"),
                             (503, "Unavailable"), (507, "InsufficientStorage"), (500, "ServerError")]:
            with pytest.raises(ProblemError) as err:
                c.get_job(str(status))
            assert type(err.value).__name__ == name and err.value.status == status
    cancelled = problem_error({"type": "https://adapter-surgery.dev/problems/Cancelled", "status": 409}, 409)
    assert isinstance(cancelled, Cancelled) and not isinstance(cancelled, OutputExists)
    failed = JobFailed(Job(id="j1", operation="extend-vocab", state=JobState.failed, created_at="2025-01-01T00:00:00Z",
                           problem={"title": "Output exists", "status": 409, "field": "output"}))
    assert isinstance(failed.error, OutputExists) and failed.status == 409 and failed.field == "output"


def test_unreachable_service_is_its_own_error() -> None:
    with Client(f"http://127.0.0.1:{free_port()}") as c, pytest.raises(ServiceUnreachable, match="healthz"):
        c.health()


def test_token_comes_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"status": "ok"})

    monkeypatch.setenv("ADAPTER_SURGERY_API_TOKEN", "from-env")
    for token in (None, "given", ""):
        with Client("http://service", token=token, transport=httpx.MockTransport(answer)) as c:
            c.health()
    assert seen == ["Bearer from-env", "Bearer given", None]


def test_job_protocol_on_a_scripted_service(capsys: pytest.CaptureFixture[str]) -> None:
    """The client's side of the jobs contract (202 + Location, polling, the bar, pages), on scripted answers:
    the real service's side is tested below once it has /jobs."""
    base = {"id": "j1", "operation": "attach-lora", "created_at": "2025-01-01T00:00:00Z"}
    states = iter([("running", "reading rows", 10, 4096), ("running", "rewriting shard 2/2", 3000, 4096),
                   ("succeeded", "done", 4096, 4096)])
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        if request.method == "POST":
            assert request.headers["prefer"] == "respond-async"
            job = base | {"state": "queued", "progress": {"fraction": 0, "stage": "queued", "done": 0, "total": 0,
                                                         "unit": "bytes"}}
            return httpx.Response(202, json=job, headers={"Location": "/jobs/j1"})
        if request.url.path == "/jobs":
            cursor = request.url.params.get("cursor")
            page = {"jobs": [base | {"id": cursor or "j1", "state": "succeeded"}],
                    "next_cursor": None if cursor else "j0"}
            return httpx.Response(200, json=page)
        state, stage, done, total = next(states)
        return httpx.Response(200, json=base | {"state": state, "progress": {
            "fraction": done / total, "stage": stage, "done": done, "total": total, "unit": "bytes"},
            "result": {"output": "lora"} if state == "succeeded" else None})

    with Client("http://service", transport=httpx.MockTransport(answer)) as c:
        job = c.submit("attach-lora", {"checkpoint": "a", "output": "lora"})
        assert job.state == JobState.queued and json.loads(seen[0].content) == {"checkpoint": "a", "output": "lora"}
        capsys.readouterr()
        done = c.wait(job, progress=True, poll=0)
        err = capsys.readouterr().err
        assert done.state == JobState.succeeded and done.result == {"output": "lora"}
        assert "rewriting shard 2/2" in err and "4.00k" in err  # the stage, and the total in bytes (KiB)
        assert [r.url.path for r in seen[1:]] == ["/jobs/j1"] * 3
        assert [j.id for j in c.iter_jobs(page_size=1)] == ["j1", "j0"]
        assert seen[-1].url.params["cursor"] == "j0" and seen[-1].url.params["limit"] == "1"


def test_wait_raises_for_failure_and_timeout() -> None:
    job = {"id": "j2", "operation": "verify", "created_at": "2025-01-01T00:00:00Z", "state": "running"}
    failed = job | {"state": "failed", "problem": {"type": "about:blank", "title": "Not enough memory",
                                                   "status": 503, "detail": "needs 17 GiB"}}

    def answer(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/jobs/j2":
            return httpx.Response(200, json=job)
        if request.url.path == "/verify":  # a service that ignores Prefer: the result at once
            return httpx.Response(200, json={"checkpoint": "a"})
        return httpx.Response(200, json=failed)

    with Client("http://service", transport=httpx.MockTransport(answer)) as c:
        with pytest.raises(TimeoutError, match="j2 still running"):
            c.wait("j2", progress=False, poll=0.01, timeout=0.05)
        with pytest.raises(JobFailed) as err:
            c.wait("j3", progress=False)
        assert type(err.value.error).__name__ == "Unavailable" and err.value.status == 503
        assert c.wait("j3", progress=False, raise_on_failure=False).state == JobState.failed
        sync = c.submit("verify", {"checkpoint": "a", "patched": "b"})
        assert sync.state == JobState.succeeded and sync.result == {"checkpoint": "a"} and sync.id == ""
        assert c.wait(sync) is sync


# --- synchronous operations and problems, against the real service ---------------------------------------------

def test_every_operation_returns_its_result_model(client: Client, server: Server) -> None:
    before = tree_digest(server.data_dir / "llama-untied-tiny")
    ev = client.extend_vocab({"checkpoint": "llama-untied-tiny", "output": "c-ev", "tokens": ["<a>", "hello"]})
    assert isinstance(ev, ExtendVocabResult)
    assert ev.added[0].token == "<a>" and ev.added[0].id == 128 and ev.vocab_size_after == 129
    assert tensors(server.data_dir / "c-ev")["model.embed_tokens.weight"].shape == (129, 32)

    report = client.verify({"checkpoint": "llama-untied-tiny", "patched": "c-ev"})
    assert type(report).__name__ == "VerifyResult" and report.report.passed is True

    lora = client.attach_lora(AttachLoraSpec(checkpoint="c-ev", output="c-lora", r=4, target_modules=["q_proj"]))
    assert isinstance(lora, AttachLoraResult) and {t.r for t in lora.target_modules} == {4}
    assert {t.name.rsplit(".", 1)[-1] for t in lora.target_modules} == {"q_proj"}
    assert (server.data_dir / "c-lora" / "adapter_model.safetensors").exists()

    head = client.attach_head({"checkpoint": "llama-untied-tiny", "output": "c-head", "num_labels": 3})
    assert type(head).__name__ == "AttachHeadResult"
    assert tensors(server.data_dir / "c-head")["score.weight"].shape == (3, 32)

    both = client.surgery({"checkpoint": "llama-untied-tiny", "output": "c-surgery",
                           "steps": [{"op": "extend-vocab", "tokens": ["<b>"]}, {"op": "attach-head", "num_labels": 2,
                                                                                 "pad_token": "add"}]})
    assert type(both).__name__ == "SurgeryResult" and (server.data_dir / "c-surgery" / "config.json").exists()
    assert tree_digest(server.data_dir / "llama-untied-tiny") == before


def test_problems_from_the_service_are_typed(client: Client, server: Server) -> None:
    with pytest.raises(NotFound) as missing:
        client.extend_vocab({"checkpoint": "no-such-model", "output": "p-out", "tokens": ["<a>"]})
    assert missing.value.status == 404 and missing.value.field == "checkpoint" and missing.value.problem["detail"]

    with pytest.raises(PathOutsideDataDir) as outside:
        client.attach_head({"checkpoint": "../etc", "output": "p-out", "num_labels": 2})
    assert outside.value.field == "checkpoint"

    client.extend_vocab({"checkpoint": "llama-untied-tiny", "output": "p-twice", "tokens": ["<a>"]})
    with pytest.raises(OutputExists) as exists:
        client.extend_vocab({"checkpoint": "llama-untied-tiny", "output": "p-twice", "tokens": ["<b>"]})
    assert exists.value.status == 409 and exists.value.field == "output" and exists.value.fix

    # the service's own 422 (run() sends the dict as it is), and the same answer before sending (typed methods)
    with pytest.raises(InvalidRequest) as served:
        client.run("attach_lora", {"checkpoint": "llama-untied-tiny", "output": "p-l", "r": "four"})
    with pytest.raises(InvalidRequest) as local:
        client.attach_lora({"checkpoint": "llama-untied-tiny", "output": "p-l", "r": "four"})
    assert served.value.field == local.value.field == "r"
    assert served.value.problem["errors"] == local.value.problem["errors"]
    assert local.value.problem["errors"][0]["type"] == "int_type"  # strict: a string is no integer

    with pytest.raises(InvalidRequest) as checked:  # refused by the operation, not the schema
        client.attach_lora({"checkpoint": "llama-untied-tiny", "output": "p-l", "target_modules": ["nothing_like"]})
    assert checked.value.field.startswith("target_modules") and "q_proj" in checked.value.problem["detail"]
    assert not (server.data_dir / "p-out").exists() and not (server.data_dir / "p-l").exists()
    with pytest.raises(ValueError, match="unknown operation"):
        client.run("merge", {})


def test_upload_streams_the_answer_to_disk(client: Client, server: Server, tmp_path: Path) -> None:
    src = tmp_path / "gpt2.safetensors"
    src.write_bytes((server.data_dir / "gpt2-tied-tiny" / "model.safetensors").read_bytes())
    path, result = client.upload("extend-vocab", src, {"num_new_tokens": 2})
    assert path == tmp_path / "gpt2.extend-vocab.safetensors"
    assert load_file(str(path))["transformer.wte.weight"].shape == (102, 32) and result["vocab_size_after"] == 102
    with pytest.raises(FileExistsError):
        client.upload("extend-vocab", src, {"num_new_tokens": 2})
    path2, _ = client.upload("extend-vocab", src, {"num_new_tokens": 3}, overwrite=True)
    assert path2 == path and load_file(str(path))["transformer.wte.weight"].shape == (103, 32)

    archive = tmp_path / "llama.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        for f in (server.data_dir / "llama-untied-tiny").iterdir():
            zf.write(f, f.name)
    out, result = client.upload("attach-head", archive, {"num_labels": 2}, tmp_path / "answers" / "head.zip")
    with zipfile.ZipFile(out) as zf:
        assert len(json.loads(zf.read("config.json"))["id2label"]) == 2
    assert result["output"] and sorted(p.name for p in (tmp_path / "answers").iterdir()) == ["head.zip"]

    with pytest.raises(InvalidRequest) as bad:
        client.upload("extend-vocab", src, {"num_new_tokens": 2, "colour": "red"}, tmp_path / "bad.safetensors")
    assert bad.value.field == "spec.colour" and not (tmp_path / "bad.safetensors").exists()


# --- the CLI with --server ----------------------------------------------------------------------------------------

def test_cli_runs_on_the_server(server: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"checkpoint": "llama-untied-tiny", "output": "cli-out", "tokens": ["<a>"]}))
    capsys.readouterr()
    assert main(["extend-vocab", "--spec", str(spec), "--server", server.url]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["added"] == [{"token": "<a>", "id": 128}] and (server.data_dir / "cli-out" / "config.json").exists()
    assert not (tmp_path / "cli-out").exists()  # written by the service, under its data directory

    assert main(["extend-vocab", "--spec", str(spec), "--server", server.url]) == 2  # exists now
    captured = capsys.readouterr()
    assert captured.out == "" and json.loads(captured.err)["status"] == 409

    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"checkpoint": "llama-untied-tiny", "output": "x",
                                                              "tokens": "<a>", "extra": 1})))
    assert main(["extend-vocab", "--spec", "-", "--server", server.url]) == 2
    problem = json.loads(capsys.readouterr().err)
    assert problem["status"] == 422 and "extra" in {e["field"] for e in problem["errors"]}

    monkeypatch.setattr(sys, "stdin", io.StringIO("[1, 2"))
    assert main(["attach-lora", "--spec", "-", "--server", server.url]) == 2
    assert json.loads(capsys.readouterr().err)["field"] == "--spec"

    assert main(["verify", "--spec", str(spec), "--server", f"http://127.0.0.1:{free_port()}"]) == 1
    assert json.loads(capsys.readouterr().err)["title"] == "Service unreachable"

    assert main(["extend-vocab", "--spec", str(spec), "--async"]) == 2
    assert json.loads(capsys.readouterr().err)["field"] == "--async"


# --- jobs (the contract of issue 8; skipped until the service has /jobs) ------------------------------------------

def test_submit_wait_and_list(jobs_api: Client, server: Server, capsys: pytest.CaptureFixture[str]) -> None:
    job = jobs_api.submit("extend_vocab", {"checkpoint": "llama-untied-tiny", "output": "j-out", "tokens": ["<a>"]})
    assert job.id and job.operation == "extend-vocab" and job.state in {JobState.queued, JobState.running}
    capsys.readouterr()
    done = jobs_api.wait(job.id, progress=True, poll=0.05, timeout=120)
    err = capsys.readouterr().err
    assert done.state == JobState.succeeded and done.result is not None
    assert done.result["added"] == [{"token": "<a>", "id": 128}] and (server.data_dir / "j-out").is_dir()
    assert done.progress.total > 0 and done.progress.done == done.progress.total and done.progress.fraction == 1.0
    assert done.progress.stage and done.progress.stage in err
    assert done.created_at <= done.started_at <= done.finished_at  # type: ignore[operator]

    assert jobs_api.get_job(job.id) == done
    page = jobs_api.list_jobs(state="succeeded", limit=50)
    assert job.id in [j.id for j in page.jobs] and all(j.state == JobState.succeeded for j in page.jobs)
    newest = jobs_api.list_jobs(limit=1)
    assert len(newest.jobs) == 1 and newest.jobs[0].created_at >= done.created_at
    if newest.next_cursor:
        following = jobs_api.list_jobs(limit=1, cursor=newest.next_cursor)
        assert following.jobs and following.jobs[0].id != newest.jobs[0].id
    assert job.id in {j.id for j in jobs_api.iter_jobs(page_size=1)}
    with pytest.raises(NotFound):
        jobs_api.get_job("0" * 32)  # well-formed, unknown


def test_a_failed_job_raises_its_typed_problem(jobs_api: Client, server: Server) -> None:
    spec = {"checkpoint": "llama-untied-tiny", "output": "j-twice", "tokens": ["<a>"]}
    jobs_api.wait(jobs_api.submit("extend-vocab", spec), progress=False, poll=0.05, timeout=120)
    try:
        job = jobs_api.submit("extend-vocab", spec)
    except OutputExists:  # the service may check the output before queuing
        return
    with pytest.raises(JobFailed) as failed:
        jobs_api.wait(job, progress=False, poll=0.05, timeout=120)
    assert isinstance(failed.value.error, OutputExists) and failed.value.field == "output"
    assert failed.value.job.state == JobState.failed and failed.value.job.finished_at is not None
    assert jobs_api.wait(job.id, progress=False, raise_on_failure=False).problem == failed.value.problem


def test_cancel(jobs_api: Client, server: Server) -> None:
    # one worker: the last of three jobs is still queued when it is cancelled (or, at worst, already done)
    jobs = [jobs_api.submit("attach-head", {"checkpoint": "llama-untied-tiny", "output": f"j-c{i}", "num_labels": 2})
            for i in range(3)]
    answer = jobs_api.cancel(jobs[-1].id)
    assert answer.id == jobs[-1].id and answer.state in {JobState.cancelled, JobState.succeeded}
    final = jobs_api.wait(answer, progress=False, poll=0.05, timeout=120)
    assert final.state == answer.state and final.finished_at is not None
    if final.state == JobState.cancelled:
        assert not (server.data_dir / "j-c2").exists()
        assert final.id in {j.id for j in jobs_api.list_jobs(state="cancelled", limit=100).jobs}
    assert jobs_api.cancel(final.id).state == final.state  # a finished job is unchanged
    for job in jobs[:-1]:
        assert jobs_api.wait(job.id, progress=False, poll=0.05, timeout=120).state == JobState.succeeded


def test_cli_async_and_jobs_commands(jobs_api: Client, server: Server, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"checkpoint": "bert-mlm-tiny", "output": "j-cli", "tokens": ["<a>"]}))
    capsys.readouterr()
    assert main(["extend-vocab", "--spec", str(spec), "--server", server.url, "--async"]) == 0
    job = Job.model_validate_json(capsys.readouterr().out)
    assert job.operation == "extend-vocab" and job.state in {JobState.queued, JobState.running}
    assert main(["jobs", "wait", job.id, "--server", server.url]) == 0
    assert Job.model_validate_json(capsys.readouterr().out).result["added"][0]["id"] == 100  # type: ignore[index]
    assert main(["jobs", "get", job.id, "--server", server.url]) == 0
    assert Job.model_validate_json(capsys.readouterr().out).state == JobState.succeeded
    assert main(["jobs", "list", "--server", server.url, "--state", "succeeded", "--limit", "100"]) == 0
    assert job.id in [j["id"] for j in json.loads(capsys.readouterr().out)["jobs"]]
    assert main(["jobs", "cancel", job.id, "--server", server.url]) == 0
    assert Job.model_validate_json(capsys.readouterr().out).state == JobState.succeeded
    assert main(["jobs", "get", "0" * 32, "--server", server.url]) == 2
    assert json.loads(capsys.readouterr().err)["status"] == 404


# --- the token (skipped until the service has authentication) ------------------------------------------------------

def test_token(tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    srv = Server(data, tmp_path / "server.log", ADAPTER_SURGERY_API_TOKEN=TOKEN)
    try:
        spec = {"checkpoint": "missing", "output": "o", "tokens": ["<a>"]}
        if httpx.post(f"{srv.url}/extend-vocab", json=spec, timeout=30).status_code != 401:
            pytest.skip("the service has no authentication yet (the http branch is not merged)")
        monkeypatch.delenv("ADAPTER_SURGERY_API_TOKEN", raising=False)
        with Client(srv.url) as anonymous, pytest.raises(Unauthorized) as refused:
            anonymous.run("extend-vocab", spec)
        assert refused.value.status == 401
        with Client(srv.url, token="wrong") as wrong, pytest.raises(Unauthorized):
            wrong.run("extend-vocab", spec)
        with Client(srv.url, token=TOKEN) as good, pytest.raises(NotFound):  # past the door: the checkpoint
            good.run("extend-vocab", spec)
        monkeypatch.setenv("ADAPTER_SURGERY_API_TOKEN", TOKEN)
        with Client(srv.url) as from_env, pytest.raises(NotFound):
            from_env.run("extend-vocab", spec)
        monkeypatch.delenv("ADAPTER_SURGERY_API_TOKEN")
        (tmp_path / "spec.json").write_text(json.dumps(spec))
        capsys.readouterr()
        assert main(["extend-vocab", "--spec", str(tmp_path / "spec.json"), "--server", srv.url]) == 2
        assert json.loads(capsys.readouterr().err)["status"] == 401
        assert main(["extend-vocab", "--spec", str(tmp_path / "spec.json"), "--server", srv.url,
                     "--token", TOKEN]) == 2
        assert json.loads(capsys.readouterr().err)["status"] == 404
    finally:
        srv.stop()
