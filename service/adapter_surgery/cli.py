"""The command line: ``adapter-surgery <operation> --spec FILE|-``, ``serve``, ``worker``, ``openapi`` and ``jobs``.

Operation commands take the same JSON as the endpoints (paths relative to ``--data-dir``), print the same
result JSON on stdout, report progress on stderr, and print a problem JSON on stderr with exit code 2 for
bad input. With ``--server URL`` they run on that service instead (``cli_remote``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from adapter_surgery.catalog import SUMMARIES
from adapter_surgery.cli_remote import add_jobs_parser, add_remote_arguments, run_remote
from adapter_surgery.errors import SurgeryError

if TYPE_CHECKING:
    from adapter_surgery.ops.common import ProgressEvent


def _progress() -> tuple[Callable[[ProgressEvent], None], Any]:
    """A tqdm bar on stderr driven by the run context's :class:`ProgressEvent` (its total is the job's planned
    bytes, growing when a write plans more), and the bar to close."""
    from tqdm import tqdm

    bar = tqdm(total=0, unit="B", unit_scale=True, unit_divisor=1024, file=sys.stderr, leave=False,
               dynamic_ncols=True, disable=None)

    shown = {"stage": ""}

    def show(event: ProgressEvent) -> None:
        if bar.disable:
            return
        if event.total != bar.total:
            bar.total = event.total
            bar.refresh()
        if event.stage and event.stage != shown["stage"]:
            shown["stage"] = event.stage
            bar.set_description_str(event.stage, refresh=False)
        bar.update(event.done - bar.n)

    return show, bar


def _import_torch_stack() -> None:
    """Import torch and transformers' modeling core (which every operation needs) first, on a fresh thread.

    Reached through an operation's import chain on the main thread, torch's and sympy's import-time loops ran at a
    call depth where CPython 3.11 maps and unmaps a 16 KiB frame-stack chunk at every call (a chunk is freed as soon
    as its first frame returns): 20-30 thousand ``mmap``/``munmap`` pairs per CLI run, ~0.15 s of system time
    (``strace -f -e trace=munmap``). A new thread's frame stack starts empty, whatever the caller's depth: ~5 thousand.
    """
    thread = threading.Thread(target=importlib.import_module, args=("transformers.modeling_utils",),
                              name="import-torch")
    thread.start()
    thread.join()


def _run_operation(name: str, args: argparse.Namespace) -> int:
    try:  # before the imports: an unreadable spec is answered at once
        raw = sys.stdin.read() if args.spec == "-" else Path(args.spec).read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        _problem({"title": "Invalid request", "status": 422, "field": "--spec",
                  "detail": f"the spec {args.spec!r} cannot be read ({exc})",
                  "fix": "Give a readable UTF-8 JSON file, or - to read the spec from standard input."})
        return 2
    # here, not at the top: --help, the remote path and the other commands do without torch (seconds of imports)
    _import_torch_stack()
    from pydantic import ValidationError

    from adapter_surgery.errors import validation_problem_body
    from adapter_surgery.jobs.runner import run_operation
    from adapter_surgery.ops import OPERATIONS
    from adapter_surgery.ops.common import RunContext

    op = OPERATIONS[name]
    try:
        spec = op.spec.model_validate_json(raw)
    except ValidationError as exc:
        _problem(validation_problem_body(exc.errors()))
        return 2
    if not Path(args.data_dir).is_dir():
        _problem({"title": "Invalid request", "status": 422, "field": "--data-dir",
                  "detail": f"the data directory {args.data_dir!r} is not a directory",
                  "fix": "Give the directory the spec's paths are relative to (default: the current directory)."})
        return 2
    show, bar = _progress()
    try:
        result = run_operation(op, spec, RunContext(Path(args.data_dir), show))
    except SurgeryError as exc:
        _problem(exc.to_problem())
        return 2
    except Exception as exc:  # no traceback for the user: a one-line problem, and exit 1
        _problem({"title": "Internal error", "status": 500, "detail": f"{type(exc).__name__}: {exc}; nothing was "
                  "written to the output"})
        return 1
    finally:
        bar.close()
    print(result.model_dump_json(indent=2))
    return 0


def _problem(body: dict[str, object]) -> None:
    print(json.dumps(body, indent=2), file=sys.stderr)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adapter-surgery", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, summary in SUMMARIES.items():
        p = sub.add_parser(name, help=summary, description=summary)
        p.add_argument("--spec", required=True, help="JSON spec file, or - for standard input")
        p.add_argument("--data-dir", default=".", help="directory the spec's paths are relative to (default: .)")
        add_remote_arguments(p)
    serve = sub.add_parser("serve", help="start the HTTP service")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--data-dir", default=None, help="overrides ADAPTER_SURGERY_DATA_DIR")
    worker = sub.add_parser("worker", help="run queued jobs (with ADAPTER_SURGERY_QUEUE_URL=redis://...: on any "
                            "machine that mounts the data directory) until SIGINT/SIGTERM")
    worker.add_argument("--data-dir", default=None, help="overrides ADAPTER_SURGERY_DATA_DIR")
    worker.add_argument("--workers", type=int, default=None, help="jobs at once (overrides ADAPTER_SURGERY_WORKERS)")
    sub.add_parser("openapi", help="print the OpenAPI spec (JSON) that the service serves")
    add_jobs_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        import uvicorn

        from adapter_surgery.api.app import create_app
        from adapter_surgery.logs import configure_logging
        from adapter_surgery.settings import Settings

        settings = Settings(data_dir=Path(args.data_dir)) if args.data_dir else Settings()
        configure_logging(settings.log_json)
        try:
            app = create_app(settings)
            app.state.jobs.store.ping()  # unreachable: this problem, rather than uvicorn's start-up traceback
        except ValueError as exc:  # unusable settings (an empty or unreadable token file...)
            _problem({"title": "Invalid settings", "detail": str(exc)})
            return 2
        except SurgeryError as exc:  # the job store (Redis) cannot be reached
            _problem(exc.to_problem())
            return 1
        # our access log (one JSON line per request, with its request id) replaces uvicorn's
        uvicorn.run(app, host=args.host, port=args.port, timeout_graceful_shutdown=30, log_config=None,
                    access_log=False)
        return 0
    if args.command == "worker":
        import logging

        from adapter_surgery.jobs import JobService
        from adapter_surgery.settings import Settings

        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
        overrides: dict[str, Any] = {"data_dir": Path(args.data_dir)} if args.data_dir else {}
        if args.workers is not None:
            overrides["workers"] = args.workers
        try:
            JobService(Settings(**overrides)).run_consumer()
        except SurgeryError as exc:  # the job store (Redis) cannot be reached: one problem, no traceback
            _problem(exc.to_problem())
            return 1
        return 0
    if args.command == "openapi":
        from adapter_surgery.api.app import create_app

        print(json.dumps(create_app().openapi(), indent=2, sort_keys=True))
        return 0
    if args.command == "jobs" or getattr(args, "server", None) or getattr(args, "async_", False):
        return run_remote(args)
    return _run_operation(args.command, args)


if __name__ == "__main__":
    sys.exit(main())
