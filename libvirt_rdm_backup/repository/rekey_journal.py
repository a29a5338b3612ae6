"""The rekey journal: a key change of an encrypted file repository or NBD volume, written
and synced before any layer is changed, so that a ``rekey`` cut short is finished by the
next one.

``ROOT/.rekey-journal.json`` (in a volume: a region the table of contents points at,
:mod:`..targets.volume_journal`)::

    {"format": "libvirt-rdm-backup/rekey-journal", "version": 1, "created": ...,
     "salt": hex, "old_key_id": hex, "new_key_id": hex,
     "layers": [{"domain_uuid": ..., "backup_id": ..., "disk": ...,
                 "body": {"algorithm": "sha256", "value": hex}}],
     "mac": hex}

``body`` is the digest of a layer's file (in a volume: of its region's used bytes)
outside its LUKS header, taken when its whole file still had the digest its manifest
records: a key change rewrites the LUKS header
only, so a layer whose body still has that digest holds the data it was published with.

``mac`` authenticates the rest (HMAC-SHA256 of its canonical JSON) with a key derived
from both keys of the change (:meth:`.secrets.LayerKey.pair_key`; never stored), so only
who holds both could have written it. Read back as untrusted input: every field must be
what the tool writes, its ``mac`` must match (:meth:`Journal.authentic`), and
:func:`check_against` holds it against the repository before any of it is acted on.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
from dataclasses import dataclass, replace
from typing import Any

from libvirt_rdm_backup.errors import OperationError, RepositoryError, UsageError
from libvirt_rdm_backup.repository import journal_file
from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.repository.encryption import EncryptionRecord
from libvirt_rdm_backup.repository.ids import check_backup_id, check_safe_name, check_uuid
from libvirt_rdm_backup.repository.manifest import Manifest

JOURNAL = ".rekey-journal.json"
FORMAT = "libvirt-rdm-backup/rekey-journal"
VERSION = 1
MAX_JOURNAL = 16 << 20
MAX_LAYERS = 100_000
_HEX = {"salt": 32, "old_key_id": 64, "new_key_id": 64, "mac": 64}
# the ``created`` stamp exactly as :func:`.ids.now_iso` writes it
_CREATED = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}\.[0-9]{3}Z")
MAC_LABEL = b"libvirt-rdm-backup/rekey-journal/mac/v1"


@dataclass(frozen=True)
class LayerEntry:
    """One encrypted layer of the repository and the digest of its body."""

    domain_uuid: str
    backup_id: str
    disk: str
    body: Digest

    @property
    def key(self) -> tuple[str, str, str]:
        return self.domain_uuid, self.backup_id, self.disk


@dataclass(frozen=True)
class Journal:
    """One key change of one repository."""

    created: str
    salt: str
    old_key_id: str
    new_key_id: str
    layers: tuple[LayerEntry, ...] = ()
    mac: str = ""  # of everything else, under the key of both keys (empty: unsigned)

    def _content(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "created": self.created,
                "salt": self.salt, "old_key_id": self.old_key_id,
                "new_key_id": self.new_key_id,
                "layers": [{"domain_uuid": e.domain_uuid, "backup_id": e.backup_id,
                            "disk": e.disk, "body": e.body.to_dict()} for e in self.layers]}

    def _mac(self, key: bytes) -> str:
        canonical = json.dumps(self._content(), sort_keys=True, separators=(",", ":"))
        return hmac.new(key, canonical.encode("utf-8"), hashlib.sha256).hexdigest()

    def signed(self, key: bytes) -> Journal:
        """The journal with its ``mac`` under ``key`` (the key of both keys)."""
        return replace(self, mac=self._mac(key))

    def authentic(self, key: bytes) -> bool:
        """Its ``mac`` is the one ``key`` gives its content (in constant time)."""
        return hmac.compare_digest(self.mac, self._mac(key))

    def dumps(self) -> str:
        """The journal as written (JSON, one document)."""
        return json.dumps({**self._content(), "mac": self.mac}, indent=1,
                          sort_keys=True) + "\n"

    @classmethod
    def loads(cls, text: str) -> Journal:
        """Parse and check a journal; RepositoryError on anything the tool would not write."""
        data = journal_file.parse(text, "rekey journal", FORMAT, VERSION)
        for name, length in _HEX.items():
            value = data.get(name)
            if not isinstance(value, str) or not re.fullmatch(f"[0-9a-f]{{{length}}}", value):
                raise RepositoryError(f"rekey journal is malformed: {name}")
        created = data.get("created")
        if not isinstance(created, str) or not _CREATED.fullmatch(created):
            raise RepositoryError("rekey journal is malformed: created")
        layers = data.get("layers")
        if not isinstance(layers, list) or len(layers) > MAX_LAYERS:
            raise RepositoryError("rekey journal is malformed: layers")
        journal = cls(created=created, salt=data["salt"], old_key_id=data["old_key_id"],
                      new_key_id=data["new_key_id"], layers=tuple(_entry(e) for e in layers),
                      mac=data["mac"])
        if journal.old_key_id == journal.new_key_id:
            raise RepositoryError("rekey journal is malformed: the old and new keys are one")
        if len({e.key for e in journal.layers}) != len(journal.layers):
            raise RepositoryError("rekey journal is malformed: a layer is named twice")
        return journal


def _entry(value: object) -> LayerEntry:
    if not isinstance(value, dict) or not isinstance(value.get("body"), dict):
        raise RepositoryError("rekey journal is malformed: a layer is not an object")
    try:
        return LayerEntry(domain_uuid=check_uuid(str(value.get("domain_uuid"))),
                          backup_id=check_backup_id(str(value.get("backup_id"))),
                          disk=check_safe_name(str(value.get("disk")), "disk name"),
                          body=Digest.from_dict(value["body"]))
    except (UsageError, ValueError, KeyError) as err:
        raise RepositoryError(f"rekey journal is malformed: {err}") from None


def unfinished(what: str) -> OperationError:
    """The refusal of every command but ``rekey`` while a key change of ``what`` (the
    repository or volume, as named in messages) is unfinished."""
    return OperationError(f"a key change of {what} is unfinished: run rekey again with the "
                          "same two key files")


def journal_path(root: str) -> str:
    """Where a repository's rekey journal is kept."""
    return os.path.join(root, JOURNAL)


