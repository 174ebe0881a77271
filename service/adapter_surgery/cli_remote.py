"""The CLI against a running service: ``adapter-surgery <operation> --spec FILE --server URL`` and
``adapter-surgery jobs list|get|wait|cancel --server URL``, through ``adapter_surgery.client``.

Same JSON in and out as the local commands: the spec is sent as it is (the service validates it), the result
JSON goes to stdout, a problem JSON to stderr with exit code 2 for a 4xx (1 for a 5xx or an unreachable
service), the job's progress bar to stderr when it is a terminal. ``--async`` prints the queued job and returns.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the client (httpx: ~0.25 s of imports) is imported when a command runs, not for --help
    from adapter_surgery.client import Client

#: ``adapter_surgery.client.TOKEN_ENV`` and the values of its ``JobState`` (a test checks they agree).
TOKEN_ENV = "ADAPTER_SURGERY_API_TOKEN"
JOB_STATES = ("queued", "running", "succeeded", "failed", "cancelled")


def add_remote_arguments(parser: argparse.ArgumentParser) -> None:
    """``--server``, ``--token`` and ``--async`` on an operation command."""
    group = parser.add_argument_group("remote service (instead of running here)")
    group.add_argument("--server", metavar="URL",
                       help="run on the service at URL (paths are then relative to its data directory)")
    group.add_argument("--token", help=f"bearer token of the service (default: ${TOKEN_ENV})")
    group.add_argument("--async", dest="async_", action="store_true",
                       help="with --server: print the queued job and return at once (see `jobs wait`)")


def add_jobs_parser(sub: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """The ``jobs`` command and its ``list``, ``get``, ``wait`` and ``cancel`` subcommands."""
    jobs = sub.add_parser("jobs", help="list, show, wait for or cancel the jobs of a service",
                          description="The jobs of a running service.")
    jsub = jobs.add_subparsers(dest="jobs_command", required=True)

    def common(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--server", metavar="URL", required=True, help="the service, e.g. http://localhost:8000")
        p.add_argument("--token", help=f"bearer token of the service (default: ${TOKEN_ENV})")
        return p

    listing = common(jsub.add_parser("list", help="jobs, newest first (one page; JSON with next_cursor)"))
    listing.add_argument("--state", choices=JOB_STATES)
    listing.add_argument("--limit", type=int, default=50)
    listing.add_argument("--cursor")
    for name, text in [("get", "one job"), ("wait", "wait for a job (progress on stderr); the finished job"),
                       ("cancel", "cancel a job; the job")]:
        common(jsub.add_parser(name, help=text)).add_argument("job_id", metavar="ID")


def run_remote(args: argparse.Namespace) -> int:
    """Run an operation command with ``--server``, or a ``jobs`` command; the exit code."""
    from adapter_surgery.client import Client, JobFailed, ProblemError, ServiceUnreachable

    if getattr(args, "server", None) is None:
        _problem({"title": "Invalid request", "status": 422, "field": "--async",
                  "detail": "--async queues a job on a service", "fix": "Add --server URL, or drop --async."})
        return 2
    try:
        with Client(args.server, token=args.token) as client:
            if args.command == "jobs":
                return _jobs(client, args)
            return _operation(client, args.command, args)
    except JobFailed as exc:
        _problem(exc.problem)
        return _code(exc.status)
    except ProblemError as exc:
        _problem(exc.problem)
        return _code(exc.status)
    except ServiceUnreachable as exc:
        _problem({"title": "Service unreachable", "detail": str(exc),
                  "fix": "Check --server, and that the service answers GET /healthz."})
        return 1


def _operation(client: Client, name: str, args: argparse.Namespace) -> int:
    try:
        raw = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text(encoding="utf-8")
        spec = json.loads(raw)
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        _problem({"title": "Invalid request", "status": 422, "field": "--spec",
                  "detail": f"the spec {args.spec!r} cannot be read as JSON ({exc})",
                  "fix": "Give a readable UTF-8 JSON file, or - to read the spec from standard input."})
        return 2
    if not isinstance(spec, dict):
        _problem({"title": "Invalid request", "status": 422, "field": "--spec",
                  "detail": f"the spec is a JSON {type(spec).__name__}, not an object",
                  "fix": "Give the operation's JSON object, as the endpoint takes it."})
        return 2
    job = client.submit(name, spec)
    if args.async_:
        _print(job.model_dump(mode="json"))
        return 0
    try:
        job = client.wait(job, progress=None)
    except KeyboardInterrupt:  # as a dropped synchronous request: the work is cancelled, nothing is left
        if job.id:
            _problem(client.cancel(job.id).model_dump(mode="json"))
        return 130
    if job.state != "succeeded":
        _problem(job.problem or {"title": "Cancelled", "status": 409, "detail": f"job {job.id} was cancelled"})
        return 2
    _print(job.result)
    return 0


def _jobs(client: Client, args: argparse.Namespace) -> int:
    command = args.jobs_command
    if command == "list":
        _print(client.list_jobs(args.state, args.limit, args.cursor).model_dump(mode="json"))
        return 0
    if command == "get":
        job = client.get_job(args.job_id)
    elif command == "cancel":
        job = client.cancel(args.job_id)
    else:
        job = client.wait(args.job_id, progress=None, raise_on_failure=False)
    _print(job.model_dump(mode="json"))
    if command == "wait" and job.state == "failed":
        _problem(job.problem or {"title": "Job failed", "status": 500})
        return _code(int((job.problem or {}).get("status") or 500))
    return 0


def _code(status: int) -> int:
    return 2 if 400 <= status < 500 else 1


def _print(doc: Any) -> None:
    print(json.dumps(doc, indent=2))


def _problem(body: dict[str, Any]) -> None:
    print(json.dumps(body, indent=2), file=sys.stderr)
