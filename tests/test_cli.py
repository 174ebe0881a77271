"""The CLI takes the endpoint's JSON, prints the same result JSON, and exits 2 with a problem for bad input."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from adapter_surgery.catalog import SUMMARIES
from adapter_surgery.cli import main
from adapter_surgery.ops import OPERATIONS
from tests.jobs.helpers import free_port


def test_extend_vocab_from_a_spec_file(data_dir: Path, build, capsys: pytest.CaptureFixture[str]) -> None:
    src = build("FX-B")
    spec = data_dir / "spec.json"
    spec.write_text(json.dumps({"checkpoint": src, "output": "out", "tokens": ["<a>"]}))
    assert main(["extend-vocab", "--spec", str(spec), "--data-dir", str(data_dir)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["added"] == [{"token": "<a>", "id": 128}] and result["vocab_size_after"] == 129
    assert (data_dir / "out" / "config.json").exists()


def test_spec_from_stdin_and_bad_input(data_dir: Path, build, capsys: pytest.CaptureFixture[str],
                                       monkeypatch: pytest.MonkeyPatch) -> None:
    src = build("FX-B")
    capsys.readouterr()
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"checkpoint": src, "output": "o", "tokens": "x"})))
    assert main(["extend-vocab", "--spec", "-", "--data-dir", str(data_dir)]) == 2
    problem = json.loads(capsys.readouterr().err)
    assert problem["status"] == 422 and problem["errors"][0]["field"].startswith("tokens")
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"checkpoint": "../x", "output": "o", "tokens": []})))
    assert main(["extend-vocab", "--spec", "-", "--data-dir", str(data_dir)]) == 2
    problem = json.loads(capsys.readouterr().err)
    assert problem["status"] == 403 and problem["field"] == "checkpoint"
    assert not (data_dir / "o").exists()
    # a mistyped --data-dir is named as such (it read "checkpoint ... does not exist")
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps({"checkpoint": src, "output": "o", "tokens": ["<a>"]})))
    assert main(["extend-vocab", "--spec", "-", "--data-dir", str(data_dir / "missing")]) == 2
    problem = json.loads(capsys.readouterr().err)
    assert problem["field"] == "--data-dir" and "is not a directory" in problem["detail"]


def test_openapi_file_is_in_sync(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["openapi"]) == 0
    generated = json.loads(capsys.readouterr().out)
    committed = json.loads((Path(__file__).parent.parent / "openapi" / "openapi.json").read_text())
    assert generated == committed, "openapi/openapi.json is stale: run `make openapi`"


def test_unreadable_spec_is_a_problem_not_a_traceback(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["extend-vocab", "--spec", str(tmp_path / "missing.json"), "--data-dir", str(tmp_path)]) == 2
    problem = json.loads(capsys.readouterr().err)
    assert problem["field"] == "--spec" and "Traceback" not in json.dumps(problem)
    (tmp_path / "latin1.json").write_bytes(b"{\"tokens\": [\"\xe9\"]}")
    assert main(["extend-vocab", "--spec", str(tmp_path / "latin1.json"), "--data-dir", str(tmp_path)]) == 2
    assert json.loads(capsys.readouterr().err)["status"] == 422


HEAVY = ("torch", "transformers", "peft", "safetensors", "fastapi", "huey", "httpx")


def _modules_after(argv: list[str]) -> tuple[int, list[str], str]:
    """Run the CLI with ``argv`` in a fresh interpreter; its exit code, the heavy modules it imported, stdout."""
    code = ("import runpy, sys\n"
            f"sys.argv = ['adapter-surgery', *{argv!r}]\n"
            "try:\n    runpy.run_module('adapter_surgery.cli', run_name='__main__')\n"
            "except SystemExit as e:\n    rc = e.code\n"
            f"print('MODULES', sorted(m for m in {HEAVY!r} if m in sys.modules), rc)\n")
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": str(root / "service")}).stdout
    tail = out.rsplit("MODULES ", 1)[1].split()
    return int(tail[-1]), [m.strip("[]',") for m in tail[:-1] if m.strip("[]',")], out


@pytest.mark.parametrize("argv", [["--help"], ["extend-vocab", "--help"], ["jobs", "list", "--help"]])
def test_help_imports_no_heavy_library(argv: list[str]) -> None:
    rc, heavy, out = _modules_after(argv)
    assert rc == 0 and heavy == [] and "usage: adapter-surgery" in out
    if argv == ["--help"]:
        assert all(name in out for name in OPERATIONS)


def test_the_remote_path_imports_no_torch(tmp_path: Path) -> None:
    spec = tmp_path / "spec.json"
    spec.write_text("{}")
    # no service listens on port 9 (discard): the client's "unreachable" problem, exit 1, and torch never imported
    rc, heavy, _ = _modules_after(["extend-vocab", "--spec", str(spec), "--server", "http://127.0.0.1:9"])
    assert rc == 1 and "torch" not in heavy and "httpx" in heavy


def test_the_catalog_agrees_with_the_operations() -> None:
    from adapter_surgery.cli_remote import JOB_STATES, TOKEN_ENV
    from adapter_surgery.client import TOKEN_ENV as CLIENT_TOKEN_ENV
    from adapter_surgery.client import JobState

    assert list(SUMMARIES) == list(OPERATIONS)
    assert {n: op.summary for n, op in OPERATIONS.items()} == SUMMARIES
    assert TOKEN_ENV == CLIENT_TOKEN_ENV and tuple(s.value for s in JobState) == JOB_STATES


def test_a_local_operation_imports_no_job_queue(tmp_path: Path) -> None:
    """A CLI run needs only the operation: the job queue (huey, redis, the job store) stays unimported."""
    spec = tmp_path / "spec.json"
    spec.write_text(json.dumps({"checkpoint": "missing", "output": "out", "r": 4}))
    rc, heavy, out = _modules_after(["attach-lora", "--spec", str(spec), "--data-dir", str(tmp_path)])
    assert rc == 2 and "torch" in heavy and "huey" not in heavy, out


@pytest.mark.parametrize("command", ["worker", "serve"])
def test_an_unreachable_job_store_is_one_problem_not_a_traceback(command: str, tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch,
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("ADAPTER_SURGERY_QUEUE_URL", f"redis://127.0.0.1:{free_port()}/0")  # nothing listens
    # serve points the root logger at this test's captured stderr: later tests' records would meet a closed stream
    monkeypatch.setattr("adapter_surgery.logs.configure_logging", lambda *a, **k: None)
    argv = [command, "--data-dir", str(tmp_path)] + (["--port", str(free_port())] if command == "serve" else [])
    assert main(argv) == 1
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    problem = json.loads(err)
    assert problem["title"] == "Job store unavailable" and "cannot be reached" in problem["detail"]
