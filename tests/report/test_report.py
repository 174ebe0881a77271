"""The preservation report: its numbers on fixtures (Hewitt's bound, max |Δ logits|, head std, hidden RMS),
and the skip paths (memory, no config, unloadable models) that never fail a request."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM

import adapter_surgery.report.memory as memory_mod
import adapter_surgery.report.run as run_mod
from adapter_surgery.ops.attach_head import AttachHeadSpec, attach_head
from adapter_surgery.ops.common import RunContext
from adapter_surgery.ops.extend_vocab import ExtendVocabSpec, extend_vocab
from adapter_surgery.report import VerifyOptions, available_memory, preservation_report, probe_inputs
from tests.conftest import tensors
from tests.fixtures import make
from tests.verified import NEW, extend, make_data


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_data(tmp_path_factory)


# -- added tokens: Hewitt's bound and max |Δ logits| ----------------------------------------------------------
@pytest.mark.parametrize(("fixture", "old_vocab"), [
    ("llama-untied-tiny", 128),  # untied head: the head's rows get the head's mean
    ("gpt2-tied-tiny", 100),  # tied: the new embedding rows are the output rows
    ("bert-mlm-tiny", 100),  # tied decoder plus the output bias' mean
    ("padded-vocab", 120),  # new ids take spare rows: V is the tokenizer's 120, not the 128 rows
])
def test_mean_rows_stay_below_hewitt_bound_and_old_logits_do_not_move(data: Path, fixture: str,
                                                                       old_vocab: int) -> None:
    r = extend(data, fixture, f"{fixture}-mean")
    rep = r.report
    assert rep is not None and rep.status == "ok" and rep.reason is None and rep.passed is True
    assert rep.probes is not None and rep.probes.old_vocab_size == old_vocab and rep.probes.sequences == 4
    # input-side rows and appended output rows leave every old logit bit-identical
    assert rep.max_abs_logit_delta == 0.0 and rep.logits_preserved is True
    check = rep.added_tokens
    assert check is not None and check.added_tokens == 3 and check.old_vocab_size == old_vocab
    assert check.mean_initialized_ids == [old_vocab, old_vocab + 1, old_vocab + 2]  # every row checked
    assert check.mean_over_rows == old_vocab and check.bound_kl_max == check.kl_max
    assert check.bound == pytest.approx(math.log1p(3 / old_vocab), rel=1e-12)
    assert 0 < check.kl_mean <= check.kl_max <= check.bound and check.passed
    assert rep.warnings == []
    assert rep.head is None
    assert len(rep.hidden_states) == 3 and rep.hidden_states_passed is True
    assert all(h.max_abs_delta == 0.0 and h.ratio == 1.0 and h.base > 0 for h in rep.hidden_states)


def test_kl_matches_the_closed_form(data: Path) -> None:
    """KL(p || p') = log(1 + sum_new exp(l_new) / sum_old exp(l_old)) when the old logits are unchanged."""
    r = extend(data, "llama-untied-tiny", "closed-form")
    base = AutoModelForCausalLM.from_pretrained(str(data / "llama-untied-tiny"), dtype=torch.float32).eval()
    new = AutoModelForCausalLM.from_pretrained(str(data / "closed-form"), dtype=torch.float32).eval()
    kls = []
    with torch.no_grad():
        for ids in probe_inputs(data / "llama-untied-tiny"):
            lb, lp = base(input_ids=ids[None]).logits[0].double(), new(input_ids=ids[None]).logits[0].double()
            assert torch.equal(lb, lp[:, :128])
            kls.append(torch.log1p(lp[:, 128:].exp().sum(-1) / lb.exp().sum(-1)))
    kl = torch.cat(kls)
    assert r.report is not None and r.report.added_tokens is not None
    assert r.report.added_tokens.kl_max == pytest.approx(float(kl.max()), abs=1e-9)
    assert r.report.added_tokens.kl_mean == pytest.approx(float(kl.mean()), abs=1e-9)


@pytest.mark.parametrize("init", ["normal", {"strategy": "copy", "source": "the"}, "hewitt"])
def test_rows_that_are_not_the_mean_get_no_bound_verdict(data: Path, init) -> None:
    """Hewitt's bound is a theorem for mean rows only: other rows (which can exceed it) get their KL reported,
    no pass/fail; used to report passed: false for a patch that preserved every old logit."""
    name = f"not-mean-{init if isinstance(init, str) else 'copy'}"
    r = extend(data, "llama-untied-tiny", name, init=init)
    assert (data / name / "config.json").is_file()  # the request succeeded
    rep = r.report
    assert rep is not None and rep.status == "ok"
    check = rep.added_tokens
    assert check is not None and check.added_tokens == 3 and check.mean_initialized_ids == []
    assert check.bound is None and check.bound_kl_max is None and check.passed is None
    assert check.kl_max > 0
    if init != "hewitt":  # such rows can take more than log(1 + n / V): a bound would be wrongly "failed"
        assert check.kl_max > math.log1p(3 / 128)
    assert any("not the mean" in w and "without a pass/fail" in w for w in rep.warnings)
    assert rep.max_abs_logit_delta == 0.0 and rep.hidden_states_passed is True
    assert rep.passed is True  # every check that applies passed


def test_readme_example_checks_the_bound_over_the_mean_rows_only(data: Path) -> None:
    """The README's extend-vocab request (two mean tokens, one subword_mean, one copy, padded to 64) reported
    passed: false; the bound holds for the two mean rows and is checked over those."""
    tokens = [{"content": "<|tool_call|>", "special": True}, {"content": "<|tool_result|>", "special": True},
              {"content": "helloworld", "init": "subword_mean"},
              {"content": "<think>", "init": {"strategy": "copy", "source": "the"}}]
    r = extend_vocab(ExtendVocabSpec(checkpoint="llama-untied-tiny", output="readme", tokens=tokens,
                                     pad_to_multiple_of=64, verify=True), RunContext(data))
    assert r.vocab_size_after == 192 and [t.id for t in r.added] == [128, 129, 130, 131]
    rep = r.report
    assert rep is not None and rep.status == "ok" and rep.passed is True
    check = rep.added_tokens
    assert check is not None and check.added_tokens == 4 and check.mean_initialized_ids == [128, 129]
    assert check.mean_over_rows == 128 and check.bound == pytest.approx(math.log1p(2 / 128))
    assert check.bound_kl_max is not None and 0 < check.bound_kl_max <= check.bound and check.passed is True
    assert check.kl_max > math.log1p(4 / 128)  # with every added row: above the bound for n = 4 (measured 0.0323)
    assert any(w.startswith("2 of the 4 added token(s)") for w in rep.warnings)


def test_bound_uses_the_rows_the_mean_is_over(data: Path) -> None:
    """FX-E: rows 120..127 are all-zero reserved tokens, left out of the mean: V of the bound is 120."""
    make("FX-E", data)
    r = extend(data, "reserved-zero", "reserved-mean")
    check = r.report.added_tokens  # type: ignore[union-attr]
    assert check is not None and check.old_vocab_size == 128 and check.mean_over_rows == 120
    assert check.mean_initialized_ids == [128, 129, 130] and check.bound == pytest.approx(math.log1p(3 / 120))
    assert check.passed is True


def test_a_disturbed_layer_is_caught(data: Path) -> None:
    """Control: scaling one layer's output projection moves the old logits and that layer's RMS."""
    src, dst = data / "llama-untied-tiny", data / "disturbed"
    shutil.copytree(src, dst)
    for shard in sorted(dst.glob("*.safetensors")):
        state = tensors(shard)
        key = "model.layers.0.mlp.down_proj.weight"
        if key in state:
            state[key] = state[key] * 1000
            shard.unlink()
            save_file(state, str(shard), metadata={"format": "pt"})
    rep = preservation_report(src, dst)
    assert rep.status == "ok" and rep.passed is False
    assert rep.max_abs_logit_delta is not None and rep.max_abs_logit_delta > 1e-3 and rep.logits_preserved is False
    assert rep.added_tokens is None
    ratios = [h.ratio for h in rep.hidden_states]
    assert ratios[0] == 1.0 and ratios[1] > 2.0 and rep.hidden_states_passed is False  # [2] is after the final norm


# -- a new head ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("init", "expected"), [("kaiming_normal", 0.25), ("xavier_uniform", math.sqrt(2 / 432)),
                                                 ("normal", 0.02), ("zeros", 0.0)])
