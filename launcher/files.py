"""Writing files others read while we run, and telling a hub id from a local path.

Every file a run shares (metrics, eval results, checkpoint records, the model card, corpora) is written through
:func:`atomic_write`: a temporary file in the same directory, fsynced, then renamed over the target, so a reader
(or a resume after a crash) never sees half a file; an OS error names the file even where the OS gives none (a
full disk).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path

DATA_EXTENSIONS = (".jsonl", ".json", ".ndjson", ".parquet", ".txt", ".text", ".csv", ".tsv", ".arrow")
COMPRESSIONS = (".gz", ".zst", ".zstd", ".bz2", ".xz")
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def named_os_error(error: OSError, path: str | os.PathLike) -> OSError:
    """``error`` itself when it names its file, else the same error naming ``path``."""
    if error.filename:
        return error
    named = OSError(error.errno, error.strerror, os.fspath(path))
    named.__cause__ = error
    return named


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` in place (for files no one reads until a later commit); an OSError always names the file."""
    try:
        with open(path, "w", encoding="utf-8") as f:
            f.write(text)
    except OSError as e:
        raise named_os_error(e, path) from e


def atomic_write(path: str | os.PathLike, data: str | bytes) -> None:
    """Write via a temporary file, fsync and ``os.replace``, so readers never see half a file. The file gets the
    permissions a plain ``open`` would have given (temporary files are private), so others sharing the run
    directory can read it. An OSError names the file."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    except OSError as e:
        raise named_os_error(e, path) from e
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        publish(tmp, path)
    except OSError as e:
        Path(tmp).unlink(missing_ok=True)
        raise named_os_error(e, path) from e
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def publish(tmp: str | os.PathLike, path: str | os.PathLike) -> None:
    """Move a finished temporary file into place, readable as a plain ``open`` would have made it."""
    os.chmod(tmp, 0o666 & ~_UMASK)
    os.replace(tmp, path)


def _read_umask() -> int:
    """The process umask, read without changing it where the OS allows (setting it races other threads)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    umask = os.umask(0o022)
    os.umask(umask)
    return umask


_UMASK = _read_umask()


def strip_data_extension(name: str) -> str:
    """``train.jsonl.zst`` -> ``train``: a data file's name without its compression and format suffixes."""
    lower = name.lower()
    for suffix in COMPRESSIONS:
        if lower.endswith(suffix):
            name, lower = name[: -len(suffix)], lower[: -len(suffix)]
            break
    for suffix in DATA_EXTENSIONS:
        if lower.endswith(suffix):
            return name[: -len(suffix)]
    return name


def is_hub_id(name: str | None) -> bool:
    """Whether ``name`` is a Hugging Face hub id (``org/name``) rather than a local path or a URL.

    A hub id is ``org/name`` of letters, digits, ``_``, ``.`` and ``-`` (the org not starting with ``.``), has no
    data-file extension, and does not exist on disk; anything else is local, so a mistyped local directory is
    reported as missing rather than looked up on the hub."""
    if not name or "://" in name:
        return False
    if not _HUB_ID.match(name) or strip_data_extension(name) != name:
        return False
    return not os.path.exists(name)


def os_error_in(error: BaseException) -> OSError | None:
    """The OS error behind ``error``: itself, or the first in its chain of causes and contexts (torch's writer
    reports a failed write as a RuntimeError whose context is the OSError)."""
    seen: set[int] = set()
    e: BaseException | None = error
    while e is not None and id(e) not in seen:
        if isinstance(e, OSError):
            return e
        seen.add(id(e))
        e = e.__cause__ or e.__context__
    return None


def torch_save(obj: object, path: str | os.PathLike) -> None:
    """``torch.save`` through a Python file, so that a failed write (a full disk, a quota, a file-size limit) is an
    OSError naming the file and saying why; given a path, torch's own writer reports only "file write failed"."""
    import torch

    try:
        with open(path, "wb") as f:
            torch.save(obj, f)
    except (OSError, RuntimeError) as e:
        cause = os_error_in(e)
        if cause is None:
            raise
        raise named_os_error(cause, path) from e
