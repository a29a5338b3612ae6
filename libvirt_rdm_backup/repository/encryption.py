"""A repository's encryption record: that its backups are encrypted, and with which key.

``ROOT/encryption.json`` is written by the first encrypted backup: a random salt and
the key id (HMAC-SHA256 of the key under that salt), never the key. From then on every
backup into the repository must be encrypted with that key, and every command that
reads encrypted layers checks the key it was given against the record before it reads
or writes anything.
"""

from __future__ import annotations

import json
import os
import re
import secrets
from collections.abc import Callable
from dataclasses import dataclass

from libvirt_rdm_backup.errors import RepositoryError, UsageError
from libvirt_rdm_backup.fileutil import read_regular, write_atomic

RECORD = "encryption.json"
FORMAT = "libvirt-rdm-backup/encryption"
VERSION = 1
CIPHER = "luks"  # qcow2 encrypt.format
MAX_RECORD = 4096


@dataclass(frozen=True)
class EncryptionRecord:
    """What the repository says of its encryption."""

    salt: str  # hex
    key_id: str  # hex HMAC-SHA256 of the key under the salt

    def to_json(self) -> str:
        """The record file's text."""
        return json.dumps({"format": FORMAT, "version": VERSION, "cipher": CIPHER,
                           "salt": self.salt, "key_id": self.key_id}) + "\n"


def read_record(root: str) -> EncryptionRecord | None:
    """The repository's encryption record (None: no encrypted backup yet)."""
    path = os.path.join(root, RECORD)
    try:
        data = json.loads(read_regular(path, MAX_RECORD))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as err:
        raise RepositoryError(f"{path} is unreadable: {err}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT \
            or data.get("version") != VERSION or data.get("cipher") != CIPHER:
        raise RepositoryError(f"{path} is not an encryption record this tool writes")
    salt, key_id = data.get("salt"), data.get("key_id")
    if not isinstance(salt, str) or not re.fullmatch(r"[0-9a-f]{32}", salt) \
            or not isinstance(key_id, str) or not re.fullmatch(r"[0-9a-f]{64}", key_id):
        raise RepositoryError(f"{path} has a malformed salt or key id")
    return EncryptionRecord(salt, key_id)


def write_record(root: str, record: EncryptionRecord) -> None:
    """Write the record unless the repository has one (then it must be this one)."""
    found = read_record(root)
    if found is None:
        write_atomic(os.path.join(root, RECORD), record.to_json().encode(), mode=0o600)
    elif found != record:
        raise RepositoryError(f"{os.path.join(root, RECORD)} changed during the backup")


def new_record(key_id: Callable[[bytes], str]) -> EncryptionRecord:
    """A record with a fresh salt; ``key_id(salt)`` names the key."""
    salt = secrets.token_bytes(16)
    return EncryptionRecord(salt.hex(), key_id(salt))


def check_key(record: EncryptionRecord | None, key_id: Callable[[bytes], str] | None,
              where: str) -> None:
    """Refuse (UsageError) a key the record does not name, or no key for an encrypted
    repository; a key for a repository without a record passes (a first encrypted backup)."""
    if record is None:
        return
    if key_id is None:
        raise UsageError(f"{where} holds encrypted backups: give --encrypt-key-file FILE "
                         "(its backups are all encrypted, with one key)")
    if not secrets.compare_digest(key_id(bytes.fromhex(record.salt)), record.key_id):
        raise UsageError(f"the key of --encrypt-key-file is not the key of {where}")


def replace_record(root: str, old: EncryptionRecord, new: EncryptionRecord) -> None:
    """The record names the new key (a key change); it must name the old one or the new
    one already."""
    found = read_record(root)
    if found == new:
        return
    if found != old:
        raise RepositoryError(f"{os.path.join(root, RECORD)} changed during the key change")
    write_atomic(os.path.join(root, RECORD), new.to_json().encode(), mode=0o600)
