"""Lifecycle events store and the libvirt hook: round trips, rotation, hostile input, install."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import IO

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirt_rdm_backup import events, hook
from libvirt_rdm_backup.errors import OperationError, UsageError
from tests.oracles import hook_installed

UUID = "0b1f1c1e-4c39-4a4e-9d1c-2a6b3c4d5e6f"


def domain_xml(uuid: str = UUID, name: str = "vm1") -> bytes:
    return (f"<domain type='kvm'><name>{name}</name><uuid>{uuid}</uuid>"
            "<devices/></domain>").encode()


def line(time: str, event: str, pid: int | None = None) -> str:
    data: dict[str, object] = {"time": time, "event": event, "operation": event, "sub": "x"}
    if pid is not None:
        data["pid"] = pid
    return json.dumps(data) + "\n"


def write_lines(state: Path, *lines: str, uuid: str = UUID) -> None:
    state.mkdir(mode=0o700, exist_ok=True)
    with open(state / f"{uuid}.jsonl", "a", encoding="utf-8") as stream:
        stream.write("".join(lines))


def recorded(state: Path, uuid: str = UUID) -> list[events.Event]:
    return events.read_events(uuid, str(state))


# -- the events store --------------------------------------------------------------------------


def test_round_trip_and_modes(tmp_path: Path) -> None:
    state = tmp_path / "events"
    first = events.record_event(UUID, "started", "started", "begin", str(state), pid=4242)
    second = events.record_event(UUID.upper(), "stopped", "stopped", "end", str(state))
    assert recorded(state) == [first, second]
    assert first.pid == 4242 and second.pid is None
    assert first.time.endswith("Z") and len(first.time) == len("2026-11-25T14:03:11.123Z")
    path = state / f"{UUID}.jsonl"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.stat().st_mode) == 0o700
    lines = path.read_text().splitlines()
    assert json.loads(lines[0]) == {"time": first.time, "event": "started",
                                    "operation": "started", "sub": "begin", "pid": 4242}
    assert "pid" not in json.loads(lines[1])


def test_state_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(events.STATE_DIR_ENV, raising=False)
    assert events.events_dir() == events.DEFAULT_STATE_DIR == "/var/lib/libvirt-rdm-backup/events"
    monkeypatch.setenv(events.STATE_DIR_ENV, str(tmp_path / "env"))
    events.record_event(UUID, "reconnected", "reconnect", "begin")
    assert (tmp_path / "env" / f"{UUID}.jsonl").exists()
    assert events.events_dir(str(tmp_path / "arg")) == str(tmp_path / "arg")


@pytest.mark.parametrize("uuid", ["", "nope", "../../etc/passwd", UUID + "0", "x" * 500])
@pytest.mark.bad_input
def test_malformed_uuid_is_refused(tmp_path: Path, uuid: str) -> None:
    with pytest.raises(UsageError):
        events.record_event(uuid, "started", "started", "begin", str(tmp_path))
    with pytest.raises(UsageError):
        events.read_events(uuid, str(tmp_path))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.bad_input
def test_unknown_event_and_bad_pid_are_refused(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        events.record_event(UUID, "exploded", "x", "y", str(tmp_path))
    with pytest.raises(UsageError):
        events.record_event(UUID, "started", "x", "y", str(tmp_path), pid=0)


def test_fields_are_capped_and_printable(tmp_path: Path) -> None:
    event = events.record_event(UUID, "started", "a\nb" + "x" * 500, "\x00", str(tmp_path))
    assert event.operation.startswith("a?b") and len(event.operation) == events.MAX_FIELD_CHARS
    assert event.sub == "?"
    assert recorded(tmp_path) == [event]


def test_rotation_keeps_the_last_lines(tmp_path: Path) -> None:
    for pid in range(1, 13):
        events.record_event(UUID, "started", "started", "begin", str(tmp_path), pid=pid,
                            max_lines=5)
    assert [e.pid for e in recorded(tmp_path)] == [8, 9, 10, 11, 12]
    assert [p.name for p in tmp_path.iterdir()] == [f"{UUID}.jsonl"]  # no temporary files left
    assert stat.S_IMODE((tmp_path / f"{UUID}.jsonl").stat().st_mode) == 0o600


def test_rotation_at_the_default_cap(tmp_path: Path) -> None:
    write_lines(tmp_path, *(line("2026-01-01T00:00:00Z", "started", pid)
                            for pid in range(1, 1101)))
    events.record_event(UUID, "stopped", "stopped", "end", str(tmp_path), pid=9999)
    kept = recorded(tmp_path)
    assert len(kept) == events.MAX_LINES == 1000
    assert kept[0].pid == 102 and kept[-1].pid == 9999


def test_concurrent_writers_lose_nothing(tmp_path: Path) -> None:
    def writer(base: int, max_lines: int) -> None:
        for i in range(40):
            events.record_event(UUID, "started", "started", "begin", str(tmp_path),
                                pid=base + i, max_lines=max_lines)

    threads = [threading.Thread(target=writer, args=(1000 * (n + 1), 10_000)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(e.pid or 0 for e in recorded(tmp_path)) == sorted(
        1000 * (n + 1) + i for n in range(4) for i in range(40))

    other = tmp_path / "rotating"
    threads = [threading.Thread(target=lambda: [events.record_event(
        UUID, "stopped", "stopped", "end", str(other), max_lines=25) for _ in range(30)])
        for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    text = (other / f"{UUID}.jsonl").read_text()
    assert len(text.splitlines()) == 25 and len(recorded(other)) == 25


@pytest.mark.bad_input
def test_symlinked_event_file_is_not_followed(tmp_path: Path) -> None:
    victim = tmp_path / "victim"
    victim.write_text("precious\n")
    state = tmp_path / "events"
    state.mkdir()
    (state / f"{UUID}.jsonl").symlink_to(victim)
    with pytest.raises(OperationError):
        events.record_event(UUID, "started", "started", "begin", str(state))
    assert victim.read_text() == "precious\n"
    assert recorded(state) == []


@pytest.mark.bad_input
def test_malformed_lines_are_skipped(tmp_path: Path) -> None:
    good = [line("2026-11-25T14:00:00.000Z", "started", 7), line("2026-11-25T15:00:00Z", "stopped")]
    write_lines(
        tmp_path,
        "not json\n",
        good[0],
        "[1, 2, 3]\n",
        "\n",
        '{"time": "yesterday", "event": "started", "operation": "", "sub": ""}\n',
        '{"time": "2026-11-25T14:00:00Z", "event": "exploded", "operation": "", "sub": ""}\n',
        '{"time": "2026-11-25T14:00:00Z", "event": "started", "operation": 1, "sub": ""}\n',
        '{"time": "2026-11-25T14:00:00Z", "event": "started", "operation": "", "sub": "",'
        ' "pid": true}\n',
        '{"time": "2026-11-25T14:00:00Z", "event": "started", "operation": "", "sub": "",'
        ' "pid": -1}\n',
        '{"time": 5, "event": "started"}\n',
        line("2026-11-25T14:00:00Z", "started").rstrip("\n") + " " * 5000 + "\n",
        '{"time": "2026-11-25T14:00:00Z", "event": "started", "operation": "started", "sub": ',
        "\n",
    )
    with open(tmp_path / f"{UUID}.jsonl", "ab") as stream:
        stream.write(b"\xff\xfe\x00garbage\n" + good[1].encode() + b"{\n")
    assert [(e.event, e.pid) for e in recorded(tmp_path)] == [("started", 7), ("stopped", None)]


def test_unreadable_or_missing_file_reads_empty(tmp_path: Path) -> None:
    assert recorded(tmp_path / "nowhere") == []
    (tmp_path / f"{UUID}.jsonl").mkdir()  # EISDIR on read
    assert recorded(tmp_path) == []
    assert events.describe_restart(UUID, "2026-01-01T00:00:00Z", str(tmp_path)) is None


def test_events_since_and_describe_restart(tmp_path: Path) -> None:
    write_lines(
        tmp_path,
        line("2026-11-25T13:00:00.000Z", "started", 1),
        line("2026-11-25T14:03:11.250Z", "stopped", 1),
        line("2026-11-25T14:03:15.999Z", "started", 2),
        line("2026-11-25T14:10:00.000Z", "reconnected", 2),
    )
    since = events.events_since(UUID, "2026-11-25T14:00:00Z", str(tmp_path))
    assert [e.event for e in since] == ["stopped", "started", "reconnected"]
    # Offsets and naive times (taken as UTC) compare as instants.
    assert len(events.events_since(UUID, "2026-11-25T15:03:11.250+01:00", str(tmp_path))) == 3
    assert len(events.events_since(UUID, "2026-11-25T14:03:12", str(tmp_path))) == 2
    assert events.describe_restart(UUID, "2026-11-25T14:00:00Z", str(tmp_path)) == (
        "the VM was stopped at 2026-11-25T14:03:11Z and started at 2026-11-25T14:03:15Z")
    assert events.describe_restart(UUID, "2026-11-25T14:05:00Z", str(tmp_path)) is None
    assert events.describe_restart(UUID, "2026-11-25T14:03:12Z", str(tmp_path)) == (
        "the VM was started at 2026-11-25T14:03:15Z")
    assert events.describe_restart(UUID, "2026-11-25T12:00:00Z", str(tmp_path)) == (
        "the VM was started at 2026-11-25T13:00:00Z and started at 2026-11-25T14:03:15Z"
        " (3 stops and starts since 2026-11-25T12:00:00Z)")
    other = "11111111-2222-3333-4444-555555555555"
    assert events.describe_restart(other, "2026-11-25T12:00:00Z", str(tmp_path)) is None
    with pytest.raises(UsageError):
        events.events_since(UUID, "last tuesday", str(tmp_path))


def test_describe_restored_and_migrated(tmp_path: Path) -> None:
    write_lines(tmp_path, line("2026-11-25T10:00:00Z", "stopped"),
                line("2026-11-25T10:05:00Z", "restored"))
    assert events.describe_restart(UUID, "2026-11-25T09:00:00Z", str(tmp_path)) == (
        "the VM was stopped at 2026-11-25T10:00:00Z and restored from a saved state at "
        "2026-11-25T10:05:00Z")
    write_lines(tmp_path, line("2026-11-25T11:00:00Z", "migrated"))
    assert events.describe_restart(UUID, "2026-11-25T10:30:00Z", str(tmp_path)) == (
        "the VM was migrated in at 2026-11-25T11:00:00Z")


# -- the hook ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("operation", "sub", "kind"), [
    ("started", "begin", "started"),
    ("stopped", "end", "stopped"),
    ("migrate", "begin", "migrated"),
    ("restore", "begin", "restored"),
    ("reconnect", "begin", "reconnected"),
    ("prepare", "begin", None),
    ("start", "begin", None),
    ("release", "end", None),
    ("attach", "begin", None),
    ("started", "end", None),
    ("stopped", "begin", None),
    ("", "", None),
])
def test_event_for(operation: str, sub: str, kind: str | None) -> None:
    assert hook.event_for(operation, sub) == kind


def run_hook(argv: list[str], stdin: IO[str] | IO[bytes], state: Path, run_dir: Path,
             capsys: pytest.CaptureFixture[str]) -> str:
    """Run main(); check its contract (0, nothing on stdout); return stderr."""
    assert hook.main(argv, stdin, state_dir=str(state), run_dir=str(run_dir)) == 0
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") <= 1
    return err


def test_main_records_events_with_pid(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    state, run_dir = tmp_path / "events", tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "vm1.pid").write_text("4242")
    for operation, sub in [("prepare", "begin"), ("start", "begin"), ("started", "begin"),
                           ("stopped", "end"), ("release", "end"), ("migrate", "begin"),
                           ("restore", "begin"), ("reconnect", "begin"), ("attach", "begin")]:
        err = run_hook(["vm1", operation, sub, "-"], io.BytesIO(domain_xml()), state, run_dir,
                       capsys)
        assert err == ""
    assert [(e.event, e.operation, e.sub, e.pid) for e in recorded(state)] == [
        ("started", "started", "begin", 4242),
        ("stopped", "stopped", "end", 4242),
        ("migrated", "migrate", "begin", None),
        ("restored", "restore", "begin", None),
        ("reconnected", "reconnect", "begin", 4242),
    ]


def test_main_accepts_text_stdin(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = io.StringIO(domain_xml(UUID.upper()).decode())
    run_hook(["vm1", "started", "begin", "-"], text, tmp_path, tmp_path, capsys)
    assert [e.event for e in recorded(tmp_path)] == ["started"]


@pytest.mark.parametrize("name", [
    "../../../../etc/passwd", "a/../../b", "$(touch /tmp/rdmb-pwned)", "`id`", "a\nb", "",
    "-", ".", "..", "x" * 100_000, "\x00", "vm1.pid", "\udcff", "--help",
])
@pytest.mark.bad_input
def test_hostile_names(tmp_path: Path, name: str, capsys: pytest.CaptureFixture[str]) -> None:
    state, run_dir = tmp_path / "events", tmp_path / "run"
    run_dir.mkdir()
    (tmp_path / "passwd.pid").write_text("1")
    run_hook([name, "started", "begin", "-"], io.BytesIO(domain_xml(name="x")), state, run_dir,
             capsys)
    assert [(e.event, e.pid) for e in recorded(state)] == [("started", None)]
    assert sorted(p.name for p in state.iterdir()) == [f"{UUID}.jsonl"]
    assert not os.path.exists("/tmp/rdmb-pwned")


class Exploding(io.RawIOBase):
    """A stdin whose read raises."""

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def readable(self) -> bool:
        return True

    def read(self, size: int | None = -1) -> bytes:
        raise self.exc


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<domain><uuid>&lol3;</uuid></domain>"""
XXE = b"""<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/hostname">]>
<domain><uuid>&x;</uuid></domain>"""


