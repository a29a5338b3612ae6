"""A restore from a file repository reads the layer files it checked, whatever their paths
name by the time QEMU opens the chain."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup.engine.restore import restore
from libvirt_rdm_backup.engine.verify import checked_node
from libvirt_rdm_backup.errors import DamagedBackupError
from libvirt_rdm_backup.qemu.layers import held_fds
from libvirt_rdm_backup.repository.chunks import CHUNK
from libvirt_rdm_backup.repository.digest import file_digest
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.repository.store import Repository
from tests.unit.test_readback import _layer_with
from tests.unit.test_repository_damage_units import IDS, SIZE, UUID, layer, vdb


def _published(tmp_path: Path) -> Repository:
    """A repository holding one full point of vdb: chunk 0 of 0x41, the rest zero."""
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    with repo.lock(UUID), repo.staging(UUID, IDS[0]) as staging:
        data = Path(staging.file("vdb.qcow2"))
        _layer_with(data, [(0x41, 0)])
        record = DiskRecord(
            disk=vdb(),
            size=SIZE,
            data_file=data.name,
            format="qcow2",
            digest=file_digest(str(data)),
            level="full",
            data_path="qemu",
            bytes_transferred=CHUNK,
            stored_bytes=CHUNK,
            file_size=data.stat().st_size,
        )
        repo.publish(
            staging,
            Manifest(
                backup_id=IDS[0],
                domain_uuid=UUID,
                domain_name="vm",
                level="full",
                created=IDS[0],
                completed=IDS[0],
                consistency={},
                domain_xml="<domain/>",
                disks=[record],
            ),
        )
    return repo


@pytest.mark.hostile
def test_the_restored_layer_is_the_file_that_was_checked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    repo = _published(tmp_path)
    fake = tmp_path / "fake.qcow2"  # a valid layer of other content (chunk 2 of 0x42)
    _layer_with(fake, [(0x41, 0), (0x42, 2 * CHUNK)])

    def swapped_after_check(*args: Any) -> dict[str, Any]:
        node = checked_node(*args)  # every layer checked (header, digest)
        os.rename(fake, layer(repo, IDS[0]))  # ... then its path names another file
        return node

    monkeypatch.setattr("libvirt_rdm_backup.engine.restore.checked_node", swapped_after_check)
    out = tmp_path / "restored.raw"
    result = restore(None, "vm", repo.root, "vdb", str(out))
    assert not fake.exists()  # the swap happened
    assert result.data_bytes == CHUNK
    with open(out, "rb") as restored:
        assert restored.read(CHUNK) == b"\x41" * CHUNK
        restored.seek(2 * CHUNK)
        assert restored.read(CHUNK) == bytes(CHUNK)  # not the swapped file's 0x42
    assert out.stat().st_size == SIZE


def test_held_fds_are_found_at_any_depth() -> None:
    node = {
        "driver": "raw",
        "size": 7,
        "file": {
            "driver": "qcow2",
            "file": {"driver": "file", "filename": "/dev/fd/9"},
            "backing": {
                "driver": "qcow2",
                "file": {"driver": "file", "filename": "/dev/fd/12"},
                "backing": {
                    "driver": "qcow2",
                    "file": {"driver": "file", "filename": "/srv/x.qcow2"},
                    "backing": None,
                },
            },
        },
    }
    assert held_fds(node) == (9, 12)
    assert held_fds({"driver": "file", "filename": "/dev/fd/x"}) == ()


@pytest.mark.parametrize("damage", ["missing", "symlink"])
def test_a_layer_that_cannot_be_held_is_refused_as_before(tmp_path: Path, damage: str) -> None:
    repo = _published(tmp_path)
    path = layer(repo, IDS[0])
    if damage == "symlink":  # to a valid copy of itself: not followed
        os.rename(path, tmp_path / "elsewhere.qcow2")
        os.symlink(tmp_path / "elsewhere.qcow2", path)
    else:
        path.unlink()
    out = tmp_path / "restored.raw"
    with pytest.raises(DamagedBackupError) as refused:
        restore(None, "vm", repo.root, "vdb", str(out))
    shown = "is missing" if damage == "missing" else "is not a regular file"
    assert f"vdb.qcow2 {shown}; nothing was written" in str(refused.value)
    assert not out.exists()