def test_head_std_against_its_formula(data: Path, init: str, expected: float) -> None:
    out = f"head-{init}"
    r = attach_head(AttachHeadSpec(checkpoint="gpt2-tied-tiny", output=out, num_labels=400, init=init, verify=True),
                    RunContext(data))
    rep = r.report
    assert rep is not None and rep.status == "ok" and rep.passed is True
    assert rep.max_abs_logit_delta is None and any("no output" in w for w in rep.warnings)
    assert all(h.max_abs_delta == 0.0 for h in rep.hidden_states)  # the backbone is untouched
    assert rep.head is not None and [t.name for t in rep.head.tensors] == ["score.weight"]
    t = rep.head.tensors[0]
    assert t.init == init and t.expected_std == pytest.approx(expected) and t.shape == [400, 32] and t.passed
    w = tensors(data / out)["score.weight"]
    assert t.std == pytest.approx(float(w.std()), rel=1e-6)
    assert rep.head.logits_shape == [400]
    if init == "zeros":
        assert t.std == 0.0 and t.max_abs == 0.0 and rep.head.logits_std == 0.0
    else:
        assert abs(t.std / expected - 1) <= 0.02 and rep.head.logits_std is not None and rep.head.logits_std > 0


# -- probes and memory ---------------------------------------------------------------------------------------
def test_probes_are_seeded_ordinary_old_tokens(data: Path) -> None:
    src = data / "padded-vocab"
    a, b = probe_inputs(src), probe_inputs(src)
    c = probe_inputs(src, VerifyOptions(seed=1, num_probes=2, probe_length=8, text="hello world the cat"))
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True)) and len(a) == 4
    assert all(x.shape == (16,) and x.dtype == torch.long for x in a)
    ids = torch.cat(a)
    assert int(ids.max()) < 120 and not set(ids.tolist()) & {0, 1, 2}  # old vocabulary, no special token
    assert len(c) == 3 and c[0].shape == (8,) and not torch.equal(c[0], a[0][:8])
    assert c[2].tolist()[0] == 1 and len(c[2]) == 5  # the text, tokenized by the base tokenizer (<s> first)


