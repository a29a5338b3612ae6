"""Changing what an NBD volume lists: publishing a backup, dropping and replacing points.

Every change is one new superblock generation written under the writer lease
(:mod:`volume_lease`): a crash leaves the old table or the new one. Each entry
lists the regions its backup owns (manifest and layers); a region no listed
backup owns any more goes onto the free list in the generation that stops
listing it, a region handed out leaves the free list in the generation that
lists its owner, and a free region at the end lowers the allocation pointer
(:mod:`volume_space`). Free regions are trimmed after the publication, still
under the lease (a crash before the trim only leaves space to give back again).

The regions a lost lease holder took stay unused: its VM's QEMU may still write
there (they are neither listed nor free).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import Any

from libvirt_rdm_backup.errors import (
    NotFoundError,
    OperationError,
    RdmBackupError,
    RepositoryError,
    UsageError,
    VerificationError,
)
from libvirt_rdm_backup.qemu.nbd_io import MAX_TRIM, NbdError, trim
from libvirt_rdm_backup.repository.ids import now_iso
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.order import next_sequence
from libvirt_rdm_backup.targets.lease import HELD, MAX_TAKEN
from libvirt_rdm_backup.targets.volume_format import (
    ALIGN,
    Region,
    Superblock,
    align,
    entry_problem,
    entry_sequence,
    journal_region,
    location_problem,
)
from libvirt_rdm_backup.targets.volume_lease import WriterLease
from libvirt_rdm_backup.targets.volume_space import (
    best_fit,
    entry_regions,
    lower_end,
    normalize,
    space_problem,
    subtract,
    total,
)

log = logging.getLogger("libvirt_rdm_backup.targets.nbd_volume")

TRIM_CHECK = 1.0  # seconds of trimming between two checks that the lease is still held


@dataclass(frozen=True)
class SpaceReport:
    """What a change of the table did to the volume's space (bytes)."""

    generation: int  # of the superblock that holds the change
    freed: int  # newly on the free list
    free: int  # on the free list now
    trimmed: int  # free bytes the server was told to give back (0: it takes no trims)
    next_free: int  # the allocation pointer now


def layer_regions(manifest: Manifest, size: int, strict: bool = True) -> list[Region]:
    """The regions of a manifest's layers (ValueError naming a disk without a usable one;
    not ``strict``: such a disk owns none)."""
    found: list[Region] = []
    for record in manifest.disks:
        location = record.location
        problem = location_problem(location, size)
        if problem is None and int((location or {})["region"]) % ALIGN:
            problem = "region is not aligned"
        if problem is not None and not strict:
            continue
        if problem is not None:
            raise ValueError(f"disk {record.disk.target}: {problem}")
        assert location is not None
        found.append((int(location["offset"]), int(location["region"])))
    return found


