"""Instruction records: loading, validation, the Alpaca prompt template, sample ids,
tokenisation with prompt masks, and batching.

Two schemas are read, detected per record:
- Dolly: `instruction`, `context` (may be empty), `response`, other keys (e.g. `category`);
- MiniLLM/POCL: `instruction`, `input` (may be empty), `output` (a string or a non-empty list of
  reference strings), optional `prompt` (the already-templated prompt) and `topic`.
Text is kept verbatim (no stripping or normalisation), so a rebuilt prompt matches the `prompt`
field of the MiniLLM files byte for byte. A null value counts as an absent key, because the
columnar formats (parquet, HF datasets) fill a key missing from some rows with null.

Bad input never passes silently: every problem names the file, the line (or record) and the
field, and says how to fix it. With `on_bad_record="error"` the first one raises `DataError`;
with `"skip"` they are collected (and optionally written as JSONL) and counted. A missing or
unreadable file, or a dataset with no usable record, is always an error.

This module never imports `ray`.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import logging
import re
import unicodedata
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq
import torch

log = logging.getLogger("pocl_ray.data")

IGNORE_INDEX = -100
"""Label of positions that carry no loss (prompt tokens and padding)."""

PROMPT_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)
PROMPT_NO_INPUT = (
    "Below is an instruction that describes a task. Write a response that appropriately "
    "completes the request.\n\n### Instruction:\n{instruction}\n\n### Response:\n"
)
RESPONSE_CUE = "### Response:\n"

Format = Literal["auto", "jsonl", "json", "parquet", "dir", "hf"]
_SUFFIX_FORMATS = {".jsonl": "jsonl", ".json": "json", ".parquet": "parquet"}
_HF_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
_SKIP_HINT = "set data.on_bad_record=skip to drop such records"


class DataError(ValueError):
    """Bad or missing input data. `source`, `line` and `field` locate the problem when it
    concerns one record (None when it concerns a whole file)."""

    def __init__(
        self, message: str, *, source: str, line: int | None = None, field: str | None = None
    ):
        super().__init__(message)
        self.source = source
        self.line = line
        self.field = field


@dataclass(frozen=True, kw_only=True)
class Record:
    """One instruction example, validated and templated."""

    sample_id: str
    """`sample_id(prompt, references[0])`: stable across machines, runs and file order."""
    instruction: str
    input: str
    """The Dolly `context` or MiniLLM `input`; "" when there is none."""
    references: tuple[str, ...]
    """Reference responses; the first is the training target, all count for ROUGE-L."""
    prompt: str
    """`build_prompt(instruction, input)`."""
    source: str
    """File (or HF dataset name) the record came from."""
    line: int
    """1-based line number in a JSONL file; 1-based record number in JSON, parquet and HF."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Other non-null fields, kept as read (e.g. `category`, `topic`, `level`)."""


@dataclass(kw_only=True)
class LoadResult:
    records: list[Record]
    n_read: int
    """Records read (blank JSONL lines are not records), accepted or rejected."""
    rejected: list[dict[str, Any]]
    """One dict per skipped record: source, line, field, reason, raw."""

    @property
    def n_accepted(self) -> int:
        return len(self.records)


@dataclass(frozen=True, kw_only=True)
class TokenizedExample:
    """Token ids of one record: prompt then response, labels masked on the prompt."""

    sample_id: str
    input_ids: list[int]
    """(L,) prompt ids then response ids, L <= max_length."""
    labels: list[int]
    """(L,) IGNORE_INDEX on the prompt, the token itself on the response (not shifted)."""
    prompt_length: int
    prompt_truncated: bool
    response_truncated: bool


EXAMPLE_COLUMNS = ("sample_id", "input_ids", "labels", "prompt_length", "response_truncated")
"""The columns a row needs to become a TokenizedExample (tables, Ray datasets)."""


def example_row(e: TokenizedExample) -> dict[str, Any]:
    """The row form of an example (`EXAMPLE_COLUMNS`), for tables and Ray datasets."""
    return {
        "sample_id": e.sample_id,
        "input_ids": list(e.input_ids),
        "labels": list(e.labels),
        "prompt_length": e.prompt_length,
        "response_truncated": e.response_truncated,
    }


