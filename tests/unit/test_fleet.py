"""``backup --all`` without the lab: exclusion patterns, the severity order, the status file,
the options passed on to each domain's backup, and the runner of the child backups."""

from __future__ import annotations

import json
import os
import signal
import stat
import sys
import threading
from pathlib import Path

import pytest

from libvirt_rdm_backup.cli import main
from libvirt_rdm_backup.cli.fleet import forwarded_options
from libvirt_rdm_backup.cli.parser import build_parser
from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.fleet.runner import DomainResult, Runner
from libvirt_rdm_backup.fleet.selection import Candidate, check_patterns, exclusion
from libvirt_rdm_backup.fleet.severity import SEVERITY, most_severe
from libvirt_rdm_backup.fleet.status import (
    STATUS_NAME,
    Entry,
    StatusFile,
    parse_status,
    status_path,
)
from libvirt_rdm_backup.repository.store import Repository

UUID1 = "0b0e4a36-7c63-4d7e-9a5e-1f2b3c4d5e61"
UUID2 = "9f1c2d3e-4b5a-4c6d-8e7f-a0b1c2d3e4f5"

# -- which domains --------------------------------------------------------------------------


def test_exclusion_matches_names_and_uuids() -> None:
    patterns = ["test-*", "db?", UUID2.upper()[:8] + "*"]
    assert exclusion("test-web", UUID1, patterns) == "test-*"
    assert exclusion("db1", UUID1, patterns) == "db?"
    assert exclusion("db10", UUID1, patterns) is None
    assert exclusion("web", UUID2, patterns) == UUID2.upper()[:8] + "*"
    assert exclusion("Test-web", UUID1, patterns) is None  # names are case-sensitive
    assert exclusion("web", UUID1, ["w*[!b]"]) is None
    assert exclusion("app", UUID1, ["[!w]*"]) == "[!w]*"
    assert exclusion("web", UUID1, ["[!w]*"]) == "[!w]*"  # the UUID does not start with w
    assert exclusion("web", UUID1, []) is None


@pytest.mark.bad_input
@pytest.mark.parametrize("pattern", ["", "a\nb", "x" * 2000, "tab\there"])
def test_malformed_patterns_are_refused(pattern: str) -> None:
    with pytest.raises(UsageError):
        check_patterns([pattern])


# -- which exit code ------------------------------------------------------------------------


@pytest.mark.parametrize(("codes", "expected"), [
    ([], 0), ([0, 0], 0), ([0, 2], 2), ([2, 3], 3), ([3, 4, 2], 4), ([4, 5, 0], 5),
    ([1], 4), ([-15, 2], 4), ([127, 5], 5),
])
def test_most_severe_code(codes: list[int], expected: int) -> None:
    assert most_severe(codes) == expected


def test_severity_order_is_documented() -> None:
    text = (Path(__file__).resolve().parents[2] / "docs" / "exit-codes.md").read_text()
    assert " > ".join(str(c) for c in SEVERITY) in text


# -- the status file ------------------------------------------------------------------------


def _entry(uuid: str = UUID1, code: int = 0, **fields: object) -> Entry:
    values: dict[str, object] = dict(domain="vm1", uuid=uuid, when="2026-12-07T01:00:00.000Z",
                                     id="20261207T010000Z-1a2b3c", level="full",
                                     exit_code=code, error=None, skipped=None)
    values.update(fields)
    return Entry(**values)  # type: ignore[arg-type]


def test_status_path_of_each_kind_of_target(tmp_path: Path) -> None:
    assert status_path(str(tmp_path / "repo")) == str(tmp_path / "repo" / STATUS_NAME)
    nbd = status_path("nbds://backup.example:10809/backups", str(tmp_path))
    assert os.path.dirname(nbd) == str(tmp_path) and nbd.endswith(".json")
    assert nbd != status_path("nbds://backup.example:10809/other", str(tmp_path))
    with pytest.raises(UsageError):
        status_path("nbd://host:notaport/x")


