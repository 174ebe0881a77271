"""The upload form, with memory that stays flat whatever the size:

- ``receive_upload``: the ``multipart/form-data`` body is parsed as it streams in (python-multipart), the file part
  written straight to ``<data_dir>/.adapter-surgery/scratch/<id>/upload.bin``; more than ``max_upload_bytes``
  received is a 413 at once (with or without ``Content-Length``); an archive is unpacked there with limits on its
  members and unpacked size.
- ``answer_upload``: the output as a lone ``.safetensors`` or an archive (zip for a zip or a single file, tar for a
  tar) built as a file in the scratch directory and streamed from disk; the scratch directory is removed once the
  answer is sent (or the client has gone). Any failure before that removes it too.
"""

from __future__ import annotations

import codecs
import errno
import json
import lzma
import shutil
import tarfile
import uuid
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import IO, Any

from fastapi import Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import FileResponse, Response
from pydantic import BaseModel, ValidationError
from python_multipart.exceptions import FormParserError
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from adapter_surgery.errors import (
    BadRequest,
    DiskFull,
    InvalidCheckpoint,
    InvalidSpec,
    PayloadTooLarge,
    RequestTooLarge,
    SurgeryError,
    validation_problem_body,
)
from adapter_surgery.io.atomic import make_work_dir
from adapter_surgery.settings import Settings

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")
RESULT_HEADER = "X-Adapter-Surgery-Result"
#: Bytes of result JSON in the header at most.
MAX_RESULT_HEADER = 7 * 1024
#: Parts of the form at most: one file, a few text fields.
MAX_FILES, MAX_FIELDS = 1, 4
#: File data is written in batches of this size, off the event loop.
WRITE_BATCH = 1 << 20


def scratch_root(data_dir: Path) -> Path:
    return data_dir / ".adapter-surgery" / "scratch"


@dataclass
class ReceivedUpload:
    """An upload placed in its scratch directory ``work``: the checkpoint at ``work / checkpoint``, the output to be
    written at ``work / "output"``."""

    work: Path
    #: ``work`` relative to the data directory (POSIX), for a job that runs under the data directory.
    data_dir_rel: str
    filename: str
    checkpoint: str
    options: BaseModel

    def spec_fields(self) -> dict[str, Any]:
        """The operation's spec (as fields): the form's options, the checkpoint and ``"output"``, relative to
        ``work``."""
        return {**self.options.model_dump(), "checkpoint": self.checkpoint, "output": "output"}

    def discard(self) -> None:
        shutil.rmtree(self.work, ignore_errors=True)


class SpecInvalid(SurgeryError):
    """The form's ``spec`` field fails validation: a 422 naming ``spec.<field>``."""

    def __init__(self, errors: list[dict[str, Any]]) -> None:
        self.body = validation_problem_body(errors, ("spec",))
        super().__init__(self.body["detail"], field=self.body["field"], fix=self.body["fix"])

    def to_problem(self) -> dict[str, object]:
        return self.body


def new_scratch(data_dir: Path) -> Path:
    """A new scratch directory under the data directory, with its owner record (host, pid) inside: the job
    service's start-up sweep (:meth:`adapter_surgery.jobs.JobService.sweep`) removes those of dead processes."""
    work = scratch_root(data_dir) / uuid.uuid4().hex
    try:
        make_work_dir(work, None)
    except BaseException:
        shutil.rmtree(work, ignore_errors=True)
        raise
    return work


#: ``OSError`` numbers of a full volume: no space, over quota, over the file-size limit.
DISK_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


def disk_full(exc: BaseException, data_dir: Path) -> DiskFull | None:
    """The :class:`DiskFull` (507) for an ``OSError`` of a full volume while receiving an upload; else None."""
    if not isinstance(exc, OSError) or exc.errno not in DISK_FULL:
        return None
    return DiskFull(f"no room in the data directory {data_dir} for the upload ({exc.strerror or exc}); nothing was "
                    "kept", field="file", fix="Free space (or raise the quota) on the data directory's volume, or "
                                              "send a smaller upload.")


