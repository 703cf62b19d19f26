"""Where text comes from: local files, Hugging Face hub datasets and fsspec URLs, all read as streams.

Every source becomes a ``datasets.IterableDataset`` with one string column, ``text``, so the rest of the
pipeline never needs to know the file format. Problems are reported as :class:`DataError` naming the source
path and, where it can be found, the file and line (or row) at fault: a stack trace from deep inside
``datasets`` or pyarrow does not tell a user which of their thousand files is broken. What each source is called
in the logged metrics (:func:`source_labels`) and what kind of path it is (:func:`source_kind`) belong to the
recipe (``launcher.config``): a recipe's eval sets are named by them.
"""

from __future__ import annotations

import glob
import json
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import PurePosixPath
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from launcher.compat import no_download_count_ping
from launcher.config import SourceConfig, has_glob, source_kind
from launcher.files import COMPRESSIONS

if TYPE_CHECKING:
    import datasets

FORMATS = {".jsonl": "json", ".json": "json", ".ndjson": "json", ".parquet": "parquet", ".txt": "text", ".text": "text"}
"""File extension -> ``datasets`` builder."""

LOCATE_BUDGET_S = 60.0
"""How long the search for the exact bad record may take once reading has failed."""


class DataError(Exception):
    """A data source cannot be read as asked. The message names the source path, and the position where known."""


@dataclass
class ResolvedSource:
    """A source after its path was interpreted: which builder reads it and, for local data, which files."""

    source: SourceConfig
    kind: str
    """``local``, ``url`` or ``hub``."""
    builder: str | None = None
    """``json``, ``parquet`` or ``text`` for files; None for hub datasets (their own loader decides)."""
    files: list[str] = field(default_factory=list)
    """Absolute paths of the local files, in reading order."""

    @property
    def text_field(self) -> str:
        """Plain-text files have one document per line in the column ``text``, whatever the recipe says."""
        return "text" if self.builder == "text" else self.source.text_field


def format_of(name: str) -> str | None:
    """The builder for a file name (``x.jsonl.zst`` -> ``json``), or None when the extension is not a data format."""
    lower = name.lower()
    compressed = False
    for suffix in COMPRESSIONS:
        if lower.endswith(suffix):
            lower = lower[: -len(suffix)]
            compressed = True
            break
    builder = FORMATS.get(PurePosixPath(lower).suffix)
    if builder == "parquet" and compressed:
        return None
    return builder


def _known_extensions() -> str:
    return ", ".join(FORMATS) + f" (optionally {', '.join(COMPRESSIONS)}, except for .parquet)"


def _list_directory(root: str) -> list[str]:
    """Data files under ``root``, recursively and sorted; hidden and ``_``-prefixed entries (``_SUCCESS``,
    ``.cache``) are not data."""
    found = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith((".", "_")))
        for name in filenames:
            if not name.startswith((".", "_")) and format_of(name) is not None:
                found.append(os.path.join(dirpath, name))
    return sorted(found)


def resolve(source: SourceConfig) -> ResolvedSource:
    """Interpret ``source.path`` without reading any data: for local paths, list the files and pick the builder.

    Raises DataError when a local path matches no file, a file has an unknown extension, or formats are mixed.
    Hub ids and URLs are not contacted here.
    """
    path = source.path
    if not path:
        raise DataError("a data source has an empty path")
    kind = source_kind(path)
    if kind == "hub":
        return ResolvedSource(source, "hub")
    if kind == "url":
        url_path = urlsplit(path).path
        builder = format_of(url_path)
        if builder is None:
            raise DataError(
                f"{path}: cannot tell the file format from this URL; name the files with their extension "
                f"(e.g. .../*.jsonl.zst). Known extensions: {_known_extensions()}"
            )
        return ResolvedSource(source, "url", builder)

    expanded = os.path.expanduser(path)
    if has_glob(expanded):
        files = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
        if not files:
            raise DataError(f"{path}: no file matches this pattern")
        for f in files:
            if format_of(f) is None:
                raise DataError(f"{path}: {f} has an unknown extension; known: {_known_extensions()}")
    elif os.path.isdir(expanded):
        files = _list_directory(expanded)
        if not files:
            raise DataError(f"{path}: the directory holds no data file; known extensions: {_known_extensions()}")
    elif os.path.isfile(expanded):
        if format_of(expanded) is None:
            raise DataError(f"{path}: unknown extension; known: {_known_extensions()}")
        files = [expanded]
    else:
        raise DataError(f"{path}: no such file or directory")

    builders = sorted({b for f in files if (b := format_of(f)) is not None})
    if len(builders) > 1:
        examples = ", ".join(next(f for f in files if format_of(f) == b) for b in builders)
        raise DataError(
            f"{path}: mixes file formats ({', '.join(builders)}: {examples}); point each source at one format"
        )
    return ResolvedSource(source, "local", builders[0], [os.path.abspath(f) for f in files])


