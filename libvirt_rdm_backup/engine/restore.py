"""Restore: write a disk as of a backup to a file or a block device, sparsely."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import stat
import struct
from dataclasses import dataclass
from typing import Any

import libvirt

from libvirt_rdm_backup.domain.connection import active_domains, domain_xml
from libvirt_rdm_backup.domain.discovery import inventory_from_xml
from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.domain.xml import DomainXML
from libvirt_rdm_backup.engine.stores import Store, open_store
from libvirt_rdm_backup.engine.verify import cached_checker, lineage_problem
from libvirt_rdm_backup.errors import (
    DamagedBackupError,
    NotFoundError,
    OperationError,
    RdmBackupError,
    UsageError,
)
from libvirt_rdm_backup.fileutil import new_file_whole, remove_stale_partials
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.qemu.layers import json_filename
from libvirt_rdm_backup.repository.chain import DiskPoint
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.store import (
    Damage,
    check_backup_id,
    check_safe_name,
    newest_damage,
)
from libvirt_rdm_backup.storage import tgt
from libvirt_rdm_backup.storage.base import StorageNode
from libvirt_rdm_backup.storage.sysfs import SysfsAgent

log = logging.getLogger(__name__)

BLKZEROOUT = 0x127F
BLKROGET = 0x125E
CHUNK = 4 * 1024 * 1024
_ZERO = bytes(CHUNK)


@dataclass
class RestoreResult:
    """What a restore wrote."""

    backup_id: str
    disk: str
    path: str
    size: int
    data_bytes: int
    zeroed_bytes: int

    def to_dict(self) -> dict[str, Any]:
        """The ``restore --json`` document."""
        return {
            "backup_id": self.backup_id,
            "disk": self.disk,
            "to": self.path,
            "size": self.size,
            "data_bytes": self.data_bytes,
            "zeroed_bytes": self.zeroed_bytes,
        }


def find_domain_backups(store: Store, domain: str) -> list[Manifest]:
    """Backups of a domain named by UUID or by the name recorded at backup time."""
    manifests = [
        m for m in store.all_backups() if domain in (m.domain_uuid, m.domain_name)
    ]
    if not manifests:
        damaged = domain_damage(store, domain, manifests)
        if damaged:
            raise DamagedBackupError(damaged[-1].backup_id, damaged[-1].problem)
        raise NotFoundError(f"no backups of domain {domain!r} in {store.name}")
    return manifests


def domain_damage(store: Store, domain: str, manifests: list[Manifest]) -> list[Damage]:
    """Unreadable backups of a domain named by UUID or by a name its ``manifests`` carry."""
    uuids = {m.domain_uuid for m in manifests} | {domain}
    return [d for d in store.damaged() if d.domain_uuid in uuids]


def choose_backup(store: Store, domain: str, backup_id: str | None) -> Manifest:
    """The requested backup of a domain (the newest when ``backup_id`` is None)."""
    if backup_id is not None:
        check_backup_id(backup_id)
    manifests = find_domain_backups(store, domain)
    damaged = {d.backup_id: d.problem for d in domain_damage(store, domain, manifests)}
    if backup_id is None:
        newer = newest_damage(damaged, manifests)
        if newer:  # never fall back to an older point unasked
            raise DamagedBackupError(newer, f"{damaged[newer]}; it is the newest "
                                     f"backup of {domain}: name an older backup to use it")
        return manifests[-1]
    for manifest in manifests:
        if manifest.backup_id == backup_id:
            return manifest
    if backup_id in damaged:
        raise DamagedBackupError(backup_id, damaged[backup_id])
    raise NotFoundError(f"backup {backup_id} of domain {domain!r} not found")


def device_size(path: str) -> int:
    """Size in bytes of a file or block device."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return os.lseek(fd, 0, os.SEEK_END)
    finally:
        os.close(fd)


def storage_paths(path: str, sysfs: SysfsAgent | None = None) -> set[str]:
    """``path`` and every device or file below it in its storage tree (real paths)."""
    found = {os.path.realpath(path)}
    try:
        if stat.S_ISBLK(os.stat(path).st_mode):
            found |= _tree_paths((sysfs or SysfsAgent()).map_path(path))
    except (OSError, RdmBackupError):
        pass
    return found


