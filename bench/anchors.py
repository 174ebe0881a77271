"""The anchors: what a user does today with transformers/peft for the same result, as a whole process.

``python bench/anchors.py NAME BASE OUT`` (for ``verify``, OUT is the patched checkpoint to compare with BASE):

- ``extend-vocab``: ``AutoTokenizer.add_tokens`` + ``AutoModelForCausalLM.from_pretrained`` (bf16) +
  ``resize_token_embeddings(mean_resizing=True)`` + ``save_pretrained`` (model and tokenizer);
- ``attach-lora:<init>``: ``from_pretrained`` (bf16) + ``get_peft_model(LoraConfig(r=16, lora_alpha=32,
  target_modules="all-linear", ...))`` + ``save_pretrained`` (the adapter; for PiSSA peft mutates the base in
  memory and does not write it);
- ``attach-lora:<init>+residual``: the same, then what peft's PiSSA/OLoRA guide does so that the adapter can be
  trained later: the adapter saved with ``init_lora_weights = True`` and the residual base written
  (``unload()`` + ``save_pretrained`` into ``OUT/base``), which is what ours writes;
- ``convert-adapter``: peft's own conversion of a PiSSA adapter to a plain LoRA: the residual base
  (``BASE/../PISSA_ADAPTER/base``, bf16) + ``PeftModel.from_pretrained`` (``TRAINED_ADAPTER``, a copy of the
  PiSSA adapter standing for the trained one) +
  ``save_pretrained(path_initial_model_for_weight_conversion=PISSA_ADAPTER)`` (the adapter as initialized);
- ``attach-head``: ``AutoModelForSequenceClassification.from_pretrained(num_labels=3)`` (bf16), pad id set, +
  ``save_pretrained`` (model and tokenizer);
- ``surgery``: the sequence of those: add tokens, load for sequence classification, resize (mean), save, LoRA on
  the result, save the adapter into ``OUT/adapter``;
- ``verify``: load each checkpoint in float32 in turn and run the same 4 x 16 random old-vocabulary probes with
  hidden states, then compare logits over the old vocabulary and hidden states;
- ``merge-lora``: ``from_pretrained`` (bf16) + ``PeftModel.from_pretrained`` (the adapter ``BASE/../ADAPTER``,
  attach-lora's r=16 all-linear) + ``merge_and_unload`` + ``save_pretrained`` (model and tokenizer);
- ``expand-blocks``: ``from_pretrained`` (bf16), ``NUM_BLOCKS`` new decoder blocks inserted LLaMA Pro style (a
  deep copy of the block before, ``o_proj``/``down_proj`` zeroed, one after every L/k blocks), ``layer_idx`` and
  ``num_hidden_layers`` updated, ``save_pretrained`` (model and tokenizer).
"""

from __future__ import annotations

import sys
from pathlib import Path

NEW_TOKENS = [f"<bench_tok_{k}>" for k in range(8)]
NUM_LABELS = 3
LORA = {"r": 16, "lora_alpha": 32, "target_modules": "all-linear"}
#: The adapter merge-lora folds in: beside ``base`` in a size's data directory (bench/run.py prepares it).
ADAPTER = "bench-adapter"
#: The PiSSA adapter (and its residual base) convert-adapter converts: beside ``base`` (bench/run.py prepares it).
PISSA_ADAPTER = "bench-pissa"
#: The "trained" PiSSA adapter: a copy of ``PISSA_ADAPTER``'s files (bench/workloads.py makes it).
TRAINED_ADAPTER = "bench-pissa-trained"
#: expand-blocks: new blocks, interleaved (LLaMA Pro added 8 to 32).
NUM_BLOCKS = 4


def extend_vocab(base: Path, out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(NEW_TOKENS)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model.resize_token_embeddings(len(tok), mean_resizing=True)
    model.save_pretrained(out)
    tok.save_pretrained(out)


def attach_lora(base: Path, out: Path, init: str) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    init, _, residual = init.partition("+")
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    torch.manual_seed(0)
    extra = {"use_dora": True} if init == "dora" else {"init_lora_weights": init} if init != "default" else {}
    model = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **LORA, **extra))
    if residual:
        model.peft_config["default"].init_lora_weights = True  # loading must not decompose the residual again
    model.save_pretrained(out)
    if residual:
        model.unload().save_pretrained(out / "base")


