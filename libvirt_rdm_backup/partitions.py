"""What is on a disk image: its partitions (``sfdisk --json``) and their filesystems (``blkid``).

Partition tables (GPT, MBR) are read by ``sfdisk``, never parsed here; each partition,
or the whole image when it has no table, is probed by ``blkid -p`` at its offset. The
mount options keep a filesystem untouched: read-only, and no journal replay
(``noload`` for ext3/ext4, ``norecovery`` for XFS, which also gets ``nouuid`` so two
points of one filesystem can be mounted side by side).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup.errors import CommandError, OperationError
from libvirt_rdm_backup.process import require_tool, run

TIMEOUT = 120.0
EXTENDED_TYPES = {"5", "f", "85"}  # MBR extended partitions: containers of logical ones
LVM_REASON = "LVM physical volume: not mounted (LVM is out of scope)"
MOUNT_OPTIONS = {"ext4": "ro,noload", "ext3": "ro,noload", "xfs": "ro,norecovery,nouuid"}
NOT_MOUNTED = {  # blkid types that are not filesystems to mount, and why
    "LVM2_member": LVM_REASON,
    "swap": "swap space: nothing to mount",
    "crypto_LUKS": "LUKS encrypted: not mounted",
    "linux_raid_member": "RAID member: not mounted",
    "extended": "extended partition: its logical partitions are listed",
    "out-of-bounds": "partition reaches past the end of the disk: not mounted",
}


@dataclass(frozen=True)
class Area:
    """A partition, or the whole disk (``disk``): where it lies and what blkid found."""

    name: str  # p1, p2, ... or disk
    offset: int
    size: int
    fstype: str | None
    label: str | None = None

    def mount_options(self) -> str | None:
        """``-o`` options of a read-only mount (None: not a filesystem to mount)."""
        if self.fstype is None or self.fstype in NOT_MOUNTED:
            return None
        return MOUNT_OPTIONS.get(self.fstype, "ro")

    def not_mountable(self) -> str | None:
        """Why the area is not mounted (None: it is a filesystem to mount)."""
        if self.fstype is None:
            return "no filesystem found"
        return NOT_MOUNTED.get(self.fstype)


def partition_table(path: str) -> tuple[str | None, list[dict[str, Any]]]:
    """The table's label (``gpt``, ``dos``; None: no table) and its partitions as sfdisk
    lists them (``node``, ``start``, ``size`` in sectors, ``type``)."""
    done = run([require_tool("sfdisk"), "--json", path], check=False, timeout=TIMEOUT)
    if done.returncode != 0:
        if "does not contain a recognized partition table" in done.stderr:
            return None, []
        raise CommandError(["sfdisk", "--json", path], done.returncode, done.stderr)
    try:
        table = json.loads(done.stdout)["partitiontable"]
        label = str(table["label"])
        parts = table.get("partitions", [])
        if not isinstance(parts, list):
            raise TypeError("partitions is not a list")
        table["sectorsize"] = int(table.get("sectorsize", 512))
    except (ValueError, KeyError, TypeError) as err:
        raise OperationError(f"sfdisk described {path} in a way not understood: {err}") from err
    return label, [{**p, "sectorsize": table["sectorsize"]} for p in parts]


def probe(path: str, offset: int, size: int) -> dict[str, str]:
    """``blkid -p`` of ``size`` bytes at ``offset`` of ``path``: its tags (empty: nothing)."""
    done = run([require_tool("blkid"), "-p", "-o", "export", "-O", str(offset), "-S",
                str(size), path], check=False, timeout=TIMEOUT)
    if done.returncode == 2:  # nothing was found
        return {}
    if done.returncode != 0:
        raise CommandError(["blkid", "-p", path], done.returncode, done.stderr)
    tags = {}
    for line in done.stdout.splitlines():
        key, sep, value = line.partition("=")
        if sep:
            tags[key] = value
    return tags


def areas(path: str, size: int) -> tuple[str | None, list[Area]]:
    """The partition table's label and each partition of the image ``path`` (``size``
    bytes), with its filesystem type; without a table, the whole image as ``disk``."""
    label, parts = partition_table(path)
    if label is None:
        tags = probe(path, 0, size)
        return None, [Area("disk", 0, size, tags.get("TYPE"), tags.get("LABEL"))]
    found = []
    for index, part in enumerate(parts, 1):
        try:
            node = str(part["node"])
            sector = int(part["sectorsize"])
            offset, length = int(part["start"]) * sector, int(part["size"]) * sector
        except (KeyError, TypeError, ValueError) as err:
            raise OperationError(f"sfdisk listed a partition of {path} without "
                                 f"{err}") from err
        number = node[len(path):].lstrip("p") if node.startswith(path) else ""
        name = f"p{number}" if number.isdigit() else f"p{index}"
        if offset < 0 or length <= 0 or offset + length > size:
            found.append(Area(name, offset, length, "out-of-bounds"))
            continue
        if label == "dos" and str(part.get("type", "")).lower() in EXTENDED_TYPES:
            found.append(Area(name, offset, length, "extended"))
            continue
        tags = probe(path, offset, length)
        found.append(Area(name, offset, length, tags.get("TYPE"), tags.get("LABEL")))
    return label, found
