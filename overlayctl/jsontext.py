"""JSON text for the files a merge writes (origin, merge records, manifests), without the
json module: importing it pulls in re and enum, several milliseconds at every boot for a few
small records. It writes what json.dumps(value, sort_keys=True, separators=(",", ":"))
writes (ASCII only, as ensure_ascii does), for the types the records hold: dict with str
keys, list, tuple, str, int, bool and None; tests/unit/test_jsontext.py checks that it is
the same text. loads() reads JSON with the json module's own C scanner (_json), which needs
neither re nor enum, and leaves anything it cannot read to json.loads: a refresh of a merged
hierarchy and status read records at every call."""

from __future__ import annotations

TYPE_CHECKING = False  # the typing module costs start-up time; only mypy needs it
if TYPE_CHECKING:
    from typing import Any

_SHORT = {'"': '\\"', "\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t", "\b": "\\b",
          "\f": "\\f"}


def _string(s: str) -> str:
    if s.isascii() and s.isprintable() and '"' not in s and "\\" not in s:
        return '"' + s + '"'
    out = ['"']
    for ch in s:
        short = _SHORT.get(ch)
        if short is not None:
            out.append(short)
        elif " " <= ch <= "~":
            out.append(ch)
        else:
            o = ord(ch)
            if o > 0xFFFF:
                o -= 0x10000
                out.append(f"\\u{0xD800 | (o >> 10):04x}\\u{0xDC00 | (o & 0x3FF):04x}")
            else:
                out.append(f"\\u{o:04x}")
    out.append('"')
    return "".join(out)


def dumps(value: Any) -> str:
    """VALUE as compact JSON with sorted keys."""
    if value is None:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, int):
        return str(int(value))
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(dumps(v) for v in value) + "]"
    if isinstance(value, dict):
        for k in value:
            if not isinstance(k, str):
                raise TypeError(f"JSON keys must be strings, not {type(k).__name__}")
        return "{" + ",".join(_string(k) + ":" + dumps(value[k]) for k in sorted(value)) + "}"
    raise TypeError(f"not serialisable as JSON: {type(value).__name__}")


class _Context:
    """What _json.make_scanner reads off a json.JSONDecoder: json.loads's defaults."""

    strict = True
    object_hook = None
    object_pairs_hook = None
    parse_float = float
    parse_int = int
    parse_constant = {"-Infinity": float("-inf"), "Infinity": float("inf"),
                      "NaN": float("nan")}.__getitem__


_WS = " \t\n\r"


def loads(text: str) -> Any:
    """json.loads(TEXT): the same value, or the same error (ValueError)."""
    try:
        from _json import make_scanner
        scan = make_scanner(_Context())  # type: ignore[arg-type]  # duck-typed decoder
        value, end = scan(text, len(text) - len(text.lstrip(_WS)))
    except (ImportError, StopIteration, ValueError, TypeError):
        value, end = None, -1
    if end < 0 or text[end:].strip(_WS):
        import json  # invalid JSON, or no C scanner: json says what is wrong
        return json.loads(text)
    return value
