"""A typed Python client of the service (httpx): one method per operation, jobs with a progress bar, uploads
streamed both ways, and every problem+json answer raised as a typed exception.

```python
from adapter_surgery.client import Client

with Client("http://localhost:8000") as c:            # token: token= or ADAPTER_SURGERY_API_TOKEN
    result = c.extend_vocab({"checkpoint": "base", "output": "base-tools", "tokens": ["<a>"]})
    job = c.wait(c.submit("attach-lora", {"checkpoint": "base-tools", "output": "lora", "r": 8}))
```

Importing this module imports neither torch nor transformers: the operation methods load the operation's spec
and result models on first use (a dict is validated into the spec before it is sent, the answer into the
result); ``run``, ``submit`` and the job methods work on plain JSON and never load them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Iterator, Mapping
from datetime import datetime
from email.utils import parsedate_to_datetime
from enum import StrEnum
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if TYPE_CHECKING:
    from types import TracebackType

    from adapter_surgery.ops.attach_head import AttachHeadResult, AttachHeadSpec
    from adapter_surgery.ops.attach_lora import AttachLoraResult, AttachLoraSpec
    from adapter_surgery.ops.convert_adapter import ConvertAdapterResult, ConvertAdapterSpec
    from adapter_surgery.ops.expand_blocks import ExpandBlocksResult, ExpandBlocksSpec
    from adapter_surgery.ops.extend_vocab import ExtendVocabResult, ExtendVocabSpec
    from adapter_surgery.ops.merge_lora import MergeLoraResult, MergeLoraSpec
    from adapter_surgery.ops.surgery import SurgeryResult, SurgerySpec
    from adapter_surgery.ops.verify import VerifyResult, VerifySpec

#: The operations the client knows (the routes ``POST /<name>``); ``tests/test_client.py`` checks that they
#: are exactly the keys of ``adapter_surgery.ops.OPERATIONS``, without this module importing them.
OPERATION_NAMES = ("extend-vocab", "attach-lora", "attach-head", "expand-blocks", "surgery", "merge-lora",
                   "convert-adapter", "verify")
TOKEN_ENV = "ADAPTER_SURGERY_API_TOKEN"
RESULT_HEADER = "X-Adapter-Surgery-Result"
PROBLEM = "application/problem+json"
DEFAULT_TIMEOUT = httpx.Timeout(60.0, connect=10.0)
CHUNK = 1 << 20

R = TypeVar("R", bound=BaseModel)


# --- jobs -------------------------------------------------------------------------------------------------------

class JobState(StrEnum):
    queued = "queued"
    running = "running"
    succeeded = "succeeded"
    failed = "failed"
    cancelled = "cancelled"


FINISHED = frozenset({JobState.succeeded, JobState.failed, JobState.cancelled})


class JobProgress(BaseModel):
    model_config = ConfigDict(extra="allow")

    fraction: float = Field(0.0, description="done / total, 0..1.")
    stage: str = Field("", description='What the job is doing, e.g. "rewriting shard 2/4".')
    done: int = 0
    total: int = 0
    unit: str = Field("bytes", description='"bytes", "tensors" or "steps".')


class Job(BaseModel):
    """A job as the service describes it (``GET /jobs/{id}``); extra fields of a newer service are kept."""

    model_config = ConfigDict(extra="allow")

    id: str
    operation: str
    state: JobState
    progress: JobProgress = Field(default_factory=JobProgress)
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    result: dict[str, Any] | None = Field(None, description="The operation's result, as JSON.")
    problem: dict[str, Any] | None = Field(None, description="The problem+json the synchronous call would answer.")

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


class JobPage(BaseModel):
    """One page of ``GET /jobs``, newest first; ``next_cursor`` is None on the last page."""

    jobs: list[Job]
    next_cursor: str | None = None


# --- problems ---------------------------------------------------------------------------------------------------

class ProblemError(Exception):
    """A problem+json answer (RFC 9457) of the service, as an exception.

    Attributes:
        status: the HTTP status.
        problem: the problem body as the service sent it (``title``, ``detail``, ``field``, ``fix``, ``errors``...).
        field: the request field at fault (dotted path), when the service names one.
        fix: what to change, when the service says.
    """

    status: int = 0

    def __init__(self, problem: Mapping[str, Any], status: int | None = None) -> None:
        self.problem = dict(problem)
        self.status = int(status if status is not None else self.problem.get("status") or type(self).status)
        self.title: str = str(self.problem.get("title") or "Problem")
        self.detail: str | None = self.problem.get("detail")
        self.field: str | None = self.problem.get("field")
        self.fix: str | None = self.problem.get("fix")
        text = f"{self.status} {self.title}" + (f": {self.detail}" if self.detail else "")
        super().__init__(text + (f" (fix: {self.fix})" if self.fix else ""))


class BadRequest(ProblemError):
    status = 400


class Unauthorized(ProblemError):
    status = 401


class PathOutsideDataDir(ProblemError):
    status = 403


class NotFound(ProblemError):
    status = 404


class MethodNotAllowed(ProblemError):
    status = 405


class Conflict(ProblemError):
    status = 409


class OutputExists(Conflict):
    """409: the output exists and the spec does not say ``"overwrite": true``."""


class Cancelled(Conflict):
    """409 whose problem type is ``Cancelled``: the job was cancelled."""


class PayloadTooLarge(ProblemError):
    status = 413


class UnsupportedMediaType(ProblemError):
    status = 415


class InvalidRequest(ProblemError):
    """422: a field is invalid or contradicts the checkpoint (``.field`` names it, ``.problem["errors"]`` all)."""

    status = 422


class QueueFull(ProblemError):
    """429: too many jobs queued; ``.retry_after`` is the seconds the service asks to wait (None if unsaid)."""

    status = 429

    def __init__(self, problem: Mapping[str, Any], status: int | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(problem, status)
        self.retry_after = retry_after


class ServerError(ProblemError):
    status = 500


class Unavailable(ProblemError):
    """503: not enough memory for the job, or the service is not ready."""

    status = 503


class InsufficientStorage(ProblemError):
    status = 507


class JobFailed(ProblemError):
    """A job that ended ``failed``: ``.job`` is the job, ``.problem``/``.status`` its problem, and ``.error`` the
    typed exception the synchronous call would have raised (``OutputExists``, ``InvalidRequest``...)."""

    def __init__(self, job: Job) -> None:
        problem = job.problem or {"title": "Job failed", "status": 500, "detail": f"job {job.id} failed"}
        super().__init__(problem)
        self.job = job
        self.error = problem_error(problem, self.status)


class ServiceUnreachable(Exception):
    """The service did not answer (connection refused, DNS, timeout); the message says which."""


BY_STATUS: dict[int, type[ProblemError]] = {
    400: BadRequest, 401: Unauthorized, 403: PathOutsideDataDir, 404: NotFound, 405: MethodNotAllowed,
    409: OutputExists, 413: PayloadTooLarge, 415: UnsupportedMediaType, 422: InvalidRequest, 429: QueueFull,
    500: ServerError, 503: Unavailable, 507: InsufficientStorage,
}


def problem_error(problem: Mapping[str, Any], status: int, retry_after: float | None = None) -> ProblemError:
    """The typed exception of a problem body: by status, and for 409 by the problem's ``type`` too."""
    kind = str(problem.get("type") or "")
    if status == 409 and kind.rsplit("/", 1)[-1] == "Cancelled":
        return Cancelled(problem, status)
    cls = BY_STATUS.get(status) or (ServerError if status >= 500 else ProblemError)
    if cls is QueueFull:
        return QueueFull(problem, status, retry_after)
    return cls(problem, status)


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        try:
            return max(0.0, parsedate_to_datetime(value).timestamp() - time.time())
        except (TypeError, ValueError):
            return None


