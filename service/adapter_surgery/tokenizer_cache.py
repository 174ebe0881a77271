"""Loaded tokenizers kept by a long-running service, so that repeated requests on one base do not load it again.

``AutoTokenizer.from_pretrained`` costs 0.3 s of CPU per request on SmolLM2's tokenizer (``transformers`` parses
``tokenizer.json`` in Python, twice when ``tokenizer_config.json`` has no ``added_tokens_decoder``, then the Rust
tokenizer parses it again); a deep copy of a loaded one costs 0.1-0.3 s. Requests add tokens to the tokenizer they
get, so each gets its own deep copy and the cached one is never handed out; a request that only reads a few facts
(attach-head: the pad and eos tokens) reads them off the kept one under the cache's lock instead
(:func:`read_tokenizer`), which costs microseconds where the copy was most of attach-head's planning at 3B.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from adapter_surgery.config_check import transformers_config_error
from adapter_surgery.errors import InvalidCheckpoint
from adapter_surgery.io import Checkpoint
from adapter_surgery.lru import CopyingLRU
from adapter_surgery.paths import without_dirs

R = TypeVar("R")

#: Tokenizers kept at most (each is tens of MB for a 100k-token vocabulary).
TOKENIZER_CACHE_SIZE = 4


class TokenizerCache:
    """Tokenizers by what determines them: the directory and every file ``from_pretrained`` may read there (name,
    device, inode, size, modification time), so a rewritten tokenizer file is loaded again. Bounded (LRU),
    thread-safe; callers get a deep copy."""

    def __init__(self, capacity: int = TOKENIZER_CACHE_SIZE) -> None:
        self._entries: CopyingLRU[Any] = CopyingLRU(capacity)

    @staticmethod
    def key(directory: Path, how: str) -> tuple:
        """``how`` tells the loading functions apart (Auto class, or the fast class on tokenizer.json alone)."""
        files = []
        for p in sorted(directory.iterdir()):
            if p.is_file() and not p.name.endswith(".safetensors"):  # config, tokenizer, vocab, merges...
                st = p.stat()
                files.append((p.name, st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns))
        return str(directory.resolve()), how, tuple(files)

    def get(self, directory: Path, how: str, load: Callable[[], Any]) -> Any:
        """A deep copy of the tokenizer ``load()`` gives for ``directory`` (loaded on a miss, then kept)."""
        key = self.key(directory, how)
        hit = self._entries.get(key)
        if hit is not None:
            return hit
        tok = load()
        self._entries.put(key, tok)  # a copy: the caller may change its own (add tokens) at once
        return tok

    def read(self, directory: Path, how: str, load: Callable[[], Any], read: Callable[[Any], R]) -> R:
        """``read`` applied to the kept tokenizer of ``directory`` (loaded and kept on a miss), without a copy and
        under the cache's lock; ``read`` only looks and returns facts (never the tokenizer or a part of it), and
        never ``None``."""
        key = self.key(directory, how)
        got = self._entries.read(key, read)
        if got is not None:
            return got
        tok = load()
        self._entries.put(key, tok)  # keeps a copy: ``tok`` stays this caller's
        return read(tok)

    def clear(self) -> None:
        self._entries.clear()


def load_tokenizer(ckpt: Checkpoint, *, lenient: bool = False, cache: TokenizerCache | None = None,
                   fast_without_config: bool = False):  # -> PreTrainedTokenizerBase | None
    """The checkpoint's tokenizer with ``AutoTokenizer`` (``None`` without tokenizer files). Files that
    ``transformers`` cannot load are a 422 on ``checkpoint``, or, ``lenient`` (the preservation report, which only
    loses its text probe and special-token filter), ``None``.

    ``cache``: the service's, which hands out a copy of the tokenizer it keeps. ``fast_without_config``: without a
    usable config.json (which ``AutoTokenizer`` reads too), ``tokenizer.json`` is loaded with
    ``PreTrainedTokenizerFast`` directly (extend-vocab, which also takes bare weights with tokenizer files)."""
    return _through_cache(ckpt, lenient, cache, fast_without_config, None)


def read_tokenizer(ckpt: Checkpoint, read: Callable[[Any], R], *,
                   cache: TokenizerCache | None = None) -> R | None:
    """``read`` applied to the checkpoint's tokenizer (``None`` without tokenizer files): with ``cache``, to the kept
    one without a copy (:meth:`TokenizerCache.read`), else to a fresh load. For callers that only read a few facts
    (``read`` returns them, never the tokenizer); files ``transformers`` cannot load are the same 422 on
    ``checkpoint`` as :func:`load_tokenizer`'s."""
    return _through_cache(ckpt, False, cache, False, read)


def _through_cache(ckpt: Checkpoint, lenient: bool, cache: TokenizerCache | None, fast_without_config: bool,
                   read: Callable[[Any], Any] | None) -> Any:
    if not ckpt.has_tokenizer:
        return None
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    from adapter_surgery.model.roles import quiet_transformers

    fast_only = fast_without_config and ckpt.config is None and (ckpt.directory / "tokenizer.json").is_file()
    cls = PreTrainedTokenizerFast if fast_only else AutoTokenizer

    def load():  # -> PreTrainedTokenizerBase
        try:
            with quiet_transformers():
                return cls.from_pretrained(str(ckpt.directory), local_files_only=True)
        except Exception as exc:  # transformers raises many kinds for broken tokenizer files
            refused = transformers_config_error(exc)  # AutoTokenizer reads config.json too
            if refused is not None:
                raise refused from None
            raise InvalidCheckpoint(f"the tokenizer files could not be loaded ({type(exc).__name__}: "
                                    f"{without_dirs(str(exc), ckpt.directory)})",
                                    field="checkpoint", fix="Re-save the tokenizer with save_pretrained.") from None

    try:
        if cache is None:
            tok = load()
            return tok if read is None else read(tok)
        if read is None:
            return cache.get(ckpt.directory, cls.__name__, load)
        return cache.read(ckpt.directory, cls.__name__, load, read)
    except InvalidCheckpoint:
        if lenient:
            return None
        raise
