"""The documentation keeps up with the code: the man page is the parser's, every option, exit
code, JSON field and environment variable is documented, and every link lands."""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

from libvirt_rdm_backup import errors
from libvirt_rdm_backup.cli.output import EXIT_FAILED, EXIT_OK, EXIT_USAGE, EXIT_VERIFY
from libvirt_rdm_backup.cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCS = ROOT / "docs"
MAN_PAGE = DOCS / "rdm-backup.1"
PACKAGE = ROOT / "libvirt_rdm_backup"


def _manpage_tool() -> ModuleType:
    spec = importlib.util.spec_from_file_location("manpage", ROOT / "tools" / "manpage.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return dict(sub.choices)


def _without_code_blocks(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)


# -- the man page -------------------------------------------------------------------------------

def test_man_page_is_generated_from_the_current_parser() -> None:
    """docs/rdm-backup.1 is what tools/manpage.py writes now (else: run `make man`)."""
    assert MAN_PAGE.read_text(encoding="utf-8") == _manpage_tool().generate(), (
        "docs/rdm-backup.1 is out of date: run `make man` and commit it")


def test_man_page_names_every_command_option_and_exit_code() -> None:
    page = MAN_PAGE.read_text(encoding="utf-8").replace("\\-", "-")
    for name, parser in _commands().items():
        assert f".SS {name}\n" in page
        for action in parser._actions:
            for option in action.option_strings:
                assert option in page, f"{name} {option}"
    codes = {cls.exit_code for cls in vars(errors).values()
             if isinstance(cls, type) and issubclass(cls, errors.RdmBackupError)}
    exit_section = page.split(".SH EXIT STATUS", 1)[1].split(".SH", 1)[0]
    for code in codes | {EXIT_OK, EXIT_USAGE, EXIT_FAILED, EXIT_VERIFY}:
        assert f".TP\n\\fB{code}\\fR\n" in exit_section


def _render_warnings(argv: list[str]) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "MAN_KEEP_FORMATTING"}
    env.update(MANWIDTH="100", LC_ALL="C.UTF-8")
    done = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


def test_man_page_renders_without_warnings() -> None:
    renderers = []
    if shutil.which("man"):
        renderers.append(["man", "--warnings=w", "-l", str(MAN_PAGE)])  # w: every warning
    if shutil.which("groff"):
        renderers.append(["groff", "-man", "-Tutf8", "-ww", "-z", str(MAN_PAGE)])
    if not renderers:
        pytest.skip("neither man nor groff is installed")
    for argv in renderers:
        out, warnings = _render_warnings(argv)
        assert warnings == "", f"{argv[0]}: {warnings}"
        if argv[0] == "man":
            assert "rdm-backup backup [DOMAIN] --target DIR|URI" in out
            assert "EXIT STATUS" in out


def test_manpage_tool_check_mode(tmp_path: Path) -> None:
    tool = ROOT / "tools" / "manpage.py"
    assert subprocess.run([sys.executable, str(tool), "--check", str(MAN_PAGE)],
                          check=False).returncode == 0
    stale = tmp_path / "stale.1"
    stale.write_text(MAN_PAGE.read_text(encoding="utf-8") + ".\\\" edited\n", encoding="utf-8")
    done = subprocess.run([sys.executable, str(tool), "--check", str(stale)],
                          capture_output=True, text=True, check=False)
    assert done.returncode == 1 and "make man" in done.stderr


def test_roff_escaping() -> None:
    tool = _manpage_tool()
    assert tool.escape("a\\b") == "a\\eb"
    assert tool.escape("--disk") == "\\-\\-disk"
    assert tool.escape(".starts a request\n'so does this") == (
        "\\&.starts a request\n\\&'so does this")


# -- the reference pages ------------------------------------------------------------------------

