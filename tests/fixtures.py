"""Builders for tiny, real-format Hugging Face checkpoints used by the test-suite.

Every builder writes a complete model directory with ``save_pretrained`` (config.json, plus
generation_config.json for causal LMs; ``*.safetensors`` plus ``model.safetensors.index.json`` when
sharded) and a real tokenizer saved with ``PreTrainedTokenizerFast.save_pretrained`` (tokenizer.json +
tokenizer_config.json). No hub is needed: tokenizers are assembled locally with the ``tokenizers``
library. Weights are random with a fixed seed (matrices N(0, 0.02), norm scales 1 + N(0, 0.02), biases
N(0, 0.02)), so two builds of the same fixture are byte-identical. Each build takes well under 0.1 s.

FX-A .. FX-F follow the "Fixtures" section of ``/work/shared/cases/README.md``:

- ``build_gpt2_tied`` FX-A gpt2-tied-tiny: GPT2LMHeadModel, vocab 100, tied, fp32, one model.safetensors.
- ``build_llama_untied`` FX-B llama-untied-tiny: LlamaForCausalLM, vocab 128, untied, bf16, 2 shards +
  index, 128-entry tokenizer, bos=1, eos=2, no pad token.
- ``build_llama_tied_sharded`` FX-C llama-tied-sharded: FX-B but tied; 2 shards, no lm_head.weight.
- ``build_padded_vocab`` FX-D padded-vocab: FX-C, but the tokenizer defines ids 0..119 only; 128 rows,
  rows 120..127 ~ N(0, 0.002) (spare rows).
- ``build_reserved_zero`` FX-E reserved-zero: FX-B whose ids 120..127 are the special tokens
  ``<|reserved_0|>`` .. ``<|reserved_7|>``, with all-zero rows in embed_tokens and lm_head.
- ``build_bert_mlm`` FX-F bert-mlm-tiny: BertForMaskedLM, vocab 100, tied decoder, random
  ``cls.predictions.bias`` (100,), no pooler.
- ``build_bert_plain``: BertModel with pooler, no MLM head, vocab 100 (keys without ``bert.`` prefix).
- ``build_qwen2_padded``: Qwen2ForCausalLM, 120-entry tokenizer vs 128 rows, untied, bf16, one file.

Tokenizers
----------
GPT-2, Llama and Qwen2 fixtures use a character-level **BPE** model. Vocab: the special tokens, the 26
lowercase letters, ``Ġ`` (byte-level space; GPT-2 and Qwen2 only), then words from ``WORDS`` with every
prefix of them (``he``, ``hel``, ``hell``, ``hello``), one merge per prefix (``("hel", "l") -> "hell"``),
then single characters from ``FILLER_CHARS`` until the exact size is reached. Lowercase words always
encode; a new word made of known words splits into them:
``tok.tokenize("helloworld") == ["hello", "world"]``, ``tok.tokenize("tokenhead") == ["token", "head"]``.
Get the ids with ``tok("helloworld", add_special_tokens=False).input_ids`` (the Llama tokenizers prepend
``<s>`` otherwise). Pipelines: Llama = ``Whitespace`` pre-tokenizer, ``<unk>`` for unknown characters;
GPT-2 = byte-level as in GPT-2 (``"hello world"`` -> ``hello Ġ world``); Qwen2 = the exact pipeline
transformers' ``Qwen2Tokenizer`` rebuilds on load. Byte-level fixtures have no unk: characters outside
the vocab (upper case, newline, most punctuation) are dropped, as BPE does without an unk token.

BERT fixtures use **WordPiece** (``##`` continuation, lower-casing ``BertNormalizer``,
``BertPreTokenizer``, ``[CLS] $A [SEP]``): ``[PAD] [UNK] [CLS] [SEP] [MASK]`` = ids 0..4, ``a``..``z``,
``##a``..``##z``, ``##``-words, words. ``tok.tokenize("helloworld") == ["hello", "##world"]``.

Use ``FIXTURES[name](dest)`` or ``make(name, tmp_path_factory_or_dir)``.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable, Iterable
from pathlib import Path

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
from transformers import (
    BertConfig,
    BertForMaskedLM,
    BertModel,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

SEED = 1234
INIT_STD = 0.02
SPARE_ROW_STD = 0.002

LETTERS = "abcdefghijklmnopqrstuvwxyz"
# Words with their prefix chains. Order sets the vocab ids and merge ranks; the build keeps a word only if
# every kept word still encodes to itself as a single token. "hello"/"world", "token"/"head" and
# "new"/"model" make concatenations such as "helloworld" split into known words.
WORDS = (
    "the", "this", "with", "hello", "world", "cat", "sat", "on", "mat", "dog", "and", "is", "token", "head",
    "new", "model", "to", "of", "in", "it", "an", "add", "be", "we", "for", "that", "at", "by", "or", "no",
    "yes", "red", "big", "run", "fox", "sun", "day", "up", "go", "me", "my", "us", "so", "do", "if", "as",
    "lazy", "jumps", "over", "quick", "brown", "good", "text", "word", "bird", "fish", "tree", "blue",
)  # fmt: skip
FILLER_CHARS = "0123456789.,!?;:'\"-()[]/&%$#@*+=<>_~"
BERT_SUBWORDS = ("##world", "##head", "##model", "##s", "##ing", "##ed", "##er", "##ly")
SUBWORD_CHECKS = {"helloworld": ["hello", "world"], "tokenhead": ["token", "head"]}

BYTE_LEVEL_SPACE = "Ġ"  # byte-level alphabet symbol of " "
# transformers' Qwen2Tokenizer PRETOKENIZE_REGEX
QWEN_PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"""
    r"""|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

LLAMA_SPECIALS = ["<unk>", "<s>", "</s>"]
GPT2_EOS = "<|endoftext|>"
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
RESERVED = [f"<|reserved_{i}|>" for i in range(8)]
BERT_SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]

# Keys of tokenizer_config.json that transformers 5 writes but only makes sense at load time (see
# /work/shared/checkpoints.md, step 5); dropped so that older transformers load the files as well.
_LOAD_TIME_KEYS = ("backend", "is_local", "local_files_only")


# ----------------------------------------------------------------------------------------------- tokenizers


Merges = list[tuple[str, str]]


def _bpe_model(vocab: dict[str, int], merges: Merges, unk: str | None, style: str) -> Tokenizer:
    """BPE model plus the pipeline of ``style``.

    ``whitespace`` (Llama fixtures): ``Whitespace`` pre-tokenizer, no decoder.
    ``gpt2``: byte-level as in GPT-2's tokenizer.json (ByteLevel pre-tokenizer with the GPT-2 regex, ByteLevel
    decoder and post-processor); a space becomes ``Ġ``.
    ``qwen``: exactly the pipeline transformers' ``Qwen2Tokenizer`` rebuilds on load (NFC, Qwen split regex +
    ByteLevel, ByteLevel decoder), so ``AutoTokenizer`` (which forces ``Qwen2Tokenizer`` for ``model_type``
    qwen2) and ``PreTrainedTokenizerFast`` tokenize identically.
    """
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, fuse_unk=unk is not None))
    if style == "whitespace":
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
    elif style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=True)
    elif style == "qwen":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(Regex(QWEN_PRETOKENIZE_REGEX), behavior="isolated", invert=False),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
        tok.decoder = decoders.ByteLevel()
    else:
        raise ValueError(style)
    return tok


def _bpe_ok(tok: Tokenizer, words: list[str]) -> bool:
    """Every vocab word encodes to itself, and the SUBWORD_CHECKS concatenations split into their words."""
    if any(tok.encode(w, add_special_tokens=False).tokens != [w] for w in words):
        return False
    return all(
        tok.encode(text, add_special_tokens=False).tokens == pieces
        for text, pieces in SUBWORD_CHECKS.items()
        if all(p in words for p in pieces)
    )


def _bpe_vocab(
    front: list[str], back: list[str], size: int, unk: str | None, style: str
) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Vocab of exactly ``size`` entries: ``front`` specials, letters (+ ``Ġ`` if byte-level), word prefix
    chains, fillers, ``back``.

    A word is added with one merge per prefix (``("hel", "l") -> "hell"``); merge ranks follow WORDS order.
    A word whose chain would break a word already in (or itself be broken by earlier merges) is skipped, so
    every word in the vocab encodes as one token. Deterministic: depends only on the constants above.
    """
    tokens: list[str] = [*front, *LETTERS, *([] if style == "whitespace" else [BYTE_LEVEL_SPACE])]
    merges: list[tuple[str, str]] = []
    words: list[str] = []
    room = size - len(back)
    for word in WORDS:
        new = [word[:i] for i in range(2, len(word) + 1) if word[:i] not in tokens]
        if len(tokens) + len(new) > room:
            continue
        cand_tokens = tokens + new
        cand_merges = merges + [(piece[:-1], piece[-1]) for piece in new]
        vocab = {tok: i for i, tok in enumerate(cand_tokens)}
        if _bpe_ok(_bpe_model(vocab, cand_merges, unk if unk in vocab else None, style), [*words, word]):
            tokens, merges = cand_tokens, cand_merges
            words.append(word)
    fillers = iter(FILLER_CHARS)
    while len(tokens) < room:
        tokens.append(next(fillers))
    tokens.extend(back)
    assert len(tokens) == size == len(set(tokens)), (len(tokens), size)
    for pieces in SUBWORD_CHECKS.values():
        assert all(p in words for p in pieces), (pieces, words)
    return {tok: i for i, tok in enumerate(tokens)}, merges


