"""Restore: write a disk as of a backup to a file or a block device, sparsely."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import libvirt

from libvirt_rdm_backup import device_use
from libvirt_rdm_backup.domain.connection import active_domains, domain_xml
from libvirt_rdm_backup.domain.discovery import inventory_from_xml
from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.domain.xml import DomainXML
from libvirt_rdm_backup.engine import restore_rbd
from libvirt_rdm_backup.engine.restore_rbd_original import defined_cluster
from libvirt_rdm_backup.engine.selection import choose_backup
from libvirt_rdm_backup.engine.stores import Store, open_store
from libvirt_rdm_backup.engine.verify import checked_node
from libvirt_rdm_backup.errors import (
    NotFoundError,
    OperationError,
    RdmBackupError,
    UsageError,
)
from libvirt_rdm_backup.fileutil import new_file_whole, remove_stale_partials
from libvirt_rdm_backup.qemu.block_copy import (
    Endpoint,
    ProgressCallback,
    bwlimit_speed,
    copy_image,
    fd_target,
)
from libvirt_rdm_backup.qemu.layers import node_data_bytes
from libvirt_rdm_backup.repository.ids import check_safe_name
from libvirt_rdm_backup.repository.manifest import DiskRecord
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


@dataclass
class Target:
    """A restore target, resolved once; an existing one is written only through ``fd``.

    ``fd`` was opened (``O_EXCL`` for a block device, which the kernel refuses while
    the device is mounted, swap or stacked on, and which keeps it so) and checked;
    tools get it as :attr:`fd_path`.
    """

    path: str
    real: str
    exists: bool
    is_block: bool
    fd: int = -1

    @property
    def fd_path(self) -> str:
        """The open target as a path a child process that inherits ``fd`` can open."""
        return f"/dev/fd/{self.fd}"

    def size(self) -> int:
        """Bytes in the open target."""
        return os.lseek(self.fd, 0, os.SEEK_END)


@contextlib.contextmanager
def open_target(
    path: str, size: int, force: bool, conn: libvirt.virConnect | None
) -> Iterator[Target]:
    """Resolve, open and check the restore target; refuse one that is unusable or in use.

    A new file is only checked (it is made whole elsewhere). An existing file or
    device is opened once and refused (UsageError) when it is mounted, active swap,
    has stacked devices, cannot be opened exclusively, is open in a QEMU process
    of this host (found from ``/proc``, so also while libvirtd is down) or is the
    disk of a running domain (the last two unless ``force``), or is too small
    (unless ``force``).
    """
    if not path:
        raise UsageError("restore target path is empty")
    real = os.path.realpath(path)
    if not os.path.lexists(real):
        parent = os.path.dirname(real) or "."
        if not os.path.isdir(parent):
            raise UsageError(f"restore target directory {parent} does not exist")
        if not os.access(parent, os.W_OK):
            raise UsageError(f"restore target directory {parent} is not writable")
        yield Target(path, real, exists=False, is_block=False)
        return
    try:
        mode = os.stat(real).st_mode
    except OSError as err:
        raise UsageError(f"restore target {path} cannot be used: {err.strerror}") from err
    if stat.S_ISDIR(mode):
        raise UsageError(f"restore target {path} is a directory")
    is_block = stat.S_ISBLK(mode)
    if not (is_block or stat.S_ISREG(mode)):
        raise UsageError(f"restore target {path} is neither a file nor a block device")
    fd = _open_existing(path, real, is_block)
    try:
        target = Target(path, real, exists=True, is_block=is_block, fd=fd)
        _check_open_target(target, force, conn)
        have = target.size()
        if have < size and not force:
            raise UsageError(
                f"restore target {path} is too small ({have} bytes, the disk has {size}); "
                "use --force to write what fits"
            )
        yield target
    finally:
        os.close(fd)


def _open_existing(path: str, real: str, is_block: bool) -> int:
    """Open an existing target for writing, exclusively when it is a block device."""
    flags = os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW | (os.O_EXCL if is_block else 0)
    try:
        fd = os.open(real, flags)
    except OSError as err:
        if err.errno == errno.EBUSY:
            ident = device_use.identity_of_path(real)
            why = device_use.holders(ident) if ident is not None else []
            raise UsageError(
                f"restore target {path} is in use: "
                f"{'; '.join(why) or 'the kernel holds it exclusively'}"
            ) from err
        if err.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
            raise UsageError(f"restore target {path} is not writable") from err
        raise UsageError(f"restore target {path} cannot be used: {err.strerror}") from err
    try:
        st = os.fstat(fd)
        if stat.S_ISBLK(st.st_mode) != is_block or not (
                stat.S_ISBLK(st.st_mode) or stat.S_ISREG(st.st_mode)):
            raise UsageError(f"restore target {path} changed while it was opened")
        if is_block and read_only_device(fd, path):
            raise UsageError(f"restore target {path} is not writable")
    except BaseException:
        os.close(fd)
        raise
    return fd


def _check_open_target(target: Target, force: bool, conn: libvirt.virConnect | None) -> None:
    """Refuse an opened target that the kernel, a QEMU process or a running domain uses,
    directly, through a partition, or through a loop device over it."""
    ident = device_use.Identity.of(os.fstat(target.fd))
    assert ident is not None  # _open_existing accepted only a file or a block device
    devices = [ident, *device_use.loops_over(ident)] if target.is_block \
        else device_use.loops_over(ident)
    held = [why for device in devices for why in device_use.holders(device)]
    if held:
        raise UsageError(f"restore target {target.path} is in use: {'; '.join(held)}")
    if force:
        return
    below = storage_paths(target.real)
    identities = {ident, *devices}
    for device in devices:
        identities.update(device_use.partitions(device))
    identities |= {i for i in map(device_use.identity_of_path, below) if i is not None}
    users = device_use.qemu_users(identities)
    if users:
        raise UsageError(f"restore target {target.path} is in use by {'; '.join(users)}; "
                         "use --force to overwrite it")
    if conn is not None:
        used = paths_in_use(conn)
        owner = next((used[p] for p in sorted(below) if p in used), None)
        if owner is not None:
            raise UsageError(
                f"restore target {target.path} is in use by running domain {owner}; "
                "use --force to overwrite it"
            )


def read_only_device(fd: int, path: str) -> bool:
    """True for a block device set read-only (``BLKROGET``), which even root cannot write.

    A device that cannot even be asked (no medium, gone) is a bad target too.
    """
    try:
        flag: int = struct.unpack("i", fcntl.ioctl(fd, BLKROGET, bytes(4)))[0]
    except OSError as err:
        raise UsageError(f"restore target {path} cannot be used: {err.strerror}") from err
    return flag != 0


def refuse_store_paths(store: Store, path: str) -> None:
    """Refuse a target that is, or lies on, a file of the store being read."""
    if any(store.holds(p) for p in sorted(storage_paths(path))):
        raise UsageError(f"restore target {path} is inside the backup repository "
                         f"{store.name}; writing it would destroy backups")


def zero_nonzero_ranges(fd: int, length: int) -> int:
    """Make ``[0, length)`` of the block device open as ``fd`` read as zero, writing only
    where it does not; returns the number of bytes zeroed."""
    zeroed = 0
    buf = bytearray(CHUNK)
    offset = 0
    while offset < length:
        count = min(CHUNK, length - offset)
        view = memoryview(buf)[:count]
        got = os.preadv(fd, [view], offset)
        if got <= 0:
            break
        # compared as bytes (memcmp); memoryviews compare item by item, 20 times slower
        if (buf if got == CHUNK else buf[:got]) != _ZERO[:got]:
            fcntl.ioctl(fd, BLKZEROOUT, struct.pack("QQ", offset, got))
            zeroed += got
        offset += got
    return zeroed


def _punch_file(target: Target, length: int) -> None:
    """Make ``[0, length)`` of the open regular file read as zero without writing."""
    from libvirt_rdm_backup.process import run

    if target.size() < length:
        os.ftruncate(target.fd, length)
    run(["fallocate", "--punch-hole", "--offset", "0", "--length", str(length),
         target.fd_path], pass_fds=(target.fd,))


def write_disk(node: dict[str, Any], record: DiskRecord, target: Target,
               objects: tuple[dict[str, Any], ...] = (), speed: int = 0,
               progress: ProgressCallback | None = None) -> int:
    """Write the disk image ``node`` (blockdev options; ``objects``: the QEMU objects it
    needs) to ``target``; returns bytes zeroed.

    The copy is a block job of a private storage daemon (``speed``: bytes/s, 0: no
    limit), which inherits the target's open descriptor and opens it as ``/dev/fd/N``. An existing
    target is written through its checked descriptor only. When the copy fails there,
    the error names the range that may have been changed.
    """
    source = Endpoint(node, objects)
    label = record.disk.target
    if not target.exists:  # a new file appears whole or not at all
        try:
            with new_file_whole(target.real) as partial:
                fd = os.open(partial, os.O_RDWR | os.O_CLOEXEC | os.O_NOFOLLOW)
                try:
                    os.ftruncate(fd, record.size)
                    copy_image(source, fd_target(fd, False, record.size), label,
                               speed=speed, progress=progress)
                finally:
                    os.close(fd)
        except FileExistsError as err:
            raise OperationError(f"{target.path} was created by someone else during the "
                                 "restore; it was left as it is") from err
        except OSError as err:
            raise OperationError(f"cannot write {target.path}: {err.strerror or err}") from err
        return 0
    if not target.is_block:  # what a restore killed while creating this file left beside it
        with contextlib.suppress(OSError):
            remove_stale_partials(*os.path.split(target.real))
    length = min(target.size(), record.size) if target.is_block else record.size
    zeroed = 0
    try:
        if target.is_block:
            zeroed = zero_nonzero_ranges(target.fd, length)
        else:
            _punch_file(target, length)
        if length < record.size:
            source = Endpoint({"driver": "raw", "size": length, "file": node}, objects)
        copy_image(source, fd_target(target.fd, target.is_block, length), label,
                   speed=speed, progress=progress)
        os.fsync(target.fd)  # durable, and a failed write-back is this restore's failure
    except (RdmBackupError, OSError) as err:
        detail = err.strerror if isinstance(err, OSError) and err.strerror else str(err)
        raise OperationError(f"{detail}; bytes 0-{length} of {target.path} may have been "
                             "changed") from err
    return zeroed


def restore(
    conn: libvirt.virConnect | None,
    domain: str,
    target: str,
    disk: str,
    to: str,
    *,
    force: bool = False,
    backup_id: str | None = None,
    tls_dir: str | None = None,
    bwlimit: float | None = None,
    progress: ProgressCallback | None = None,
    key_file: str | None = None,
) -> RestoreResult:
    """Restore disk ``disk`` of ``domain`` from the repository at ``target`` into ``to``
    (``conn``: None when libvirt cannot be reached).

    The stored data is verified, and the whole chain opened, before anything is
    written. Refuses a target the kernel uses (mounted, swap, stacked devices)
    always, one smaller than the disk or used by a QEMU process or a running
    domain unless ``force``, and always one inside the repository. ``bwlimit``: MiB/s
    the copy may move (None: no limit); ``progress`` gets (copy, done, total) bytes.
    ``key_file``: the key of encrypted backups.
    """
    check_safe_name(disk, "disk name")
    speed = bwlimit_speed(bwlimit)
    with open_store(target, tls_dir=tls_dir, key_file=key_file) as store, \
            contextlib.ExitStack() as stack:
        # no prune changes the domain's backups while they are read (one cut short is
        # finished first: the backup is chosen again after it)
        stack.enter_context(store.reading(choose_backup(store, domain, backup_id).domain_uuid))
        manifest = choose_backup(store, domain, backup_id)
        record = manifest.disk(disk)
        if record is None:
            raise NotFoundError(f"backup {manifest.backup_id} has no disk {disk!r}")
        if restore_rbd.is_rbd(to):
            def chain() -> tuple[dict[str, Any], tuple[dict[str, Any], ...]]:
                return checked_node(store, manifest, disk), store.qemu_objects()
            data = restore_rbd.restore_to_rbd(
                conn, record, to, chain, store=store, force=force, speed=speed,
                progress=progress, cluster=defined_cluster(conn, manifest.domain_uuid, record, to))
            return RestoreResult(manifest.backup_id, disk, to, record.size, data, 0)
        if to:
            refuse_store_paths(store, to)
        with open_target(to, record.size, force, conn) as dest:
            if conn is None and dest.exists and not force:
                log.warning("libvirt did not answer: %s was checked against this host's "
                            "mounts, swap and QEMU processes only, not against the iSCSI "
                            "LUNs of running domains", to)
            node = checked_node(store, manifest, disk)  # what QEMU opens is what was checked
            try:
                # qemu-img map: opens the whole chain before anything is written, and
                # counts its data (a report, not a copy)
                data = node_data_bytes(node)
                zeroed = write_disk(node, record, dest, store.qemu_objects(), speed, progress)
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
