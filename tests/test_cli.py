"""The CLI takes the endpoint's JSON, prints the same result JSON, and exits 2 with a problem for bad input."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

from adapter_surgery.cli import main


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
