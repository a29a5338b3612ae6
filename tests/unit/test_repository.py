"""The repository: atomic publishing, listing, locking, manifests, id validation."""

from __future__ import annotations

import json
import os
import stat
import uuid as uuidlib
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.errors import (
    NotFoundError,
    OperationError,
    RdmBackupError,
    RepositoryError,
    UsageError,
)
from libvirt_rdm_backup.repository.digest import Digest, file_digest
from libvirt_rdm_backup.repository.ids import check_backup_id, new_backup_id, now_iso
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.store import Repository

UUID = "0b1f1c1e-4c39-4a4e-9d1c-2a6b3c4d5e6f"


def make_manifest(backup_id: str, data: Path) -> Manifest:
    disk = RawDisk(target="vdb", source_kind=SourceKind.BLOCK, device="disk",
                   source_path="/dev/loop9", serial="S1")
    record = DiskRecord(disk=disk, size=1024, data_file=data.name, format="qcow2",
                        digest=file_digest(str(data)), level="full", data_path="qemu",
                        bytes_transferred=512, stored_bytes=4096, reason="test")
    return Manifest(backup_id=backup_id, domain_uuid=UUID, domain_name="vm", level="full",
                    created=now_iso(), completed=now_iso(), consistency={"method": "offline"},
                    domain_xml="<domain/>", disks=[record])


def publish_one(repo: Repository) -> Manifest:
    backup_id = new_backup_id()
    with repo.lock(UUID), repo.staging(UUID, backup_id) as staging:
        data = Path(staging.file("vdb.qcow2"))
        data.write_bytes(b"payload" * 100)
        manifest = make_manifest(backup_id, data)
        repo.publish(staging, manifest)
    return manifest


def test_publish_list_load(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    first, second = publish_one(repo), publish_one(repo)
    assert [m.backup_id for m in repo.scan().backups] == [first.backup_id, second.backup_id]
    loaded = repo.load(UUID, first.backup_id)
    assert loaded.to_dict() == first.to_dict()
    assert stat.S_IMODE(os.stat(repo.root).st_mode) == 0o700
    manifest_file = Path(repo.backup_dir(UUID, first.backup_id)) / "manifest.json"
    assert stat.S_IMODE(manifest_file.stat().st_mode) == 0o600
    data_file = manifest_file.parent / "vdb.qcow2"
    assert stat.S_IMODE(data_file.stat().st_mode) == 0o600
    assert Repository.open(repo.root).scan(UUID).backups[0].backup_id == first.backup_id


def test_failure_inside_staging_leaves_nothing(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    with pytest.raises(RuntimeError), repo.lock(UUID), repo.staging(UUID, new_backup_id()) as s:
        Path(s.file("vdb.qcow2")).write_bytes(b"half")
        raise RuntimeError("copy failed")
    assert repo.scan() == ([], [])
    assert sorted(p.name for p in Path(repo.domain_dir(UUID)).iterdir()) == [".lock", ".prune.lock"]


def test_partials_of_killed_runs_are_removed_under_the_lock(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    partial = Path(repo.domain_dir(UUID)) / ".partial-20260101T000000Z-abcdef"
    partial.mkdir(parents=True)
    (partial / "vdb.qcow2").write_bytes(b"x")
    with repo.lock(UUID):
        assert not partial.exists()


def test_second_lock_is_refused(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    with repo.lock(UUID):
        other = Repository.open(repo.root)
        with pytest.raises(OperationError, match="another backup"):
            with other.lock(UUID):
                pass


def test_opening_non_repositories(tmp_path: Path) -> None:
    with pytest.raises(NotFoundError):
        Repository.open(str(tmp_path / "missing"))
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "file").write_text("mine")
    with pytest.raises(UsageError, match="not empty and not a backup repository"):
        Repository.open(str(tmp_path / "busy"), create=True)
    with pytest.raises(UsageError, match="is not a backup repository"):
        Repository.open(str(tmp_path / "busy"))
    for create in (True, False):
        with pytest.raises(UsageError, match="is not a directory"):
            Repository.open(str(tmp_path / "busy" / "file"), create=create)
    assert [p.name for p in (tmp_path / "busy").iterdir()] == ["file"]
    assert (tmp_path / "busy" / "file").read_text() == "mine"


@pytest.mark.parametrize("bad", ["", "../x", "20261125T143742Z-307edc/../..", "latest",
                                 "20261125T143742Z-307EDC", "20261125T143742Z-307edc\n"])
def test_bad_backup_ids(bad: str) -> None:
    with pytest.raises(UsageError):
        check_backup_id(bad)


def test_new_ids_are_valid_and_sortable() -> None:
    ids = [new_backup_id() for _ in range(5)]
    assert all(check_backup_id(i) == i for i in ids)


def test_truncated_manifest_is_a_repository_error(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    manifest = publish_one(repo)
    path = Path(repo.backup_dir(UUID, manifest.backup_id)) / "manifest.json"
    path.write_text(path.read_text()[:200])
    with pytest.raises(RepositoryError):
        repo.load(UUID, manifest.backup_id)
    assert [d.backup_id for d in repo.scan().damaged] == [manifest.backup_id]


@pytest.mark.bad_input
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(flips=st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1,
                      max_size=4),
       cut=st.none() | st.integers(0, 10_000))
def test_damaged_manifest_files_are_listed_apart(tmp_path: Path, flips: list[tuple[int, int]],
                                                 cut: int | None) -> None:
    """Bytes flipped or cut anywhere in a stored manifest: only the project's errors, and
    the backup is listed as damaged (or still loads when the damage changed nothing)."""
    repo = Repository.open(str(tmp_path / f"repo-{uuidlib.uuid4().hex}"), create=True)
    manifest = publish_one(repo)
    path = Path(repo.backup_dir(UUID, manifest.backup_id)) / "manifest.json"
    data = bytearray(path.read_bytes())
    for offset, xor in flips:
        data[offset % len(data)] ^= xor
    path.write_bytes(bytes(data[:cut]) if cut is not None else bytes(data))
    found, damaged = repo.scan()
    assert len(found) + len(damaged) == 1
    if damaged:
        assert damaged[0].backup_id == manifest.backup_id


@given(st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4)
                    | st.dictionaries(st.text(max_size=8), kids, max_size=4), max_leaves=20))
def test_manifest_loader_raises_only_own_errors(data: object) -> None:
    try:
        Manifest.loads(json.dumps(data))
    except RdmBackupError:
        pass


def test_digest_detects_change(tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(os.urandom(100_000))
    before = file_digest(str(path))
    data = bytearray(path.read_bytes())
    data[5000] ^= 1
    path.write_bytes(bytes(data))
    assert file_digest(str(path)) != before
    assert Digest.from_dict(before.to_dict()) == before