def example_from_row(row: Mapping[str, Any]) -> TokenizedExample:
    """The one row -> example conversion: a table, pandas or Ray row with the columns of
    `example_row` (numpy values become Python ints; a row without `response_truncated`,
    e.g. the scores table, counts as not cut)."""
    return TokenizedExample(
        sample_id=str(row["sample_id"]),
        input_ids=[int(t) for t in row["input_ids"]],
        labels=[int(t) for t in row["labels"]],
        prompt_length=int(row["prompt_length"]),
        prompt_truncated=False,
        response_truncated=bool(row.get("response_truncated", False)),
    )


@dataclass(kw_only=True)
class TokenizeResult:
    examples: list[TokenizedExample]
    n_prompt_truncated: int
    n_response_truncated: int


# ---------------------------------------------------------------- template and ids


def build_prompt(instruction: str, input: str = "") -> str:
    """The Alpaca prompt, fields inserted verbatim.

    The input section appears iff `input` is a non-empty string (the Alpaca rule; no field is
    stripped). This reproduces every `prompt` of dollyeval.jsonl and selfinst.jsonl byte for
    byte; those files have no field with outer whitespace, so they cannot tell this rule from
    one that strips, and verbatim keeps a given prompt exactly as written.
    """
    if input:
        return PROMPT_WITH_INPUT.format(instruction=instruction, input=input)
    return PROMPT_NO_INPUT.format(instruction=instruction)


def _normalise(text: str) -> str:
    return re.sub(r"\s+", " ", unicodedata.normalize("NFC", text).strip())


def sample_id(prompt: str, reference: str) -> str:
    """16 hex chars of sha256(norm(prompt) + NUL + norm(reference)), where norm = NFC, strip,
    whitespace runs to one space: the same text gets the same id on every machine and run,
    whatever its line endings or spacing."""
    key = _normalise(prompt) + "\x00" + _normalise(reference)
    return hashlib.sha256(key.encode("utf-8")).hexdigest()[:16]


def split_train_eval(
    records: Sequence[Record], eval_fraction: float, seed: int = 0
) -> tuple[list[Record], list[Record]]:
    """Deterministic split by sample id, not file order: a record is held out when
    int(sha256(f"{seed}:{sample_id}")) / 2**256 < eval_fraction. Order is kept within each
    part. A small set can leave the eval part empty; the caller decides whether that is fine."""
    train, held = [], []
    for r in records:
        digest = hashlib.sha256(f"{seed}:{r.sample_id}".encode()).hexdigest()
        (held if int(digest, 16) / 2**256 < eval_fraction else train).append(r)
    return train, held


# ---------------------------------------------------------------- reading rows


@dataclass(frozen=True, kw_only=True)
class _Problem:
    field: str
    problem: str
    fix: str


@dataclass(frozen=True, kw_only=True)
class _Row:
    """One raw record before validation; `problem` is set when it could not even be parsed."""

    source: str
    line: int
    unit: Literal["line", "record"]
    value: Any
    raw: str
    problem: _Problem | None = None


class _Reject(Exception):
    """Raised by the field checks; carries the problem to `_to_record`."""

    def __init__(self, field: str, problem: str, fix: str):
        super().__init__(problem)
        self.detail = _Problem(field=field, problem=problem, fix=fix)


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError as e:
        raise DataError(f"{path}: no such file; check data.source", source=str(path)) from e
    except OSError as e:
        raise DataError(
            f"{path}: cannot read ({e.strerror}); check data.source and its permissions",
            source=str(path),
        ) from e