@pytest.mark.parametrize("stdin", [
    b"",
    b"not xml at all",
    b"<domain>",
    b"<domain><uuid>" + b"\xff\xfe" + b"</uuid></domain>",
    BILLION_LAUGHS,
    XXE,
    b"<domain><name>x</name></domain>",
    b"<domain><uuid></uuid></domain>",
    b"<domain><uuid>../../etc/passwd</uuid></domain>",
    b"<domain><uuid>" + b"a" * 100_000 + b"</uuid></domain>",
    b"<network><uuid>" + UUID.encode() + b"</uuid></network>",
    b"<domain xmlns:x='urn:x'><x:uuid>" + UUID.encode() + b"</x:uuid></domain>",
    b"<?xml-stylesheet href='http://example.invalid/x.xsl'?><domain><uuid>bad</uuid></domain>",
    # Deeper than libxml2 accepts without huge_tree (256 levels).
    b"<domain><uuid>" + UUID.encode() + b"</uuid>" + b"<a>" * 300 + b"</a>" * 300 + b"</domain>",
])
@pytest.mark.bad_input
def test_hostile_xml_never_fails(tmp_path: Path, stdin: bytes,
                                 capsys: pytest.CaptureFixture[str]) -> None:
    err = run_hook(["vm1", "started", "begin", "-"], io.BytesIO(stdin), tmp_path, tmp_path, capsys)
    assert err.startswith("libvirt-rdm-backup hook: ") and len(err) < 400
    assert recorded(tmp_path) == []


