"""Restore to the original RBD image: the image the mapping and the domain's disk both name,
reached with what this host says about its cluster, refused when it was made anew, is in
another cluster, is smaller than the disk or is in use (unless --force)."""

from __future__ import annotations

from typing import Any

import pytest
from lxml import etree

from libvirt_rdm_backup.domain.disks import RawDisk, RbdSource, SourceKind
from libvirt_rdm_backup.domain.redefine import RestoredTarget, _point_at
from libvirt_rdm_backup.engine import restore_rbd_original as original
from libvirt_rdm_backup.engine.restore_claims import claims_of
from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.repository.digest import Digest
from libvirt_rdm_backup.repository.manifest import DiskRecord
from libvirt_rdm_backup.storage import rbd_dest
from libvirt_rdm_backup.storage.base import Extent, RawDiskMapping, StorageNode

MiB = 1 << 20
FSID = "5b4e3c2a-1111-4222-8333-944455556666"
SOURCE = RbdSource(pool="rbd", image="vm-disk", hosts=(("10.0.0.1", 6789),), user="libvirt",
                   secret_uuid="0d5f0c4a-0000-4000-8000-000000000001")


def record(source: RbdSource | None = SOURCE, size: int = 64 * MiB,
           **identity: Any) -> DiskRecord:
    ident = {"cluster_fsid": FSID, "pool": "rbd", "namespace": None, "image": "vm-disk",
             "image_id": "10a3b2c4d5e6", "size": size, **identity}
    data = StorageNode("rados-objects", "rbd_data.10a3b2c4d5e6.*", None, size, {})
    root = StorageNode("rbd-image", "rbd/vm-disk", "rbd:rbd/vm-disk", size, ident,
                       [Extent(0, size, 0, data)])
    raw = RawDisk(target="vdb", source_kind=SourceKind.RBD, device="disk", rbd=source)
    return DiskRecord(disk=raw, size=size, data_file="x", format="qcow2",
                      digest=Digest("sha256", "0" * 64), level="full", data_path="snapshot",
                      bytes_transferred=0, stored_bytes=0,
                      mapping=RawDiskMapping("vdb", "rbd", root))


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch) -> dict[str, Any]:
    """What the cluster says about the image (``state``: None when there is none)."""
    seen: dict[str, Any] = {"state": rbd_dest.ImageState(64 * MiB, "10a3b2c4d5e6", FSID, []),
                            "running": []}

    def inspect(source: RbdSource, what: str) -> rbd_dest.ImageState | None:
        seen["source"] = source
        return seen["state"]  # type: ignore[no-any-return]

    monkeypatch.setattr(rbd_dest, "inspect", inspect)
    monkeypatch.setattr(original, "running_users", lambda conn, claim: seen["running"])
    return seen


def find(rec: DiskRecord, defined: dict[Any, RbdSource] | None = None,
         force: bool = False) -> Any:
    mine: dict[original.ImageKey, RbdSource] = \
        {("rbd", None, "vm-disk"): SOURCE} if defined is None else defined
    return original.find_rbd_original(claims_of(rec), rec, None, mine, force)


@pytest.mark.parametrize(("rec", "words"), [
    pytest.param(record(pool="rbd/../x"), "no RBD pool and image names", id="bad-pool"),
    pytest.param(record(image=None), "no RBD pool and image names", id="no-image"),
    pytest.param(record(image_id="XYZ"), "no RBD image id", id="bad-id"),
    pytest.param(record(cluster_fsid="not-a-fsid"), "cluster_fsid", id="bad-fsid"),
    pytest.param(record(image="other"), "it names image rbd/other, the domain's disk rbd/vm-disk",
                 id="names-differ"),
    pytest.param(record(source=None), "the domain's disk no RBD image", id="no-rbd-source"),
    pytest.param(record(source=RbdSource(pool="rbd", image="vm-disk", snapshot="s1")),
                 "was the snapshot rbd:rbd/vm-disk@s1", id="snapshot"),
])
def test_a_bad_rbd_mapping_is_refused(rec: DiskRecord, words: str) -> None:
    with pytest.raises(UsageError) as caught:
        claims_of(rec)
    assert str(caught.value).startswith("vdb: ") and words in str(caught.value)


def test_the_image_is_found_through_the_domains_definition(cluster: dict[str, Any]) -> None:
    here = RbdSource(pool="rbd", image="vm-disk", hosts=(("127.0.0.1", 6789),), user="lab",
                     secret_usage="lab")
    found = find(record(), {("rbd", None, "vm-disk"): here})
    assert cluster["source"] is here  # this host's monitors and secret, not the backup's
    assert (found.path, found.size, found.image_id) == ("rbd:rbd/vm-disk", 64 * MiB,
                                                        "10a3b2c4d5e6")
    assert found.rbd is here and found.iscsi is None and found.rdev is None
    assert "RBD image id 10a3b2c4d5e6 of rbd/vm-disk in cluster" in found.matched_on