def read_journal(root: str) -> Journal | None:
    """The journal of an unfinished key change of the repository, or None."""
    text = journal_file.read_text(journal_path(root), "rekey journal", MAX_JOURNAL)
    return None if text is None else Journal.loads(text)


def write_journal(root: str, journal: Journal, key: bytes) -> Journal:
    """Write the journal signed with ``key`` atomically (synced before anything it
    describes is changed); the journal as written."""
    journal = journal.signed(key)
    journal_file.write_text(journal_path(root), journal.dumps(), "rekey journal")
    return journal


def remove_journal(root: str) -> None:
    """The key change is complete: the journal goes."""
    journal_file.remove(journal_path(root), "rekey journal")


def encrypted_layers(backups: list[Manifest]) -> list[tuple[Manifest, str]]:
    """The encrypted layers of these backups: (manifest, disk), in listing order."""
    return [(m, r.disk.target) for m in backups for r in m.disks if r.encryption is not None]


def check_against(journal: Journal, record: EncryptionRecord | None,
                  backups: list[Manifest], unreadable: list[str]) -> None:
    """The journal is one this tool would write for this repository as it is now (some
    steps may be done): RepositoryError naming what is not, before any of it is acted on.

    Its salt is the repository's; the repository names its old or its new key; every
    layer it names is an encrypted layer of a readable backup whose record names one of
    the two keys; any encrypted layer it does not name still names the old key, and the
    repository does too (a backup published before the journal was complete).
    """
    def refuse(why: str) -> RepositoryError:
        return RepositoryError(f"rekey journal: {why}; nothing more is done")

    if record is None or record.salt != journal.salt:
        raise refuse("the repository's encryption record has another salt")
    keys = (journal.old_key_id, journal.new_key_id)
    if record.key_id not in keys:
        raise refuse("the repository's encryption record names neither of its keys")
    if unreadable:
        raise refuse(f"backup {unreadable[0]} cannot be read (its layers are not known)")
    found = {(m.domain_uuid, m.backup_id, disk): m for m, disk in encrypted_layers(backups)}
    for entry in journal.layers:
        manifest = found.get(entry.key)
        if manifest is None:
            raise refuse(f"it names disk {entry.disk} of backup {entry.backup_id}, not an "
                         "encrypted layer of the repository")
    named = {e.key for e in journal.layers}
    for (uuid, backup_id, disk), manifest in found.items():
        disk_record = manifest.disk(disk)
        key_id = disk_record.encryption.get("key_id") if disk_record and \
            disk_record.encryption else None
        if key_id not in keys:
            raise refuse(f"disk {disk} of backup {backup_id} is encrypted with a third key")
        if (uuid, backup_id, disk) not in named and (
                key_id != journal.old_key_id or record.key_id != journal.old_key_id):
            raise refuse(f"disk {disk} of backup {backup_id} is not in it, and the key "
                         "change went past its first step")
