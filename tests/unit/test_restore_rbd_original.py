"""Restore to the original RBD image: the image the domain's definition on this host has at
the disk's target, which the mapping and the backup's disk must both name, reached only with
that definition's monitors and credentials (never the backup's); refused when the domain is
not defined here or has another image there, when it was made anew, is in another cluster,
is smaller than the disk or is in use (unless --force)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import libvirt
import pytest
from lxml import etree

from libvirt_rdm_backup.domain.disks import RawDisk, RbdSource, SourceKind
from libvirt_rdm_backup.domain.redefine import RestoredTarget, _point_at
from libvirt_rdm_backup.engine import restore_rbd_original as original
from libvirt_rdm_backup.engine.restore_claims import claims_of
from libvirt_rdm_backup.engine.restore_rbd import parse
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
    """What the cluster says about the image (``state``: None when there is none); ``keys``:
    the sources whose libvirt secret was read."""
    seen: dict[str, Any] = {"state": rbd_dest.ImageState(64 * MiB, "10a3b2c4d5e6", FSID, []),
                            "running": [], "keys": []}

    def inspect(source: RbdSource, what: str) -> rbd_dest.ImageState | None:
        seen["source"] = source
        return seen["state"]  # type: ignore[no-any-return]

    monkeypatch.setattr(rbd_dest, "inspect", inspect)
    monkeypatch.setattr(original, "running_users", lambda conn, claim: seen["running"])
    monkeypatch.setattr(original, "learn_rbd_key", lambda conn, source: seen["keys"].append(source))
    return seen


HERE = object()  # the domain defined here with SOURCE at vdb


def find(rec: DiskRecord, defined: Any = HERE, force: bool = False) -> Any:
    mine = {"vdb": SOURCE} if defined is HERE else defined
    return original.find_rbd_original(claims_of(rec), None, mine, force)


@pytest.mark.parametrize(("rec", "words"), [
    pytest.param(record(pool="rbd/../x"), "no RBD pool and image names", id="bad-pool"),
    pytest.param(record(image=None), "no RBD pool and image names", id="no-image"),
    pytest.param(record(image_id="XYZ"), "no RBD image id", id="bad-id"),
    pytest.param(record(cluster_fsid="not-a-fsid"), "no RBD cluster_fsid", id="bad-fsid"),
    pytest.param(record(cluster_fsid=None), "no RBD cluster_fsid", id="no-fsid"),
    pytest.param(record(cluster_fsid=FSID + "\n"), "no RBD cluster_fsid", id="fsid-newline"),
    pytest.param(record(image_id=None), "no RBD image id", id="no-id"),
    pytest.param(record(image="vm-disk\n"), "no RBD pool and image names", id="name-newline"),
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
    found = find(record(), {"vdb": here, "vdc": None})
    assert cluster["source"] is here  # this host's monitors and secret, not the backup's
    assert cluster["keys"] == [here]
    assert (found.path, found.size, found.image_id) == ("rbd:rbd/vm-disk", 64 * MiB,
                                                        "10a3b2c4d5e6")
    assert found.rbd is here and found.iscsi is None and found.rdev is None
    assert found.matched_on == (f"RBD image id 10a3b2c4d5e6 of rbd/vm-disk in cluster {FSID} "
                                "(reached through the domain's definition on this host)")


def test_a_fsid_missing_from_the_mapping_is_refused_not_skipped() -> None:
    rec = record()
    assert rec.mapping is not None
    del rec.mapping.root.identity["cluster_fsid"]
    with pytest.raises(UsageError, match="no RBD cluster_fsid"):
        claims_of(rec)


# a backup of domain A edited so that vdb names image vm-b of the cluster this host's
# ceph.conf reaches (no monitors), as the admin, with another libvirt ceph secret of this host
FORGED = RbdSource(pool="rbd", image="vm-b", user="admin",
                   secret_uuid="0d5f0c4a-0000-4000-8000-00000000beef")


@pytest.mark.parametrize(("defined", "words"), [
    pytest.param(None, "vdb: the backed-up domain is not defined on this host", id="not-here"),
    pytest.param({"vdb": SOURCE}, "definition on this host has rbd:rbd/vm-disk at vdb, the "
                 "backup's disk was rbd:rbd/vm-b", id="another-image"),
    pytest.param({"vdb": None}, "has no RBD image at vdb", id="not-rbd"),
    pytest.param({"vdc": FORGED}, "has no such disk at vdb", id="at-another-target"),
    pytest.param({"vdb": replace(FORGED, namespace="ns")}, "has rbd:rbd/ns/vm-b at vdb",
                 id="another-namespace"),
    pytest.param({}, "has no such disk at vdb", id="no-disks"),
])
def test_an_image_the_definition_here_does_not_have_at_the_target_is_refused(
        cluster: dict[str, Any], defined: Any, words: str) -> None:
    forged = record(source=FORGED, image="vm-b")
    for force in (False, True):
        with pytest.raises(UsageError) as caught:
            find(forged, defined, force=force)
        message = str(caught.value)
        assert words in message and "\n" not in message, message
        assert message.endswith("restore it with --to rbd:rbd/vm-b?conf=PATH&id=USER")
    assert cluster["keys"] == [] and "source" not in cluster  # no secret read, no cluster asked


def test_the_backups_credentials_are_never_used(cluster: dict[str, Any]) -> None:
    here = RbdSource(pool="rbd", image="vm-b", user="libvirt",
                     secret_uuid="0d5f0c4a-0000-4000-8000-000000000001")
    cluster["state"] = rbd_dest.ImageState(64 * MiB, "10a3b2c4d5e6", FSID, [])
    found = find(record(source=FORGED, image="vm-b"), {"vdb": here})
    assert cluster["keys"] == [here] and cluster["source"] is here and found.rbd is here
    assert "00000000beef" not in repr(cluster["keys"]) + repr(found)


def test_without_a_libvirt_connection_nothing_is_defined_here() -> None:
    assert original.defined_rbd_disks(None, "0d5f0c4a-0000-4000-8000-000000000002") is None


class FakeConn:
    def __init__(self, xml: str | None) -> None:
        self.xml = xml

    def lookupByUUIDString(self, uuid: str) -> Any:  # noqa: N802 (libvirt's name)
        if self.xml is None:
            raise libvirt.libvirtError("Domain not found")
        return self

    def XMLDesc(self, flags: int) -> str:  # noqa: N802 (libvirt's name)
        assert flags == libvirt.VIR_DOMAIN_XML_INACTIVE and self.xml is not None
        return self.xml


def test_the_definition_gives_each_targets_rbd_image() -> None:
    xml = ("<domain type='kvm'><name>a</name><uuid>0d5f0c4a-0000-4000-8000-000000000002</uuid>"
           "<devices><disk type='network' device='disk'><driver name='qemu' type='raw'/>"
           "<source protocol='rbd' name='rbd/vm-a'><host name='127.0.0.1' port='6789'/>"
           "</source><target dev='vdb'/></disk>"
           "<disk type='network' device='disk'><driver name='qemu' type='raw'/>"
           "<source protocol='rbd' name='rbd/vm-a@snap'/><target dev='vdc'/></disk>"
           "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
           "<source file='/var/lib/a.qcow2'/><target dev='vda'/></disk></devices></domain>")
    uuid = "0d5f0c4a-0000-4000-8000-000000000002"
    disks = original.defined_rbd_disks(FakeConn(xml), uuid)  # type: ignore[arg-type]
    assert disks is not None and set(disks) == {"vda", "vdb", "vdc"}
    vdb = disks["vdb"]
    assert vdb is not None and (vdb.name, vdb.hosts) == ("rbd/vm-a", (("127.0.0.1", 6789),))
    assert disks["vda"] is None and disks["vdc"] is None  # not an image, a snapshot
    assert original.defined_rbd_disks(FakeConn(None), uuid) is None  # type: ignore[arg-type]


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


def test_to_an_image_without_conf_uses_the_definitions_cluster_not_the_backups(
        monkeypatch: pytest.MonkeyPatch) -> None:
    here = RbdSource(pool="rbd", image="vm-disk", hosts=(("127.0.0.1", 6789),), user="lab",
                     secret_usage="lab")
    # the backup edited to name another config file, monitors and libvirt secret
    edited = RbdSource(pool="rbd", image="vm-disk", hosts=(("192.0.2.66", 6789),),
                       user="admin", config_file="/tmp/evil.conf",
                       secret_uuid="0d5f0c4a-0000-4000-8000-0000000000ee")
    seen: list[str] = []

    def defined(conn: Any, uuid: str) -> dict[str, RbdSource | None]:
        seen.append(uuid)
        return {"vdb": here}

    monkeypatch.setattr(original, "defined_rbd_disks", defined)
    got = original.defined_cluster(None, "u-1", record(source=edited), "rbd:rbd/new")
    assert got == here and seen == ["u-1"]
    target = parse("rbd:rbd/new", got)
    assert (target.image, target.hosts, target.config_file, target.user, target.secret_usage,
            target.secret_uuid) == ("new", here.hosts, None, "lab", "lab", None)
    # naming the cluster, or a disk that was no RBD image: nothing taken from anywhere
    assert original.defined_cluster(None, "u-1", record(source=edited),
                                    "rbd:rbd/new?conf=/etc/ceph/ceph.conf&id=x") is None
    assert original.defined_cluster(None, "u-1", record(source=None), "rbd:rbd/new") is None


@pytest.mark.parametrize("defined", [None, {"vdb": None}, {}],
                         ids=["not-defined", "no-rbd-there", "no-such-disk"])
def test_to_an_image_without_conf_is_refused_without_the_definition(
        monkeypatch: pytest.MonkeyPatch, defined: Any) -> None:
    monkeypatch.setattr(original, "defined_rbd_disks", lambda conn, uuid: defined)
    with pytest.raises(UsageError, match=r"the backup's own are not taken\); name them: "
                       r"--to rbd:rbd/new\?conf=PATH&id=USER"):
        original.defined_cluster(None, "u-1", record(), "rbd:rbd/new")
    with pytest.raises(UsageError, match="malformed RBD destination"):
        original.defined_cluster(None, "u-1", record(), "rbd:rbd")
