"""The job service: submit operations to a huey queue, run them on workers, keep their records.

One :class:`JobService` per process, built from :class:`Settings`:

- embedded (no ``queue_url``): a :class:`huey.SqliteHuey` in ``<data_dir>/.adapter-surgery/queue.db``; the API
  process runs ``workers`` threads that take tasks with huey's ``dequeue``/``execute`` and are woken by each
  submission (no polling delay). Threads start on the first submission (or :meth:`start`) and end after a minute
  without work, or on :meth:`stop_workers`.
- Redis (``queue_url``): a :class:`huey.RedisHuey`; the API only enqueues, and ``adapter-surgery worker``
  processes run huey's own consumer (:meth:`run_consumer`) on any number of machines sharing the data volume.

Job records live beside the queue (:mod:`adapter_surgery.jobs.store`), so they survive restarts and every API
replica sees every job. A running job's record carries its worker (host, pid) and a heartbeat; :meth:`recover`
marks ``failed`` the running jobs whose worker is gone and :meth:`sweep` removes the temporary outputs whose owner
is no longer live (see ``io.atomic`` owner records).
"""

from __future__ import annotations

import base64
import contextlib
import importlib
import logging
import os
import re
import shutil
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from huey import RedisHuey, SqliteHuey
from pydantic import ValidationError

from adapter_surgery.errors import (
    Cancelled,
    InvalidSpec,
    NotFound,
    NoWorker,
    QueueFull,
    SurgeryError,
    validation_problem_body,
)
from adapter_surgery.io.atomic import OWNER_SUFFIX, _process_start, process_alive, read_owner
from adapter_surgery.io.writer import DigestCache
from adapter_surgery.jobs.models import FINISHED, Job, JobProgress, JobRecord, JobState
from adapter_surgery.jobs.runner import run_operation
from adapter_surgery.jobs.store import JobStore, RedisJobStore, SqliteJobStore, Summary, store_errors
from adapter_surgery.model.roles import ArchitectureCache
from adapter_surgery.ops import OPERATIONS
from adapter_surgery.ops.attach_lora.peft_bridge import WARM_MODULES as PEFT_MODULES
from adapter_surgery.ops.common import ProgressEvent, RunContext
from adapter_surgery.settings import Settings
from adapter_surgery.tokenizer_cache import TokenizerCache

log = logging.getLogger("adapter_surgery.jobs")

#: The service's own directory in the data directory: the embedded queue, upload scratch space.
STATE_DIR = ".adapter-surgery"
#: Progress writes per job per second at most.
PROGRESS_WRITES_PER_S = 4
#: Cancel-flag reads per running job per second at most (it is polled at every tensor boundary).
CANCEL_POLLS_PER_S = 4
#: A running job with no heartbeat for this many intervals, on another host, is dead.
HEARTBEAT_MISSES = 4
#: Temporary paths: ``.<name>.tmp-<tag>`` (atomic outputs), ``.old-`` (overwrite swap), ``.surgery-`` (work).
TEMP_NAME = re.compile(r"^\..+\.(tmp|old|surgery)-[0-9a-f]{12}(\.owner)?$")
#: A temporary path with no owner record (written before owner records existed) is stale after this long.
UNOWNED_STALE_S = 3600
#: A temporary path of a process on another host, not a job, is stale after this long.
FOREIGN_STALE_S = 24 * 3600
#: Embedded worker threads end after this long without work (the next submission starts them again).
IDLE_EXIT_S = 60.0
TASK_NAME = "adapter_surgery.run_job"


def _now() -> datetime:
    return datetime.now(UTC)


class _Running:
    """A job this process runs: its record (written by one thread at a time), cancel event, throttles."""

    def __init__(self, rec: JobRecord) -> None:
        self.rec = rec
        self.lock = threading.Lock()
        self.cancel = threading.Event()
        self.last_write = 0.0
        self.last_poll = 0.0
        self.abandoned = False  # failed by stop_workers after its grace period: its own outcome is not recorded


