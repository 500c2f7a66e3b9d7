"""The refresh-skip identity of an extension (engine.origin_of): a verity image is known by
its root hash, anything else by its file (inode, device, mtime)."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from overlayctl.engine import origin_of
from overlayctl.images import Image
from overlayctl.settings import load_settings
from overlayctl.verity import Protection


def _image(path: Path, root_hash: str | None, kind: str = "verity") -> Image:
    prot = Protection(kind, "root", root_hash, None, "*")
    return Image(path.stem, "raw", "/proc/self/fd/99", str(path), source=str(path),
                 protection=prot)


def _origin(root: Path, *imgs: Image) -> object:
    s = load_settings(str(root), "sysext")
    return origin_of(s, [], list(imgs)).to_json()


def test_verity_image_is_known_by_its_root_hash(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ext = root / "var/lib/extensions"
    ext.mkdir(parents=True)
    a = ext / "a.raw"
    a.write_bytes(b"x" * 4096)
    rh = "ab" * 32
    before = _origin(root, _image(a, rh))
    # The same image copied over itself (new inode, new mtime): no change.
    shutil.copy(a, tmp_path / "copy")
    a.unlink()
    shutil.copy(tmp_path / "copy", a)
    os.utime(a, (1, 1))
    assert _origin(root, _image(a, rh)) == before
    # Another root hash, or the same one now signed: a change.
    assert _origin(root, _image(a, "cd" * 32)) != before
    assert _origin(root, _image(a, rh, "signed")) != before


def test_unprotected_image_is_known_by_its_file(tmp_path: Path) -> None:
    root = tmp_path / "root"
    ext = root / "var/lib/extensions"
    ext.mkdir(parents=True)
    a = ext / "a.raw"
    a.write_bytes(b"x" * 4096)
    before = _origin(root, _image(a, None, "unprotected"))
    os.utime(a, (1, 1))
    assert _origin(root, _image(a, None, "unprotected")) != before