def _jsonl_rows(path: Path) -> Iterator[_Row]:
    """One row per non-blank line. The file is split on b"\\n" and each line decoded on its own,
    so one bad byte or a U+2028 inside a string does not cost the rest of the file."""
    data = _read_bytes(path)
    if data.startswith(b"\xef\xbb\xbf"):  # BOM written by some Windows editors
        data = data[3:]
    for number, chunk in enumerate(data.split(b"\n"), 1):
        if not chunk.strip():
            continue
        row = dict(source=str(path), line=number, unit="line")
        try:
            text = chunk.decode("utf-8")
        except UnicodeDecodeError as e:
            bad = _Problem(
                field="<encoding>",
                problem=f"line is not valid UTF-8 (byte 0x{chunk[e.start]:02x} at byte {e.start})",
                fix="re-save the file as UTF-8",
            )
            yield _Row(
                **row, value=None, raw=chunk.decode("utf-8", "backslashreplace"), problem=bad
            )
            continue
        try:
            value = json.loads(text)
        except json.JSONDecodeError as e:
            bad = _Problem(
                field="<json>",
                problem=f"line is not valid JSON ({e.msg} at column {e.colno})",
                fix="write exactly one JSON object per line",
            )
            yield _Row(**row, value=None, raw=text, problem=bad)
            continue
        yield _Row(**row, value=value, raw=text)


def _json_rows(path: Path) -> Iterator[_Row]:
    """Rows of a file holding one JSON list of objects (the file must parse as a whole)."""
    data = _read_bytes(path)
    try:
        value = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise DataError(
            f"{path}: not valid UTF-8 at byte {e.start}; re-save the file as UTF-8",
            source=str(path),
        ) from e
    except json.JSONDecodeError as e:
        raise DataError(
            f"{path}:{e.lineno}: not valid JSON ({e.msg} at column {e.colno}); fix it, or if it "
            "holds one object per line rename it to .jsonl or set data.format=jsonl",
            source=str(path),
            line=e.lineno,
        ) from e
    if not isinstance(value, list):
        raise DataError(
            f"{path}: top level is a JSON {type(value).__name__}; expected a list of records "
            "(or use JSONL with one object per line)",
            source=str(path),
        )
    for number, item in enumerate(value, 1):
        yield _Row(source=str(path), line=number, unit="record", value=item, raw=_dump(item))


def _parquet_rows(path: Path) -> Iterator[_Row]:
    if not path.is_file():
        _read_bytes(path)  # raises the same clear error as the text formats
    try:
        table = pq.read_table(path)
    except pa.ArrowException as e:
        raise DataError(
            f"{path}: cannot read as parquet ({e}); check the file", source=str(path)
        ) from e
    for number, item in enumerate(table.to_pylist(), 1):
        yield _Row(source=str(path), line=number, unit="record", value=item, raw=_dump(item))


def _is_saved_dataset(path: Path) -> bool:
    """A folder written by `Dataset.save_to_disk` / `DatasetDict.save_to_disk`."""
    return (path / "state.json").is_file() or (path / "dataset_dict.json").is_file()


def _hf_rows(source: str, split: str) -> Iterator[_Row]:
    """Rows of a Hugging Face dataset: a `save_to_disk` folder, a local data file (read by the
    builder for its extension), or anything `datasets.load_dataset` accepts (hub name, folder)."""
    import datasets  # imported here: it costs about a second and most runs read plain files

    path = Path(source)
    if path.is_dir() and _is_saved_dataset(path):
        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            if split not in ds:
                raise DataError(
                    f"{source}: no split {split!r}; available: {sorted(ds)}; set data.split",
                    source=source,
                )
            ds = ds[split]
    elif path.suffix in _HF_BUILDERS:
        if not path.is_file():
            _read_bytes(path)
        builder = _HF_BUILDERS[path.suffix]
        ds = datasets.load_dataset(builder, data_files={split: str(path)}, split=split)
    else:
        ds = datasets.load_dataset(source, split=split)
    for number, item in enumerate(ds, 1):
        yield _Row(source=source, line=number, unit="record", value=item, raw=_dump(item))


