"""The encrypted layers of an NBD volume for a ``rekey``, each checked before QEMU is
given the window of its LUKS header.

A layer's region, header and LUKS header position are read from the volume and checked
as readers check them (:func:`~libvirt_rdm_backup.qemu.layers.header_problem`, no
backing file, the manifest's size) and as the file-repository rekey checks its layers
(:func:`~libvirt_rdm_backup.qemu.layers.luks_region`: the LUKS header clear of the qcow2
header and tables, inside the layer's used bytes). QEMU then opens nothing but that
window (a ``raw`` node of those bytes of the export under its ``luks`` driver): no qcow2
header is parsed by QEMU, whatever the server answers later, and the key change writes
nowhere else. The window must also be clear of every other layer's region, of every
manifest and of the journal, so that no two changes meet; and no listed layer may lie
where the journal and the new manifests are allocated (free regions, past the allocation
pointer).
"""

from __future__ import annotations

import re
from bisect import bisect_left
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup.errors import DamagedBackupError, RepositoryError
from libvirt_rdm_backup.qemu import layers
from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.repository.encryption import EncryptionRecord
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.rekey_journal import encrypted_layers
from libvirt_rdm_backup.repository.store import Scan
from libvirt_rdm_backup.targets.nbd_volume import NbdVolume
from libvirt_rdm_backup.targets.volume_changes import layer_regions
from libvirt_rdm_backup.targets.volume_format import (
    Region,
    align,
    entry_problem,
    journal_region,
    location_problem,
)
from libvirt_rdm_backup.targets.volume_space import entry_regions, overlap, subtract

LayerKey = tuple[str, str, str]  # domain UUID, backup id, disk


@dataclass(frozen=True)
class VolumeLayer:
    """A checked encrypted layer of a volume: its region and LUKS header position."""

    manifest: Manifest
    record: DiskRecord
    offset: int  # the region's, in the volume
    length: int  # the layer's used bytes (what its digest covers)
    luks: Region  # the LUKS header, within the layer

    @property
    def key(self) -> LayerKey:
        return self.manifest.domain_uuid, self.manifest.backup_id, self.record.disk.target

    @property
    def window(self) -> Region:
        """The LUKS header's bytes in the volume."""
        return self.offset + self.luks[0], self.luks[1]

    def node(self, volume: NbdVolume) -> dict[str, Any]:
        """The protocol node of the LUKS header alone (QEMU's ``luks`` driver opens it)."""
        return volume.region_node(*self.window)

    def damaged(self, problem: str) -> DamagedBackupError:
        """The layer is damaged: ``problem`` says how."""
        return DamagedBackupError(self.manifest.backup_id,
                                  f"{self.record.data_file} {problem}",
                                  self.record.disk.target)

    def digests(self, volume: NbdVolume) -> tuple[Digest, Digest]:
        """The digests of its used bytes and of those outside its LUKS header."""
        return volume.digests(self.offset, self.length, self.luks)


def volume_record(backups: list[Manifest]) -> EncryptionRecord | None:
    """What a volume's encrypted records say of its key, as a file repository's
    ``encryption.json`` would (None: it holds no encrypted layer); RepositoryError when
    they do not name one salt and one key id, well formed."""
    found = {(str(r.encryption.get("salt")), str(r.encryption.get("key_id")))
             for m in backups for r in m.disks if r.encryption is not None}
    if not found:
        return None
    if len(found) > 1:
        raise RepositoryError("the encrypted layers of the volume name more than one key "
                              "or salt; nothing is changed")
    salt, key_id = found.pop()
    if not re.fullmatch(r"[0-9a-f]{32}", salt) or not re.fullmatch(r"[0-9a-f]{64}", key_id):
        raise RepositoryError("the encrypted layers of the volume name a malformed key id "
                              "or salt; nothing is changed")
    return EncryptionRecord(salt, key_id)


def open_layers(volume: NbdVolume, listed: Scan) -> dict[LayerKey, VolumeLayer]:
    """Every encrypted layer of the listed backups, checked (DamagedBackupError naming
    the first that is not what this tool writes, or whose LUKS header window meets
    another layer's region, a manifest or the journal)."""
    _check_owned(volume, listed.backups)
    found: dict[LayerKey, VolumeLayer] = {}
    for manifest, disk in encrypted_layers(listed.backups):
        record = manifest.disk(disk)
        assert record is not None
        layer = _checked(volume, manifest, record)
        found[layer.key] = layer
    used: dict[LayerKey, list[Region]] = {}
    for manifest in listed.backups:
        for record in manifest.disks:
            location = record.location
            if location_problem(location, volume.size) is None and location is not None:
                used.setdefault((manifest.domain_uuid, manifest.backup_id,
                                 record.disk.target), []).append(
                    (int(location["offset"]), int(location["region"])))
    writes = volume.allocatable()  # where the journal and the new manifests may go
    for (_uuid, backup_id, disk), regions in used.items():
        clash = overlap(regions, writes)
        if clash:
            raise DamagedBackupError(backup_id, f"its layer's bytes at {clash[0][0]}+"
                                     f"{clash[0][1]} lie where the key change writes (a free "
                                     "region, or past the allocation pointer); the key was "
                                     "not changed", disk)
    others = [*journal_region(volume.superblock), *manifest_places(volume)]
    reach = _reach(used, others)
    for key, layer in found.items():
        if reach(key, layer.window):  # named from the regions it meets (the slow way)
            problem = window_problem(layer.window, [r for k, regions in used.items()
                                                    if k != key for r in regions] + others)
            raise layer.damaged(problem or "has its LUKS header in bytes another uses")
    return found


