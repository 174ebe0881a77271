"""The copying LRU behind the service's caches: bounded, least recently used first out, copies both ways."""

from __future__ import annotations

from adapter_surgery.lru import CopyingLRU


def test_copies_in_and_out_and_evicts_the_least_recently_used() -> None:
    lru: CopyingLRU[list[int]] = CopyingLRU(2)
    mine = [1]
    lru.put("a", mine)
    mine.append(2)  # the kept entry is a copy
    got = lru.get("a")
    assert got == [1]
    got.append(3)  # and so is what a caller gets
    assert lru.get("a") == [1]
    lru.put("b", [2])
    lru.get("a")  # a is now the most recent
    lru.put("c", [3])
    assert lru.get("b") is None and lru.get("a") == [1] and lru.get("c") == [3]
    lru.clear()
    assert lru.get("a") is None


def test_read_looks_at_the_kept_entry_itself_without_a_copy() -> None:
    lru: CopyingLRU[list[int]] = CopyingLRU(2)
    lru.put("a", [1, 2])
    seen: list[int] = []
    assert lru.read("a", lambda kept: seen.append(id(kept)) or len(kept)) == 2
    assert lru.read("a", id) == seen[0]  # the same object both times: no copy is made
    assert lru.get("a") == [1, 2] and id(lru.get("a")) != seen[0]  # get still copies
    assert lru.read("missing", len) is None
    lru.put("b", [3])
    lru.read("a", len)  # a read makes the entry the most recent, as a get does
    lru.put("c", [4])
    assert lru.get("b") is None and lru.get("a") == [1, 2]
