"""The upload form: unpack an uploaded file or archive into a work directory, pack the output back."""

from __future__ import annotations

import io
import lzma
import shutil
import tarfile
import zipfile
import zlib
from pathlib import Path, PurePosixPath

from adapter_surgery.errors import InvalidCheckpoint, PayloadTooLarge

ARCHIVE_SUFFIXES = (".zip", ".tar", ".tar.gz", ".tgz")


def unpack_upload(filename: str, src: Path, work: Path, limit: int) -> str:
    """Place the uploaded ``src`` under ``work``; return the checkpoint path relative to ``work``.

    A ``.safetensors`` file is kept as it is; a ``.zip``/``.tar`` archive is extracted safely (no absolute
    paths, no ``..``, no links, at most ``limit`` bytes unpacked) and the directory holding its weights
    becomes the checkpoint.

    Raises:
        InvalidCheckpoint: another kind of file, or an unsafe or empty archive.
        PayloadTooLarge: the archive unpacks to more than ``limit`` bytes.
    """
    name = PurePosixPath(filename or "").name.lower()
    target = work / "input"
    target.mkdir(parents=True)
    if name.endswith(".safetensors"):
        shutil.move(src, target / "model.safetensors")
        return "input/model.safetensors"
    if name.endswith(".zip"):
        _unzip(src, target, limit)
    elif name.endswith((".tar", ".tar.gz", ".tgz")):
        _untar(src, target, limit)
    else:
        raise InvalidCheckpoint(f"uploaded file {filename!r} is neither .safetensors nor a .zip/.tar archive",
                                field="file", fix="Upload a .safetensors file, or a .zip/.tar of a model directory.")
    weights = sorted(target.rglob("*.safetensors"), key=lambda p: len(p.parts))
    if not weights:
        raise InvalidCheckpoint("the uploaded archive holds no .safetensors file", field="file",
                                fix="Archive a model directory saved with save_pretrained.")
    return str(weights[0].parent.relative_to(work))


def _safe_member(name: str) -> bool:
    p = PurePosixPath(name)
    return not p.is_absolute() and ".." not in p.parts and "\\" not in name


def _unzip(src: Path, dest: Path, limit: int) -> None:
    try:
        with zipfile.ZipFile(src) as zf:
            members = zf.infolist()
            if sum(m.file_size for m in members) > limit:
                raise PayloadTooLarge(f"the archive unpacks to more than {limit} bytes", field="file")
            for m in members:
                if not _safe_member(m.filename) or (m.external_attr >> 16) & 0o170000 == 0o120000:
                    raise InvalidCheckpoint(f"archive member {m.filename!r} is a link or escapes the archive",
                                            field="file", fix="Archive plain files with relative paths.")
            zf.extractall(dest)
    except (zipfile.BadZipFile, RuntimeError, NotImplementedError, ValueError, OSError, EOFError,
            lzma.LZMAError, zlib.error) as exc:  # encrypted, unknown compression, file/dir name clashes...
        raise InvalidCheckpoint(f"the uploaded .zip cannot be extracted ({type(exc).__name__}: {exc})", field="file",
                                fix="Upload a plain (unencrypted, stored or deflated) zip of a model directory.") \
            from None


def _untar(src: Path, dest: Path, limit: int) -> None:
    try:
        with tarfile.open(src) as tf:
            members = tf.getmembers()
            if sum(m.size for m in members) > limit:
                raise PayloadTooLarge(f"the archive unpacks to more than {limit} bytes", field="file")
            for m in members:
                if not _safe_member(m.name) or not (m.isfile() or m.isdir()):
                    raise InvalidCheckpoint(f"archive member {m.name!r} is a link, a device or escapes the archive",
                                            field="file", fix="Archive plain files with relative paths.")
            tf.extractall(dest, filter="data")
    except (tarfile.TarError, OSError, EOFError, ValueError, lzma.LZMAError, zlib.error) as exc:
        raise InvalidCheckpoint(f"the uploaded tar cannot be extracted ({type(exc).__name__}: {exc})", field="file",
                                fix="Upload a plain tar of a model directory.") from None


def pack_output(out: Path, upload_name: str) -> tuple[bytes, str, str]:
    """The output as ``(body, media type, filename)``: a lone weights file as itself, else an archive
    of the same kind as the upload (zip for a zip or a single file, tar for a tar)."""
    files = sorted(p for p in out.rglob("*") if p.is_file()) if out.is_dir() else [out]
    if len(files) == 1 and files[0].suffix == ".safetensors":
        return files[0].read_bytes(), "application/octet-stream", files[0].name
    buf = io.BytesIO()
    if upload_name.lower().endswith((".tar", ".tar.gz", ".tgz")):
        with tarfile.open(fileobj=buf, mode="w") as tf:
            for f in files:
                tf.add(f, arcname=str(f.relative_to(out)))
        return buf.getvalue(), "application/x-tar", "output.tar"
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for f in files:
            zf.write(f, str(f.relative_to(out)))
    return buf.getvalue(), "application/zip", "output.zip"