def _dump(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _file_rows(path: Path, fmt: str) -> Iterator[_Row]:
    """Rows of one file; an empty file is an error (unless `limit` stopped reading earlier)."""
    readers = {"jsonl": _jsonl_rows, "json": _json_rows, "parquet": _parquet_rows}
    n = 0
    for row in readers[fmt](path):
        n += 1
        yield row
    if n == 0:
        raise DataError(f"{path}: no records; check that it is the right file", source=str(path))


def _dir_rows(path: Path) -> Iterator[_Row]:
    files = sorted(p for p in path.iterdir() if p.is_file() and p.suffix in _SUFFIX_FORMATS)
    if not files:
        raise DataError(
            f"{path}: no *.jsonl, *.json or *.parquet files in this folder; check data.source",
            source=str(path),
        )
    for f in files:
        yield from _file_rows(f, _SUFFIX_FORMATS[f.suffix])


def _resolve_format(path: Path, fmt: Format) -> str:
    if fmt != "auto":
        return fmt
    if path.is_dir():
        return "hf" if _is_saved_dataset(path) else "dir"
    if path.suffix in _SUFFIX_FORMATS:
        return _SUFFIX_FORMATS[path.suffix]
    if not path.exists():
        raise DataError(
            f"{path}: no such file or folder; check data.source, or set data.format=hf for a "
            "Hugging Face hub dataset",
            source=str(path),
        )
    raise DataError(
        f"{path}: cannot tell the format from the extension {path.suffix!r}; use .jsonl, .json "
        "or .parquet, or set data.format",
        source=str(path),
    )


def _rows(source: str | Path, fmt: Format, split: str) -> Iterator[_Row]:
    path = Path(source)
    kind = _resolve_format(path, fmt)
    if kind == "hf":
        return _hf_rows(str(source), split)
    if kind == "dir":
        if not path.is_dir():
            raise DataError(f"{path}: not a folder; check data.source", source=str(path))
        return _dir_rows(path)
    return _file_rows(path, kind)


# ---------------------------------------------------------------- validating one record


def _text(obj: dict[str, Any], name: str, *, required: bool, allow_empty: bool) -> str:
    value = obj.get(name)
    if value is None:
        if required:
            raise _Reject(name, f"field {name!r} is missing", f"add {name!r} as a string")
        return ""
    if not isinstance(value, str):
        raise _Reject(
            name,
            f"field {name!r} has type {type(value).__name__} ({_short(value)}), expected a string",
            f"write {name!r} as a JSON string",
        )
    if not allow_empty and not value.strip():
        raise _Reject(name, f"field {name!r} is empty", f"give a non-empty {name}")
    _check_encodable(name, value)
    return value


def _check_encodable(name: str, value: str) -> None:
    # JSON may escape a lone surrogate ("\ud800"); it is not text and cannot be hashed or
    # tokenised as UTF-8, so it is caught here rather than deep inside a tokenizer
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as e:
        raise _Reject(
            name,
            f"field {name!r} holds a lone surrogate {value[e.start]!r} at char {e.start}",
            "fix the \\uXXXX escape that produced it",
        ) from None


def _references(obj: dict[str, Any], name: str) -> tuple[str, ...]:
    value = obj[name]
    if isinstance(value, str):
        return (_text(obj, name, required=True, allow_empty=False),)
    if not isinstance(value, list):
        raise _Reject(
            name,
            f"field {name!r} has type {type(value).__name__} ({_short(value)}), expected a string "
            "or a list of strings",
            f"write {name!r} as a string or a list of reference strings",
        )
    if not value:
        raise _Reject(name, f"field {name!r} is an empty list", "give at least one reference")
    for i, item in enumerate(value, 1):
        if not isinstance(item, str):
            raise _Reject(
                name,
                f"field {name!r} item {i} has type {type(item).__name__} ({_short(item)}), "
                "expected a string",
                "make every reference a JSON string",
            )
        if not item.strip():
            raise _Reject(name, f"field {name!r} item {i} is empty", "give non-empty references")
        _check_encodable(name, item)
    return tuple(value)


def _one_of(obj: dict[str, Any], names: tuple[str, str]) -> str | None:
    """The key among `names` the record uses (Dolly vs MiniLLM spelling); both is ambiguous."""
    present = [n for n in names if n in obj]
    if len(present) == 2:
        raise _Reject(
            "/".join(names),
            f"record has both {names[0]!r} and {names[1]!r}",
            f"keep one of them ({names[0]!r}: MiniLLM schema, {names[1]!r}: Dolly schema)",
        )
    return present[0] if present else None


def _check_prompt(given: str, built: str) -> None:
    if given == built:
        return
    # the first differing char, or the end of the shorter one when one is a prefix
    at = min(len(given), len(built))
    at = next((i for i in range(at) if given[i] != built[i]), at)
    raise _Reject(
        "prompt",
        f"field 'prompt' differs from the Alpaca template of instruction and input at char {at} "
        f"(file has {given[at : at + 20]!r}, template gives {built[at : at + 20]!r})",
        "drop the prompt field to have it rebuilt, or fix instruction/input",
    )


def _to_record(row: _Row) -> Record:
    """Validate one row into a Record, or raise _Reject."""
    if row.problem is not None:
        raise _Reject(row.problem.field, row.problem.problem, row.problem.fix)
    if not isinstance(row.value, dict):
        raise _Reject(
            "<record>",
            f"record has type {type(row.value).__name__}, expected a JSON object",
            "give each record as an object with instruction and response/output",
        )
    obj = {k: v for k, v in row.value.items() if v is not None}
    instruction = _text(obj, "instruction", required=True, allow_empty=False)
    input_key = _one_of(obj, ("input", "context"))
    input_text = _text(obj, input_key, required=False, allow_empty=True) if input_key else ""
    response_key = _one_of(obj, ("output", "response"))
    if response_key is None:
        if input_key is None:
            raise _Reject(
                "output/response",
                "no response field: expected 'output' (MiniLLM schema) or 'response' (Dolly)",
                "add the reference response",
            )
        name = "response" if input_key == "context" else "output"
        raise _Reject(name, f"field {name!r} is missing", f"add the reference {name}")
    references = _references(obj, response_key)
    prompt = build_prompt(instruction, input_text)
    if "prompt" in obj:
        _check_prompt(_text(obj, "prompt", required=True, allow_empty=False), prompt)
    used = {"instruction", "prompt", input_key, response_key}
    return Record(
        sample_id=sample_id(prompt, references[0]),
        instruction=instruction,
        input=input_text,
        references=references,
        prompt=prompt,
        source=row.source,
        line=row.line,
        extra={k: v for k, v in obj.items() if k not in used},
    )


def _short(value: Any) -> str:
    text = _dump(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _where(source: str, line: int, unit: str) -> str:
    return f"{source}:{line}" if unit == "line" else f"{source}: record {line}"


# ---------------------------------------------------------------- loading


def load_records(
    source: str | Path,
    *,
    format: Format = "auto",
    split: str = "train",
    limit: int | None = None,
    on_bad_record: Literal["error", "skip"] = "error",
    rejects_path: str | Path | None = None,
) -> LoadResult:
    """Read, validate and template instruction records.

    Args:
        source: a .jsonl / .json (list of objects) / .parquet file, a folder of such files
            (read in sorted name order, not recursively), a `save_to_disk` folder, or (with
            format "hf") a Hugging Face dataset name or local data file.
        format: "auto" picks by extension; a folder is "dir", or "hf" when it is a
            `save_to_disk` folder.
        split: the split to read for "hf" (a single-split `save_to_disk` folder ignores it).
        limit: stop after this many records read (accepted or rejected).
        on_bad_record: "error" raises DataError at the first bad record; "skip" drops it and
            reports it in `rejected` (and in `rejects_path` as JSONL when given).

    A duplicate sample id (same normalised prompt and first reference) is a bad record: the
    second occurrence, naming where the first one is.

    Raises:
        DataError: a missing / unreadable / empty source, a JSON-list or parquet file that does
            not parse as a whole, a bad record under "error", or no accepted record under
            "skip".
    """
    rows = _rows(source, format, split)
    if limit is not None:
        rows = itertools.islice(rows, limit)
    records: list[Record] = []
    rejected: list[dict[str, Any]] = []
    first_seen: dict[str, str] = {}
    n_read = 0
    for row in rows:
        n_read += 1
        try:
            record = _to_record(row)
            if record.sample_id in first_seen:
                raise _Reject(
                    "sample_id",
                    f"duplicate sample id {record.sample_id}: same prompt and reference as "
                    f"{first_seen[record.sample_id]}",
                    "remove one of the two records",
                )
        except _Reject as e:
            _handle_bad(row, e.detail, on_bad_record, rejected)
            continue
        first_seen[record.sample_id] = _where(row.source, row.line, row.unit)
        records.append(record)
    result = LoadResult(records=records, n_read=n_read, rejected=rejected)
    assert result.n_accepted + len(rejected) == n_read, "every record read is kept or rejected"
    _report(result, str(source), on_bad_record, rejects_path)
    return result


def _handle_bad(row: _Row, bad: _Problem, policy: str, rejected: list[dict[str, Any]]) -> None:
    if policy == "error":
        raise DataError(
            f"{_where(row.source, row.line, row.unit)}: {bad.problem}; {bad.fix}, or {_SKIP_HINT}",
            source=row.source,
            line=row.line,
            field=bad.field,
        )
    rejected.append(
        dict(
            source=row.source,
            line=row.line,
            field=bad.field,
            reason=f"{bad.problem}; {bad.fix}",
            raw=row.raw,
        )
    )


def _report(result: LoadResult, source: str, policy: str, rejects_path: str | Path | None) -> None:
    """Write the rejects file, log the skip count, and refuse a dataset with nothing left."""
    if policy == "skip" and rejects_path is not None:
        out = Path(rejects_path)
        out.parent.mkdir(parents=True, exist_ok=True)
        # backslashreplace writes a lone surrogate in a raw record as its JSON \\uXXXX escape
        with out.open("w", encoding="utf-8", errors="backslashreplace") as f:
            for r in result.rejected:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    if result.rejected:
        where = f"; details in {rejects_path}" if rejects_path is not None else ""
        log.warning(
            "%s: skipped %d of %d records as bad (on_bad_record=skip)%s",
            source,
            len(result.rejected),
            result.n_read,
            where,
        )
    if result.n_read == 0:
        raise DataError(f"{source}: no records; check data.source", source=source)
    if result.n_accepted == 0:
        raise DataError(
            f"{source}: all {result.n_read} records were rejected, none left to use; "
            f"fix the data (first problem: {result.rejected[0]['reason']})",
            source=source,
        )


# ---------------------------------------------------------------- tokenisation


def _encode(tokenizer: Any, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@functools.lru_cache(maxsize=8)
def bos_prefix(tokenizer: Any) -> tuple[int, ...]:
    """(bos_token_id,) when the tokenizer puts BOS before a text by default (Llama-family:
    the model was trained with it), else (). Prompts get it in front, so training, scoring
    and evaluation all show the model what it expects; GPT-2-style tokenizers add nothing."""
    bos = tokenizer.bos_token_id
    with_special = tokenizer("a", add_special_tokens=True)["input_ids"]
    if bos is not None and with_special[:1] == [bos] and _encode(tokenizer, "a")[:1] != [bos]:
        return (bos,)
    return ()


def _decode(tokenizer: Any, ids: list[int]) -> str:
    text = tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)
    # a cut inside a multi-byte character decodes to U+FFFD; keep no half characters
    return text.rstrip("\ufffd")


def _fit_prompt(record: Record, tokenizer: Any, max_prompt_length: int) -> tuple[list[int], bool]:
    """Prompt ids of at most max_prompt_length tokens, ending with the "### Response:\\n" cue.

    A long prompt is cut inside its fields, not at the end, so the template survives: tokens
    come off the end of the input first, then off the end of the instruction, and the prompt
    is rebuilt and re-encoded until it fits (re-encoding a cut text can merge differently, so
    one cut is not always enough). An input cut to nothing drops the Input section.
    """
    ids = _encode(tokenizer, record.prompt)
    if len(ids) <= max_prompt_length:
        return ids, False
    fields = {"instruction": record.instruction, "input": record.input}
    for name in ("input", "instruction"):
        field_ids = _encode(tokenizer, fields[name])
        while len(ids) > max_prompt_length and field_ids:
            keep = max(0, len(field_ids) - (len(ids) - max_prompt_length))
            field_ids = field_ids[:keep]  # strictly shorter each pass, so the loop ends
            fields[name] = _decode(tokenizer, field_ids)
            ids = _encode(tokenizer, build_prompt(fields["instruction"], fields["input"]))
    if len(ids) > max_prompt_length:
        raise DataError(
            f"{record.source}: record {record.sample_id}: the prompt template alone is "
            f"{len(ids)} tokens, more than data.max_prompt_length={max_prompt_length}; "
            "raise data.max_prompt_length",
            source=record.source,
            line=record.line,
            field="prompt",
        )
    return ids, True


def tokenize_record(
    record: Record, tokenizer: Any, *, max_prompt_length: int, max_length: int
) -> TokenizedExample:
    """[BOS where the model expects one, `bos_prefix`] + prompt ids (cut to fit
    max_prompt_length, see `_fit_prompt`) + response ids + EOS.

    The response (references[0]) plus EOS is cut to max_length - prompt_length tokens; when it
    is cut the EOS goes with it, so the model is never taught to stop mid-answer.
    Labels are IGNORE_INDEX on the prompt and equal the ids on the response.
    """
    if max_length <= max_prompt_length:
        raise ValueError(f"max_length ({max_length}) must exceed max_prompt_length")
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token; set one before tokenising")
    bos = list(bos_prefix(tokenizer))
    prompt_ids, prompt_cut = _fit_prompt(record, tokenizer, max_prompt_length - len(bos))
    prompt_ids = bos + prompt_ids
    response = _encode(tokenizer, record.references[0]) + [tokenizer.eos_token_id]
    budget = max_length - len(prompt_ids)
    response_cut = len(response) > budget
    response = response[:budget]
    return TokenizedExample(
        sample_id=record.sample_id,
        input_ids=prompt_ids + response,
        labels=[IGNORE_INDEX] * len(prompt_ids) + response,
        prompt_length=len(prompt_ids),
        prompt_truncated=prompt_cut,
        response_truncated=response_cut,
    )


def tokenize_records(
    records: Iterable[Record], tokenizer: Any, *, max_prompt_length: int, max_length: int
) -> TokenizeResult:
    """`tokenize_record` over all records, counting (and logging) truncations."""
    examples = [
        tokenize_record(r, tokenizer, max_prompt_length=max_prompt_length, max_length=max_length)
        for r in records
    ]
    result = TokenizeResult(
        examples=examples,
        n_prompt_truncated=sum(e.prompt_truncated for e in examples),
        n_response_truncated=sum(e.response_truncated for e in examples),
    )
    level = (
        logging.WARNING
        if result.n_prompt_truncated or result.n_response_truncated
        else logging.INFO
    )
    log.log(
        level,
        "tokenised %d records: %d prompts cut to max_prompt_length=%d, %d responses cut to "
        "max_length=%d",
        len(examples),
        result.n_prompt_truncated,
        max_prompt_length,
        result.n_response_truncated,
        max_length,
    )
    return result


# ---------------------------------------------------------------- batching


def _pad(rows: Sequence[Sequence[int]], value: int, *, left: bool) -> torch.Tensor:
    width = max(len(r) for r in rows)
    padded = [
        [value] * (width - len(r)) + list(r) if left else list(r) + [value] * (width - len(r))
        for r in rows
    ]
    return torch.tensor(padded, dtype=torch.long)


def collate(
    examples: Sequence[TokenizedExample], pad_id: int, *, pad_left: bool = False
) -> dict[str, torch.Tensor]:
    """Pad a batch for training (right padding by default).

    Returns:
        input_ids: (B, T) long, padded with pad_id;
        attention_mask: (B, T) long, 1 on real tokens;
        labels: (B, T) long, IGNORE_INDEX on the prompt and on padding (not shifted).
    """
    ids = [e.input_ids for e in examples]
    return {
        "input_ids": _pad(ids, pad_id, left=pad_left),
        "attention_mask": _pad([[1] * len(r) for r in ids], 0, left=pad_left),
        "labels": _pad([e.labels for e in examples], IGNORE_INDEX, left=pad_left),
    }


def prompt_batch(
    prompts_ids: Sequence[Sequence[int]], pad_id: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts for generation, so every row's next token comes at the same position.

    Returns:
        input_ids: (B, T) long; attention_mask: (B, T) long, 0 on the padding.
    """
    return (
        _pad(prompts_ids, pad_id, left=True),
        _pad([[1] * len(p) for p in prompts_ids], 0, left=True),
    )