def test_monitors_only_the_backup_names_are_not_contacted(cluster: dict[str, Any]) -> None:
    with pytest.raises(UsageError, match=r"restore it with --to rbd:rbd/vm-disk\?conf="):
        find(record(), {})
    assert "source" not in cluster
    plain = RbdSource(pool="rbd", image="vm-disk", user="libvirt")  # this host's ceph.conf
    found = find(record(source=plain), {})
    assert cluster["source"] is plain and "this host's Ceph configuration" in found.matched_on


@pytest.mark.parametrize(("state", "words"), [
    pytest.param(None, "no RBD image rbd/vm-disk in its cluster", id="gone"),
    pytest.param(rbd_dest.ImageState(64 * MiB, "2f00aa", FSID, []),
                 "has image id 2f00aa, the backup's image had 10a3b2c4d5e6 (removed and made "
                 "anew since); restore it with --to rbd:rbd/vm-disk", id="recreated"),
    pytest.param(rbd_dest.ImageState(64 * MiB, "10a3b2c4d5e6",
                                     "00000000-1111-4222-8333-944455556666", []),
                 "is in cluster 00000000-", id="other-cluster"),
    pytest.param(rbd_dest.ImageState(32 * MiB, "10a3b2c4d5e6", FSID, []),
                 "rbd:rbd/vm-disk is 32 MiB, the disk is 64 MiB", id="smaller"),
])
def test_an_image_that_differs_is_refused(cluster: dict[str, Any],
                                          state: rbd_dest.ImageState | None, words: str) -> None:
    cluster["state"] = state
    for force in (False, True):  # --force does not override any of these
        with pytest.raises(UsageError) as caught:
            find(record(), force=force)
        assert str(caught.value).startswith("vdb: ") and words in str(caught.value)


def test_a_larger_image_is_written_as_a_lun_is(cluster: dict[str, Any]) -> None:
    cluster["state"] = rbd_dest.ImageState(128 * MiB, "10a3b2c4d5e6", FSID, [])
    assert find(record()).size == 128 * MiB


def test_an_image_in_use_is_refused_unless_forced(cluster: dict[str, Any]) -> None:
    cluster["state"] = rbd_dest.ImageState(64 * MiB, "10a3b2c4d5e6", FSID,
                                           ["watcher 10.0.0.5:0/123",
                                            "exclusive lock owner client.4242"])
    with pytest.raises(UsageError, match=r"in use \(watcher 10.0.0.5:0/123; exclusive lock "
                                         r"owner client.4242\); use --force"):
        find(record())
    cluster["running"] = ["vm1"]
    with pytest.raises(UsageError, match="in use by running domain vm1; use --force"):
        find(record())
    assert find(record(), force=True).path == "rbd:rbd/vm-disk"


class FakeImage:
    def __init__(self, owners: list[dict[str, str]], lockers: list[tuple[str, str, str]]) -> None:
        self.owners, self.lockers = owners, lockers

    def watchers_list(self) -> list[dict[str, str]]:
        return [{"addr": "127.0.0.1:0/99"}]

    def list_lockers(self) -> dict[str, Any]:
        return {"lockers": self.lockers}

    def lock_get_owners(self) -> list[dict[str, str]]:
        return self.owners


def test_users_name_watchers_lockers_and_the_exclusive_lock_owner() -> None:
    image = FakeImage([{"mode": "exclusive", "owner": "client.7"}], [])
    assert rbd_dest.users(image) == ["watcher 127.0.0.1:0/99", "exclusive lock owner client.7"]
    both = FakeImage([{"mode": "exclusive", "owner": "client.7"}],
                     [("client.7", "auto 1", "127.0.0.1:0/99")])
    assert rbd_dest.users(both) == ["watcher 127.0.0.1:0/99", "lock holder client.7"]


def test_a_new_domain_keeps_the_rbd_source_it_was_restored_into() -> None:
    disk = etree.fromstring("<disk type='network' device='disk'><driver name='qemu' "
                            "type='raw'/><source protocol='rbd' name='rbd/vm-disk'><host "
                            "name='127.0.0.1' port='6789'/></source><target dev='vdb'/></disk>")
    before = etree.tostring(disk)
    _point_at(disk, RestoredTarget("rbd", "rbd:rbd/vm-disk"))
    assert etree.tostring(disk) == before
