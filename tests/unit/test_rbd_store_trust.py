"""What an ``rbd://`` target reads back from its pool is checked before it is acted on: an
index key, a manifest, a location edited to name another image or snapshot, a snapshot's
size, the repository id, and which snapshots a prune removes (a fake pool: no cluster)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, cast

import pytest

from libvirt_rdm_backup.domain.disks import RawDisk, SourceKind
from libvirt_rdm_backup.engine import rbd_store
from libvirt_rdm_backup.engine.rbd_store import RbdStore
from libvirt_rdm_backup.errors import DamagedBackupError, RepositoryError, UsageError
from libvirt_rdm_backup.repository.chain import DiskPoint, chain_of
from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.repository.manifest import DiskRecord, Manifest
from libvirt_rdm_backup.targets.uri import RbdAddress

UUID = "0b1f1c1e-4c39-4a4e-9d1c-2a6b3c4d5e6f"
IDS = ("20261201T120000Z-00000a", "20261202T120000Z-00000b", "20261203T120000Z-00000c")
SIZE = 1 << 20


@dataclass
class FakePool:
    """Index omap and images with their snapshots (name -> size), as a cluster keeps them."""

    index: dict[str, bytes] = field(default_factory=dict)
    images: dict[str, dict[str, int]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    key: str = "QUJD"

    def omap_keys(self, _name: str, after: str, count: int) -> tuple[list[str], int]:
        return sorted(k for k in self.index if k > after)[:count], 1

    def omap_values(self, _name: str, keys: list[str]) -> tuple[dict[str, bytes], int]:
        return {k: self.index[k] for k in keys if k in self.index}, 1

    def set_omap(self, _name: str, values: dict[str, bytes], remove: tuple[str, ...] = ()) -> None:
        self.index.update(values)
        for key in remove:
            self.index.pop(key, None)

    def snapshots(self, name: str) -> list[str]:
        return list(self.images.get(name, {}))

    def snapshot_sizes(self, name: str) -> dict[str, int]:
        return dict(self.images.get(name, {}))

    def remove_snapshot(self, name: str, snapshot: str) -> None:
        self.images[name].pop(snapshot)
        self.removed.append(f"{name}@{snapshot}")

    def used(self, _name: str) -> int:
        return 0

    def digest(self, _name: str, _snapshot: str, _algorithm: str) -> str:
        return "0" * 64

    def monitors(self) -> list[tuple[str, int]]:
        return [("127.0.0.1", 6789)]

    def close(self) -> None:
        pass


def store(pool: FakePool | None = None) -> RbdStore:
    address = RbdAddress(pool="rbd", conf="/etc/ceph/ceph.conf", user="u", prefix="bk")
    return RbdStore(address, cast(Any, pool or FakePool()))


def manifest(
    backup_id: str,
    parent: str | None,
    *,
    uuid: str = UUID,
    disk: str = "vdb",
    location: dict[str, Any] | None = None,
    base: str = "bk",
    size: int = SIZE,
    digest: str = "0" * 64,
) -> Manifest:
    """A point as an ``rbd://`` target with prefix ``base`` in pool ``rbd`` writes it."""
    raw = RawDisk(
        target=disk, source_kind=SourceKind.BLOCK, device="disk", source_path=f"/dev/{disk}"
    )
    where = {"pool": "rbd", "image": f"{base}.{uuid}.{disk}", "snapshot": backup_id}
    record = DiskRecord(
        disk=raw,
        size=size,
        data_file=where["image"],
        format="raw",
        digest=Digest("sha256", digest),
        level="full" if parent is None else "incremental",
        data_path="qemu",
        bytes_transferred=0,
        stored_bytes=0,
        parent=parent,
        location=location or where,
    )
    return Manifest(
        backup_id=backup_id,
        domain_uuid=uuid,
        domain_name="vm",
        level=record.level,
        created="2026-12-01T12:00:00Z",
        completed="2026-12-01T12:00:01Z",
        consistency={},
        domain_xml="",
        disks=[record],
        parent=parent,
    )


def published(*manifests: Manifest) -> tuple[RbdStore, FakePool]:
    pool = FakePool()
    target = store(pool)
    target.write_manifests(list(manifests))
    for m in manifests:
        for r in m.disks:
            pool.images.setdefault(f"bk.{m.domain_uuid}.{r.disk.target}", {})[m.backup_id] = SIZE
    return target, pool