def _tree_paths(node: StorageNode) -> set[str]:
    paths = {os.path.realpath(node.path)} if node.path else set()
    for extent in node.extents:
        paths |= _tree_paths(extent.target)
    return paths


def _disk_paths(disk: RawDisk, sysfs: SysfsAgent) -> set[str]:
    if disk.source_path:
        return storage_paths(disk.source_path, sysfs)
    if disk.iscsi is not None and tgt.tgtadm_available():
        lun = tgt.find_lun(disk.iscsi.iqn, disk.iscsi.lun)
        if lun is not None and lun.backing_store_path:
            return storage_paths(lun.backing_store_path, sysfs)
    return set()


def paths_in_use(conn: libvirt.virConnect) -> dict[str, str]:
    """Every path (and the storage below it) that running domains use → domain name."""
    sysfs = SysfsAgent()
    used: dict[str, str] = {}
    for dom in active_domains(conn):
        try:
            inventory = inventory_from_xml(DomainXML.parse(domain_xml(dom)), True)
        except RdmBackupError:
            continue
        paths: set[str] = set()
        for other in inventory.other:
            if other.source and other.source.startswith("/"):
                paths.add(os.path.realpath(other.source))
        for disk in inventory.raw:
            paths |= _disk_paths(disk, sysfs)
        for path in paths:
            used[path] = inventory.domain_name
    return used


