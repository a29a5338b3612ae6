"""Finding a disk's original device on this host by its identity, for ``--to-original``.

The backup's claims (:mod:`.restore_claims`) only say what to look for; every
device comes from what the host says: the whole disks in sysfs (WWID, serial),
links under ``/dev/disk/by-id``, the loop driver (which inode at which offset backs
each loop device), a local tgtd's targets and the LUN's own INQUIRY answers.
Identifiers are tried strongest first: complete VPD 0x83 designators (a disk's
WWID), an iSCSI IQN and LUN of a local target, a serial number, a by-id link, a
loop device's backing file and offset. The device found must agree with every
other identifier both sides have, and be at least as large as the disk.
"""

from __future__ import annotations

import fcntl
import os
import stat
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from libvirt_rdm_backup.domain.disks import IscsiSource, RbdSource
from libvirt_rdm_backup.engine.restore_claims import Claims, designators_of
from libvirt_rdm_backup.errors import RdmBackupError, UsageError
from libvirt_rdm_backup.storage import tgt
from libvirt_rdm_backup.storage.base import StorageNode
from libvirt_rdm_backup.storage.devnodes import device_node, read_attr, read_int
from libvirt_rdm_backup.storage.iscsi import IscsiAgent, is_loopback_host
from libvirt_rdm_backup.storage.sysfs import SysfsAgent

LOOP_GET_STATUS64 = 0x4C05
_LOOP_INFO64 = struct.Struct("=QQQQQIIII64s64s32sQQ")
_SKIPPED = ("loop", "dm-", "md", "ram", "zram", "nbd", "sr", "fd")
LunAsker = Callable[[IscsiSource], StorageNode]
IscsiAuthority = Callable[[IscsiSource], str | None]


@dataclass(frozen=True)
class OriginalDevice:
    """Where a disk goes back to: a block device, an iSCSI LUN or an RBD image, and why it
    is the one."""

    disk: str
    path: str  # a block device, or the LUN's iscsi:// URL
    size: int
    matched_on: str
    rdev: int | None = None  # a block device's number, checked again once it is open
    iscsi: IscsiSource | None = None
    backing: tuple[int, int, int] | None = None  # a loop device's (st_dev, inode, offset)
    rbd: RbdSource | None = None  # an RBD image, reached as this source
    image_id: str | None = None  # the RBD image's id, checked again before it is written


@dataclass(frozen=True)
class LoopState:
    """A bound loop device as the kernel reports it."""

    path: str
    rdev: int
    size: int
    backing_file: str
    offset: int
    inode: int
    st_dev: int


def human(size: int) -> str:
    """``512 MiB``, ``1 GiB``: sizes in refusals."""
    for unit, scale in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if size >= scale:
            value = size / scale
            return f"{value:.0f} {unit}" if value == int(value) else f"{value:.2f} {unit}"
    return f"{size} bytes"


class HostDevices:
    """This host's whole disks and loop devices, read from sysfs (roots: parameters)."""

    def __init__(self, sysfs_root: str = "/sys", dev_root: str = "/dev") -> None:
        self.sysfs = SysfsAgent(sysfs_root, dev_root)
        self.class_block = Path(sysfs_root) / "class/block"
        self.dev_root = Path(dev_root)

    def _names(self) -> list[str]:
        try:
            return sorted(os.listdir(self.class_block))
        except OSError:
            return []

    def disks(self) -> list[StorageNode]:
        """Every whole disk (no partition, loop, dm, md) with its identity."""
        found = []
        for name in self._names():
            if name.startswith(_SKIPPED) or (self.class_block / name / "partition").exists():
                continue
            try:
                found.append(self.sysfs.map_path(str(self.dev_root / name)))
            except RdmBackupError:
                continue
        return found

    def by_id(self, name: str) -> StorageNode | None:
        """The device ``/dev/disk/by-id/NAME`` points at, when it is a block device."""
        link = self.dev_root / "disk/by-id" / name
        try:
            target = self.sysfs._resolve(str(link))
            if not stat.S_ISBLK(device_node(str(target)).st_mode):
                return None
            return self.sysfs.map_path(str(target))
        except (OSError, RdmBackupError):
            return None

    def loops(self) -> list[LoopState]:
        """Every bound loop device, with the inode and offset the loop driver reports."""
        found = []
        for name in self._names():
            if name.startswith("loop") and (state := self._loop(name)) is not None:
                found.append(state)
        return found

    def _loop(self, name: str) -> LoopState | None:
        sysdir = self.class_block / name
        backing = read_attr(sysdir / "loop/backing_file")
        sectors = read_int(sysdir / "size")
        path = self.dev_root / name
        if not backing or sectors is None:
            return None
        try:
            st = device_node(str(path))
            if not stat.S_ISBLK(st.st_mode) or \
                    f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}" != read_attr(sysdir / "dev"):
                return None
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NOFOLLOW)
            try:
                st_dev, inode, offset = loop_backing(fd)
            finally:
                os.close(fd)
        except OSError:
            return None
        return LoopState(str(path), st.st_rdev, sectors * 512, backing, offset, inode, st_dev)


