"""Where job records live: a table in the embedded queue's SQLite file, or hashes in the queue's Redis.

Both stores keep the record (JSON), its state and creation time (for newest-first listing), a one-time claim (a
worker starting the job, or a cancel before it started: whichever comes first wins) and a cancel flag that any
process can set and the running job polls.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from adapter_surgery.jobs.models import FINISHED, JobRecord, JobState


class JobStore(ABC):
    @abstractmethod
    def insert(self, rec: JobRecord) -> None: ...

    @abstractmethod
    def load(self, job_id: str) -> JobRecord | None: ...

    @abstractmethod
    def save(self, rec: JobRecord) -> None:
        """Write the record (its state included)."""

    @abstractmethod
    def claim(self, job_id: str) -> bool:
        """True for the first caller only."""

    @abstractmethod
    def request_cancel(self, job_id: str) -> None: ...

    @abstractmethod
    def cancel_requested(self, job_id: str) -> bool: ...

    @abstractmethod
    def page(self, state: JobState | None, limit: int, after: tuple[float, str] | None) -> list[JobRecord]:
        """Up to ``limit`` records, newest first, older than ``after`` (created, id) when given."""

    @abstractmethod
    def with_state(self, state: JobState) -> list[JobRecord]: ...

    @abstractmethod
    def count(self, state: JobState) -> int: ...

    @abstractmethod
    def prune(self, keep: int) -> int:
        """Delete the oldest finished records beyond the newest ``keep``; return how many."""

    @abstractmethod
    def ping(self) -> None:
        """Raise if the store cannot be reached."""


def _doc(rec: JobRecord) -> str:
    """The record without its spec (written once, at insert: progress writes stay small)."""
    return rec.model_dump_json(exclude={"spec"})


def _decode(doc: str | bytes, cancel: Any, spec: str | bytes | None = None) -> JobRecord:
    rec = JobRecord.model_validate_json(doc)
    if spec:
        rec.spec = json.loads(spec)
    if cancel and str(cancel) not in ("0", "b'0'"):
        rec.job.cancel_requested = True
    return rec


class SqliteJobStore(JobStore):
    """A ``jobs`` table in ``path`` (the embedded huey's database file), WAL mode, one connection per store."""

    def __init__(self, path: Path) -> None:
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=normal")
        self._db.execute("pragma journal_size_limit=1048576")  # the WAL shrinks back to 1 MiB after checkpoints
        self._db.execute("create table if not exists jobs (id text primary key, created real not null, state text "
                         "not null, doc text not null, spec text not null default '{}', claimed integer not null "
                         "default 0, cancel integer not null default 0)")
        self._db.execute("create index if not exists jobs_created on jobs (created desc, id desc)")
        self._db.execute("create index if not exists jobs_state on jobs (state)")

    def _q(self, sql: str, args: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def insert(self, rec: JobRecord) -> None:
        self._q("insert into jobs (id, created, state, doc, spec) values (?, ?, ?, ?, ?)",
                (rec.job.id, rec.job.created_at.timestamp(), rec.job.state.value, _doc(rec), json.dumps(rec.spec)))

    def load(self, job_id: str) -> JobRecord | None:
        rows = self._q("select doc, cancel, spec from jobs where id = ?", (job_id,))
        return _decode(*rows[0]) if rows else None

    def save(self, rec: JobRecord) -> None:
        self._q("update jobs set state = ?, doc = ? where id = ?", (rec.job.state.value, _doc(rec), rec.job.id))

    def claim(self, job_id: str) -> bool:
        with self._lock:
            return self._db.execute("update jobs set claimed = 1 where id = ? and claimed = 0", (job_id,)).rowcount == 1

    def request_cancel(self, job_id: str) -> None:
        self._q("update jobs set cancel = 1 where id = ?", (job_id,))

    def cancel_requested(self, job_id: str) -> bool:
        rows = self._q("select cancel from jobs where id = ?", (job_id,))
        return bool(rows and rows[0][0])

    def page(self, state: JobState | None, limit: int, after: tuple[float, str] | None) -> list[JobRecord]:
        where, args = [], []
        if state is not None:
            where.append("state = ?")
            args.append(state.value)
        if after is not None:
            where.append("(created < ? or (created = ? and id < ?))")
            args += [after[0], after[0], after[1]]
        sql = "select doc, cancel from jobs" + (" where " + " and ".join(where) if where else "")
        rows = self._q(sql + " order by created desc, id desc limit ?", (*args, limit))
        return [_decode(*r) for r in rows]

    def with_state(self, state: JobState) -> list[JobRecord]:
        return [_decode(*r) for r in self._q("select doc, cancel, spec from jobs where state = ?", (state.value,))]

    def count(self, state: JobState) -> int:
        return int(self._q("select count(*) from jobs where state = ?", (state.value,))[0][0])

    def prune(self, keep: int) -> int:
        states = tuple(s.value for s in FINISHED)
        with self._lock:
            return self._db.execute(
                "delete from jobs where state in (?, ?, ?) and id not in "
                "(select id from jobs order by created desc, id desc limit ?)", (*states, keep)).rowcount

    def ping(self) -> None:
        self._q("select 1")

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisJobStore(JobStore):
    """Hashes ``<prefix>:job:<id>`` (doc, state, claimed, cancel), a sorted set of ids by creation time, and a
    set of queued ids, in the queue's Redis."""

    def __init__(self, conn: Any, prefix: str = "adapter-surgery") -> None:
        self.r = conn
        self.p = prefix

    def _key(self, job_id: str) -> str:
        return f"{self.p}:job:{job_id}"

    def insert(self, rec: JobRecord) -> None:
        pipe = self.r.pipeline()
        pipe.hset(self._key(rec.job.id), mapping={"doc": _doc(rec), "spec": json.dumps(rec.spec),
                                                  "state": rec.job.state.value, "claimed": 0, "cancel": 0})
        pipe.zadd(f"{self.p}:jobs", {rec.job.id: rec.job.created_at.timestamp()})
        pipe.sadd(f"{self.p}:state:{rec.job.state.value}", rec.job.id)
        pipe.execute()

    def load(self, job_id: str) -> JobRecord | None:
        doc, cancel, spec = self.r.hmget(self._key(job_id), "doc", "cancel", "spec")
        return _decode(doc, int(cancel or 0), spec) if doc else None

    def save(self, rec: JobRecord) -> None:
        key = self._key(rec.job.id)
        pipe = self.r.pipeline()
        for s in JobState:
            if s != rec.job.state:
                pipe.srem(f"{self.p}:state:{s.value}", rec.job.id)
        pipe.sadd(f"{self.p}:state:{rec.job.state.value}", rec.job.id)
        pipe.hset(key, mapping={"doc": _doc(rec), "state": rec.job.state.value})
        pipe.execute()

    def claim(self, job_id: str) -> bool:
        return int(self.r.hincrby(self._key(job_id), "claimed", 1)) == 1

    def request_cancel(self, job_id: str) -> None:
        self.r.hset(self._key(job_id), "cancel", 1)

    def cancel_requested(self, job_id: str) -> bool:
        return bool(int(self.r.hget(self._key(job_id), "cancel") or 0))

    def _records(self, ids: list[Any], spec: bool = False) -> list[JobRecord]:
        pipe = self.r.pipeline()
        for i in ids:
            pipe.hmget(self._key(i.decode() if isinstance(i, bytes) else i), "doc", "cancel", "spec" if spec else "-")
        return [_decode(doc, int(cancel or 0), sp) for doc, cancel, sp in pipe.execute() if doc]

    def page(self, state: JobState | None, limit: int, after: tuple[float, str] | None) -> list[JobRecord]:
        top = f"({after[0]}" if after is not None else "+inf"
        out: list[JobRecord] = []
        start = 0
        members = None if state is None else {m.decode() if isinstance(m, bytes) else m
                                              for m in self.r.smembers(f"{self.p}:state:{state.value}")}
        while len(out) < limit:
            chunk = self.r.zrevrangebyscore(f"{self.p}:jobs", top, "-inf", start=start, num=max(limit * 2, 50),
                                            withscores=True)
            if after is not None and start == 0:  # same timestamp as the cursor: ids below it
                same = [(m, s) for m, s in self.r.zrangebyscore(f"{self.p}:jobs", after[0], after[0],
                                                                withscores=True)
                        if (m.decode() if isinstance(m, bytes) else m) < after[1]]
                chunk = sorted(same, key=lambda ms: ms[0], reverse=True) + chunk
            if not chunk:
                break
            start += max(limit * 2, 50)
            ids = [m.decode() if isinstance(m, bytes) else m for m, _ in chunk]
            ids = [i for i in ids if members is None or i in members]
            out += self._records(ids)
        return out[:limit]

    def with_state(self, state: JobState) -> list[JobRecord]:
        return self._records(list(self.r.smembers(f"{self.p}:state:{state.value}")), spec=True)

    def count(self, state: JobState) -> int:
        return int(self.r.scard(f"{self.p}:state:{state.value}"))

    def prune(self, keep: int) -> int:
        extra = self.r.zcard(f"{self.p}:jobs") - keep
        if extra <= 0:
            return 0
        old = [m.decode() if isinstance(m, bytes) else m for m in self.r.zrange(f"{self.p}:jobs", 0, extra - 1)]
        gone = 0
        for rec in self._records(old):
            if rec.job.state in FINISHED:
                pipe = self.r.pipeline()
                pipe.delete(self._key(rec.job.id))
                pipe.zrem(f"{self.p}:jobs", rec.job.id)
                pipe.srem(f"{self.p}:state:{rec.job.state.value}", rec.job.id)
                pipe.execute()
                gone += 1
        return gone

    def ping(self) -> None:
        self.r.ping()
