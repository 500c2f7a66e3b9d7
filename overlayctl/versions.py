"""Version comparison as in the UAPI version format specification (systemd's
strverscmp_improved): segments of digits compare numerically, letters by bytes,
'~' sorts before everything, '-' before '^' and '.', more segments are newer."""

from __future__ import annotations

_VALID_EXTRA = "~-^."


def _valid(c: str) -> bool:
    return (c.isascii() and c.isalnum()) or c in _VALID_EXTRA


def _cmp(x: int | str | bytes | bool, y: int | str | bytes | bool) -> int:
    return (x > y) - (x < y)  # type: ignore[operator]


def vercmp(a: str, b: str) -> int:
    """-1, 0 or 1 as a sorts before, equal to or after b."""
    i = j = 0
    la, lb = len(a), len(b)
    while True:
        while i < la and not _valid(a[i]):
            i += 1
        while j < lb and not _valid(b[j]):
            j += 1
        ca = a[i] if i < la else ""
        cb = b[j] if j < lb else ""
        # '~' sorts before everything (even the end); then the end; then '-' < '^' < '.'.
        for sep in ("~", "", "-", "^", "."):
            if not sep:
                if not ca or not cb:
                    return _cmp(a[i:].encode(), b[j:].encode())
                continue
            if ca == sep or cb == sep:
                r = _cmp(ca != sep, cb != sep)
                if r:
                    return r
                i += 1
                j += 1
                ca = a[i] if i < la else ""
                cb = b[j] if j < lb else ""
        if (ca.isdigit() and ca.isascii()) or (cb.isdigit() and cb.isascii()):
            ii, jj = i, j
            while ii < la and a[ii].isascii() and a[ii].isdigit():
                ii += 1
            while jj < lb and b[jj].isascii() and b[jj].isdigit():
                jj += 1
            # A numeric segment (even "0") is newer than none at all.
            r = _cmp(ii != i, jj != j)
            if r:
                return r
            while i < ii and a[i] == "0":
                i += 1
            while j < jj and b[j] == "0":
                j += 1
            r = _cmp(ii - i, jj - j) or _cmp(a[i:ii], b[j:jj])
            if r:
                return r
        else:
            ii, jj = i, j
            while ii < la and a[ii].isascii() and a[ii].isalpha():
                ii += 1
            while jj < lb and b[jj].isascii() and b[jj].isalpha():
                jj += 1
            n = min(ii - i, jj - j)
            r = _cmp(a[i:i + n].encode(), b[j:j + n].encode()) or _cmp(ii - i, jj - j)
            if r:
                return r
        i, j = ii, jj


class version_key:
    """A sort key that orders version strings by vercmp (functools.cmp_to_key, without
    importing functools at boot)."""

    __slots__ = ("v",)

    def __init__(self, v: str) -> None:
        self.v = v

    def __lt__(self, other: version_key) -> bool:
        return vercmp(self.v, other.v) < 0

    def __gt__(self, other: version_key) -> bool:
        return vercmp(self.v, other.v) > 0

    def __le__(self, other: version_key) -> bool:
        return vercmp(self.v, other.v) <= 0

    def __ge__(self, other: version_key) -> bool:
        return vercmp(self.v, other.v) >= 0

    def __eq__(self, other: object) -> bool:
        return isinstance(other, version_key) and vercmp(self.v, other.v) == 0

    __hash__ = None  # type: ignore[assignment]
