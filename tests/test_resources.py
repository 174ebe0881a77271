"""Memory available to the process (cgroup v2 / v1, MemAvailable, the setting) and the per-operation memory checks:
a job whose estimate exceeds it is a 503 problem before any work; nothing is written."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapter_surgery import resources
from adapter_surgery.api.app import create_app
from adapter_surgery.errors import NotEnoughMemory
from adapter_surgery.ops import OPERATIONS
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, extend_vocab
from adapter_surgery.settings import Settings
from tests.conftest import tree_digest
from tests.fixtures import make

GIB = 1 << 30


# -- available memory ------------------------------------------------------------------------------------------
def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_takes_the_tightest_level_and_counts_inactive_file_as_free(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _write(tmp_path / "cgroup", "0::/pod/app\n")
    _write(root / "pod" / "memory.max", f"{8 * GIB}\n")
    _write(root / "pod" / "memory.current", f"{1 * GIB}\n")
    _write(root / "pod" / "app" / "memory.max", f"{4 * GIB}\n")
    _write(root / "pod" / "app" / "memory.current", f"{3 * GIB}\n")
    _write(root / "pod" / "app" / "memory.stat", f"anon 1\ninactive_file {1 * GIB}\n")
    assert resources.cgroup_headroom(tmp_path / "cgroup", root) == 2 * GIB  # 4 - (3 - 1)
    _write(root / "pod" / "app" / "memory.max", "max\n")
    assert resources.cgroup_headroom(tmp_path / "cgroup", root) == 7 * GIB  # the parent's 8 - 1


def test_cgroup_v1_and_no_limit(tmp_path: Path) -> None:
    root = tmp_path / "cg"
    _write(tmp_path / "cgroup", "9:pids:/\n4:memory:/job\n")
    _write(root / "memory" / "job" / "memory.limit_in_bytes", f"{2 * GIB}\n")
    _write(root / "memory" / "job" / "memory.usage_in_bytes", f"{GIB // 2}\n")
    _write(root / "memory" / "memory.limit_in_bytes", "9223372036854771712\n")  # the root: unlimited
    _write(root / "memory" / "memory.usage_in_bytes", f"{10 * GIB}\n")
    assert resources.cgroup_headroom(tmp_path / "cgroup", root) == 2 * GIB - GIB // 2
    _write(root / "memory" / "job" / "memory.limit_in_bytes", "9223372036854771712\n")
    assert resources.cgroup_headroom(tmp_path / "cgroup", root) is None


def test_the_setting_overrides_and_meminfo_bounds_the_rest(monkeypatch) -> None:
    monkeypatch.setenv("ADAPTER_SURGERY_MEMORY_LIMIT_BYTES", str(3 * GIB))
    assert resources.available_memory() == 3 * GIB
    monkeypatch.delenv("ADAPTER_SURGERY_MEMORY_LIMIT_BYTES")
    monkeypatch.setattr(resources, "cgroup_headroom", lambda: 5 * GIB)
    monkeypatch.setattr(resources, "meminfo_available", lambda: 20 * GIB)
    assert resources.available_memory() == 5 * GIB  # the container's limit, not the host's free memory
    monkeypatch.setattr(resources, "cgroup_headroom", lambda: None)
    assert resources.available_memory() == 20 * GIB


def test_require_names_the_field_and_the_fix() -> None:
    resources.require(GIB, field="x", what="w", fix="f", available=2 * GIB)
    with pytest.raises(NotEnoughMemory) as err:
        resources.require(2 * GIB, field="num_probes", what="the probes", fix="Lower it.", available=GIB)
    assert err.value.status == 503 and err.value.field == "num_probes" and err.value.fix == "Lower it."
    assert "2.00 GiB" in err.value.detail and "1.00 GiB" in err.value.detail


# -- the operations ----------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    for name in ("FX-A", "FX-B"):
        make(name, root)
    return root


@pytest.fixture
def limit(monkeypatch):
    def set_limit(n: int) -> None:
        monkeypatch.setenv("ADAPTER_SURGERY_MEMORY_LIMIT_BYTES", str(n))

    return set_limit


@pytest.mark.parametrize(("op", "options", "field"), [
    ("extend-vocab", {"num_new_tokens": 0, "tokens": [f"<t{i}>" for i in range(1000)]}, "tokens"),
    ("attach-lora", {"target_modules": "all-linear", "r": 16}, "r"),
    ("attach-lora", {"target_modules": ["q_proj"], "r": 2, "init_lora_weights": "pissa"}, "init_lora_weights"),
    ("attach-head", {"num_labels": 2}, "num_labels"),
])
def test_an_estimate_over_the_limit_is_a_503_before_any_work(data: Path, limit, op: str, options: dict,
                                                             field: str) -> None:
    limit(resources.BASELINE_BYTES)  # the baseline fits, nothing more
    options = {k: v for k, v in options.items() if k != "num_new_tokens"}
    before = tree_digest(data / "llama-untied-tiny")
    spec = OPERATIONS[op].spec.model_validate({"checkpoint": "llama-untied-tiny", "output": "never", **options})
    with pytest.raises(NotEnoughMemory) as err:
        OPERATIONS[op].run(spec, RunContext(data))
    assert err.value.field == field and err.value.fix and any(u in err.value.detail for u in ("GiB", "MiB", "KiB"))
    assert not (data / "never").exists() and tree_digest(data / "llama-untied-tiny") == before
    limit(resources.BASELINE_BYTES + (256 << 20))  # what these tiny requests need
    OPERATIONS[op].run(spec, RunContext(data))
    assert (data / "never").is_dir()
    import shutil

    shutil.rmtree(data / "never")


def test_extend_vocab_estimate_grows_with_the_tokens(data: Path, limit) -> None:
    """2^20 rows of 32 bf16 values: ~64 MiB kept per tensor, two tensors, plus the float32 working copy."""
    est = resources.extend_vocab_bytes(1 << 20, 32, 2, 2, tokens=1 << 20)
    assert 2 * (1 << 20) * 32 * 2 + (1 << 20) * 32 * 6 < est < 2 * GIB
    limit(resources.BASELINE_BYTES + est // 2)
    with pytest.raises(NotEnoughMemory) as err:
        extend_vocab(ExtendVocabSpec(checkpoint="llama-untied-tiny", output="never", num_new_tokens=0,
                                     tokens=[f"<t{i}>" for i in range(1 << 20)]), RunContext(data))
    assert err.value.field == "tokens" and "1048576 rows of 32 values" in err.value.detail


def test_verify_of_the_issue_is_refused_before_loading_anything(data: Path, limit, monkeypatch) -> None:
    """num_probes 44 x probe_length 711 (inside the documented ranges) on main estimated ~17 GiB on a big
    model, compared that with the host's free memory and got the service OOM-killed in its container."""
    import adapter_surgery.report.run as run_mod

    def refuse(*_a, **_k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(run_mod, "load_model", refuse)
    spec = {"checkpoint": "llama-untied-tiny", "patched": "llama-untied-tiny", "num_probes": 44, "probe_length": 711,
            "device": "cpu"}
    import torch

    from adapter_surgery.io import Checkpoint
    from adapter_surgery.report import VerifyOptions
    from adapter_surgery.report.memory import estimate

    ckpt = Checkpoint.open(data / "llama-untied-tiny")
    needed, _ = estimate(ckpt, ckpt, VerifyOptions(num_probes=44, probe_length=711), torch.device("cpu"))
    assert needed > 44 * 711 * 4 * 128 * 3  # the logits of every probe position, both models
    limit(needed - 1)
    client = TestClient(create_app(Settings(data_dir=data)), raise_server_exceptions=False)
    r = client.post("/verify", json=spec)
    assert r.status_code == 503 and r.headers["content-type"] == "application/problem+json", r.text
    body = r.json()
    assert body["title"] == "Not enough memory" and body["field"] == "num_probes"
    assert "num_probes or probe_length" in body["fix"] and "tokens fit" in body["fix"]
    # "verify": true on another operation still skips the report with the reason instead of failing
    from adapter_surgery.report import preservation_report

    rep = preservation_report(data / "llama-untied-tiny", data / "llama-untied-tiny",
                              VerifyOptions(num_probes=44, probe_length=711, device="cpu"))
    assert rep.status == "skipped" and any(u in (rep.reason or "") for u in ("GiB", "MiB", "KiB"))
    assert rep.memory_available_bytes == needed - 1 and rep.memory_needed_bytes > needed - 1  # type: ignore[operator]


@pytest.mark.parametrize(("n", "text"), [(3 * GIB // 2, "1.50 GiB"), (GIB, "1.00 GiB"), (5 << 20, "5.0 MiB"),
                                         (1536, "1.5 KiB"), (512, "512 bytes"), (0, "0 bytes")])
def test_sizes_are_printed_in_a_unit_that_shows_them(n: int, text: str) -> None:
    """Small sizes printed "needs about 0.00 GiB ... has 0.00 GiB free"."""
    assert resources.size(n) == text


def test_a_small_memory_refusal_shows_its_sizes() -> None:
    with pytest.raises(NotEnoughMemory) as err:
        resources.require(3 << 20, field="x", what="w", fix="f", available=1 << 20)
    assert "0.00" not in err.value.detail and "MiB" in err.value.detail