def _sections(text: str) -> dict[str, str]:
    """``## `name` `` sections of docs/cli.md, by command name."""
    parts = re.split(r"^## `([a-z]+)`\s*$", text, flags=re.M)
    return {parts[i]: parts[i + 1] for i in range(1, len(parts) - 1, 2)}


def test_every_command_and_option_is_documented_in_cli_md() -> None:
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    sections = _sections(text)
    preamble = text.split("\n## ", 1)[0]
    global_options = [o for a in build_parser()._actions for o in a.option_strings
                      if o not in ("-h", "--help")]
    for option in global_options:
        assert f"`{option}" in preamble, option
    for name, parser in _commands().items():
        assert name in sections, f"docs/cli.md has no section for {name}"
        for action in parser._actions:
            for option in action.option_strings:
                if option in global_options or option in ("-h", "--help"):
                    continue
                assert f"`{option}" in sections[name] or f"{option} " in sections[name], (
                    f"docs/cli.md does not document {name} {option}")
            for choice in action.choices or ():
                assert str(choice) in sections[name], f"{name}: {choice}"


def test_every_exit_code_and_exception_is_documented() -> None:
    text = (DOCS / "exit-codes.md").read_text(encoding="utf-8")
    classes = [cls for cls in vars(errors).values()
               if isinstance(cls, type) and issubclass(cls, errors.RdmBackupError)]
    for code in {cls.exit_code for cls in classes} | {EXIT_OK}:
        assert re.search(rf"^\| {code} \|", text, flags=re.M), f"exit code {code}"
    for cls in classes:
        assert re.search(rf"\b{cls.__name__}\b", text), cls.__name__


def _dict_keys(path: Path, functions: set[str] | None) -> set[str]:
    """String keys of the dict literals in ``functions`` (all functions when None)."""
    keys: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.FunctionDef) and (functions is None or node.name in functions):
            for inner in ast.walk(node):
                if isinstance(inner, ast.Dict):
                    keys |= {k.value for k in inner.keys
                             if isinstance(k, ast.Constant) and isinstance(k.value, str)}
    return keys


JSON_CONTRACTS: dict[str, list[tuple[str, set[str] | None]]] = {
    # page: the code that writes the documents it describes
    "cli.md": [
        ("cli/disks.py", {"cmd_disks"}), ("cli/backups.py", {"cmd_list"}),
        ("cli/host.py", {"cmd_hook"}), ("cli/serving.py", {"cmd_receive"}),
        ("engine/backup.py", {"to_dict"}), ("engine/restore.py", {"to_dict"}),
        ("engine/restore_all.py", {"to_dict"}),
        ("engine/verify.py", {"to_dict"}), ("engine/export.py", {"to_dict"}),
        ("engine/live_restore.py", {"to_dict"}), ("cli/live.py", {"live_progress"}),
        ("domain/disks.py", {"to_dict"}), ("engine/prune_plan.py", {"to_dict"}),
        ("cli/fleet.py", {"cmd_backup_all"}),
        ("engine/serve.py", {"to_dict"}), ("engine/mount.py", {"to_dict"}),
        ("engine/unmount.py", {"to_dict"}),
        ("fleet/runner.py", {"to_dict"}), ("schedule/install.py", {"to_dict"}),
    ],
    "repository-format.md": [
        ("repository/manifest.py", {"to_dict"}), ("storage/base.py", {"to_dict"}),
        ("storage/snapshots.py", {"to_dict"}), ("repository/digest.py", {"to_dict"}),
        ("repository/chunkmap.py", None), ("repository/chunks.py", None),
        ("fleet/status.py", {"to_dict", "_write"}),
    ],
    "consistency.md": [("consistency.py", {"to_dict"})],
    "network.md": [("targets/volume_format.py", {"to_bytes"}),
                   ("targets/volume_changes.py", {"_store_manifest"})],
}


