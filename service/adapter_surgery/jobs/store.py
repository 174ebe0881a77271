"""Where job records live: a table in the embedded queue's SQLite file, or hashes in the queue's Redis.

Both stores keep the record (JSON), its state and creation time (for newest-first listing), a one-time claim (a
worker starting the job, or a cancel before it started: whichever comes first wins) and a cancel flag that any
process can set and the running job polls.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import json
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

from adapter_surgery.errors import DiskFull, JobStoreUnavailable, SurgeryError
from adapter_surgery.jobs.models import FINISHED, JobRecord, JobState

#: ``OSError`` numbers of a full volume (or quota).
_FULL_ERRNOS = {errno.ENOSPC, errno.EDQUOT}
#: What ``summaries`` returns per record: state, started_at, finished_at (epoch seconds), bytes read, written.
Summary = tuple[str, float | None, float | None, int, int]


def _redis_errors() -> tuple[type[BaseException], ...]:
    try:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError
    except ImportError:  # pragma: no cover - redis is a dependency of the Redis mode only
        return ()
    return RedisConnectionError, RedisTimeoutError


_REDIS_ERRORS = _redis_errors()


@contextlib.contextmanager
def store_errors(where: str, data_dir: Path | None = None) -> Iterator[None]:
    """Turn the store's own failures into problems: a full disk under SQLite into :class:`DiskFull` (507, naming
    ``data_dir``), any other SQLite operational error and Redis connection/timeouts into
    :class:`JobStoreUnavailable` (503)."""
    full_fix = "Free space (or raise the quota) on the data directory's volume, then send the request again."
    down_fix = "Check that the job store is up and reachable (ADAPTER_SURGERY_QUEUE_URL), then retry; GET /readyz " \
               "says when it answers again."
    try:
        yield
    except SurgeryError:
        raise
    except sqlite3.Error as exc:
        code = getattr(exc, "sqlite_errorcode", None)
        if code == getattr(sqlite3, "SQLITE_FULL", 13) or "disk is full" in str(exc) or \
                ("disk I/O error" in str(exc) and _volume_full(data_dir)):
            raise DiskFull(f"no room to record the job in {data_dir or where} ({exc})", fix=full_fix) from exc
        raise JobStoreUnavailable(f"the job store ({where}) cannot be used: {exc}", fix=down_fix) from exc
    except OSError as exc:
        if exc.errno in _FULL_ERRNOS:
            raise DiskFull(f"no room to record the job in {data_dir or where} ({exc.strerror or exc})",
                           fix=full_fix) from exc
        raise
    except _REDIS_ERRORS as exc:
        raise JobStoreUnavailable(f"the job store ({where}) cannot be reached: {type(exc).__name__}: {exc}",
                                  fix=down_fix) from exc


def _volume_full(data_dir: Path | None) -> bool:
    try:
        st = os.statvfs(data_dir) if data_dir is not None else None
    except OSError:
        return False
    return st is not None and st.f_bavail == 0


def _guarded(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(self: JobStore, *args: Any, **kwargs: Any) -> Any:
        with store_errors(self.where, self.data_dir):
            return fn(self, *args, **kwargs)

    return wrapper


#: Store methods whose failures become problems (see :func:`store_errors`).
GUARDED = ("insert", "load", "save", "claim", "request_cancel", "cancel_requested", "page", "with_state", "count",
           "prune", "ping", "summaries", "beat", "live_workers")


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def summary_of(rec: JobRecord) -> Summary:
    j = rec.job
    return (j.state.value, _epoch(j.started_at), _epoch(j.finished_at), rec.bytes_read, rec.bytes_written)


class JobStore(ABC):
    """The store's methods raise :class:`DiskFull` / :class:`JobStoreUnavailable` for the store's own failures
    (every subclass's methods in :data:`GUARDED` are wrapped by :func:`store_errors`)."""

    where: str = "job store"
    data_dir: Path | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        for name in GUARDED:
            if name in cls.__dict__:
                setattr(cls, name, _guarded(cls.__dict__[name]))

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

    @abstractmethod
    def summaries(self) -> list[Summary]:
        """(state, started_at, finished_at, bytes_read, bytes_written) of every record, without loading results."""

    @abstractmethod
    def beat(self, worker: str, ttl: float) -> None:
        """Register ``worker`` as live for ``ttl`` seconds."""

    @abstractmethod
    def live_workers(self) -> list[str]:
        """The workers whose last :meth:`beat` has not expired."""


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

    def __init__(self, path: Path, data_dir: Path | None = None) -> None:
        self.where, self.data_dir = str(path), data_dir or path.parent
        self._lock = threading.Lock()
        with store_errors(self.where, self.data_dir):
            self._db = sqlite3.connect(str(path), timeout=30, check_same_thread=False, isolation_level=None)
            self._setup()

    def _setup(self) -> None:
        self._db.execute("pragma journal_mode=wal")
        self._db.execute("pragma synchronous=normal")
        self._db.execute("pragma journal_size_limit=1048576")  # the WAL shrinks back to 1 MiB after checkpoints
        self._db.execute("create table if not exists jobs (id text primary key, created real not null, state text "
                         "not null, doc text not null, spec text not null default '{}', claimed integer not null "
                         "default 0, cancel integer not null default 0)")
        self._db.execute("create index if not exists jobs_created on jobs (created desc, id desc)")
        self._db.execute("create index if not exists jobs_state on jobs (state)")
        cols = {r[1] for r in self._db.execute("pragma table_info(jobs)").fetchall()}
        for col in ("started real", "finished real", "bytes_read integer not null default 0",
                    "bytes_written integer not null default 0"):
            if col.split()[0] not in cols:
                self._db.execute(f"alter table jobs add column {col}")
        self._db.execute("create table if not exists workers (name text primary key, until real not null)")

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
        _, started, finished, read, written = summary_of(rec)
        self._q("update jobs set state = ?, doc = ?, started = ?, finished = ?, bytes_read = ?, bytes_written = ? "
                "where id = ?", (rec.job.state.value, _doc(rec), started, finished, read, written, rec.job.id))

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

    def summaries(self) -> list[Summary]:
        rows = self._q("select state, started, finished, bytes_read, bytes_written from jobs")
        return [(r[0], r[1], r[2], int(r[3] or 0), int(r[4] or 0)) for r in rows]

    def beat(self, worker: str, ttl: float) -> None:
        now = time.time()
        self._q("insert or replace into workers (name, until) values (?, ?)", (worker, now + ttl))
        self._q("delete from workers where until < ?", (now,))

    def live_workers(self) -> list[str]:
        return [r[0] for r in self._q("select name from workers where until >= ?", (time.time(),))]

    def close(self) -> None:
        with self._lock:
            self._db.close()


class RedisJobStore(JobStore):
    """Hashes ``<prefix>:job:<id>`` (doc, state, claimed, cancel), a sorted set of ids by creation time, and a
    set of queued ids, in the queue's Redis."""

    def __init__(self, conn: Any, prefix: str = "adapter-surgery", where: str = "Redis") -> None:
        self.r = conn
        self.p = prefix
        self.where = where

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
        _, started, finished, read, written = summary_of(rec)
        pipe.hset(key, mapping={"doc": _doc(rec), "state": rec.job.state.value, "started": started or "",
                                "finished": finished or "", "bytes_read": read, "bytes_written": written})
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

    def summaries(self) -> list[Summary]:
        ids = list(self.r.zrange(f"{self.p}:jobs", 0, -1))
        out: list[Summary] = []
        for start in range(0, len(ids), 1000):
            pipe = self.r.pipeline()
            for i in ids[start:start + 1000]:
                pipe.hmget(self._key(i.decode() if isinstance(i, bytes) else i), "state", "started", "finished",
                           "bytes_read", "bytes_written")
            for state, started, finished, read, written in pipe.execute():
                if state is None:
                    continue
                out.append((state.decode() if isinstance(state, bytes) else str(state),
                            float(started) if started else None, float(finished) if finished else None,
                            int(read or 0), int(written or 0)))
        return out

    def beat(self, worker: str, ttl: float) -> None:
        self.r.set(f"{self.p}:worker:{worker}", str(time.time()), px=max(1, int(ttl * 1000)))

    def live_workers(self) -> list[str]:
        prefix = f"{self.p}:worker:"
        return sorted((k.decode() if isinstance(k, bytes) else k)[len(prefix):]
                      for k in self.r.scan_iter(match=prefix + "*", count=1000))