class VolumeChanges(WriterLease):
    """Allocation and the changes of a volume's table of contents (a base of NbdVolume)."""

    def read(self, offset: int, length: int) -> bytes:
        raise NotImplementedError

    def allocate(self, length: int) -> int:
        """Reserve a region (best fit from the free list under a lease, else at the end);
        it becomes permanent with the next publication.

        A lease holder records the region in its lease before anything is written
        there, so whoever takes a lease over from a stalled or killed holder (whose
        QEMU may still be writing) allocates elsewhere.
        """
        with self._mutex:
            want = align(max(length, 1))
            fit = (best_fit(self._free, want)
                   if self._lease is not None and len(self._taken) < MAX_TAKEN else None)
            if fit is not None:
                offset, self._free = fit
                self._taken.append((offset, want))
            else:
                offset = self.next_free
                if offset + want > self.size:
                    raise OperationError(f"NBD target {self.address.uri} is full "
                                         f"({self.size} bytes, {offset + want} needed)")
                self.next_free = offset + want
            self._allocated.append((offset, want))
            if self._lease is not None:
                self.renew_lease()
            return offset

    def allocatable(self) -> list[Region]:
        """Where :meth:`allocate` may place a region: the free list it takes from, and the
        bytes past the allocation pointer."""
        with self._mutex:
            tail = self.size - self.next_free
            return [*self._free, *([(self.next_free, tail)] if tail > 0 else [])]

    def publish(self, manifest: Manifest) -> None:
        """Store the manifest, then a new superblock listing it (the backup now exists).

        The manifest gets the volume's next sequence number (its publish order).
        Takes the writer lease first when not held; fails (OperationError) when the
        lease was lost, checked right before the superblock is written, which also
        releases the lease.
        """
        with self._mutex:
            if self._lease is None:
                self.take_lease()
            manifest.sequence = next_sequence(map(entry_sequence, self._held_table().entries))
            entry = self._store_manifest(manifest, now_iso(), strict=False)
            current = self._held_table()
            self._commit(self._next_table(current, [*current.entries, entry], []), release=True)

    def publish_changes(self, domain_uuid: str, replace_with: Sequence[Manifest] = (),
                        drop: Sequence[str] = ()) -> SpaceReport:
        """Drop backups of a domain and replace the manifests of others, in one generation.

        A replaced manifest keeps its backup's sequence and is stored in a new
        region; its layers' regions may be new ones (allocated under this lease and
        written already) or its old ones. The regions no listed backup owns any more
        go onto the free list and are trimmed. Takes the writer lease when not
        held and releases it. NotFoundError for a backup the volume does not list,
        UsageError for one both dropped and replaced, VerificationError for a
        damaged free list, RepositoryError when the table would not fit its slot
        (nothing is changed then).
        """
        try:
            with self._mutex:
                new, freed = self._change(domain_uuid, replace_with, set(drop))
            trimmed = self._trim(new.free)  # the heartbeat renews the lease meanwhile
        finally:
            self.release_lease()  # its own thread: outside the lock
        return SpaceReport(new.generation, freed, total(new.free), trimmed, new.next_free)

    def _change(self, domain_uuid: str, replace_with: Sequence[Manifest],
                dropped: set[str]) -> tuple[Superblock, int]:
        """Publish the change (lease kept); the new table and the bytes it freed."""
        current = self._leased_table()
        by_id = {m.backup_id: m for m in replace_with}
        _check_names(current, domain_uuid, replace_with, dropped)
        entries: list[dict[str, Any]] = []
        removed: list[Region] = []
        for entry in current.entries:
            owned = self._owned(entry)
            backup_id = str(entry.get("backup_id"))
            if entry.get("domain_uuid") != domain_uuid or (
                    backup_id not in by_id and backup_id not in dropped):
                entries.append(entry if owned is None else
                               {**entry, "regions": [list(r) for r in owned]})
                continue
            removed += owned if owned is not None else self._manifest_region(entry)
            if backup_id in by_id:
                entries.append(self._replacement(by_id[backup_id], entry))
        new = self._next_table(current, entries, removed)
        self._commit(new, release=False)
        return new, total(subtract(new.free, current.free))

    def trim_free(self) -> int:
        """Trim every free region again (after a crash before a trim); bytes trimmed."""
        try:
            with self._mutex:
                current = self._leased_table()
            return self._trim(current.free)
        finally:
            self.release_lease()  # its own thread: outside the lock

    # -- the steps ------------------------------------------------------------------------

    def _leased_table(self) -> Superblock:
        """The table as this writer holds it (the lease taken first when not held), its free
        list checked (VerificationError when damaged)."""
        if self._lease is None:
            self.take_lease()
        current = self._held_table()
        self._check_space(current)
        return current

    def _check_space(self, table: Superblock) -> None:
        problem = space_problem(table, self.size)
        if problem is not None:
            raise VerificationError(f"NBD volume {self.address.uri}: free list is damaged "
                                    f"({problem})")

    def _store_manifest(self, manifest: Manifest, published: Any,
                        strict: bool = True) -> dict[str, Any]:
        """Write the manifest into a region of its own; its table entry, with the regions
        it owns (ValueError when a layer has no usable region and ``strict``)."""
        layers = layer_regions(manifest, self.size, strict)
        text = manifest.dumps().encode()
        offset = self.allocate(len(text))
        self.write(offset, text)
        self.flush()  # data and manifest are durable before the table points at them
        regions = normalize([(offset, align(len(text))), *layers])
        return {"backup_id": manifest.backup_id, "domain_uuid": manifest.domain_uuid,
                "manifest": [offset, len(text)], "published": published,
                "sequence": manifest.sequence, "regions": [list(r) for r in regions]}

    def _replacement(self, manifest: Manifest, entry: dict[str, Any]) -> dict[str, Any]:
        """The entry of a kept backup's new manifest (same sequence, same publication)."""
        manifest.sequence = entry_sequence(entry)
        try:
            return self._store_manifest(manifest, entry.get("published"))
        except ValueError as err:
            raise RepositoryError(f"new manifest of backup {manifest.backup_id}: {err}"
                                  ) from err

    def _owned(self, entry: dict[str, Any]) -> list[Region] | None:
        """The regions an entry's backup owns; for an entry written before entries listed
        them, read from its manifest (None: unknown, the manifest is unreadable)."""
        listed = entry_regions(entry, self.size)  # checked with the free list already
        if listed is not None:
            return listed
        place = self._manifest_region(entry)
        if not place:
            return None
        offset, length = entry["manifest"]
        try:
            manifest = Manifest.loads(self.read(int(offset), int(length)).decode())
            if (manifest.backup_id, manifest.domain_uuid) != (entry.get("backup_id"),
                                                              entry.get("domain_uuid")):
                return None
            return normalize([*place, *layer_regions(manifest, self.size)])
        except (RepositoryError, UnicodeDecodeError, ValueError):
            return None

    def _manifest_region(self, entry: dict[str, Any]) -> list[Region]:
        """The region of an entry's manifest ([] when its place is not one this tool wrote)."""
        if entry_problem(entry, self.size) is not None:
            return []
        offset, length = entry["manifest"]
        if offset % ALIGN or offset + align(length) > self.size:
            return []
        return [(int(offset), align(int(length)))]

    def _next_table(self, current: Superblock, entries: list[dict[str, Any]],
                    removed: list[Region]) -> Superblock:
        """The next generation listing ``entries``: free is what was free, what this writer
        allocated and what ``removed`` held, less what the entries own."""
        live = journal_region(current)  # the journal of a key change keeps its region
        for entry in entries:
            live += entry_regions(entry, self.size) or []
        free = subtract([*self._free, *self._allocated, *removed], live)
        free, next_free = lower_end(free, self.next_free)
        lease = self._lease.renew(reserved=next_free, taken=()) if self._lease else None
        return replace(current, generation=current.generation + 1, next_free=next_free,
                       entries=entries, free=free, lease=lease)

    def _commit(self, new: Superblock, release: bool) -> None:
        """Write the new generation (``release``: without the lease); the in-memory state
        follows it. Nothing is written when the table does not fit its slot."""
        new.to_bytes()  # raises RepositoryError when full
        if release:
            self._stop_heartbeat()
            new = replace(new, lease=None)
        self._write_superblock(new)
        if release and self._lease is not None:
            HELD.discard(self._lease.token)
            self._lease = None
        elif new.lease is not None:
            self._lease = new.lease
        self.superblock, self.next_free = new, new.next_free
        self._free, self._taken, self._allocated = list(new.free), [], []

    def _trim(self, regions: list[Region]) -> int:
        """Trim free ``regions`` on the server while this writer holds the lease (checked
        every TRIM_CHECK seconds: a writer that took it over may be writing there); bytes
        trimmed. A failure is logged: the space is given back by a later trim."""
        done = 0
        checked = time.monotonic()
        try:
            for offset, length in regions:
                for start in range(offset, offset + length, MAX_TRIM):
                    if time.monotonic() - checked > TRIM_CHECK:
                        with self._mutex:
                            self._held_table()
                        checked = time.monotonic()
                    count = min(MAX_TRIM, offset + length - start)
                    if not trim(self.handle, start, count):
                        log.info("NBD volume %s: the server takes no trims: free space "
                                 "stays allocated on it", self.address.uri)
                        return 0
                    done += count
            if regions:
                self.flush()
        except (NbdError, RdmBackupError) as err:  # the change is published all the same
            log.warning("NBD volume %s: trimming free regions stopped: %s",
                        self.address.uri, err)
        return done


def _check_names(table: Superblock, domain_uuid: str, manifests: Sequence[Manifest],
                 dropped: set[str]) -> None:
    """Every backup named is listed for the domain, and none is both dropped and replaced."""
    other = [m.backup_id for m in manifests if m.domain_uuid != domain_uuid]
    if other:
        raise UsageError(f"new manifest of backup {other[0]} is not of domain {domain_uuid}")
    replaced = {m.backup_id for m in manifests}
    both = replaced & dropped
    if both:
        raise UsageError(f"backup {sorted(both)[0]} is both dropped and replaced")
    listed = {str(e.get("backup_id")) for e in table.entries
              if e.get("domain_uuid") == domain_uuid}
    missing = sorted((replaced | dropped) - listed)
    if missing:
        raise NotFoundError(f"backup {missing[0]} of domain {domain_uuid} is not in the volume")
