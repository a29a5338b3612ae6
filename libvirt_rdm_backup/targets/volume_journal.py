"""The journal of a key change kept in an NBD volume, and the change's publication.

A volume has no file system: the journal (:mod:`..repository.rekey_journal`, the same
document a file repository keeps) is written into a region of its own, and the table
of contents points at it (``"rekey": [offset, length]``) from the generation that
stores it to the one that publishes the rewritten manifests, in which it goes: a crash
leaves either the journal or the finished change. While the table points at a journal
the region is owned (never free, never trimmed), and every command but ``rekey``
refuses the volume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Any

from libvirt_rdm_backup.errors import NotFoundError, OperationError, RepositoryError
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.targets.volume_changes import VolumeChanges
from libvirt_rdm_backup.targets.volume_format import MAX_JOURNAL, Superblock, journal_region


class VolumeJournal(VolumeChanges):
    """The key change journal of a volume (a base of :class:`.nbd_volume.NbdVolume`)."""

    def newest_table(self) -> Superblock:
        """The table of contents read again (another host may have changed it since)."""
        return self._read_table()

    def rekey_pending(self) -> bool:
        """The newest table of contents points at the journal of an unfinished key change."""
        return self.newest_table().rekey is not None

    def read_rekey_journal(self) -> str | None:
        """The text of the journal the table points at (None: no key change is
        unfinished); RepositoryError when it lies outside the volume or is not UTF-8."""
        place = self.superblock.rekey
        if place is None:
            return None
        offset, length = place
        if length > MAX_JOURNAL or offset + length > self.size:
            raise RepositoryError(f"NBD volume {self.address.uri}: its rekey journal at "
                                  f"{offset}+{length} lies outside the volume")
        try:
            return self.read(offset, length).decode("utf-8")
        except UnicodeDecodeError as err:
            raise RepositoryError(f"NBD volume {self.address.uri}: its rekey journal is not "
                                  "UTF-8 text") from err

    def write_rekey_journal(self, text: str) -> None:
        """Store the journal in a new region (flushed), then a generation of the table
        pointing at it; the lease is kept (taken first when not held). A journal it
        replaces gives its region back."""
        data = text.encode("utf-8")
        if len(data) > MAX_JOURNAL:
            raise RepositoryError(f"the rekey journal of {len(data)} bytes is over "
                                  f"{MAX_JOURNAL}")
        with self._mutex:
            self._leased_table()
            offset = self.allocate(len(data))
            self.write(offset, data)
            self.flush()  # durable before the table points at it
            current = self._held_table()
            new = self._next_table(replace(current, rekey=(offset, len(data))),
                                   current.entries, journal_region(current))
            self._commit(new, release=False)

    def publish_rekeyed(self, manifests: Sequence[Manifest]) -> None:
        """Replace these manifests (of any domains; each keeps its sequence and
        publication, its layers their regions) and drop the journal, in one generation;
        the regions no longer owned are trimmed, the lease released. NotFoundError for a
        backup the volume does not list (nothing is changed then)."""
        try:
            with self._mutex:
                current = self._leased_table()
                by_key = {(m.domain_uuid, m.backup_id): m for m in manifests}
                listed = {(e.get("domain_uuid"), e.get("backup_id")) for e in current.entries}
                missing = sorted(set(by_key) - listed)
                if missing:
                    raise NotFoundError(f"backup {missing[0][1]} of domain {missing[0][0]} "
                                        "is not in the volume")
                entries: list[dict[str, Any]] = []
                removed = journal_region(current)
                for entry in current.entries:
                    owned = self._owned(entry)
                    manifest = by_key.get((str(entry.get("domain_uuid")),
                                           str(entry.get("backup_id"))))
                    if manifest is None:
                        entries.append(entry if owned is None else
                                       {**entry, "regions": [list(r) for r in owned]})
                        continue
                    removed += owned if owned is not None else self._manifest_region(entry)
                    entries.append(self._replacement(manifest, entry))
                new = self._next_table(replace(self._held_table(), rekey=None), entries,
                                       removed)
                self._commit(new, release=False)
            self._trim(new.free)  # the heartbeat renews the lease meanwhile
        finally:
            self.release_lease()  # its own thread: outside the lock

    def rewritten(self, newest: Superblock, domain_uuid: str) -> bool:
        """True when a backup of the domain this volume listed is no longer listed with the
        same manifest in ``newest`` (a prune or a key change wrote it again, or dropped
        it, since)."""
        def places(table: Superblock) -> dict[str, Any]:
            return {str(e.get("backup_id")): e.get("manifest") for e in table.entries
                    if e.get("domain_uuid") == domain_uuid}

        after = places(newest)
        return any(after.get(backup_id) != place
                   for backup_id, place in places(self.superblock).items())

    def check_rekey_lease(self) -> None:
        """OperationError unless this writer still holds the lease (checked before each
        layer's key slots are changed)."""
        with self._mutex:
            if self._lease is None:
                raise OperationError(f"NBD volume {self.address.uri}: the key change holds "
                                     "no writer lease")
            self._held_table()
