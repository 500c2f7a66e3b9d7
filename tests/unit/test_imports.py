"""The shape of the package: imports point one way (down the data path), so there is no
cycle; every module has its place in docs/design.md's module map; a merge does not load the
local-change verbs."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PKG = REPO / "overlayctl"

# Higher may import lower, never the reverse (and never the same rank). A new module gets a
# rank here and a row in docs/design.md's module map.
RANKS: dict[str, int] = {
    "__main__": 100,
    "cli": 90, "varlink": 85,                # front ends (cli hands over to varlink)
    "kcmdline": 84,                          # the kernel command line kill switch
    "localcli": 80,
    "commit": 75,                            # commit reads uppers through local's stacks
    "local": 70,                             # local-change verbs call the engine to rebuild
    "engine": 60,                            # order of operations of merge/refresh/unmerge
    "attach": 50, "build": 48, "manifest": 47, "legacy": 46, "live": 45, "nested": 44,
    "hygiene": 44, "rawimage": 43, "devices": 42, "dm": 41, "mountns": 41, "overlayfs": 40,
    "args": 31,                              # the command line (uses release.parse_boolean)
    "plan": 30,                              # pure
    "verity": 26,
    "images": 28, "settings": 27, "release": 26, "versions": 25, "policy": 24,
    "metadata": 29, "state": 20,
    "kernel": 10,
    "paths": 5, "mountinfo": 5, "upper": 5, "log": 5, "errors": 5, "faults": 5,
    "busy": 5, "output": 5, "inuse": 5, "progress": 5,
    "resources": 4,
    "personality": 3, "jsontext": 3,
    "vocab": 2,
    "record": 1,
    "__init__": 0,
}


def imports_of(path: Path) -> set[str]:
    """Every overlayctl module PATH imports, at the top or inside a function."""
    mods = {p.stem for p in PKG.glob("*.py")}
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            if node.module == "overlayctl":
                out |= {a.name for a in node.names if a.name in mods}
            elif node.module.startswith("overlayctl."):
                out.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            out |= {a.name.split(".")[1] for a in node.names
                    if a.name.startswith("overlayctl.")}
    out.discard(path.stem)
    return out


def test_every_module_has_a_rank() -> None:
    missing = sorted(p.stem for p in PKG.glob("*.py") if p.stem not in RANKS)
    assert not missing, f"give these a rank in RANKS (and a row in docs/design.md): {missing}"


def test_imports_point_down() -> None:
    upward = []
    for p in sorted(PKG.glob("*.py")):
        for dep in sorted(imports_of(p)):
            if RANKS.get(dep, -1) >= RANKS.get(p.stem, -1):
                upward.append(f"{p.stem} ({RANKS.get(p.stem)}) imports {dep} ({RANKS.get(dep)})")
    assert not upward, "\n".join(upward)


def test_no_cycle() -> None:
    graph = {p.stem: imports_of(p) for p in PKG.glob("*.py")}
    seen: dict[str, int] = {}   # 1: on the path, 2: done

    def visit(m: str, path: list[str]) -> None:
        if seen.get(m) == 2:
            return
        assert seen.get(m) != 1, "import cycle: " + " -> ".join([*path, m])
        seen[m] = 1
        for d in sorted(graph.get(m, ())):
            visit(d, [*path, m])
        seen[m] = 2

    for m in sorted(graph):
        visit(m, [])


def test_design_md_names_every_module() -> None:
    text = (REPO / "docs/design.md").read_text()
    named = set(re.findall(r"`([a-z_]+)\.py`", text))
    missing = sorted(p.stem for p in PKG.glob("*.py")
                     if p.stem not in named and not p.stem.startswith("__"))
    assert not missing, f"docs/design.md's module map lacks: {missing}"


def test_the_checker_sees_an_upward_import(tmp_path: Path) -> None:
    """imports_of() finds imports inside functions too (what the rank test relies on)."""
    f = tmp_path / "plan.py"
    f.write_text("def f():\n    from overlayctl import engine\n    import overlayctl.local\n")
    assert imports_of(f) == {"engine", "local"}


def test_merge_path_does_not_load_local_verbs() -> None:
    """What 'overlayctl merge' imports on its way (a dry run: no root needed, same modules
    up to the plan) holds none of the local-change modules."""
    code = ("import sys, tempfile, os\n"
            "from overlayctl import cli\n"
            "d = tempfile.mkdtemp()\n"
            "os.makedirs(d + '/usr/lib'); open(d + '/usr/lib/os-release', 'w').write('ID=x\\n')\n"
            "cli.main(['--root=' + d, 'sysext', 'merge', '--dry-run', '--json=short'])\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('overlayctl'))))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True)
    loaded = set(r.stdout.split()[-1:] and r.stdout.strip().splitlines()[-1].split())
    assert "overlayctl.plan" in loaded, r.stdout    # it did plan the merge
    assert not loaded & {"overlayctl.local", "overlayctl.localcli", "overlayctl.upper"}, loaded


def test_writable_usr_merge_does_not_load_local_verbs() -> None:
    """The real /usr as its own upper (issue 10): a writable merge plan of /usr loads the
    hygiene module but not upper.py (no manifest is kept for /usr)."""
    code = ("import sys, tempfile, os\n"
            "from overlayctl import cli\n"
            "d = tempfile.mkdtemp()\n"
            "os.makedirs(d + '/usr/lib'); open(d + '/usr/lib/os-release', 'w').write('ID=x\\n')\n"
            "os.makedirs(d + '/var/lib/extensions.mutable')\n"
            "os.symlink('../../../usr', d + '/var/lib/extensions.mutable/usr')\n"
            "cli.main(['--root=' + d, 'sysext', 'merge', '--mutable=yes', '--dry-run',\n"
            "          '--json=short'])\n"
            "print(' '.join(sorted(m for m in sys.modules if m.startswith('overlayctl'))))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True)
    loaded = set(r.stdout.strip().splitlines()[-1].split())
    assert "overlayctl.hygiene" in loaded, r.stdout
    assert not loaded & {"overlayctl.local", "overlayctl.upper", "overlayctl.manifest"}, loaded
