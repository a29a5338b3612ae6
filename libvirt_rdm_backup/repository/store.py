"""The file repository: layout, atomic publishing, listing.

Layout (all directories 0700, files 0600)::

    ROOT/rdm-backup-repository.json           format marker and version
    ROOT/<domain-uuid>/.lock                  held while a backup or prune of that domain runs
    ROOT/<domain-uuid>/.prune.lock            readers shared, a prune exclusive
    ROOT/<domain-uuid>/.partial-<backup-id>/  a backup being written (never listed)
    ROOT/<domain-uuid>/<backup-id>/manifest.json
    ROOT/<domain-uuid>/<backup-id>/<disk>.qcow2
    ROOT/<domain-uuid>/<backup-id>/<disk>.damaged  a verify or restore found its data wrong
    ROOT/<domain-uuid>/<backup-id>/sequence   the manifest's sequence, for when it is unreadable
    ROOT/sequence                             the highest sequence given to a backup so far

A backup exists once its directory is renamed from ``.partial-*`` to its id,
which happens only after the manifest (with digests) was written and synced.
A published backup whose manifest cannot be read is damaged: :meth:`Repository.scan`
lists it apart, so that the readable backups stay usable.

Backups are ordered by their sequence and parent links (:mod:`.order`), never by
the clock that named them.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import re
import secrets
import shutil
import uuid as uuidlib
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import NamedTuple

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import (
    NotFoundError,
    OperationError,
    RepositoryError,
    UsageError,
)
from libvirt_rdm_backup.fileutil import STAGING_PREFIX, fsync_dir, read_regular, write_atomic
from libvirt_rdm_backup.fslock import exclusive
from libvirt_rdm_backup.repository.ids import (
    BACKUP_ID_RE,
    check_backup_id,
    check_safe_name,
    check_uuid,
    now_iso,
)
from libvirt_rdm_backup.repository.manifest import (
    MAX_MANIFEST,
    DiskRecord,
    Manifest,
    valid_sequence,
)
from libvirt_rdm_backup.repository.order import in_order, next_sequence

log = logging.getLogger(__name__)

MARKER = "rdm-backup-repository.json"
REPOSITORY_FORMAT = "libvirt-rdm-backup/repository"
REPOSITORY_VERSION = 1
MANIFEST = "manifest.json"
DAMAGED_SUFFIX = ".damaged"
PARTIAL_PREFIX = STAGING_PREFIX
SEQUENCE = "sequence"
SEQUENCE_LOCK = ".sequence.lock"
PRUNE_LOCK = ".prune.lock"


def write_file_atomic(path: str, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temporary file and a rename."""
    write_atomic(path, text.encode("utf-8"))


@dataclass(frozen=True)
class Damage:
    """A published backup whose manifest cannot be read (missing or malformed)."""

    domain_uuid: str
    backup_id: str
    problem: str
    sequence: int | None = None  # where it was published, when the repository still tells


class Scan(NamedTuple):
    """What a listing of a store found: readable backups (oldest first) and damaged ones."""

    backups: list[Manifest]
    damaged: list[Damage]


def read_sequence(path: str) -> int | None:
    """A sequence number kept in a small regular file (None when absent or not a number)."""
    try:
        text = read_regular(path, 32).strip()
    except OSError:
        return None
    number = int(text) if text.isdigit() and 0 < len(text) < 19 else None
    return number if valid_sequence(number) else None


class Staging:
    """A backup being written: files go into ``path``; nothing is visible yet."""

    def __init__(self, path: str, backup_id: str) -> None:
        self.path = path
        self.backup_id = backup_id

    def file(self, name: str) -> str:
        """Path of a data file inside the staging directory."""
        return os.path.join(self.path, check_safe_name(name, "file name"))


