"""The command line's contract: usage errors are one line with exit 2, never a traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from libvirt_rdm_backup.cli import build_parser, main


@pytest.mark.parametrize("argv", [
    [],
    ["frobnicate"],
    ["backup"],
    ["backup", "vm"],
    ["restore", "vm", "--target", "/x", "--disk", "vdb"],
    ["list"],
    ["backup", "vm", "--target", "/x", "--bogus"],
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
