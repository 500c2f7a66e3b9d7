"""Path resolution inside a root directory, following symlinks the way the kernel
would if the root were '/': absolute link targets and '..' never leave the root."""

from __future__ import annotations

import os
import stat

MAX_LINKS = 40


def chase(root: str, path: str, *, must_exist: bool = False) -> str | None:
    """Resolve PATH (absolute, as seen from inside ROOT) to a host path below ROOT.

    Symlinks are followed with ROOT as the boundary. A path whose last existing component
    is followed by missing ones resolves to the joined path (it may be created there);
    with must_exist, a missing path (or a dangling symlink) gives None."""
    found, _ = _chase(root, path, must_exist)
    return found


def chase_strict(root: str, path: str) -> str:
    """chase(must_exist=True), with the reason as OSError when PATH cannot be resolved:
    ENOENT (missing, or a dangling symlink), ELOOP (too many symlinks), ENOTDIR (a
    component that is no directory)."""
    found, err = _chase(root, path, True)
    if found is None:
        raise OSError(err, os.strerror(err), os.path.join(root, path.lstrip("/")))
    return found


def _chase(root: str, path: str, must_exist: bool) -> tuple[str | None, int]:
    import errno
    root = os.path.abspath(root)
    todo = [c for c in path.split("/") if c and c != "."]
    todo.reverse()
    done = root
    links = 0
    while todo:
        comp = todo.pop()
        if comp == "..":
            if done != root:
                done = os.path.dirname(done)
            continue
        nxt = os.path.join(done, comp)
        try:
            st = os.lstat(nxt)
        except FileNotFoundError:
            if must_exist:
                return None, errno.ENOENT
            rest = [comp, *reversed(todo)]
            return os.path.join(done, *rest), 0
        except NotADirectoryError:
            return None, errno.ENOTDIR
        if stat.S_ISLNK(st.st_mode):
            links += 1
            if links > MAX_LINKS:
                return None, errno.ELOOP
            target = os.readlink(nxt)
            parts = [c for c in target.split("/") if c and c != "."]
            todo.extend(reversed(parts))
            if target.startswith("/"):
                done = root
            continue
        done = nxt
    return done, 0


def inside(root: str, path: str) -> str:
    """The path as seen from inside root ('/' based)."""
    rel = os.path.relpath(path, root)
    return "/" if rel == "." else "/" + rel


def is_empty_dir(path: str) -> bool:
    with os.scandir(path) as it:
        return next(it, None) is None


def single_component(hierarchy: str) -> str:
    """'/usr' -> 'usr', '/foo/bar' -> 'foo.bar' (upstream's name for mutable and work dirs)."""
    return hierarchy.strip("/").replace("/", ".")
