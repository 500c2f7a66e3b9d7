"""JSON text for the files a merge writes (origin, merge records, manifests), without the
json module: importing it pulls in re and enum, several milliseconds at every boot for a few
small records. It writes what json.dumps(value, sort_keys=True, separators=(",", ":"))
writes (ASCII only, as ensure_ascii does), for the types the records hold: dict with str
keys, list, tuple, str, int, bool and None; tests/unit/test_jsontext.py checks that it is
the same text. Reading stays with the json module (status and the local verbs)."""

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
