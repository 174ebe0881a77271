"""The optional bearer token: every route but the probes requires it, compared in constant time."""

from __future__ import annotations

import hmac
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapter_surgery.api.app import create_app
from adapter_surgery.settings import Settings

TOKEN = "s3cret-token-ABC"


@pytest.fixture
def client(data_dir: Path) -> TestClient:
    return TestClient(create_app(Settings(data_dir=data_dir, api_token=TOKEN)), raise_server_exceptions=False)


def assert_unauthorized(r) -> None:
    assert r.status_code == 401, r.text
    assert r.headers["www-authenticate"] == "Bearer"
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == 401 and body["title"] == "Unauthorized" and body["field"] == "Authorization"
    assert "Bearer" in body["fix"]


@pytest.mark.parametrize("auth", [None, "Bearer wrong", f"Basic {TOKEN}", f"Bearer {TOKEN}x", "Bearer", "",
                                  f"Bearer {TOKEN[:-1]}"])
def test_every_route_but_the_probes_needs_the_token(client: TestClient, build, auth: str | None) -> None:
    headers = {} if auth is None else {"Authorization": auth}
    src = build("FX-B")
    for method, path in [("POST", "/extend-vocab"), ("POST", "/attach-lora"), ("GET", "/metrics"),
                         ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/no-such-route")]:
        r = client.request(method, path, headers=headers, json={"checkpoint": src, "output": "o", "tokens": ["<a>"]})
        assert_unauthorized(r)
    assert client.get("/healthz", headers=headers).status_code == 200
    assert client.get("/readyz", headers=headers).status_code == 200


def test_the_token_opens_every_route(client: TestClient, data_dir: Path, build) -> None:
    src = build("FX-B")
    ok = {"Authorization": f"Bearer {TOKEN}"}
    r = client.post("/extend-vocab", headers=ok, json={"checkpoint": src, "output": "o", "tokens": ["<a>"]})
    assert r.status_code == 200, r.text
    assert r.json()["vocab_size_after"] == 129 and (data_dir / "o" / "config.json").is_file()
    assert client.get("/metrics", headers={"authorization": f"bearer {TOKEN}"}).status_code == 200  # scheme: any case
    assert client.get("/openapi.json", headers=ok).json()["openapi"].startswith("3.")
    assert client.get("/no-such-route", headers=ok).status_code == 404


def test_refused_upload_is_not_read(client: TestClient, data_dir: Path) -> None:
    pulled = []

    def body():
        for i in range(100):
            pulled.append(i)
            yield b"x" * 65536

    r = client.post("/extend-vocab", content=body(), headers={"content-type": "multipart/form-data; boundary=b"})
    assert_unauthorized(r)
    assert pulled == [] and not (data_dir / ".adapter-surgery" / "scratch").exists()


def test_the_comparison_is_constant_time(client: TestClient, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[bytes, bytes]] = []
    real = hmac.compare_digest

    def spy(a: bytes, b: bytes) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", spy)
    assert client.get("/metrics", headers={"Authorization": "Bearer nope"}).status_code == 401
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert calls == [(b"nope", TOKEN.encode()), (TOKEN.encode(), TOKEN.encode())]


def test_token_file_with_trailing_newline(data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    secret = tmp_path / "token"
    secret.write_text(TOKEN + "\n")
    monkeypatch.setenv("ADAPTER_SURGERY_API_TOKEN_FILE", str(secret))
    monkeypatch.setenv("ADAPTER_SURGERY_DATA_DIR", str(data_dir))
    client = TestClient(create_app())
    assert client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).status_code == 200
    assert_unauthorized(client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN}\\n"}))
    assert_unauthorized(client.get("/metrics"))


def test_no_token_configured_means_open(data_dir: Path) -> None:
    client = TestClient(create_app(Settings(data_dir=data_dir)))
    assert client.get("/metrics").status_code == 200


@pytest.mark.parametrize("case", ["empty_file", "missing_file", "both", "blank"])
def test_unusable_token_settings_refuse_to_start(data_dir: Path, tmp_path: Path, case: str) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    settings = {"empty_file": {"api_token_file": empty}, "missing_file": {"api_token_file": tmp_path / "nope"},
                "both": {"api_token": TOKEN, "api_token_file": empty}, "blank": {"api_token": "  "}}[case]
    with pytest.raises(ValueError, match=r"(?i)token"):
        create_app(Settings(data_dir=data_dir, **settings))


@pytest.mark.parametrize(("token", "match"), [("pässwort", "non-ASCII"), ("tok\u00a0en", "non-ASCII"),
                                            ("tok\ten", "non-printable"), ("tok\x7fen", "non-printable"),
                                            (" token", "whitespace")])
def test_tokens_no_client_can_send_refuse_to_start(data_dir: Path, tmp_path: Path, token: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        create_app(Settings(data_dir=data_dir, api_token=token))
    path = tmp_path / "token"
    path.write_text(token + "\n", encoding="utf-8")
    with pytest.raises(ValueError, match=match):
        create_app(Settings(data_dir=data_dir, api_token_file=path))


def test_printable_ascii_token_with_inner_space_authenticates(data_dir: Path) -> None:
    token = "s3cret with ~!@#$%^&*() inside"
    client = TestClient(create_app(Settings(data_dir=data_dir, api_token=token)))
    assert client.get("/jobs", headers={"Authorization": f"Bearer {token}"}).status_code == 200
    assert client.get("/jobs", headers={"Authorization": "Bearer s3cret"}).status_code == 401


def test_openapi_declares_the_bearer_scheme(client: TestClient) -> None:
    doc = client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer", "description": doc["components"]["securitySchemes"]["bearerAuth"][
            "description"]}
    assert doc["security"] == [{"bearerAuth": []}, {}]
    assert doc["paths"]["/healthz"]["get"]["security"] == [] and doc["paths"]["/readyz"]["get"]["security"] == []
    assert "security" not in doc["paths"]["/extend-vocab"]["post"]  # the document-wide requirement applies
