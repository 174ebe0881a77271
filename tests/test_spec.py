"""Request types: booleans and integers are strict (``"r": true`` made r=1; ``"r": "4"``, ``"use_dora": "yes"``,
``"use_rslora": 1``, ``"overwrite": "on"``, ``"num_labels": "2"`` were accepted), in every operation's model, the
surgery steps and the upload form; JSON numbers stay integers (``4``, not ``4.0``)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from adapter_surgery.api.app import create_app
from adapter_surgery.errors import field_errors
from adapter_surgery.ops import OPERATIONS
from adapter_surgery.settings import Settings

PATHS = {"checkpoint": "m", "output": "o"}
#: (operation, the request's options, the field a bad value goes to)
FIELDS = [
    ("attach-lora", {}, "r"), ("attach-lora", {}, "use_dora"), ("attach-lora", {}, "use_rslora"),
    ("attach-lora", {}, "seed"), ("attach-lora", {}, "max_lora_rank"), ("attach-lora", {}, "layers_to_transform"),
    ("extend-vocab", {"tokens": ["<a>"]}, "overwrite"), ("extend-vocab", {}, "num_new_tokens"),
    ("extend-vocab", {"tokens": ["<a>"]}, "verify"), ("verify", {}, "num_probes"),
    ("attach-head", {}, "num_labels"), ("expand-blocks", {}, "num_blocks"),
    ("merge-lora", {"adapters": [{"path": "a"}]}, "safe_merge"),
]
BAD = {"bool": [1, 0, "yes", "on", "true", "1", None], "int": [True, "8", 8.0, 8.5, "eight"]}


def _kind(op: str, name: str) -> str:
    schema = json.dumps(OPERATIONS[op].spec.model_json_schema()["properties"][name])
    return "bool" if '"boolean"' in schema else "int"


def _good(kind: str) -> object:
    return True if kind == "bool" else 8


@pytest.mark.parametrize(("op", "options", "name"), FIELDS, ids=[f"{o}-{n}" for o, _, n in FIELDS])
def test_booleans_and_integers_are_strict(op: str, options: dict, name: str) -> None:
    spec = OPERATIONS[op].spec
    paths = {"checkpoint": "m", "patched": "p"} if op == "verify" else PATHS
    kind = _kind(op, name)
    assert getattr(spec.model_validate_json(json.dumps({**paths, **options, name: _good(kind)})), name) \
        in (_good(kind), [_good(kind)])
    for bad in BAD[kind]:
        if bad is None and name in ("max_lora_rank", "num_new_tokens", "num_labels", "num_blocks",
                                    "layers_to_transform"):
            continue  # null means "not given" there
        with pytest.raises(ValidationError) as e:
            spec.model_validate_json(json.dumps({**paths, **options, name: bad}))
        assert field_errors(e.value.errors())[0]["field"] == name, (bad, e.value.errors())


def test_a_surgery_step_and_the_job_record_round_trip() -> None:
    spec = OPERATIONS["surgery"].spec
    with pytest.raises(ValidationError) as e:
        spec.model_validate_json(json.dumps({**PATHS, "steps": [{"op": "attach-lora", "r": True}]}))
    assert field_errors(e.value.errors())[0]["field"] == "steps.0.r"
    ok = spec.model_validate_json(json.dumps({**PATHS, "steps": [
        {"op": "attach-head", "id2label": {"0": "neg", "1": "pos"}}, {"op": "attach-lora", "r": 4}]}))
    # the queue stores model_dump(mode="json") and validates it again in the worker (id2label's keys: strings)
    assert spec.model_validate(ok.model_dump(mode="json")) == ok


def test_over_http_and_the_upload_form(tmp_path: Path) -> None:
    client = TestClient(create_app(Settings(data_dir=tmp_path)), raise_server_exceptions=False)
    r = client.post("/attach-lora", json={**PATHS, "r": True})
    assert r.status_code == 422 and r.json()["field"] == "r", r.text
    r = client.post("/attach-head", files={"file": ("model.safetensors", b"x"),
                                           "spec": (None, json.dumps({"num_labels": "2"}))})
    assert r.status_code == 422 and r.json()["field"] == "spec.num_labels", r.text
