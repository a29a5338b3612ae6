"""Write the man page rdm-backup(1) from the command's argument parser (``make man``).

Everything in the page comes from the code: the commands, their options and help from
``libvirt_rdm_backup.cli.parser.build_parser()``, the exit status from the exception classes of
``libvirt_rdm_backup.errors`` and the CLI's own exit codes. The output is roff (man macros) and
depends on nothing but the parser, so the committed ``docs/rdm-backup.1`` can be checked against
a fresh rendering (``--check``, and the unit tests do).

    tools/manpage.py                        print the page
    tools/manpage.py -o docs/rdm-backup.1   write it
    tools/manpage.py --check docs/rdm-backup.1
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUTPUT = REPO_ROOT / "docs" / "rdm-backup.1"

SEE_ALSO = ("virsh(1)", "qemu-img(1)", "qemu-nbd(8)", "qemu-storage-daemon(1)", "nbdinfo(1)",
            "nbdcopy(1)", "ssh(1)", "sshd(8)")
DOCS = ("docs/cli.md", "docs/exit-codes.md", "docs/network.md", "docs/remote-backups.md",
        "docs/repository-format.md", "docs/scheduling.md")


def _modules() -> tuple[ModuleType, ModuleType, ModuleType, ModuleType]:
    """The package's ``cli.parser``, ``cli.output``, ``errors`` and top module, from this
    checkout."""
    if str(REPO_ROOT) not in sys.path:
        sys.path.insert(0, str(REPO_ROOT))
    return (importlib.import_module("libvirt_rdm_backup.cli.parser"),
            importlib.import_module("libvirt_rdm_backup.cli.output"),
            importlib.import_module("libvirt_rdm_backup.errors"),
            importlib.import_module("libvirt_rdm_backup"))


def escape(text: str) -> str:
    """Text for a roff line: backslashes and hyphens escaped, no line starting a request."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    lines = [("\\&" + line) if line.startswith((".", "'")) else line
             for line in text.split("\n")]
    return "\n".join(lines)


def _bold(text: str) -> str:
    return f"\\fB{escape(text)}\\fR"


def _italic(text: str) -> str:
    return f"\\fI{escape(text)}\\fR"


def _metavar(action: argparse.Action) -> str:
    """How the value of an option or a positional is shown, in roff."""
    if action.choices is not None and action.metavar is None:
        return "|".join(_italic(str(choice)) for choice in action.choices)
    if isinstance(action.metavar, tuple):
        return " ".join(_italic(m) for m in action.metavar)
    return _italic(action.metavar or action.dest.upper())


def _option_form(action: argparse.Action) -> str:
    """``-c URI, --connect URI``, ``--quiesce[=try|required]``, ``--force`` in roff."""
    if action.nargs == 0:
        return ", ".join(_bold(o) for o in action.option_strings)
    value = _metavar(action)
    if action.nargs == "?":
        return ", ".join(f"{_bold(o)}[={value}]" for o in action.option_strings)
    return ", ".join(f"{_bold(o)} {value}" for o in action.option_strings)


def _positional_form(action: argparse.Action) -> str:
    form = _metavar(action)
    return f"[{form}]" if action.nargs == "?" else form


def _synopsis_item(action: argparse.Action) -> str:
    """One option in a synopsis: its first spelling, bracketed unless required."""
    first = action.option_strings[0]
    if action.nargs == 0:
        form = _bold(first)
    elif action.nargs == "?":
        form = f"{_bold(first)}[={_metavar(action)}]"
    else:
        form = f"{_bold(first)} {_metavar(action)}"
    if isinstance(action, argparse._AppendAction):
        form += " ..."
    form = form.replace(" ", "\\ ")  # an item is never broken across lines
    return form if action.required else f"[{form}]"


def _help(parser: argparse.ArgumentParser, action: argparse.Action) -> str:
    """The option's help with ``%(default)s`` expanded, and what argparse knows besides."""
    text = parser._get_formatter()._expand_help(action) if action.help else ""
    notes = []
    if action.required and action.option_strings:
        notes.append("required")
    if isinstance(action, argparse._AppendAction) and "repeatable" not in text:
        notes.append("repeatable")
    default = action.default
    if (default not in (None, False, argparse.SUPPRESS) and action.nargs != 0
            and "default" not in text):
        notes.append(f"default: {default}")
    if notes:
        text = f"{text} ({'; '.join(notes)})" if text else "; ".join(notes)
    return text


def _subparsers(parser: argparse.ArgumentParser) -> argparse._SubParsersAction[
        argparse.ArgumentParser]:
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return action
    raise LookupError("the parser has no commands")


def _own_options(parser: argparse.ArgumentParser,
                 common: set[str]) -> list[argparse.Action]:
    """A command's options and positionals, without those of every command (--help too)."""
    return [a for a in parser._actions if a.dest not in common]


def _command_synopsis(name: str, parser: argparse.ArgumentParser,
                      actions: Sequence[argparse.Action]) -> str:
    grouped: dict[int, list[argparse.Action]] = {}
    for group in parser._mutually_exclusive_groups:
        members = [a for a in group._group_actions if a in actions]
        for member in members:
            grouped[id(member)] = members
    items = [_bold(f"rdm-backup {name}")]
    done: set[int] = set()
    for action in actions:
        if id(action) in done:
            continue
        if not action.option_strings:
            items.append(_positional_form(action))
        elif id(action) in grouped:
            members = grouped[id(action)]
            done.update(id(m) for m in members)
            forms = [_synopsis_item(m).removeprefix("[").removesuffix("]")
                     if not m.required else _synopsis_item(m) for m in members]
            items.append("[" + " | ".join(forms) + "]")
        else:
            items.append(_synopsis_item(action))
    return " ".join(items)


