"""extension-release parsing, lookup inside an image (§4.1) and the compatibility
rules (§4.3)."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from overlayctl import release
from overlayctl.errors import OverlayctlError
from overlayctl.release import (
    check_compatible,
    find_extension_release,
    parse_boolean,
    parse_env_file,
    parse_env_text,
    valid_image_name,
)
from overlayctl.settings import CONFEXT, SYSEXT

STRICT = "user.extension-release.strict"

# ---------------------------------------------------------------------------------------------
# parse_env_text


def test_plain_and_quoted_values() -> None:
    env = parse_env_text(
        "ID=fedora\n"
        'NAME="Fedora Linux"\n'
        "PRETTY_NAME='Fedora Linux 40'\n"
        'ID_LIKE="rhel centos"\n'
        'EMPTY=""\n'
        "BARE=\n")
    assert env == {"ID": "fedora", "NAME": "Fedora Linux", "PRETTY_NAME": "Fedora Linux 40",
                   "ID_LIKE": "rhel centos", "EMPTY": "", "BARE": ""}


def test_quoted_whitespace_is_kept() -> None:
    assert parse_env_text('A="a  b"\n')["A"] == "a  b"
    assert parse_env_text("A=' x '\n")["A"] == " x "


def test_double_quote_escapes() -> None:
    env = parse_env_text(r'A="say \"hi\""' "\n"
                         r'B="back\\slash"' "\n"
                         r'E="keep \n and \x"' "\n")
    assert env["A"] == 'say "hi"'
    assert env["B"] == "back\\slash"
    assert env["E"] == r"keep \n and \x"      # other escapes keep their backslash, as in sh


def test_double_quote_escapes_dollar_and_backtick() -> None:
    env = parse_env_text(r'C="cost \$5"' "\n" r'D="tick \`x\`"' "\n")
    assert env["C"] == "cost $5"
    assert env["D"] == "tick `x`"


def test_single_quotes_are_literal() -> None:
    env = parse_env_text("A='no \\escape \"here\"'\n")
    assert env["A"] == 'no \\escape "here"'


def test_unquoted_backslash_escape() -> None:
    assert parse_env_text("A=a\\ b\n")["A"] == "a b"
    assert parse_env_text("A=a\\$b\n")["A"] == "a$b"


def test_special_chars_inside_quotes() -> None:
    assert parse_env_text('A="x#y;z=w"\n')["A"] == "x#y;z=w"


def test_comments_and_blank_lines() -> None:
    env = parse_env_text("# comment\n; also a comment\n\n   \n  # indented=comment\nID=x\n")
    assert env == {"ID": "x"}


def test_whitespace_around_key_and_value() -> None:
    env = parse_env_text("  ID = debian  \n")
    assert env == {"ID": "debian"}


def test_last_assignment_wins() -> None:
    assert parse_env_text("ID=a\nID=b\n") == {"ID": "b"}


@pytest.mark.parametrize("line", ["NOEQUALS", "=value", "1KEY=x", "KEY WITH SPACE=x",
                                  "KEY-DASH=x", "KÉY=x"])
def test_malformed_lines_are_skipped(line: str) -> None:
    env = parse_env_text(f"BEFORE=1\n{line}\nAFTER=2\n")
    assert env == {"BEFORE": "1", "AFTER": "2"}


def test_unterminated_quote_runs_to_the_end_of_the_file() -> None:
    """As systemd's env-file reader: a quote may span lines, so an unclosed one takes the rest
    of the file, newlines included; `ID="_any` is then the ID "_any\\n", which matches no
    host (upstream: "Extension ... is for OS '_any\\n'")."""
    env = parse_env_text('A="unterminated\nB=fine\n')
    assert env == {"A": "unterminated\nB=fine\n"}
    assert parse_env_text('ID="_any\n') == {"ID": "_any\n"}
    assert parse_env_text("ID='_any") == {"ID": "_any"}


def test_parse_env_file(tmp_path: Path) -> None:
    p = tmp_path / "os-release"
    p.write_text('ID=testtest\nID_LIKE="foobar test_alike something-else"\nVERSION=1.2.3\n')
    assert parse_env_file(str(p)) == {"ID": "testtest",
                                      "ID_LIKE": "foobar test_alike something-else",
                                      "VERSION": "1.2.3"}


@pytest.mark.parametrize("text,value", [
    ("1", True), ("yes", True), ("y", True), ("true", True), ("t", True), ("on", True),
    ("YES", True), ("True", True), ("On", True),
    ("0", False), ("no", False), ("n", False), ("false", False), ("f", False), ("off", False),
    ("NO", False), ("False", False), ("OFF", False),
    ("", None), ("2", None), ("enabled", None), ("disabled", None), ("yess", None),
])
def test_parse_boolean(text: str, value: bool | None) -> None:
    assert parse_boolean(text) is value


@pytest.mark.parametrize("name,ok", [
    ("foo", True), (".foo", True), ("a:b,c", True), ("foo_1.2", True), ("x" * 255, True),
    ("", False), (".", False), ("..", False), ("a/b", False), ("x" * 256, False),
    (".#foo", False), (".#foo.lck", False), ("a\tb", False), ("a\x7fb", False),
    ("\udcff", False),
])
def test_valid_image_name(name: str, ok: bool) -> None:
    assert valid_image_name(name) is ok


# ---------------------------------------------------------------------------------------------
# find_extension_release


def release_dir(image: Path, cls: str = "sysext") -> Path:
    d = image / ("usr/lib/extension-release.d" if cls == "sysext" else "etc/extension-release.d")
    d.mkdir(parents=True, exist_ok=True)
    return d


def put(image: Path, suffix: str, text: str = "ID=_any\n", cls: str = "sysext") -> Path:
    p = release_dir(image, cls) / f"extension-release.{suffix}"
    p.write_text(text)
    return p


@pytest.fixture
def xattr_ok(tmp_path: Path) -> None:
    probe = tmp_path / ".xattr-probe"
    probe.write_text("")
    try:
        os.setxattr(probe, STRICT, b"0")
    except OSError as e:
        if e.errno in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
            pytest.skip("file system of tmp_path has no user xattrs")
        raise
    finally:
        probe.unlink()


def test_exact_name(tmp_path: Path) -> None:
    p = put(tmp_path, "foo", "ID=_any\nSYSEXT_LEVEL=1\n")
    r = find_extension_release(str(tmp_path), "foo", SYSEXT)
    assert r.path == str(p)
    assert r.data == {"ID": "_any", "SYSEXT_LEVEL": "1"}


def test_confext_looks_under_etc(tmp_path: Path) -> None:
    put(tmp_path, "foo", cls="sysext")
    assert find_extension_release(str(tmp_path), "foo", CONFEXT).path is None
    p = put(tmp_path, "foo", "ID=_any\nCONFEXT_LEVEL=2\n", cls="confext")
    r = find_extension_release(str(tmp_path), "foo", CONFEXT)
    assert r.path == str(p)
    assert r.data["CONFEXT_LEVEL"] == "2"


def test_no_release_dir(tmp_path: Path) -> None:
    r = find_extension_release(str(tmp_path), "foo", SYSEXT)
    assert r.path is None and r.data == {}


def test_other_name_is_not_accepted(tmp_path: Path) -> None:
    put(tmp_path, "bar")
    assert find_extension_release(str(tmp_path), "foo", SYSEXT).path is None


@pytest.mark.parametrize("image_name", ["foo_1.2", "foo+3", "foo_1.2+3-1", "foo_1.2.raw",
                                        "foo_1.2.sysext.raw", "foo_x86-64_1"])
def test_version_suffix_is_cut(tmp_path: Path, image_name: str) -> None:
    p = put(tmp_path, "foo")
    assert find_extension_release(str(tmp_path), image_name, SYSEXT).path == str(p)


def test_cut_is_not_a_prefix_match(tmp_path: Path) -> None:
    put(tmp_path, "fo")
    put(tmp_path, "foo_2")        # not the cut name "foo", and not the exact name
    put(tmp_path, "foobar")
    assert find_extension_release(str(tmp_path), "foo_1", SYSEXT).path is None


def test_exact_name_beats_other_candidates(tmp_path: Path) -> None:
    exact = put(tmp_path, "foo_1.2")
    put(tmp_path, "foo")          # would match the cut name too
    assert find_extension_release(str(tmp_path), "foo_1.2", SYSEXT).path == str(exact)


def test_directory_named_like_release_file_is_ignored(tmp_path: Path) -> None:
    (release_dir(tmp_path) / "extension-release.foo").mkdir()
    assert find_extension_release(str(tmp_path), "foo_1", SYSEXT).path is None


@pytest.mark.usefixtures("xattr_ok")
@pytest.mark.parametrize("value", [b"0", b"false", b"no", b"off", b"FALSE", b"n"])
def test_strict_xattr_false_accepts_any_name(tmp_path: Path, value: bytes) -> None:
    p = put(tmp_path, "totally-different")
    os.setxattr(p, STRICT, value)
    r = find_extension_release(str(tmp_path), "foo", SYSEXT)
    assert r.path == str(p)
    assert r.data == {"ID": "_any"}


@pytest.mark.usefixtures("xattr_ok")
@pytest.mark.parametrize("value", [b"1", b"true", b"yes", b"garbage", b""])
def test_strict_xattr_true_or_bad_rejects(tmp_path: Path, value: bytes) -> None:
    p = put(tmp_path, "totally-different")
    os.setxattr(p, STRICT, value)
    assert find_extension_release(str(tmp_path), "foo", SYSEXT).path is None


def test_strict_xattr_missing_rejects(tmp_path: Path) -> None:
    put(tmp_path, "totally-different")
    assert find_extension_release(str(tmp_path), "foo", SYSEXT).path is None


@pytest.mark.usefixtures("xattr_ok")
def test_strict_xattr_true_does_not_hurt_a_cut_name_match(tmp_path: Path) -> None:
    p = put(tmp_path, "foo")
    os.setxattr(p, STRICT, b"1")
    assert find_extension_release(str(tmp_path), "foo_1", SYSEXT).path == str(p)


@pytest.mark.usefixtures("xattr_ok")
def test_more_than_one_candidate_is_an_error(tmp_path: Path) -> None:
    put(tmp_path, "foo")
    other = put(tmp_path, "other")
    os.setxattr(other, STRICT, b"0")
    with pytest.raises(OverlayctlError):
        find_extension_release(str(tmp_path), "foo_1", SYSEXT)


@pytest.mark.usefixtures("xattr_ok")
def test_two_xattr_candidates_are_an_error(tmp_path: Path) -> None:
    for n in ("a", "b"):
        os.setxattr(put(tmp_path, n), STRICT, b"0")
    with pytest.raises(OverlayctlError):
        find_extension_release(str(tmp_path), "foo", SYSEXT)


@pytest.mark.usefixtures("xattr_ok")
def test_candidate_with_invalid_name_is_ignored(tmp_path: Path) -> None:
    p = put(tmp_path, ".#foo")
    os.setxattr(p, STRICT, b"0")
    assert find_extension_release(str(tmp_path), "foo", SYSEXT).path is None


def test_release_dir_resolved_inside_image(tmp_path: Path) -> None:
    # usr/lib is an absolute symlink: it must be followed inside the image, not on the host.
    img = tmp_path / "img"
    (img / "real/extension-release.d").mkdir(parents=True)
    (img / "real/extension-release.d/extension-release.foo").write_text("ID=_any\n")
    (img / "usr").mkdir()
    (img / "usr/lib").symlink_to("/real")
    r = find_extension_release(str(img), "foo", SYSEXT)
    assert r.path is not None and r.data == {"ID": "_any"}


# ---------------------------------------------------------------------------------------------
# check_compatible (§4.3)

HOST = {"ID": "testtest", "ID_LIKE": "foobar test_alike something-else", "VERSION_ID": "40"}


@pytest.fixture(autouse=True)
def fixed_arch(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(release, "uname_architecture", lambda: "x86-64")


def ok(ext: dict[str, str] | None, host: dict[str, str] | None = None, *, cls: object = SYSEXT,
       scope: str = "system") -> bool:
    return check_compatible(ext, HOST if host is None else host, cls,  # type: ignore[arg-type]
                            scope, "img") is None


def test_rule1_no_release_data() -> None:
    assert check_compatible(None, HOST, SYSEXT, "system", "img")
    assert not ok(None)


@pytest.mark.parametrize("scope_field,host_scope,accepted", [
    (None, "system", True),
    (None, "portable", True),
    (None, "initrd", False),
    ("initrd", "system", False),
    ("initrd", "initrd", True),
    ("system initrd", "initrd", True),
    ("system\tinitrd", "initrd", True),
    ("  system   portable ", "system", True),
    ("portable", "system", False),
    ("", "system", False),
    ("System", "system", False),
])
def test_rule2_scope(scope_field: str | None, host_scope: str, accepted: bool) -> None:
    ext = {"ID": "_any"}
    if scope_field is not None:
        ext["SYSEXT_SCOPE"] = scope_field
    assert ok(ext, scope=host_scope) is accepted


def test_rule2_confext_uses_confext_scope() -> None:
    assert not ok({"ID": "_any", "CONFEXT_SCOPE": "initrd"}, cls=CONFEXT)
    assert ok({"ID": "_any", "SYSEXT_SCOPE": "initrd"}, cls=CONFEXT)
    assert ok({"ID": "_any", "CONFEXT_SCOPE": "initrd"}, cls=CONFEXT, scope="initrd")


def test_rule2_scope_checked_before_id_any() -> None:
    assert not ok({"ID": "_any"}, scope="initrd")


@pytest.mark.parametrize("arch,accepted", [
    (None, True), ("", True), ("_any", True), ("x86-64", True),
    ("arm64", False), ("x86_64", False), ("X86-64", False),
])
def test_rule3_architecture(arch: str | None, accepted: bool) -> None:
    ext = {"ID": "_any"}
    if arch is not None:
        ext["ARCHITECTURE"] = arch
    assert ok(ext) is accepted


def test_rule3_architecture_follows_uname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(release, "uname_architecture", lambda: "arm64")
    assert ok({"ID": "_any", "ARCHITECTURE": "arm64"})
    assert not ok({"ID": "_any", "ARCHITECTURE": "x86-64"})


@pytest.mark.parametrize("ext", [{}, {"ID": ""}, {"VERSION_ID": "40"}, {"ARCHITECTURE": "_any"}])
def test_rule4_id_missing_or_empty(ext: dict[str, str]) -> None:
    assert not ok(ext)


def test_rule5_id_any_skips_version_checks() -> None:
    assert ok({"ID": "_any", "VERSION_ID": "1", "SYSEXT_LEVEL": "9"},
              {**HOST, "SYSEXT_LEVEL": "2"})
    assert ok({"ID": "_any"}, {"ID": "other", "VERSION_ID": "5"})


def test_rule5_id_any_even_without_host_id() -> None:
    assert ok({"ID": "_any"}, {})


@pytest.mark.parametrize("ext_id,accepted", [
    ("testtest", True), ("test_alike", True), ("foobar", True), ("something-else", True),
    ("test", False), ("alike", False), ("testtes", False), ("TESTTEST", False),
    ("foobar test_alike", False), ("other", False),
])
def test_rule6_id_and_id_like(ext_id: str, accepted: bool) -> None:
    assert ok({"ID": ext_id, "VERSION_ID": "40"}) is accepted


def test_rule6_id_like_parsed_from_os_release_text() -> None:
    host = parse_env_text('ID=testtest\nID_LIKE="foobar test_alike something-else"\n'
                          "VERSION=1.2.3\n")
    assert ok({"ID": "test_alike"}, host)
    assert not ok({"ID": "nope"}, host)


def test_rule6_no_host_id_like() -> None:
    assert not ok({"ID": "test_alike"}, {"ID": "testtest"})


def test_rule7_rolling_host_accepts_any_version() -> None:
    host = {"ID": "testtest", "VERSION": "1.2.3"}       # no VERSION_ID, no level
    assert ok({"ID": "testtest"}, host)
    assert ok({"ID": "testtest", "VERSION_ID": "99", "SYSEXT_LEVEL": "7"}, host)
    assert ok({"ID": "testtest", "VERSION_ID": "99"}, {**host, "VERSION_ID": ""})


@pytest.mark.parametrize("host_extra,ext_extra,accepted", [
    # both levels set: they decide alone
    ({"SYSEXT_LEVEL": "1.0"}, {"SYSEXT_LEVEL": "1.0"}, True),
    ({"SYSEXT_LEVEL": "1.0"}, {"SYSEXT_LEVEL": "1.0", "VERSION_ID": "39"}, True),
    ({"SYSEXT_LEVEL": "1.0"}, {"SYSEXT_LEVEL": "1"}, False),       # plain string compare
    ({"SYSEXT_LEVEL": "1.0"}, {"SYSEXT_LEVEL": "2.0", "VERSION_ID": "40"}, False),
    # image has no level: VERSION_ID decides
    ({"SYSEXT_LEVEL": "1.0"}, {"VERSION_ID": "40"}, True),
    ({"SYSEXT_LEVEL": "1.0"}, {"VERSION_ID": "39"}, False),
    ({"SYSEXT_LEVEL": "1.0"}, {}, False),
    ({"SYSEXT_LEVEL": "1.0"}, {"SYSEXT_LEVEL": "", "VERSION_ID": "40"}, True),
    # host has no level: VERSION_ID decides even if the image declares one
    ({}, {"SYSEXT_LEVEL": "1.0", "VERSION_ID": "40"}, True),
    ({}, {"SYSEXT_LEVEL": "1.0"}, False),
    ({}, {"VERSION_ID": "40"}, True),
    ({}, {"VERSION_ID": "40.0"}, False),
    ({}, {"VERSION_ID": ""}, False),
    ({}, {}, False),
    # CONFEXT_LEVEL means nothing to a sysext
    ({"CONFEXT_LEVEL": "1"}, {"CONFEXT_LEVEL": "1"}, False),
])
def test_rule8_level_and_version_id(host_extra: dict[str, str], ext_extra: dict[str, str],
                                    accepted: bool) -> None:
    assert ok({"ID": "testtest", **ext_extra}, {**HOST, **host_extra}) is accepted


def test_rule8_host_level_without_version_id() -> None:
    host = {"ID": "testtest", "SYSEXT_LEVEL": "3"}
    assert ok({"ID": "testtest", "SYSEXT_LEVEL": "3"}, host)
    assert not ok({"ID": "testtest", "SYSEXT_LEVEL": "4"}, host)
    # image without a level, host without VERSION_ID: nothing left to compare
    assert ok({"ID": "testtest"}, host)
    assert ok({"ID": "testtest", "VERSION_ID": "1"}, host)


def test_rule8_confext_level() -> None:
    host = {**HOST, "CONFEXT_LEVEL": "5"}
    assert ok({"ID": "testtest", "CONFEXT_LEVEL": "5"}, host, cls=CONFEXT)
    assert not ok({"ID": "testtest", "CONFEXT_LEVEL": "6", "VERSION_ID": "40"}, host,
                  cls=CONFEXT)
    assert not ok({"ID": "testtest", "SYSEXT_LEVEL": "5"}, host, cls=CONFEXT)


def test_rule_order_scope_before_architecture_before_id() -> None:
    # every rule fails: the reason names the first one (scope)
    r = check_compatible({"ARCHITECTURE": "arm64", "SYSEXT_SCOPE": "initrd"}, HOST, SYSEXT,
                         "system", "img")
    assert r is not None and "SYSEXT_SCOPE" in r
    r = check_compatible({"ARCHITECTURE": "arm64"}, HOST, SYSEXT, "system", "img")
    assert r is not None and "ARCHITECTURE" in r


# ---------------------------------------------------------------------------------------------
# systemd's env-file reader: the details, and what makes it refuse a whole file


@pytest.mark.parametrize("text,env", [
    ('A="a b"  c  d  \n', {"A": "a bc  d"}),          # after a quote: blanks skipped, then more
    ("A=x \\  \n", {"A": "x  "}),                    # an escaped blank is never stripped
    ("A=a\\\nb\n", {"A": "ab"}),                     # backslash-newline joins the lines
    ("A='a\nb'\n", {"A": "a\nb"}),                   # quotes span lines
    ('A="a\\\nb"\n', {"A": "ab"}),                   # a continuation inside double quotes
    ('A="\\q\\$"\n', {"A": "\\q$"}),
    ("# c \\\nA=1\n", {"A": "1"}),                   # a comment ends at the newline (v254+)
    ("A=1 # not a comment\n", {"A": "1 # not a comment"}),
    ("A=x\rB=y\r", {"A": "x", "B": "y"}),            # CR ends a line, as LF
    ("A=1", {"A": "1"}),                             # no final newline
    ("A=", {"A": ""}),
    ("A\nB=2\n", {"B": "2"}),                        # no '=': not an assignment
    ('A=x"y"\n', {"A": 'x"y"'}),                     # quotes only count at the start
])
def test_env_file_details_as_systemd(text: str, env: dict[str, str]) -> None:
    assert release.parse_env_bytes(text.encode()) == env


def test_keys_are_not_validated_but_lookups_only_see_names() -> None:
    raw = release.parse_env_bytes(b"KEY WITH SPACE=x\n1K=y\n")
    assert raw == {"KEY WITH SPACE": "x", "1K": "y"}
    assert parse_env_text("KEY WITH SPACE=x\n1K=y\n") == {}


@pytest.mark.parametrize("data,why", [
    (b"ID=_any\n\0VERSION_ID=1\n", "NUL"),
    (b"ID=_any\nX=\xff\n", "UTF-8"),
    (b"\xffID=_any\n", "UTF-8"),
])
def test_files_systemd_refuses_as_a_whole(tmp_path: Path, data: bytes, why: str) -> None:
    p = tmp_path / "extension-release.x"
    p.write_bytes(data)
    with pytest.raises(release.EnvFileError, match=why):
        parse_env_file(str(p))


def test_invalid_utf8_in_a_comment_is_fine(tmp_path: Path) -> None:
    p = tmp_path / "r"
    p.write_bytes(b"# \xff\nID=_any\n")
    assert parse_env_file(str(p)) == {"ID": "_any"}


def test_a_file_over_systemds_limit_is_refused_unread(tmp_path: Path) -> None:
    """systemd reads at most 64 MiB - 1 byte (READ_FULL_BYTES_MAX): a sparse 64 MiB file is
    refused by its size, without being read."""
    p = tmp_path / "r"
    with open(p, "wb") as f:
        f.write(b"ID=_any\n")
        f.truncate(release.READ_FULL_BYTES_MAX + 1)
    with pytest.raises(release.EnvFileError, match="larger than 64 MiB"):
        parse_env_file(str(p))


def test_a_large_file_under_the_limit_is_read_in_chunks(tmp_path: Path) -> None:
    """A multi-chunk file with assignments and a quoted value that straddle chunk borders."""
    p = tmp_path / "r"
    pad = b"# " + b"p" * 61 + b"\n"
    body = b"ID=_any\n" + pad * 20000 + b'LONG="' + b"v" * 3_000_000 + b'"\n' + pad * 20000 \
        + b"SYSEXT_LEVEL=1.0\n"
    p.write_bytes(body)
    env = parse_env_file(str(p))
    assert env["ID"] == "_any" and env["SYSEXT_LEVEL"] == "1.0"
    assert env["LONG"] == "v" * 3_000_000


def test_chunked_and_whole_parse_agree() -> None:
    text = (b'A="x\\"y" z\\\n w\nB=\'q\nr\'\n# c\nC = v  \nD="unclosed\n')
    whole = release.parse_env_bytes(text)
    for size in (1, 2, 3, 7):
        p = release._EnvParser("t")
        for i in range(0, len(text), size):
            p.feed(text[i:i + size])
        assert p.finish() == whole, size


def test_incompatibility_message_is_one_line() -> None:
    reason = check_compatible({"ID": "_any\n"}, {"ID": "testtest"}, SYSEXT, "system", "x")
    assert reason is not None and "\n" not in reason and "_any\\n" in reason
