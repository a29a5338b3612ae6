"""The rekey journal: read back as untrusted input, acted on only when it is what the tool
writes for the repository as it is; ``rekey`` refuses bad keys with nothing changed."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from libvirt_rdm_backup.engine.rekey import rekey
from libvirt_rdm_backup.errors import RepositoryError, UsageError
from libvirt_rdm_backup.qemu.secrets import LayerKey
from libvirt_rdm_backup.repository.digest import Digest, file_digests
from libvirt_rdm_backup.repository.encryption import EncryptionRecord, write_record
from libvirt_rdm_backup.repository.manifest import Manifest
from libvirt_rdm_backup.repository.rekey_journal import (
    MAC_LABEL,
    Journal,
    LayerEntry,
    check_against,
    read_journal,
    remove_journal,
    write_journal,
)
from libvirt_rdm_backup.repository.store import Repository
from tests.unit.test_repository_damage_units import IDS, UUID, publish

SALT = "ab" * 16
OLD, NEW, THIRD = "1" * 64, "2" * 64, "3" * 64
BODY = Digest("sha256", "4" * 64)


def journal(*ids: str) -> Journal:
    return Journal("2026-12-07T10:00:00.000Z", SALT, OLD, NEW,
                   tuple(LayerEntry(UUID, i, "vdb", BODY) for i in ids))


def manifests(tmp_path: Path, key_ids: tuple[str, ...]) -> list[Manifest]:
    """Published backups of one disk, each encrypted with the key of ``key_ids``."""
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    found = []
    for n, key_id in enumerate(key_ids):
        manifest = publish(repo, IDS[n], IDS[n - 1] if n else None, b"x")
        record = replace(manifest.disks[0], encryption={"format": "luks", "key_id": key_id})
        found.append(replace(manifest, disks=[record]))
    return found


MAC_KEY = LayerKey.pair_key(LayerKey(b"old"), LayerKey(b"new"), MAC_LABEL)


def test_a_journal_reads_back_as_written(tmp_path: Path) -> None:
    written = write_journal(str(tmp_path), journal(IDS[0], IDS[1]), MAC_KEY)
    assert oct(os.stat(tmp_path / ".rekey-journal.json").st_mode & 0o777) == "0o600"
    assert read_journal(str(tmp_path)) == written == journal(IDS[0], IDS[1]).signed(MAC_KEY)
    assert written.authentic(MAC_KEY)
    remove_journal(str(tmp_path))
    assert read_journal(str(tmp_path)) is None


LAYER = {"domain_uuid": UUID, "backup_id": IDS[0], "disk": "vdb", "body": BODY.to_dict()}


@pytest.mark.hostile
@pytest.mark.parametrize("change, problem", [
    ({"format": "something/else"}, "unknown format"),
    ({"version": 2}, "version"),
    ({"salt": "../etc"}, "salt"),
    ({"old_key_id": "A" * 64}, "old_key_id"),
    ({"new_key_id": OLD}, "are one"),
    ({"layers": {"x": 1}}, "layers"),
    ({"layers": [{**LAYER, "backup_id": "../../etc"}]}, "malformed backup id"),
    ({"layers": [{**LAYER, "disk": "../vdb"}]}, "malformed disk name"),
    ({"layers": [{**LAYER, "domain_uuid": "x/.."}]}, "malformed"),
    ({"layers": [{**LAYER, "body": {"algorithm": "md5", "value": "0" * 32}}]}, "md5"),
    ({"layers": [{**LAYER, "body": "sha256"}]}, "not an object"),
    ({"layers": [LAYER, LAYER]}, "twice"),
    ({"created": "2026-12-07T10:00:00.000Z\nERROR forged line"}, "created"),
    ({"created": ["2026-12-07T10:00:00.000Z"]}, "created"),
    ({"created": "2026-12-07T10:00:00Z"}, "created"),
    ({"mac": ""}, "mac"),
    ({"mac": None}, "mac"),
])
def test_a_journal_the_tool_would_not_write_is_refused(tmp_path: Path, change: dict[str, object],
                                                       problem: str) -> None:
    document = {**json.loads(journal(IDS[0]).signed(MAC_KEY).dumps()), **change}
    (tmp_path / ".rekey-journal.json").write_text(json.dumps(document))
    with pytest.raises(RepositoryError, match=problem):
        read_journal(str(tmp_path))


def test_a_journal_that_fits_the_repository_passes(tmp_path: Path) -> None:
    backups = manifests(tmp_path, (OLD, NEW))  # the first layer's manifest written again
    check_against(journal(IDS[0], IDS[1]), EncryptionRecord(SALT, OLD), backups, [])
    check_against(journal(IDS[0], IDS[1]), EncryptionRecord(SALT, NEW), backups, [])
    # a layer published before the journal was complete joins it while nothing switched
    check_against(journal(IDS[0]), EncryptionRecord(SALT, OLD), manifests(
        tmp_path / "b", (OLD, OLD)), [])


@pytest.mark.hostile
@pytest.mark.parametrize("record, keys, named, unreadable, problem", [
    (EncryptionRecord("cd" * 16, OLD), (OLD, OLD), 2, [], "another salt"),
    (None, (OLD, OLD), 2, [], "another salt"),
    (EncryptionRecord(SALT, THIRD), (OLD, OLD), 2, [], "neither of its keys"),
    (EncryptionRecord(SALT, OLD), (OLD, OLD), 2, [IDS[2]], "cannot be read"),
    (EncryptionRecord(SALT, OLD), (OLD,), 2, [], "not an encrypted layer"),
    (EncryptionRecord(SALT, OLD), (OLD, THIRD), 2, [], "third key"),
    (EncryptionRecord(SALT, NEW), (NEW, OLD), 1, [], "went past its first step"),
    (EncryptionRecord(SALT, OLD), (NEW, NEW), 1, [], "went past its first step"),
])
def test_a_journal_that_does_not_fit_the_repository_is_refused(
        tmp_path: Path, record: EncryptionRecord | None, keys: tuple[str, ...], named: int,
        unreadable: list[str], problem: str) -> None:
    with pytest.raises(RepositoryError, match=problem):
        check_against(journal(*IDS[:named]), record, manifests(tmp_path, keys), unreadable)


def test_digests_outside_a_range_ignore_what_changes_in_it(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"a" * 100 + b"b" * 50 + b"c" * 100)
    whole, body = file_digests(str(path), (100, 50))
    assert whole.value == hashlib.sha256(path.read_bytes()).hexdigest()
    assert body.value == hashlib.sha256(b"a" * 100 + b"c" * 100).hexdigest()
    path.write_bytes(b"a" * 100 + b"x" * 50 + b"c" * 100)
    assert file_digests(str(path), (100, 50))[1] == body
    path.write_bytes(b"a" * 99 + b"x" * 51 + b"c" * 100)
    assert file_digests(str(path), (100, 50))[1] != body
    fd = os.open(path, os.O_RDONLY)
    try:  # an open descriptor: read from its start whatever its offset, and left open
        os.lseek(fd, 7, os.SEEK_SET)
        assert file_digests(fd, (100, 50)) == file_digests(str(path), (100, 50))
        assert file_digests(fd, (100, 50)) == file_digests(str(path), (100, 50))
    finally:
        os.close(fd)


@pytest.mark.bad_input
def test_rekey_refuses_bad_keys_and_hostile_journals_changing_nothing(tmp_path: Path) -> None:
    old, new = LayerKey(b"old key\n"), LayerKey(b"new key\n")
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    publish(repo, IDS[0], None, b"x")
    with pytest.raises(UsageError, match="no encrypted backups"):
        rekey(repo, old, new)
    salt = bytes.fromhex(SALT)
    write_record(repo.root, EncryptionRecord(SALT, old.key_id(salt)))
    with pytest.raises(UsageError, match="is the key of"):
        rekey(repo, old, LayerKey(b"old key\n"))
    with pytest.raises(UsageError, match="not the key of repository"):
        rekey(repo, new, old)
    hostile = Journal("2026-12-07T10:00:00.000Z", SALT, old.key_id(salt), new.key_id(salt),
                      (LayerEntry(UUID, IDS[2], "vdb", BODY),))
    write_journal(repo.root, hostile, LayerKey.pair_key(old, new, MAC_LABEL))
    before = _files(repo.root)
    with pytest.raises(RepositoryError, match="not an encrypted layer"):
        rekey(repo, old, new)
    with pytest.raises(UsageError, match="from or to another key"):
        rekey(repo, new, LayerKey(b"third"))
    assert _files(repo.root) == before


@pytest.mark.hostile
def test_a_journal_not_signed_with_both_keys_is_refused_changing_nothing(
        tmp_path: Path) -> None:
    old, new = LayerKey(b"old key\n"), LayerKey(b"new key\n")
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    publish(repo, IDS[0], None, b"x")
    salt = bytes.fromhex(SALT)
    write_record(repo.root, EncryptionRecord(SALT, old.key_id(salt)))
    forged = Journal("2026-12-07T10:00:00.000Z", SALT, old.key_id(salt), new.key_id(salt))
    for key in (MAC_KEY, LayerKey.pair_key(new, old, MAC_LABEL),  # not the pair's key
                hashlib.sha256(b"old key\nnew key\n").digest()):
        write_journal(repo.root, forged, key)
        before = _files(repo.root)
        with pytest.raises(RepositoryError, match="its mac does not match") as caught:
            rekey(repo, old, new)
        assert caught.value.exit_code == 4 and "\n" not in str(caught.value)
        assert _files(repo.root) == before
    # the same journal, but body digests changed after it was signed
    signed = forged.signed(LayerKey.pair_key(old, new, MAC_LABEL))
    document = json.loads(replace(signed, layers=(LayerEntry(UUID, IDS[0], "vdb", BODY),))
                          .dumps())
    assert read_journal(repo.root) is not None
    (Path(repo.root) / ".rekey-journal.json").write_text(json.dumps(document))
    with pytest.raises(RepositoryError, match="its mac does not match"):
        rekey(repo, old, new)


def _files(root: str) -> dict[str, bytes]:
    return {str(p): p.read_bytes() for p in Path(root).rglob("*") if p.is_file()}