def _raise_for_problem(response: httpx.Response) -> None:
    if response.status_code < 400:
        return
    if not response.is_closed:
        response.read()
    try:
        body = response.json()
    except ValueError:
        body = None
    if not isinstance(body, dict):  # not problem+json (a proxy's page, say): keep what it said
        body = {"title": response.reason_phrase or "Error", "status": response.status_code,
                "detail": response.text[:2000]}
    raise problem_error(body, response.status_code, _retry_after(response.headers.get("retry-after")))


# --- the client -------------------------------------------------------------------------------------------------

class Client:
    """The service at ``base_url``.

    Args:
        base_url: e.g. ``http://localhost:8000``.
        token: the bearer token; default ``ADAPTER_SURGERY_API_TOKEN`` (none if unset or empty).
        timeout: seconds (or an ``httpx.Timeout``) for each request; a synchronous operation waits for its
            answer as long as it takes unless its ``timeout=`` says otherwise.
        transport: an httpx transport (tests, proxies); default: the network.
    """

    def __init__(self, base_url: str, token: str | None = None, timeout: float | httpx.Timeout = DEFAULT_TIMEOUT,
                 *, transport: httpx.BaseTransport | None = None) -> None:
        token = token if token is not None else os.environ.get(TOKEN_ENV) or None
        headers = {"Accept": f"application/json, {PROBLEM}"}
        if token:
            headers["Authorization"] = f"Bearer {token}"
        self._timeout = timeout if isinstance(timeout, httpx.Timeout) else httpx.Timeout(timeout)
        self._http = httpx.Client(base_url=base_url.rstrip("/"), headers=headers, timeout=self._timeout,
                                  transport=transport)

    def __enter__(self) -> Client:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    @property
    def base_url(self) -> str:
        return str(self._http.base_url)

    # -- plumbing --

    def _request(self, method: str, url: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, url, **kwargs)
        except httpx.TransportError as exc:
            raise ServiceUnreachable(f"{method} {self.base_url.rstrip('/')}{url}: {type(exc).__name__}: {exc}") \
                from exc
        _raise_for_problem(response)
        return response

    def _op_timeout(self, seconds: float | None) -> httpx.Timeout:
        return httpx.Timeout(self._timeout.connect, connect=self._timeout.connect, read=seconds,
                             write=self._timeout.write, pool=self._timeout.pool)

    @staticmethod
    def _name(operation: str) -> str:
        name = operation.replace("_", "-")
        if name not in OPERATION_NAMES:
            raise ValueError(f"unknown operation {operation!r}; one of {', '.join(OPERATION_NAMES)}")
        return name

    @staticmethod
    def _body(operation: str, spec: BaseModel | Mapping[str, Any]) -> dict[str, Any]:
        if isinstance(spec, BaseModel):
            return spec.model_dump(mode="json", exclude_unset=True)
        if isinstance(spec, Mapping):
            return dict(spec)
        raise TypeError(f"the spec of {operation} must be its spec model or a dict, not {type(spec).__name__}")

    # -- operations --

    def health(self) -> dict[str, Any]:
        """``GET /healthz``: status, version, device, data directory."""
        return self._request("GET", "/healthz").json()

    def run(self, operation: str, spec: BaseModel | Mapping[str, Any], *, timeout: float | None = None
            ) -> dict[str, Any]:
        """``POST /<operation>`` with the spec as JSON; the result as JSON. Nothing is validated here (the
        service does it), so this loads no model classes."""
        name = self._name(operation)
        response = self._request("POST", f"/{name}", json=self._body(name, spec), timeout=self._op_timeout(timeout))
        return response.json()

    def _typed(self, operation: str, spec: BaseModel | Mapping[str, Any], timeout: float | None) -> Any:
        from adapter_surgery.errors import validation_problem_body
        from adapter_surgery.ops import OPERATIONS

        op = OPERATIONS[operation]
        if not isinstance(spec, BaseModel):
            try:
                op.spec.model_validate(dict(spec))
            except ValidationError as exc:
                raise InvalidRequest(validation_problem_body(exc.errors()), 422) from None
        return op.result.model_validate(self.run(operation, spec, timeout=timeout))

    def extend_vocab(self, spec: ExtendVocabSpec | Mapping[str, Any], *, timeout: float | None = None
                     ) -> ExtendVocabResult:
        """``POST /extend-vocab``: add tokens (see the README)."""
        return self._typed("extend-vocab", spec, timeout)

    def attach_lora(self, spec: AttachLoraSpec | Mapping[str, Any], *, timeout: float | None = None
                    ) -> AttachLoraResult:
        """``POST /attach-lora``: write a peft LoRA adapter for the checkpoint."""
        return self._typed("attach-lora", spec, timeout)

    def attach_head(self, spec: AttachHeadSpec | Mapping[str, Any], *, timeout: float | None = None
                    ) -> AttachHeadResult:
        """``POST /attach-head``: attach a classification head."""
        return self._typed("attach-head", spec, timeout)

    def expand_blocks(self, spec: ExpandBlocksSpec | Mapping[str, Any], *, timeout: float | None = None
                      ) -> ExpandBlocksResult:
        """``POST /expand-blocks``: insert new decoder blocks (LLaMA Pro)."""
        return self._typed("expand-blocks", spec, timeout)

    def surgery(self, spec: SurgerySpec | Mapping[str, Any], *, timeout: float | None = None) -> SurgeryResult:
        """``POST /surgery``: several operations as one job with one atomic output."""
        return self._typed("surgery", spec, timeout)

    def merge_lora(self, spec: MergeLoraSpec | Mapping[str, Any], *, timeout: float | None = None
                   ) -> MergeLoraResult:
        """``POST /merge-lora``: fold LoRA adapters into the base."""
        return self._typed("merge-lora", spec, timeout)

    def convert_adapter(self, spec: ConvertAdapterSpec | Mapping[str, Any], *, timeout: float | None = None
                        ) -> ConvertAdapterResult:
        """``POST /convert-adapter``: a trained PiSSA/OLoRA adapter as a plain LoRA for the original base."""
        return self._typed("convert-adapter", spec, timeout)

    def verify(self, spec: VerifySpec | Mapping[str, Any], *, timeout: float | None = None) -> VerifyResult:
        """``POST /verify``: the preservation report of a patched checkpoint against its base."""
        return self._typed("verify", spec, timeout)

    def upload(self, operation: str, file_path: str | Path, options: BaseModel | Mapping[str, Any] | None = None,
               dest: str | Path | None = None, *, overwrite: bool = False, timeout: float | None = None
               ) -> tuple[Path, dict[str, Any]]:
        """The upload form: send ``file_path`` (a ``.safetensors`` file or a ``.zip``/``.tar`` of a model
        directory) with ``options`` (the spec without ``checkpoint``/``output``), streamed from disk; the answer
        (the patched file, or an archive of the output) is streamed to ``dest``.

        ``dest`` defaults to ``<file stem>.<operation><suffix of the answer>`` beside the upload. The file
        appears complete or not at all (written beside it, then renamed); an existing ``dest`` is refused
        unless ``overwrite``. Returns ``(dest, result)``, the result JSON from the ``X-Adapter-Surgery-Result``
        header; when the service shortened it to fit a header (``"truncated": true``), the whole result from its
        job (``GET /jobs/{job}``).
        """
        name = self._name(operation)
        src = Path(file_path)
        spec = self._body(name, options or {})
        if dest is not None and Path(dest).exists() and not overwrite:
            raise FileExistsError(f"{dest} exists; pass overwrite=True to replace it")
        with src.open("rb") as fh:
            try:
                stream = self._http.stream("POST", f"/{name}", files={"file": (src.name, fh)},
                                           data={"spec": _json(spec)}, timeout=self._op_timeout(timeout))
                with stream as response:
                    _raise_for_problem(response)
                    target = Path(dest) if dest is not None else _default_dest(src, name, response)
                    if target.exists() and not overwrite:
                        raise FileExistsError(f"{target} exists; pass dest= or overwrite=True")
                    _save(response, target)
            except httpx.TransportError as exc:
                raise ServiceUnreachable(f"POST {self.base_url.rstrip('/')}/{name}: {type(exc).__name__}: "
                                         f"{exc}") from exc
        result = json.loads(response.headers.get(RESULT_HEADER) or "{}")
        if result.get("truncated") and isinstance(result.get("job"), str):
            result = self.get_job(result["job"]).result or result
        return target, result

    # -- jobs --

    def submit(self, operation: str, spec: BaseModel | Mapping[str, Any]) -> Job:
        """``POST /<operation>`` with ``Prefer: respond-async``: the job, queued (``202``, ``Location``).

        A service that ignores the preference (RFC 7240 lets it) and answers ``200`` gives a job that has
        already succeeded, with no id."""
        name = self._name(operation)
        started = datetime.now().astimezone()
        response = self._request("POST", f"/{name}", json=self._body(name, spec),
                                 headers={"Prefer": "respond-async"}, timeout=self._op_timeout(None))
        if response.status_code == 202:
            job = Job.model_validate(response.json())
            location = response.headers.get("location", "")
            if not location.rstrip("/").endswith(f"/jobs/{job.id}"):
                raise ProblemError({"title": "Unexpected answer", "status": 202,
                                    "detail": f"202 without Location: /jobs/{job.id} (got {location!r})"})
            return job
        now = datetime.now().astimezone()
        return Job(id="", operation=name, state=JobState.succeeded, created_at=started, started_at=started,
                   finished_at=now, result=response.json(),
                   progress=JobProgress(fraction=1.0, stage="done", done=1, total=1, unit="steps"))

    def get_job(self, job_id: str) -> Job:
        """``GET /jobs/{id}`` (``NotFound`` for an unknown id)."""
        return Job.model_validate(self._request("GET", f"/jobs/{job_id}").json())

    def list_jobs(self, state: JobState | str | None = None, limit: int = 50, cursor: str | None = None) -> JobPage:
        """``GET /jobs``: one page, newest first; pass ``next_cursor`` back as ``cursor`` for the next."""
        params: dict[str, Any] = {"limit": limit}
        if state is not None:
            params["state"] = JobState(state).value
        if cursor is not None:
            params["cursor"] = cursor
        return JobPage.model_validate(self._request("GET", "/jobs", params=params).json())

    def iter_jobs(self, state: JobState | str | None = None, page_size: int = 100) -> Iterator[Job]:
        """Every job (of ``state``), newest first, page by page."""
        cursor: str | None = None
        while True:
            page = self.list_jobs(state, page_size, cursor)
            yield from page.jobs
            if not page.next_cursor or not page.jobs:
                return
            cursor = page.next_cursor

    def cancel(self, job_id: str) -> Job:
        """``DELETE /jobs/{id}``: the job, ``cancelled`` (its work stops at the next tensor or shard boundary),
        or unchanged if it had already finished; a job that reached no boundary within the service's wait (10 s)
        is still ``running`` with ``cancel_requested`` true (:meth:`wait` follows it to ``cancelled``)."""
        return Job.model_validate(self._request("DELETE", f"/jobs/{job_id}").json())

    def wait(self, job: Job | str, progress: bool | None = True, poll: float = 0.5, timeout: float | None = None,
             *, raise_on_failure: bool = True) -> Job:
        """Poll the job until it finishes; the finished job.

        Args:
            job: the job or its id.
            progress: a tqdm bar on stderr (total ``progress.total``, description ``progress.stage``); None: only
                when stderr is a terminal.
            poll: seconds between polls.
            timeout: seconds to wait at most (``TimeoutError`` after, the job left running); None: no limit.
            raise_on_failure: a ``failed`` job raises ``JobFailed`` (a ``cancelled`` one is returned).
        """
        current = job if isinstance(job, Job) else self.get_job(job)
        deadline = None if timeout is None else time.monotonic() + timeout
        from tqdm import tqdm

        bar = tqdm(total=None, file=None, disable=None if progress is None else not progress, leave=False,
                   dynamic_ncols=True, desc=current.operation)
        try:
            while True:
                _show(bar, current)
                if current.finished:
                    break
                if deadline is not None and time.monotonic() >= deadline:
                    raise TimeoutError(f"job {current.id} still {current.state.value} after {timeout} s")
                time.sleep(poll if deadline is None else max(0.0, min(poll, deadline - time.monotonic())))
                current = self.get_job(current.id)
        finally:
            bar.close()
        if current.state == JobState.failed and raise_on_failure:
            raise JobFailed(current)
        return current