def _check_bpe(tok: Tokenizer, vocab: dict[str, int]) -> None:
    words = [w for w in WORDS if w in vocab]
    assert _bpe_ok(tok, words), [(w, tok.encode(w).tokens) for w in words]


def _bpe_tokenizer(
    *,
    size: int,
    front: list[str],
    back: list[str],
    unk: str | None,
    bos_template: str | None,
    style: str,
) -> Tokenizer:
    vocab, merges = _bpe_vocab(front, back, size, unk, style)
    tok = _bpe_model(vocab, merges, unk, style)
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in [*front, *back]])
    if bos_template is not None:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos_template} $A",
            pair=f"{bos_template} $A {bos_template} $B",
            special_tokens=[(bos_template, vocab[bos_template])],
        )
    _check_bpe(tok, vocab)
    assert tok.get_vocab_size(with_added_tokens=True) == size
    return tok


def _wordpiece_tokenizer(size: int) -> Tokenizer:
    tokens: list[str] = [*BERT_SPECIALS, *LETTERS, *(f"##{c}" for c in LETTERS)]
    for piece in (*BERT_SUBWORDS, *WORDS):
        if len(tokens) >= size:
            break
        if piece not in tokens:
            tokens.append(piece)
    fillers = iter(FILLER_CHARS)
    while len(tokens) < size:
        tokens.append(next(fillers))
    assert len(tokens) == size == len(set(tokens))
    for needed in ("hello", "##world", "token", "##head"):
        assert needed in tokens, needed
    vocab = {t: i for i, t in enumerate(tokens)}
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token="[UNK]", continuing_subword_prefix="##"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=True)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]",
        pair="[CLS] $A [SEP] $B:1 [SEP]:1",
        special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
    )
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in BERT_SPECIALS])
    got = tok.encode("helloworld", add_special_tokens=False).tokens
    assert got == ["hello", "##world"], got
    assert tok.get_vocab_size(with_added_tokens=True) == size
    return tok