#: What the operations import on first use (the modeling base classes, the auto mappings, the meta-device builds of
#: common architectures, peft's LoRA tuner): 2.5-3 s in a fresh process, paid at start-up instead of by a request.
WARM_MODULES = (
    "transformers.modeling_utils",
    "transformers.models.auto.modeling_auto",
    "transformers.models.llama.modeling_llama",
    "transformers.models.qwen2.modeling_qwen2",
    "transformers.pytorch_utils",
    *PEFT_MODULES,
)


def warm_imports(modules: tuple[str, ...] = WARM_MODULES) -> list[str]:
    """Import ``modules`` (run on a daemon thread at start-up); the ones that could not be imported."""
    failed = []
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception:  # an optional module missing in this version: the request imports what it needs
            failed.append(name)
    if failed:
        log.info("warm imports: not imported %s", failed)
    return failed


class JobService:
    """Submit, run, inspect and cancel jobs (see the module docstring). Nothing touches the disk or the network
    until first used, so building one (as ``create_app`` does) is free."""

    def __init__(self, settings: Settings, digests: DigestCache | None = None) -> None:
        self.settings = settings
        self.digests = digests or DigestCache()
        self.architectures = ArchitectureCache()  # resolved architectures, for every job this service runs
        self.tokenizers = TokenizerCache()  # loaded tokenizers (extend-vocab), likewise
        self.identity = f"{socket.gethostname()}:{os.getpid()}"
        self.embedded = settings.queue_url is None
        self._init_lock = threading.Lock()
        self._huey: Any = None
        self._run_job: Any = None
        self._store: JobStore | None = None
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._generation = 0
        self._threads: list[threading.Thread] = []
        self._stop = threading.Event()
        self._running: dict[str, _Running] = {}
        self._unrecorded: dict[str, Job] = {}  # finished here, but the store refused the write (a full disk)
        self._listeners: dict[str, list[Callable[[], None]]] = {}
        self._started = False

    # ----------------------------------------------------------------------------------------------- plumbing
    @property
    def state_dir(self) -> Path:
        return self.settings.data_dir / STATE_DIR

    @property
    def scratch_dir(self) -> Path:
        """Where uploads are unpacked: under the data directory, so that every worker sees them."""
        return self.state_dir / "scratch"

    def _init(self) -> None:
        with self._init_lock:
            if self._huey is not None:
                return
            if self.settings.queue_url:
                url = urlsplit(self.settings.queue_url)
                where = f"Redis at {url.hostname or 'localhost'}:{url.port or 6379}"  # never the password
                with store_errors(where):
                    huey = RedisHuey("adapter-surgery", url=self.settings.queue_url, results=False)
                store: JobStore = RedisJobStore(huey.storage.conn, where=where)
            else:
                db = self.state_dir / "queue.db"
                with store_errors(str(db), self.settings.data_dir):
                    self.state_dir.mkdir(parents=True, exist_ok=True)
                    huey = SqliteHuey("adapter-surgery", filename=str(db), results=False)
                store = SqliteJobStore(db, data_dir=self.settings.data_dir)
            self._run_job = huey.task(name=TASK_NAME)(self._execute)
            self._store, self._huey = store, huey

    @property
    def huey(self) -> Any:
        self._init()
        return self._huey

    @property
    def store(self) -> JobStore:
        self._init()
        assert self._store is not None
        return self._store

    def start(self) -> None:
        """Once per process: recover the jobs of dead workers, sweep stale temporaries; in embedded mode, start
        the workers."""
        with self._init_lock:
            first, self._started = not self._started, True
        if first:
            if self.settings.warm_imports:
                threading.Thread(target=warm_imports, daemon=True, name="adapter-surgery-warm-imports").start()
            try:
                with store_errors(str(self.settings.data_dir), self.settings.data_dir):
                    self.settings.data_dir.mkdir(parents=True, exist_ok=True)
                self.recover()
                self.sweep()
            except BaseException:
                with self._init_lock:  # the next call tries again
                    self._started = False
                raise
        if self.embedded:
            self.start_workers()

    # ----------------------------------------------------------------------------------------------- client side
    def submit(self, op_name: str, spec: dict[str, Any], *, data_dir_rel: str = "") -> Job:
        """Queue ``op_name`` on ``spec`` (paths relative to ``data_dir / data_dir_rel``).

        Raises:
            QueueFull: ``max_queue`` jobs are waiting.
        """
        if op_name not in OPERATIONS:
            raise NotFound(f"no operation {op_name!r}", field="operation")
        self.start()
        queued = self.store.count(JobState.queued)
        if queued >= self.settings.max_queue:
            raise QueueFull(f"{queued} jobs are waiting, the most this service queues (max_queue)",
                            retry_after=max(1, round(self.settings.heartbeat_seconds)),
                            fix="Retry after the number of seconds in Retry-After.")
        job = Job(id=uuid.uuid4().hex, operation=op_name, state=JobState.queued, created_at=_now())
        rec = JobRecord(job=job, spec=spec, data_dir_rel=data_dir_rel)
        task = self._run_job.s(job.id)
        rec.task_id = task.id  # lets a cancel revoke the queued task
        self.store.insert(rec)
        try:
            with store_errors(self.store.where, self.store.data_dir):
                self.huey.enqueue(task)
        except BaseException as exc:  # never left queued with no task behind it
            if self.store.claim(job.id):
                problem = exc.to_problem() if isinstance(exc, SurgeryError) else None
                with contextlib.suppress(Exception):
                    self._finish(rec, JobState.failed, problem=problem)
            raise
        with self._wake:
            self._generation += 1
            self._wake.notify_all()
        log.info("job %s queued: %s", job.id, op_name, extra={"job_id": job.id, "operation": op_name})
        return job

    def get(self, job_id: str) -> Job:
        rec = self.store.load(job_id) if re.fullmatch(r"[0-9a-f]{32}", job_id) else None
        if job_id in self._unrecorded:
            if rec is None or rec.job.state not in FINISHED:
                return self._unrecorded[job_id]
            self._unrecorded.pop(job_id, None)
        if rec is None:
            raise NotFound(f"no job {job_id!r} (finished jobs are kept up to job_retention)", field="id",
                           fix="GET /jobs lists the jobs this service keeps.")
        return rec.job

    def list(self, state: JobState | None = None, limit: int = 50,
             cursor: str | None = None) -> tuple[list[Job], str | None]:
        """Newest first; ``cursor`` is the ``next_cursor`` of the previous page. The jobs come without their
        ``result`` (which can be megabytes); :meth:`get` has it."""
        after = _parse_cursor(cursor) if cursor else None
        recs = self.store.page(state, limit + 1, after)
        jobs = [r.job.model_copy(update={"result": None}) for r in recs[:limit]]
        more = len(recs) > limit and jobs
        return jobs, _make_cursor(jobs[-1]) if more else None

    def cancel(self, job_id: str) -> Job:
        """Cancel: a queued job is revoked at once; a running one stops at its next tensor or shard boundary
        (its temporary files removed); a finished one is unchanged."""
        job = self.get(job_id)
        if job.state in FINISHED:
            return job
        self.store.request_cancel(job_id)
        local = self._running.get(job_id)
        if local is not None:
            local.cancel.set()
        if job.state == JobState.queued and self.store.claim(job_id):  # never started: it never will
            rec = self.store.load(job_id)
            if rec is not None:
                if rec.task_id:
                    with contextlib.suppress(Exception):
                        self.huey.revoke_by_id(rec.task_id, revoke_once=True)
                self._finish(rec, JobState.cancelled, problem=Cancelled(
                    "the job was cancelled before it started", fix="Submit the request again to run it.").to_problem())
        return self.get(job_id)

    def wait(self, job_id: str, timeout: float | None = None) -> Job:
        """Block until the job has finished (or ``timeout`` seconds passed); return it."""
        done = threading.Event()
        unsubscribe = self.on_finish(job_id, done.set)
        deadline = None if timeout is None else time.monotonic() + timeout
        try:
            delay = 0.02
            while True:
                job = self.get(job_id)
                if job.state in FINISHED or (deadline is not None and time.monotonic() >= deadline):
                    return job
                done.wait(delay if deadline is None else min(delay, max(0.0, deadline - time.monotonic())))
                delay = min(delay * 1.5, 0.5)
        finally:
            unsubscribe()

    def on_finish(self, job_id: str, callback: Callable[[], None]) -> Callable[[], None]:
        """Call ``callback`` (from a worker thread) when a job this process runs finishes; returns an unsubscribe.
        Jobs run elsewhere are seen by polling :meth:`get`."""
        with self._lock:
            self._listeners.setdefault(job_id, []).append(callback)

        def unsubscribe() -> None:
            with self._lock:
                cbs = self._listeners.get(job_id, [])
                if callback in cbs:
                    cbs.remove(callback)
                if not cbs:
                    self._listeners.pop(job_id, None)

        return unsubscribe

    def queue_depth(self) -> int:
        return self.store.count(JobState.queued)

    def counts(self) -> dict[str, int]:
        return {s.value: self.store.count(s) for s in JobState}

    def summaries(self) -> list[Summary]:
        """(state, started_at, finished_at, bytes_read, bytes_written) per record, results not loaded."""
        return self.store.summaries()

    def healthy(self) -> tuple[bool, str]:
        """For ``/readyz``: the job store answers, and the workers run: (embedded) the threads run or can start;
        (Redis) at least one ``adapter-surgery worker`` beat within the last few heartbeat intervals."""
        try:
            self.store.ping()
        except Exception as exc:
            return False, f"job store unreachable: {type(exc).__name__}: {exc}"
        if self.embedded and self._stop.is_set():
            return False, "the job workers were stopped"
        if not self.embedded:
            try:
                missing = self._no_worker()
            except Exception as exc:
                return False, f"job store unreachable: {type(exc).__name__}: {exc}"
            if missing is not None:
                return False, f"{missing}; start one with 'adapter-surgery worker'"
        return True, "ok"

    def _no_worker(self) -> str | None:
        """(Redis queue) why no worker can take a job now, or None while one sent a heartbeat recently."""
        if self.store.live_workers():
            return None
        return ("no adapter-surgery worker is running (none sent a heartbeat in the last "
                f"{HEARTBEAT_MISSES * self.settings.heartbeat_seconds:g} s)")

    def require_worker(self) -> None:
        """Before a request that waits for its job (no ``Prefer: respond-async``): with a Redis queue and no live
        ``adapter-surgery worker``, it would wait for ever; refuse it at once (an asynchronous request is queued: a
        worker started later takes it).

        Raises:
            NoWorker: no worker sent a heartbeat within the last few intervals (as ``/readyz``).
        """
        if self.embedded:
            return
        with store_errors(self.store.where, self.store.data_dir):
            missing = self._no_worker()
        if missing is not None:
            raise NoWorker(f"{missing}, so the request would wait for ever",
                           fix="Start one with 'adapter-surgery worker' (same ADAPTER_SURGERY_QUEUE_URL and data "
                               "directory), or send Prefer: respond-async to queue the job until one runs.")

    def beat(self) -> None:
        """Register this process as a live worker for ``HEARTBEAT_MISSES`` heartbeat intervals."""
        self.store.beat(self.identity, HEARTBEAT_MISSES * self.settings.heartbeat_seconds)

    # ----------------------------------------------------------------------------------------------- workers
    def start_workers(self) -> None:
        """Embedded mode: make sure ``workers`` threads run (they end after a minute idle)."""
        with self._lock:
            if self._stop.is_set():
                return
            self._threads = [t for t in self._threads if t.is_alive()]
            for _ in range(self.settings.workers - len(self._threads)):
                t = threading.Thread(target=self._worker_loop, name="adapter-surgery-worker", daemon=True)
                self._threads.append(t)
                t.start()

    def request_stop(self) -> None:
        """Stop taking jobs and ask the running ones to stop (each ends ``failed`` "Service stopped" at its next
        boundary, its output untouched); returns at once."""
        self._stop.set()
        for r in list(self._running.values()):
            r.cancel.set()
        with self._wake:
            self._wake.notify_all()

    def stop_workers(self, timeout: float = 30.0) -> None:
        """:meth:`request_stop`, then wait for the running jobs up to ``timeout`` seconds. A job still running then
        (no boundary reached: one long tensor or probe) is recorded ``failed`` "Service stopped" and its temporary
        files are removed now, before the process exits; its thread, if it ever goes on, records nothing."""
        self.request_stop()
        deadline = time.monotonic() + timeout
        for t in list(self._threads):
            t.join(max(0.0, deadline - time.monotonic()))
        for run in list(self._running.values()):
            with contextlib.suppress(Exception):
                self._abandon(run)
        if isinstance(self._store, SqliteJobStore):
            self._store.close()
            self._store = None
            self._huey = None

    def _worker_loop(self) -> None:
        idle_since = time.monotonic()
        while not self._stop.is_set():
            with self._lock:
                generation = self._generation
            try:
                task = self.huey.dequeue()
            except Exception:
                log.exception("cannot read the job queue")
                task = None
            if task is not None:
                self.huey.execute(task)
                idle_since = time.monotonic()
                continue
            with self._wake:
                if self._generation == generation and not self._stop.is_set():
                    self._wake.wait(1.0)
            if time.monotonic() - idle_since > IDLE_EXIT_S:
                with self._lock:
                    if self._generation == generation:
                        self._threads = [t for t in self._threads if t is not threading.current_thread()]
                        return

    def run_consumer(self) -> None:
        """``adapter-surgery worker``: run huey's consumer (``workers`` threads) in this process until SIGINT or
        SIGTERM, with a thread that recovers dead workers' jobs every heartbeat interval."""
        from huey.consumer import Consumer

        self.start()
        stop = threading.Event()

        def housekeeping() -> None:
            while True:
                try:
                    self.beat()
                except Exception:
                    log.warning("cannot register this worker's heartbeat", exc_info=True)
                if stop.wait(self.settings.heartbeat_seconds):
                    return
                with contextlib.suppress(Exception):
                    self.recover(sweep_outputs=True)

        keeper = threading.Thread(target=housekeeping, name="adapter-surgery-recover", daemon=True)
        keeper.start()
        consumer = Consumer(self.huey, workers=self.settings.workers, worker_type="thread", periodic=False,
                            initial_delay=0.05, max_delay=1.0, check_worker_health=True)
        try:
            consumer.run()
        finally:
            stop.set()

    # ----------------------------------------------------------------------------------------------- one job
    def _execute(self, job_id: str) -> None:
        """The huey task: run one job here, recording progress, heartbeat and the outcome."""
        rec = self.store.load(job_id)
        if rec is None or not self.store.claim(job_id):
            return  # pruned, or cancelled before it started
        run = _Running(rec)
        with self._lock:
            self._running[job_id] = run
        rec.job.state, rec.job.started_at, rec.job.worker = JobState.running, _now(), self.identity
        rec.host, rec.pid, rec.pid_start, rec.heartbeat = socket.gethostname(), os.getpid(), \
            _process_start(os.getpid()), time.time()
        with contextlib.suppress(Exception):  # the outcome is written at the end in any case
            self.store.save(rec)
        log.info("job %s running on %s", job_id, self.identity, extra={"job_id": job_id})
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(run, beat_stop), daemon=True,
                                name=f"adapter-surgery-heartbeat-{job_id[:8]}")
        beat.start()
        state, result, problem = JobState.failed, None, None
        try:
            op = OPERATIONS[rec.job.operation]
            ctx = RunContext(self.settings.data_dir / rec.data_dir_rel, progress=lambda ev: self._progress(run, ev),
                             digests=self.digests, should_cancel=lambda: self._should_cancel(run), owner=job_id,
                             memory_limit_bytes=self.settings.memory_limit_bytes, architectures=self.architectures,
                             tokenizers=self.tokenizers)
            spec = op.spec.model_validate(rec.spec)
            run_result = run_operation(op, spec, ctx)
            state, result = JobState.succeeded, run_result.model_dump(mode="json")
        except Cancelled as exc:
            state, problem = JobState.cancelled, exc.to_problem()
            if self._stop.is_set() and not self.store.cancel_requested(job_id):
                state, problem = JobState.failed, _service_stopped(problem)
        except SurgeryError as exc:
            problem = exc.to_problem()
        except ValidationError as exc:
            problem = validation_problem_body(exc.errors())
        except Exception as exc:
            log.exception("job %s failed unexpectedly", job_id, extra={"job_id": job_id})
            problem = {"type": "about:blank", "title": "Internal error", "status": 500,
                       "detail": f"{type(exc).__name__}: the service failed unexpectedly; nothing was written to the "
                                 "output. Please report it with the request."}
        finally:
            beat_stop.set()
            beat.join()
        with run.lock:
            if not run.abandoned:
                self._finish(rec, state, result=result, problem=problem)
        with self._lock:  # only now: while it is listed here, this process's recovery never takes the job for dead
            self._running.pop(job_id, None)

    def _finish(self, rec: JobRecord, state: JobState, *, result: dict[str, Any] | None = None,
                problem: dict[str, Any] | None = None) -> None:
        rec.job.state, rec.job.finished_at, rec.job.result, rec.job.problem = state, _now(), result, problem
        res, p = result or {}, rec.job.progress  # bytes written: what the writer reported, for a result only
        rec.bytes_read = int(res.get("bytes_read") or res.get("base_bytes_read") or 0)
        rec.bytes_written = int(res.get("bytes_written") or (p.done if result is not None and p.unit == "bytes" else 0))
        if state == JobState.succeeded:
            p = rec.job.progress
            total = p.total if p.total > 0 else 1
            rec.job.progress = JobProgress(fraction=1.0, stage="done", done=total, total=total,
                                           unit=p.unit if p.total > 0 else "steps")
        for attempt in range(3):  # a full disk may refuse the first write; the failed job freed its space
            try:
                self.store.save(rec)
                break
            except Exception:
                if attempt == 2:
                    log.exception("cannot record the end of job %s", rec.job.id)
                time.sleep(0.2)
        log.info("job %s %s", rec.job.id, state.value,
                 extra={"job_id": rec.job.id, "state": state.value, "status": (problem or {}).get("status")})
        with contextlib.suppress(Exception):
            self.store.prune(self.settings.job_retention)
        with self._lock:
            callbacks = list(self._listeners.get(rec.job.id, []))
        for cb in callbacks:
            with contextlib.suppress(Exception):
                cb()

    def _abandon(self, run: _Running) -> None:
        """Record a job that did not stop within the grace period ``failed`` "Service stopped" (``cancelled`` if a
        cancel was asked for), and remove its temporary files (beside its output: its owner is no longer live once
        the record is finished)."""
        rec = run.rec
        with run.lock:
            if run.abandoned or rec.job.state in FINISHED:
                return
            run.abandoned = True
            problem = Cancelled("the job was cancelled; nothing was written to the output",
                                fix="Submit the request again to run it.").to_problem()
            cancelled = False
            with contextlib.suppress(Exception):
                cancelled = self.store.cancel_requested(rec.job.id)
            if cancelled:  # a DELETE came first: it stays a cancel, as when the job reaches its boundary
                self._finish(rec, JobState.cancelled, problem=problem)
            else:
                self._finish(rec, JobState.failed, problem=_service_stopped(problem))
        log.warning("job %s failed: the service stopped before the job reached a boundary", rec.job.id,
                    extra={"job_id": rec.job.id})
        self._sweep_beside_output(rec)

    def _sweep_beside_output(self, rec: JobRecord) -> None:
        """Remove the temporaries a job left beside its output (its owner is gone or the job was given up)."""
        out = rec.spec.get("output")
        if isinstance(out, str):
            self.sweep([(self.settings.data_dir / rec.data_dir_rel / out).parent], depth=1)

    def _progress(self, run: _Running, ev: ProgressEvent) -> None:
        with run.lock:
            if run.abandoned:  # recorded failed by stop_workers: its record no longer changes
                return
            planned = ev.total != run.rec.job.progress.total  # a new plan is always written, then throttled
            run.rec.job.progress = JobProgress(fraction=ev.fraction, stage=ev.stage[:200], done=ev.done,
                                               total=ev.total, unit=ev.unit)
            now = time.monotonic()
            if planned or now - run.last_write >= 1 / PROGRESS_WRITES_PER_S:
                run.last_write = now
                with contextlib.suppress(Exception):  # progress is best effort; the job goes on
                    self.store.save(run.rec)

    def _should_cancel(self, run: _Running) -> bool:
        if run.cancel.is_set():
            return True
        now = time.monotonic()
        if now - run.last_poll >= 1 / CANCEL_POLLS_PER_S:
            run.last_poll = now
            with contextlib.suppress(Exception):
                if self.store.cancel_requested(run.rec.job.id):
                    run.cancel.set()
        return run.cancel.is_set()

    def _heartbeat(self, run: _Running, stop: threading.Event) -> None:
        while not stop.wait(self.settings.heartbeat_seconds):
            with run.lock:
                if run.abandoned:
                    return
                run.rec.heartbeat = time.time()
                with contextlib.suppress(Exception):
                    self.store.save(run.rec)
            with contextlib.suppress(Exception):
                if self.store.cancel_requested(run.rec.job.id):
                    run.cancel.set()

    # ----------------------------------------------------------------------------------------------- recovery
    def _dead(self, rec: JobRecord) -> bool:
        """Whether the worker of a running job is gone."""
        if rec.job.id in self._running:
            return False
        if rec.host == socket.gethostname() and rec.pid == os.getpid():
            return True  # this process's pid, but not running it here: an earlier process with the same pid
        alive = process_alive({"host": rec.host, "pid": rec.pid, "pid_start": rec.pid_start})
        if alive is not None:
            return not alive
        return time.time() - (rec.heartbeat or 0) > HEARTBEAT_MISSES * self.settings.heartbeat_seconds

    def recover(self, sweep_outputs: bool = False) -> list[str]:
        """Mark ``failed`` every running job whose worker is gone; return their ids. With ``sweep_outputs``, remove
        their temporary files beside their outputs now (start-up does it through :meth:`sweep`)."""
        failed = []
        for listed in self.store.with_state(JobState.running):
            if not self._dead(listed):
                continue
            # the listing may predate the job's final save (its worker finished meanwhile, then left ``_running``
            # or exited): only a record that is still running now is failed
            rec = self.store.load(listed.job.id)
            if rec is None or rec.job.state != JobState.running or (rec.host, rec.pid) != (listed.host, listed.pid):
                continue
            worker = rec.job.worker or "?"
            self._finish(rec, JobState.failed, problem={
                "type": "https://adapter-surgery.dev/problems/WorkerDied", "title": "Worker died", "status": 500,
                "detail": f"the process running the job ({worker}) died before it finished; its temporary files "
                          "were removed and nothing was left at the output",
                "fix": "Submit the request again."})
            failed.append(rec.job.id)
            log.warning("job %s failed: its worker %s died", rec.job.id, worker, extra={"job_id": rec.job.id})
            if sweep_outputs:
                self._sweep_beside_output(rec)
        return failed

    def _owner_live(self, record: dict[str, Any] | None, mtime: float) -> bool:
        if record is None:
            return time.time() - mtime < UNOWNED_STALE_S
        job_id = record.get("job")
        if isinstance(job_id, str):
            rec = self.store.load(job_id) if re.fullmatch(r"[0-9a-f]{32}", job_id) else None
            if rec is not None:
                return rec.job.state == JobState.queued or (rec.job.state == JobState.running and not self._dead(rec))
        alive = process_alive(record)
        if alive is None:
            return time.time() - mtime < FOREIGN_STALE_S
        return alive

    def sweep(self, roots: list[Path] | None = None, depth: int = 8) -> list[Path]:
        """Remove the temporary outputs (``.<name>.tmp-*``, ``.surgery-*``) and scratch directories whose owner is
        not live; an overwrite interrupted between its two renames gets its previous output back. Return what was
        removed. Safe with several replicas on one volume: a live owner's paths are kept."""
        removed: list[Path] = []
        if roots is None:
            roots = [self.settings.data_dir]
            if self.scratch_dir.is_dir():
                for d in self.scratch_dir.iterdir():
                    if d.is_dir() and not self._owner_live(read_owner(d), _mtime(d)):
                        shutil.rmtree(d, ignore_errors=True)
                        removed.append(d)
        for path in sorted(_walk_temps(roots, depth), key=lambda p: p.name.endswith(OWNER_SUFFIX)):  # records last
            name = path.name
            if name.endswith(OWNER_SUFFIX):
                tmp = path.with_name(name[: -len(OWNER_SUFFIX)])
                if tmp.exists():
                    continue  # judged with its temporary path
                if not self._owner_live(read_owner(tmp), _mtime(path)):
                    path.unlink(missing_ok=True)
                    removed.append(path)
                continue
            kind = TEMP_NAME.match(name).group(1)  # type: ignore[union-attr]
            owner_of = path.with_name(name.replace(".old-", ".tmp-")) if kind == "old" else path
            if self._owner_live(read_owner(owner_of), _mtime(path)):
                continue
            if kind == "old":
                dest = path.with_name(name[1:].rsplit(".old-", 1)[0])
                if not dest.exists():  # interrupted between moving the old output aside and the new one in
                    os.replace(path, dest)
                    owner_of.with_name(owner_of.name + OWNER_SUFFIX).unlink(missing_ok=True)
                    log.warning("restored %s, left aside by an interrupted overwrite", dest)
                    continue
            _remove(path)
            removed.append(path)
            path.with_name(name + OWNER_SUFFIX).unlink(missing_ok=True)
        for p in removed:
            log.info("removed stale temporary %s", p)
        return removed