def check_sources(sources: list[SourceConfig]) -> list[str]:
    """Problems with local sources found without reading any data, for a pre-flight check before training starts.

    Each problem names the source path. Hub ids and URLs are skipped: checking them would need the network.
    """
    problems = []
    for source in sources:
        try:
            resolve(source)
        except DataError as e:
            problems.append(str(e))
    return problems


def load(resolved: ResolvedSource, *, streaming: bool = True) -> Any:
    """``datasets.load_dataset`` for a resolved source, unchecked and with all its columns.

    For files, the download-count ping ``datasets`` sends to the hub for its built-in builders is switched off:
    reading local files must not touch the network (on a cluster without internet it costs a timeout per call).
    """
    from datasets import load_dataset

    source = resolved.source
    try:
        if resolved.kind == "hub":
            return load_dataset(source.path, source.name, split=source.split, streaming=streaming)
        data_files = resolved.files if resolved.kind == "local" else source.path
        with no_download_count_ping():
            return load_dataset(
                resolved.builder, data_files={source.split: data_files}, split=source.split, streaming=streaming
            )
    except DataError:
        raise
    except Exception as e:
        if resolved.kind == "local":
            raise DataError(describe_failure([resolved], e)) from e
        raise DataError(f"{source.path}: cannot open: {type(e).__name__}: {e}") from e


def check_text(value: Any, field_name: str) -> str | None:
    """Why ``value`` is not a usable document text, or None when it is."""
    if value is None:
        return f"no field {field_name!r} (or it is null)"
    if not isinstance(value, str):
        return f"field {field_name!r} holds {type(value).__name__}, expected a string"
    return None


def open_source(source: SourceConfig, *, streaming: bool = True) -> datasets.IterableDataset:
    """One source as a dataset with the single column ``text``.

    Local files, directories and globs (jsonl, json, parquet, txt; plain, .gz or .zst) are read with the
    ``datasets`` builder their extension names and never touch the network; ``org/name`` is a hub dataset
    (``source.name`` is its configuration, ``source.split`` its split); ``s3://``, ``gs://``, ``https://`` and
    other fsspec URLs are read remotely. In .txt files each line is a document.

    The first record is read to check the text field, so a wrong ``text_field`` fails here, naming the source,
    rather than mid-training. Raises DataError.
    """
    resolved = resolve(source)
    ds = load(resolved, streaming=streaming)
    text_field = resolved.text_field
    features = getattr(ds, "features", None)
    if features is not None and text_field not in features:
        raise DataError(
            f"{source.path}: no column {text_field!r}; the columns are {', '.join(features)}. "
            "Set text_field to the column holding the text."
        )
    try:
        first = next(iter(ds), None)
    except Exception as e:
        raise DataError(describe_failure([resolved], e)) from e
    if first is not None:
        problem = check_text(first.get(text_field), text_field)
        if problem is not None:
            where = locate_problem(resolved) or f"{source.path}: first record: {problem}"
            columns = ", ".join(first)
            raise DataError(f"{where} (the records have: {columns}). Set text_field to the column holding the text.")
    if features is None or list(features) != [text_field]:
        ds = ds.select_columns([text_field])
    if text_field != "text":
        ds = ds.rename_column(text_field, "text")
    return ds


# ------------------------------------------------------------------------------------- error locating


class _OutOfTime(Exception):
    pass


def _open_text(path: str):
    import fsspec

    return fsspec.open(path, "rt", compression="infer", encoding="utf-8", newline="").open()


def _where(resolved: ResolvedSource, file: str, position: str, problem: str) -> str:
    path = resolved.source.path
    prefix = "" if os.path.abspath(os.path.expanduser(path)) == file else f"{path}: "
    return f"{prefix}{file}{position}: {problem}"


def _record_problem(record: Any, field_name: str) -> str | None:
    if not isinstance(record, dict):
        return f"expected a JSON object, got {type(record).__name__}"
    return check_text(record.get(field_name), field_name)


class _NotUtf8(Exception):
    def __init__(self, lineno: int):
        self.lineno = lineno


def _numbered_lines(f, deadline: float) -> Iterator[tuple[int, str]]:
    """(line number, line) of an open text file, giving up once ``deadline`` has passed."""
    lineno = 0
    while True:
        try:
            line = f.readline()
        except UnicodeDecodeError:
            raise _NotUtf8(lineno + 1) from None
        if not line:
            return
        lineno += 1
        if lineno % 10_000 == 0 and time.monotonic() > deadline:
            raise _OutOfTime
        yield lineno, line