def _save_tokenizer(
    tok: Tokenizer,
    dest: Path,
    *,
    model_max_length: int,
    config_overrides: dict[str, object] | None = None,
    **special: object,
) -> None:
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, model_max_length=model_max_length, **special)
    fast.save_pretrained(dest)
    cfg_path = dest / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    for key in _LOAD_TIME_KEYS:
        cfg.pop(key, None)
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    cfg.update(config_overrides or {})
    cfg_path.write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def gpt2_tokenizer() -> Tokenizer:
    """Byte-level, 100 entries; ``<|endoftext|>`` is the last id (99) as in GPT-2; no unk in the BPE model."""
    return _bpe_tokenizer(size=100, front=[], back=[GPT2_EOS], unk=None, bos_template=None, style="gpt2")


def llama_tokenizer(size: int = 128, reserved: Iterable[str] = ()) -> Tokenizer:
    """``<unk>``=0, ``<s>``=1, ``</s>``=2, letters, words; ``reserved`` specials take the last ids.

    The post-processor prepends ``<s>`` (as Llama tokenizers do)."""
    return _bpe_tokenizer(
        size=size,
        front=LLAMA_SPECIALS,
        back=list(reserved),
        unk="<unk>",
        bos_template="<s>",
        style="whitespace",
    )


def qwen_tokenizer(size: int = 120) -> Tokenizer:
    """Qwen-like byte-level: no unk/bos; ``<|endoftext|>``, ``<|im_start|>``, ``<|im_end|>`` = last 3 ids."""
    return _bpe_tokenizer(size=size, front=[], back=QWEN_SPECIALS, unk=None, bos_template=None, style="qwen")


def bert_tokenizer(size: int = 100) -> Tokenizer:
    return _wordpiece_tokenizer(size)


def _save_llama_tokenizer(dest: Path, size: int, reserved: list[str] | None = None) -> None:
    _save_tokenizer(
        llama_tokenizer(size, reserved or ()),
        dest,
        model_max_length=2048,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        **({"extra_special_tokens": reserved} if reserved else {}),
    )