def test_available_memory_reads_meminfo() -> None:
    with open("/proc/meminfo") as fh:
        line = next(x for x in fh if x.startswith("MemAvailable:"))
    assert abs(available_memory(torch.device("cpu")) - int(line.split()[1]) * 1024) < 2**30


def test_too_little_memory_skips_the_report_not_the_request(data: Path, monkeypatch) -> None:
    monkeypatch.setattr(memory_mod, "available_memory", lambda device, limit=None: 1024)
    r = extend(data, "gpt2-tied-tiny", "no-memory")
    assert (data / "no-memory" / "model.safetensors").is_file() and r.vocab_size_after == 103
    rep = r.report
    assert rep is not None and rep.status == "skipped" and rep.passed is None
    assert "1.0 KiB" in (rep.reason or "") and "0.00" not in (rep.reason or "")
    assert rep.memory_available_bytes == 1024 and rep.memory_needed_bytes > 1024  # type: ignore[operator]
    assert rep.added_tokens is None and rep.hidden_states == []


def test_no_config_skips_the_report(data: Path) -> None:
    shutil.copyfile(data / "gpt2-tied-tiny" / "model.safetensors", data / "bare.safetensors")
    r = extend_vocab(ExtendVocabSpec(checkpoint="bare.safetensors", output="bare-out.safetensors", num_new_tokens=2,
                                     verify=True), RunContext(data))
    assert r.report is not None and r.report.status == "skipped" and "config.json" in (r.report.reason or "")
    assert (data / "bare-out.safetensors").is_file()


def test_without_verify_there_is_no_report(data: Path) -> None:
    r = extend_vocab(ExtendVocabSpec(checkpoint="gpt2-tied-tiny", output="no-report", tokens=NEW), RunContext(data))
    assert r.report is None




def test_skip_reasons_name_no_server_paths(data: Path, monkeypatch) -> None:
    """Messages quoted from transformers carry absolute paths (for uploads, the temporary work directory)."""
    def fail(path, device="cpu"):
        raise OSError(f"Error no file named model.safetensors found in directory {path}")

    monkeypatch.setattr(run_mod, "load_model", fail)
    rep = preservation_report(data / "llama-untied-tiny", data / "llama-untied-tiny")
    assert rep.status == "skipped" and "llama-untied-tiny" in (rep.reason or "")
    assert str(data) not in (rep.reason or "") and "/tmp" not in (rep.reason or "")


