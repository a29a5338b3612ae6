"""Builders of fixture sysfs and /dev trees shaped like the real ones.

Devices live under ``sys/devices/...``; ``sys/class/block/NAME`` and
``sys/dev/block/MAJ:MIN`` are relative symlinks to them, as in real sysfs. A dev
node ``dev/NAME`` is a regular file holding ``MAJ:MIN`` (or empty, for a SCSI
generic node): only :class:`FixtureSysfsAgent` takes such files for device nodes,
the production agent never does.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.storage.sysfs import SysfsAgent

SCSI_HOST = "devices/pci0000:00/0000:00:05.0/host0"
_DEVNUM_RE = re.compile(r"^\d+:\d+$")


class FixtureSysfsAgent(SysfsAgent):
    """A SysfsAgent that also reads the fixture tree's regular-file dev nodes."""

    def _sysdir_for_node(self, dev: Path, source: str) -> Path:
        if not dev.is_file():
            return super()._sysdir_for_node(dev, source)
        content = dev.read_text().strip()
        if _DEVNUM_RE.match(content):
            return self._sysdir_for_devnum(content)
        generic = self.sysfs_root / "class/scsi_generic" / dev.name / "device"
        if generic.is_dir():
            return self._block_under(generic, source)
        raise StorageError(f"{source} is not a block device")


class SysfsTree:
    """A fixture tree under ``root``: ``root/sys`` and ``root/dev``."""

    def __init__(self, root: Path) -> None:
        self.sys = root / "sys"
        self.dev = root / "dev"
        self.sys.mkdir(parents=True, exist_ok=True)
        self.dev.mkdir(parents=True, exist_ok=True)

    def agent(self) -> SysfsAgent:
        """A SysfsAgent reading this tree, its device-mapper tables from :meth:`dm_table`."""
        return FixtureSysfsAgent(sysfs_root=str(self.sys), dev_root=str(self.dev),
                                 dm_table=self.dm_table)

    def dm_table(self, dm_name: str) -> str | None:
        """The ``dmsetup table`` output of the tree's device ``dm_name``: the ``dm/table``
        file beside its ``dm/name`` (a file real sysfs does not have), or None."""
        for name_file in (self.sys / "devices/virtual/block").glob("*/dm/name"):
            table = name_file.parent / "table"
            if name_file.read_text().strip() == dm_name and table.is_file():
                return table.read_text()
        return None

    def write(self, directory: Path, attrs: dict[str, str | int]) -> None:
        """Write attribute files (relative paths, values as text)."""
        for rel, value in attrs.items():
            path = directory / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(f"{value}\n")

    def _symlink(self, link: Path, target: Path) -> None:
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(os.path.relpath(target, link.parent))

    def block(
        self,
        name: str,
        devnum: str,
        sectors: int,
        *,
        under: Path | None = None,
        attrs: dict[str, str | int] | None = None,
    ) -> Path:
        """A block device directory (``under`` a parent for partitions, else virtual)."""
        parent = under if under is not None else self.sys / "devices/virtual/block"
        sysdir = parent / name
        sysdir.mkdir(parents=True)
        base: dict[str, str | int] = {"dev": devnum, "size": sectors, "ro": 0}
        if under is None or not (sysdir.parent / "dev").exists():
            base.update({"queue/logical_block_size": 512, "queue/physical_block_size": 4096})
        self.write(sysdir, {**base, **(attrs or {})})
        self._symlink(self.sys / "class/block" / name, sysdir)
        self._symlink(self.sys / "dev/block" / devnum, sysdir)
        (self.dev / name).write_text(f"{devnum}\n")
        return sysdir

    def scsi_disk(
        self,
        name: str,
        devnum: str,
        sectors: int,
        hctl: str,
        device_attrs: dict[str, str | int],
    ) -> Path:
        """A SCSI disk: ``.../host0/target0:0:T/H:C:T:L/block/NAME`` with device attributes."""
        target = hctl.rsplit(":", 1)[0]
        scsi_dev = self.sys / SCSI_HOST / f"target{target}" / hctl
        self.write(scsi_dev, device_attrs)
        sysdir = self.block(
            name, devnum, sectors, under=scsi_dev / "block", attrs={"queue/rotational": 1}
        )
        self._symlink(sysdir / "device", scsi_dev)
        self._symlink(self.sys / "bus/scsi/devices" / hctl, scsi_dev)
        return sysdir

    def partition(self, disk: Path, number: int, devnum: str, start: int, sectors: int) -> Path:
        """Partition ``number`` of ``disk`` (start and size in sectors)."""
        name = f"{disk.name}{number}"
        return self.block(
            name, devnum, sectors, under=disk, attrs={"partition": number, "start": start}
        )

    def slaves(self, holder: Path, *slaves: Path) -> None:
        """``holder/slaves/NAME`` links (and the matching ``holders`` links)."""
        for slave in slaves:
            self._symlink(holder / "slaves" / slave.name, slave)
            self._symlink(slave / "holders" / holder.name, holder)

    def link(self, rel: str, target: str, absolute: bool = False) -> None:
        """A /dev symlink such as ``disk/by-id/NAME`` to device ``target``."""
        link = self.dev / rel
        link.parent.mkdir(parents=True, exist_ok=True)
        if absolute:
            link.symlink_to(f"/dev/{target}")
        else:
            link.symlink_to(os.path.relpath(self.dev / target, link.parent))