def _save_bert_tokenizer(dest: Path) -> None:
    _save_tokenizer(
        bert_tokenizer(100),
        dest,
        model_max_length=64,
        unk_token="[UNK]",
        sep_token="[SEP]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        mask_token="[MASK]",
        do_lower_case=True,
    )


# -------------------------------------------------------------------------------------------------- weights


def _randomize(model: PreTrainedModel) -> None:
    """Random, non-trivial values everywhere (uses the global RNG seeded by the caller).

    Matrices (incl. every embedding row, also a padding_idx row) ~ N(0, 0.02); 1-D ``weight`` (norm scales)
    ~ 1 + N(0, 0.02); 1-D ``bias`` ~ N(0, 0.02). Tied parameters are visited once.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.dim() >= 2 or name.endswith("bias"):
                param.normal_(0.0, INIT_STD)
            else:
                param.normal_(1.0, INIT_STD)


def _save_model(model: PreTrainedModel, dest: Path, *, dtype: torch.dtype, shards: int = 1) -> None:
    model = model.to(dtype)
    if shards == 1:
        model.save_pretrained(dest, max_shard_size="1GB")
        return
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    # Greedy packing: a limit a bit above total/shards gives exactly `shards` files for these tiny models.
    model.save_pretrained(dest, max_shard_size=total // shards + total // 8)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) == shards, files
    assert sorted(files) == sorted(p.name for p in dest.glob("model-*.safetensors")), files


def _llama_config(*, tied: bool, vocab_size: int = 128) -> LlamaConfig:
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        max_position_embeddings=2048,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=None,
        tie_word_embeddings=tied,
    )


def _seeded(builder: Callable[[Path], Path]) -> Callable[[Path], Path]:
    """Run ``builder`` with ``torch.manual_seed(SEED)`` inside a forked RNG, so builds are deterministic and
    do not disturb the caller's random state."""

    @functools.wraps(builder)
    def run(dest: Path) -> Path:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            return builder(dest)

    return run


def _prepare(dest: Path | str) -> Path:
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    return dest


# ------------------------------------------------------------------------------------------------- builders


@_seeded
def build_gpt2_tied(dest: Path) -> Path:
    """FX-A gpt2-tied-tiny. Key ``transformer.wte.weight`` (100, 32); no ``lm_head.weight`` (tied)."""
    dest = _prepare(dest)
    config = GPT2Config(
        vocab_size=100,
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=64,
        bos_token_id=99,
        eos_token_id=99,
        tie_word_embeddings=True,
    )
    model = GPT2LMHeadModel(config)
    _randomize(model)
    _save_model(model, dest, dtype=torch.float32)
    _save_tokenizer(
        gpt2_tokenizer(),
        dest,
        model_max_length=64,
        bos_token=GPT2_EOS,
        eos_token=GPT2_EOS,
        unk_token=GPT2_EOS,
    )
    return dest


@_seeded
def build_llama_untied(dest: Path) -> Path:
    """FX-B llama-untied-tiny. ``model.embed_tokens.weight``, ``lm_head.weight`` (128, 32), bf16, 2 shards."""
    dest = _prepare(dest)
    model = LlamaForCausalLM(_llama_config(tied=False))
    _randomize(model)
    _save_model(model, dest, dtype=torch.bfloat16, shards=2)
    _save_llama_tokenizer(dest, 128)
    return dest


@_seeded
def build_llama_tied_sharded(dest: Path) -> Path:
    """FX-C llama-tied-sharded. ``model.embed_tokens.weight`` (128, 32); no ``lm_head.weight``; 2 shards."""
    dest = _prepare(dest)
    model = LlamaForCausalLM(_llama_config(tied=True))
    _randomize(model)
    _save_model(model, dest, dtype=torch.bfloat16, shards=2)
    _save_llama_tokenizer(dest, 128)
    return dest


