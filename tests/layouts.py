"""Tiny checkpoints whose key layout differs from their class, saved by ``transformers`` itself.

Each builder writes a model directory with ``save_pretrained`` (random weights, fixed seed, fp32, no tokenizer), then
optionally renames its keys the way other checkpoints in the wild name them:

- ``llava``: ``LlavaForConditionalGeneration.save_pretrained`` (transformers 5 writes ``language_model.model.*``,
  ``language_model.lm_head.weight``, ``vision_tower.*``, ``multi_modal_projector.*``: the hub's layout), untied.
- ``llava-tied``: the same with ``text_config.tie_word_embeddings`` true (no ``lm_head`` stored).
- ``llava-class``: the class's own names (``model.language_model.*``, ``model.vision_tower.*``, ``lm_head.weight``).
- ``llava-doubled``: ``model.language_model.model.*`` (written by transformers 5.10-5.23, mapped by its ``legacy``
  rules).
- ``qwen2vl``: ``Qwen2VLForConditionalGeneration.save_pretrained`` (``model.layers.*``, ``visual.*``, ``lm_head``).
- ``qwen2vl-class``: ``model.language_model.*``, ``model.visual.*``.
- ``t5`` (tied: ``shared.weight`` only), ``bart`` (``model.shared.weight``, ``final_logits_bias``).
- ``llama-base``: ``LlamaModel`` (keys without ``model.``); ``llama-base-causal``: the same keys with a tied
  ``LlamaForCausalLM`` config.json (a base-model checkpoint without the head prefix).
- ``gpt2-base``: ``GPT2Model``; ``gpt2-old``: ``GPT2LMHeadModel`` config.json over keys without ``transformer.``
  (the original GPT-2 hub checkpoints).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    CLIPVisionConfig,
    GPT2Config,
    GPT2LMHeadModel,
    GPT2Model,
    LlamaConfig,
    LlamaForCausalLM,
    LlamaModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedModel,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)

from tests.fixtures import _randomize

SEED = 1234
VOCAB = 128
IDS = torch.tensor([[1, 5, 9, 17, 33, 60, 90, 7, 100, 3]])  # text only: no image token (LLaVA 127, Qwen2-VL 120..)
TEXT = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _save(model: PreTrainedModel, dest: Path) -> Path:
    torch.manual_seed(SEED)
    _randomize(model)
    model.save_pretrained(dest)
    return dest


def rename_keys(dest: Path, rules: list[tuple[str, str]], config: dict | None = None) -> Path:
    """Rewrite ``model.safetensors`` with each key's first matching prefix rule applied (and config.json)."""
    path = dest / "model.safetensors"
    state = load_file(str(path))
    out = {}
    for key, value in state.items():
        for old, new in rules:
            if key.startswith(old):
                key = new + key[len(old):]
                break
        out[key] = value
    save_file(out, str(path), metadata={"format": "pt"})
    if config is not None:
        (dest / "config.json").write_text(json.dumps(config, indent=2))
    return dest


def _llava(dest: Path, tied: bool = False) -> Path:
    cfg = LlavaConfig(text_config=LlamaConfig(**TEXT, head_dim=8, tie_word_embeddings=tied),
                      vision_config=CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                                     num_attention_heads=2, image_size=16, patch_size=8),
                      image_token_index=127, tie_word_embeddings=tied)
    return _save(LlavaForConditionalGeneration(cfg), dest)


def _qwen2vl(dest: Path) -> Path:
    cfg = Qwen2VLConfig(
        text_config=dict(model_type="qwen2_vl_text", **TEXT,
                         rope_scaling={"type": "mrope", "mrope_section": [1, 1, 2]}),
        vision_config=dict(depth=1, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=4,
                           spatial_merge_size=2, temporal_patch_size=2),
        image_token_id=120, video_token_id=121, vision_start_token_id=122, tie_word_embeddings=False)
    return _save(Qwen2VLForConditionalGeneration(cfg), dest)


def _t5(dest: Path) -> Path:
    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4, decoder_start_token_id=0,
                   pad_token_id=0, eos_token_id=1)
    return _save(T5ForConditionalGeneration(cfg), dest)


def _bart(dest: Path) -> Path:
    cfg = BartConfig(vocab_size=VOCAB, d_model=32, encoder_layers=1, decoder_layers=1, encoder_attention_heads=2,
                     decoder_attention_heads=2, encoder_ffn_dim=64, decoder_ffn_dim=64, max_position_embeddings=64)
    return _save(BartForConditionalGeneration(cfg), dest)


def _gpt2_config() -> GPT2Config:
    return GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=2,
                      eos_token_id=2, pad_token_id=0)


def _llama_base_causal(dest: Path) -> Path:
    _save(LlamaModel(LlamaConfig(**TEXT, head_dim=8)), dest)
    cfg = {**LlamaConfig(**TEXT, head_dim=8, tie_word_embeddings=True).to_dict(),
           "architectures": [LlamaForCausalLM.__name__]}
    return rename_keys(dest, [], config=cfg)


def _gpt2_old(dest: Path) -> Path:
    _save(GPT2LMHeadModel(_gpt2_config()), dest)
    return rename_keys(dest, [("transformer.", "")])


LLAVA_CLASS = [("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
               ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")]
LAYOUTS: dict[str, Callable[[Path], Path]] = {
    "llava": _llava,
    "llava-tied": lambda d: _llava(d, tied=True),
    "llava-class": lambda d: rename_keys(_llava(d), LLAVA_CLASS),
    "llava-doubled": lambda d: rename_keys(_llava(d), [("language_model.model.", "model.language_model.model."),
                                                       *LLAVA_CLASS[1:]]),
    "qwen2vl": _qwen2vl,
    "qwen2vl-class": lambda d: rename_keys(_qwen2vl(d), [("model.", "model.language_model."),
                                                          ("visual.", "model.visual.")]),
    "t5": _t5,
    "bart": _bart,
    "llama-base": lambda d: _save(LlamaModel(LlamaConfig(**TEXT, head_dim=8)), d),
    "llama-base-causal": _llama_base_causal,
    "gpt2-base": lambda d: _save(GPT2Model(_gpt2_config()), d),
    "gpt2-old": _gpt2_old,
}
#: Prefixes of the tensors that are no part of the text model (they must come out byte-identical).
NON_TEXT = ("vision_tower.", "model.vision_tower.", "multi_modal_projector.", "model.multi_modal_projector.",
            "visual.", "model.visual.")


def build(name: str, root: Path) -> Path:
    """Build layout ``name`` at ``root / name`` (once; later calls return it)."""
    dest = root / name
    if not (dest / "config.json").exists():
        with torch.random.fork_rng(devices=[]):
            LAYOUTS[name](dest)
    return dest


def model_class(dest: Path) -> type[PreTrainedModel]:
    import transformers

    return getattr(transformers, json.loads((dest / "config.json").read_text())["architectures"][0])