def _service_stopped(problem: dict[str, Any]) -> dict[str, Any]:
    """The problem of a job the service stopped (a cancel's, retitled: 503, the job may be submitted again)."""
    return {**problem, "title": "Service stopped", "status": 503,
            "detail": "the service stopped while the job ran; nothing was written to the output"}


def _mtime(path: Path) -> float:
    try:
        return path.lstat().st_mtime
    except OSError:
        return 0.0


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


def _walk_temps(roots: list[Path], depth: int) -> Iterator[Path]:
    """Temporary paths under ``roots`` (not inside them, nor in the service's own directory), ``depth`` levels."""
    stack = [(r, 0) for r in roots if r.is_dir()]
    while stack:
        d, level = stack.pop()
        try:
            entries = list(os.scandir(d))
        except OSError:
            continue
        for e in entries:
            if TEMP_NAME.match(e.name):
                yield Path(e.path)
            elif e.is_dir(follow_symlinks=False) and level + 1 < depth and e.name != STATE_DIR:
                stack.append((Path(e.path), level + 1))


def _make_cursor(job: Job) -> str:
    raw = f"{job.created_at.timestamp()!r}|{job.id}".encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _parse_cursor(cursor: str) -> tuple[float, str]:
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
        created, job_id = raw.split("|", 1)
        if not re.fullmatch(r"[0-9a-f]{32}", job_id):
            raise ValueError(job_id)
        return float(created), job_id
    except (ValueError, UnicodeDecodeError):
        raise InvalidSpec("the cursor is not one this service gave", field="cursor",
                          fix="Pass the next_cursor of the previous page, or no cursor for the first page.") from None