class Repository:
    """A backup repository on a local filesystem."""

    def __init__(self, root: str) -> None:
        self.root = os.path.abspath(root)
        self.repo_id = ""  # short random id, part of the names of QEMU bitmaps of this repository

    # -- opening ---------------------------------------------------------------

    @classmethod
    def open(cls, root: str, create: bool = False) -> Repository:
        """Open an existing repository, or create it (``create``) when absent."""
        repo = cls(root)
        marker = os.path.join(repo.root, MARKER)
        if os.path.exists(marker):
            repo.repo_id = repo._check_marker(marker)
            return repo
        if os.path.lexists(repo.root) and not os.path.isdir(repo.root):
            raise UsageError(f"{repo.root} is not a directory; a repository is a directory")
        if not create:
            if not os.path.isdir(repo.root):
                raise NotFoundError(f"no repository at {repo.root}")
            raise UsageError(f"{repo.root} is not a backup repository")
        try:
            os.makedirs(repo.root, mode=0o700, exist_ok=True)
            if os.listdir(repo.root):
                raise UsageError(
                    f"{repo.root} is not empty and not a backup repository; refusing to use it"
                )
            os.chmod(repo.root, 0o700)
            repo.repo_id = secrets.token_hex(3)
            write_file_atomic(
                marker,
                json.dumps({"format": REPOSITORY_FORMAT, "version": REPOSITORY_VERSION,
                            "id": repo.repo_id, "created": now_iso()}) + "\n",
            )
        except OSError as err:
            raise RepositoryError(f"cannot create repository at {repo.root}: {err}") from err
        return repo

    def _check_marker(self, marker: str) -> str:
        try:
            with open(marker, encoding="utf-8") as stream:
                data = json.load(stream)
        except (OSError, ValueError) as err:
            raise RepositoryError(f"unreadable repository marker {marker}: {err}") from err
        if not isinstance(data, dict) or data.get("format") != REPOSITORY_FORMAT:
            raise RepositoryError(f"{self.root} is not a backup repository")
        version = data.get("version", 0)
        if not isinstance(version, int) or isinstance(version, bool) or version < 0:
            raise RepositoryError(f"repository marker has a malformed version in {self.root}")
        if version > REPOSITORY_VERSION:
            raise RepositoryError(f"repository version {data.get('version')} is too new")
        repo_id = str(data.get("id", ""))
        if not re.fullmatch(r"[0-9a-f]{6}", repo_id):
            raise RepositoryError(f"repository marker {marker} has no valid id")
        return repo_id

    # -- paths -----------------------------------------------------------------

    def domain_dir(self, domain_uuid: str) -> str:
        """Directory holding one domain's backups."""
        return os.path.join(self.root, check_uuid(domain_uuid))

    def backup_dir(self, domain_uuid: str, backup_id: str) -> str:
        """Directory of one published backup."""
        return os.path.join(self.domain_dir(domain_uuid), check_backup_id(backup_id))

    def data_file(self, manifest: Manifest, record: DiskRecord) -> str:
        """Path of a disk's stored data file."""
        name = check_safe_name(record.data_file, "data file name")
        return os.path.join(self.backup_dir(manifest.domain_uuid, manifest.backup_id), name)

    def holds(self, path: str) -> bool:
        """True when writing ``path`` would write into the repository.

        ``path`` (or, when it does not exist, its directory) is inside the root,
        or is one of its files or directories under another name (a hard link,
        a bind mount).
        """
        root, real = os.path.realpath(self.root), os.path.realpath(path)
        if os.path.commonpath([root, real]) == root:
            return True
        try:
            probe = os.stat(real if os.path.lexists(real) else os.path.dirname(real))
        except OSError:
            return False
        key = (probe.st_dev, probe.st_ino)
        for directory, _dirs, files in os.walk(root):
            for name in (directory, *(os.path.join(directory, f) for f in files)):
                try:
                    found = os.stat(name, follow_symlinks=False)
                except OSError:
                    continue
                if (found.st_dev, found.st_ino) == key:
                    return True
        return False

    # -- writing ---------------------------------------------------------------

    @contextmanager
    def lock(self, domain_uuid: str) -> Iterator[None]:
        """Exclusive per-domain lock: one backup of a domain at a time."""
        directory = self.domain_dir(domain_uuid)
        os.makedirs(directory, mode=0o700, exist_ok=True)
        busy = (f"another backup of domain {domain_uuid} (or a prune of its backups) is running "
                "in this repository")
        with exclusive(os.path.join(directory, ".lock"), busy):
            self._remove_partials(directory)
            gate = os.open(os.path.join(directory, PRUNE_LOCK),
                           os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
            os.close(gate)  # there for readers to wait on (they never create it)
            yield

    @contextmanager
    def prune_gate(self, domain_uuid: str, exclusive_use: bool, timeout: float) -> Iterator[None]:
        """The gate between a prune and the readers of a domain's backups (``flock`` on
        ``.prune.lock``): many readers at once (shared), or one prune (exclusive), each
        waiting up to ``timeout`` s for the other side (then OperationError)."""
        directory = self.domain_dir(domain_uuid)
        if exclusive_use:
            os.makedirs(directory, mode=0o700, exist_ok=True)
        path = os.path.join(directory, PRUNE_LOCK)
        create = os.O_CREAT if exclusive_use else 0  # readers change nothing
        try:
            fd = os.open(path, os.O_RDWR | create | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            if exclusive_use or err.errno not in (errno.ENOENT, errno.EROFS, errno.EACCES):
                raise RepositoryError(f"cannot open {path}: {err.strerror}") from err
            yield  # no backup or prune of the domain made it, or nobody can change it
            return
        try:
            mode = fcntl.LOCK_EX if exclusive_use else fcntl.LOCK_SH
            who = ("restores, verifies or exports are reading" if exclusive_use
                   else "a prune is changing")

            def attempt() -> int:
                fcntl.flock(fd, mode | fcntl.LOCK_NB)
                return fd

            try:
                retry.flock_wait(path, timeout)(attempt)
            except OperationError as err:
                raise OperationError(f"{who} the backups of domain {domain_uuid}; "
                                     f"gave up after {timeout:g} s") from err
            yield
        finally:
            os.close(fd)

    def _remove_partials(self, directory: str) -> None:
        """Remove what killed runs left behind (only called under the lock)."""
        for name in os.listdir(directory):
            if name.startswith(PARTIAL_PREFIX):
                log.info("removing unfinished backup %s", name)
                shutil.rmtree(os.path.join(directory, name), ignore_errors=True)

    @contextmanager
    def staging(self, domain_uuid: str, backup_id: str) -> Iterator[Staging]:
        """A staging directory, removed unless :meth:`publish` moved it into place."""
        path = os.path.join(self.domain_dir(domain_uuid), PARTIAL_PREFIX + backup_id)
        try:
            os.makedirs(path, mode=0o700)
        except OSError as err:
            raise RepositoryError(f"cannot create {path}: {err}") from err
        try:
            yield Staging(path, backup_id)
        finally:
            if os.path.isdir(path):
                shutil.rmtree(path, ignore_errors=True)

    def publish(self, staging: Staging, manifest: Manifest) -> str:
        """Write the manifest and atomically make the backup visible; returns its path.

        The manifest gets the repository's next sequence number (see :meth:`_sequence`).
        """
        try:
            lock = os.open(os.path.join(self.root, SEQUENCE_LOCK),
                           os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        except OSError as err:
            raise RepositoryError(f"cannot publish backup {manifest.backup_id}: {err}") from err
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)  # held for a moment: other domains wait
            manifest.sequence = self._sequence(manifest.domain_uuid)
            return self._publish(staging, manifest)
        finally:
            os.close(lock)

    def _sequence(self, domain_uuid: str) -> int:
        """One more than the highest sequence of the repository (and of the domain's backups)."""
        found, damaged = self.scan(domain_uuid)
        used = [read_sequence(os.path.join(self.root, SEQUENCE)),
                *(m.sequence for m in found), *(d.sequence for d in damaged)]
        sequence = next_sequence(used)
        try:
            write_file_atomic(os.path.join(self.root, SEQUENCE), f"{sequence}\n")
        except OSError as err:
            raise RepositoryError(f"cannot record sequence {sequence}: {err}") from err
        return sequence

    def _publish(self, staging: Staging, manifest: Manifest) -> str:
        try:
            write_file_atomic(os.path.join(staging.path, SEQUENCE), f"{manifest.sequence}\n")
            for name in os.listdir(staging.path):
                fd = os.open(os.path.join(staging.path, name), os.O_RDONLY)
                try:
                    os.fchmod(fd, 0o600)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            write_file_atomic(os.path.join(staging.path, MANIFEST), manifest.dumps())
            final = self.backup_dir(manifest.domain_uuid, manifest.backup_id)
            os.rename(staging.path, final)
            fsync_dir(os.path.dirname(final))
        except OSError as err:
            raise RepositoryError(f"cannot publish backup {manifest.backup_id}: {err}") from err
        return final

    # -- reading ---------------------------------------------------------------

    def domain_uuids(self) -> list[str]:
        """UUIDs of domains with a directory in the repository."""
        found = []
        for name in sorted(os.listdir(self.root)):
            try:
                found.append(str(uuidlib.UUID(name)))
            except ValueError:
                continue
        return found

    def load(self, domain_uuid: str, backup_id: str) -> Manifest:
        """The manifest of one backup (NotFoundError when absent)."""
        path = os.path.join(self.backup_dir(domain_uuid, backup_id), MANIFEST)
        try:
            data = read_regular(path, MAX_MANIFEST + 1)
            if len(data) > MAX_MANIFEST:
                raise RepositoryError(f"manifest of backup {backup_id} is over "
                                      f"{MAX_MANIFEST} bytes")
            text = data.decode("utf-8")
        except FileNotFoundError as err:
            raise NotFoundError(f"backup {backup_id} not found") from err
        except OSError as err:
            raise RepositoryError(f"cannot read {path}: {err}") from err
        except UnicodeDecodeError as err:
            raise RepositoryError(f"manifest of backup {backup_id} is not UTF-8 text") from err
        manifest = Manifest.loads(text)
        if manifest.backup_id != backup_id or manifest.domain_uuid != domain_uuid:
            raise RepositoryError(f"manifest of backup {backup_id} names another backup")
        return manifest

    def scan(self, domain_uuid: str | None = None) -> Scan:
        """Published backups, oldest first, and those whose manifest cannot be read.

        Oldest first as :func:`.order.in_order` says.
        """
        uuids = [check_uuid(domain_uuid)] if domain_uuid else self.domain_uuids()
        found: list[Manifest] = []
        damaged: list[Damage] = []
        for uuid in uuids:
            directory = os.path.join(self.root, uuid)
            if not os.path.isdir(directory):
                continue
            for name in sorted(os.listdir(directory)):
                if not (BACKUP_ID_RE.fullmatch(name)
                        and os.path.isdir(os.path.join(directory, name))):
                    continue
                try:
                    found.append(self.load(uuid, name))
                except NotFoundError:
                    problem = f"its {MANIFEST} is missing"
                except RepositoryError as err:
                    problem = str(err)
                else:
                    continue
                sequence = read_sequence(os.path.join(directory, name, SEQUENCE))
                damaged.append(Damage(uuid, name, problem, sequence))
        return Scan(in_order(found), damaged)

    # -- damage found by verify and restore -----------------------------------------

    def _damage_path(self, manifest: Manifest, disk: str) -> str:
        name = check_safe_name(disk, "disk name") + DAMAGED_SUFFIX
        return os.path.join(self.backup_dir(manifest.domain_uuid, manifest.backup_id), name)

    def damage_mark(self, manifest: Manifest, disk: str) -> str | None:
        """What an earlier verify or restore found wrong with a disk's stored data, or None."""
        try:
            data = read_regular(self._damage_path(manifest, disk), 4096)
            return data.decode("utf-8", "replace").strip() or "damaged"
        except FileNotFoundError:
            return None
        except OSError as err:
            return f"damage record unreadable: {err.strerror}"

    def set_damage_mark(self, manifest: Manifest, disk: str, problem: str | None) -> bool:
        """Record (``problem``) or clear (None) a disk's damage; False when it cannot be
        written (a read-only or full filesystem)."""
        path = self._damage_path(manifest, disk)
        try:
            if problem is not None:
                write_file_atomic(path, f"{problem} (found {now_iso()})\n")
            elif os.path.exists(path):
                os.unlink(path)
        except OSError as err:
            log.debug("damage record %s not written: %s", path, err.strerror)
            return False
        return True