@_seeded
def build_padded_vocab(dest: Path) -> Path:
    """FX-D padded-vocab. FX-C with a 120-entry tokenizer; rows 120..127 ~ N(0, 0.002) (spare rows)."""
    dest = _prepare(dest)
    model = LlamaForCausalLM(_llama_config(tied=True))
    _randomize(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[120:].normal_(0.0, SPARE_ROW_STD)
    _save_model(model, dest, dtype=torch.bfloat16, shards=2)
    _save_llama_tokenizer(dest, 120)
    return dest


@_seeded
def build_reserved_zero(dest: Path) -> Path:
    """FX-E reserved-zero. FX-B; ids 120..127 = ``<|reserved_i|>`` specials with zero embed/lm_head rows."""
    dest = _prepare(dest)
    model = LlamaForCausalLM(_llama_config(tied=False))
    _randomize(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[120:].zero_()
        model.get_output_embeddings().weight[120:].zero_()
    _save_model(model, dest, dtype=torch.bfloat16, shards=2)
    _save_llama_tokenizer(dest, 128, reserved=RESERVED)
    return dest


@_seeded
def build_bert_mlm(dest: Path) -> Path:
    """FX-F bert-mlm-tiny. Keys: ``bert.embeddings.word_embeddings.weight`` (100, 32),
    ``cls.predictions.bias`` (100,) random; no ``cls.predictions.decoder.weight`` (tied), no pooler."""
    dest = _prepare(dest)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    model = BertForMaskedLM(config)
    _randomize(model)
    _save_model(model, dest, dtype=torch.float32)
    _save_bert_tokenizer(dest)
    return dest


@_seeded
def build_bert_plain(dest: Path) -> Path:
    """BertModel with pooler, no MLM head. Keys without ``bert.`` prefix:
    ``embeddings.word_embeddings.weight`` (100, 32), ``pooler.dense.weight`` (32, 32)."""
    dest = _prepare(dest)
    config = BertConfig(
        vocab_size=100,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        pad_token_id=0,
    )
    model = BertModel(config, add_pooling_layer=True)
    _randomize(model)
    _save_model(model, dest, dtype=torch.float32)
    _save_bert_tokenizer(dest)
    return dest


@_seeded
def build_qwen2_padded(dest: Path) -> Path:
    """Qwen2ForCausalLM: 120-entry tokenizer vs 128 rows, untied, bf16, one file.

    Keys ``model.embed_tokens.weight`` and ``lm_head.weight`` (128, 32); rows 120..127 of both
    ~ N(0, 0.002); q/k/v have biases."""
    dest = _prepare(dest)
    eos = 117  # "<|endoftext|>"
    config = Qwen2Config(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=2048,
        bos_token_id=eos,
        eos_token_id=eos,
        tie_word_embeddings=False,
    )
    model = Qwen2ForCausalLM(config)
    _randomize(model)
    with torch.no_grad():
        model.get_input_embeddings().weight[120:].normal_(0.0, SPARE_ROW_STD)
        model.get_output_embeddings().weight[120:].normal_(0.0, SPARE_ROW_STD)
    _save_model(model, dest, dtype=torch.bfloat16)
    _save_tokenizer(
        qwen_tokenizer(120),
        dest,
        model_max_length=2048,
        eos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
        # As in Qwen2.5's tokenizer_config.json; Qwen2Tokenizer would otherwise default unk to <|endoftext|>.
        config_overrides={"unk_token": None, "bos_token": None, "add_prefix_space": False},
    )
    return dest


FIXTURES: dict[str, Callable[[Path], Path]] = {
    "gpt2-tied-tiny": build_gpt2_tied,  # FX-A
    "llama-untied-tiny": build_llama_untied,  # FX-B
    "llama-tied-sharded": build_llama_tied_sharded,  # FX-C
    "padded-vocab": build_padded_vocab,  # FX-D
    "reserved-zero": build_reserved_zero,  # FX-E
    "bert-mlm-tiny": build_bert_mlm,  # FX-F
    "bert-plain-tiny": build_bert_plain,
    "qwen2-padded-tiny": build_qwen2_padded,
}
FX_ALIASES = {
    "FX-A": "gpt2-tied-tiny",
    "FX-B": "llama-untied-tiny",
    "FX-C": "llama-tied-sharded",
    "FX-D": "padded-vocab",
    "FX-E": "reserved-zero",
    "FX-F": "bert-mlm-tiny",
}


def make(name: str, tmp_path_factory_or_dir: object) -> Path:
    """Build fixture ``name`` (a FIXTURES key or an alias such as ``"FX-B"``) into a fresh directory.

    Accepts pytest's ``tmp_path_factory`` (a new numbered dir from ``mktemp``) or a directory path (the
    fixture goes to ``<dir>/<name>``, which must not exist yet or be empty). Returns the model directory.
    """
    key = FX_ALIASES.get(name, name)
    if key not in FIXTURES:
        raise KeyError(f"unknown fixture {name!r}; known: {sorted(FIXTURES)} and {sorted(FX_ALIASES)}")
    mktemp = getattr(tmp_path_factory_or_dir, "mktemp", None)
    if callable(mktemp):
        dest = Path(mktemp(key))
    else:
        dest = Path(tmp_path_factory_or_dir) / key  # type: ignore[arg-type]
        if dest.exists() and any(dest.iterdir()):
            raise FileExistsError(f"{dest} is not empty")
    return FIXTURES[key](dest)
