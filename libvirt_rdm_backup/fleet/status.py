"""The status file of a target: the last run of ``backup --all`` per domain, for monitoring.

A directory target keeps it in its root (``ROOT/rdm-backup-status.json``, written only once
the repository exists: a new repository must start in an empty directory); an NBD target
under ``/var/lib/libvirt-rdm-backup/status/<hash of the target>.json``. It is updated after
each domain, under a lock (``.rdm-backup-status.lock`` beside it) so that runs side by side
keep each other's entries, and replaced atomically. What is read back is never trusted: a file
that is too large, not JSON, or not in the shape written here is replaced by a fresh one (with
a warning).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup.errors import RdmBackupError
from libvirt_rdm_backup.fileutil import read_regular, write_atomic
from libvirt_rdm_backup.fleet.target import is_directory
from libvirt_rdm_backup.fslock import waiting
from libvirt_rdm_backup.redact import redact
from libvirt_rdm_backup.repository.ids import check_uuid, now_iso
from libvirt_rdm_backup.repository.store import MARKER
from libvirt_rdm_backup.targets.uri import parse_target

log = logging.getLogger(__name__)

STATUS_NAME = "rdm-backup-status.json"
LOCK_NAME = ".rdm-backup-status.lock"
DEFAULT_STATUS_DIR = "/var/lib/libvirt-rdm-backup/status"
FORMAT = "libvirt-rdm-backup/status"
VERSION = 1
MAX_BYTES = 4 << 20
MAX_DOMAINS = 10_000
MAX_TEXT = 4096
LOCK_WAIT = 60.0
RESULTS = ("ok", "failed", "skipped")
_TEXT_FIELDS = ("when", "id", "level", "error", "skipped")


@dataclass(frozen=True)
class Entry:
    """The last run of one domain."""

    domain: str
    uuid: str
    when: str
    id: str | None
    level: str | None
    exit_code: int
    error: str | None
    skipped: str | None

    @property
    def result(self) -> str:
        """``ok``, ``failed`` or ``skipped``."""
        if self.skipped is not None:
            return "skipped"
        return "ok" if self.exit_code == 0 else "failed"

    def to_dict(self) -> dict[str, Any]:
        """The entry as the status file holds it."""
        return {"domain": self.domain, "uuid": self.uuid, "when": self.when, "id": self.id,
                "level": self.level, "result": self.result, "exit_code": self.exit_code,
                "error": self.error, "skipped": self.skipped}


def status_path(target: str, status_dir: str = DEFAULT_STATUS_DIR) -> str:
    """Where the status file of ``target`` lives (see the module's docstring)."""
    parsed = parse_target(target, allow_remote_plain=True)
    if isinstance(parsed, str):
        return os.path.join(os.path.abspath(parsed), STATUS_NAME)
    digest = hashlib.sha256(target.encode("utf-8", "surrogateescape")).hexdigest()[:32]
    return os.path.join(status_dir, f"{digest}.json")


def _text(value: Any, optional: bool = True) -> bool:
    if value is None:
        return optional
    return isinstance(value, str) and len(value) <= MAX_TEXT and value.isprintable()


def _entry(key: Any, value: Any) -> Entry | None:
    """The entry, when ``value`` is exactly what :meth:`Entry.to_dict` writes."""
    if not isinstance(value, dict) or set(value) != set(Entry.__dataclass_fields__) | {"result"}:
        return None
    if not (_text(value["domain"], False) and _text(value["uuid"], False)
            and all(_text(value[f]) for f in _TEXT_FIELDS) and value["when"] is not None):
        return None
    code = value["exit_code"]
    if not isinstance(code, int) or isinstance(code, bool) or not 0 <= code <= 255:
        return None
    try:
        if key != value["uuid"] or check_uuid(key) != key:
            return None
    except ValueError:
        return None
    entry = Entry(**{k: v for k, v in value.items() if k != "result"})
    return entry if entry.result == value["result"] else None


def parse_status(data: bytes) -> dict[str, Entry]:
    """The entries of a status file's content; ValueError saying why it is not one."""
    if len(data) > MAX_BYTES:
        raise ValueError(f"over {MAX_BYTES} bytes")
    try:
        doc = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as err:
        raise ValueError("not JSON") from err
    if (not isinstance(doc, dict) or doc.get("format") != FORMAT
            or doc.get("version") != VERSION or not isinstance(doc.get("domains"), dict)):
        raise ValueError(f"not a {FORMAT} document of version {VERSION}")
    if len(doc["domains"]) > MAX_DOMAINS:
        raise ValueError(f"over {MAX_DOMAINS} domains")
    entries = {}
    for key, value in doc["domains"].items():
        entry = _entry(key, value)
        if entry is None:
            raise ValueError(f"malformed entry {str(key)[:60]!r}")
        entries[key] = entry
    return entries


class StatusFile:
    """The status file of one target, updated one domain at a time."""

    def __init__(self, target: str, status_dir: str = DEFAULT_STATUS_DIR) -> None:
        self.path = status_path(target, status_dir)
        self.target = redact(target)
        self._directory_target = is_directory(target)
        self._pending: list[Entry] = []
        self._warned = False

    def _ready(self) -> bool:
        """Whether the file can be written now (a directory target: once it is a repository)."""
        directory = os.path.dirname(self.path)
        if self._directory_target:
            return os.path.exists(os.path.join(directory, MARKER))
        os.makedirs(directory, mode=0o700, exist_ok=True)
        return True

    def read(self) -> dict[str, Entry]:
        """The entries of the file (none when it is missing; a warning when it is not ours)."""
        try:
            return parse_status(read_regular(self.path, MAX_BYTES + 1))
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as err:
            log.warning("status file %s is not one rdm-backup writes (%s): starting a new one",
                        self.path, err.strerror if isinstance(err, OSError) else err)
            return {}

    def record(self, entry: Entry) -> None:
        """Add ``entry`` (replacing the domain's previous one) and write the file.

        Entries wait in memory while the file cannot be written yet; a failure to write
        is a warning (once), never a failure of the backups.
        """
        self._pending.append(entry)
        try:
            if not self._ready():
                return
            lock = os.path.join(os.path.dirname(self.path), LOCK_NAME)
            with waiting(lock, LOCK_WAIT):
                entries = self.read()
                entries.update((e.uuid, e) for e in self._pending)
                self._write(entries)
            self._pending.clear()
        except (OSError, RdmBackupError) as err:  # the status never fails a backup
            if not self._warned:
                log.warning("cannot update status file %s: %s", self.path, err)
                self._warned = True

    @property
    def unwritten(self) -> int:
        """How many entries could not be written (yet)."""
        return len(self._pending)

    def finish(self) -> None:
        """At the end of a run: a warning when entries were never written and no warning
        said why yet (a directory target that never became a repository)."""
        if self._pending and not self._warned:
            log.warning("status file %s not written: %s is not a repository", self.path,
                        os.path.dirname(self.path))

    def _write(self, entries: dict[str, Entry]) -> None:
        doc = {"format": FORMAT, "version": VERSION, "target": self.target,
               "updated": now_iso(),
               "domains": {key: entries[key].to_dict() for key in sorted(entries)}}
        write_atomic(self.path, (json.dumps(doc, indent=2) + "\n").encode(), mode=0o644)