def check_target(
    path: str, size: int, force: bool, conn: libvirt.virConnect | None
) -> tuple[bool, bool]:
    """Refuse unusable targets; return ``(exists, is_block_device)``."""
    if not path:
        raise UsageError("restore target path is empty")
    real = os.path.realpath(path)
    if not os.path.exists(real):
        parent = os.path.dirname(real) or "."
        if not os.path.isdir(parent):
            raise UsageError(f"restore target directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"restore target directory {parent} is not writable")
        return False, False
    mode = os.stat(real).st_mode
    if stat.S_ISDIR(mode):
        raise UsageError(f"restore target {path} is a directory")
    is_block = stat.S_ISBLK(mode)
    if not (is_block or stat.S_ISREG(mode)):
        raise UsageError(f"restore target {path} is neither a file nor a block device")
    if not os.access(real, os.W_OK) or (is_block and read_only_device(real)):
        raise UsageError(f"restore target {path} is not writable")
    if conn is not None and not force:
        used = paths_in_use(conn)
        owner = next((used[p] for p in sorted(storage_paths(real)) if p in used), None)
        if owner is not None:
            raise UsageError(
                f"restore target {path} is in use by running domain {owner}; "
                "use --force to overwrite it"
            )
    have = device_size(real)
    if have < size and not force:
        raise UsageError(
            f"restore target {path} is too small ({have} bytes, the disk has {size}); "
            "use --force to write what fits"
        )
    return True, is_block


def read_only_device(path: str) -> bool:
    """True for a block device set read-only (``BLKROGET``), which even root cannot write.

    A device that cannot even be opened or asked (no medium, gone) is a bad target too.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            flag: int = struct.unpack("i", fcntl.ioctl(fd, BLKROGET, bytes(4)))[0]
        finally:
            os.close(fd)
    except OSError as err:
        raise UsageError(f"restore target {path} cannot be used: {err.strerror}") from err
    return flag != 0


def refuse_store_paths(store: Store, path: str) -> None:
    """Refuse a target that is, or lies on, a file of the store being read."""
    if any(store.holds(p) for p in sorted(storage_paths(path))):
        raise UsageError(f"restore target {path} is inside the backup repository "
                         f"{store.name}; writing it would destroy backups")


def zero_nonzero_ranges(path: str, length: int) -> int:
    """Make ``[0, length)`` of a block device read as zero, writing only where it does not.

    Returns the number of bytes zeroed.
    """
    zeroed = 0
    buf = bytearray(CHUNK)
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        offset = 0
        while offset < length:
            count = min(CHUNK, length - offset)
            view = memoryview(buf)[:count]
            got = os.preadv(fd, [view], offset)
            if got <= 0:
                break
            if view[:got] != _ZERO[:got]:
                fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, got))
                zeroed += got
            offset += got
    finally:
        os.close(fd)
    return zeroed


def _punch_file(path: str, length: int) -> None:
    """Make ``[0, length)`` of a regular file read as zero without writing (hole punch)."""
    from libvirt_rdm_backup.process import run

    if os.path.getsize(path) < length:
        os.truncate(path, length)
    run(["fallocate", "--punch-hole", "--offset", "0", "--length", str(length), path])


def write_disk(node: dict[str, Any], record: DiskRecord, to: str, exists: bool,
               is_block: bool) -> int:
    """Write the disk image ``node`` (blockdev options) to ``to``; returns bytes zeroed."""
    source = json_filename(node)
    if not exists:  # a new file appears whole or not at all
        try:
            with new_file_whole(os.path.realpath(to)) as partial:
                img.convert(source, partial, target_fmt="raw")
        except FileExistsError as err:
            raise OperationError(f"{to} was created by someone else during the restore; "
                                 "it was left as it is") from err
        except OSError as err:
            raise OperationError(f"cannot write {to}: {err.strerror or err}") from err
        return 0
    if not is_block:  # what a restore killed while creating this file left beside it
        with contextlib.suppress(OSError):
            remove_stale_partials(*os.path.split(os.path.realpath(to)))
    room = device_size(to)
    length = min(room, record.size)
    zeroed = 0
    if is_block:
        zeroed = zero_nonzero_ranges(to, length)
    else:
        _punch_file(to, max(length, record.size))
        length = record.size
    if length < record.size:
        source = json_filename({"driver": "raw", "size": length, "file": node})
    # an absolute path: qemu-img never takes a ``name:`` prefix of it for a protocol
    img.convert(source, os.path.realpath(to), target_fmt="raw", existing_target=True,
                target_is_zero=True)
    return zeroed


def verify_lineage(store: Store, manifest: Manifest, disk: str) -> list[DiskPoint]:
    """Check every layer a disk's point is built from (raises DamagedBackupError)."""
    damaged = {d.backup_id: d.problem for d in store.damaged(manifest.domain_uuid)}
    points, problem = lineage_problem(store.backups(manifest.domain_uuid), damaged, manifest,
                                      disk, cached_checker(store))
    if problem is not None:
        raise DamagedBackupError(manifest.backup_id, f"{problem}; nothing was written", disk)
    return points


def restore(
    domain: str,
    target: str,
    disk: str,
    to: str,
    backup_id: str | None = None,
    force: bool = False,
    conn: libvirt.virConnect | None = None,
    tls_dir: str | None = None,
) -> RestoreResult:
    """Restore disk ``disk`` of ``domain`` from the repository at ``target`` into ``to``.

    The stored data is verified before anything is written. Refuses a target
    smaller than the disk or used by a running domain unless ``force``, and
    always one inside the repository.
    """
    check_safe_name(disk, "disk name")
    with open_store(target, tls_dir=tls_dir) as store:
        manifest = choose_backup(store, domain, backup_id)
        record = manifest.disk(disk)
        if record is None:
            raise NotFoundError(f"backup {manifest.backup_id} has no disk {disk!r}")
        if to:
            refuse_store_paths(store, to)
        exists, is_block = check_target(to, record.size, force, conn)
        points = verify_lineage(store, manifest, disk)
        node = store.image_node(points)
        try:
            zeroed = write_disk(node, record, to, exists, is_block)
            data = img.data_bytes(json_filename(node))
        except RdmBackupError as err:
            raise OperationError(f"restore of {disk} to {to} failed: {err}") from err
    return RestoreResult(
        backup_id=manifest.backup_id,
        disk=disk,
        path=to,
        size=record.size,
        data_bytes=data,
        zeroed_bytes=zeroed,
    )