def test_status_waits_for_the_repository_then_holds_every_domain(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    status = StatusFile(str(root))
    status.record(_entry())
    assert not root.exists() and status.unwritten == 1  # a new repository must start empty
    Repository.open(str(root), create=True)
    status.record(_entry(UUID2, 4, domain="vm2", id=None, level=None, error="it failed"))
    assert status.unwritten == 0
    path = root / STATUS_NAME
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    doc = json.loads(path.read_text())
    assert doc["format"] == "libvirt-rdm-backup/status" and doc["target"] == str(root)
    assert doc["domains"][UUID1]["result"] == "ok"
    assert doc["domains"][UUID2] == {
        "domain": "vm2", "uuid": UUID2, "when": "2026-12-07T01:00:00.000Z", "id": None,
        "level": None, "result": "failed", "exit_code": 4, "error": "it failed",
        "skipped": None}
    assert sorted(os.listdir(root)) == [".rdm-backup-status.lock",
                                        "rdm-backup-repository.json", STATUS_NAME]


def test_status_runs_side_by_side_keep_each_others_entries(tmp_path: Path) -> None:
    root = tmp_path / "repo"
    Repository.open(str(root), create=True)
    first, second = StatusFile(str(root)), StatusFile(str(root))
    first.record(_entry(UUID1))
    second.record(_entry(UUID2, domain="vm2"))
    first.record(_entry(UUID1, 3, error="gone", id=None))
    entries = parse_status((root / STATUS_NAME).read_bytes())
    assert set(entries) == {UUID1, UUID2} and entries[UUID1].exit_code == 3


def test_status_replacement_is_atomic(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A write that fails halfway leaves the old file whole and no temporary file."""
    root = tmp_path / "repo"
    Repository.open(str(root), create=True)
    status = StatusFile(str(root))
    status.record(_entry())
    before = (root / STATUS_NAME).read_bytes()

    def broken(*_args: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", broken)
    StatusFile(str(root)).record(_entry(UUID2))
    assert (root / STATUS_NAME).read_bytes() == before
    assert not [n for n in os.listdir(root) if ".tmp-" in n]


@pytest.mark.hostile
@pytest.mark.parametrize("content", [
    b"not json", b"[]", b'{"format": "other", "version": 1, "domains": {}}',
    b'{"format": "libvirt-rdm-backup/status", "version": 2, "domains": {}}',
    json.dumps({"format": "libvirt-rdm-backup/status", "version": 1,
                "domains": {UUID1: {"domain": "vm1"}}}).encode(),
    json.dumps({"format": "libvirt-rdm-backup/status", "version": 1,
                "domains": {UUID2: _entry().to_dict()}}).encode(),  # key is not its uuid
    json.dumps({"format": "libvirt-rdm-backup/status", "version": 1,
                "domains": {UUID1: {**_entry().to_dict(), "exit_code": True}}}).encode(),
    json.dumps({"format": "libvirt-rdm-backup/status", "version": 1,
                "domains": {UUID1: {**_entry().to_dict(), "error": "a\x1b[2Jb"}}}).encode(),
    json.dumps({"format": "libvirt-rdm-backup/status", "version": 1,
                "domains": {UUID1: {**_entry().to_dict(), "result": "failed"}}}).encode(),
    b" " * (5 << 20),
])
def test_a_status_file_not_ours_is_replaced_with_a_warning(
        tmp_path: Path, content: bytes, caplog: pytest.LogCaptureFixture) -> None:
    root = tmp_path / "repo"
    Repository.open(str(root), create=True)
    (root / STATUS_NAME).write_bytes(content)
    StatusFile(str(root)).record(_entry(UUID2, domain="vm2"))
    assert "is not one rdm-backup writes" in caplog.text and "starting a new one" in caplog.text
    assert set(parse_status((root / STATUS_NAME).read_bytes())) == {UUID2}


@pytest.mark.hostile
def test_a_status_file_that_is_a_symlink_is_not_followed(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    root = tmp_path / "repo"
    Repository.open(str(root), create=True)
    elsewhere = tmp_path / "elsewhere.json"
    elsewhere.write_text("precious")
    (root / STATUS_NAME).symlink_to(elsewhere)
    StatusFile(str(root)).record(_entry())
    assert elsewhere.read_text() == "precious"
    assert not (root / STATUS_NAME).is_symlink() and "starting a new one" in caplog.text


# -- what each domain's backup is given ------------------------------------------------------


def test_only_per_domain_options_are_passed_on() -> None:
    parser = build_parser()
    argv = ["backup", "--all", "--target", "/r", "--jobs", "3", "--exclude", "a*", "--json",
            "-c", "qemu+tcp://u:secret@h/system", "--level", "full", "--quiesce",
            "--bwlimit", "12.5", "--chain", "weekly", "--max-pause", "7"]
    args = parser.parse_args(argv)
    passed = forwarded_options(args.backup_parser, args)
    assert passed == ["--level=full", "--quiesce", "--chain=weekly", "--max-pause=7.0",
                      "--bwlimit=12.5"]
    again = parser.parse_args(["backup", "vm", "--target", "/r", *passed])
    for name in ("level", "quiesce", "chain", "max_pause", "bwlimit"):
        assert getattr(again, name) == getattr(args, name)
    required = parser.parse_args(["backup", "--all", "--target", "/r", "--quiesce=required"])
    assert forwarded_options(required.backup_parser, required) == ["--quiesce=required"]
    pruned = parser.parse_args(["backup", "--all", "--target", "/r", "--prune",
                                "--keep-daily", "7", "--keep-last", "2"])
    assert forwarded_options(pruned.backup_parser, pruned) == [
        "--prune", "--keep-last=2", "--keep-daily=7"]


@pytest.mark.bad_input
@pytest.mark.parametrize("argv", [
    ["backup", "--all", "--target", "/r", "--disk", "vdb"],
    ["backup", "vm", "--all", "--target", "/r"],
    ["backup", "--target", "/r"],
    ["backup", "vm", "--target", "/r", "--jobs", "2"],
    ["backup", "vm", "--target", "/r", "--exclude", "x"],
    ["backup", "--all", "--target", "/r", "--jobs", "0"],
    ["backup", "--all", "--target", "/r", "--jobs", "many"],
    ["backup", "--all", "--target", "/r", "--exclude", ""],
    ["backup", "--all", "--target", "/r", "--chain", "../x"],
    ["backup", "--all", "--target", "/r", "--keep-daily", "7"],
    ["backup", "--all", "--target", "/r", "--prune"],
    ["backup", "--all", "--target", "/r", "--agent", "ssh://[::1"],
    ["backup", "--all", "--target", "/r", "--agent", "ssh://h", "--agent-identity", "/none"],
])
def test_usage_errors_of_all(argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("rdm-backup: error: ") and err.count("\n") == 1


# -- the runner ------------------------------------------------------------------------------

CHILD = r"""
import json, os, signal, sys, time
name, mode, marks = sys.argv[1], sys.argv[2], sys.argv[3]
open(os.path.join(marks, name + ".start"), "w").close()
if mode == "ok":
    time.sleep(0.3)
    print(json.dumps({"backup_id": "20261207T010000Z-" + name[-6:].rjust(6, "0"),
                      "level": "full", "bytes_transferred": 1234}))
elif mode == "fail5":
    sys.stderr.write("rdm-backup: WARNING: something\nrdm-backup: error: backup X: damaged\n")
    sys.exit(5)
elif mode == "slow":
    def stop(*_):
        open(os.path.join(marks, name + ".term"), "w").close()
        sys.stderr.write("rdm-backup: error: interrupted, the operation did not complete\n")
        sys.exit(4)
    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    time.sleep(60)
"""


def _runner(tmp_path: Path, modes: dict[str, str], jobs: int,
            done: list[DomainResult]) -> Runner:
    script = tmp_path / "child.py"
    script.write_text(CHILD)
    names = {c: n for n, c in modes.items()}
    return Runner(lambda c: [sys.executable, str(script), c.name, names[c.name],
                             str(tmp_path)], jobs, done.append)


def test_runner_reports_each_domain_and_runs_them_side_by_side(tmp_path: Path) -> None:
    done: list[DomainResult] = []
    runner = _runner(tmp_path, {"ok": "a", "fail5": "b"}, 2, done)
    found = [Candidate("a", UUID1), Candidate("b", UUID2), Candidate("c", "u3", "no raw disks")]
    results = runner.run(found)
    assert [r.domain for r in results] == ["a", "b", "c"]
    assert done[0].domain == "c"  # the skipped one is known first
    a, b, c = results
    assert (a.exit_code, a.id, a.level, a.bytes, a.error) == (
        0, "20261207T010000Z-00000a", "full", 1234, None)
    assert a.seconds is not None and a.seconds >= 0.3
    assert (b.exit_code, b.id, b.error) == (5, None, "backup X: damaged")
    assert (c.exit_code, c.skipped) == (0, "no raw disks")
    assert c.to_dict() == {"id": None, "domain": "c", "uuid": "u3", "level": None,
                           "bytes": None, "seconds": None, "error": None, "exit_code": 0,
                           "skipped": "no raw disks"}
    assert most_severe(r.exit_code for r in results) == 5


@pytest.mark.fault
def test_runner_cancels_running_backups_and_starts_no_more(tmp_path: Path) -> None:
    done: list[DomainResult] = []
    runner = _runner(tmp_path, {"slow": "a", "ok": "b"}, 1, done)

    def interrupt() -> None:
        for _ in range(100):
            if (tmp_path / "a.start").exists():
                break
            threading.Event().wait(0.1)
        os.kill(os.getpid(), signal.SIGINT)

    # Python's own SIGINT handler, as in the command (a test runner's worker may ignore it)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        threading.Thread(target=interrupt).start()
        results = runner.run([Candidate("a", UUID1), Candidate("b", UUID2)])
    finally:
        signal.signal(signal.SIGINT, previous)
    assert runner.interrupted
    assert (tmp_path / "a.term").exists() and not (tmp_path / "b.start").exists()
    assert (results[0].exit_code, results[0].error) == (
        4, "interrupted, the operation did not complete")
    assert (results[1].exit_code, results[1].started) == (4, False)
    assert [r.domain for r in done] == ["a"]  # never-started ones are not recorded


def test_the_libvirt_uri_reaches_each_backup_in_its_environment_not_its_argv(
        monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
        ) -> None:
    """A password in ``-c`` would be visible in the process list on a child's command line."""
    from contextlib import nullcontext

    from libvirt_rdm_backup.cli import fleet as cli_fleet

    seen: dict[str, object] = {}

    class Recorder:
        interrupted = False

        def __init__(self, argv: object, jobs: int, done: object, env: dict[str, str],
                     verbose: bool = False) -> None:
            seen.update(argv=argv, env=env)

        def run(self, found: list[Candidate]) -> list[DomainResult]:
            return []

    monkeypatch.setattr(cli_fleet, "connection", lambda *_a, **_k: nullcontext())
    monkeypatch.setattr(cli_fleet, "candidates", lambda *_a: [])
    monkeypatch.setattr(cli_fleet, "Runner", Recorder)
    uri = "qemu+tcp://admin:s3cret@hv1/system"
    assert main(["backup", "--all", "--target", str(tmp_path), "-c", uri, "--quiesce"]) == 0
    argv = seen["argv"](Candidate("vm", UUID1))  # type: ignore[operator]
    assert "s3cret" not in " ".join(argv) and argv[-2:] == ["--json", "--quiesce"]
    assert argv[argv.index("backup") + 1] == UUID1
    assert seen["env"]["LIBVIRT_DEFAULT_URI"] == uri  # type: ignore[index]
    assert capsys.readouterr().out == "no domains to back up\n"


def test_one_writer_at_a_time_to_an_nbd_volume(caplog: pytest.LogCaptureFixture) -> None:
    from libvirt_rdm_backup.fleet.target import writers

    assert writers("/srv/repo", 4) == 4
    assert writers("nbd+unix:///backups?socket=/run/b.sock", 1) == 1 and not caplog.text
    assert writers("nbds://backup.example/backups", 4) == 1
    assert "one writer at a time" in caplog.text


def test_the_repository_is_made_before_backups_start_side_by_side(tmp_path: Path) -> None:
    from libvirt_rdm_backup.fleet.target import create_repository

    create_repository(str(tmp_path / "new"))
    assert (tmp_path / "new" / "rdm-backup-repository.json").exists()
    create_repository(str(tmp_path / "new"))  # an existing one is fine
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "photo.jpg").write_bytes(b"x")
    with pytest.raises(UsageError):
        create_repository(str(tmp_path / "other"))
    create_repository("nbds://backup.example/backups")  # a volume: nothing to make here


def test_entries_never_written_are_named_once_at_the_end(tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture
                                                         ) -> None:
    status = StatusFile(str(tmp_path / "none"))
    status.record(_entry())
    assert not caplog.text
    status.finish()
    assert caplog.text.count("not written") == 1 and status.unwritten == 1
