"""Mapping local block devices through sysfs: loop, partition, device-mapper, md, disk.

:class:`SysfsAgent` resolves a disk's host path (following ``/dev/disk/by-id``,
``/dev/mapper`` and other symlinks) to a device number, then reads
``/sys/dev/block/MAJ:MIN`` and builds the :class:`StorageNode` tree layer by layer:

* loop: one extent onto its backing file at ``loop/offset``;
* partition: one extent onto its parent disk at ``start * 512``;
* device-mapper: dm-linear segments from ``dmsetup table`` (one extent each);
  dm-multipath: one extent per path, each covering the whole LUN and its target
  marked ``identity["path"] = True`` (the paths are alternatives, not
  concatenated: read any one of them); any other table, or no table at all,
  lists the slaves with ``identity["segments"] = "unknown"`` on the dm node;
* md: raid1 members as whole-device mirrors (``identity["mirror"] = True``), other
  levels with unknown segments;
* anything else: a leaf ``disk`` with its SCSI/NVMe/virtio identity.

A source is only ever looked at, never opened for reading: its device number comes
from ``fstat`` of an ``O_PATH`` descriptor (:func:`device_node`), and anything but a
block device (or a SCSI generic node whose SCSI device has one) is refused. Both
roots and the reader of device-mapper tables are parameters (another tree, another
source of ``dmsetup table`` output).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from collections.abc import Callable
from pathlib import Path
from typing import Any

from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.errors import OperationError, StorageError
from libvirt_rdm_backup.process import run
from libvirt_rdm_backup.storage.base import Extent, StorageNode

SECTOR = 512
MAX_DEPTH = 32
_DEVNUM_RE = re.compile(r"^\d+:\d+$")
_HCTL_RE = re.compile(r"^(?:scsi_host)?(\d+):(\d+):(\d+):(\d+)$")
_DELETED = " (deleted)"

DmTableReader = Callable[[str], str | None]


def dmsetup_table(name: str) -> str | None:
    """``dmsetup table NAME`` output, or None when dmsetup is missing or fails."""
    if shutil.which("dmsetup") is None:
        return None
    try:
        return run(["dmsetup", "table", name], timeout=30).stdout
    except OperationError:
        return None


def parse_dm_table(text: str) -> list[list[str]]:
    """Split ``dmsetup table`` output into per-segment word lists (blank lines dropped)."""
    return [line.split() for line in text.splitlines() if line.strip()]


def device_node(path: str) -> os.stat_result:
    """``fstat`` of ``path`` itself, opened with ``O_PATH | O_NOFOLLOW``.

    An ``O_PATH`` descriptor does not open the device (no driver is called, nothing
    can be read through it), a symlink is not followed, and the mode and device
    number come from the object the descriptor holds, not from a second lookup of
    the name. Raises OSError (ENOENT, ELOOP, ...).
    """
    fd = os.open(path, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        return os.fstat(fd)
    finally:
        os.close(fd)


def _read(path: Path) -> str | None:
    """Stripped content of a sysfs attribute, or None when missing or unreadable."""
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def _read_int(path: Path) -> int | None:
    value = _read(path)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _put(identity: dict[str, Any], key: str, value: Any) -> None:
    """Set ``identity[key]`` unless the value is missing or empty."""
    if value is not None and value != "" and value != []:
        identity[key] = value


class SysfsAgent:
    """Maps host block devices (and files behind loop devices) through sysfs."""

    name = "sysfs"

    def __init__(
        self,
        sysfs_root: str = "/sys",
        dev_root: str = "/dev",
        dm_table: DmTableReader = dmsetup_table,
    ) -> None:
        self.sysfs_root = Path(sysfs_root)
        self.dev_root = Path(dev_root)
        self._dm_table = dm_table

    # -- the StorageAgent protocol --------------------------------------------

    def can_map(self, disk: RawDisk) -> bool:
        """True for block/volume/hostdev disks whose source is a known block device."""
        if disk.source_kind is SourceKind.ISCSI or not disk.source_path:
            return False
        try:
            self._sysdir_for_source(disk.source_path)
        except StorageError:
            return False
        return True

    def map(self, disk: RawDisk) -> StorageNode:
        """The storage tree behind ``disk.source_path``."""
        if not disk.source_path:
            raise StorageError(f"disk {disk.target} has no host source path")
        return self._map_sysdir(self._sysdir_for_source(disk.source_path), 0)

    # -- public helpers ----------------------------------------------------------

    def map_path(self, path: str) -> StorageNode:
        """The storage tree behind a block device path (or a SCSI generic / H:B:T:L source)."""
        return self._map_sysdir(self._sysdir_for_source(path), 0)

    def map_backing(self, path: str) -> StorageNode:
        """A backing store: a block device is mapped, anything else becomes a ``file`` node."""
        return self._map_backing(path, 0)

    # -- resolving paths to sysfs directories ------------------------------------

    def _host_path(self, path: str) -> Path:
        """Translate a host ``/dev/...`` path into ``dev_root``."""
        if str(self.dev_root) != "/dev" and (path == "/dev" or path.startswith("/dev/")):
            return self.dev_root / path[len("/dev/") :]
        return Path(path)

    def _resolve(self, path: str) -> Path:
        """Follow symlinks (translating absolute ``/dev`` targets into dev_root)."""
        current = self._host_path(path)
        for _ in range(40):
            try:
                link = os.readlink(current)
            except OSError:
                return Path(os.path.normpath(current))
            target = self._host_path(link)
            current = target if target.is_absolute() else current.parent / target
        raise StorageError(f"too many levels of symbolic links at {path}")

    def _sysdir_for_source(self, source: str) -> Path:
        hctl = _HCTL_RE.match(source)
        if hctl:
            address = ":".join(hctl.groups())
            return self._block_under(self.sysfs_root / "bus/scsi/devices" / address, source)
        return self._sysdir_for_node(self._resolve(source), source)

    def _sysdir_for_node(self, dev: Path, source: str) -> Path:
        """The sysfs directory of device node ``dev`` (``source`` names it in errors)."""
        try:
            st = device_node(str(dev))
        except OSError as err:
            raise StorageError(f"cannot open {source}: {err.strerror}") from err
        devnum = f"{os.major(st.st_rdev)}:{os.minor(st.st_rdev)}"
        if stat.S_ISBLK(st.st_mode):
            return self._sysdir_for_devnum(devnum)
        if stat.S_ISCHR(st.st_mode):
            return self._block_under(self.sysfs_root / "dev/char" / devnum / "device", source)
        raise StorageError(f"{source} is not a block device")

    def _block_under(self, device_dir: Path, source: str) -> Path:
        """The block device of a SCSI device directory (``device/block/NAME``)."""
        try:
            names = sorted(os.listdir(device_dir / "block"))
        except OSError as err:
            raise StorageError(f"no block device for SCSI device {source}") from err
        if not names:
            raise StorageError(f"no block device for SCSI device {source}")
        return self._sysdir_for_name(names[0])

    def _sysdir_for_devnum(self, devnum: str) -> Path:
        if not _DEVNUM_RE.fullmatch(devnum):
            raise StorageError(f"{devnum[:64]!r} is not a device number MAJ:MIN")
        sysdir = self.sysfs_root / "dev/block" / devnum
        if not sysdir.is_dir():
            raise StorageError(f"block device {devnum} is not in {self.sysfs_root}")
        return sysdir.resolve()

    def _sysdir_for_name(self, name: str) -> Path:
        sysdir = self.sysfs_root / "class/block" / name
        if not sysdir.is_dir():
            raise StorageError(f"block device {name} is not in {self.sysfs_root}")
        return sysdir.resolve()

    # -- building nodes ------------------------------------------------------------

    def _map_sysdir(self, sysdir: Path, depth: int) -> StorageNode:
        if depth > MAX_DEPTH:
            raise StorageError(f"storage stack under {sysdir.name} is too deep")
        if (sysdir / "loop").is_dir():
            return self._loop_node(sysdir, depth)
        if (sysdir / "partition").exists():
            return self._partition_node(sysdir, depth)
        if (sysdir / "dm").is_dir():
            return self._dm_node(sysdir, depth)
        if (sysdir / "md").is_dir():
            return self._md_node(sysdir, depth)
        return self._node(sysdir, "disk", self._disk_identity(sysdir))

    def _node(self, sysdir: Path, kind: str, extra: dict[str, Any] | None = None) -> StorageNode:
        size = self._size(sysdir)
        identity = self._common_identity(sysdir, size)
        identity.update(extra or {})
        path = str(self.dev_root / sysdir.name)
        return StorageNode(kind=kind, name=sysdir.name, path=path, size=size, identity=identity)

    def _size(self, sysdir: Path) -> int | None:
        sectors = _read_int(sysdir / "size")
        return None if sectors is None else sectors * SECTOR

    def _common_identity(self, sysdir: Path, size: int | None) -> dict[str, Any]:
        identity: dict[str, Any] = {}
        _put(identity, "dev", _read(sysdir / "dev"))
        _put(identity, "size", size)
        queue = sysdir / "queue"
        if not queue.is_dir() and (sysdir / "partition").exists():
            queue = sysdir.parent / "queue"
        _put(identity, "logical_block_size", _read_int(queue / "logical_block_size"))
        _put(identity, "physical_block_size", _read_int(queue / "physical_block_size"))
        ro = _read_int(sysdir / "ro")
        if ro is not None:
            identity["read_only"] = bool(ro)
        _put(identity, "by_id", self._by_id(sysdir.name))
        return identity

    def _by_id(self, name: str) -> list[str]:
        """Sorted names of the ``disk/by-id`` symlinks that point at device ``name``."""
        by_id = self.dev_root / "disk/by-id"
        try:
            entries = os.listdir(by_id)
        except OSError:
            return []
        wanted = Path(os.path.normpath(self.dev_root / name))
        found = []
        for entry in entries:
            try:
                if self._resolve(str(by_id / entry)) == wanted:
                    found.append(entry)
            except StorageError:
                continue
        return sorted(found)

    def _disk_identity(self, sysdir: Path) -> dict[str, Any]:
        device = sysdir / "device"
        identity: dict[str, Any] = {}
        _put(identity, "wwid", _read(device / "wwid") or _read(sysdir / "wwid"))
        _put(identity, "vendor", _read(device / "vendor"))
        _put(identity, "model", _read(device / "model") or _read(sysdir / "model"))
        _put(identity, "rev", _read(device / "rev"))
        _put(identity, "serial", _read(device / "serial") or _read(sysdir / "serial"))
        rotational = _read_int(sysdir / "queue/rotational")
        if rotational is not None:
            identity["rotational"] = bool(rotational)
        if device.exists():
            address = device.resolve().name
            if _HCTL_RE.match(address):
                identity["scsi_address"] = address
        return identity

    # -- loop --------------------------------------------------------------------

    def _loop_node(self, sysdir: Path, depth: int) -> StorageNode:
        loop = sysdir / "loop"
        offset = _read_int(loop / "offset") or 0
        backing = _read(loop / "backing_file")
        extra: dict[str, Any] = {"offset": offset}
        _put(extra, "sizelimit", _read_int(loop / "sizelimit"))
        dio = _read_int(loop / "dio")
        if dio is not None:
            extra["direct_io"] = bool(dio)
        if backing and backing.endswith(_DELETED):
            backing = backing[: -len(_DELETED)]
            extra["backing_file_deleted"] = True
        _put(extra, "backing_file", backing)
        node = self._node(sysdir, "loop", extra)
        if backing:
            target = self._map_backing(backing, depth + 1)
            node.extents.append(Extent(0, node.size or 0, offset, target))
        return node

    def _map_backing(self, path: str, depth: int) -> StorageNode:
        host = self._host_path(path)
        try:
            st = os.stat(host)
        except OSError:
            st = None
        if st is not None and stat.S_ISBLK(st.st_mode):
            return self._map_sysdir(self._sysdir_for_source(path), depth)
        identity: dict[str, Any] = {"exists": st is not None}
        if st is not None:
            identity.update({"size": st.st_size, "inode": st.st_ino, "st_dev": st.st_dev})
        return StorageNode(
            kind="file",
            name=os.path.basename(path),
            path=path,
            size=st.st_size if st is not None else None,
            identity=identity,
        )

    # -- partition -----------------------------------------------------------------

    def _partition_node(self, sysdir: Path, depth: int) -> StorageNode:
        start = (_read_int(sysdir / "start") or 0) * SECTOR
        extra: dict[str, Any] = {"start": start, "parent": sysdir.parent.name}
        _put(extra, "partition", _read_int(sysdir / "partition"))
        node = self._node(sysdir, "partition", extra)
        parent = self._map_sysdir(sysdir.parent, depth + 1)
        node.extents.append(Extent(0, node.size or 0, start, parent))
        return node

    # -- slaves (dm, md) -----------------------------------------------------------

    def _slave_dirs(self, sysdir: Path) -> list[Path]:
        try:
            names = sorted(os.listdir(sysdir / "slaves"))
        except OSError:
            return []
        return [self._sysdir_for_name(name) for name in names]

    def _unknown_segments(self, node: StorageNode, sysdir: Path, depth: int) -> None:
        node.identity["segments"] = "unknown"
        for slave_dir in self._slave_dirs(sysdir):
            slave = self._map_sysdir(slave_dir, depth + 1)
            node.extents.append(Extent(0, slave.size or 0, 0, slave))

    def _whole_members(self, node: StorageNode, sysdir: Path, depth: int, mark: str) -> None:
        """Each slave holds the whole device (multipath paths, raid1 mirrors)."""
        for slave_dir in self._slave_dirs(sysdir):
            slave = self._map_sysdir(slave_dir, depth + 1)
            slave.identity[mark] = True
            offset = (_read_int(sysdir / f"md/dev-{slave_dir.name}/offset") or 0) * SECTOR
            node.extents.append(Extent(0, node.size or 0, offset, slave))

    # -- device-mapper -------------------------------------------------------------

    def _dm_table_lines(self, dm_name: str) -> list[list[str]] | None:
        text = self._dm_table(dm_name) if dm_name else None
        return None if text is None else parse_dm_table(text)

    def _dm_node(self, sysdir: Path, depth: int) -> StorageNode:
        dm_name = _read(sysdir / "dm/name") or ""
        uuid = _read(sysdir / "dm/uuid") or ""
        extra: dict[str, Any] = {}
        _put(extra, "dm_name", dm_name)
        _put(extra, "dm_uuid", uuid)
        if "-" in uuid:
            extra["dm_subsystem"] = uuid.split("-", 1)[0]
        table = self._dm_table_lines(dm_name)
        types = sorted({seg[2] for seg in table or [] if len(seg) > 2})
        if types:
            extra["dm_target_types"] = types
        kind = _dm_kind(uuid, types)
        node = self._node(sysdir, kind, extra)
        node.path = str(self.dev_root / "mapper" / dm_name) if dm_name else node.path
        if kind == "dm-multipath":
            self._whole_members(node, sysdir, depth, "path")
        elif kind == "dm-linear" and table:
            node.extents.extend(self._linear_extents(table, depth))
        else:
            self._unknown_segments(node, sysdir, depth)
        return node

    def _linear_extents(self, table: list[list[str]], depth: int) -> list[Extent]:
        extents = []
        for seg in table:
            try:
                start, length, device, offset = int(seg[0]), int(seg[1]), seg[3], int(seg[4])
            except (IndexError, ValueError) as err:
                raise StorageError(f"unreadable dm-linear segment: {' '.join(seg)}") from err
            if _DEVNUM_RE.match(device):
                target = self._map_sysdir(self._sysdir_for_devnum(device), depth + 1)
            else:
                target = self._map_sysdir(self._sysdir_for_source(device), depth + 1)
            extents.append(Extent(start * SECTOR, length * SECTOR, offset * SECTOR, target))
        return extents

    # -- md ------------------------------------------------------------------------

    def _md_node(self, sysdir: Path, depth: int) -> StorageNode:
        md = sysdir / "md"
        extra: dict[str, Any] = {}
        level = _read(md / "level")
        _put(extra, "md_level", level)
        _put(extra, "md_raid_disks", _read_int(md / "raid_disks"))
        _put(extra, "md_uuid", _read(md / "uuid"))
        _put(extra, "md_metadata_version", _read(md / "metadata_version"))
        node = self._node(sysdir, "md", extra)
        if level == "raid1":
            self._whole_members(node, sysdir, depth, "mirror")
        else:
            self._unknown_segments(node, sysdir, depth)
        return node


def _dm_kind(uuid: str, types: list[str]) -> str:
    """``dm-multipath``, ``dm-linear`` or plain ``dm`` from the uuid prefix and table."""
    if uuid.startswith("mpath-") or types == ["multipath"]:
        return "dm-multipath"
    if types == ["linear"]:
        return "dm-linear"
    return "dm"
