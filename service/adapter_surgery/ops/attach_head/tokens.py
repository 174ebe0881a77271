"""What attach-head reads of the checkpoint's tokenizer: its pad and eos tokens, its length, and the tokens of the
ids config.json names, read off the service's kept tokenizer without a copy.

attach-head never changes the tokenizer it loads (``pad_token: add`` has extend-vocab's planning load its own), so
it needs no private copy: at 3B the copy (0.1-0.3 s) was most of the planning before the first byte is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from adapter_surgery.io import Checkpoint
from adapter_surgery.tokenizer_cache import TokenizerCache, read_tokenizer


@dataclass(frozen=True)
class TokenizerFacts:
    """The tokenizer's ``pad_token``/``pad_token_id``, ``eos_token``/``eos_token_id`` and ``len`` (``size``), and
    ``tokens``: ``convert_ids_to_tokens`` of each id asked for that lies below ``size``."""

    pad_token: str | None
    pad_token_id: int | None
    eos_token: str | None
    eos_token_id: int | None
    size: int
    tokens: Mapping[int, str] = field(default_factory=dict)


def tokenizer_facts(ckpt: Checkpoint, ids: set[int | None], cache: TokenizerCache | None) -> TokenizerFacts | None:
    """The facts of ``ckpt``'s tokenizer (``None`` without tokenizer files), with the tokens of ``ids`` (``None``
    entries skipped); with ``cache`` read off the kept tokenizer (under the cache's lock, no copy).

    Raises:
        InvalidCheckpoint: tokenizer files that ``transformers`` cannot load.
    """
    wanted = sorted(i for i in ids if i is not None)

    def read(tok) -> TokenizerFacts:  # PreTrainedTokenizerBase: only looked at
        size = len(tok)
        return TokenizerFacts(pad_token=tok.pad_token, pad_token_id=tok.pad_token_id, eos_token=tok.eos_token,
                              eos_token_id=tok.eos_token_id, size=size,
                              tokens={i: tok.convert_ids_to_tokens(i) for i in wanted if i < size})

    return read_tokenizer(ckpt, read, cache=cache)