def _reach(used: dict[LayerKey, list[Region]], others: list[Region]
           ) -> Callable[[LayerKey, Region], bool]:
    """Whether a window of a layer meets a region of another layer or one of ``others``:
    the regions sorted once, and per prefix the two furthest ends of distinct owners, so
    that each window is one search (not a pass over every region)."""
    spans = sorted([(o, o + n, k) for k, regions in used.items() for o, n in regions]
                   + [(o, o + n, None) for o, n in others], key=lambda s: s[0])
    starts = [start for start, _end, _owner in spans]
    tops: list[tuple[int, LayerKey | None, int]] = []
    best: tuple[int, LayerKey | None, int] = (-1, None, -1)  # end, its owner, another's end
    for _start, end, owner in spans:
        top, top_owner, other = best
        if end > top:
            best = (end, owner, other if owner == top_owner else top)
        elif owner != top_owner and end > other:
            best = (top, top_owner, end)
        tops.append(best)

    def meets(key: LayerKey, window: Region) -> bool:
        below = bisect_left(starts, window[0] + window[1])  # the regions starting before its end
        if not below:
            return False
        top, top_owner, other = tops[below - 1]
        return (other if top_owner == key else top) > window[0]

    return meets


def _check_owned(volume: NbdVolume, backups: list[Manifest]) -> None:
    """Each listed backup's entry owns its manifest's and layers' regions (an entry that
    lists none is read from its manifest when written again): else a region another
    entry owns goes to the free list, and is trimmed, when the change writes that entry
    again. DamagedBackupError naming the first backup that does not own its bytes."""
    entries = {(str(e.get("domain_uuid")), str(e.get("backup_id"))): e
               for e in volume.superblock.entries}
    for manifest in backups:
        entry = entries.get((manifest.domain_uuid, manifest.backup_id), {})
        try:
            owned = entry_regions(entry, volume.size)
            places = layer_regions(manifest, volume.size, strict=False)
        except ValueError as err:
            raise DamagedBackupError(manifest.backup_id, f"{err}; the key was not changed"
                                     ) from None
        if owned is None:
            continue
        offset, length = entry.get("manifest") or (0, 0)
        lost = subtract([*places, (int(offset), align(int(length)))], owned)
        if lost:
            raise DamagedBackupError(manifest.backup_id, "its entry in the table of contents "
                                     f"does not own its bytes at {lost[0][0]}+{lost[0][1]}; "
                                     "the key was not changed")


def manifest_places(volume: NbdVolume) -> list[Region]:
    """Where the listed manifests lie (of entries whose place is sound)."""
    places = []
    for entry in volume.superblock.entries:
        if entry_problem(entry, volume.size) is None:
            offset, length = entry["manifest"]
            places.append((int(offset), int(length)))
    return places


def window_problem(window: Region, others: list[Region]) -> str | None:
    """What is wrong with a LUKS header window beside the regions ``others`` (None: it
    meets none of them)."""
    clash = overlap([window], others)
    if clash:
        return (f"has its LUKS header at {window[0]}+{window[1]} in bytes another layer, a "
                f"manifest or the rekey journal uses ({clash[0][0]}+{clash[0][1]})")
    return None


def _checked(volume: NbdVolume, manifest: Manifest, record: DiskRecord) -> VolumeLayer:
    """One encrypted layer of the volume, once its location, header and LUKS header
    position are what this tool writes."""
    def damaged(problem: str) -> DamagedBackupError:
        return DamagedBackupError(manifest.backup_id, f"{record.data_file}{problem}",
                                  record.disk.target)

    problem = location_problem(record.location, volume.size)
    if problem is not None:
        raise damaged(f": {problem}")
    location = record.location or {}
    offset, length = int(location["offset"]), int(location["length"])
    head = volume.read(offset, min(length, layers.HEADER_READ))
    problem = layers.header_problem(head, None, record.size, encrypted=True)
    luks = layers.luks_region(head, length) if problem is None else None
    if luks is None:
        raise damaged(f" {problem or 'has no LUKS header where QEMU puts one'}")
    return VolumeLayer(manifest, record, offset, length, luks)
