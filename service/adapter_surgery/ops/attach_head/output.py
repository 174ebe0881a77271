"""The output: drops, renames and new tensors as the writer's changes; config.json and tokenizer files."""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from adapter_surgery.io import Checkpoint, CopiedTensor, NewTensor
from adapter_surgery.io.writer import Changes, TensorSource
from adapter_surgery.model.roles import Architecture
from adapter_surgery.ops.attach_head.initialize import Created
from adapter_surgery.ops.attach_head.keys import Keys
from adapter_surgery.ops.attach_head.pad import Pad
from adapter_surgery.ops.attach_head.tokens import TokenizerFacts
from adapter_surgery.ops.common import ChangedTensor


def key_changes(ckpt: Checkpoint, keys: Keys, replaced: Mapping[str, TensorSource]) -> Changes:
    """Drops and renames as writer changes: a renamed tensor is removed under its key and added under the target's
    name (in source order, so renamed tensors keep their order), with its content from ``replaced`` when it
    changed (the grown input embedding), else copied."""
    remove = {d.name for d in keys.dropped}
    add: dict[str, tuple[TensorSource, str]] = {}
    for key in ckpt.weight_map:
        name = keys.mapping.get(key)
        if name is None or name == key:
            continue
        remove.add(key)
        add[name] = (replaced.get(key) or CopiedTensor(ckpt.info(key), ckpt.path_of(key)), key)
    return Changes(add=add, remove=remove)


def created_changes(ckpt: Checkpoint, created: list[Created], before: Changes) -> Changes:
    """The new tensors, added to the last shard that ``before`` already rewrites (else the last shard), so no other
    shard has to be rewritten for them."""
    busy = before.changed_shards(ckpt)
    shards = list(ckpt.shards)
    shard = next((s for s in reversed(shards) if s in busy), shards[-1])
    anchor = next(k for k, s in ckpt.weight_map.items() if s == shard)
    return Changes(add={c.name: (NewTensor(c.tensor), anchor) for c in created})


def changed_tensors(keys: Keys, created: list[Created], vocab_changed: list[ChangedTensor]) -> list[ChangedTensor]:
    """The changed tensors as the result lists them (output names): the grown vocabulary tensors, then the new."""
    out = [ChangedTensor(name=keys.mapping.get(c.name, c.name), shape_before=c.shape_before, shape=c.shape)
           for c in vocab_changed]
    out += [ChangedTensor(name=c.name, shape_before=None, shape=list(c.tensor.shape)) for c in created]
    return out


def write_side_files(ckpt: Checkpoint, out: Path, arch: Architecture, model_class: str, id2label: dict[int, str],
                     problem_type: str | None, pad: Pad, tok: TokenizerFacts | None) -> None:
    for path in ckpt.other_files():  # small files, copied (never linked) since some are rewritten below
        shutil.copyfile(path, out / path.name)
    config = json.loads(json.dumps(ckpt.config))
    config["architectures"] = [model_class]
    config["id2label"] = {str(i): label for i, label in id2label.items()}
    config["label2id"] = {label: i for i, label in id2label.items()}
    if "num_labels" in config:
        config["num_labels"] = len(id2label)
    if problem_type is None:
        config.pop("problem_type", None)
    else:
        config["problem_type"] = problem_type
    text = config[arch.text_config_key] if arch.text_config_key else config
    if pad.info is not None:
        config["pad_token_id"] = pad.info.id
        text["pad_token_id"] = pad.info.id
    if pad.rows_after != arch.vocab_rows:
        text["vocab_size"] = pad.rows_after
    (out / "config.json").unlink(missing_ok=True)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tok is None or pad.info is None or pad.info.token is None:
        return
    if pad.tokenizer is not None:
        pad.tokenizer.save_pretrained(str(out))
    if tok.pad_token != pad.info.token or pad.tokenizer is not None:
        _set_pad_in_tokenizer_files(out, pad.info.token)


def _set_pad_in_tokenizer_files(out: Path, token: str) -> None:
    """Write ``pad_token`` into ``tokenizer_config.json`` (created if absent) and ``special_tokens_map.json``."""
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = out / name
        if not path.is_file() and name == "special_tokens_map.json":
            continue
        doc = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        doc["pad_token"] = token
        path.unlink(missing_ok=True)  # never write through a link to the source's file
        path.write_text(json.dumps(doc, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