@pytest.mark.parametrize("page", sorted(JSON_CONTRACTS))
def test_every_json_field_is_documented(page: str) -> None:
    """Each key the code writes into a JSON document appears, quoted, on the page."""
    text = (DOCS / page).read_text(encoding="utf-8")
    for source, functions in JSON_CONTRACTS[page]:
        missing = sorted(k for k in _dict_keys(PACKAGE / source, functions)
                         if f"`{k}`" not in text and f'"{k}"' not in text)
        assert not missing, f"docs/{page} does not document {source}: {missing}"


def test_every_environment_variable_is_documented() -> None:
    used = {m for path in PACKAGE.rglob("*.py")
            for m in re.findall(r"\bRDM_BACKUP_[A-Z_]+\b", path.read_text(encoding="utf-8"))}
    text = (DOCS / "cli.md").read_text(encoding="utf-8")
    assert used and not sorted(v for v in used if f"`{v}`" not in text)


def _defined_in(module: str, name: str) -> bool:
    """``name`` is an attribute of ``module`` that the module defines, not one it imports
    (the package's lazy API counts as its own)."""
    value = getattr(importlib.import_module(module), name, None)
    if value is None:
        return False
    home = getattr(value, "__module__", None)
    return home in (None, module) or module == "libvirt_rdm_backup"


def test_the_python_api_names_real_import_paths() -> None:
    """Every ``from M import N`` in docs/python-api.md, every `` `N` from `M` `` and every
    dotted `` `libvirt_rdm_backup.M.N` `` names a module and what that module defines."""
    text = (DOCS / "python-api.md").read_text(encoding="utf-8")
    pairs: list[tuple[str, str]] = []
    for module, names in re.findall(r"^from (libvirt_rdm_backup[\w.]*) import (.+)$", text,
                                    flags=re.M):
        pairs += [(module, name.strip()) for name in names.split(",")]
    for names, module in re.findall(r"((?:`\w+`(?:,|\s+and)\s+)*`\w+`)\s+from\s+"
                                    r"`(libvirt_rdm_backup[\w.]*)`", text):
        pairs += [(module, name) for name in re.findall(r"`(\w+)`", names)]
    for dotted in re.findall(r"`(libvirt_rdm_backup(?:\.\w+)+)[`(]", text):
        module, _, name = dotted.rpartition(".")
        try:
            importlib.import_module(dotted)  # a module is a real path
        except ImportError:
            pairs.append((module, name))
    assert len(pairs) > 20
    wrong = sorted(f"{module}.{name}" for module, name in pairs if not _defined_in(module, name))
    assert not wrong, f"docs/python-api.md names what these modules do not define: {wrong}"


# -- links --------------------------------------------------------------------------------------

def _slug(heading: str) -> str:
    """GitHub's anchor of a heading."""
    text = heading.strip().lower().replace("`", "")
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    seen: dict[str, int] = {}
    anchors = set()
    for line in _without_code_blocks(path.read_text(encoding="utf-8")).splitlines():
        match = re.match(r"^#{1,6} (.+)$", line)
        if match:
            slug = _slug(match.group(1))
            count = seen.get(slug, 0)
            seen[slug] = count + 1
            anchors.add(slug if count == 0 else f"{slug}-{count}")
    return anchors


PAGES = [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


@pytest.mark.parametrize("page", PAGES, ids=[p.name for p in PAGES])
def test_every_link_lands(page: Path) -> None:
    text = _without_code_blocks(page.read_text(encoding="utf-8"))
    text = re.sub(r"`[^`\n]*`", "", text)
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"^[a-z]+:", target):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (page.parent / file_part).resolve() if file_part else page
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def test_readme_is_the_front_door() -> None:
    """The README stays short, starts with the two commands of a fresh machine, and links
    every reference page."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    assert len(text.splitlines()) < 250
    first_block = text.split("```sh\n", 1)[1].split("```", 1)[0]
    assert first_block.split() == ["make", "demo", "make", "test"]
    for page in DOCS.glob("*.md"):
        assert f"](docs/{page.name})" in text, page.name
