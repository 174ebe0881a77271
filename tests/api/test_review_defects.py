"""Defects a reviewer found, each answered by a 4xx problem+json naming the field, nothing written, input untouched.

- a ``target_modules`` regex with nested quantifiers (``(.*)*z$``) froze the service (peft's ``re.fullmatch``
  backtracking on every module name while holding the GIL);
- ``"output": ".adapter-surgery"`` with ``overwrite`` deleted the service's own state (job queue, upload scratch);
- an output that is a symlink to a model in the data directory was overwritten through the link;
- an output of 2000 path components answered 500 (RecursionError in ``mkdir(parents=True)``);
- a number of over 4300 digits in config.json, an index or a safetensors header answered 500 (ValueError).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from pydantic import ValidationError

from adapter_surgery.api.app import create_app
from adapter_surgery.ops.attach_lora import AttachLoraOptions
from adapter_surgery.paths import resolve_under
from adapter_surgery.patterns import MAX_PATTERN, why_unsafe
from adapter_surgery.settings import Settings
from tests.conftest import tree_digest

SRC = "llama-untied-tiny"
STATE = ".adapter-surgery"
SERVICE = Path(__file__).resolve().parents[2] / "service"


@pytest.fixture
def client(data_dir: Path, build) -> TestClient:
    build("FX-B")
    with TestClient(create_app(Settings(data_dir=data_dir)), raise_server_exceptions=False) as c:
        yield c


def refused(r, status: int, field: str, data_dir: Path, listing: list[str], before: dict[str, str],
            words: tuple[str, ...] = ()) -> dict:
    assert r.status_code == status and r.headers["content-type"] == "application/problem+json", r.text
    body = r.json()
    assert body["field"] == field and body.get("fix"), body
    assert all(w in json.dumps(body) for w in words), body
    assert sorted(p.name for p in data_dir.iterdir() if p.name != STATE) == listing
    assert not any(".tmp-" in p.name for p in data_dir.rglob("*"))
    assert tree_digest(data_dir / SRC) == before
    return body


def snapshot(data_dir: Path) -> tuple[list[str], dict[str, str]]:
    return sorted(p.name for p in data_dir.iterdir() if p.name != STATE), tree_digest(data_dir / SRC)


# -- 1. catastrophic backtracking -----------------------------------------------------------------------------
SLOW = "(.*)*z$"


@pytest.mark.parametrize("pattern", [SLOW, "(a+)+", r"(\w+\s?)*", "((ab)*c)*", "(?:x|y+){2,}", "x" * 300,
                                     "(.|.)*z", "(a|ab)*c", ".*.*.*.*z", ".*" * 10])
def test_unsafe_patterns(pattern: str) -> None:
    assert why_unsafe(pattern)


@pytest.mark.parametrize("pattern", ["q_proj", r".*\.(q_proj|v_proj)$", r"model\.layers\.(\d+)\.self_attn\.(q|v)_proj",
                                     "all-linear", "(q|k)_proj", "(a+)?", ".*.*.*z", r"(?:layers\.(0|1)\.)+x",
                                     "x" * MAX_PATTERN])
def test_ordinary_patterns_pass(pattern: str) -> None:
    assert why_unsafe(pattern) is None
    AttachLoraOptions(target_modules=pattern, exclude_modules=pattern, rank_pattern={pattern: 4},
                      alpha_pattern={pattern: 8.0}, layers_pattern=[pattern])


def test_a_list_of_names_is_not_a_regex() -> None:
    AttachLoraOptions(target_modules=[SLOW], exclude_modules=[SLOW])


@pytest.mark.parametrize(("body", "field"), [
    ({"target_modules": SLOW}, "target_modules"),
    ({"target_modules": ["q_proj"], "exclude_modules": SLOW}, "exclude_modules"),
    ({"target_modules": ["q_proj"], "rank_pattern": {SLOW: 4}}, "rank_pattern"),
    ({"target_modules": ["q_proj"], "alpha_pattern": {SLOW: 4.0}}, "alpha_pattern"),
    ({"target_modules": ["q_proj"], "layers_to_transform": [0], "layers_pattern": SLOW}, "layers_pattern"),
    ({"target_modules": "x" * 300}, "target_modules"),
])
def test_every_regex_field_is_checked(body: dict, field: str) -> None:
    with pytest.raises(ValidationError, match="simpler pattern") as err:
        AttachLoraOptions(**body)
    assert [e["loc"] for e in err.value.errors()] == [(field,)]


SCRIPT = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    from fastapi.testclient import TestClient
    from adapter_surgery.api.app import create_app
    from adapter_surgery.settings import Settings
    client = TestClient(create_app(Settings(data_dir=Path(sys.argv[1]))), raise_server_exceptions=False)
    out = []
    for path, body in json.loads(sys.argv[2]):
        r = client.post(path, json=body)
        out.append([r.status_code, r.headers["content-type"], r.json()])
    print(json.dumps(out))
""")


