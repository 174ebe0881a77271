"""A bounded property-based fuzz run of the API from its own OpenAPI document (schemathesis), in process.

schemathesis' engine (what ``schemathesis run`` drives) runs the document's examples, the positive coverage
cases (boundaries of every constraint) and generated requests, valid and invalid, for every operation, with a
fixed seed and deterministic generation so a run is repeatable. Half of the generated requests are pointed at a
real (tiny) checkpoint, so the operations run and answer 200 (JSON, and files for the upload form), not only
4xx. Checks: no 5xx, and every answer is documented (status, content type, headers, body schema).

``ADAPTER_SURGERY_FUZZ_EXAMPLES`` raises the number of generated requests per operation (default 15) for a
longer hunt; ``ADAPTER_SURGERY_FUZZ_COVERAGE=all`` adds the negative coverage cases (~2,000 more requests).
"""

from __future__ import annotations

import hashlib
import io
import os
import zipfile
from collections import Counter
from pathlib import Path
from typing import Any

import schemathesis
from schemathesis.engine import events, from_schema

from adapter_surgery.api.app import create_app
from adapter_surgery.settings import Settings
from tests.fixtures import make

#: The checkpoint the README's examples name is the tiny Llama fixture here, so the examples run for real.
CHECKPOINT = "SmolLM2-135M-Instruct"
#: Upper bounds put on numbers that size work (their limits are the bounds tests' business; here they only cost
#: time: 2^20 new rows of a model take seconds, /verify's probes run forward passes).
SIZES = {"num_new_tokens": 64, "pad_to_multiple_of": 64, "num_probes": 2, "probe_length": 8, "r": 8}
VERIFY_RUNS = 6
CHECKS = ["not_a_server_error", "status_code_conformance", "content_type_conformance",
          "response_headers_conformance", "response_schema_conformance"]


def _config() -> schemathesis.Config:
    coverage_mode = "all" if os.environ.get("ADAPTER_SURGERY_FUZZ_COVERAGE") == "all" else "positive"
    return schemathesis.Config.from_dict({
        "seed": 20240806,
        "generation": {"max-examples": int(os.environ.get("ADAPTER_SURGERY_FUZZ_EXAMPLES", "15")),
                       "deterministic": True, "database": "none"},
        "request-timeout": 120,
        "checks": {"enabled": False} | {name: {"enabled": True} for name in CHECKS},
        "phases": {"stateful": {"enabled": False},
                   "coverage": {"generation": {"mode": coverage_mode}, "unexpected-methods": ["get", "put"]}},
    })


def _aim(upload: bytes):
    """A ``map_case`` hook: points half of the requests (chosen by their content, so deterministic) at the real
    checkpoint, or upload a real model (zip). ``/verify`` loads two models per request (~1 s): only its
    first ``VERIFY_RUNS`` requests that name existing checkpoints run; the later ones name a missing one."""
    verify_runs = Counter[str]()

    def map_case(_: Any, case: schemathesis.Case) -> schemathesis.Case:
        body = case.body
        if not isinstance(body, dict):
            return case
        if hashlib.sha256(repr(body).encode()).digest()[0] < 128:
            if isinstance(body.get("checkpoint"), str):
                body["checkpoint"] = CHECKPOINT
                if isinstance(body.get("patched"), str):
                    body["patched"] = CHECKPOINT
            elif "file" in body:
                body["file"] = upload
                if case.headers:  # the upload form answers with the file itself: synchronously only
                    case.headers.pop("Prefer", None)
        if case.operation.path == "/verify" and isinstance(body.get("patched"), str):
            if case.headers:  # the few verify runs answer synchronously, so that some reach 200
                case.headers.pop("Prefer", None)
            verify_runs["verify"] += 1
            if verify_runs["verify"] > VERIFY_RUNS:
                body["patched"] = "not-there"
        spec = body.get("spec") if isinstance(body.get("spec"), dict) else body  # the form's spec part
        steps = spec.get("steps") if isinstance(spec.get("steps"), list) else []
        for part in [spec, *steps]:
            for name, most in SIZES.items():
                if isinstance(part, dict) and type(part.get(name)) is int and part[name] > most:
                    part[name] = most
        return case

    return map_case


def test_no_server_error_and_every_answer_is_documented(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    make("FX-B", data).rename(data / CHECKPOINT)
    buf = io.BytesIO()  # a zip (schemathesis names the part file.zip from its magic; the server goes by the name)
    with zipfile.ZipFile(buf, "w") as zf:
        for p in make("FX-A", tmp_path).iterdir():
            zf.write(p, f"model/{p.name}")
    upload = buf.getvalue()
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(Settings(data_dir=data, device="cpu")),
                                            config=_config())
    schema.hook("map_case")(_aim(upload))

    statuses: Counter[tuple[str, int]] = Counter()
    failures: dict[tuple[str, str], str] = {}
    checks: Counter[str] = Counter()
    errors: list[str] = []
    binary = 0
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            for interaction in event.recorder.interactions.values():
                if interaction.response is not None:
                    statuses[(event.recorder.label, interaction.response.status_code)] += 1
                    binary += interaction.response.headers.get("content-type", [""])[0] == "application/zip"
            for nodes in event.recorder.checks.values():
                for node in nodes:
                    checks[node.name] += 1
                    if node.failure_info is not None:
                        failure = node.failure_info.failure
                        failures.setdefault((event.recorder.label, node.name),
                                            f"{failure.title}: {failure.message}\n{node.failure_info.code_sample}")
        elif isinstance(event, events.NonFatalError | events.FatalError):
            errors.append(f"{getattr(event, 'label', '')}: {getattr(event, 'value', None) or event.exception}")

    assert not errors, errors
    assert not failures, "\n\n".join(f"{label} / {check}\n{text}" for (label, check), text in failures.items())
    assert set(checks) == set(CHECKS)
    assert not [k for k in statuses if k[1] >= 500], statuses
    answered = {label for label, _ in statuses}
    assert answered >= {f"POST /{name}" for name in ("extend-vocab", "attach-lora", "attach-head", "surgery",
                                                     "verify")} | {"GET /healthz"}, answered
    ok = {label for (label, status) in statuses if status == 200}
    assert {"POST /extend-vocab", "POST /verify"} <= ok, statuses  # the operations ran, not only refusals
    assert binary, "no upload answered with a file"