def _scan_json(resolved: ResolvedSource, file: str, deadline: float) -> str | None:
    """JSON Lines line by line; a file that starts with ``[`` is one JSON array of records."""
    field_name = resolved.text_field
    with _open_text(file) as f:
        seen_content = False
        try:
            for lineno, line in _numbered_lines(f, deadline):
                stripped = line.strip()
                if not stripped:
                    continue
                if not seen_content and stripped.startswith("["):
                    try:
                        records = json.loads(line + f.read())
                    except json.JSONDecodeError as e:
                        return _where(resolved, file, f", line {lineno + e.lineno - 1}", f"malformed JSON ({e.msg})")
                    except UnicodeDecodeError:
                        return _where(resolved, file, "", "not UTF-8 text")
                    for i, record in enumerate(records if isinstance(records, list) else [records]):
                        problem = _record_problem(record, field_name)
                        if problem:
                            return _where(resolved, file, f", record {i + 1}", problem)
                    return None
                seen_content = True
                try:
                    record = json.loads(stripped)
                except json.JSONDecodeError as e:
                    return _where(resolved, file, f", line {lineno}", f"malformed JSON ({e.msg})")
                problem = _record_problem(record, field_name)
                if problem:
                    return _where(resolved, file, f", line {lineno}", problem)
        except _NotUtf8 as e:
            return _where(resolved, file, f", line {e.lineno}", "not UTF-8 text")
    return None


def _scan_text(resolved: ResolvedSource, file: str, deadline: float) -> str | None:
    with _open_text(file) as f:
        try:
            for _ in _numbered_lines(f, deadline):
                pass
        except _NotUtf8 as e:
            return _where(resolved, file, f", line {e.lineno}", "not UTF-8 text")
    return None


def _scan_parquet(resolved: ResolvedSource, file: str, deadline: float) -> str | None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    field_name = resolved.text_field
    try:
        pf = pq.ParquetFile(file)
    except Exception as e:
        return _where(resolved, file, "", f"unreadable Parquet file ({e})")
    names = pf.schema_arrow.names
    if field_name not in names:
        return _where(resolved, file, "", f"no column {field_name!r}; the columns are {', '.join(names)}")
    kind = pf.schema_arrow.field(field_name).type
    if not (pa.types.is_string(kind) or pa.types.is_large_string(kind) or pa.types.is_string_view(kind)):
        return _where(resolved, file, "", f"column {field_name!r} holds {kind}, expected strings")
    row = 0
    try:
        for batch in pf.iter_batches(columns=[field_name], batch_size=65536):
            column = batch.column(0)
            if column.null_count:
                first_null = next(i for i, v in enumerate(column.is_null().to_pylist()) if v)
                return _where(resolved, file, f", row {row + first_null + 1}", f"column {field_name!r} is null")
            row += len(batch)
            if time.monotonic() > deadline:
                raise _OutOfTime
    except _OutOfTime:
        raise
    except Exception as e:
        return _where(resolved, file, f", after row {row}", f"unreadable Parquet data ({e})")
    return None


_SCANNERS = {"json": _scan_json, "text": _scan_text, "parquet": _scan_parquet}


def locate_problem(resolved: ResolvedSource, budget_s: float = LOCATE_BUDGET_S) -> str | None:
    """The first bad record of a local source, as ``path: file, line N: problem``; None when none is found
    (remote source, nothing wrong in the files, or the search ran out of time)."""
    if resolved.kind != "local" or resolved.builder not in _SCANNERS:
        return None
    deadline = time.monotonic() + budget_s
    scan = _SCANNERS[resolved.builder]
    try:
        for file in resolved.files:
            try:
                found = scan(resolved, file, deadline)
            except (OSError, EOFError, ValueError) as e:
                found = _where(resolved, file, "", f"unreadable ({type(e).__name__}: {e})")
            if found:
                return found
    except _OutOfTime:
        return None
    return None


def describe_failure(sources: list[ResolvedSource], error: BaseException) -> str:
    """A DataError message for ``error`` raised while reading ``sources``: the bad file and line where a scan of
    the local files finds it, else the source paths and the original error."""
    cause = f"{type(error).__name__}: {error}"
    for resolved in sources:
        where = locate_problem(resolved)
        if where:
            return f"{where} (reading failed with {cause})"
    paths = ", ".join(r.source.path for r in sources)
    return f"reading {paths} failed: {cause}"


def bad_text(resolved: list[ResolvedSource], what: str, index: int, problem: str) -> DataError:
    """A DataError for a record without usable text: the file and line when a scan finds them, else ``what``
    and the record's index."""
    for r in resolved:
        where = locate_problem(r)
        if where:
            return DataError(where)
    return DataError(f"{what}: document {index}: {problem}")