def test_the_reviewers_pattern_is_refused_over_http_at_once(data_dir: Path, build) -> None:
    """In a child process: before the fix the request ran for hours, holding the GIL (a thread cannot time it out)."""
    build("FX-B")
    listing, before = snapshot(data_dir)
    requests = [["/attach-lora", {"checkpoint": SRC, "output": "lora", "target_modules": SLOW}],
                ["/surgery", {"checkpoint": SRC, "output": "s", "steps": [
                    {"op": "attach-lora", "target_modules": ["q_proj"], "rank_pattern": {SLOW: 4}}]}]]
    try:
        done = subprocess.run([sys.executable, "-c", SCRIPT, str(data_dir), json.dumps(requests)], timeout=120,
                              capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(SERVICE)},
                              check=True)
    except subprocess.TimeoutExpired:
        pytest.fail("a target_modules regex with nested quantifiers was not refused within 120 s")
    (s1, ct1, b1), (s2, ct2, b2) = json.loads(done.stdout.strip().splitlines()[-1])
    assert (s1, s2) == (422, 422) and ct1 == ct2 == "application/problem+json", (b1, b2)
    assert b1["field"] == "target_modules" and "list of module names" in b1["detail"]
    assert b2["field"] == "steps.0.rank_pattern" and "simpler pattern" in b2["detail"]
    assert snapshot(data_dir) == (listing, before)


# -- 2. the service's state directory -------------------------------------------------------------------------
@pytest.mark.parametrize("value", [STATE, f"{STATE}/jobs", f"{STATE}/scratch/x", "state-link", "state-link/x",
                                   f"sub/../{STATE}"])
def test_the_state_directory_is_never_an_output(client: TestClient, data_dir: Path, value: str) -> None:
    (data_dir / STATE / "keep").mkdir(parents=True, exist_ok=True)
    (data_dir / STATE / "keep" / "marker").write_text("state")
    (data_dir / "state-link").symlink_to(data_dir / STATE)
    listing, before = snapshot(data_dir)
    r = client.post("/extend-vocab", json={"checkpoint": SRC, "output": value, "overwrite": True,
                                           "tokens": ["<a>"]})
    refused(r, 403, "output", data_dir, listing, before, ("state directory",))
    assert (data_dir / STATE / "keep" / "marker").read_text() == "state"


def test_nor_a_checkpoint(client: TestClient, data_dir: Path) -> None:
    (data_dir / STATE).mkdir(exist_ok=True)
    (data_dir / SRC).rename(data_dir / STATE / "m")
    r = client.post("/extend-vocab", json={"checkpoint": f"{STATE}/m", "output": "o", "tokens": ["<a>"]})
    assert r.status_code == 403 and r.json()["field"] == "checkpoint", r.text


def test_paths_relative_to_an_upload_scratch_root_pass(data_dir: Path) -> None:
    """Upload jobs run with the scratch directory as their root: only the given root's first component counts."""
    work = data_dir / STATE / "scratch" / "job1"
    (work / "model").mkdir(parents=True)
    assert resolve_under(work, "model", "checkpoint") == (work / "model").resolve()
    assert resolve_under(work, "output", "output") == (work / "output").resolve()


# -- 3. an output that is a symlink ---------------------------------------------------------------------------
def test_overwriting_through_a_symlink_is_refused(client: TestClient, data_dir: Path) -> None:
    (data_dir / "linkin").symlink_to(SRC)
    listing, before = snapshot(data_dir)
    r = client.post("/extend-vocab", json={"checkpoint": SRC, "output": "linkin",
                                           "overwrite": True, "tokens": ["<a>"]})
    refused(r, 422, "output", data_dir, listing, before, ("symbolic link",))
    assert (data_dir / "linkin").is_symlink()