def loop_backing(fd: int) -> tuple[int, int, int]:
    """(st_dev, inode, offset) of what backs the loop device open as ``fd`` (OSError when it
    is no bound loop device)."""
    raw = fcntl.ioctl(fd, LOOP_GET_STATUS64, bytes(_LOOP_INFO64.size))
    st_dev, inode, _rdev, offset = _LOOP_INFO64.unpack(raw)[:4]
    return int(st_dev), int(inode), int(offset)


def local_tgt(source: IscsiSource) -> str | None:
    """``local tgtd`` when the LUN is a target of this host's tgtd on a loopback portal."""
    if not is_loopback_host(source.host) or not tgt.tgtadm_available():
        return None
    try:
        return "the local tgtd" if tgt.find_lun(source.iqn, source.lun) is not None else None
    except RdmBackupError:
        return None


def ask_lun(source: IscsiSource) -> StorageNode:
    """The LUN's identity from its own answers (INQUIRY, VPD pages, READ CAPACITY)."""
    return IscsiAgent(use_local_tgt=False).map_lun(source)


def find_original(claims: Claims, host: HostDevices | None = None,
                  authority: IscsiAuthority = local_tgt,
                  asker: LunAsker = ask_lun) -> OriginalDevice:
    """The device of this host that is ``claims``' original, checked (UsageError naming
    what differs, or what was not found)."""
    host = host or HostDevices()
    if claims.kind == "loop":
        found = _find_loop(claims, host)
    elif claims.kind == "disk":
        found = _find_disk(claims, host)
    else:
        found = _find_lun(claims, host, authority, asker)
    if found.size < claims.size:
        raise UsageError(f"{claims.disk}: {found.path} is {human(found.size)}, the disk is "
                         f"{human(claims.size)}")
    return found


def _find_loop(claims: Claims, host: HostDevices) -> OriginalDevice:
    loop = claims.loop
    assert loop is not None
    by_inode = loop.inode is not None and loop.st_dev is not None
    matches = [s for s in host.loops() if s.offset == loop.offset and (
        (s.inode, s.st_dev) == (loop.inode, loop.st_dev) if by_inode
        else s.backing_file == loop.backing_file)]
    what = f"{loop.backing_file}" + (f" (inode {loop.inode})" if by_inode else "")
    if not matches:
        now = next((s for s in host.loops() if s.path == loop.device), None)
        also = f"; {now.path} now has {now.backing_file} at offset {now.offset}" if now else ""
        raise UsageError(f"{claims.disk}: no loop device of this host has {what} at offset "
                         f"{loop.offset}{also}")
    if len(matches) > 1:
        raise UsageError(f"{claims.disk}: {len(matches)} loop devices have {what} at offset "
                         f"{loop.offset} ({', '.join(s.path for s in matches)}); restore it "
                         "with --to")
    state = matches[0]
    return OriginalDevice(claims.disk, state.path, state.size,
                          f"loop backing file {what} at offset {loop.offset}", rdev=state.rdev,
                          backing=(state.st_dev, state.inode, state.offset))


def _unique(claims: Claims, nodes: list[StorageNode], what: str) -> StorageNode:
    if not nodes:
        raise UsageError(f"{claims.disk}: no device of this host has {what}")
    if len(nodes) > 1:
        raise UsageError(f"{claims.disk}: {len(nodes)} devices of this host have {what} "
                         f"({', '.join(n.path or n.name for n in nodes)}); restore it with --to")
    return nodes[0]


