"""Reading records from files, streamed: JSONL, JSON (a list of records), CSV, plain text, or a directory.

Every reader yields ``(record, location)`` pairs, where ``location`` is ``"file:line"`` (or ``file[i]`` for a
JSON list) so later errors can name the exact place. JSONL, CSV and TXT are read line by line from the bytes,
so a multi-GB file never sits in memory whole and a non-UTF-8 byte is reported with its byte offset.
"""
from __future__ import annotations

import csv
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".txt": "txt"}


class DataError(ValueError):
    """A problem with the user's data, with the file, line or field it concerns and what was expected."""


@dataclass
class ReadStats:
    """What reading one source met: records read, lines/records skipped and the first few reasons."""

    records: int = 0
    skipped: int = 0
    examples: list[str] = field(default_factory=list)

    def skip(self, reason: str) -> None:
        self.skipped += 1
        if len(self.examples) < 3:
            self.examples.append(reason)


def list_files(path: str | Path) -> list[Path]:
    """The data files of ``path``: itself, or every known file under a directory, in sorted order."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"{p}: no such file or directory")
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in SUFFIXES)
        if not files:
            raise DataError(f"{p}: the directory holds no {'/'.join(SUFFIXES)} files")
        return files
    if p.suffix.lower() not in SUFFIXES:
        raise DataError(f"{p}: unknown file type {p.suffix!r}; expected one of {', '.join(SUFFIXES)}")
    return [p]


def _raw_lines(path: Path) -> Iterator[tuple[int, int, bytes]]:
    """(line number from 1, byte offset of the line, raw bytes) for every line of a file."""
    with open(path, "rb") as f:
        offset = 0
        for lineno, raw in enumerate(f, 1):
            yield lineno, offset, raw
            offset += len(raw)


def _decode(path: Path, lineno: int, offset: int, raw: bytes) -> str:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}:{lineno}: not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {offset + e.start} "
                        f"of the file; re-encode the file as UTF-8") from None
    return text.lstrip("\ufeff") if lineno == 1 else text  # a UTF-8 byte order mark is not data


_scan = json.JSONDecoder().scan_once  # what json.loads runs on a line that starts with its value


def _read_jsonl(path: Path, skip_bad_lines: bool, stats: ReadStats) -> Iterator[tuple[dict, str]]:
    name = str(path)
    for lineno, offset, raw in _raw_lines(path):
        # the common line, '{...}' + newline, parsed by json's scanner directly (json.loads' own steps around
        # it cost as much again); anything else, or any failure, takes the checked path below
        if raw[:1] == b"{" and lineno > 1:
            try:
                text = raw.decode("utf-8")
                rec, end = _scan(text, 0)
            except (UnicodeDecodeError, StopIteration, ValueError):
                pass
            else:
                if end == len(text) or not text[end:].strip(" \t\n\r"):  # json's whitespace only
                    yield rec, f"{name}:{lineno}"
                    continue
        try:
            text = _decode(path, lineno, offset, raw)
            if not text.strip():
                continue
            try:
                rec = json.loads(text)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: malformed JSON ({e.msg} at column {e.colno}); "
                                f"pass skip_bad_lines=True to skip such lines") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{lineno}: expected one JSON object per line, got {type(rec).__name__}")
        except DataError as e:
            if not skip_bad_lines:
                raise
            stats.skip(str(e))
            continue
        yield rec, f"{path}:{lineno}"


def _read_json(path: Path, skip_bad_lines: bool, stats: ReadStats) -> Iterator[tuple[dict, str]]:
    raw = path.read_bytes()  # a JSON document must be parsed whole; big data belongs in JSONL
    try:
        text = raw.decode("utf-8").lstrip("\ufeff")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8: byte 0x{raw[e.start]:02x} at byte offset {e.start}; "
                        f"re-encode the file as UTF-8") from None
    if not text.strip():
        raise DataError(f"{path}: empty file")
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        if e.msg == "Extra data":  # one object per line in a .json file: read it as JSONL
            yield from _read_jsonl(path, skip_bad_lines, stats)
            return
        raise DataError(f"{path}:{e.lineno}: malformed JSON ({e.msg} at column {e.colno})") from None
    if isinstance(doc, dict):  # {"data": [...]}: accept a single list of records inside an object
        lists = [v for v in doc.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a JSON list of records (or an object holding exactly one list), "
                            f"got an object with keys {sorted(doc)[:10]}")
        doc = lists[0]
    if not isinstance(doc, list):
        raise DataError(f"{path}: expected a JSON list of records, got {type(doc).__name__}")
    for i, rec in enumerate(doc):
        if not isinstance(rec, dict):
            err = f"{path}[{i}]: expected a JSON object per record, got {type(rec).__name__}"
            if not skip_bad_lines:
                raise DataError(err)
            stats.skip(err)
            continue
        yield rec, f"{path}[{i}]"


def _read_csv(path: Path, skip_bad_lines: bool, stats: ReadStats) -> Iterator[tuple[dict, str]]:
    lines = (_decode(path, n, off, raw) for n, off, raw in _raw_lines(path))
    reader = csv.reader(lines)
    header = next(reader, None)
    if header is None:
        return
    header = [h.strip() for h in header]
    for row in reader:
        loc = f"{path}:{reader.line_num}"
        if not any(cell.strip() for cell in row):
            continue
        if len(row) != len(header):
            err = f"{loc}: expected {len(header)} CSV columns ({', '.join(header)}), got {len(row)}"
            if not skip_bad_lines:
                raise DataError(err)
            stats.skip(err)
            continue
        yield dict(zip(header, row)), loc


def _read_txt(path: Path, txt_split: str) -> Iterator[tuple[dict, str]]:
    if txt_split == "file":
        text = "".join(_decode(path, n, off, raw) for n, off, raw in _raw_lines(path))
        if text.strip():
            yield {"text": text.strip("\n")}, str(path)
        return
    block, start = [], 0
    for n, off, raw in _raw_lines(path):
        line = _decode(path, n, off, raw)
        if line.strip():
            if not block:
                start = n
            block.append(line)
        elif block:
            yield {"text": "".join(block).rstrip("\n")}, f"{path}:{start}"
            block = []
    if block:
        yield {"text": "".join(block).rstrip("\n")}, f"{path}:{start}"


def read_records(path: str | Path, *, skip_bad_lines: bool = False, txt_split: str = "block",
                 stats: ReadStats | None = None) -> Iterator[tuple[dict, str, Path]]:
    """Yield ``(record, location, file)`` for every record of a file or directory, streamed.

    Args:
        path: a .jsonl/.ndjson/.json/.csv/.txt file or a directory of them (read recursively, sorted).
        skip_bad_lines: skip malformed lines (and count them in ``stats``) instead of raising.
        txt_split: "block" (a document per blank-line separated block) or "file" (a document per file).
        stats: filled with the counts.
    Raises:
        DataError: a missing or empty file, a malformed line, non-UTF-8 bytes (with the byte offset).
    """
    if txt_split not in ("block", "file"):
        raise DataError(f"txt_split must be 'block' or 'file', got {txt_split!r}")
    stats = ReadStats() if stats is None else stats
    for f in list_files(path):
        kind = SUFFIXES[f.suffix.lower()]
        if kind == "jsonl":
            it = _read_jsonl(f, skip_bad_lines, stats)
        elif kind == "json":
            it = _read_json(f, skip_bad_lines, stats)
        elif kind == "csv":
            it = _read_csv(f, skip_bad_lines, stats)
        else:
            it = _read_txt(f, txt_split)
        n = 0
        for rec, loc in it:
            n += 1
            stats.records += 1
            yield rec, loc, f
        if n == 0:
            why = f" ({stats.skipped} bad lines skipped)" if stats.skipped else ""
            raise DataError(f"{f}: empty file: no records found{why}")
