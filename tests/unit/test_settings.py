"""Settings: mutable-mode parsing (§6.1), env < CLI, config files only when neither is set
(§2.2), SYSTEMD_*_HIERARCHIES (§2.1), initrd detection inside the root (§3.1)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from overlayctl.errors import OverlayctlError
from overlayctl.policy import PolicyError, parse_policy
from overlayctl.settings import (
    CLASSES,
    MUTABLE_MODES,
    load_settings,
    parse_hierarchies,
    parse_mutable,
    read_config,
)


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k in list(os.environ):
        if k.startswith(("SYSTEMD_SYSEXT", "SYSTEMD_CONFEXT")) or k == "SYSTEMD_OS_RELEASE":
            monkeypatch.delenv(k)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    r = tmp_path / "root"
    r.mkdir()
    return r


def write(root: Path, rel: str, text: str) -> Path:
    p = root / rel
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


# ---------------------------------------------------------------------------------------------
# parse_mutable


@pytest.mark.parametrize("mode", MUTABLE_MODES)
def test_mode_names(mode: str) -> None:
    assert parse_mutable(mode) == mode


def test_all_six_modes_known() -> None:
    assert set(MUTABLE_MODES) == {"no", "yes", "auto", "import", "ephemeral", "ephemeral-import"}


@pytest.mark.parametrize("text", ["Auto", "AUTO", "Import", "EPHEMERAL", "Ephemeral-Import",
                                  "ephemeral_import", "ephemeralimport", "enabled", "disabled",
                                  "", " auto", "auto ", "help", "2", "maybe"])
def test_mode_names_are_case_sensitive_and_exact(text: str) -> None:
    assert parse_mutable(text) is None


@pytest.mark.parametrize("text", ["1", "yes", "y", "true", "t", "on", "YES", "Y", "True", "ON"])
def test_boolean_true_spellings(text: str) -> None:
    assert parse_mutable(text) == "yes"


@pytest.mark.parametrize("text", ["0", "no", "n", "false", "f", "off", "NO", "N", "False", "Off"])
def test_boolean_false_spellings(text: str) -> None:
    assert parse_mutable(text) == "no"


# ---------------------------------------------------------------------------------------------
# precedence: env < CLI; config only when neither set


def test_default_is_no(root: Path) -> None:
    s = load_settings(str(root), "sysext")
    assert s.mutable == "no"
    assert s.mutable_source == "default"
    assert s.overlay_options is None
    assert s.image_policy is None


def test_env_sets_mode(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEMD_SYSEXT_MUTABLE_MODE", "ephemeral")
    s = load_settings(str(root), "sysext")
    assert s.mutable == "ephemeral"


def test_env_boolean_spelling(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEMD_SYSEXT_MUTABLE_MODE", "TRUE")
    assert load_settings(str(root), "sysext").mutable == "yes"


def test_cli_beats_env(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEMD_SYSEXT_MUTABLE_MODE", "yes")
    s = load_settings(str(root), "sysext", cli_mutable="no")
    assert s.mutable == "no"
    assert s.mutable_source == "--mutable"


def test_confext_reads_its_own_env(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEMD_SYSEXT_MUTABLE_MODE", "yes")
    monkeypatch.setenv("SYSTEMD_SYSEXT_OVERLAYFS_MOUNT_OPTIONS", "noatime")
    s = load_settings(str(root), "confext")
    assert s.mutable == "no"
    assert s.overlay_options is None
    monkeypatch.setenv("SYSTEMD_CONFEXT_MUTABLE_MODE", "import")
    monkeypatch.setenv("SYSTEMD_CONFEXT_OVERLAYFS_MOUNT_OPTIONS", "relatime")
    s = load_settings(str(root), "confext")
    assert s.mutable == "import"
    assert s.overlay_options == "relatime"


def test_bad_env_warns_and_is_ignored(root: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SYSTEMD_SYSEXT_MUTABLE_MODE", "Auto")
    s = load_settings(str(root), "sysext")
    assert s.mutable == "no"
    assert s.mutable_source == "default"
    err = capsys.readouterr().err
    assert "SYSTEMD_SYSEXT_MUTABLE_MODE" in err and "Auto" in err


def test_bad_env_does_not_block_config(root: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setenv("SYSTEMD_SYSEXT_MUTABLE_MODE", "bogus")
    write(root, "etc/systemd/sysext.conf", "[SysExt]\nMutable=auto\n")
    s = load_settings(str(root), "sysext")
    assert s.mutable == "auto"
    assert "bogus" in capsys.readouterr().err


def test_bad_env_with_cli(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEMD_SYSEXT_MUTABLE_MODE", "bogus")
    assert load_settings(str(root), "sysext", cli_mutable="import").mutable == "import"


def test_config_used_when_nothing_else(root: Path) -> None:
    write(root, "etc/systemd/sysext.conf", "[SysExt]\nMutable=auto\nImagePolicy=root=signed\n")
    s = load_settings(str(root), "sysext")
    assert s.mutable == "auto"
    assert s.mutable_source == "sysext.conf"
    assert s.image_policy == parse_policy("root=signed")


def test_config_boolean_spelling(root: Path) -> None:
    write(root, "etc/systemd/sysext.conf", "[SysExt]\nMutable=on\n")
    assert load_settings(str(root), "sysext").mutable == "yes"


def test_env_beats_config(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(root, "etc/systemd/sysext.conf", "[SysExt]\nMutable=auto\n")
    monkeypatch.setenv("SYSTEMD_SYSEXT_MUTABLE_MODE", "no")
    s = load_settings(str(root), "sysext")
    assert s.mutable == "no"
    assert s.mutable_source == "$SYSTEMD_SYSEXT_MUTABLE_MODE"


def test_cli_beats_config(root: Path) -> None:
    write(root, "etc/systemd/sysext.conf", "[SysExt]\nMutable=auto\nImagePolicy=root=signed\n")
    s = load_settings(str(root), "sysext", cli_mutable="no", image_policy="*")
    assert s.mutable == "no"
    assert s.image_policy == parse_policy("*")


def test_image_policy_from_config_independent_of_mutable(root: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    write(root, "etc/systemd/sysext.conf", "[SysExt]\nMutable=auto\nImagePolicy=root=signed\n")
    monkeypatch.setenv("SYSTEMD_SYSEXT_MUTABLE_MODE", "yes")
    s = load_settings(str(root), "sysext")
    assert s.mutable == "yes"
    assert s.image_policy == parse_policy("root=signed")


# ImagePolicy= as systemd 262 parses it (each case observed with systemd-sysext 262 on a tree
# with one unsigned squashfs image: merged or refused, and whether Mutable= still applied).

def test_config_image_policy_is_parsed_gracefully(root: Path) -> None:
    # Unknown flags and designators are skipped: "root=nonsense" leaves root with no flags,
    # which means any protection (262 merged an unsigned image under it).
    write(root, "etc/systemd/sysext.conf",
          "[SysExt]\nMutable=auto\nImagePolicy=root=signed+bogus:bogus=verity\n")
    s = load_settings(str(root), "sysext")
    assert s.image_policy == parse_policy("root=signed")
    assert s.mutable == "auto"
    write(root, "etc/systemd/sysext.conf", "[SysExt]\nImagePolicy=root=nonsense\n")
    assert load_settings(str(root), "sysext").image_policy == parse_policy("root=")


def test_config_image_policy_empty_resets_to_the_default(root: Path) -> None:
    write(root, "etc/systemd/sysext.conf", "[SysExt]\nImagePolicy=root=signed\n")
    write(root, "etc/systemd/sysext.conf.d/50-x.conf", "[SysExt]\nImagePolicy=\n")
    assert load_settings(str(root), "sysext").image_policy is None


@pytest.mark.parametrize("value", ["nonsense", "root=signed::", "root=signed:root=verity"])
def test_config_image_policy_that_does_not_parse_drops_the_configuration(
        root: Path, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    # 262: "Failed to parse sysext config file, ignoring": Mutable= is not applied either,
    # whether it comes before or after the bad line.
    write(root, "etc/systemd/sysext.conf", f"[SysExt]\nMutable=yes\nImagePolicy={value}\n")
    write(root, "etc/systemd/sysext.conf.d/50-x.conf", "[SysExt]\nMutable=auto\n")
    s = load_settings(str(root), "sysext")
    assert s.image_policy is None
    assert s.mutable == "no" and s.mutable_source == "default"
    err = capsys.readouterr().err
    assert value in err and "sysext.conf" in err and len(err.strip().splitlines()) == 1


def test_cli_image_policy_is_strict(root: Path) -> None:
    with pytest.raises(PolicyError) as e:
        load_settings(str(root), "sysext", image_policy="root=nonsense")
    assert "--image-policy=root=nonsense" in e.value.message
    assert load_settings(str(root), "sysext", image_policy="-").image_policy == \
        parse_policy("-")


def test_bad_config_value_warns(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(root, "etc/systemd/sysext.conf", "[SysExt]\nMutable=sometimes\n")
    s = load_settings(str(root), "sysext")
    assert s.mutable == "no"
    assert "sometimes" in capsys.readouterr().err


def test_config_is_read_under_root_not_host(root: Path) -> None:
    # Nothing under root: whatever the host has in /etc/systemd must not matter.
    assert load_settings(str(root), "sysext").mutable_source == "default"


def test_config_other_section_ignored(root: Path) -> None:
    write(root, "etc/systemd/sysext.conf", "[ConfExt]\nMutable=yes\n[Other]\nMutable=auto\n")
    assert load_settings(str(root), "sysext").mutable == "no"


def test_confext_config(root: Path) -> None:
    write(root, "etc/systemd/sysext.conf", "[SysExt]\nMutable=yes\n")
    write(root, "etc/systemd/confext.conf", "[ConfExt]\nMutable=ephemeral\n")
    assert load_settings(str(root), "confext").mutable == "ephemeral"
    assert load_settings(str(root), "sysext").mutable == "yes"


def test_config_comments_and_whitespace(root: Path) -> None:
    write(root, "etc/systemd/sysext.conf",
          "# a comment\n; another\n\n[SysExt]\n# Mutable=yes\n  Mutable = import  \n")
    assert load_settings(str(root), "sysext").mutable == "import"


@pytest.mark.parametrize("d", ["etc/systemd", "run/systemd", "usr/lib/systemd"])
def test_main_file_in_each_dir(root: Path, d: str) -> None:
    write(root, f"{d}/sysext.conf", "[SysExt]\nMutable=import\n")
    assert load_settings(str(root), "sysext").mutable == "import"


def test_main_file_first_dir_wins(root: Path) -> None:
    write(root, "usr/lib/systemd/sysext.conf",
          "[SysExt]\nMutable=yes\nImagePolicy=root=verity\n")
    write(root, "run/systemd/sysext.conf", "[SysExt]\nMutable=import\n")
    write(root, "etc/systemd/sysext.conf", "[SysExt]\nMutable=auto\n")
    s = load_settings(str(root), "sysext")
    assert s.mutable == "auto"
    assert s.image_policy is None     # /usr/lib's file is shadowed completely


def test_dropin_overrides_main_file(root: Path) -> None:
    write(root, "etc/systemd/sysext.conf", "[SysExt]\nMutable=auto\nImagePolicy=usr=verity\n")
    write(root, "usr/lib/systemd/sysext.conf.d/10-x.conf", "[SysExt]\nMutable=import\n")
    s = load_settings(str(root), "sysext")
    assert s.mutable == "import"
    assert s.image_policy == parse_policy("usr=verity")


def test_dropins_apply_in_file_name_order_across_dirs(root: Path) -> None:
    write(root, "etc/systemd/sysext.conf.d/10-a.conf", "[SysExt]\nMutable=yes\n")
    write(root, "usr/lib/systemd/sysext.conf.d/20-b.conf", "[SysExt]\nMutable=ephemeral\n")
    assert load_settings(str(root), "sysext").mutable == "ephemeral"


def test_dropin_in_etc_masks_same_name_in_usr_lib(root: Path) -> None:
    write(root, "usr/lib/systemd/sysext.conf.d/50-x.conf", "[SysExt]\nMutable=yes\n")
    write(root, "etc/systemd/sysext.conf.d/50-x.conf", "[SysExt]\nImagePolicy=root=signed\n")
    s = load_settings(str(root), "sysext")
    assert s.mutable == "no"
    assert s.image_policy == parse_policy("root=signed")


def test_dropins_without_main_file(root: Path) -> None:
    write(root, "run/systemd/sysext.conf.d/x.conf", "[SysExt]\nMutable=auto\n")
    assert load_settings(str(root), "sysext").mutable == "auto"


def test_dropin_needs_conf_suffix(root: Path) -> None:
    write(root, "etc/systemd/sysext.conf.d/x.conf.bak", "[SysExt]\nMutable=auto\n")
    assert load_settings(str(root), "sysext").mutable == "no"


def test_cli_beats_dropin(root: Path) -> None:
    write(root, "etc/systemd/sysext.conf.d/x.conf", "[SysExt]\nMutable=auto\n")
    assert load_settings(str(root), "sysext", cli_mutable="ephemeral").mutable == "ephemeral"


def test_read_config_follows_symlinks_inside_root(root: Path) -> None:
    write(root, "data/sysext.conf", "[SysExt]\nMutable=yes\n")
    (root / "etc/systemd").mkdir(parents=True)
    (root / "etc/systemd/sysext.conf").symlink_to("/data/sysext.conf")
    assert read_config(str(root), CLASSES["sysext"]) == {"Mutable": "yes"}


# ---------------------------------------------------------------------------------------------
# overlay options, root, reload


def test_overlay_options_env(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEMD_SYSEXT_OVERLAYFS_MOUNT_OPTIONS", "relatime,metacopy=on")
    assert load_settings(str(root), "sysext").overlay_options == "relatime,metacopy=on"


def test_overlay_options_empty_env_is_set(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEMD_SYSEXT_OVERLAYFS_MOUNT_OPTIONS", "")
    assert load_settings(str(root), "sysext").overlay_options == ""


def test_root_forces_no_reload(root: Path) -> None:
    assert load_settings(str(root), "sysext").no_reload is True
    assert load_settings("/", "sysext").no_reload is False
    assert load_settings("/", "sysext", no_reload=True).no_reload is True


# ---------------------------------------------------------------------------------------------
# hierarchies


def test_default_hierarchies(root: Path) -> None:
    assert load_settings(str(root), "sysext").hierarchies == ("/usr", "/opt")
    assert load_settings(str(root), "confext").hierarchies == ("/etc",)


def test_hierarchies_env(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEMD_SYSEXT_HIERARCHIES", "/opt:/usr:/foo/bar")
    assert load_settings(str(root), "sysext").hierarchies == ("/opt", "/usr", "/foo/bar")


def test_confext_hierarchies_env(root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEMD_SYSEXT_HIERARCHIES", "not-valid")
    monkeypatch.setenv("SYSTEMD_CONFEXT_HIERARCHIES", "/etc:/srv/conf")
    assert load_settings(str(root), "confext").hierarchies == ("/etc", "/srv/conf")


@pytest.mark.parametrize("value", [
    "", ":", "/usr:", ":/usr", "/usr::/opt",          # empty list or empty element
    "usr", "/usr:opt", "./usr",                         # not absolute
    "/", "/usr:/",                                      # the root itself
    "/usr/../opt", "/usr/./lib", "/usr/.", "/usr/..",   # not normalized
    "/usr//lib",
])
def test_bad_hierarchies_fail(root: Path, monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    with pytest.raises(OverlayctlError):
        parse_hierarchies(value, "SYSTEMD_SYSEXT_HIERARCHIES")
    monkeypatch.setenv("SYSTEMD_SYSEXT_HIERARCHIES", value)
    with pytest.raises(OverlayctlError):
        load_settings(str(root), "sysext")


def test_double_leading_slash_is_not_normalized() -> None:
    with pytest.raises(OverlayctlError):
        parse_hierarchies("//usr", "SYSTEMD_SYSEXT_HIERARCHIES")


def test_bad_hierarchies_fail_even_with_cli_settings(root: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SYSTEMD_SYSEXT_HIERARCHIES", "relative")
    with pytest.raises(OverlayctlError):
        load_settings(str(root), "sysext", cli_mutable="no", force=True)


# ---------------------------------------------------------------------------------------------
# initrd


def test_not_initrd_by_default(root: Path) -> None:
    s = load_settings(str(root), "sysext")
    assert s.initrd is False
    assert s.search_dirs == ("/etc/extensions", "/run/extensions", "/var/lib/extensions")


def test_initrd_release_inside_root(root: Path) -> None:
    write(root, "etc/initrd-release", "ID=x\n")
    s = load_settings(str(root), "sysext")
    assert s.initrd is True
    assert s.search_dirs == ("/etc/extensions", "/run/extensions", "/var/lib/extensions",
                             "/.extra/sysext", "/.extra/global_sysext")


def test_initrd_release_symlink_inside_root(root: Path) -> None:
    write(root, "usr/lib/initrd-release", "ID=x\n")
    (root / "etc").mkdir()
    (root / "etc/initrd-release").symlink_to("/usr/lib/initrd-release")
    assert load_settings(str(root), "sysext").initrd is True


def test_initrd_dangling_symlink_is_not_initrd(root: Path) -> None:
    (root / "etc").mkdir()
    (root / "etc/initrd-release").symlink_to("/nowhere")
    assert load_settings(str(root), "sysext").initrd is False


def test_confext_search_dirs(root: Path) -> None:
    assert load_settings(str(root), "confext").search_dirs == (
        "/run/confexts", "/var/lib/confexts", "/usr/local/lib/confexts", "/usr/lib/confexts")
    write(root, "etc/initrd-release", "")
    assert load_settings(str(root), "confext").search_dirs == (
        "/run/confexts", "/var/lib/confexts", "/usr/local/lib/confexts", "/.extra/confext",
        "/.extra/global_confext")


def test_class_constants() -> None:
    sysext, confext = CLASSES["sysext"], CLASSES["confext"]
    assert (sysext.meta_dir, sysext.list_file) == (".systemd-sysext", "extensions")
    assert (confext.meta_dir, confext.list_file) == (".systemd-confext", "confexts")
    assert (sysext.section, confext.section) == ("SysExt", "ConfExt")
    assert sysext.noexec_default is False and sysext.nosuid is False
    assert confext.noexec_default is True and confext.nosuid is True
    for c in (sysext, confext):
        for d in c.search_dirs:
            assert not d.startswith(("/usr/lib/extensions", "/usr/local/lib/extensions",
                                     "/etc/confexts"))


# ---------------------------------------------------------------------------------------------
# [Cleanup] of overlayctl's confext.conf (docs/defaults.md, "cleanup")


def test_cleanup_settings(root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from overlayctl.settings import USER_DATABASE, load_cleanup
    write(root, "usr/lib/overlayctl/confext.conf",
          "[Cleanup]\nKeepDefaults=/etc/a /etc/b\nKeepDefaultsFile=/usr/share/no-whiteouts\n"
          "KeepUserDatabase=yes\nIgnoreXattrs=security.selinux user.x\n")
    write(root, "usr/share/no-whiteouts",
          "# comment\n/etc/resolv.conf\n\n  /etc/a  \nrelative/path\n/etc//x/\n")
    c = load_cleanup(str(root), "confext")
    assert c.keep_defaults == ("/etc/a", "/etc/b")
    assert c.keep_user_database is True
    assert c.ignore_xattrs == frozenset({"security.selinux", "user.x"})
    paths = c.keep_paths(str(root))
    assert paths["/etc/a"] == "KeepDefaults"          # the first list names it first
    assert paths["/etc/resolv.conf"] == "KeepDefaultsFile /usr/share/no-whiteouts"
    assert paths["/etc/x"] == "KeepDefaultsFile /usr/share/no-whiteouts"
    assert "relative/path" not in paths
    assert all(paths[p] == "KeepUserDatabase" for p in USER_DATABASE)
    assert "ignoring 'relative/path'" in capsys.readouterr().err


def test_cleanup_settings_defaults_and_bad_values(root: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    from overlayctl.settings import load_cleanup
    c = load_cleanup(str(root), "confext")
    assert (c.keep_defaults, c.keep_defaults_file, c.keep_user_database, c.ignore_xattrs) == (
        (), None, False, frozenset())
    assert c.keep_paths(str(root)) == {}
    write(root, "etc/overlayctl/confext.conf",
          "[Cleanup]\nKeepUserDatabase=perhaps\nKeepDefaultsFile=/missing\n")
    c = load_cleanup(str(root), "confext")
    assert c.keep_user_database is False and c.keep_paths(str(root)) == {}
    err = capsys.readouterr().err
    assert "ignoring KeepUserDatabase=perhaps" in err
    assert "ignoring KeepDefaultsFile=/missing" in err
