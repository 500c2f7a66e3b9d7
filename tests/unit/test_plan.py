"""The planner (§5.5 layer stack, §5.6 options, §6 mutable modes): pure, no mounts."""

from __future__ import annotations

import itertools
import os
import stat
import tempfile
import types
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from overlayctl.errors import OverlayctlError
from overlayctl.images import Image
from overlayctl.plan import (
    MAX_LOWERS,
    MUTABLE_DEFAULT_OPTIONS,
    HierarchyPlan,
    make_plan,
    plan_hierarchy,
    split_options,
)
from overlayctl.settings import CLASSES, MUTABLE_MODES, Settings
from overlayctl.versions import vercmp, version_key

MUT = "var/lib/extensions.mutable"
DEFAULT_FS = {"redirect_dir=on", "metacopy=off", "index=off"}


class PlanTree:
    """A tree for planning tests (no mounts): extensions, a base, mutable dirs."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        os.chmod(path, 0o755)

    def __truediv__(self, rel: str) -> Path:
        return self.path / rel.lstrip("/")

    def __str__(self) -> str:
        return str(self.path)

    def mkdir(self, rel: str, mode: int = 0o755) -> Path:
        p = self / rel
        p.mkdir(parents=True, exist_ok=True)
        os.chmod(p, mode)
        return p

    def file(self, rel: str, text: str = "x") -> Path:
        p = self / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_text(text)
        return p

    def ext(self, name: str, files: tuple[str, ...] = ("opt/e",)) -> Image:
        d = self.mkdir(f"var/lib/extensions/{name}")
        for f in files:
            if f.endswith("/"):
                self.mkdir(f"var/lib/extensions/{name}/{f}")
            else:
                self.file(f"var/lib/extensions/{name}/{f}")
        return Image(name, "directory", str(d), str(d))

    def base(self, mode: int = 0o755) -> Path:
        """A non-empty /opt (marker H)."""
        d = self.mkdir("opt", mode)
        (d / "preexisting-file-in-hierarchy").write_text("H")
        return d

    def mutable(self, name: str = "opt", mode: int = 0o755) -> Path:
        d = self.mkdir(f"{MUT}/{name}", mode)
        (d / "preexisting-file-in-extensions-mutable").write_text("U")
        return d

    def mutable_link(self, target: str, name: str = "opt") -> Path:
        self.mkdir(MUT)
        link = self / f"{MUT}/{name}"
        link.symlink_to(target)
        return link


@pytest.fixture
def root(tmp_path: Path) -> PlanTree:
    return PlanTree(tmp_path / "root")


def mk(root: PlanTree | str, mode: str = "no", *, hierarchies: tuple[str, ...] = ("/opt",),
       cls: str = "sysext", options: str | None = None, noexec: bool | None = None) -> Settings:
    return Settings(root=str(root), cls=CLASSES[cls], hierarchies=hierarchies, mutable=mode,
                    overlay_options=options, noexec=noexec)


def one(root: PlanTree, mode: str, accepted: list[Image], **kw: object) -> HierarchyPlan:
    plans = make_plan(mk(root, mode, **kw), accepted)  # type: ignore[arg-type]
    assert len(plans) == 1
    return plans[0]


def roles(p: HierarchyPlan) -> list[str]:
    return [layer.role for layer in p.lowers]


def paths(p: HierarchyPlan) -> list[str | None]:
    return [layer.path for layer in p.lowers]


def all_opts(p: HierarchyPlan) -> set[str]:
    return set(p.fs_options) | set(p.vfs_options)


# ---------------------------------------------------------------------------------------------
# mode "no"


def test_no_mode_readonly_stack(root: PlanTree) -> None:
    base = root.base()
    e = root.ext("test-extension")
    p = one(root, "no", [e])
    assert p.merge and p.readonly
    assert p.hierarchy == "/opt" and p.target == str(root / "opt")
    assert roles(p) == ["meta", "extension", "base"]
    assert paths(p) == [None, str(root / "var/lib/extensions/test-extension/opt"), str(base)]
    assert p.lowers[1].name == "test-extension"
    assert p.upper_kind is None and p.upperdir is None and p.workdir is None
    assert list(p.fs_options) == []
    assert set(p.vfs_options) == {"ro", "nodev"}
    assert p.base_used
    assert list(p.extensions) == ["test-extension"]


def test_no_mode_ignores_mutable_dir(root: PlanTree) -> None:
    root.base()
    root.mutable()
    p = one(root, "no", [root.ext("e")])
    assert p.readonly and p.mutable_dir is None
    assert roles(p) == ["meta", "extension", "base"]


def test_no_mode_without_content_is_skipped(root: PlanTree) -> None:
    root.base()
    p = one(root, "no", [root.ext("e", ("usr/x",))])
    assert not p.merge
    assert p.skip_reason
    p = one(root, "no", [])
    assert not p.merge


def test_no_mode_ignores_symlink_to_hierarchy(root: PlanTree) -> None:
    root.base()
    root.mutable_link("/opt")
    p = one(root, "no", [root.ext("e")])
    assert p.readonly and roles(p) == ["meta", "extension", "base"]


# ---------------------------------------------------------------------------------------------
# mode "auto"


def test_auto_without_mutable_dir_is_readonly(root: PlanTree) -> None:
    root.base()
    p = one(root, "auto", [root.ext("e")])
    assert p.merge and p.readonly
    assert roles(p) == ["meta", "extension", "base"]
    assert p.mutable_dir is None and not p.create_upper
    assert list(p.fs_options) == [] and "ro" in p.vfs_options


def test_auto_with_mutable_dir(root: PlanTree) -> None:
    root.base()
    m = root.mutable()
    p = one(root, "auto", [root.ext("e")])
    assert not p.readonly
    assert p.upper_kind == "persistent"
    assert p.upperdir == str(m) and p.mutable_dir == str(m)
    assert p.workdir == str(root / f"{MUT}/.systemd-opt-workdir")
    assert not p.create_upper
    assert roles(p) == ["meta", "extension", "base"]
    assert all_opts(p) == DEFAULT_FS | {"noatime", "nodev"}
    assert "ro" not in p.vfs_options


def test_auto_merges_without_extensions(root: PlanTree) -> None:
    root.base()
    root.mutable()
    p = one(root, "auto", [])
    assert p.merge and p.upper_kind == "persistent"
    assert roles(p) == ["meta", "base"]
    assert list(p.extensions) == []


def test_auto_symlink_to_other_dir(root: PlanTree) -> None:
    root.base()
    up = root.mkdir("upperdir")
    root.mutable_link("../../../upperdir")
    p = one(root, "auto", [root.ext("e")])
    assert p.upper_kind == "persistent"
    assert p.upperdir == str(up)
    assert p.workdir == str(root / ".systemd-opt-workdir")


def test_auto_absolute_symlink_resolved_inside_root(root: PlanTree) -> None:
    root.base()
    up = root.mkdir("upperdir")
    root.mutable_link("/upperdir")
    p = one(root, "auto", [root.ext("e")])
    assert p.upperdir == str(up)


def test_auto_dangling_symlink_is_absent(root: PlanTree) -> None:
    root.base()
    root.mutable_link("/should/not/exist/")
    p = one(root, "auto", [root.ext("e")])
    assert p.readonly and p.mutable_dir is None
    assert roles(p) == ["meta", "extension", "base"]


# ---------------------------------------------------------------------------------------------
# mode "yes"


def test_yes_without_mutable_dir_creates_it(root: PlanTree) -> None:
    root.base()
    p = one(root, "yes", [root.ext("e")])
    assert p.upper_kind == "persistent" and p.create_upper
    assert p.upperdir == str(root / f"{MUT}/opt")
    assert p.workdir == str(root / f"{MUT}/.systemd-opt-workdir")
    assert roles(p) == ["meta", "extension", "base"]
    assert all_opts(p) == DEFAULT_FS | {"noatime", "nodev"}


def test_yes_without_mutable_root_at_all(root: PlanTree) -> None:
    root.base()
    p = one(root, "yes", [])
    assert p.create_upper and p.upperdir == str(root / f"{MUT}/opt")


def test_yes_with_mutable_dir(root: PlanTree) -> None:
    root.base()
    m = root.mutable()
    p = one(root, "yes", [root.ext("e")])
    assert p.upper_kind == "persistent" and not p.create_upper
    assert p.upperdir == str(m)


def test_yes_dangling_symlink_creates_target_inside_root(root: PlanTree) -> None:
    root.base()
    root.mutable_link("/elsewhere/up")
    p = one(root, "yes", [root.ext("e")])
    assert p.create_upper
    assert p.upperdir == str(root / "elsewhere/up")
    assert p.workdir == str(root / "elsewhere/.systemd-opt-workdir")


def test_yes_without_extensions_merges(root: PlanTree) -> None:
    p = one(root, "yes", [])
    assert p.merge and p.upper_kind == "persistent"
    assert roles(p) == ["meta"]        # an upper makes a single lower fine


# ---------------------------------------------------------------------------------------------
# mode "import"


def test_import_with_mutable_dir(root: PlanTree) -> None:
    base = root.base()
    m = root.mutable()
    e = root.ext("e")
    p = one(root, "import", [e])
    assert p.readonly
    assert roles(p) == ["meta", "import", "extension", "base"]
    assert paths(p)[1] == str(m) and paths(p)[3] == str(base)
    assert p.mutable_dir == str(m)
    assert list(p.fs_options) == [] and "ro" in p.vfs_options


def test_import_without_mutable_dir(root: PlanTree) -> None:
    root.base()
    p = one(root, "import", [root.ext("e")])
    assert p.readonly and roles(p) == ["meta", "extension", "base"]


def test_import_without_extension_content_still_merges(root: PlanTree) -> None:
    root.base()
    root.mutable()
    p = one(root, "import", [root.ext("e", ("usr/x",))])
    assert p.merge and roles(p) == ["meta", "import", "base"]


def test_import_skips_mode_check(root: PlanTree) -> None:
    root.base(0o755)
    root.mutable(mode=0o700)
    p = one(root, "import", [root.ext("e")])
    assert "import" in roles(p)


def test_import_dangling_symlink_not_imported(root: PlanTree) -> None:
    root.base()
    root.mutable_link("/nope")
    p = one(root, "import", [root.ext("e")])
    assert roles(p) == ["meta", "extension", "base"]


# ---------------------------------------------------------------------------------------------
# ephemeral modes


def test_ephemeral(root: PlanTree) -> None:
    root.base()
    root.mutable()
    p = one(root, "ephemeral", [root.ext("e")])
    assert p.upper_kind == "ephemeral" and not p.readonly
    assert p.upperdir is None and p.workdir is None
    assert p.mutable_dir is None and not p.create_upper
    assert roles(p) == ["meta", "extension", "base"]
    assert all_opts(p) == DEFAULT_FS | {"noatime", "nodev"}
    j = p.as_json()
    assert j["upper"] == "ephemeral" and j["readonly"] is False


def test_ephemeral_skips_mode_check(root: PlanTree) -> None:
    root.base(0o755)
    root.mutable(mode=0o700)
    assert one(root, "ephemeral", [root.ext("e")]).upper_kind == "ephemeral"


def test_ephemeral_ignores_symlink_to_hierarchy(root: PlanTree) -> None:
    base = root.base()
    root.mutable_link("/opt")
    p = one(root, "ephemeral", [root.ext("e")])
    assert p.upper_kind == "ephemeral"
    assert paths(p)[-1] == str(base)


def test_ephemeral_import(root: PlanTree) -> None:
    root.base()
    m = root.mutable()
    p = one(root, "ephemeral-import", [root.ext("e")])
    assert p.upper_kind == "ephemeral" and p.upperdir is None
    assert roles(p) == ["meta", "import", "extension", "base"]
    assert paths(p)[1] == str(m)


def test_ephemeral_import_without_dir(root: PlanTree) -> None:
    root.base()
    p = one(root, "ephemeral-import", [])
    assert p.upper_kind == "ephemeral" and roles(p) == ["meta", "base"]


# ---------------------------------------------------------------------------------------------
# mutable dir = the hierarchy itself (§6.6)


@pytest.mark.parametrize("target", ["/opt", "../../../opt", "/opt/"])
@pytest.mark.parametrize("mode", ["auto", "yes"])
def test_symlink_to_hierarchy_makes_it_the_upper(root: PlanTree, mode: str, target: str) -> None:
    base = root.base()
    root.mutable_link(target)
    p = one(root, mode, [root.ext("e")])
    assert p.upper_kind == "host"
    assert p.upperdir == str(base)
    assert "base" not in roles(p) and not p.base_used
    assert roles(p) == ["meta", "extension"]
    assert p.workdir == str(root / ".systemd-opt-workdir")
    assert not p.create_upper
    assert str(base) not in paths(p)


@pytest.mark.parametrize("target", ["/opt", "../../../opt"])
@pytest.mark.parametrize("mode", ["import", "ephemeral-import"])
def test_symlink_to_hierarchy_imports_it_on_top(root: PlanTree, mode: str, target: str) -> None:
    """Deliberate extension of upstream (which refuses): the real directory becomes the top
    lower layer, above the extensions, and is not also the base."""
    base = root.base()
    root.mutable_link(target)
    p = one(root, mode, [root.ext("e")])
    assert p.self_import
    assert roles(p) == ["meta", "import", "extension"]
    assert paths(p)[1] == str(base) and paths(p).count(str(base)) == 1
    assert not p.base_used
    assert p.upper_kind == ("ephemeral" if mode == "ephemeral-import" else None)
    assert p.upperdir is None and p.workdir is None and not p.create_upper
    assert p.readonly == (mode == "import")
    assert p.as_json()["self_import"] is True


@pytest.mark.parametrize("mode", ["import", "ephemeral-import"])
def test_self_import_sits_above_extensions_and_defaults(root: PlanTree, mode: str) -> None:
    base = root.base()
    root.mutable_link("/opt")
    d = root.mkdir("usr/share/factory/opt")
    (d / "default").write_text("D")
    s = mk(root, mode).replace(defaults={"/opt": "/usr/share/factory/opt"})
    p = make_plan(s, [root.ext("a"), root.ext("b")])[0]
    assert roles(p) == ["meta", "import", "extension", "extension", "defaults"]
    assert [la.name for la in p.lowers if la.role == "extension"] == ["b", "a"]
    assert paths(p)[1] == str(base) and paths(p)[-1] == str(d)


def test_self_import_reads_the_plain_view_of_a_merged_hierarchy(root: PlanTree) -> None:
    """While merged, the hierarchy's path shows the old overlay: the import layer must be
    the plain directory under it (the base view), never the merged path."""
    real = root.base()
    root.mutable_link("/opt")
    view = root.mkdir("plain-view-of-opt")
    (view / "preexisting-file-in-hierarchy").write_text("H")
    plans = make_plan(mk(root, "ephemeral-import"), [root.ext("e")],
                      base_view=lambda t: str(view) if t == str(real) else t)
    p = plans[0]
    assert p.self_import and paths(p)[1] == str(view)
    assert str(real) not in paths(p)


def test_self_import_of_a_missing_hierarchy_is_no_import(root: PlanTree) -> None:
    """A link to a hierarchy that does not exist dangles: nothing to import."""
    root.mutable_link("/opt")
    p = one(root, "import", [root.ext("e")])
    assert not p.self_import and roles(p) == ["meta", "extension"]


def test_import_of_a_separate_dir_is_not_self_import(root: PlanTree) -> None:
    root.base()
    m = root.mutable()
    p = one(root, "import", [root.ext("e")])
    assert not p.self_import
    assert roles(p) == ["meta", "import", "extension", "base"] and paths(p)[1] == str(m)


def test_symlink_to_symlinked_hierarchy(root: PlanTree) -> None:
    # /opt -> /var/opt and the mutable dir -> /var/opt: still "the hierarchy itself"
    real = root.mkdir("var/opt")
    (real / "H").write_text("H")
    (root / "opt").symlink_to("/var/opt")
    root.mutable_link("/var/opt")
    p = one(root, "auto", [root.ext("e")])
    assert p.target == str(real)
    assert p.upper_kind == "host" and p.upperdir == str(real)
    assert p.workdir == str(root / "var/.systemd-opt-workdir")


# ---------------------------------------------------------------------------------------------
# mode check (§6.2)


@pytest.mark.parametrize("mode", ["auto", "yes"])
def test_mode_mismatch_is_an_error(root: PlanTree, mode: str) -> None:
    root.base(0o755)
    root.mutable(mode=0o700)
    with pytest.raises(OverlayctlError, match="0700"):
        one(root, mode, [root.ext("e")])


def test_mode_match_other_than_0755(root: PlanTree) -> None:
    root.base(0o750)
    root.mutable(mode=0o750)
    p = one(root, "auto", [root.ext("e")])
    assert p.top_mode == 0o750 and p.upper_kind == "persistent"


def test_mode_check_against_0755_when_hierarchy_missing(root: PlanTree) -> None:
    root.mutable(mode=0o700)
    with pytest.raises(OverlayctlError):
        one(root, "yes", [root.ext("e")])


def test_mode_check_follows_symlink(root: PlanTree) -> None:
    root.base(0o755)
    root.mkdir("upperdir", 0o711)
    root.mutable_link("/upperdir")
    with pytest.raises(OverlayctlError):
        one(root, "auto", [root.ext("e")])


def test_top_mode_is_hierarchy_mode(root: PlanTree) -> None:
    root.base(0o751)
    assert one(root, "no", [root.ext("e")]).top_mode == 0o751
    assert one(root, "ephemeral", [root.ext("e")]).top_mode == 0o751


def test_mutable_path_not_a_directory(root: PlanTree) -> None:
    root.base()
    root.file(f"{MUT}/opt")
    with pytest.raises(OverlayctlError):
        one(root, "auto", [root.ext("e")])


# ---------------------------------------------------------------------------------------------
# base hierarchy states


def test_missing_hierarchy(root: PlanTree) -> None:
    p = one(root, "no", [root.ext("e")])
    assert p.merge and roles(p) == ["meta", "extension"]
    assert p.top_mode == 0o755 and not p.base_used
    assert p.target == str(root / "opt")


def test_empty_hierarchy_is_not_a_lower(root: PlanTree) -> None:
    root.mkdir("opt")
    p = one(root, "no", [root.ext("e")])
    assert roles(p) == ["meta", "extension"] and not p.base_used


def test_hidden_file_makes_hierarchy_non_empty(root: PlanTree) -> None:
    root.file("opt/.hidden")
    assert "base" in roles(one(root, "no", [root.ext("e")]))


def test_hierarchy_not_a_directory(root: PlanTree) -> None:
    root.file("opt", "not a dir")
    with pytest.raises(OverlayctlError):
        one(root, "no", [root.ext("e")])


def test_symlinked_hierarchy_resolved_inside_root(root: PlanTree) -> None:
    real = root.mkdir("var/opt")
    (real / "H").write_text("H")
    (root / "opt").symlink_to("/var/opt")
    m = root.mutable()              # named after the unresolved path
    p = one(root, "auto", [root.ext("e")])
    assert p.target == str(real)
    assert paths(p)[-1] == str(real)
    assert p.upperdir == str(m)


def test_base_view(root: PlanTree) -> None:
    root.mkdir("opt")                       # the target: looks empty (e.g. merged right now)
    plain = root.mkdir("plain-view")
    (plain / "H").write_text("H")
    p = plan_hierarchy(mk(root, "no"), "/opt", [root.ext("e")],
                       base_view=lambda target: str(plain))
    assert p.target == str(root / "opt")
    assert paths(p)[-1] == str(plain)


# ---------------------------------------------------------------------------------------------
# extensions


def test_extension_without_content_gives_no_layer_but_is_listed(root: PlanTree) -> None:
    root.base()
    a = root.ext("a", ("usr/x",))
    b = root.ext("b", ("opt/",))        # empty opt dir
    c = root.ext("c")
    p = one(root, "no", [a, b, c])
    assert [layer.name for layer in p.lowers if layer.role == "extension"] == ["c"]
    assert list(p.extensions) == ["a", "b", "c"]


def test_extension_hidden_file_is_content(root: PlanTree) -> None:
    p = one(root, "no", [root.ext("e", ("opt/.hidden",))])
    assert roles(p) == ["meta", "extension"]


def test_extension_hierarchy_is_a_file(root: PlanTree) -> None:
    e = root.ext("e", ())
    Path(e.path, "opt").write_text("file")
    with pytest.raises(OverlayctlError):
        one(root, "no", [e])


def test_extension_hierarchy_symlink_resolved_inside_extension(root: PlanTree) -> None:
    e = root.ext("e", ("real-opt/f",))
    Path(e.path, "opt").symlink_to("/real-opt")
    p = one(root, "no", [e])
    assert paths(p)[1] == str(Path(e.path, "real-opt"))


def test_non_directory_images_contribute_no_layer_here(root: PlanTree) -> None:
    raw = Image("r", "raw", str(root.file("var/lib/extensions/r.raw")), "x")
    p = one(root, "no", [raw, root.ext("e")])
    assert [layer.name for layer in p.lowers if layer.role == "extension"] == ["e"]
    assert list(p.extensions) == ["r", "e"]


def test_layer_order_newest_first(root: PlanTree) -> None:
    root.base()
    names = ["foo_1~rc1", "foo_1", "foo_2", "foo_10", "zzz"]
    imgs = sorted((root.ext(n) for n in reversed(names)), key=lambda i: version_key(i.name))
    root.mutable()
    p = one(root, "import", imgs)
    assert roles(p) == ["meta", "import"] + ["extension"] * 5 + ["base"]
    assert [layer.name for layer in p.lowers if layer.role == "extension"] == list(
        reversed(names))
    assert list(p.extensions) == names


def test_every_hierarchy_lists_every_extension(root: PlanTree) -> None:
    a = root.ext("a", ("usr/x",))
    b = root.ext("b", ("opt/y",))
    usr, opt = make_plan(mk(root, "no", hierarchies=("/usr", "/opt")), [a, b])
    assert list(usr.extensions) == list(opt.extensions) == ["a", "b"]
    assert [x.name for x in usr.lowers if x.role == "extension"] == ["a"]
    assert [x.name for x in opt.lowers if x.role == "extension"] == ["b"]


def test_mode_no_skips_only_hierarchies_without_content(root: PlanTree) -> None:
    usr, opt = make_plan(mk(root, "no", hierarchies=("/usr", "/opt")), [root.ext("b")])
    assert not usr.merge and opt.merge


# ---------------------------------------------------------------------------------------------
# single lower ("filler")


@pytest.mark.parametrize("base", ["missing", "empty"])
@pytest.mark.parametrize("mode", ["auto", "import"])
def test_single_lower_readonly_gets_filler(root: PlanTree, mode: str, base: str) -> None:
    if base == "empty":
        root.mkdir("opt")
    p = one(root, mode, [root.ext("e", ("usr/x",))])
    assert p.merge and p.readonly
    assert roles(p) == ["meta", "filler"]
    assert paths(p) == [None, None]


def test_no_filler_with_an_upper(root: PlanTree) -> None:
    assert roles(one(root, "ephemeral", [])) == ["meta"]


def test_no_filler_when_two_lowers(root: PlanTree) -> None:
    root.base()
    assert roles(one(root, "auto", [])) == ["meta", "base"]


# ---------------------------------------------------------------------------------------------
# options


def test_default_options_only_with_upper(root: PlanTree) -> None:
    root.base()
    root.mutable()
    ro = one(root, "no", [root.ext("e")])
    rw = one(root, "auto", [root.ext("e")])
    assert list(ro.fs_options) == [] and set(ro.vfs_options) == {"ro", "nodev"}
    assert set(rw.fs_options) == DEFAULT_FS
    assert set(rw.vfs_options) == {"nodev", "noatime"}
    assert set(split_options(MUTABLE_DEFAULT_OPTIONS)) == DEFAULT_FS | {"noatime"}


def test_env_options_replace_defaults(root: PlanTree) -> None:
    root.base()
    root.mutable()
    p = one(root, "auto", [root.ext("e")], options="relatime,metacopy=on")
    assert list(p.fs_options) == ["metacopy=on"]
    assert "relatime" in p.vfs_options and "noatime" not in p.vfs_options
    assert not any(o.startswith(("redirect_dir", "index")) for o in all_opts(p))


def test_empty_env_options_replace_defaults_with_nothing(root: PlanTree) -> None:
    root.base()
    p = one(root, "ephemeral", [root.ext("e")], options="")
    assert list(p.fs_options) == [] and set(p.vfs_options) == {"nodev"}


def test_env_options_apply_readonly_too(root: PlanTree) -> None:
    root.base()
    p = one(root, "no", [root.ext("e")], options="metacopy=off,noatime")
    assert list(p.fs_options) == ["metacopy=off"]
    assert set(p.vfs_options) == {"ro", "nodev", "noatime"}


def test_env_options_keep_unknown_options(root: PlanTree) -> None:
    p = one(root, "ephemeral", [root.ext("e")], options="userxattr,xino=off")
    assert list(p.fs_options) == ["userxattr", "xino=off"]


@pytest.mark.parametrize("opt", ["lowerdir=/x", "upperdir=/x", "workdir=/x", "lowerdir+=/x",
                                 "datadir+=/x"])
def test_env_options_may_not_set_layers(root: PlanTree, opt: str) -> None:
    with pytest.raises(OverlayctlError):
        one(root, "no", [root.ext("e")], options=f"noatime,{opt}")


def test_split_options_escapes() -> None:
    assert split_options(r"a\,b,c") == ["a,b", "c"]
    assert split_options(",,a,,") == ["a"]
    assert split_options("") == []


@pytest.mark.parametrize("cls,noexec,mode,expected", [
    ("sysext", None, "no", {"ro", "nodev"}),
    ("sysext", True, "no", {"ro", "nodev", "noexec"}),
    ("sysext", False, "no", {"ro", "nodev"}),
    ("sysext", None, "ephemeral", {"nodev"}),
    ("sysext", True, "ephemeral", {"nodev", "noexec"}),
    ("confext", None, "no", {"ro", "nodev", "nosuid", "noexec"}),
    ("confext", False, "no", {"ro", "nodev", "nosuid"}),
    ("confext", True, "no", {"ro", "nodev", "nosuid", "noexec"}),
    ("confext", None, "ephemeral", {"nodev", "nosuid", "noexec"}),
    ("confext", False, "ephemeral", {"nodev", "nosuid"}),
])
def test_vfs_flags(root: PlanTree, cls: str, noexec: bool | None, mode: str,
                   expected: set[str]) -> None:
    h = "/opt" if cls == "sysext" else "/etc"
    d = root.mkdir(f"var/lib/extensions/e/{h}")
    (d / "f").write_text("x")
    img = Image("e", "directory", str(root / "var/lib/extensions/e"), "e")
    (p,) = make_plan(mk(root, mode, cls=cls, hierarchies=(h,), noexec=noexec,
                        options="" if mode == "ephemeral" else None), [img])
    assert set(p.vfs_options) == expected


def test_confext_mutable_paths(root: PlanTree) -> None:
    root.mkdir("etc")
    root.file("etc/hostname", "h")
    e = root.mkdir("var/lib/confexts/c/etc")
    (e / "f").write_text("x")
    img = Image("c", "directory", str(root / "var/lib/confexts/c"), "c")
    (p,) = make_plan(mk(root, "yes", cls="confext", hierarchies=("/etc",)), [img])
    assert p.upperdir == str(root / f"{MUT}/etc")
    assert p.workdir == str(root / f"{MUT}/.systemd-etc-workdir")


def test_nested_hierarchy_name(root: PlanTree) -> None:
    root.mkdir(f"{MUT}/foo.bar")
    p = plan_hierarchy(mk(root, "auto", hierarchies=("/foo/bar",)), "/foo/bar", [])
    assert p.upperdir == str(root / f"{MUT}/foo.bar")
    assert p.workdir == str(root / f"{MUT}/.systemd-foo.bar-workdir")


# ---------------------------------------------------------------------------------------------
# limits, work dir placement, file systems


def test_too_many_layers(root: PlanTree) -> None:
    imgs = sorted((root.ext(f"e{i:03d}") for i in range(MAX_LOWERS)),
                  key=lambda i: version_key(i.name))
    with pytest.raises(OverlayctlError, match="500"):
        one(root, "no", imgs)
    p = one(root, "no", imgs[1:])            # meta + 499 = 500 is still fine
    assert len(p.lowers) == MAX_LOWERS


def test_work_dir_outside_root_refused(root: PlanTree) -> None:
    root.base()
    root.mutable_link("/")            # resolves to the root itself; its parent is outside
    with pytest.raises(OverlayctlError, match="outside"):
        one(root, "auto", [root.ext("e")])


def test_upper_that_is_a_lower_refused(root: PlanTree) -> None:
    root.base()
    e = root.ext("e")
    root.mutable_link("/var/lib/extensions/e/opt")
    with pytest.raises(OverlayctlError):
        one(root, "auto", [e])


def test_mutable_dir_inside_hierarchy_refused(root: PlanTree) -> None:
    base = root.base()
    root.mkdir("opt/upper")
    root.mutable_link("/opt/upper")
    with pytest.raises(OverlayctlError):
        one(root, "auto", [root.ext("e")])
    assert base.exists()


def fake_stat(monkeypatch: pytest.MonkeyPatch, path: str, dev: int) -> None:
    real = os.stat

    def fake(p: object, *a: object, **kw: object) -> object:
        st = real(p, *a, **kw)  # type: ignore[arg-type]
        if isinstance(p, str | Path) and os.path.normpath(str(p)) == os.path.normpath(path):
            return types.SimpleNamespace(st_mode=st.st_mode, st_ino=st.st_ino, st_dev=dev,
                                         st_mtime_ns=st.st_mtime_ns)
        return st

    monkeypatch.setattr(os, "stat", fake)


def test_upper_on_other_fs_than_its_parent(root: PlanTree, monkeypatch: pytest.MonkeyPatch) -> None:
    root.base()
    m = root.mutable()
    e = root.ext("e")
    fake_stat(monkeypatch, str(m), 987654)
    with pytest.raises(OverlayctlError, match="file system"):
        one(root, "auto", [e])


def test_host_upper_on_other_fs_than_its_parent(root: PlanTree,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    base = root.base()
    root.mutable_link("/opt")
    e = root.ext("e")
    fake_stat(monkeypatch, str(base), 987654)
    with pytest.raises(OverlayctlError):
        one(root, "yes", [e])


def test_same_fs_check_not_needed_for_ephemeral(root: PlanTree,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    root.base()
    m = root.mutable()
    e = root.ext("e")
    fake_stat(monkeypatch, str(m), 987654)
    assert one(root, "ephemeral-import", [e]).upper_kind == "ephemeral"


def readonly_fs(monkeypatch: pytest.MonkeyPatch, below: str) -> None:
    real = os.statvfs

    def fake(p: object) -> object:
        r = real(p)  # type: ignore[arg-type]
        if os.path.normpath(str(p)).startswith(os.path.normpath(below)):
            return types.SimpleNamespace(f_flag=r.f_flag | os.ST_RDONLY)
        return r

    monkeypatch.setattr(os, "statvfs", fake)


@pytest.mark.parametrize("mode", ["auto", "yes"])
def test_readonly_upper_refused(root: PlanTree, monkeypatch: pytest.MonkeyPatch, mode: str) -> None:
    root.base()
    m = root.mutable()
    e = root.ext("e")
    readonly_fs(monkeypatch, str(m))
    with pytest.raises(OverlayctlError, match="read-only"):
        one(root, mode, [e])


def test_readonly_hierarchy_as_upper_refused(root: PlanTree,
                                             monkeypatch: pytest.MonkeyPatch) -> None:
    base = root.base()
    root.mutable_link("/opt")
    e = root.ext("e")
    readonly_fs(monkeypatch, str(base))
    with pytest.raises(OverlayctlError):
        one(root, "auto", [e])


def test_readonly_mutable_dir_fine_for_import(root: PlanTree,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    root.base()
    m = root.mutable()
    e = root.ext("e")
    readonly_fs(monkeypatch, str(m))
    assert "import" in roles(one(root, "import", [e]))
    assert "import" in roles(one(root, "ephemeral-import", [e]))


def test_yes_create_checks_nearest_existing_parent(root: PlanTree,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    root.base()
    e = root.ext("e")
    root.mkdir("var/lib")
    readonly_fs(monkeypatch, str(root / "var/lib"))
    with pytest.raises(OverlayctlError):
        one(root, "yes", [e])


def test_as_json_shape(root: PlanTree) -> None:
    root.base()
    root.mutable()
    j = one(root, "import", [root.ext("e")]).as_json()
    assert j["readonly"] is True and j["mode"] == "import"
    assert [x["role"] for x in j["layers"]] == ["meta", "import", "extension", "base"]  # type: ignore[index, union-attr]
    assert j["mode_bits"] == "0755"


# ---------------------------------------------------------------------------------------------
# properties

name_strategy = st.text(alphabet=st.sampled_from(list("abc019._~^-")), min_size=1, max_size=6)
ext_strategy = st.dictionaries(
    name_strategy.filter(lambda n: n not in (".", "..")),
    st.sampled_from(["content", "empty", "none", "other"]), max_size=6)
MUTABLE_STATES = ["absent", "dir", "to-hierarchy", "dangling", "to-other"]


def build(tmp: str, exts: dict[str, str], mstate: str, base: str) -> tuple[PlanTree, list[Image]]:
    r = PlanTree(Path(tmp) / "root")
    if base != "missing":
        r.mkdir("opt")
        if base == "full":
            r.file("opt/H")
    imgs = []
    for name, content in exts.items():
        files = {"content": ("opt/e",), "empty": ("opt/",), "none": (), "other": ("usr/x",)}
        imgs.append(r.ext(name, files[content]))
    if mstate == "dir":
        r.mutable()
    elif mstate == "to-hierarchy":
        if base == "missing":
            r.mkdir("opt")
        r.mutable_link("/opt")
    elif mstate == "dangling":
        r.mutable_link("/should/not/exist")
    elif mstate == "to-other":
        r.mkdir("upperdir")
        r.mutable_link("/upperdir")
    return r, sorted(imgs, key=lambda i: version_key(i.name))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(exts=ext_strategy, mode=st.sampled_from(MUTABLE_MODES),
       mstate=st.sampled_from(MUTABLE_STATES), base=st.sampled_from(["missing", "empty", "full"]))
def test_planner_properties(exts: dict[str, str], mode: str, mstate: str, base: str) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        r, imgs = build(tmp, exts, mstate, base)
        # This setup cannot fail (all modes 0755, one file system).
        (p,) = make_plan(mk(r, mode), imgs)
        # A mutable dir that is the hierarchy itself is imported exactly once, as the import
        # layer (overlayctl's extension of upstream, which refuses it).
        assert p.self_import == (mode in ("import", "ephemeral-import")
                                 and mstate == "to-hierarchy")
        if p.self_import:
            assert paths(p).count(str(r / "opt")) == 1 and "base" not in roles(p)
        contributing = [n for n, c in exts.items() if c == "content"]

        if not p.merge:
            assert mode == "no" and not contributing
            return
        assert mode != "no" or contributing

        # meta is always the top lower, and only once
        assert p.lowers[0].role == "meta"
        assert roles(p).count("meta") == 1
        # no layer appears twice
        real = [x for x in paths(p) if x is not None]
        assert len(real) == len(set(real))
        assert len({os.path.realpath(x) for x in real}) == len(real)
        # the upper is never a lower
        if p.upperdir is not None:
            assert os.path.realpath(p.upperdir) not in {os.path.realpath(x) for x in real}
        # import right below meta, base at the bottom
        if "import" in roles(p):
            assert roles(p).index("import") == 1
            assert mode in ("import", "ephemeral-import")
        if "base" in roles(p):
            assert roles(p)[-1] == "base"
            assert base == "full" or (mstate == "to-hierarchy" and base != "missing")
            assert not p.self_import
        # extensions: exactly the contributing ones, newest (by version) first
        ext_names = [x.name for x in p.lowers if x.role == "extension"]
        assert sorted(ext_names) == sorted(contributing)
        for newer, older in itertools.pairwise(ext_names):
            assert vercmp(newer, older) >= 0   # "0" and "00" are the same version
        assert list(p.extensions) == [i.name for i in imgs]
        # read-only exactly when no upper was determined
        expect_upper = (mode in ("yes", "ephemeral", "ephemeral-import")
                        or (mode == "auto" and mstate in ("dir", "to-hierarchy", "to-other")))
        assert (not p.readonly) == expect_upper
        if p.readonly:
            assert len(p.lowers) >= 2 and "ro" in p.vfs_options
            assert p.workdir is None
        else:
            assert "ro" not in p.vfs_options and "filler" not in roles(p)
        if p.upper_kind == "host":
            assert "base" not in roles(p)
        if p.upper_kind in ("persistent", "host"):
            assert p.workdir is not None
            assert os.path.dirname(p.workdir) == os.path.dirname(p.upperdir.rstrip("/"))
            assert os.path.basename(p.workdir) == ".systemd-opt-workdir"
        assert len(p.lowers) <= MAX_LOWERS
        assert stat.S_IMODE(p.top_mode) == p.top_mode