class _FormReceiver:
    """python-multipart callbacks: the file part goes to ``dest`` (in batches), text fields are kept (bounded)."""

    def __init__(self, dest: IO[bytes], max_field: int, charset: str) -> None:
        self.dest, self.max_field, self.charset = dest, max_field, charset
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self.file_field: str | None = None
        self.file_complete = False
        self.pending: list[bytes] = []
        self.pending_bytes = 0
        self._files = self._fields = 0
        self._header_name = self._header_value = b""
        self._disposition = b""
        self._name = ""
        self._is_file = False
        self._data = bytearray()

    def _decode(self, raw: bytes) -> str:
        return raw.decode(self.charset, errors="replace")

    def on_part_begin(self) -> None:
        self._disposition, self._data, self._is_file = b"", bytearray(), False

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        if self._header_name.lower() == b"content-disposition":
            self._disposition = self._header_value
        self._header_name = self._header_value = b""

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._disposition)
        if b"name" not in options:
            raise BadRequest('a form part has no Content-Disposition name', field="body",
                             fix="Send a multipart form with the fields 'file' and 'spec'.")
        self._name = self._decode(options[b"name"])
        if b"filename" in options:
            self._files += 1
            if self._files > MAX_FILES:
                raise BadRequest(f"the form has more than {MAX_FILES} file", field="file",
                                 fix="Send one file: a .safetensors, or one archive of the model directory.")
            self._is_file, self.filename, self.file_field = True, self._decode(options[b"filename"]), self._name
        else:
            self._fields += 1
            if self._fields > MAX_FIELDS:
                raise BadRequest(f"the form has more than {MAX_FIELDS} fields", field="body",
                                 fix="Send only the fields 'file' and 'spec'.")

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._is_file:
            self.pending.append(data[start:end])
            self.pending_bytes += end - start
            return
        if len(self._data) + (end - start) > self.max_field:
            raise RequestTooLarge(f"the form field {self._name!r} exceeds {self.max_field} bytes", field=self._name,
                                  fix="Send the options as a small JSON text.")
        self._data += data[start:end]

    def on_part_end(self) -> None:
        if self._is_file:
            self.file_complete = True
        else:
            self.fields[self._name] = self._decode(bytes(self._data))

    def flush(self) -> None:
        for piece in self.pending:
            self.dest.write(piece)
        self.pending, self.pending_bytes = [], 0


async def receive_upload(request: Request, settings: Settings, options_model: type[BaseModel]) -> ReceivedUpload:
    """Stream the upload form into a new scratch directory, validate ``spec`` against ``options_model`` and unpack
    the file; on any failure the scratch directory is removed.

    Raises:
        BadRequest: malformed multipart (no boundary, broken body, too many parts).
        PayloadTooLarge: more than ``max_upload_bytes`` received, or an archive over its limits.
        InvalidSpec / SpecInvalid / InvalidCheckpoint: no file part, invalid options, an unusable file.
    """
    _, params = parse_options_header(request.headers.get("content-type", ""))
    boundary = params.get(b"boundary")
    if not boundary:
        raise BadRequest("the multipart Content-Type has no boundary", field="body",
                         fix="Let the HTTP client build the form (curl -F, requests files=...).")
    try:
        charset = codecs.lookup(params.get(b"charset", b"utf-8").decode("latin-1")).name
    except LookupError:
        charset = "utf-8"
    limit = settings.max_upload_bytes
    work: Path | None = None
    try:
        work = new_scratch(settings.data_dir)
        saved = work / "upload.bin"
        with saved.open("wb") as fh:
            form = _FormReceiver(fh, settings.max_json_bytes, charset)
            callbacks = {name: getattr(form, name) for name in (
                "on_part_begin", "on_header_field", "on_header_value", "on_header_end", "on_headers_finished",
                "on_part_data", "on_part_end")}
            received = 0
            try:
                parser = MultipartParser(boundary, callbacks)  # type: ignore[arg-type]
                async for chunk in request.stream():
                    received += len(chunk)
                    if received > limit:
                        raise PayloadTooLarge(f"the upload exceeds the limit of {limit} bytes", field="file",
                                              fix="Use the JSON form with a checkpoint under the data directory.")
                    parser.write(chunk)
                    if form.pending_bytes >= WRITE_BATCH:
                        await run_in_threadpool(form.flush)
                parser.finalize()
            except FormParserError as exc:
                raise BadRequest(f"the multipart body is malformed ({exc})", field="body",
                                 fix="Let the HTTP client build the form (curl -F, requests files=...).") from None
            except ClientDisconnect:
                raise BadRequest("the client disconnected during the upload", field="body") from None
            await run_in_threadpool(form.flush)
        if form.file_field is None or not form.file_complete:
            raise InvalidSpec("the form has no file part" if form.file_field is None else
                              "the form ends before its file part does", field="file",
                              fix="Send the checkpoint as the 'file' part (.safetensors, .zip or .tar).")
        if form.file_field != "file":
            raise InvalidSpec(f"the file part is named {form.file_field!r}, not 'file'", field="file",
                              fix="Send the checkpoint as the 'file' part (.safetensors, .zip or .tar).")
        try:
            options = options_model.model_validate_json(form.fields.get("spec") or "{}")
        except ValidationError as exc:
            raise SpecInvalid(list(exc.errors())) from None
        filename = form.filename or ""
        checkpoint = await run_in_threadpool(unpack_upload, filename, saved, work, limit,
                                             settings.max_archive_members)
        return ReceivedUpload(work=work, data_dir_rel=work.relative_to(settings.data_dir).as_posix(),
                              filename=filename, checkpoint=checkpoint, options=options)
    except BaseException as exc:
        if work is not None:
            shutil.rmtree(work, ignore_errors=True)
        full = disk_full(exc, settings.data_dir)
        if full is not None:
            raise full from None
        raise


