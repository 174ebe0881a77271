"""The OpenAPI document: valid for a standard validator, complete for client generators, and committed."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import pytest
from fastapi.testclient import TestClient
from openapi_spec_validator import validate

from adapter_surgery.api.app import RESULT_HEADER, create_app
from adapter_surgery.api.openapi import BINARY_TYPES, form_example, json_example, takes_upload
from adapter_surgery.ops import OPERATIONS
from adapter_surgery.settings import Settings

COMMITTED = Path(__file__).resolve().parents[2] / "openapi" / "openapi.json"
STATUSES = {"200", "202", "400", "401", "403", "404", "405", "409", "413", "415", "422", "429", "503", "507"}


@pytest.fixture(scope="module")
def doc(tmp_path_factory: pytest.TempPathFactory) -> dict:
    return create_app(Settings(data_dir=tmp_path_factory.mktemp("data"))).openapi()


def _post(doc: dict, name: str) -> dict:
    return doc["paths"][f"/{name}"]["post"]


def _resolve(doc: dict, schema: dict) -> dict:
    """A JSON Schema for ``jsonschema`` with the document's components reachable by their refs."""
    return {**schema, "components": doc["components"]}


def test_the_document_is_valid_openapi(doc: dict) -> None:
    validate(doc)  # openapi-spec-validator: the OpenAPI 3.1 schema plus its semantic checks
    assert doc["openapi"].startswith("3.1")


def test_the_committed_document_is_the_generated_one(doc: dict) -> None:
    assert json.loads(COMMITTED.read_text()) == doc, "openapi/openapi.json is stale: run `make openapi`"


def test_operation_ids_and_tags(doc: dict) -> None:
    ids = {(path, method): op["operationId"] for path, item in doc["paths"].items() for method, op in item.items()}
    assert len(set(ids.values())) == len(ids)
    for name in OPERATIONS:
        assert ids[(f"/{name}", "post")] == name.replace("-", "_")  # what generators use as the method name
        assert _post(doc, name)["tags"] == ["operations"]
    assert ids[("/healthz", "get")] == "healthz" and doc["paths"]["/healthz"]["get"]["tags"] == ["service"]
    assert {t["name"] for t in doc["tags"]} == {"operations", "jobs", "service"}
    used = {t for item in doc["paths"].values() for op in item.values() for t in op["tags"]}
    assert used <= {t["name"] for t in doc["tags"]}


def test_no_fastapi_validation_boilerplate(doc: dict) -> None:
    text = json.dumps(doc)
    assert "HTTPValidationError" not in text and '"ValidationError"' not in text


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_every_status_the_server_answers_is_declared_with_a_problem(doc: dict, name: str) -> None:
    answers = _post(doc, name)["responses"]
    assert set(answers) == STATUSES
    for status in STATUSES - {"200", "202"}:
        assert answers[status]["content"] == {
            "application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}}, status
    assert answers["429"]["headers"]["Retry-After"]["schema"]["type"] == "integer"
    assert answers["401"]["headers"]["WWW-Authenticate"]["required"] is True
    assert answers["405"]["headers"]["Allow"]["required"] is True
    accepted = answers["202"]
    assert accepted["content"]["application/json"]["schema"] == {"$ref": "#/components/schemas/Job"}
    assert accepted["headers"]["Location"]["required"] is True
    assert "Job" in doc["components"]["schemas"]
    prefer = [p for p in _post(doc, name)["parameters"] if p["name"] == "Prefer"]
    assert prefer == [{"name": "Prefer", "in": "header", "required": False, "schema": {"type": "string"},
                       "example": "respond-async", "description": prefer[0]["description"]}]


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_json_and_binary_answers(doc: dict, name: str) -> None:
    op = OPERATIONS[name]
    ok = _post(doc, name)["responses"]["200"]
    assert ok["content"]["application/json"]["schema"] == {"$ref": f"#/components/schemas/{op.result.__name__}"}
    if takes_upload(op):
        for media in BINARY_TYPES:
            assert ok["content"][media]["schema"] == {"type": "string", "format": "binary"}
        assert ok["headers"][RESULT_HEADER]["schema"] == {"type": "string"}
    else:
        assert set(ok["content"]) == {"application/json"}


@pytest.mark.parametrize("name", list(OPERATIONS))
def test_request_bodies_have_the_readme_examples_and_they_are_valid(doc: dict, name: str) -> None:
    op = OPERATIONS[name]
    content = _post(doc, name)["requestBody"]["content"]
    example = content["application/json"]["examples"]["readme"]["value"]
    assert example == json_example(op)
    op.spec.model_validate(example)  # the server's own validation accepts it
    jsonschema.validate(example, _resolve(doc, content["application/json"]["schema"]))
    if not takes_upload(op):
        assert set(content) == {"application/json"}
        return
    form = content["multipart/form-data"]
    assert form["encoding"] == {"spec": {"contentType": "application/json"}}
    assert form["schema"]["properties"]["spec"]["$ref"] == f"#/components/schemas/{op.options.__name__}"
    assert form["schema"]["properties"]["file"] == {
        "type": "string", "format": "binary", "description": form["schema"]["properties"]["file"]["description"]}
    value = form["examples"]["readme"]["value"]
    assert value["spec"] == form_example(op)
    op.options.model_validate(value["spec"])
    jsonschema.validate(value, _resolve(doc, form["schema"]))


def test_constraints_of_the_specs_are_in_the_schema(doc: dict) -> None:
    schemas = doc["components"]["schemas"]
    probes = schemas["VerifySpec"]["properties"]
    assert (probes["num_probes"]["minimum"], probes["num_probes"]["maximum"]) == (1, 64)
    assert (probes["probe_length"]["minimum"], probes["probe_length"]["maximum"]) == (2, 1024)
    assert probes["text"]["anyOf"][0]["maxLength"] == 20_000
    vocab = schemas["ExtendVocabSpec"]["properties"]
    assert vocab["pad_to_multiple_of"]["anyOf"][0]["maximum"] == 65536
    assert vocab["num_new_tokens"]["anyOf"][0]["maximum"] == vocab["tokens"]["maxItems"] == 2**20
    assert schemas["ExtendVocabSpec"]["additionalProperties"] is False
    assert schemas["SurgerySpec"]["properties"]["steps"]["minItems"] == 1
    too_many = {**json_example(OPERATIONS["verify"]), "num_probes": 65}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(too_many, _resolve(doc, {"$ref": "#/components/schemas/VerifySpec"}))


def test_bearer_security_everywhere_but_the_probes(doc: dict) -> None:
    assert doc["components"]["securitySchemes"]["bearerAuth"] == {
        "type": "http", "scheme": "bearer",
        "description": doc["components"]["securitySchemes"]["bearerAuth"]["description"]}
    assert doc["security"] == [{"bearerAuth": []}, {}]
    for path, item in doc["paths"].items():
        for op in item.values():
            if path in ("/healthz", "/readyz"):
                assert op["security"] == [] and "401" not in op["responses"]
            else:
                assert "security" not in op and "401" in op["responses"]


def test_405_carries_allow_and_verify_refuses_the_form(tmp_path: Path) -> None:
    client = TestClient(create_app(Settings(data_dir=tmp_path)), raise_server_exceptions=False)
    r = client.get("/extend-vocab")
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.headers["content-type"] == "application/problem+json"
    r = client.post("/verify", files={"file": ("m.safetensors", b"x")})
    assert r.status_code == 415 and "application/json only" in r.json()["detail"]