def point(target: RbdStore, backup_id: str) -> DiskPoint:
    found = next(m for m in target.scan().backups if m.backup_id == backup_id)
    return DiskPoint(found, found.disks[0])


def test_a_point_written_by_the_tool_is_sound() -> None:
    target, _pool = published(manifest(IDS[0], None))
    assert target.damage(point(target, IDS[0]), digests=True) is None
    node = target.image_node([point(target, IDS[0])])
    assert (node["file"]["image"], node["file"]["snapshot"]) == (f"bk.{UUID}.vdb", IDS[0])


@pytest.mark.parametrize(
    "location",
    [
        {"pool": "rbd", "image": "vm-42-disk-1", "snapshot": IDS[0]},  # another VM's image
        {"pool": "rbd", "image": f"bk.{UUID}.vdb", "snapshot": "gold"},  # another snapshot
        {"pool": "rbd", "image": f"bk.{UUID}.vdc", "snapshot": IDS[0]},  # another disk's image
        {"pool": "rbd", "image": f"bk.{UUID}.vdb", "snapshot": IDS[0], "x": 1},
        {"pool": "rbd", "image": f"bk.{UUID}.vdb"},
    ],
    ids=["image", "snapshot", "disk", "extra", "no-snapshot"],
)
def test_a_location_edited_to_name_another_image_or_snapshot_is_never_opened(
    location: dict[str, Any],
) -> None:
    target, pool = published(manifest(IDS[0], None, location=location))
    pool.images["vm-42-disk-1"] = {IDS[0]: SIZE}
    pool.images[f"bk.{UUID}.vdb"]["gold"] = SIZE
    pool.images[f"bk.{UUID}.vdc"] = {IDS[0]: SIZE}
    found = point(target, IDS[0])
    problem = target.damage(found, digests=True)
    assert problem is not None and "where this target keeps it" in problem, problem
    with pytest.raises(DamagedBackupError, match="where this target keeps it"):
        target.image_node([found])


def test_a_snapshot_of_another_size_than_the_manifest_says_is_damage() -> None:
    target, pool = published(manifest(IDS[0], None))
    pool.images[f"bk.{UUID}.vdb"][IDS[0]] = 1 << 50
    assert (
        target.damage(point(target, IDS[0]))
        == f"bk.{UUID}.vdb@{IDS[0]} has {1 << 50} bytes, the manifest says {SIZE}"
    )


@pytest.mark.parametrize(
    "key, value, problem",
    [
        (f"m.{UUID.upper()}.{IDS[1]}", None, "not a domain UUID and a backup id"),
        (f"m.{{{UUID}}}.{IDS[1]}", None, "not a domain UUID and a backup id"),
        (f"m.{UUID}.../../x", None, "not a domain UUID and a backup id"),
        (f"m.{UUID}.{IDS[1]}", b"x" * ((4 << 20) + 1), "at most"),
        (f"m.{UUID}.{IDS[1]}", b"{", "malformed manifest"),
        (f"m.{UUID}.{IDS[1]}", manifest(IDS[2], None).dumps().encode(), "under the key of"),
        (
            f"m.{UUID}.{IDS[1]}",
            manifest(IDS[1], None, disk="vdb/../x").dumps().encode(),
            "malformed disk name",
        ),
        (
            f"m.{UUID}.{IDS[1]}",
            manifest(IDS[1], None, disk=f"{UUID}.vdb").dumps().encode(),
            "malformed disk name",
        ),
    ],
    ids=[
        "upper-uuid",
        "braced-uuid",
        "backup-id",
        "huge",
        "json",
        "other-id",
        "disk-name",
        "dotted-disk",
    ],
)
def test_index_entries_the_tool_would_not_write_are_damaged(
    key: str, value: bytes | None, problem: str
) -> None:
    target, pool = published(manifest(IDS[0], None))
    uuid = key.split(".")[1]
    pool.index[key] = (
        value if value is not None else manifest(IDS[1], None, uuid=uuid).dumps().encode()
    )
    listed = target.scan()
    assert [m.backup_id for m in listed.backups] == [IDS[0]]
    assert len(listed.damaged) == 1 and problem in listed.damaged[0].problem, listed.damaged