def unpack_upload(filename: str, src: Path, work: Path, limit: int, max_members: int | None = None) -> str:
    """Place the uploaded ``src`` under ``work``; return the checkpoint path relative to ``work``.

    A ``.safetensors`` file is kept as it is; a ``.zip``/``.tar`` archive is extracted safely (no absolute
    paths, no ``..``, no links, at most ``max_members`` members and ``limit`` bytes unpacked) and the directory
    holding its weights becomes the checkpoint. ``src`` is removed once extracted.

    Raises:
        InvalidCheckpoint: another kind of file, or an unsafe or empty archive.
        PayloadTooLarge: the archive has more members or unpacks to more bytes than allowed.
    """
    name = PurePosixPath(filename or "").name.lower()
    target = work / "input"
    target.mkdir(parents=True)
    if name.endswith(".safetensors"):
        shutil.move(src, target / "model.safetensors")
        return "input/model.safetensors"
    if name.endswith(".zip"):
        _unzip(src, target, limit, max_members)
    elif name.endswith((".tar", ".tar.gz", ".tgz")):
        _untar(src, target, limit, max_members)
    else:
        raise InvalidCheckpoint(f"uploaded file {filename!r} is neither .safetensors nor a .zip/.tar archive",
                                field="file", fix="Upload a .safetensors file, or a .zip/.tar of a model directory.")
    src.unlink(missing_ok=True)
    holding = {p.parent for p in target.rglob("*.safetensors")}
    if not holding:
        raise InvalidCheckpoint("the uploaded archive holds no .safetensors file", field="file",
                                fix="Archive a model directory saved with save_pretrained.")
    # the checkpoint: the one directory holding weights that no other one holds (a PiSSA adapter's base/ is inside)
    roots = sorted(d for d in holding if not any(o in d.parents for o in holding))
    if len(roots) > 1:
        names = ", ".join(repr(str(d.relative_to(target)) + "/") for d in roots[:4])
        raise InvalidCheckpoint(f"the uploaded archive holds {len(roots)} model directories ({names}"
                                f"{', ...' if len(roots) > 4 else ''}); which one to patch is ambiguous",
                                field="file", fix="Archive one model directory per upload.")
    return str(roots[0].relative_to(work))


def _reason(exc: BaseException) -> str:
    """Why an archive could not be extracted, without the server's paths (an OSError names the scratch file)."""
    if isinstance(exc, OSError) and exc.strerror:
        return f"{type(exc).__name__}: {exc.strerror}"
    return f"{type(exc).__name__}: {exc}"


def _safe_member(name: str) -> bool:
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and "\\" not in name


def _too_many(count: int | str, max_members: int) -> PayloadTooLarge:
    return PayloadTooLarge(f"the archive has {count} members; the limit is {max_members}", field="file",
                           fix="Archive only the model directory (config, tokenizer, weights).")


#: Bytes of zip central directory per allowed member at most (a 46-byte record, its name, extra and comment):
#: bounds what ``zipfile`` reads into memory before the members can be counted.
ZIP_DIRECTORY_BYTES_PER_MEMBER = 1024


def _unzip(src: Path, dest: Path, limit: int, max_members: int | None) -> None:
    try:
        if max_members is not None:
            with src.open("rb") as fh:
                end = zipfile._EndRecData(fh)  # type: ignore[attr-defined]  # the end record, zip64 included
            if end is not None:
                entries, directory = end[zipfile._ECD_ENTRIES_TOTAL], end[zipfile._ECD_SIZE]  # type: ignore[attr-defined]
                if entries > max_members or directory > max_members * ZIP_DIRECTORY_BYTES_PER_MEMBER + 65536:
                    raise _too_many(entries if entries > max_members else "too many", max_members)
        with zipfile.ZipFile(src) as zf:
            members = zf.infolist()
            if max_members is not None and len(members) > max_members:
                raise _too_many(len(members), max_members)
            if sum(m.file_size for m in members) > limit:
                raise PayloadTooLarge(f"the archive unpacks to more than {limit} bytes", field="file")
            for m in members:
                if not _safe_member(m.filename) or (m.external_attr >> 16) & 0o170000 == 0o120000:
                    raise InvalidCheckpoint(f"archive member {m.filename!r} is a link or escapes the archive",
                                            field="file", fix="Archive plain files with relative paths.")
            zf.extractall(dest)
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, ValueError, OSError, EOFError,
            lzma.LZMAError, zlib.error) as exc:  # encrypted, unknown compression, file/dir name clashes...
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise  # the caller answers 507
        raise InvalidCheckpoint(f"the uploaded .zip cannot be extracted ({_reason(exc)})", field="file",
                                fix="Upload a plain (unencrypted, stored or deflated) zip of a model directory.") \
            from None


