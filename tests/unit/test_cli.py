"""The command line's contract: usage errors are one line with exit 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_rdm_backup.cli import main
from libvirt_rdm_backup.cli.parser import build_parser


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["backup"],
    ["backup", "vm"],
    ["restore", "vm", "--target", "/x", "--disk", "vdb"],
    ["list"],
    ["backup", "vm", "--target", "/x", "--bogus"],
    ["prune", "vm", "--target", "/x"],
    ["prune", "--target", "/x", "--keep-last", "1"],
    ["prune", "vm", "--all", "--target", "/x", "--keep-last", "1"],
    ["prune", "vm", "--keep-last", "1"],
    ["prune", "vm", "--target", "/x", "--keep-last", "0"],
    ["prune", "vm", "--target", "/x", "--keep-hourly", "-2"],
    ["prune", "vm", "--target", "/x", "--keep-daily", "x"],
    ["prune", "vm", "--target", "/x", "--keep-weekly", "1.5"],
    ["prune", "vm", "--target", "/x", "--keep-monthly", ""],
    ["prune", "vm", "--target", "/x", "--keep-yearly", "9" * 5000],
    ["prune", "vm", "--target", "/x", "--keep-last"],
    ["backup", "vm", "--target", "/x", "--prune"],
    ["backup", "vm", "--target", "/x", "--keep-daily", "7"],
    ["backup", "vm", "--target", "/x", "--prune", "--keep-daily", "0"],
])
def test_usage_errors(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rdm-backup: error:") and err.count("\n") == 1
    assert "Traceback" not in err


def test_missing_repository_is_not_found(tmp_path: Path, capsys: pytest.CaptureFixture[str]
                                         ) -> None:
    assert main(["list", "--target", str(tmp_path / "none")]) == 3
    assert main(["verify", "--target", str(tmp_path / "none")]) == 3
    assert capsys.readouterr().err.count("\n") == 2


def test_malformed_backup_id(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from libvirt_rdm_backup.repository.store import Repository

    Repository.open(str(tmp_path / "repo"), create=True)
    code = main(["verify", "--target", str(tmp_path / "repo"), "--backup", "../../etc/passwd"])
    assert code == 2
    assert "malformed backup id" in capsys.readouterr().err


def test_json_flag_accepted_before_and_after_command() -> None:
    parser = build_parser()
    assert parser.parse_args(["--json", "list", "--target", "d"]).json
    assert parser.parse_args(["list", "--target", "d", "--json"]).json


@pytest.mark.hostile
def test_control_characters_read_back_reach_the_terminal_escaped(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A manifest naming its domain with terminal escapes, and a damaged one whose problem
    holds them: list shows both as text."""
    import json as jsonlib

    from libvirt_rdm_backup.repository.store import Repository
    from tests.unit.test_repository_damage_units import UUID, publish

    repo = Repository.open(str(tmp_path / "repo"), create=True)
    good = publish(repo, "20261125T143000Z-aaaaaa", None, b"x" * 100)
    path = tmp_path / "repo" / UUID / good.backup_id / "manifest.json"
    document = jsonlib.loads(path.read_text())
    document["domain_name"] = "vm\x1b]0;owned\x07\x1b[2J"
    path.write_text(jsonlib.dumps(document))
    broken = publish(repo, "20261125T143100Z-bbbbbb", None, b"y" * 100)
    (tmp_path / "repo" / UUID / broken.backup_id / "manifest.json").write_bytes(
        b'{"format": "\x1b[31m')
    assert main(["list", "--target", str(tmp_path / "repo")]) == 5
    out, err = capsys.readouterr()
    assert "\x1b" not in out and "\x07" not in out and "vm\\x1b]0;owned\\x07" in out
    assert "\x1b" not in err and err.count("\n") == 1
