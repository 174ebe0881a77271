"""Errors name request paths as the request gave them, relative to the data directory: "output 'sub' overlaps the
input checkpoint 'llama-untied-tiny'" for output llama-untied-tiny/sub, "'ev1'" for checkpoint out/ev1; never the
server's absolute data-directory path."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapter_surgery.api.app import create_app
from adapter_surgery.settings import Settings


@pytest.fixture
def client(data_dir: Path, build) -> TestClient:
    build("FX-B")
    (data_dir / "out").mkdir()
    (data_dir / "a-file").write_text("x")
    with TestClient(create_app(Settings(data_dir=data_dir)), raise_server_exceptions=False) as c:
        yield c


@pytest.mark.parametrize(("body", "status", "words"), [
    ({"checkpoint": "llama-untied-tiny", "output": "llama-untied-tiny/sub"}, 422,
     ["output 'llama-untied-tiny/sub'", "checkpoint 'llama-untied-tiny'"]),
    ({"checkpoint": "out/ev1", "output": "x"}, 404, ["checkpoint 'out/ev1'"]),
    ({"checkpoint": "llama-untied-tiny", "output": "a-file/x"}, 422, ["output 'a-file/x'", "'a-file'"]),
    ({"checkpoint": "llama-untied-tiny", "output": "out"}, 409, ["output 'out'"]),
], ids=["overlap", "missing", "under-a-file", "exists"])
def test_messages_name_the_request_s_relative_paths(client: TestClient, data_dir: Path, body: dict, status: int,
                                                     words: list[str]) -> None:
    r = client.post("/extend-vocab", json={**body, "tokens": ["<a>"]})
    assert r.status_code == status, r.text
    text = r.json()["detail"] + r.json().get("fix", "")
    assert all(w in text for w in words), text
    assert str(data_dir) not in text and str(data_dir.resolve()) not in text


def test_an_adapter_is_named_by_its_relative_path(client: TestClient, data_dir: Path, build) -> None:
    """merge-lora and convert-adapter named an adapter at ads/plain 'plain'."""
    build("FX-A")
    r = client.post("/attach-lora", json={"checkpoint": "llama-untied-tiny", "output": "ads/plain", "r": 2})
    assert r.status_code == 200, r.text
    r = client.post("/merge-lora", json={"checkpoint": "gpt2-tied-tiny", "output": "merged",
                                         "adapters": [{"path": "ads/plain"}]})
    assert r.status_code == 422 and r.json()["field"] == "adapters.0.path", r.text
    assert "adapter 'ads/plain' does not fit" in r.json()["detail"] and str(data_dir) not in r.json()["detail"]
