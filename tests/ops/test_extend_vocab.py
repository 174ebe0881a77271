"""extend-vocab on the tiny fixtures: the shared cases (B01-B07) and every init strategy, with real values."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, BertForMaskedLM, GPT2LMHeadModel

from adapter_surgery.errors import InvalidCheckpoint, InvalidSpec, NotFound, OutputExists, PathOutsideDataDir
from adapter_surgery.initializers import HEWITT_COVARIANCE_SCALE
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.extend_vocab import ExtendVocabResult, ExtendVocabSpec, extend_vocab
from tests.conftest import config, tensors, tree_digest

EMB, HEAD = "model.embed_tokens.weight", "lm_head.weight"


def run(data: Path, checkpoint: str, output: str = "out", **kw) -> ExtendVocabResult:
    return extend_vocab(ExtendVocabSpec(checkpoint=checkpoint, output=output, **kw), RunContext(data))


def mean_row(t: torch.Tensor) -> torch.Tensor:
    return t.float().mean(dim=0).to(t.dtype)


def load_lm(path: Path, cls=AutoModelForCausalLM):
    model, info = cls.from_pretrained(path, output_loading_info=True, dtype=torch.float32)
    assert info["missing_keys"] == set() and info["unexpected_keys"] == set(), info
    return model.eval()


def logits(model, ids: list[list[int]]) -> torch.Tensor:
    with torch.no_grad():
        return model(torch.tensor(ids)).logits


def test_b01_untied_head_keeps_its_own_mean(data_dir: Path, build) -> None:
    src = build("FX-B")
    before_digest = tree_digest(data_dir / src)
    r = run(data_dir, src, tokens=["<a>", "<b>", "<c>"])
    out = data_dir / "out"
    t0, t1 = tensors(data_dir / src), tensors(out)
    assert t1[EMB].shape == (131, 32) and t1[HEAD].shape == (131, 32)
    assert config(out)["vocab_size"] == 131 and config(out)["tie_word_embeddings"] is False
    assert torch.equal(t1[EMB][:128].view(torch.int16), t0[EMB].view(torch.int16))
    assert torch.equal(t1[HEAD][:128].view(torch.int16), t0[HEAD].view(torch.int16))
    for i in (128, 129, 130):
        assert torch.equal(t1[EMB][i], mean_row(t0[EMB]))
        assert torch.equal(t1[HEAD][i], mean_row(t0[HEAD]))
    assert not torch.equal(mean_row(t0[EMB]), mean_row(t0[HEAD]))
    assert [a.id for a in r.added] == [128, 129, 130] and r.vocab_size_after == 131
    # transformers' init pass must not re-randomize the head (post_init, save, reload)
    model = load_lm(out)
    model.post_init()
    model.save_pretrained(data_dir / "resaved")
    again = tensors(data_dir / "resaved")
    assert torch.equal(again[HEAD].float(), t1[HEAD].float())
    base = load_lm(data_dir / src)
    ids = [[3, 17, 40, 41, 90, 5]]
    lb, lp = logits(base, ids), logits(load_lm(out), ids)
    assert (lb - lp[..., :128]).abs().max() <= 1e-5
    assert torch.equal(lp[..., 128], lp[..., 129]) and torch.equal(lp[..., 129], lp[..., 130])
    tok = AutoTokenizer.from_pretrained(out)
    assert tok("<a> <c>", add_special_tokens=False).input_ids == [128, 130]
    assert tree_digest(data_dir / src) == before_digest


def test_b02_pad_to_multiple(data_dir: Path, build) -> None:
    src = build("FX-B")
    r = run(data_dir, src, tokens=["<a>", "<b>", "<c>"], pad_to_multiple_of=64)
    t0, t1 = tensors(data_dir / src), tensors(data_dir / "out")
    assert t1[EMB].shape == (192, 32) and t1[HEAD].shape == (192, 32)
    assert config(data_dir / "out")["vocab_size"] == 192
    assert len(AutoTokenizer.from_pretrained(data_dir / "out")) == 131
    assert [a.id for a in r.added] == [128, 129, 130]
    assert r.padding_rows == list(range(131, 192)) and r.rows_without_token == list(range(131, 192))
    assert torch.equal(t1[EMB][131:], mean_row(t0[EMB]).expand(61, 32))
    assert torch.isfinite(t1[HEAD].float()).all()
    model = load_lm(data_dir / "out")
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    loss = model(ids, labels=ids).loss
    assert torch.isfinite(loss)
    r2 = run(data_dir, src, output="out2", tokens=[f"<t{i}>" for i in range(64)], pad_to_multiple_of=64)
    assert tensors(data_dir / "out2")[EMB].shape == (192, 32) and r2.vocab_size_after == 192
    assert config(data_dir / "out2")["vocab_size"] == 192 and r2.padding_rows == []


def test_b03_padded_vocab_uses_spare_rows(data_dir: Path, build) -> None:
    src = build("FX-D")
    t0 = tensors(data_dir / src)
    trained_mean = t0[EMB][:120].float().mean(0).to(torch.bfloat16)
    r1 = run(data_dir, src, output="o1", tokens=["<a>", "<b>", "<c>"])
    t1 = tensors(data_dir / "o1")
    assert [a.id for a in r1.added] == [120, 121, 122]
    assert t1[EMB].shape == (128, 32) and config(data_dir / "o1")["vocab_size"] == 128
    for i in (120, 121, 122):
        assert torch.equal(t1[EMB][i], trained_mean)
    assert torch.equal(t1[EMB][123:].view(torch.int16), t0[EMB][123:].view(torch.int16))
    assert torch.equal(t1[EMB][:120].view(torch.int16), t0[EMB][:120].view(torch.int16))
    assert r1.rows_without_token == list(range(123, 128))
    r2 = run(data_dir, src, output="o2", tokens=[f"<t{i}>" for i in range(10)])
    t2 = tensors(data_dir / "o2")
    assert [a.id for a in r2.added] == list(range(120, 130))
    assert t2[EMB].shape == (130, 32) and config(data_dir / "o2")["vocab_size"] == 130
    assert all(torch.equal(t2[EMB][i], trained_mean) for i in range(120, 130))
    run(data_dir, src, output="o3", tokens=[])
    t3 = tensors(data_dir / "o3")
    assert t3[EMB].shape == (128, 32)
    for name in sorted((data_dir / src).glob("*.safetensors")):
        assert (data_dir / "o3" / name.name).read_bytes() == name.read_bytes()


def test_b05_mlm_output_bias_grows_with_the_bias_mean(data_dir: Path, build) -> None:
    src = build("FX-F")
    run(data_dir, src, tokens=["<x>", "<y>"])
    out = data_dir / "out"
    t0, t1 = tensors(data_dir / src), tensors(out)
    emb, bias = "bert.embeddings.word_embeddings.weight", "cls.predictions.bias"
    assert t1[emb].shape == (102, 32) and t1[bias].shape == (102,)
    assert torch.equal(t1[bias][:100], t0[bias])
    assert torch.equal(t1[bias][100], t0[bias].float().mean()) and torch.equal(t1[bias][101], t1[bias][100])
    assert "cls.predictions.decoder.weight" not in t1
    assert config(out)["vocab_size"] == 102
    base, patched = load_lm(data_dir / src, BertForMaskedLM), load_lm(out, BertForMaskedLM)
    ids = [[2, 10, 11, 12, 3]]
    lb, lp = logits(base, ids), logits(patched, ids)
    assert (lb - lp[..., :100]).abs().max() <= 1e-5
    assert torch.equal(lp[..., 100], lp[..., 101])


def test_b06_tied_gpt2_written_once_or_untied_on_request(data_dir: Path, build) -> None:
    src = build("FX-A")
    run(data_dir, src, output="tied", tokens=["<p>", "<q>"])
    t1 = tensors(data_dir / "tied")
    assert t1["transformer.wte.weight"].shape == (102, 32) and "lm_head.weight" not in t1
    assert config(data_dir / "tied")["tie_word_embeddings"] is True and config(data_dir / "tied")["vocab_size"] == 102
    model = load_lm(data_dir / "tied", GPT2LMHeadModel)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    run(data_dir, src, output="untied", tokens=["<p>", "<q>"], untie=True)
    t2 = tensors(data_dir / "untied")
    assert torch.equal(t2["lm_head.weight"], t2["transformer.wte.weight"])
    assert config(data_dir / "untied")["tie_word_embeddings"] is False
    size = lambda d: sum(v.numel() * v.element_size() for v in tensors(d).values())  # noqa: E731
    assert size(data_dir / "untied") - size(data_dir / "tied") == 102 * 32 * 4
    untied = load_lm(data_dir / "untied", GPT2LMHeadModel)
    assert untied.lm_head.weight.data_ptr() != untied.transformer.wte.weight.data_ptr()


def test_b07_index_matches_shards(data_dir: Path, build) -> None:
    src = build("FX-C")
    run(data_dir, src, tokens=["<a>", "<b>"])
    out = data_dir / "out"
    index = json.loads((out / "model.safetensors.index.json").read_text())
    from safetensors import safe_open

    actual = {}
    for shard in sorted(out.glob("*.safetensors")):
        with safe_open(str(shard), "pt") as f:
            actual.update(dict.fromkeys(f.keys(), shard.name))
    assert index["weight_map"] == actual and "lm_head.weight" not in actual
    assert index["metadata"]["total_size"] == sum(v.numel() * 2 for v in tensors(out).values())
    changed = actual[EMB]
    for shard in (data_dir / src).glob("*.safetensors"):
        if shard.name != changed:
            assert (out / shard.name).read_bytes() == shard.read_bytes()


def test_b07_index_naming_a_missing_shard_is_refused(data_dir: Path, build) -> None:
    src = build("FX-C")
    index_path = data_dir / src / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["extra.weight"] = "model-00003-of-00003.safetensors"
    index_path.write_text(json.dumps(index))
    with pytest.raises(InvalidCheckpoint, match=r"model-00003-of-00003\.safetensors"):
        run(data_dir, src, tokens=["<a>"])
    assert not (data_dir / "out").exists()


def test_b07_redundant_tied_head_is_dropped(data_dir: Path, build) -> None:
    from safetensors.torch import load_file, save_file

    src = build("FX-C")
    root = data_dir / src
    index = json.loads((root / "model.safetensors.index.json").read_text())
    emb_shard = index["weight_map"][EMB]
    other = next(s for s in sorted(set(index["weight_map"].values())) if s != emb_shard)
    shard = load_file(str(root / other))
    shard[HEAD] = load_file(str(root / emb_shard))[EMB].clone()
    save_file(shard, str(root / other), metadata={"format": "pt"})
    index["weight_map"][HEAD] = other
    (root / "model.safetensors.index.json").write_text(json.dumps(index))
    r = run(data_dir, src, tokens=["<a>"])
    assert HEAD not in tensors(data_dir / "out")
    assert HEAD not in json.loads((data_dir / "out/model.safetensors.index.json").read_text())["weight_map"]
    assert any("lm_head.weight" in w and "dropped" in w for w in r.warnings)
    load_lm(data_dir / "out")


def test_reserved_zero_rows_reported_and_reinitialized(data_dir: Path, build) -> None:
    src = build("FX-E")
    t0 = tensors(data_dir / src)
    r = run(data_dir, src, output="o1", tokens=["<new>"])
    assert [u.id for u in r.untrained_existing] == list(range(120, 128))
    assert r.untrained_existing[0].token == "<|reserved_0|>"
    trained = t0[EMB][:120].float().mean(0).to(torch.bfloat16)
    t1 = tensors(data_dir / "o1")
    assert torch.equal(t1[EMB][128], trained)  # zero rows excluded from the mean
    assert torch.equal(t1[EMB][120:128], t0[EMB][120:128])  # left alone without reinit_existing
    r2 = run(data_dir, src, output="o2", tokens=["<new>"], reinit_existing=True)
    t2 = tensors(data_dir / "o2")
    assert [u.id for u in r2.reinitialized] == list(range(120, 128))
    assert all(torch.equal(t2[EMB][i], trained) for i in range(120, 129))
    assert all(torch.equal(t2[HEAD][i], t0[HEAD][:120].float().mean(0).bfloat16()) for i in range(120, 129))


def test_qwen2_padded_vocabulary(data_dir: Path, build) -> None:
    src = build("qwen2-padded-tiny")
    r = run(data_dir, src, tokens=["<tool>"])
    assert r.added[0].id == 120 and r.vocab_size_after == 128
    out = tensors(data_dir / "out")
    assert out[EMB].shape[0] == 128 and config(data_dir / "out")["vocab_size"] == 128
    load_lm(data_dir / "out")


# -- strategies ------------------------------------------------------------------------------------------------
def test_subword_mean_uses_the_base_pieces(data_dir: Path, build) -> None:
    src = build("FX-B")
    tok = AutoTokenizer.from_pretrained(data_dir / src)
    pieces = tok("helloworld", add_special_tokens=False).input_ids
    assert len(pieces) == 2
    run(data_dir, src, tokens=[{"content": "helloworld", "init": "subword_mean"},
                                {"content": "<x>", "description": "hello world", "init": "subword_mean"}])
    t0, t1 = tensors(data_dir / src), tensors(data_dir / "out")
    assert torch.equal(t1[EMB][128], t0[EMB][pieces].float().mean(0).bfloat16())
    assert torch.equal(t1[HEAD][128], t0[HEAD][pieces].float().mean(0).bfloat16())
    desc = tok("hello world", add_special_tokens=False).input_ids
    assert torch.equal(t1[EMB][129], t0[EMB][desc].float().mean(0).bfloat16())


def test_copy_normal_zeros(data_dir: Path, build) -> None:
    src = build("FX-A")
    tok = AutoTokenizer.from_pretrained(data_dir / src)
    hello = tok.convert_tokens_to_ids("hello")
    run(data_dir, src, tokens=[{"content": "<c>", "init": {"strategy": "copy", "source": "hello"}},
                                {"content": "<z>", "init": "zeros"}, "<n>"], init="normal", seed=3)
    t0, t1 = tensors(data_dir / src)["transformer.wte.weight"], tensors(data_dir / "out")["transformer.wte.weight"]
    assert torch.equal(t1[100], t0[hello])
    assert torch.equal(t1[101], torch.zeros(32))
    assert 0.005 < float(t1[102].std()) < 0.05 and not torch.equal(t1[102], torch.zeros(32))
    with pytest.raises(InvalidSpec) as err:
        run(data_dir, src, output="bad", tokens=[{"content": "<c>", "init": {"strategy": "copy", "source": "nope"}}])
    assert err.value.field == "tokens.0.init.source"


def test_hewitt_samples_match_the_trained_covariance_and_are_seeded(data_dir: Path, build) -> None:
    src = build("FX-A")
    toks = [f"<h{i}>" for i in range(400)]
    run(data_dir, src, output="h1", tokens=toks, init="hewitt", seed=7)
    run(data_dir, src, output="h2", tokens=toks, init="hewitt", seed=7)
    run(data_dir, src, output="h3", tokens=toks, init="hewitt", seed=8)
    w = "model.safetensors"
    assert (data_dir / "h1" / w).read_bytes() == (data_dir / "h2" / w).read_bytes()
    assert (data_dir / "h1" / w).read_bytes() != (data_dir / "h3" / w).read_bytes()
    old = tensors(data_dir / src)["transformer.wte.weight"].double()
    new = tensors(data_dir / "h1")["transformer.wte.weight"][100:].double()
    mu = old.mean(0)
    cov = (old - mu).T @ (old - mu) / old.shape[0]
    sample_var = (new - mu).pow(2).mean(0)
    ratio = sample_var / (HEWITT_COVARIANCE_SCALE * cov.diagonal())
    assert 0.75 < float(ratio.mean()) < 1.25
    assert (new.mean(0) - mu).abs().max() < 1e-3


def test_bare_file_without_tokenizer(data_dir: Path, build) -> None:
    src = build("FX-A")
    r = run(data_dir, f"{src}/model.safetensors", output="bare.safetensors", num_new_tokens=4)
    assert r.architecture_source == "headers" and [a.id for a in r.added] == [100, 101, 102, 103]
    t = tensors(data_dir / "bare.safetensors")["transformer.wte.weight"]
    assert t.shape == (104, 32)
    with pytest.raises(InvalidSpec) as err:
        run(data_dir, f"{src}/model.safetensors", output="bare2.safetensors", tokens=["x"])
    assert err.value.field == "tokens"


def test_existing_tokens_are_reported_not_added(data_dir: Path, build) -> None:
    src = build("FX-B")
    r = run(data_dir, src, tokens=["hello", "<new>", "<new>"])
    tok = AutoTokenizer.from_pretrained(data_dir / src)
    assert [(e.token, e.id) for e in r.existing] == [("hello", tok.convert_tokens_to_ids("hello"))]
    assert [(a.token, a.id) for a in r.added] == [("<new>", 128)]


def test_special_tokens_are_saved_as_special(data_dir: Path, build) -> None:
    src = build("FX-B")
    run(data_dir, src, tokens=[{"content": "<|tool|>", "special": True}])
    tok = AutoTokenizer.from_pretrained(data_dir / "out")
    ids = tok("hello <|tool|>", add_special_tokens=False).input_ids
    assert ids[-1] == 128 and tok.decode(ids, skip_special_tokens=True).strip() == "hello"


def test_seed_gives_byte_identical_outputs(data_dir: Path, build) -> None:
    src = build("FX-B")
    a = run(data_dir, src, output="a", tokens=["<a>", "<b>"], init="normal", seed=1)
    b = run(data_dir, src, output="b", tokens=["<a>", "<b>"], init="normal", seed=1)
    assert [(f.path, f.sha256) for f in a.files] == [(f.path, f.sha256) for f in b.files]


# -- refusals --------------------------------------------------------------------------------------------------
def test_refusals_leave_nothing(data_dir: Path, build) -> None:
    src = build("FX-B")
    with pytest.raises(PathOutsideDataDir):
        run(data_dir, "../x", tokens=["<a>"])
    with pytest.raises(PathOutsideDataDir):
        run(data_dir, src, output="/tmp/elsewhere", tokens=["<a>"])
    with pytest.raises(NotFound):
        run(data_dir, "missing", tokens=["<a>"])
    with pytest.raises(InvalidSpec, match="overlaps"):
        run(data_dir, src, output=f"{src}/inside", tokens=["<a>"])
    (data_dir / "taken").mkdir()
    with pytest.raises(OutputExists):
        run(data_dir, src, output="taken", tokens=["<a>"])
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([src, "taken"])
    run(data_dir, src, output="taken", tokens=["<a>"], overwrite=True)
    assert (data_dir / "taken" / "config.json").exists()


def test_pickle_weights_are_refused(data_dir: Path) -> None:
    (data_dir / "p").mkdir()
    (data_dir / "p" / "pytorch_model.bin").write_bytes(b"\x80\x04not really")
    with pytest.raises(InvalidCheckpoint, match="pickle"):
        run(data_dir, "p", num_new_tokens=1)
    with pytest.raises(InvalidCheckpoint, match="pickle"):
        run(data_dir, "p/pytorch_model.bin", num_new_tokens=1)
    assert not (data_dir / "out").exists()


def test_unreadable_config_is_refused_missing_config_falls_back_to_headers(data_dir: Path, build) -> None:
    src = build("FX-B")
    (data_dir / src / "config.json").write_text("{not json")
    with pytest.raises(InvalidCheckpoint, match=r"config\.json is not valid JSON") as exc:
        run(data_dir, src, tokens=["<a>"])
    assert exc.value.field == "checkpoint" and "remove it" in (exc.value.fix or "")
    assert not (data_dir / "out").exists()
    (data_dir / src / "config.json").unlink()
    r = run(data_dir, src, tokens=["<a>"])
    assert r.architecture_source == "headers"
    assert any("config.json" in w for w in r.warnings)
    t = tensors(data_dir / "out")
    assert t[EMB].shape == (129, 32) and t[HEAD].shape == (129, 32)


@pytest.mark.parametrize("token", [" ", "   ", "\n", "a\u0000b", "x\u0007"])
def test_tokens_that_would_break_tokenization_are_refused(data_dir: Path, build, token: str) -> None:
    from pydantic import ValidationError

    src = build("FX-B")
    with pytest.raises(ValidationError, match=r"whitespace-only|control character"):
        ExtendVocabSpec(checkpoint=src, output="out", tokens=[token])
    with pytest.raises(ValidationError, match=r"whitespace-only|control character"):
        ExtendVocabSpec(checkpoint=src, output="out", tokens=[{"content": token, "special": True}])


def test_size_limits(data_dir: Path, build, monkeypatch: pytest.MonkeyPatch) -> None:
    from pydantic import ValidationError

    module = importlib.import_module("adapter_surgery.ops.extend_vocab")

    src = build("FX-B")
    with pytest.raises(ValidationError):
        ExtendVocabSpec(checkpoint=src, output="out", tokens=["<a>"], pad_to_multiple_of=10**9)
    with pytest.raises(ValidationError):
        ExtendVocabSpec(checkpoint=f"{src}/x.safetensors", output="out", num_new_tokens=10**9)
    monkeypatch.setattr(module, "MAX_NEW_BYTES", 1 << 20)  # 1 MiB: 65408 new rows of 32 float32 are 8 MiB
    with pytest.raises(InvalidSpec) as err:
        run(data_dir, src, tokens=["<a>"], pad_to_multiple_of=65536)
    assert err.value.field == "pad_to_multiple_of" and "65408 rows" in err.value.detail
    assert not (data_dir / "out").exists()


def test_no_op_request_warns_and_links(data_dir: Path, build) -> None:
    src = build("FX-B")
    r = run(data_dir, src, tokens=["hello"])
    assert any("nothing to add" in w for w in r.warnings) and r.changed_tensors == []
    for shard in (data_dir / src).glob("*.safetensors"):
        assert (data_dir / "out" / shard.name).stat().st_ino == shard.stat().st_ino


@pytest.mark.parametrize("sub", [False, True])
def test_headers_fallback_writes_the_row_count_as_vocab_size(data_dir: Path, build, sub: bool) -> None:
    """On main the copied config kept vocab_size 128 over 129 rows (transformers cannot build this config, so
    roles came from the tensor names and config.json was copied as it was)."""
    src = build("FX-B")
    cfg = config(data_dir / src)
    cfg["model_type"] = "made-up-model"
    cfg["architectures"] = ["MadeUpForCausalLM"]
    if sub:  # a multimodal-style config: the text config holds the vocabulary size
        cfg["text_config"] = {"vocab_size": cfg.pop("vocab_size"), "hidden_size": 32}
    (data_dir / src / "config.json").write_text(json.dumps(cfg))
    r = run(data_dir, src, tokens=["<a>"], pad_to_multiple_of=8)
    assert r.architecture_source == "headers" and r.vocab_size_after == 136
    out = config(data_dir / "out")
    assert (out["text_config"] if sub else out)["vocab_size"] == 136 == tensors(data_dir / "out")[EMB].shape[0]
    assert ("vocab_size" in out) is not sub


def test_tokenizer_is_loaded_once_per_request(data_dir: Path, build, monkeypatch: pytest.MonkeyPatch) -> None:
    import transformers

    src = build("FX-B")
    loads: list[str] = []
    real = transformers.AutoTokenizer.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(str(args[0]))
        return real(cls, *args, **kwargs)

    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", classmethod(counting))
    run(data_dir, src, output="once", tokens=["<a>", {"content": "<b>", "init": "subword_mean",
                                                       "description": "hello world"}], init="hewitt")
    assert loads == [str(data_dir / src)]


def test_hewitt_few_rows_sample_from_the_rows_many_rows_from_the_covariance(data_dir: Path, build,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    ev = importlib.import_module("adapter_surgery.ops.extend_vocab")  # the package exports a function of that name
    src = build("FX-A")  # rows of width 32: up to 8 new rows are sampled without the 32 x 32 covariance
    asked: list[bool] = []
    real = ev.row_stats
    monkeypatch.setattr(ev, "row_stats", lambda *a, **k: asked.append(a[3]) or real(*a, **k))
    run(data_dir, src, output="few", tokens=[f"<f{i}>" for i in range(8)], init="hewitt", seed=1)
    assert asked == [False]
    run(data_dir, src, output="many", tokens=[f"<m{i}>" for i in range(9)], init="hewitt", seed=1)
    assert asked == [False, True]
    old = tensors(data_dir / src)["transformer.wte.weight"].double()
    few = tensors(data_dir / "few")["transformer.wte.weight"][100:].double()
    assert few.shape == (8, 32)
    spread = (few - old.mean(0)).pow(2).mean(0).sum() / (HEWITT_COVARIANCE_SCALE * old.var(0, correction=0).sum())
    assert 0.3 < float(spread) < 3  # 8 draws: the right scale, not an exact ratio


def test_bytes_read_are_the_vocabulary_tensors_once(data_dir: Path, build) -> None:
    """The result counts the tensor bytes read into memory: each vocabulary tensor once (for its statistics),
    nothing of the rest of the model (copied by the kernel); the job metrics sum this."""
    src = build("FX-B")
    r = run(data_dir, src, tokens=["<a>"])
    assert r.bytes_read == 2 * 128 * 32 * 2  # embed_tokens and lm_head, bf16, read once each


@pytest.mark.parametrize(("fixture", "kw"), [
    ("FX-B", {"tokens": ["<a>", "<b>", "<c>"]}),
    ("FX-D", {"tokens": ["<a>", "<b>"], "init": "hewitt"}),  # new ids take padding rows: overrides, then appends
    ("FX-E", {"tokens": ["<a>"]}),  # all-zero rows found by the statistics: the warning comes after the write
    ("FX-C", {"tokens": ["<a>", "<b>"], "untie": True}),  # the untied head is the embedding's deferred patch
])
def test_statistics_overlapping_the_write_give_the_same_output(
        data_dir: Path, build, monkeypatch: pytest.MonkeyPatch, fixture: str, kw: dict) -> None:
    """The row statistics run on a worker while the writer copies (DeferredRows); the output files, digests and
    result are those of the statistics computed first."""
    ev = importlib.import_module("adapter_surgery.ops.extend_vocab")
    from adapter_surgery.io.writer import DeferredRows

    src = build(fixture)
    deferred: list[str] = []
    real_write = DeferredRows.write
    monkeypatch.setattr(DeferredRows, "write", lambda self, fd: deferred.append(self.path.name) or real_write(self, fd))
    overlapped = run(data_dir, src, "overlapped", **kw)
    assert deferred  # the statistics ran beside the write
    real = ev.vocab_changes
    monkeypatch.setattr(ev, "vocab_changes", lambda *a, pool=None, **k: real(*a, **k))
    deferred.clear()
    first = run(data_dir, src, "first", **kw)
    assert not deferred
    assert tree_digest(data_dir / "overlapped") == tree_digest(data_dir / "first")
    assert overlapped.model_dump(exclude={"output", "seconds"}) == first.model_dump(exclude={"output", "seconds"})
    assert bool(overlapped.untrained_existing) == (fixture == "FX-E")


def test_a_vocabulary_without_trained_rows_fails_from_the_overlapped_write_and_leaves_nothing(
        data_dir: Path, build) -> None:
    """The statistics run beside the write: their refusal (every row with a token all zero) still reaches the caller
    as the 422 it was, the partial output is removed, the input is untouched."""
    from safetensors.torch import load_file, save_file

    src = build("FX-B")
    for shard in sorted((data_dir / src).glob("*.safetensors")):
        t = load_file(str(shard))
        if EMB in t:
            t[EMB] = torch.zeros_like(t[EMB])
            save_file(t, str(shard), metadata={"format": "pt"})
    before = tree_digest(data_dir / src)
    with pytest.raises(InvalidCheckpoint, match="has no trained rows"):
        run(data_dir, src, tokens=["<a>"])
    assert tree_digest(data_dir / src) == before
    assert sorted(p.name for p in data_dir.iterdir()) == sorted([src])


def test_overlapped_statistics_refuse_as_computed_first_when_several_tensors_fail(
        data_dir: Path, build, monkeypatch: pytest.MonkeyPatch) -> None:
    """Both vocabulary tensors without a trained row, the head stored first in its shard (the writer reaches it
    first): the refusal names the tensor the statistics computed first name (the input embedding, arch order), not
    the one the writer happened to reach first."""
    from safetensors.torch import load_file, save_file

    ev = importlib.import_module("adapter_surgery.ops.extend_vocab")
    src = build("FX-B")
    for shard in sorted((data_dir / src).glob("*.safetensors")):
        t = load_file(str(shard))
        for key in (EMB, HEAD):
            if key in t:
                t[key] = torch.zeros_like(t[key])
        save_file(t, str(shard), metadata={"format": "pt"})

    def refusal(**kw) -> str:
        with pytest.raises(InvalidCheckpoint) as caught:
            run(data_dir, src, "out", tokens=["<a>"], **kw)
        return str(caught.value)

    overlapped = refusal()
    real = ev.vocab_changes
    monkeypatch.setattr(ev, "vocab_changes", lambda *a, pool=None, **k: real(*a, **k))
    assert overlapped == refusal() == f"tensor {EMB!r} has no trained rows (every row with a token is all zero)"
    assert sorted(p.name for p in data_dir.iterdir()) == [src]