def _untar(src: Path, dest: Path, limit: int, max_members: int | None) -> None:
    try:
        with tarfile.open(src) as tf:
            members, size = [], 0
            while (m := tf.next()) is not None:  # counted as read: a compressed tar is never scanned past a limit
                members.append(m)
                size += m.size
                if max_members is not None and len(members) > max_members:
                    raise _too_many(f"more than {max_members}", max_members)
                if size > limit:
                    raise PayloadTooLarge(f"the archive unpacks to more than {limit} bytes", field="file")
                if not _safe_member(m.name) or not (m.isfile() or m.isdir()):
                    raise InvalidCheckpoint(f"archive member {m.name!r} is a link, a device or escapes the archive",
                                            field="file", fix="Archive plain files with relative paths.")
            tf.extractall(dest, members=members, filter="data")
    except (tarfile.TarError, OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as exc:
        if isinstance(exc, OSError) and exc.errno in DISK_FULL:
            raise  # the caller answers 507
        raise InvalidCheckpoint(f"the uploaded tar cannot be extracted ({_reason(exc)})", field="file",
                                fix="Upload a plain tar of a model directory.") from None


def pack_output(out: Path, upload_name: str, dest_dir: Path) -> tuple[Path, str, str]:
    """The output as ``(file, media type, filename)``: a lone weights file as itself, else an archive of the same
    kind as the upload (zip for a zip or a single file, tar for a tar) written into ``dest_dir``, file by file."""
    files = sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else [out]
    if len(files) == 1 and files[0].suffix == ".safetensors":
        return files[0], "application/octet-stream", files[0].name
    if upload_name.lower().endswith((".tar", ".tar.gz", ".tgz")):
        archive = dest_dir / "output.tar"
        with tarfile.open(archive, mode="w") as tf:
            for f in files:
                tf.add(f, arcname=str(f.relative_to(out)))
        return archive, "application/x-tar", "output.tar"
    archive = dest_dir / "output.zip"
    with zipfile.ZipFile(archive, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
        for f in files:
            zf.write(f, str(f.relative_to(out)))
    return archive, "application/zip", "output.zip"


class ScratchFileResponse(FileResponse):
    """A file streamed from disk; its scratch directory is removed afterwards, also when the client has gone."""

    def __init__(self, path: Path, scratch: Path, **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self.scratch = scratch

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await run_in_threadpool(shutil.rmtree, self.scratch, True)


async def answer_upload(upload: ReceivedUpload, result: dict[str, Any], job_id: str | None = None) -> Response:
    """The answer to an upload: the output (``upload.work / "output"``) streamed from disk, ``result`` in the
    ``X-Adapter-Surgery-Result`` header (shortened: with ``job_id``, where ``GET /jobs/{id}`` has all of it); the
    scratch directory is removed once it is sent."""
    try:
        path, media, name = await run_in_threadpool(pack_output, upload.work / "output", upload.filename,
                                                    upload.work)
    except BaseException:
        upload.discard()
        raise
    return ScratchFileResponse(path, upload.work, media_type=media, filename=name,
                               headers={RESULT_HEADER: result_header(result, job_id)})


def result_header(result: dict[str, Any], job_id: str | None = None) -> str:
    """The result as ASCII JSON for a response header, at most ``MAX_RESULT_HEADER`` bytes (proxies cap headers
    at 8-16 KB): long lists are cut to their first items (with ``<key>_total``), then dropped if still too long,
    and ``"truncated": true`` says so, with ``"job": job_id``: ``GET /jobs/{job}`` answers the whole result."""
    def dump(doc: dict[str, Any]) -> str:
        return json.dumps(doc, ensure_ascii=True, separators=(",", ":"))

    text = dump(result)
    if len(text) <= MAX_RESULT_HEADER:
        return text
    short: dict[str, Any] = {"truncated": True} | ({"job": job_id} if job_id else {})
    for key, value in result.items():
        if isinstance(value, list) and len(value) > 8:
            short[key], short[f"{key}_total"] = value[:8], len(value)
        else:
            short[key] = value
    if len(dump(short)) > MAX_RESULT_HEADER:
        short = {k: v for k, v in short.items() if not isinstance(v, (list, dict))} | {"truncated": True}
    return dump(short)
