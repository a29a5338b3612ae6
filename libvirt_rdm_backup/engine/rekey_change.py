"""What a key change of a file repository and of an NBD volume share: its start (the
journal left behind taken up, or a new one) and its result (:mod:`.rekey`,
:mod:`.rekey_volume`)."""

from __future__ import annotations

import hmac
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup.errors import RdmBackupError, RepositoryError, UsageError
from libvirt_rdm_backup.qemu.secrets import LayerKey
from libvirt_rdm_backup.repository.encryption import EncryptionRecord
from libvirt_rdm_backup.repository.ids import now_iso
from libvirt_rdm_backup.repository.rekey_journal import Journal

log = logging.getLogger("libvirt_rdm_backup.engine.rekey")


@dataclass
class RekeyResult:
    """What a key change did."""

    repository: str
    key_id: str  # the new key's id under the repository's salt
    layers: int
    backups: int
    resumed: bool  # an unfinished key change was finished

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return {"repository": self.repository, "key_id": self.key_id, "layers": self.layers,
                "backups": self.backups, "resumed": self.resumed}


def start_change(what: str, record: EncryptionRecord | None, journal: Journal | None,
                 old: LayerKey, new: LayerKey, mac_key: bytes) -> tuple[Journal, bool]:
    """The journal to carry out for the repository or volume ``what`` (as messages name
    it), whose encryption ``record`` says: ``journal`` (the one left behind, read), when
    it is for these keys and authenticated by them, or a new one; UsageError, with
    nothing changed, for one without encryption, a wrong old key or a new key equal to
    it."""
    if record is None:
        raise UsageError(f"{what} holds no encrypted backups: it has no key to change")
    salt = bytes.fromhex(record.salt)
    old_id, new_id = old.key_id(salt), new.key_id(salt)
    if hmac.compare_digest(old_id, new_id):
        raise UsageError("the key of --new-key-file is the key of --encrypt-key-file")
    if journal is not None:
        if not (hmac.compare_digest(journal.old_key_id, old_id)
                and hmac.compare_digest(journal.new_key_id, new_id)):
            raise UsageError(f"an unfinished key change of {what} is from or to another "
                             "key: give the key files it was begun with")
        if not journal.authentic(mac_key):
            raise RepositoryError("rekey journal: its mac does not match (it was changed "
                                  "since the tool wrote it); nothing more is done")
        log.info("finishing the key change of %s begun %s", what, journal.created)
        return journal, True
    if not hmac.compare_digest(old_id, record.key_id):
        raise UsageError(f"the key of --encrypt-key-file is not the key of {what}")
    return Journal(now_iso(), record.salt, old_id, new_id), False


def finish_change(what: str, name: str, journal: Journal, resumed: bool,
                  carry_out: Callable[[], None]) -> RekeyResult:
    """Carry out ``journal``'s key change of the repository or volume ``what`` (named
    ``name`` in the result); an error says the change is unfinished and how to finish it."""
    try:
        carry_out()
    except RdmBackupError as err:
        err.message = (f"{err}; the key change of {what} is unfinished: run rekey again "
                       "with the same two key files")
        raise
    return RekeyResult(name, journal.new_key_id, len(journal.layers),
                       len({(e.domain_uuid, e.backup_id) for e in journal.layers}), resumed)