def _exit_status(output: ModuleType, errors: ModuleType) -> list[tuple[int, str]]:
    """(code, meaning) for every exit code the command can end with, from the code."""
    root = errors.RdmBackupError
    classes: list[Any] = [c for _, c in inspect.getmembers(errors, inspect.isclass)
                          if issubclass(c, root) and c.__module__ == errors.__name__]
    classes.sort(key=lambda c: len(c.__mro__))
    by_code: dict[int, list[Any]] = {}
    for cls in classes:
        by_code.setdefault(cls.exit_code, []).append(cls)
    rows = [(output.EXIT_OK, "Success.")]
    for code in sorted(by_code):
        members = by_code[code]
        # the class that brings the code in says what it means; the root only when alone
        own = ([c for c in members if "exit_code" in vars(c) and c is not root] or members)[0]
        meaning = _summary(own) + "."
        if code == output.EXIT_FAILED:
            meaning += (" Also an interrupt (SIGINT, SIGTERM) and an internal error"
                        " of the tool.")
        entries = [c.__name__ if c in (own, root)
                   else f"{c.__name__} ({_lower_first(_summary(c))})"
                   for c in [own, *(c for c in members if c is not own)]]
        rows.append((code, f"{meaning} Python exceptions: {'; '.join(entries)}."))
    return rows


def _summary(cls: type) -> str:
    """The first line of a class's docstring, without its exit code and full stop."""
    doc = (inspect.getdoc(cls) or cls.__name__).split("\n")[0].strip().replace("``", "")
    return doc.split(" (exit")[0].split("; ")[0].rstrip(".")


def _lower_first(text: str) -> str:
    """``Backup and restore of ...`` inside a sentence: ``backup and restore of ...``."""
    text = text.strip().rstrip(".")
    if text[1:2].isupper():  # an acronym: QEMU, NBD
        return text
    return text[:1].lower() + text[1:]


def _tp(lines: list[str], term: str, body: str) -> None:
    lines += [".TP", term, escape(body) if body else "\\&"]


def render(parser: argparse.ArgumentParser, exit_status: Iterable[tuple[int, str]],
           version: str) -> str:
    """The man page of ``parser`` as roff."""
    common_actions = [a for a in parser._actions if a.option_strings]
    common = {a.dest for a in common_actions}
    sub = _subparsers(parser)
    helps = {choice.dest: choice.help or "" for choice in sub._choices_actions}
    lines = [
        '.\\" Generated by tools/manpage.py from the argument parser in'
        " libvirt_rdm_backup/cli/parser.py;",
        '.\\" do not edit: run "make man".',
        f'.TH RDM\\-BACKUP 1 "" "libvirt\\-rdm\\-backup {escape(version)}" "User Commands"',
        ".nh",  # option names are not hyphenated,
        ".ad l",  # nor lines stretched to the margin
        ".SH NAME",
        "rdm\\-backup \\- " + escape(_lower_first(parser.description or "")),
        ".SH SYNOPSIS",
        ".B rdm\\-backup",
        " ".join(_synopsis_item(a) for a in common_actions)
        + " " + _italic("COMMAND") + " [" + _italic("ARGS") + "]",
        ".SH DESCRIPTION",
        escape(parser.description or ""),
        ".PP",
        escape("These options work with every command, before or after its name:"),
    ]
    for action in common_actions:
        _tp(lines, _option_form(action), _help(parser, action))
    lines += [".SH COMMANDS"]
    for name, subparser in sub.choices.items():
        actions = _own_options(subparser, common)
        lines += [f".SS {escape(name)}", escape(helps.get(name, "").rstrip(".") + "."),
                  ".PP", _command_synopsis(name, subparser, actions)]
        for action in actions:
            form = _option_form(action) if action.option_strings else _positional_form(action)
            _tp(lines, form, _help(subparser, action))
    lines += [".SH EXIT STATUS"]
    for code, meaning in exit_status:
        _tp(lines, _bold(str(code)), meaning)
    lines += [
        ".SH SEE ALSO",
        ",\n".join(f".BR {escape(page.split('(')[0])} ({page.split('(')[1]}"
                   for page in SEE_ALSO),
        ".PP",
        escape("The reference of the project: " + ", ".join(DOCS) + "."),
    ]
    return "\n".join(lines) + "\n"


def generate() -> str:
    """The man page of this checkout's ``rdm-backup``."""
    parser, output, errors, package = _modules()
    return render(parser.build_parser(), _exit_status(output, errors), package.__version__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write the man page rdm-backup(1).")
    parser.add_argument("-o", "--output", metavar="FILE", help="write here (default: stdout)")
    parser.add_argument("--check", metavar="FILE", nargs="?", const=str(DEFAULT_OUTPUT),
                        help="exit 1 when FILE (default: docs/rdm-backup.1) is not what "
                             "would be written")
    args = parser.parse_args(argv)
    page = generate()
    if args.check:
        if Path(args.check).read_text(encoding="utf-8") != page:
            sys.stderr.write(f"{args.check} is out of date: run make man\n")
            return 1
        return 0
    if args.output:
        Path(args.output).write_text(page, encoding="utf-8")
    else:
        sys.stdout.write(page)
    return 0


if __name__ == "__main__":
    sys.exit(main())
