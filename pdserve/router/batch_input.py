"""A batch's input file: JSONL lines `{"custom_id", "method": "POST", "url", "body"}`.

`check_input` reads the whole file once while the batch is `validating` and returns OpenAI's
error objects for a malformed one (the batch then fails); `iter_input` reads it again, a line at a
time, while the batch runs. Neither holds the file in memory. Lines are numbered from 1 as in the
file; blank lines are skipped. A line whose body the endpoint refuses is not malformed: that is
found when it runs, and answered in the error file.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

MAX_LINES = 50_000  # OpenAI's limit on requests in one batch
MAX_REPORTED_ERRORS = 100


@dataclass(frozen=True)
class InputLine:
    line: int  # 1-based line number in the file
    custom_id: str
    body: dict[str, Any]


class LineError(ValueError):
    """A malformed line: OpenAI's error `code` and a message naming the line."""

    def __init__(self, code: str, message: str, line: int) -> None:
        super().__init__(message)
        self.code = code
        self.line = line

    def to_api(self) -> dict[str, Any]:
        return {"code": self.code, "message": str(self), "param": None, "line": self.line}


class InputCheck(NamedTuple):
    num_lines: int  # well-formed lines
    errors: list[dict[str, Any]]  # OpenAI's batch error objects; empty when the file is good


def _numbered_lines(path: Path) -> Iterator[tuple[int, bytes]]:
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if raw.strip():
                yield number, raw


def parse_line(raw: bytes, number: int, endpoint: str) -> InputLine:
    """One line, checked; LineError when it is malformed."""
    try:
        item = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise LineError(
            "invalid_json_line", f"line {number} is not valid JSON: {e}", number
        ) from None
    if not isinstance(item, dict):
        raise LineError("invalid_json_line", f"line {number} is not a JSON object", number)
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("missing_custom_id", f"line {number} has no custom_id string", number)
    if item.get("method") != "POST":
        raise LineError(
            "invalid_method",
            f"line {number}: method={item.get('method')!r}: expected 'POST'",
            number,
        )
    if item.get("url") != endpoint:
        raise LineError(
            "mismatched_url",
            f"line {number}: url={item.get('url')!r} differs from the batch's endpoint {endpoint!r}",
            number,
        )
    body = item.get("body")
    if not isinstance(body, dict):
        raise LineError("invalid_body", f"line {number}: body must be a JSON object", number)
    return InputLine(number, custom_id, body)


def check_input(path: Path, endpoint: str, max_lines: int = MAX_LINES) -> InputCheck:
    """Every line of the file checked: how many are good, and the errors of the bad ones."""
    errors: list[LineError] = []
    seen: set[str] = set()
    num_lines = 0
    for number, raw in _numbered_lines(path):
        try:
            line = parse_line(raw, number, endpoint)
        except LineError as e:
            errors.append(e)
            continue
        if line.custom_id in seen:
            message = f"line {number}: custom_id {line.custom_id!r} is used by an earlier line"
            errors.append(LineError("duplicate_custom_id", message, number))
            continue
        seen.add(line.custom_id)
        num_lines += 1
    if num_lines > max_lines:
        message = f"the file has {num_lines} requests: expected at most {max_lines}"
        errors.append(LineError("too_many_requests", message, 0))
    if num_lines == 0 and not errors:
        errors.append(LineError("empty_file", "the input file has no requests", 0))
    reported = [e.to_api() for e in errors[:MAX_REPORTED_ERRORS]]
    for item in reported:
        if item["line"] == 0:
            item["line"] = None
    return InputCheck(num_lines, reported)


def iter_input(path: Path, endpoint: str) -> Iterator[InputLine]:
    """The lines of a file `check_input` passed, in order."""
    for number, raw in _numbered_lines(path):
        yield parse_line(raw, number, endpoint)
