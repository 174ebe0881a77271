"""Tiny random models of every family the coverage matrix covers, built from a config by ``transformers`` itself.

Each family is a config (hidden 16-32, 2 layers, vocabulary 100-128), the class that ``save_pretrained`` writes, the
tokenizer saved beside it (the fixtures' character-level BPE / WordPiece tokenizers of ``tests.fixtures``) and the
inputs its forward pass takes. Weights are random with a fixed seed (``tests.fixtures._randomize``), float32, one
``model.safetensors``. Ids 5..40 are ordinary tokens (letters, words) in every tokenizer here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import transformers as tf

from tests.fixtures import (
    GPT2_EOS,
    QWEN_SPECIALS,
    _randomize,
    _save_bert_tokenizer,
    _save_llama_tokenizer,
    _save_tokenizer,
    gpt2_tokenizer,
    qwen_tokenizer,
)

SEED = 1234
IDS = torch.tensor([[5, 9, 17, 33, 30, 12, 7, 21]])
DECODER_IDS = torch.tensor([[2, 6, 11, 19]])

#: The sizes every decoder config shares.
_DEC: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, head_dim=8, max_position_embeddings=256)
_ENC: dict[str, Any] = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                            max_position_embeddings=64, vocab_size=100, pad_token_id=0)
_LLAMA_IDS: dict[str, Any] = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=None)
_QWEN_IDS: dict[str, Any] = dict(vocab_size=120, bos_token_id=117, eos_token_id=117, pad_token_id=None)
_GPT2_IDS: dict[str, Any] = dict(vocab_size=100, bos_token_id=99, eos_token_id=99)
IMAGE_TOKEN = "<image>"


@dataclass(frozen=True)
class Family:
    """One model family: how to build it and how to run it.

    ``tokenizer``: ``llama`` (128 entries), ``qwen`` (120), ``gpt2`` (100), ``bert`` (100), ``llava`` (Llama's plus
    ``<image>`` as id 127). ``seq2seq``: the forward pass also takes ``decoder_input_ids``.
    """

    name: str
    model_class: str
    config: Callable[[], Any]
    tokenizer: str
    seq2seq: bool = False
    notes: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def cls(self) -> type:
        return getattr(tf, self.model_class)

    def inputs(self) -> dict[str, torch.Tensor]:
        return {"input_ids": IDS, **({"decoder_input_ids": DECODER_IDS} if self.seq2seq else {})}

    def build(self, dest: Path) -> Path:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(SEED)
            model = self.cls()(self.config())
            _randomize(model)
            model.eval()
            dest.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(dest)
        _TOKENIZERS[self.tokenizer](dest)
        return dest


def _save_qwen_tokenizer(dest: Path) -> None:
    _save_tokenizer(qwen_tokenizer(120), dest, model_max_length=256, eos_token=QWEN_SPECIALS[0],
                    pad_token=QWEN_SPECIALS[0], extra_special_tokens=QWEN_SPECIALS[1:],
                    config_overrides={"unk_token": None, "bos_token": None, "add_prefix_space": False})


def _save_gpt2_tokenizer(dest: Path) -> None:
    _save_tokenizer(gpt2_tokenizer(), dest, model_max_length=64, bos_token=GPT2_EOS, eos_token=GPT2_EOS,
                    unk_token=GPT2_EOS)


_TOKENIZERS: dict[str, Callable[[Path], None]] = {
    "llama": lambda dest: _save_llama_tokenizer(dest, 128),
    "llava": lambda dest: _save_llama_tokenizer(dest, 128, reserved=[IMAGE_TOKEN]),
    "qwen": _save_qwen_tokenizer,
    "gpt2": _save_gpt2_tokenizer,
    "bert": _save_bert_tokenizer,
}


def _llama_text(**kw: Any) -> tf.LlamaConfig:
    return tf.LlamaConfig(**{**_DEC, **_LLAMA_IDS, "tie_word_embeddings": False, **kw})


def _clip_vision() -> tf.CLIPVisionConfig:
    return tf.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
                               image_size=28, patch_size=14, projection_dim=16)


def _qwen2_vl() -> tf.Qwen2VLConfig:
    text = {**_DEC, **_QWEN_IDS, "vocab_size": 128, "tie_word_embeddings": False,
            "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 1, 1]}}
    text.pop("head_dim")
    vision = dict(depth=2, embed_dim=16, hidden_size=32, num_heads=2, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2, in_channels=3)
    # Ids 120..123 exist in the 128-row embedding only (no tokenizer entry): the multimodal markers.
    return tf.Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=120, video_token_id=121,
                            vision_start_token_id=122, vision_end_token_id=123, tie_word_embeddings=False)


FAMILIES: list[Family] = [
    Family("Llama", "LlamaForCausalLM", lambda: _llama_text(), "llama"),
    Family("Mistral", "MistralForCausalLM",
           lambda: tf.MistralConfig(**{**_DEC, **_LLAMA_IDS, "sliding_window": 64, "tie_word_embeddings": False}),
           "llama"),
    Family("Qwen2", "Qwen2ForCausalLM",
           lambda: tf.Qwen2Config(**{**_DEC, **_QWEN_IDS, "vocab_size": 128, "tie_word_embeddings": False}),
           "qwen", notes="padded vocabulary: 128 rows, 120 tokenizer entries"),
    Family("Qwen3", "Qwen3ForCausalLM",
           lambda: tf.Qwen3Config(**{**_DEC, **_QWEN_IDS, "tie_word_embeddings": True}), "qwen"),
    Family("Qwen3-MoE", "Qwen3MoeForCausalLM",
           lambda: tf.Qwen3MoeConfig(**{**_DEC, **_QWEN_IDS, "moe_intermediate_size": 16, "num_experts": 4,
                                        "num_experts_per_tok": 2, "decoder_sparse_step": 1,
                                        "tie_word_embeddings": False}), "qwen"),
    Family("Mixtral", "MixtralForCausalLM",
           lambda: tf.MixtralConfig(**{**_DEC, **_LLAMA_IDS, "num_local_experts": 4, "num_experts_per_tok": 2,
                                       "tie_word_embeddings": False}), "llama"),
    Family("Gemma 2", "Gemma2ForCausalLM",
           lambda: tf.Gemma2Config(**{**_DEC, **_LLAMA_IDS, "pad_token_id": 0, "sliding_window": 64,
                                      "tie_word_embeddings": True}), "llama"),
    Family("Gemma 3 (text)", "Gemma3ForCausalLM",
           lambda: tf.Gemma3TextConfig(**{**_DEC, **_LLAMA_IDS, "pad_token_id": 0, "sliding_window": 64,
                                          "tie_word_embeddings": True}), "llama"),
    Family("Phi-3", "Phi3ForCausalLM",
           lambda: tf.Phi3Config(**{**_DEC, **_LLAMA_IDS, "pad_token_id": 0, "tie_word_embeddings": False}),
           "llama", notes="fused qkv_proj / gate_up_proj"),
    Family("GPT-2", "GPT2LMHeadModel",
           lambda: tf.GPT2Config(n_embd=32, n_layer=2, n_head=4, n_positions=64, **_GPT2_IDS), "gpt2",
           notes="Conv1D"),
    Family("GPT-NeoX", "GPTNeoXForCausalLM",
           lambda: tf.GPTNeoXConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    max_position_embeddings=64, tie_word_embeddings=False, **_GPT2_IDS), "gpt2"),
    Family("Falcon", "FalconForCausalLM",
           lambda: tf.FalconConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, **_GPT2_IDS),
           "gpt2", notes="fused query_key_value"),
    Family("BERT", "BertForMaskedLM", lambda: tf.BertConfig(**_ENC), "bert"),
    Family("RoBERTa", "RobertaForMaskedLM", lambda: tf.RobertaConfig(**{**_ENC, "bos_token_id": 2,
                                                                          "eos_token_id": 3}), "bert"),
    Family("DeBERTa-v2", "DebertaV2ForMaskedLM",
           lambda: tf.DebertaV2Config(**{**_ENC, "relative_attention": True, "position_buckets": 16,
                                         "pos_att_type": ["p2c", "c2p"], "max_relative_positions": 32}), "bert"),
    Family("BART", "BartForConditionalGeneration",
           lambda: tf.BartConfig(d_model=32, encoder_layers=2, decoder_layers=2, encoder_attention_heads=4,
                                 decoder_attention_heads=4, encoder_ffn_dim=64, decoder_ffn_dim=64,
                                 max_position_embeddings=64, pad_token_id=0, decoder_start_token_id=99,
                                 forced_eos_token_id=None, **_GPT2_IDS), "gpt2", seq2seq=True,
           notes="shared embeddings, final_logits_bias"),
    Family("LLaVA", "LlavaForConditionalGeneration",
           lambda: tf.LlavaConfig(vision_config=_clip_vision(), text_config=_llama_text(), image_token_index=127),
           "llava"),
    Family("Qwen2-VL", "Qwen2VLForConditionalGeneration", _qwen2_vl, "qwen"),
]
