"""The service's tokenizer cache: outputs byte-identical to a fresh load, the cached tokenizer never changed, a
rewritten tokenizer file loaded again."""

from __future__ import annotations

import json
from pathlib import Path

from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, extend_vocab
from adapter_surgery.tokenizer_cache import TokenizerCache
from tests.conftest import tree_digest


def test_cached_tokenizers_give_the_outputs_of_a_fresh_load(data_dir: Path, build) -> None:
    src = build("FX-B")
    cache = TokenizerCache()

    def run(out: str, tokens: list, cached: bool) -> dict:
        ctx = RunContext(data_dir, tokenizers=cache if cached else None)
        return extend_vocab(ExtendVocabSpec(checkpoint=src, output=out, tokens=tokens), ctx).model_dump()

    first = ["<a>", {"content": "<s1>", "special": True}, "<b>"]
    fresh = run("fresh", first, cached=False)
    for out in ("c1", "c2"):  # a miss, then a hit: each request adds its tokens to its own copy
        got = run(out, first, cached=True)
        assert got["added"] == fresh["added"] and tree_digest(data_dir / out) == tree_digest(data_dir / "fresh")
    other = run("c3", ["<z>"], cached=True)  # the cached tokenizer holds none of the earlier requests' tokens
    assert other["added"] == [{"token": "<z>", "id": fresh["added"][0]["id"]}]
    assert other["tokenizer_size_before"] == fresh["tokenizer_size_before"]

    tok_json = data_dir / src / "tokenizer.json"  # a rewritten tokenizer file is read again
    doc = json.loads(tok_json.read_text())
    doc["added_tokens"].append({"id": len(doc["model"]["vocab"]) + len(doc["added_tokens"]), "content": "<new>",
                                "single_word": False, "lstrip": False, "rstrip": False, "normalized": False,
                                "special": False})
    tok_json.write_text(json.dumps(doc))
    again = run("c4", ["<new>", "<y>"], cached=True)
    assert [t["token"] for t in again["existing"]] == ["<new>"]


def test_a_read_leaves_the_kept_tokenizer_as_it_was(data_dir: Path, build) -> None:
    """attach-head reads the pad and eos tokens off the kept tokenizer (no copy); extend-vocab then gets its copy of
    that same kept tokenizer: its output is that of a fresh load, as when no read came before."""
    from adapter_surgery.ops.attach_head import AttachHeadSpec, attach_head

    src = build("FX-B")
    tokens = ["<a>", {"content": "<s1>", "special": True}]
    fresh = extend_vocab(ExtendVocabSpec(checkpoint=src, output="fresh", tokens=tokens), RunContext(data_dir))
    cache = TokenizerCache()
    for out in ("head-1", "head-2"):  # a miss (loads and keeps it), then a read of the kept one
        attach_head(AttachHeadSpec(checkpoint=src, output=out, num_labels=2), RunContext(data_dir, tokenizers=cache))
    got = extend_vocab(ExtendVocabSpec(checkpoint=src, output="after-reads", tokens=tokens),
                       RunContext(data_dir, tokenizers=cache))
    assert got.model_dump(exclude={"output", "seconds"}) == fresh.model_dump(exclude={"output", "seconds"})
    assert tree_digest(data_dir / "after-reads") == tree_digest(data_dir / "fresh")
