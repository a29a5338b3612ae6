"""``rekey`` of an NBD volume: the key of every encrypted layer changed in its region.

The steps and the journal are those of a file repository (:mod:`.rekey`,
:mod:`..repository.rekey_journal`); what differs is where things are. Under the
volume's writer lease (no backup or prune from any host) and once this host's readers
are done (:meth:`.volume_store.VolumeStore.gate`):

1. every encrypted layer is checked (:mod:`.rekey_volume_layer`: location, header, the
   window of its LUKS header), has no damage mark and its used bytes have the digest
   its record names; the digest of its bytes outside the LUKS header is journaled;
2. the journal goes into a region of its own and the table of contents points at it
   (:mod:`..targets.volume_journal`): from then on every other command refuses the
   volume;
3. every layer gets a key slot for the new key, then 4. loses those of the old one:
   ``qemu-img amend`` of the LUKS header window alone, through NBD (a layer that already
   opens with the new key, or no longer with the old one, is left as it is);
5. each layer's bytes outside its LUKS header must still have their journaled digest;
   every manifest with encrypted layers is written again (the layers' new digests and
   key id) into a new region, and one generation of the table lists them and drops the
   journal.

A crash leaves the journal (then ``rekey`` with the same two keys finishes) or the
finished change: the manifests change with the journal's removal, in one write.
"""

from __future__ import annotations

import logging
from contextlib import ExitStack
from dataclasses import replace

from libvirt_rdm_backup.engine.rekey_change import RekeyResult, finish_change, start_change
from libvirt_rdm_backup.engine.rekey_volume_layer import (
    LayerKey as Key,
)
from libvirt_rdm_backup.engine.rekey_volume_layer import (
    VolumeLayer,
    open_layers,
    volume_record,
)
from libvirt_rdm_backup.engine.stores import open_store
from libvirt_rdm_backup.engine.volume_store import VolumeStore
from libvirt_rdm_backup.errors import (
    DamagedBackupError,
    RepositoryError,
    UsageError,
)
from libvirt_rdm_backup.qemu import luks_slots
from libvirt_rdm_backup.qemu.secrets import LayerKey, key_file
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.rekey_journal import (
    MAC_LABEL,
    Journal,
    LayerEntry,
    check_against,
)
from libvirt_rdm_backup.repository.store import Scan
from libvirt_rdm_backup.targets.nbd_volume import NbdVolume

log = logging.getLogger("libvirt_rdm_backup.engine.rekey")


def rekey_volume(target: str, old: LayerKey, new: LayerKey, tls_dir: str | None = None
                 ) -> RekeyResult:
    """Change the key of every encrypted layer of the NBD volume ``target`` from ``old``
    to ``new`` (or finish such a change cut short); UsageError, with nothing changed,
    for a volume without encrypted layers, a wrong old key or a new key equal to it."""
    with open_store(target, tls_dir=tls_dir) as store:
        if not isinstance(store, VolumeStore):
            raise UsageError(f"{target} is not an NBD volume")
        return _rekey(store, old, new)


def _rekey(store: VolumeStore, old: LayerKey, new: LayerKey) -> RekeyResult:
    volume = store.volume
    what = f"volume {store.name}"
    mac_key = LayerKey.pair_key(old, new, MAC_LABEL)
    with ExitStack() as stack:
        volume.take_lease()
        stack.callback(volume.release_lease)
        listed = volume.scan()
        text = volume.read_rekey_journal()
        found = None if text is None else Journal.loads(text)
        record = volume_record(listed.backups)
        journal, resumed = start_change(what, record, found, old, new, mac_key)
        stack.enter_context(store.gate())  # this host's readers are done
        keys = (stack.enter_context(key_file(old)), stack.enter_context(key_file(new)))
        layers = open_layers(volume, listed)
        journal = _complete(volume, listed, journal, layers, mac_key)
        return finish_change(what, store.name, journal, resumed,
                             lambda: _carry_out(volume, journal, layers, keys))


def _complete(volume: NbdVolume, listed: Scan, journal: Journal,
              layers: dict[Key, VolumeLayer], mac_key: bytes) -> Journal:
    """The journal checked against the volume, with every encrypted layer it does not
    name yet, stored. Each layer not named yet is checked as on a first run: no damage
    mark, its used bytes the digest its record names. Each named one must have no damage
    mark and its bytes outside the LUKS header the journal's digest, whatever its LUKS
    header holds: QEMU writes a new key slot's material before the header that enables
    it, so a run killed between the two leaves a header that differs from the record's
    digest yet opens with the old key alone (the journal is authenticated by both keys;
    the volume's manifests, which its server could rewrite, are not)."""
    check_against(journal, volume_record(listed.backups), listed.backups,
                  [d.backup_id for d in listed.damaged])
    named = {e.key: e for e in journal.layers}
    added = []
    for key, layer in layers.items():
        entry = named.get(key)
        mark = volume.damage_mark(layer.manifest, layer.record.disk.target)
        if mark is not None:
            raise DamagedBackupError(layer.manifest.backup_id,
                                     f"{mark}; the key was not changed",
                                     layer.record.disk.target)
        whole, body = layer.digests(volume)
        if entry is not None:
            if body != entry.body:
                raise layer.damaged("is not what the rekey journal says; the key was not "
                                    "changed")
            continue
        if whole != layer.record.digest:
            raise layer.damaged(f"{whole.algorithm} mismatch; the key was not changed")
        added.append(LayerEntry(*key, body))
    if added or volume.superblock.rekey is None:
        journal = replace(journal, layers=journal.layers + tuple(added)).signed(mac_key)
        volume.write_rekey_journal(journal.dumps())
    return journal


def _carry_out(volume: NbdVolume, journal: Journal, layers: dict[Key, VolumeLayer],
               keys: tuple[str, str]) -> None:
    """Steps 3 to 5 of the module, each skipping what is done."""
    todo = [(entry, layers[entry.key]) for entry in journal.layers]
    for entry, layer in todo:
        volume.check_rekey_lease()
        if not luks_slots.opens_with(layer.node(volume), *keys, new=True) and \
                not luks_slots.add_key(layer.node(volume), *keys):
            raise RepositoryError(f"backup {entry.backup_id} disk {entry.disk}: its layer "
                                  "opens with neither key")
    for _entry, layer in todo:
        volume.check_rekey_lease()
        luks_slots.remove_key(layer.node(volume), *keys)
    volume.publish_rekeyed(_rekeyed(volume, journal, layers))


def _rekeyed(volume: NbdVolume, journal: Journal, layers: dict[Key, VolumeLayer]
             ) -> list[Manifest]:
    """Every manifest with journaled layers, naming their new digests and key id, once
    each layer's bytes outside its LUKS header are checked to be what the
    (authenticated) journal says."""
    bodies = {e.key: e.body for e in journal.layers}
    manifests = {(layer.manifest.domain_uuid, layer.manifest.backup_id): layer.manifest
                 for layer in layers.values()}
    result = []
    for (uuid, backup_id), manifest in manifests.items():
        disks = []
        for record in manifest.disks:
            key = (uuid, backup_id, record.disk.target)
            if key not in bodies:
                disks.append(record)
                continue
            layer = layers[key]
            whole, found = layer.digests(volume)
            if found != bodies[key]:
                raise layer.damaged("changed outside its LUKS header during the key change")
            disks.append(replace(record, digest=whole, encryption={
                **(record.encryption or {}), "key_id": journal.new_key_id}))
        result.append(replace(manifest, disks=disks))
    return result