def test_a_symlinked_output_over_another_model_is_refused(client: TestClient, data_dir: Path, build) -> None:
    other = build("FX-A")
    (data_dir / "linkin").symlink_to(other)
    other_before = tree_digest(data_dir / other)
    listing, before = snapshot(data_dir)
    r = client.post("/extend-vocab", json={"checkpoint": SRC, "output": "linkin", "overwrite": True,
                                           "tokens": ["<a>"]})
    refused(r, 422, "output", data_dir, listing, before, ("output is a symbolic link",))
    assert tree_digest(data_dir / other) == other_before


def test_a_symlinked_checkpoint_still_reads(client: TestClient, data_dir: Path) -> None:
    (data_dir / "linkin").symlink_to(SRC)
    r = client.post("/extend-vocab", json={"checkpoint": "linkin", "output": "o", "tokens": ["<a>"]})
    assert r.status_code == 200, r.text


# -- 4. a deeply nested output --------------------------------------------------------------------------------
@pytest.mark.parametrize("parts", [65, 2000])
def test_a_deeply_nested_output_is_refused(client: TestClient, data_dir: Path, parts: int) -> None:
    listing, before = snapshot(data_dir)
    r = client.post("/extend-vocab", json={"checkpoint": SRC, "output": "/".join(["d"] * parts), "tokens": ["<a>"]})
    refused(r, 422, "output", data_dir, listing, before, ("path components",))


def test_64_components_are_fine(client: TestClient, data_dir: Path) -> None:
    r = client.post("/extend-vocab", json={"checkpoint": SRC, "output": "/".join(["d"] * 64), "tokens": ["<a>"]})
    assert r.status_code == 200, r.text


# -- 5. numbers over Python's int-digit limit -----------------------------------------------------------------
HUGE = "9" * 5000


def _config_huge(ckpt: Path) -> None:
    text = (ckpt / "config.json").read_text()
    (ckpt / "config.json").write_text(text.replace("{", '{"huge": ' + HUGE + ", ", 1))


def _index_huge(ckpt: Path) -> None:
    path = ckpt / "model.safetensors.index.json"
    text = path.read_text()
    path.write_text(text.replace("{", '{"huge": ' + HUGE + ", ", 1))


def _header_huge(ckpt: Path) -> None:
    shard = sorted(ckpt.glob("*.safetensors"))[0]
    data = shard.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = data[8:8 + n].decode().replace("{", '{"huge": ' + HUGE + ", ", 1).encode()
    shard.write_bytes(struct.pack("<Q", len(header)) + header + data[8 + n:])


@pytest.mark.parametrize(("damage", "op"), [(d, op) for d in (_config_huge, _index_huge, _header_huge)
                                             for op in ("extend-vocab", "expand-blocks", "verify")
                                             if (d, op) != (_config_huge, "verify")])  # verify: skipped, a 200
def test_a_number_of_5000_digits_is_a_422(client: TestClient, data_dir: Path, damage, op: str) -> None:
    damage(data_dir / SRC)
    listing, before = snapshot(data_dir)
    body = {"extend-vocab": {"output": "o", "tokens": ["<a>"]}, "expand-blocks": {"output": "o", "num_blocks": 1},
            "verify": {"patched": SRC}}[op]
    r = client.post(f"/{op}", json={"checkpoint": SRC, **body})
    refused(r, 422, "checkpoint", data_dir, listing, before)


def test_regexes_in_an_adapter_config_are_checked_before_merging(data_dir: Path) -> None:
    """peft matches an adapter's rank_pattern keys (and a string target_modules) as regexes: merge-lora refuses one
    that would backtrack exponentially (the reviewer's ``(.|.)*z`` froze the service) before reading a weight."""
    import torch
    from safetensors.torch import save_file

    from adapter_surgery.errors import InvalidSpec
    from adapter_surgery.ops.merge_lora import open_adapter

    for key, value in [("rank_pattern", {"(.|.)*z": 4}), ("alpha_pattern", {"(a+)+": 8}), ("target_modules", "(.*)*z")]:
        adapter = data_dir / f"a-{key}"
        adapter.mkdir()
        (adapter / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8,
                                                                 "target_modules": ["q_proj"], key: value}))
        save_file({"x.lora_A.weight": torch.zeros(4, 8)}, str(adapter / "adapter_model.safetensors"))
        with pytest.raises(InvalidSpec, match="exponential") as exc:
            open_adapter(data_dir, adapter.name, "adapters.0.path")
        assert exc.value.field == "adapters.0.path" and key in exc.value.detail
