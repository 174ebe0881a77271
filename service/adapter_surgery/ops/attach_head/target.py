"""The target class, from transformers' classification mappings (``AutoModelFor{Sequence,Token}Classification``
of the config's ``model_type``), built on the ``meta`` device; the config, tokenizer and dtype it is built from."""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn

from adapter_surgery.config_check import transformers_config_error
from adapter_surgery.errors import InvalidCheckpoint, InvalidSpec
from adapter_surgery.io import Checkpoint
from adapter_surgery.model.roles import Architecture, quiet_transformers
from adapter_surgery.paths import without_dirs

if TYPE_CHECKING:  # pad.py imports this module
    from adapter_surgery.ops.attach_head.pad import Pad

#: transformers' auto-mapping (in ``transformers.models.auto.modeling_auto``) of each task.
TASK_MAPPINGS = {
    "sequence_classification": "MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING_NAMES",
    "token_classification": "MODEL_FOR_TOKEN_CLASSIFICATION_MAPPING_NAMES",
}


def auto_config(ckpt: Checkpoint):  # -> PretrainedConfig
    import transformers

    try:
        with quiet_transformers():
            return transformers.AutoConfig.from_pretrained(str(ckpt.root), local_files_only=True)
    except Exception as exc:  # transformers raises many kinds for broken configs
        refused = transformers_config_error(exc)
        if refused is not None:
            raise refused from None
        raise InvalidCheckpoint(f"config.json cannot be loaded ({type(exc).__name__}: "
                                f"{without_dirs(str(exc), ckpt.directory)})", field="checkpoint",
                                fix="Send a config.json that transformers can load.") from None


def target_class(config, task: str) -> type[nn.Module]:
    import transformers
    from transformers.models.auto import modeling_auto

    names = getattr(modeling_auto, TASK_MAPPINGS[task])
    name = names.get(config.model_type)
    if not isinstance(name, str) or not hasattr(transformers, name):
        raise InvalidSpec(f"transformers has no {task} class for model_type {config.model_type!r}", field="task",
                          fix="Choose the other task, or a checkpoint whose architecture has such a class.")
    return getattr(transformers, name)


def meta_model(cls: type[nn.Module], config) -> nn.Module:
    with quiet_transformers(), torch.device("meta"):
        return cls(config)


def embedding_dtype(ckpt: Checkpoint, arch: Architecture) -> torch.dtype:
    dtype = ckpt.info(arch.input_embedding).torch_dtype
    return dtype if dtype is not None and dtype.is_floating_point else torch.float32


def text_config(config):
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def configured(config, id2label: dict[int, str], problem_type: str | None, pad: Pad, arch: Architecture):
    """A copy of the transformers config with what the target class is built from (labels, pad id, vocab size);
    ``config`` itself is left as it is."""
    config = copy.deepcopy(config)
    config.id2label = dict(id2label)
    config.label2id = {v: k for k, v in id2label.items()}
    config.problem_type = problem_type
    text = text_config(config)
    if pad.info is not None:
        config.pad_token_id = pad.info.id
        text.pad_token_id = pad.info.id
    if pad.rows_after != arch.vocab_rows:
        text.vocab_size = pad.rows_after
    return config