def _block_device(claims: Claims, node: StorageNode, matched_on: str) -> OriginalDevice:
    serial = node.identity.get("serial")
    if claims.serial and serial and serial != claims.serial:
        raise UsageError(f"{claims.disk}: {node.path} has serial {serial}, the backup's LUN had "
                         f"{claims.serial}")
    if claims.wwid and node.identity.get("wwid") not in (None, claims.wwid):
        raise UsageError(f"{claims.disk}: {node.path} has WWID {node.identity.get('wwid')}, the "
                         f"backup's LUN had {claims.wwid}")
    try:
        rdev = device_node(str(node.path)).st_rdev
    except OSError as err:
        raise UsageError(f"{claims.disk}: {node.path} cannot be used: {err.strerror}") from err
    return OriginalDevice(claims.disk, str(node.path), int(node.size or 0), matched_on,
                          rdev=rdev)


def _find_disk(claims: Claims, host: HostDevices) -> OriginalDevice:
    if claims.wwid:
        node = _unique(claims, [d for d in host.disks() if d.identity.get("wwid") == claims.wwid],
                       f"WWID {claims.wwid}")
        return _block_device(claims, node, f"WWID {claims.wwid}")
    if claims.serial:
        node = _unique(claims, [d for d in host.disks()
                                if d.identity.get("serial") == claims.serial],
                       f"serial {claims.serial}")
        return _block_device(claims, node, f"serial {claims.serial}")
    for name in claims.by_id:
        found = host.by_id(name)
        if found is not None:
            return _block_device(claims, found, f"/dev/disk/by-id/{name}")
    if claims.by_id:
        raise UsageError(f"{claims.disk}: no link /dev/disk/by-id/{claims.by_id[0]} on this host")
    raise UsageError(f"{claims.disk}: the backup recorded no WWID, serial or by-id link of "
                     f"{claims.path}; restore it with --to")


def _find_lun(claims: Claims, host: HostDevices, authority: IscsiAuthority,
              asker: LunAsker) -> OriginalDevice:
    source = claims.iscsi
    assert source is not None
    wwids = {"naa." + d[4:] for d in claims.designators if d.startswith("naa.")}
    attached = [d for d in host.disks() if d.identity.get("wwid") in wwids]
    if attached:  # the LUN is attached to this host's kernel (an iSCSI session)
        node = _unique(claims, attached, f"WWID {attached[0].identity.get('wwid')}")
        return _block_device(claims, node, f"VPD 0x83 designator {node.identity.get('wwid')}")
    where = authority(source)
    if where is None:
        raise UsageError(f"{claims.disk}: no device of this host has the backup's LUN "
                         f"{source.iqn}/{source.lun} (no local target or session on portal "
                         f"{source.portal}); restore it with --to")
    try:
        node = asker(source)
    except RdmBackupError as err:
        raise UsageError(f"{claims.disk}: the LUN {source.url} does not answer: {err}") from err
    return _checked_lun(claims, node, where)


def _checked_lun(claims: Claims, node: StorageNode, where: str) -> OriginalDevice:
    source = claims.iscsi
    assert source is not None
    identity: dict[str, Any] = node.identity
    now = designators_of(identity.get("designators"), claims.disk)
    missing = [d for d in claims.designators if d not in now]
    if missing:
        has = ", ".join(now) or "no designators"
        raise UsageError(f"{claims.disk}: {source.url} has {has}, the backup's LUN had "
                         f"{', '.join(missing)}")
    serial = identity.get("serial")
    if claims.serial and serial != claims.serial:
        raise UsageError(f"{claims.disk}: {source.url} has serial {serial or '(none)'}, the "
                         f"backup's LUN had {claims.serial}")
    lun = f"iSCSI {source.iqn}/{source.lun} on {where}"
    if claims.designators:
        matched = f"VPD 0x83 designators {', '.join(claims.designators)} of {lun}"
    elif claims.serial:
        matched = f"{lun}, serial {claims.serial}"
    else:
        matched = lun
    return OriginalDevice(claims.disk, source.url, int(node.size or 0), matched, iscsi=source)