def convert_adapter(base: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    pissa = base.parent / PISSA_ADAPTER
    model = AutoModelForCausalLM.from_pretrained(pissa / "base", dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, base.parent / TRAINED_ADAPTER)
    model.save_pretrained(out, path_initial_model_for_weight_conversion=str(pissa))


def _head_model(base: Path, tok: object) -> object:
    import torch
    from transformers import AutoModelForSequenceClassification

    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=NUM_LABELS, dtype=torch.bfloat16)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # type: ignore[attr-defined]
    model.config.pad_token_id = pad
    return model


def attach_head(base: Path, out: Path) -> None:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    model = _head_model(base, tok)
    model.save_pretrained(out)  # type: ignore[attr-defined]
    tok.save_pretrained(out)


def surgery(base: Path, out: Path) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(base)
    tok.add_tokens(NEW_TOKENS)
    model = _head_model(base, tok)
    model.resize_token_embeddings(len(tok), mean_resizing=True)  # type: ignore[attr-defined]
    model.save_pretrained(out)  # type: ignore[attr-defined]
    tok.save_pretrained(out)
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(task_type="SEQ_CLS", **LORA))  # type: ignore[arg-type]
    peft_model.save_pretrained(out / "adapter")


def verify(base: Path, patched: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    vocab = AutoConfig.from_pretrained(base).vocab_size
    probes = torch.randint(0, vocab, (4, 16), generator=torch.Generator().manual_seed(0))
    runs = []
    for path in (base, patched):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
        with torch.no_grad():
            outs = [model(input_ids=p[None], output_hidden_states=True) for p in probes]
        runs.append([(o.logits[..., :vocab], o.hidden_states) for o in outs])
        del model
    worst = max(float((a[0] - b[0]).abs().max()) for a, b in zip(*runs, strict=True))
    ratios = [float(hb.pow(2).mean().sqrt() / ha.pow(2).mean().sqrt())
              for a, b in zip(*runs, strict=True) for ha, hb in zip(a[1], b[1], strict=True)]
    print(f"max |d logits| {worst:.3g}; hidden RMS ratio {min(ratios):.4f}..{max(ratios):.4f}")


def merge_lora(base: Path, out: Path) -> None:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    model = PeftModel.from_pretrained(model, base.parent / ADAPTER).merge_and_unload()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def expand_blocks(base: Path, out: Path) -> None:
    import copy

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.bfloat16)
    layers = model.model.layers
    count = len(layers)
    after = {(j + 1) * count // NUM_BLOCKS - 1 for j in range(NUM_BLOCKS)}  # LLaMA Pro's interleave
    blocks = []
    for i, layer in enumerate(layers):
        blocks.append(layer)
        if i in after:
            new = copy.deepcopy(layer)
            with torch.no_grad():
                new.self_attn.o_proj.weight.zero_()
                new.mlp.down_proj.weight.zero_()
            blocks.append(new)
    for i, layer in enumerate(blocks):
        layer.self_attn.layer_idx = i
    model.model.layers = torch.nn.ModuleList(blocks)
    model.config.num_hidden_layers = len(blocks)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[0]] * len(blocks)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)


def main() -> None:
    name, base, out = sys.argv[1], Path(sys.argv[2]), Path(sys.argv[3])
    op, _, init = name.partition(":")
    if op == "extend-vocab":
        extend_vocab(base, out)
    elif op == "attach-lora":
        attach_lora(base, out, init or "default")
    elif op == "attach-head":
        attach_head(base, out)
    elif op == "surgery":
        surgery(base, out)
    elif op == "verify":
        verify(base, out)
    elif op == "merge-lora":
        merge_lora(base, out)
    elif op == "expand-blocks":
        expand_blocks(base, out)
    elif op == "convert-adapter":
        convert_adapter(base, out)
    else:
        raise SystemExit(f"unknown anchor {name!r}")


if __name__ == "__main__":
    main()