@pytest.mark.bad_input
def test_huge_xml_is_drained_and_ignored(tmp_path: Path,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    body = domain_xml() + b"<!--" + b"x" * (hook.MAX_XML_BYTES + 10) + b"-->"
    stream = io.BytesIO(body)
    err = run_hook(["vm1", "started", "begin", "-"], stream, tmp_path, tmp_path, capsys)
    assert "larger than" in err
    assert stream.tell() == len(body)  # all read: the writer (libvirtd) never sees EPIPE
    assert recorded(tmp_path) == []


@pytest.mark.parametrize("argv", [[], ["vm1"], ["vm1", "started"]])
@pytest.mark.bad_input
def test_short_argv(tmp_path: Path, argv: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    run_hook(argv, io.BytesIO(domain_xml()), tmp_path, tmp_path, capsys)
    assert recorded(tmp_path) == []


@pytest.mark.parametrize("exc", [OSError("gone"), ValueError("closed"), KeyboardInterrupt(),
                                 MemoryError()])
def test_failing_stdin(tmp_path: Path, exc: BaseException,
                       capsys: pytest.CaptureFixture[str]) -> None:
    run_hook(["vm1", "started", "begin", "-"], io.BufferedReader(Exploding(exc)), tmp_path,
             tmp_path, capsys)
    run_hook(["vm1", "prepare", "begin", "-"], io.BufferedReader(Exploding(exc)), tmp_path,
             tmp_path, capsys)


def test_unwritable_state_dir(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    err = run_hook(["vm1", "started", "begin", "-"], io.BytesIO(domain_xml()), blocker / "sub",
                   tmp_path, capsys)
    assert "OperationError" in err


def test_pid_file_checks(tmp_path: Path) -> None:
    (tmp_path / "ok.pid").write_text("123\n")
    (tmp_path / "junk.pid").write_text("12abc")
    (tmp_path / "huge.pid").write_text("99999999999")
    (tmp_path / "dir.pid").mkdir()
    (tmp_path / "link.pid").symlink_to(tmp_path / "ok.pid")
    os.mkfifo(tmp_path / "fifo.pid")
    assert hook.qemu_pid("ok", str(tmp_path)) == 123
    for name in ["junk", "huge", "dir", "link", "fifo", "missing", "../x", ""]:
        assert hook.qemu_pid(name, str(tmp_path)) is None


def test_uuid_from_xml_canonical() -> None:
    assert hook.uuid_from_xml(domain_xml(" " + UUID.upper() + "\n")) == UUID
    assert hook.uuid_from_xml(domain_xml(UUID.replace("-", ""))) == UUID


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=st.lists(st.text(max_size=40), max_size=6), data=st.binary(max_size=300))
@pytest.mark.bad_input
def test_fuzzed_calls_never_fail(tmp_path: Path, argv: list[str], data: bytes) -> None:
    assert hook.main(argv, io.BytesIO(data), state_dir=str(tmp_path / "s"),
                     run_dir=str(tmp_path)) == 0


# -- install -----------------------------------------------------------------------------------


def test_install_uninstall(tmp_path: Path) -> None:
    hooks = tmp_path / "hooks"
    assert not hook_installed(str(hooks))
    assert hook.uninstall(str(hooks)) is False
    message = hook.install(str(hooks), python=sys.executable, state_dir=str(tmp_path / "st ate"))
    assert "restart libvirtd" in message
    script = hooks / "qemu.d" / "50-libvirt-rdm-backup"
    assert stat.S_IMODE(script.stat().st_mode) == 0o755
    text = script.read_text()
    assert text.startswith("#!/bin/sh\n") and hook.MARKER in text
    assert f"{sys.executable} -I -m libvirt_rdm_backup.hook \"$@\"" in text
    assert f"RDM_BACKUP_STATE_DIR='{tmp_path / 'st ate'}'" in text
    assert hook_installed(str(hooks))
    assert sorted(p.name for p in hooks.iterdir()) == ["qemu.d"]  # no temporary file left
    hook.install(str(hooks), python=sys.executable)  # replaces
    assert "RDM_BACKUP_STATE_DIR" not in script.read_text()
    assert hook.uninstall(str(hooks)) is True
    assert not script.exists() and not hook_installed(str(hooks))
    assert hook.uninstall(str(hooks)) is False


@pytest.mark.bad_input
def test_install_refusals(tmp_path: Path) -> None:
    with pytest.raises(UsageError):
        hook.install(str(tmp_path), python="python3")
    foreign = tmp_path / "qemu.d" / "50-libvirt-rdm-backup"
    foreign.parent.mkdir()
    foreign.write_text("#!/bin/sh\nexit 0\n")
    assert not hook_installed(str(tmp_path))
    with pytest.raises(UsageError):
        hook.uninstall(str(tmp_path))
    assert foreign.exists()


def run_script(script: Path, argv: list[str], stdin: bytes) -> subprocess.CompletedProcess[bytes]:
    env = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C", "HOME": "/root"}
    return subprocess.run([str(script), *argv], input=stdin, capture_output=True, env=env,
                          cwd="/", timeout=60, check=False)


def test_installed_script_runs(tmp_path: Path) -> None:
    hooks, state = tmp_path / "hooks", tmp_path / "state"
    hook.install(str(hooks), python=sys.executable, state_dir=str(state))
    script = hooks / "qemu.d" / "50-libvirt-rdm-backup"
    proc = run_script(script, ["vm1", "started", "begin", "-"], domain_xml())
    assert (proc.returncode, proc.stdout) == (0, b""), proc.stderr
    proc = run_script(script, ["vm1", "prepare", "begin", "-"], domain_xml())
    assert (proc.returncode, proc.stdout) == (0, b"")
    proc = run_script(script, ["vm1", "restore", "begin", "-"], b"<domain>broken")
    assert (proc.returncode, proc.stdout) == (0, b"")
    assert [e.event for e in recorded(state)] == ["started"]


@pytest.mark.parametrize("python", ["/nonexistent/python3", "/bin/false"])
def test_installed_script_survives_a_broken_python(tmp_path: Path, python: str) -> None:
    hook.install(str(tmp_path), python=python, state_dir=str(tmp_path / "state"))
    proc = run_script(tmp_path / "qemu.d" / "50-libvirt-rdm-backup",
                      ["vm1", "started", "begin", "-"], domain_xml())
    assert (proc.returncode, proc.stdout) == (0, b"")