def _show(bar: Any, job: Job) -> None:
    p = job.progress
    if p.total > 0 and bar.total != p.total:
        bar.total = p.total
        if p.unit == "bytes":
            bar.unit, bar.unit_scale, bar.unit_divisor = "B", True, 1024
        else:
            bar.unit = f" {p.unit}"
    bar.set_description_str(p.stage or job.state.value, refresh=False)
    bar.n = min(p.done, p.total) if p.total > 0 else p.done
    bar.refresh()


def _json(doc: Mapping[str, Any]) -> str:
    return json.dumps(doc, separators=(",", ":"))


def _default_dest(src: Path, operation: str, response: httpx.Response) -> Path:
    disposition = response.headers.get("content-disposition", "")
    answered = disposition.split("filename=", 1)[-1].strip('" ') if "filename=" in disposition else ""
    suffix = Path(answered).suffix or {"application/zip": ".zip", "application/x-tar": ".tar"}.get(
        response.headers.get("content-type", "").split(";")[0], ".safetensors")
    stem = src.name.split(".", 1)[0] if src.name.endswith(".tar.gz") else src.stem
    return src.with_name(f"{stem}.{operation}{suffix}")


def _save(response: httpx.Response, target: Path) -> None:
    """Stream the answer's body to ``target`` (complete or absent: written beside it, then renamed)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in response.iter_bytes(CHUNK):
                out.write(chunk)
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
