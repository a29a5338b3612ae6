"""Lifecycle events of domains, as recorded by the libvirt hook (:mod:`libvirt_rdm_backup.hook`).

QEMU dirty bitmaps live in the QEMU process: they are gone once it stops. The hook records
when QEMU processes start and stop, so that the backup engine can say why a bitmap is missing
("the VM was stopped at ... and started at ...").

Layout: one append-only JSON-lines file per domain UUID in the events directory (default
``/var/lib/libvirt-rdm-backup/events``, else ``$RDM_BACKUP_STATE_DIR``, else the ``state_dir``
argument of each function; the directory is 0700, files are 0600)::

    <state_dir>/<uuid>.jsonl

Each line::

    {"time": "2026-11-25T14:03:11.123Z", "event": "started", "operation": "started",
     "sub": "begin", "pid": 4242}

``event`` is one of :data:`EVENT_KINDS`; ``operation`` and ``sub`` are libvirt's hook
arguments as given; ``pid`` (QEMU's pid) is present when it was known. A file keeps its last
:data:`MAX_LINES` lines. Readers skip malformed lines.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import uuid as uuidlib
from dataclasses import dataclass
from datetime import UTC, datetime

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import OperationError, UsageError
from libvirt_rdm_backup.fileutil import fsync_dir, write_atomic

log = logging.getLogger(__name__)

DEFAULT_STATE_DIR = "/var/lib/libvirt-rdm-backup/events"
STATE_DIR_ENV = "RDM_BACKUP_STATE_DIR"
EVENT_KINDS: tuple[str, ...] = ("started", "stopped", "migrated", "restored", "reconnected")
#: Events after which a new QEMU process runs (its dirty bitmaps are new and empty).
NEW_PROCESS_KINDS: tuple[str, ...] = ("started", "restored", "migrated")
MAX_LINES = 1000
MAX_FIELD_CHARS = 64
MAX_LINE_BYTES = 4096
LOCK_TIMEOUT = 5.0


@dataclass(frozen=True)
class Event:
    """One recorded lifecycle event."""

    time: str
    event: str
    operation: str
    sub: str
    pid: int | None = None

    @property
    def when(self) -> datetime:
        """``time`` as an aware UTC datetime."""
        parsed = _parse_time(self.time)
        if parsed is None:
            raise ValueError(f"malformed event time {self.time!r:.80}")
        return parsed

    def to_line(self) -> bytes:
        """The JSON line (with its newline) stored for this event."""
        data: dict[str, object] = {
            "time": self.time, "event": self.event, "operation": self.operation, "sub": self.sub,
        }
        if self.pid is not None:
            data["pid"] = self.pid
        return (json.dumps(data, ensure_ascii=True, separators=(", ", ": ")) + "\n").encode()

    @classmethod
    def from_line(cls, line: bytes | str) -> Event | None:
        """Parse one stored line; None when it is malformed."""
        if len(line) > MAX_LINE_BYTES:
            return None
        try:
            data = json.loads(line)
        except ValueError:
            return None
        if not isinstance(data, dict):
            return None
        stamp, kind = data.get("time"), data.get("event")
        operation, sub, pid = data.get("operation", ""), data.get("sub", ""), data.get("pid")
        if not (isinstance(stamp, str) and _parse_time(stamp) is not None):
            return None
        if kind not in EVENT_KINDS or not isinstance(operation, str) or not isinstance(sub, str):
            return None
        if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0):
            return None
        return cls(stamp, str(kind), operation, sub, pid)


def _now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _parse_time(text: str) -> datetime | None:
    """An ISO 8601 time as aware UTC (a naive time is taken as UTC); None when malformed."""
    if len(text) > 64:
        return None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        return None
    if parsed.tzinfo is None:
        return parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC)


def _short_time(event: Event) -> str:
    """The event's time to the second, for messages: ``2026-11-25T14:03:11Z``."""
    return event.when.strftime("%Y-%m-%dT%H:%M:%SZ")


def check_uuid(domain_uuid: str) -> str:
    """The canonical form of a domain UUID (raises UsageError when malformed)."""
    if not isinstance(domain_uuid, str) or len(domain_uuid) > 64:
        raise UsageError(f"malformed domain UUID {domain_uuid!r:.80}")
    try:
        return str(uuidlib.UUID(domain_uuid.strip()))
    except ValueError as err:
        raise UsageError(f"malformed domain UUID {domain_uuid!r}") from err


def events_dir(state_dir: str | None = None) -> str:
    """The events directory: ``state_dir``, else ``$RDM_BACKUP_STATE_DIR``, else the default."""
    return os.path.abspath(state_dir or os.environ.get(STATE_DIR_ENV) or DEFAULT_STATE_DIR)


def events_file(domain_uuid: str, state_dir: str | None = None) -> str:
    """Path of a domain's event file."""
    return os.path.join(events_dir(state_dir), check_uuid(domain_uuid) + ".jsonl")


def _clean_field(value: str) -> str:
    return "".join(c if c.isprintable() else "?" for c in str(value)[:MAX_FIELD_CHARS])


