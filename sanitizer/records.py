"""The package's own JSON records (run.json, stats markers, decoder.json) read back as checked
objects: a file damaged or edited by hand is then one clear message naming what is wrong, however
deep the code that would have tripped over it."""

from __future__ import annotations

import json
from pathlib import Path


class RecordError(ValueError):
    """Why a record cannot be used; callers name the file and say what to do."""


def read_object(path: Path) -> dict:
    """The JSON object in `path`; RecordError when it is not valid JSON or not an object."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise RecordError(f"not valid JSON ({e})") from None
    return parse_object(text)


def parse_object(text: str) -> dict:
    """The JSON object in `text`; RecordError when it is not valid JSON or not an object."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise RecordError(f"not valid JSON ({e})") from None
    if not isinstance(value, dict):
        raise RecordError(f"a JSON {type(value).__name__}, not an object")
    return value


def check_fields(record: dict, required: dict[str, type | tuple], optional: dict[str, type | tuple]) -> None:
    """RecordError naming the first dotted field ("a.b") that is missing (when required) or of
    another type than given."""
    for name, kind in (required | optional).items():
        value = lookup(record, name)
        if (value is not None or name in required) and not isinstance(value, kind):
            names = kind.__name__ if isinstance(kind, type) else " or ".join(k.__name__ for k in kind)
            raise RecordError(f"{name} is {type(value).__name__}, not {names}")


def lookup(record: dict, dotted: str) -> object:
    """record["a"]["b"] for "a.b"; None where any step is missing or not an object."""
    for key in dotted.split("."):
        record = record.get(key) if isinstance(record, dict) else None
    return record