def test_prune_removes_only_snapshots_named_as_backups() -> None:
    target, pool = published(
        manifest(IDS[0], None), manifest(IDS[1], IDS[0]), manifest(IDS[2], IDS[1])
    )
    image = f"bk.{UUID}.vdb"
    pool.images[image].update(
        {"gold": SIZE, "rdmb-x-default-vdb.1a2b3c4d-00aa11": SIZE, "20261130T120000Z-ffffff": SIZE}
    )  # a leftover of a killed run
    unreadable = "20261130T130000Z-eeeeee"  # named by an index entry that cannot be read
    pool.images[image][unreadable] = SIZE
    pool.index[f"m.{UUID.upper()}.{unreadable}"] = b"{"
    chain = chain_of(target.scan(UUID).backups, "default")
    target.consolidate(UUID, chain, {IDS[0], IDS[1]})
    assert pool.images[image].pop(unreadable) == SIZE
    assert sorted(pool.images[image]) == sorted(
        [IDS[2], "gold", "rdmb-x-default-vdb.1a2b3c4d-00aa11"]
    )
    assert sorted(pool.removed) == sorted(
        f"{image}@{b}" for b in ("20261130T120000Z-ffffff", IDS[0], IDS[1])
    )
    [kept] = target.scan(UUID).backups
    assert (kept.backup_id, kept.disks[0].parent, kept.disks[0].level) == (IDS[2], None, "full")


@pytest.mark.parametrize("found", [b"../x", b"0d5f0c4a", b"ABCDEF", b"", "é1234".encode()])
def test_an_index_without_a_valid_repository_id_is_refused(
    monkeypatch: pytest.MonkeyPatch, found: bytes
) -> None:
    pool = FakePool(index={rbd_store.REPO_KEY: found})
    monkeypatch.setattr(
        rbd_store, "RbdPool", lambda *_args: type("P", (), {"connect": lambda self: pool})()
    )
    address = RbdAddress(pool="rbd", conf="/etc/ceph/ceph.conf", user="u", prefix="bk")
    with pytest.raises(RepositoryError, match="holds no valid repository id") as caught:
        RbdStore.open(address)
    assert "conf=" not in str(caught.value)
    pool.index[rbd_store.REPO_KEY] = b"0d5f0c"
    assert RbdStore.open(address).repo_id == "0d5f0c"


def test_a_disk_name_with_a_dot_names_no_image() -> None:
    """``PREFIX.UUID.DISK`` stays apart from another target's (``PREFIX.UUID`` its prefix)."""
    with pytest.raises(UsageError, match="cannot name an image"):
        store().image_name(UUID, f"{UUID}.vdb")
    assert store().image_name(UUID, "sd_a-1") == f"bk.{UUID}.sd_a-1"


def test_a_point_on_a_parent_resets_the_image_to_it_first(
    caplog: pytest.LogCaptureFixture,
) -> None:
    from libvirt_rdm_backup.engine.plan import DataPath, DiskPlan
    from libvirt_rdm_backup.engine.rbd_sink import RbdSink
    from libvirt_rdm_backup.modes import Level

    calls: list[tuple[str, ...]] = []

    class Pool(FakePool):
        changed = True

        def reset_head(self, name: str, snapshot: str) -> bool:
            calls.append(("reset", name, snapshot))
            return self.changed

        def ensure_image(self, name: str, size: int, object_size: int) -> None:
            calls.append(("ensure", name, str(size)))

    pool = Pool()
    parent = manifest(IDS[0], None)
    disk = RawDisk(target="vdb", source_kind=SourceKind.BLOCK, device="disk", size=SIZE)
    sink = RbdSink(store(pool), UUID, IDS[1])
    sink.create(
        DiskPlan(
            disk, DataPath.QEMU, Level.INCREMENTAL, "", parent=DiskPoint(parent, parent.disks[0])
        )
    )
    image = f"bk.{UUID}.vdb"
    assert calls == [("reset", image, IDS[0]), ("ensure", image, str(SIZE))]
    assert f"{image} held writes that no point made since backup {IDS[0]}" in caplog.text
    calls.clear()
    caplog.clear()
    pool.changed = False
    sink.create(
        DiskPlan(
            disk, DataPath.QEMU, Level.INCREMENTAL, "", parent=DiskPoint(parent, parent.disks[0])
        )
    )
    assert calls[0][0] == "reset" and "held writes" not in caplog.text
    calls.clear()
    sink.create(DiskPlan(disk, DataPath.QEMU, Level.FULL, ""))  # a full writes everything
    assert calls == [("ensure", image, str(SIZE))]
