"""``rekey``: the key of an encrypted file repository changed in every layer.

Under every domain's lock and prune gate (no backup, prune or reader meanwhile), a
journal (:mod:`..repository.rekey_journal`, authenticated by a key derived from both
keys) is written and synced first, naming every encrypted layer and the digest of its
body (the file outside its LUKS header, whose whole digest was checked against its
manifest). Each layer is opened once per step, without following a symlink, and read
and handed to QEMU through that descriptor (:mod:`.rekey_layer`). Then, each step one
that may be done again:

1. every layer gets a key slot for the new key (``qemu-img amend``; a layer that
   opens with it already is left as it is);
2. every key slot of the old key is erased (a layer that no longer opens with it is
   left as it is);
3. each layer's body must still have its journaled digest; each manifest is written
   again with its layers' new digests, sizes and key id;
4. ``encryption.json`` names the new key;
5. the journal goes.

At every moment each layer opens with one of the two keys (the old one until its
new slot is written, the new one from then on), and QEMU changes nothing but the
LUKS header. It writes a new slot's material before the header enabling it: a layer
killed between the two matches no digest yet its body is the journal's and it opens
with the old key, and the next run finishes it. While the journal is there, other
commands refuse the repository's encrypted layers
(:meth:`.file_store.FileStore.reading`); ``rekey`` with the same two keys finishes it.
An NBD volume's key change is :mod:`.rekey_volume` (:func:`rekey_target` picks by the
target).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import replace

from libvirt_rdm_backup.engine.file_store import GATE_TIMEOUT
from libvirt_rdm_backup.engine.rekey_change import RekeyResult, finish_change, start_change
from libvirt_rdm_backup.engine.rekey_layer import OpenLayer, open_layer
from libvirt_rdm_backup.engine.rekey_volume import rekey_volume
from libvirt_rdm_backup.errors import (
    DamagedBackupError,
    OperationError,
    RepositoryError,
    UsageError,
)
from libvirt_rdm_backup.qemu import luks_slots
from libvirt_rdm_backup.qemu.secrets import LayerKey, key_file
from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.repository.encryption import (
    EncryptionRecord,
    read_record,
    replace_record,
)
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.prune_journal import journal_path as prune_journal_path
from libvirt_rdm_backup.repository.rekey_journal import (
    MAC_LABEL,
    Journal,
    LayerEntry,
    check_against,
    encrypted_layers,
    journal_path,
    read_journal,
    remove_journal,
    write_journal,
)
from libvirt_rdm_backup.repository.store import MANIFEST, Repository, write_file_atomic
from libvirt_rdm_backup.targets.uri import NbdAddress, RbdAddress, parse_target

log = logging.getLogger(__name__)

__all__ = ["RekeyResult", "rekey", "rekey_target"]


def rekey(repo: Repository, old: LayerKey, new: LayerKey) -> RekeyResult:
    """Change the key of every encrypted layer of ``repo`` from ``old`` to ``new`` (or
    finish such a change cut short); UsageError, with nothing changed, for a repository
    without encryption, a wrong old key or a new key equal to it."""
    mac_key = LayerKey.pair_key(old, new, MAC_LABEL)
    journal, resumed = _start(repo, old, new, mac_key)
    with ExitStack() as stack:
        locked = _lock_all(repo, stack)
        keys = (stack.enter_context(key_file(old)), stack.enter_context(key_file(new)))
        journal = _complete(repo, journal, keys, mac_key)
        if set(repo.domain_uuids()) != locked:
            raise OperationError(f"a backup of a domain new to repository {repo.root} began "
                                 "during the key change; run rekey again")
        return finish_change(f"repository {repo.root}", repo.root, journal, resumed,
                             lambda: _carry_out(repo, journal, keys))


def _start(repo: Repository, old: LayerKey, new: LayerKey, mac_key: bytes
           ) -> tuple[Journal, bool]:
    """The journal to carry out: the one left behind (for these keys, authenticated by
    them), or a new one."""
    return start_change(f"repository {repo.root}", read_record(repo.root),
                        read_journal(repo.root), old, new, mac_key)


def _lock_all(repo: Repository, stack: ExitStack) -> set[str]:
    """Every domain's lock and prune gate, held until the stack closes (a prune cut short
    is refused: it needs its own run)."""
    uuids = repo.domain_uuids()
    for uuid in uuids:
        stack.enter_context(repo.lock(uuid))
        if os.path.lexists(prune_journal_path(repo.domain_dir(uuid))):
            raise OperationError(f"a prune of domain {uuid} was cut short: run prune (or a "
                                 "backup) of that domain with the old key first")
        stack.enter_context(repo.prune_gate(uuid, True, GATE_TIMEOUT))
    return set(uuids)


def _complete(repo: Repository, journal: Journal, keys: tuple[str, str], mac_key: bytes
              ) -> Journal:
    """The journal checked against the repository, with every encrypted layer it does
    not name yet, written and synced. Each layer not named yet, and each named one
    whose manifest still names the old key and that does not open with the new one yet,
    is checked as on a first run: no damage mark, its whole file the digest its manifest
    records (and its body the journal's). A named one whose whole file differs yet whose
    body is the journal's and whose LUKS header opens with the old key was cut short
    mid-slot (QEMU writes a new slot's material before the header enabling it): it is
    finished, its body checked again in step 3 (the journal is authenticated by both
    keys; a manifest is not)."""
    listed = repo.scan()
    check_against(journal, read_record(repo.root), listed.backups,
                  [d.backup_id for d in listed.damaged])
    named = {e.key: e for e in journal.layers}
    added = []
    for manifest, disk in encrypted_layers(listed.backups):
        entry = named.get((manifest.domain_uuid, manifest.backup_id, disk))
        record = _record(manifest, disk)
        if entry is not None and (record.encryption or {}).get("key_id") != journal.old_key_id:
            continue  # its manifest was written again: its body is checked in step 3
        mark = repo.damage_mark(manifest, disk)
        if mark is not None:
            raise DamagedBackupError(manifest.backup_id, f"{mark}; the key was not changed",
                                     disk)
        with open_layer(repo, manifest, record) as layer:
            if entry is not None and luks_slots.opens_with(layer.fd, *keys, new=True):
                continue  # its header changed: its body is checked against the journal
            whole, body = layer.digests()
            if entry is not None and whole != record.digest and body == entry.body and \
                    luks_slots.opens_with(layer.fd, *keys, new=False):
                continue  # cut short mid-slot: only its LUKS header changed
        if whole != record.digest:
            raise DamagedBackupError(manifest.backup_id, f"{record.data_file}: "
                                     f"{whole.algorithm} mismatch; the key was not changed",
                                     disk)
        if entry is None:
            added.append(LayerEntry(manifest.domain_uuid, manifest.backup_id, disk, body))
        elif body != entry.body:
            raise layer.damaged("is not what the rekey journal says; the key was not changed")
    if added or not os.path.lexists(journal_path(repo.root)):
        journal = write_journal(repo.root, replace(journal, layers=journal.layers +
                                                   tuple(added)), mac_key)
    return journal


def _carry_out(repo: Repository, journal: Journal, keys: tuple[str, str]) -> None:
    """Steps 1 to 5 of the module, each skipping what is done."""
    for entry, layer in _layer_files(repo, journal):
        if not luks_slots.opens_with(layer.fd, *keys, new=True) and \
                not luks_slots.add_key(layer.fd, *keys):
            raise RepositoryError(f"backup {entry.backup_id} disk {entry.disk}: its layer "
                                  "opens with neither key")
    for _entry, layer in _layer_files(repo, journal):
        luks_slots.remove_key(layer.fd, *keys)
    _republish(repo, journal)
    replace_record(repo.root, EncryptionRecord(journal.salt, journal.old_key_id),
                   EncryptionRecord(journal.salt, journal.new_key_id))
    remove_journal(repo.root)


def _layer_files(repo: Repository, journal: Journal) -> Iterator[tuple[LayerEntry, OpenLayer]]:
    """The journal's layers, each opened and checked just before use, and its path
    checked to name the same file after."""
    for entry in journal.layers:
        manifest = repo.load(entry.domain_uuid, entry.backup_id)
        with open_layer(repo, manifest, _record(manifest, entry.disk)) as layer:
            yield entry, layer
            layer.check_same()


def _republish(repo: Repository, journal: Journal) -> None:
    """Each layer's body as journaled, and each manifest naming its layers' new digests,
    sizes and key id (written again where it does not yet)."""
    bodies = {e.key: e.body for e in journal.layers}
    for uuid, backup_id in dict.fromkeys((e.domain_uuid, e.backup_id) for e in journal.layers):
        manifest = repo.load(uuid, backup_id)
        disks = []
        for record in manifest.disks:
            body = bodies.get((uuid, backup_id, record.disk.target))
            disks.append(record if body is None else
                         _rekeyed(repo, manifest, record, body, journal.new_key_id))
        updated = replace(manifest, disks=disks)
        if updated != manifest:
            write_file_atomic(os.path.join(repo.backup_dir(uuid, backup_id), MANIFEST),
                              updated.dumps())


def _rekeyed(repo: Repository, manifest: Manifest, record: DiskRecord, body: Digest,
             key_id: str) -> DiskRecord:
    """A layer's record with its file's digest, size and the new key id, once its body is
    checked to be what the (authenticated) journal says."""
    with open_layer(repo, manifest, record) as layer:
        os.fsync(layer.fd)
        whole, found = layer.digests()
        if found != body:
            raise layer.damaged("changed outside its LUKS header during the key change")
        held = os.fstat(layer.fd)
        layer.check_same()
    return replace(record, digest=whole, file_size=held.st_size,
                   stored_bytes=held.st_blocks * 512,
                   encryption={**(record.encryption or {}), "key_id": key_id})


def _record(manifest: Manifest, disk: str) -> DiskRecord:
    record = manifest.disk(disk)
    if record is None or record.encryption is None:
        raise RepositoryError(f"backup {manifest.backup_id} has no encrypted disk {disk}")
    return record


def rekey_target(target: str, old_file: str, new_file: str, tls_dir: str | None = None
                 ) -> RekeyResult:
    """:func:`rekey` of the file repository or NBD volume ``target`` (``tls_dir``: the
    client credentials of an ``nbds://`` volume) with the keys these files hold."""
    parsed = parse_target(target, allow_remote_plain=True)
    if isinstance(parsed, RbdAddress):
        raise UsageError("rbd:// targets keep no encrypted layers: there is no key to change")
    old, new = LayerKey.from_file(old_file), LayerKey.from_file(new_file)
    if isinstance(parsed, NbdAddress):
        return rekey_volume(target, old, new, tls_dir)
    if tls_dir is not None:
        raise UsageError("--tls-creds applies to nbds:// targets only")
    return rekey(Repository.open(parsed), old, new)