# -- every row created or re-initialized counts -------------------------------------------------------------------
def _gpt2_short_embedding(dest: Path) -> None:
    """GPT-2 with 400 embedding rows and a 403-token tokenizer (ids 400..402 have no row)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from tests.fixtures import GPT2_EOS, _randomize, _save_model, _save_tokenizer, gpt2_tokenizer

    tok = gpt2_tokenizer()
    tok.add_tokens([f"<t{i}>" for i in range(303)])
    assert tok.get_vocab_size(with_added_tokens=True) == 403
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=400, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                           bos_token_id=99, eos_token_id=99, tie_word_embeddings=True))
        _randomize(model)
    _save_model(model, dest, dtype=torch.float32)
    _save_tokenizer(tok, dest, model_max_length=64, bos_token=GPT2_EOS, eos_token=GPT2_EOS, unk_token=GPT2_EOS)


def test_tokens_without_rows_that_get_rows_are_counted_and_warned(data: Path) -> None:
    _gpt2_short_embedding(data / "gpt2-400")
    r = extend_vocab(ExtendVocabSpec(checkpoint="gpt2-400", output="gpt2-405", tokens=["<a>", "<b>"], verify=True),
                     RunContext(data))
    assert [t.id for t in r.added] == [403, 404] and r.vocab_size_after == 405
    assert any(w.startswith("3 existing token(s) of the tokenizer had no embedding row") and "[400, 401, 402]" in w
               for w in r.warnings)
    rep = r.report
    assert rep is not None and rep.status == "ok" and rep.max_abs_logit_delta == 0.0
    check = rep.added_tokens
    assert check is not None and check.added_tokens == 5 and check.old_vocab_size == 400
    assert check.mean_initialized_ids == [400, 401, 402, 403, 404] and check.existing_first_rows_ids == [400, 401, 402]
    assert check.mean_over_rows == 400 and check.bound == pytest.approx(math.log1p(5 / 400), rel=1e-12)
    # the KL over the 405-row softmax, computed here with transformers
    base = AutoModelForCausalLM.from_pretrained(str(data / "gpt2-400"), dtype=torch.float32).eval()
    new = AutoModelForCausalLM.from_pretrained(str(data / "gpt2-405"), dtype=torch.float32).eval()
    kls = []
    with torch.no_grad():
        for ids in probe_inputs(data / "gpt2-400"):
            lb, lp = base(input_ids=ids[None]).logits[0].double(), new(input_ids=ids[None]).logits[0].double()
            kls.append((lb.softmax(-1) * (lb.log_softmax(-1) - lp.log_softmax(-1)[:, :400])).sum(-1))
    kl = torch.cat(kls)
    assert check.kl_max == pytest.approx(float(kl.max()), abs=1e-9) == check.bound_kl_max
    assert check.kl_max > math.log1p(2 / 400)  # counting 2 rows would have checked it against too small a bound
    assert check.kl_max <= check.bound and check.passed is True and rep.passed is True


def test_reinitialized_rows_are_counted(data: Path) -> None:
    """FX-E: rows 120..127 are all zero; reinit_existing gives them the mean: counted with the 3 new rows (n = 11),
    left out of max |Δ logits| (the other old logits do not move), bound over the 120 trained rows."""
    if not (data / "reserved-zero").exists():
        make("FX-E", data)
    r = extend(data, "reserved-zero", "reserved-reinit", reinit_existing=True)
    assert [u.id for u in r.reinitialized] == list(range(120, 128))
    rep = r.report
    assert rep is not None and rep.status == "ok" and rep.max_abs_logit_delta == 0.0 and rep.logits_preserved
    check = rep.added_tokens
    assert check is not None and check.added_tokens == 11 and check.reinitialized_ids == list(range(120, 128))
    assert check.mean_initialized_ids == list(range(120, 131)) and check.mean_over_rows == 120
    assert check.bound == pytest.approx(math.log1p(11 / 120)) and check.passed is True
    assert any("8 existing token(s) with all-zero output rows" in w for w in rep.warnings)
