"""extend-vocab's planning flows one way: ``plan_vocab`` loads the tokenizer it extends and returns it new."""

from __future__ import annotations

from pathlib import Path

from transformers import AutoTokenizer

from adapter_surgery.io import Checkpoint
from adapter_surgery.model.roles import resolve_architecture
from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, plan_vocab


def test_each_plan_grows_its_own_tokenizer_from_the_checkpoint(data_dir: Path, build) -> None:
    name = build("FX-B")  # 128 ids, 128 rows
    ckpt = Checkpoint.open(data_dir / name)
    arch = resolve_architecture(ckpt)
    spec = ExtendVocabSpec(checkpoint=name, output="out",
                           tokens=["<a>", {"content": "<b>", "special": True}, "hello",
                                   {"content": "<c>", "init": "subword_mean", "description": "helloworld"}])
    first, second = plan_vocab(spec, ckpt, arch), plan_vocab(spec, ckpt, arch)
    assert first.tokenizer is not second.tokenizer
    base = AutoTokenizer.from_pretrained(str(data_dir / name))
    for planned in (first, second):  # the second plan starts from the checkpoint, not from the first's tokenizer
        assert [(t.token, t.id) for t in planned.plan.added] == [("<a>", 128), ("<b>", 129), ("<c>", 130)]
        assert [(t.token, t.id) for t in planned.plan.existing] == [("hello", base.convert_tokens_to_ids("hello"))]
        assert len(planned.tokenizer) == 131 and planned.plan.tok_before == 128 and planned.plan.rows_after == 131
        assert planned.tokenizer.convert_tokens_to_ids(["<a>", "<b>", "<c>"]) == [128, 129, 130]
        # subword_mean pieces come from the tokenizer before it grew: the base's split of the description
        pieces = base("helloworld", add_special_tokens=False)["input_ids"]
        assert [(r.id, r.strategy, r.sources) for r in planned.plan.rows] == [
            (128, "mean", []), (129, "mean", []), (130, "subword_mean", pieces)]
    assert len(pieces) == 2
