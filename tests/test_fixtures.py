"""tests/fixtures.py builds what /work/shared/cases/README.md ("Fixtures") specifies."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    BertForMaskedLM,
    BertModel,
    PreTrainedTokenizerFast,
)

from tests.fixtures import FIXTURES, FX_ALIASES, RESERVED, SPARE_ROW_STD, make

CAUSAL = {"gpt2-tied-tiny", "llama-untied-tiny", "llama-tied-sharded", "padded-vocab", "reserved-zero",
          "qwen2-padded-tiny"}  # fmt: skip


# -------------------------------------------------------------------------------------------------- helpers


def tensor_files(d: Path) -> list[Path]:
    return sorted(d.glob("*.safetensors"))


def header(d: Path) -> dict[str, tuple[tuple[int, ...], str, str]]:
    """name -> (shape, dtype, file name), read from the safetensors headers only."""
    out: dict[str, tuple[tuple[int, ...], str, str]] = {}
    for f in tensor_files(d):
        with safe_open(f, "pt") as s:
            for k in s.keys():  # noqa: SIM118 - safe_open is not a mapping
                assert k not in out, f"{k} stored twice"
                sl = s.get_slice(k)
                out[k] = (tuple(sl.get_shape()), sl.get_dtype(), f.name)
    return out


def tensor(d: Path, name: str) -> torch.Tensor:
    for f in tensor_files(d):
        with safe_open(f, "pt") as s:
            if name in s.keys():  # noqa: SIM118
                return s.get_tensor(name)
    raise KeyError(name)


def config(d: Path) -> dict:
    return json.loads((d / "config.json").read_text())


def index(d: Path) -> dict:
    return json.loads((d / "model.safetensors.index.json").read_text())


def assert_all_rows_nonzero(t: torch.Tensor) -> None:
    zero_rows = (t.float().abs().sum(dim=1) == 0).nonzero().flatten().tolist()
    assert zero_rows == [], f"all-zero rows: {zero_rows}"


def assert_sharded_consistently(d: Path, shards: int) -> None:
    idx = index(d)
    files = sorted(p.name for p in tensor_files(d))
    assert files == [f"model-{i:05d}-of-{shards:05d}.safetensors" for i in range(1, shards + 1)]
    assert not (d / "model.safetensors").exists()
    h = header(d)
    assert idx["weight_map"] == {k: v[2] for k, v in h.items()}
    per_elem = {"BF16": 2, "F16": 2, "F32": 4}
    total = 0
    for f in tensor_files(d):
        with safe_open(f, "pt") as s:
            for k in s.keys():  # noqa: SIM118
                sl = s.get_slice(k)
                total += torch.Size(sl.get_shape()).numel() * per_elem[sl.get_dtype()]
    assert idx["metadata"]["total_size"] == total


# ------------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return {name: make(name, tmp_path_factory) for name in FIXTURES}


# ------------------------------------------------------------------------------------------- generic checks


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_complete_dir_fast_and_deterministic(name: str, tmp_path: Path) -> None:
    t0 = time.perf_counter()
    first = FIXTURES[name](tmp_path / "a")
    elapsed = time.perf_counter() - t0
    assert elapsed < 5.0, f"{name} took {elapsed:.2f}s"  # < 0.1 s in practice; loose bound for slow CI
    second = FIXTURES[name](tmp_path / "b")
    names = sorted(p.name for p in first.iterdir())
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= set(names)
    assert tensor_files(first)
    assert names == sorted(p.name for p in second.iterdir())
    for n in names:
        assert (first / n).read_bytes() == (second / n).read_bytes(), f"{n} differs between two builds"
    tok_cfg = json.loads((first / "tokenizer_config.json").read_text())
    assert tok_cfg["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert not {"backend", "is_local", "local_files_only"} & set(tok_cfg)
    for f in tensor_files(first):
        with safe_open(f, "pt") as s:
            assert s.metadata() == {"format": "pt"}


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_transformers_loads_without_missing_or_unexpected_keys(name: str, built: dict[str, Path]) -> None:
    d = built[name]
    if name in CAUSAL:
        cls = AutoModelForCausalLM
    elif name == "bert-mlm-tiny":
        cls = BertForMaskedLM
    else:
        cls = BertModel
    model, info = cls.from_pretrained(d, output_loading_info=True)
    assert not info["missing_keys"], info
    assert not info["unexpected_keys"], info
    assert not info["mismatched_keys"], info
    assert not info.get("error_msgs"), info
    # Loaded values are the stored ones.
    h = header(d)
    state = model.state_dict()
    for key in h:
        assert torch.equal(state[key], tensor(d, key)), key
    assert model.config.vocab_size == config(d)["vocab_size"]


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_embedding_rows_nonzero_and_nontrivial(name: str, built: dict[str, Path]) -> None:
    d = built[name]
    h = header(d)
    emb_suffixes = ("embed_tokens.weight", "wte.weight", "word_embeddings.weight")
    emb_key = next(k for k in h if k.endswith(emb_suffixes))
    keys = [emb_key] + (["lm_head.weight"] if "lm_head.weight" in h else [])
    for key in keys:
        w = tensor(d, key).float()
        main = w[:120] if name in {"padded-vocab", "reserved-zero", "qwen2-padded-tiny"} else w
        assert_all_rows_nonzero(main)
        assert 0.01 < main.std().item() < 0.04, (key, main.std().item())


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_tokenizer_loads_and_splits_new_words_into_known_pieces(name: str, built: dict[str, Path]) -> None:
    tok = AutoTokenizer.from_pretrained(built[name])
    vocab = tok.get_vocab()
    expected = ["hello", "##world"] if name.startswith("bert") else ["hello", "world"]
    assert tok.tokenize("helloworld") == expected
    ids = tok("helloworld", add_special_tokens=False).input_ids
    assert ids == [vocab[p] for p in expected]
    assert tok.unk_token_id not in ids if tok.unk_token_id is not None else True
    # Known words encode to a single token each.
    for word in ("hello", "world", "token", "head", "the"):
        assert tok.tokenize(word) == [word]


@pytest.mark.parametrize("name", sorted(FIXTURES))
def test_auto_tokenizer_agrees_with_the_saved_tokenizer_json(name: str, built: dict[str, Path]) -> None:
    # AutoTokenizer may pick a model-specific class (Qwen2Tokenizer for model_type qwen2, which rebuilds the
    # pipeline); it must tokenize exactly like the saved tokenizer.json.
    auto = AutoTokenizer.from_pretrained(built[name])
    plain = PreTrainedTokenizerFast.from_pretrained(built[name])
    assert len(auto) == len(plain)
    assert auto.get_vocab() == plain.get_vocab()
    for text in ("hello world helloworld quick", " Hello, world! 123 tokenhead\n\nthe  cat", "the lazy dog"):
        assert auto(text).input_ids == plain(text).input_ids, text
        bare = {"add_special_tokens": False}
        assert auto(text, **bare).input_ids == plain(text, **bare).input_ids, text


# --------------------------------------------------------------------------------------- per-fixture checks


def test_fx_a_gpt2_tied(built: dict[str, Path]) -> None:
    d = built["gpt2-tied-tiny"]
    h = header(d)
    assert [p.name for p in tensor_files(d)] == ["model.safetensors"]
    assert not (d / "model.safetensors.index.json").exists()
    assert "lm_head.weight" not in h
    assert h["transformer.wte.weight"][:2] == ((100, 32), "F32")
    assert h["transformer.wpe.weight"][:2] == ((64, 32), "F32")
    for layer in (0, 1):
        p = f"transformer.h.{layer}."
        assert h[p + "attn.c_attn.weight"][0] == (32, 96)
        assert h[p + "attn.c_proj.weight"][0] == (32, 32)
        assert h[p + "mlp.c_fc.weight"][0] == (32, 128)
        assert h[p + "mlp.c_proj.weight"][0] == (128, 32)
    assert {v[1] for v in h.values()} == {"F32"}
    assert not any(k.startswith("transformer.h.2.") for k in h)
    cfg = config(d)
    assert cfg["model_type"] == "gpt2"
    assert cfg["tie_word_embeddings"] is True
    dims = (cfg["vocab_size"], cfg["n_embd"], cfg["n_layer"], cfg["n_head"], cfg["n_positions"])
    assert dims == (100, 32, 2, 2, 64)
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == 100
    assert cfg["bos_token_id"] == cfg["eos_token_id"] == tok.eos_token_id == tok.bos_token_id == 99
    assert tok.convert_ids_to_tokens(99) == "<|endoftext|>"
    assert tok.pad_token is None
    # Byte-level: a space is the symbol "Ġ" (its own token here), decoding restores it.
    assert tok.tokenize("hello world") == ["hello", "Ġ", "world"]
    assert tok.decode(tok("hello world").input_ids) == "hello world"
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


def _check_llama_layout(d: Path, *, tied: bool) -> dict[str, tuple[tuple[int, ...], str, str]]:
    h = header(d)
    assert h["model.embed_tokens.weight"][:2] == ((128, 32), "BF16")
    for layer in (0, 1):
        p = f"model.layers.{layer}."
        assert h[p + "self_attn.q_proj.weight"][0] == (32, 32)
        assert h[p + "self_attn.o_proj.weight"][0] == (32, 32)
        assert h[p + "self_attn.k_proj.weight"][0] == (16, 32)
        assert h[p + "self_attn.v_proj.weight"][0] == (16, 32)
        assert h[p + "mlp.gate_proj.weight"][0] == (64, 32)
        assert h[p + "mlp.up_proj.weight"][0] == (64, 32)
        assert h[p + "mlp.down_proj.weight"][0] == (32, 64)
    assert {v[1] for v in h.values()} == {"BF16"}
    assert_sharded_consistently(d, 2)
    cfg = config(d)
    assert cfg["model_type"] == "llama"
    assert cfg["dtype"] == "bfloat16"
    assert cfg["tie_word_embeddings"] is tied
    assert cfg["vocab_size"] == 128
    assert (cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]) == (32, 64, 2)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (4, 2, 8)
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg.get("pad_token_id")) == (1, 2, None)
    if tied:
        assert "lm_head.weight" not in h
        assert "lm_head.weight" not in index(d)["weight_map"]
    else:
        assert h["lm_head.weight"][:2] == ((128, 32), "BF16")
        assert not torch.equal(tensor(d, "lm_head.weight"), tensor(d, "model.embed_tokens.weight"))
    return h


def _check_llama_tokenizer(d: Path, size: int) -> None:
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == size
    assert (tok.unk_token, tok.bos_token, tok.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2)
    assert tok.pad_token is None and tok.pad_token_id is None
    vocab = tok.get_vocab()
    assert sorted(vocab.values()) == list(range(size))
    # The Llama-style tokenizer prepends <s> unless add_special_tokens=False.
    assert tok("hello world").input_ids == [1, vocab["hello"], vocab["world"]]
    assert tok("hello world", add_special_tokens=False).input_ids == [vocab["hello"], vocab["world"]]


def test_fx_b_llama_untied(built: dict[str, Path]) -> None:
    d = built["llama-untied-tiny"]
    _check_llama_layout(d, tied=False)
    _check_llama_tokenizer(d, 128)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr()


def test_fx_c_llama_tied_sharded(built: dict[str, Path]) -> None:
    d = built["llama-tied-sharded"]
    _check_llama_layout(d, tied=True)
    _check_llama_tokenizer(d, 128)
    model = AutoModelForCausalLM.from_pretrained(d)
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


def test_fx_d_padded_vocab(built: dict[str, Path]) -> None:
    d = built["padded-vocab"]
    _check_llama_layout(d, tied=True)
    _check_llama_tokenizer(d, 120)
    assert config(d)["vocab_size"] == 128
    w = tensor(d, "model.embed_tokens.weight").float()
    spare = w[120:]
    assert_all_rows_nonzero(spare)
    assert spare.abs().max() < 6 * SPARE_ROW_STD
    assert spare.abs().mean() < w[:120].abs().mean() / 4
    assert not torch.equal(spare[0], spare[1])


def test_fx_e_reserved_zero(built: dict[str, Path]) -> None:
    d = built["reserved-zero"]
    _check_llama_layout(d, tied=False)
    _check_llama_tokenizer(d, 128)
    tok = AutoTokenizer.from_pretrained(d)
    assert tok.convert_ids_to_tokens(list(range(120, 128))) == RESERVED
    assert set(RESERVED) <= set(tok.all_special_tokens)
    assert tok("<|reserved_3|>", add_special_tokens=False).input_ids == [123]
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        w = tensor(d, key)
        assert torch.count_nonzero(w[120:]) == 0, key
        assert_all_rows_nonzero(w[:120])


def test_fx_f_bert_mlm(built: dict[str, Path]) -> None:
    d = built["bert-mlm-tiny"]
    h = header(d)
    assert [p.name for p in tensor_files(d)] == ["model.safetensors"]
    assert h["bert.embeddings.word_embeddings.weight"][:2] == ((100, 32), "F32")
    assert h["cls.predictions.bias"][:2] == ((100,), "F32")
    assert "cls.predictions.decoder.weight" not in h
    assert "cls.predictions.decoder.bias" not in h
    assert not [k for k in h if "pooler" in k]
    assert {v[1] for v in h.values()} == {"F32"}
    bias = tensor(d, "cls.predictions.bias")
    assert torch.count_nonzero(bias) == 100
    assert 0.01 < bias.std().item() < 0.04
    cfg = config(d)
    assert cfg["model_type"] == "bert"
    assert cfg["tie_word_embeddings"] is True
    assert (cfg["vocab_size"], cfg["hidden_size"], cfg["num_hidden_layers"]) == (100, 32, 2)
    assert (cfg["num_attention_heads"], cfg["intermediate_size"]) == (2, 64)
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == 100
    assert [tok.pad_token, tok.unk_token, tok.cls_token, tok.sep_token, tok.mask_token] == [
        "[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"
    ]  # fmt: skip
    assert [tok.pad_token_id, tok.unk_token_id, tok.cls_token_id, tok.sep_token_id, tok.mask_token_id] == [
        0, 1, 2, 3, 4
    ]  # fmt: skip
    assert cfg["pad_token_id"] == tok.pad_token_id
    vocab = tok.get_vocab()
    assert tok("Hello world").input_ids == [2, vocab["hello"], vocab["world"], 3]
    model = BertForMaskedLM.from_pretrained(d)
    emb = model.bert.embeddings.word_embeddings.weight
    assert model.cls.predictions.decoder.weight.data_ptr() == emb.data_ptr()
    assert torch.equal(model.cls.predictions.bias.detach(), bias)
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([[2, vocab["hello"], 4, 3]])).logits
    assert logits.shape == (1, 4, 100)


def test_bert_plain(built: dict[str, Path]) -> None:
    d = built["bert-plain-tiny"]
    h = header(d)
    assert h["embeddings.word_embeddings.weight"][:2] == ((100, 32), "F32")
    assert h["pooler.dense.weight"][:2] == ((32, 32), "F32")
    assert h["pooler.dense.bias"][:2] == ((32,), "F32")
    assert not [k for k in h if k.startswith(("bert.", "cls."))]
    assert "lm_head.weight" not in h
    cfg = config(d)
    assert cfg["architectures"] == ["BertModel"]
    assert cfg["vocab_size"] == 100
    assert len(AutoTokenizer.from_pretrained(d)) == 100


def test_qwen2_padded(built: dict[str, Path]) -> None:
    d = built["qwen2-padded-tiny"]
    h = header(d)
    assert [p.name for p in tensor_files(d)] == ["model.safetensors"]
    assert h["model.embed_tokens.weight"][:2] == ((128, 32), "BF16")
    assert h["lm_head.weight"][:2] == ((128, 32), "BF16")
    assert h["model.layers.0.self_attn.q_proj.bias"][0] == (32,)
    assert h["model.layers.0.self_attn.k_proj.weight"][0] == (16, 32)
    assert {v[1] for v in h.values()} == {"BF16"}
    cfg = config(d)
    assert cfg["model_type"] == "qwen2"
    assert cfg["tie_word_embeddings"] is False
    assert cfg["vocab_size"] == 128
    tok = AutoTokenizer.from_pretrained(d)
    assert len(tok) == 120
    assert tok.unk_token is None and tok.bos_token is None
    assert tok.eos_token == tok.pad_token == "<|endoftext|>"
    assert tok.eos_token_id == cfg["eos_token_id"] == 117
    assert tok.convert_ids_to_tokens([118, 119]) == ["<|im_start|>", "<|im_end|>"]
    assert tok.tokenize("hello world") == ["hello", "Ġ", "world"]
    assert tok.decode(tok("hello world").input_ids) == "hello world"
    for key in ("model.embed_tokens.weight", "lm_head.weight"):
        spare = tensor(d, key).float()[120:]
        assert_all_rows_nonzero(spare)
        assert spare.abs().max() < 6 * SPARE_ROW_STD


# --------------------------------------------------------------------------------------------------- make()


def test_make_accepts_factory_dir_and_aliases(tmp_path_factory: pytest.TempPathFactory, tmp_path: Path):
    a = make("FX-A", tmp_path_factory)
    assert (a / "model.safetensors").is_file()
    b = make("llama-untied-tiny", tmp_path)
    assert b == tmp_path / "llama-untied-tiny"
    assert (b / "model.safetensors.index.json").is_file()
    with pytest.raises(FileExistsError):
        make("FX-B", tmp_path)
    with pytest.raises(KeyError):
        make("nope", tmp_path)
    assert set(FX_ALIASES.values()) <= set(FIXTURES)


def test_builders_leave_the_global_rng_alone(tmp_path: Path) -> None:
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    FIXTURES["gpt2-tied-tiny"](tmp_path / "x")
    assert torch.equal(torch.rand(3), expected)