def _open_locked(path: str) -> int:
    """Open (create) ``path`` for appending, locked, and still the file the name points to.

    A rotation replaces the file by a rename; a writer that locked the old file retries.
    """
    fd = retry.flock_wait(path, LOCK_TIMEOUT)(_try_open_locked, path)
    if fd is None:  # retried by the policy, never returned
        raise OperationError(f"cannot open {path}")
    return fd


def _try_open_locked(path: str) -> int | None:
    """One attempt of :func:`_open_locked`: the locked descriptor; None when the file was
    renamed away meanwhile; BlockingIOError when another process holds the lock."""
    fd = os.open(
        path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
    )
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        opened, named = os.fstat(fd), os.stat(path, follow_symlinks=False)
        if (opened.st_dev, opened.st_ino) == (named.st_dev, named.st_ino):
            return fd
    except FileNotFoundError:
        pass  # renamed away between open and stat: open again
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


def _rotate(path: str, max_lines: int) -> None:
    """Keep the last ``max_lines`` lines of ``path`` (called with the file locked)."""
    with open(path, "rb") as stream:
        lines = stream.read().splitlines(keepends=True)
    if len(lines) <= max_lines:
        return
    write_atomic(path, b"".join(lines[-max_lines:]))


def record_event(
    uuid: str,
    event: str,
    operation: str,
    sub: str,
    state_dir: str | None = None,
    *,
    pid: int | None = None,
    max_lines: int = MAX_LINES,
) -> Event:
    """Append one event to the domain's file (one O_APPEND write, synced); returns it.

    Raises UsageError for a malformed UUID or an unknown event kind, OperationError when the
    file cannot be written.
    """
    if event not in EVENT_KINDS:
        raise UsageError(f"unknown event kind {event!r}")
    if pid is not None and (isinstance(pid, bool) or not isinstance(pid, int) or pid <= 0):
        raise UsageError(f"malformed pid {pid!r}")
    record = Event(_now_iso(), event, _clean_field(operation), _clean_field(sub), pid)
    directory = events_dir(state_dir)
    path = events_file(uuid, state_dir)
    try:
        created_dir = not os.path.isdir(directory)
        if created_dir:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        created_file = not os.path.lexists(path)
        fd = _open_locked(path)
        try:
            os.write(fd, record.to_line())
            os.fsync(fd)
            if created_file:
                fsync_dir(directory)
            _rotate(path, max(1, max_lines))
        finally:
            os.close(fd)
    except OSError as err:
        raise OperationError(f"cannot record event in {path}: {err}") from err
    return record


def read_events(uuid: str, state_dir: str | None = None) -> list[Event]:
    """Every readable event of a domain, in file order; [] when there are none.

    Malformed lines are skipped; an unreadable file is logged and read as empty.
    """
    path = events_file(uuid, state_dir)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK)
        with os.fdopen(fd, "rb") as stream:
            data = stream.read()
    except FileNotFoundError:
        return []
    except OSError as err:
        log.warning("cannot read lifecycle events %s: %s", path, err)
        return []
    found = []
    for line in data.splitlines():
        parsed = Event.from_line(line)
        if parsed is not None:
            found.append(parsed)
    return found


def _since(since_iso: str) -> datetime:
    parsed = _parse_time(since_iso) if isinstance(since_iso, str) else None
    if parsed is None:
        raise UsageError(f"malformed time {since_iso!r:.80}")
    return parsed


def events_since(uuid: str, since_iso: str, state_dir: str | None = None) -> list[Event]:
    """The domain's events at or after ``since_iso`` (ISO 8601; naive means UTC), file order.

    Raises UsageError for a malformed UUID or time.
    """
    since = _since(since_iso)
    return [e for e in read_events(uuid, state_dir) if e.when >= since]


def _happened(event: Event) -> str:
    when = _short_time(event)
    if event.event == "restored":
        return f"restored from a saved state at {when}"
    if event.event == "migrated":
        return f"migrated in at {when}"
    return f"{event.event} at {when}"


def describe_restart(uuid: str, since_iso: str, state_dir: str | None = None) -> str | None:
    """One line saying how the domain's QEMU process went away since ``since_iso``, or None.

    For example ``the VM was stopped at 2026-11-25T14:03:11Z and started at
    2026-11-25T14:03:15Z``: the first and the last stop or (re)start since then. None when
    there was none (``reconnected`` alone, a libvirtd restart, keeps QEMU and its bitmaps).
    Raises UsageError for a malformed UUID or time.
    """
    since = _since(since_iso)
    relevant = [
        e for e in events_since(uuid, since_iso, state_dir)
        if e.event == "stopped" or e.event in NEW_PROCESS_KINDS
    ]
    if not relevant:
        return None
    text = "the VM was " + _happened(relevant[0])
    if len(relevant) > 1:
        text += " and " + _happened(relevant[-1])
    if len(relevant) > 2:
        text += f" ({len(relevant)} stops and starts since {since.strftime('%Y-%m-%dT%H:%M:%SZ')})"
    return text
