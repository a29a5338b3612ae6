"""LUNs of tgt's rbd backing store: what tgtadm reports (captured from tgt 1.0.85), the
checks on it, the client options, the mapping, and which snapshot agent takes such a LUN."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk, RbdSource, SourceKind
from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.storage import iscsi, libiscsi, rbd_snapshots, tgt, tgt_rbd
from libvirt_rdm_backup.storage import rbd as ceph
from libvirt_rdm_backup.storage.base import StorageNode
from libvirt_rdm_backup.storage.iscsi import IscsiAgent
from libvirt_rdm_backup.storage.rbd_snapshots import RbdSnapshotAgent
from libvirt_rdm_backup.storage.snapshot_agents import holds_writes
from tests.unit.storage.test_iscsi_tgt import IQN, FakeTools

FIXTURE = Path(__file__).parent / "fixtures" / "tgtadm-show-target-rbd.txt"
RBD_IQN = "iqn.2026-11.org.rdmb:rdmb-lun-on-rbd"


def targets(iqn: str = RBD_IQN) -> list[tgt.TgtTarget]:
    return tgt.parse_show_target(FIXTURE.read_text().replace(RBD_IQN, iqn))


def lun_disk(host: str = "127.0.0.1", iqn: str = RBD_IQN) -> RawDisk:
    return RawDisk("sda", SourceKind.ISCSI, "lun", iscsi=IscsiSource(host, 3260, iqn, 1),
                   size=64 << 20)


@pytest.fixture
def tgtd(monkeypatch: pytest.MonkeyPatch) -> None:
    """tgtadm answers with the captured rbd LUN; no client options in the environment."""
    monkeypatch.setattr(tgt, "tgtadm_available", lambda: True)
    monkeypatch.setattr(tgt, "show_targets", lambda timeout=0: targets())
    monkeypatch.delenv(tgt_rbd.BSOPTS_ENV, raising=False)


def test_tgtadm_reports_the_rbd_backing_store() -> None:
    [target] = targets()
    lun = target.lun(1)
    assert lun is not None and lun.backing_store_type == "rbd"
    assert lun.backing_store_path == "rbd/rdmb-lun-on-rbd"
    assert target.lun(0) is not None and target.lun(0).backing_store_path is None  # type: ignore[union-attr]


@pytest.mark.parametrize("path, expected", [
    ("rbd/img", ("rbd", "img", None)),
    ("img", ("rbd", "img", None)),  # tgt: no pool means pool rbd
    ("fast_pool/vm-1.disk0@gold", ("fast_pool", "vm-1.disk0", "gold")),
])
def test_image_path(path: str, expected: tuple[str, str, str | None]) -> None:
    assert tgt_rbd.parse_image_path(path) == expected


@pytest.mark.parametrize("path", ["pool/", "/img", "pool/ns/img", "pool/a b", "pool/img@",
                                  "pool/-x", "p\nq/img", "pool/" + "x" * 200, "pool/img\n",
                                  "pool\n/img", "pool/img@s\n"])
def test_odd_image_paths_are_refused(path: str) -> None:
    with pytest.raises(StorageError, match="not one this tool accepts"):
        tgt_rbd.parse_image_path(path)


def test_bsopts() -> None:
    assert tgt_rbd.parse_bsopts("") == {}
    assert tgt_rbd.parse_bsopts("conf=/etc/ceph/ceph.conf;id=tgt") == {
        "conf": "/etc/ceph/ceph.conf", "id": "tgt"}
    assert tgt_rbd.parse_bsopts("cluster=ceph;") == {"cluster": "ceph"}
    assert tgt_rbd.parse_bsopts("cluster=b;conf=/etc/ceph/b.conf")["conf"] == "/etc/ceph/b.conf"


@pytest.mark.parametrize("text, message", [
    ("cephx_key=AQBsecretsecretsecret==", "cephx_key= is not taken here"),
    ("virsecretuuid=0a1b", "virsecretuuid= is not taken here"),
    ("conf=ceph.conf", "absolute path"),
    ("id=a b", "not a cephx user name"),
    ("pool=x", "expected conf=PATH;id=USER"),
    ("id=a;id=b", "expected conf=PATH;id=USER"),
    ("conf", "expected conf=PATH;id=USER"),
    ("cluster=backup", "name its conf= instead"),
    ("cluster=AQBsecretsecretsecret==", "name its conf= instead"),
    ("conf=/etc/ceph/ceph.conf;AQBsecretsecretsecret==", r"expected conf=PATH;id=USER$"),
    ("AQBsecretsecretsecret", r"expected conf=PATH;id=USER$"),
    ("key=AQBsecretsecretsecret==", "expected conf=PATH;id=USER, not 'key'"),
])
def test_bad_bsopts_are_one_line_without_values(text: str, message: str) -> None:
    with pytest.raises(StorageError, match=message) as caught:
        tgt_rbd.parse_bsopts(text)
    assert "AQB" not in str(caught.value) and "\n" not in str(caught.value)


def test_image_source_takes_the_client_options_from_the_environment(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(tgt_rbd.BSOPTS_ENV, "conf=/etc/ceph/lab.conf;id=tgt")
    assert tgt_rbd.image_source("rbd/img") == RbdSource(
        pool="rbd", image="img", user="tgt", config_file="/etc/ceph/lab.conf")
    monkeypatch.delenv(tgt_rbd.BSOPTS_ENV)
    assert tgt_rbd.image_source("img") == RbdSource(pool="rbd", image="img")


@pytest.mark.usefixtures("tgtd")
def test_which_luns_are_on_rbd() -> None:
    assert tgt_rbd.rbd_lun(lun_disk().iscsi) is not None
    assert tgt_rbd.disk_image(lun_disk()) == RbdSource(pool="rbd", image="rdmb-lun-on-rbd")
    assert tgt_rbd.rbd_lun(lun_disk(host="192.0.2.7").iscsi) is None  # not the local tgtd
    assert tgt_rbd.rbd_lun(lun_disk(iqn="iqn.2026-11.org.rdmb:other").iscsi) is None
    assert tgt_rbd.rbd_lun(IscsiSource("127.0.0.1", 3260, RBD_IQN, 0)) is None  # controller
    assert tgt_rbd.rbd_lun(None) is None


class FakeHandle:
    def get_instance_id(self) -> int:
        return 7


class FakeImage:
    def __init__(self, size: int, watchers: list[int], addr: str = "127.0.0.1:0/1") -> None:
        self._size, self.watchers, self.addr = size, watchers, addr

    def size(self) -> int:
        return self._size

    def watchers_list(self) -> list[dict[str, Any]]:
        return [{"addr": self.addr, "id": w, "cookie": 1} for w in self.watchers]


def test_the_image_must_be_the_one_tgtd_holds_open() -> None:
    assert tgt_rbd.served_problem(FakeHandle(), FakeImage(64, [7, 9]), 64) is None
    assert tgt_rbd.served_problem(FakeHandle(), FakeImage(64, [9]), None) is None
    assert "no other client" in str(tgt_rbd.served_problem(FakeHandle(), FakeImage(64, [7]), 64))
    assert "has 32 bytes, the LUN 64" in str(
        tgt_rbd.served_problem(FakeHandle(), FakeImage(32, [7, 9]), 64))


def test_the_client_holding_the_image_must_be_on_this_host(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Another cluster's image of the same name and size, open on other hosts only (where
    RDM_BACKUP_TGT_RBD names another cluster than tgtd's), is not the LUN's."""
    monkeypatch.setattr(tgt_rbd, "local_addresses", lambda: {"127.0.0.1", "::1", "192.0.2.2",
                                                             "fd00::2"})
    for addr in ("v1:192.0.2.2:0/3664367506", "192.0.2.2:0/1", "[fd00:0::2]:0/5",
                 "v2:[::1]:0/9"):
        assert tgt_rbd.served_problem(FakeHandle(), FakeImage(64, [9], addr), 64) is None, addr
    problem = tgt_rbd.served_problem(FakeHandle(), FakeImage(64, [9], "198.51.100.7:0/1"), 64)
    assert problem is not None and "no client on this host has the image open, only " \
        "198.51.100.7:0/1" in problem and tgt_rbd.BSOPTS_ENV in problem
    assert "no client on this host" in str(
        tgt_rbd.served_problem(FakeHandle(), FakeImage(64, [9], "garbage"), 64))


def test_local_addresses_hold_loopback_and_this_hosts() -> None:
    found = tgt_rbd.local_addresses()
    assert {"127.0.0.1", "::1"} <= found and all(isinstance(a, str) for a in found)


def _mapped(monkeypatch: pytest.MonkeyPatch) -> StorageNode:
    monkeypatch.setattr(libiscsi, "load", lambda: None)
    monkeypatch.setattr(iscsi, "run", FakeTools())
    monkeypatch.setattr(tgt, "show_targets", lambda timeout=0: targets(IQN))
    node = IscsiAgent().map(lun_disk(iqn=IQN))
    assert node.identity["tgt"]["backing_store_type"] == "rbd"
    [extent] = node.extents
    assert (extent.start, extent.length, extent.offset) == (0, 64 << 20, 0)
    return extent.target


@pytest.mark.usefixtures("tgtd")
def test_mapping_follows_the_lun_to_its_image(monkeypatch: pytest.MonkeyPatch) -> None:
    asked: list[RbdSource] = []

    def image_node(source: RbdSource, what: str) -> StorageNode:
        asked.append(source)
        return StorageNode("rbd-image", source.name, source.url, 64 << 20,
                           {"cluster_fsid": "f00", "image_id": "abc"})

    monkeypatch.setattr(tgt_rbd, "image_node", image_node)
    monkeypatch.setenv(tgt_rbd.BSOPTS_ENV, "conf=/etc/ceph/lab.conf;id=tgt")
    image = _mapped(monkeypatch)
    assert asked == [RbdSource(pool="rbd", image="rdmb-lun-on-rbd", user="tgt",
                               config_file="/etc/ceph/lab.conf")]
    assert (image.kind, image.name) == ("rbd-image", "rbd/rdmb-lun-on-rbd")
    assert image.identity == {"cluster_fsid": "f00", "image_id": "abc",
                              "tgt_path": "rbd/rdmb-lun-on-rbd"}


@pytest.mark.usefixtures("tgtd")
def test_mapping_says_why_the_cluster_was_not_asked(monkeypatch: pytest.MonkeyPatch) -> None:
    def image_node(source: RbdSource, what: str) -> StorageNode:
        raise StorageError(f"{what}: cannot connect to the Ceph cluster: TimedOut")

    monkeypatch.setattr(tgt_rbd, "image_node", image_node)
    image = _mapped(monkeypatch)
    assert image.identity["pool"] == "rbd" and image.identity["image"] == "rdmb-lun-on-rbd"
    assert "cannot connect" in image.identity["error"]
    monkeypatch.setenv(tgt_rbd.BSOPTS_ENV, "cephx_key=AQBx")
    image = _mapped(monkeypatch)
    assert "cephx_key= is not taken" in image.identity["error"]


@pytest.mark.usefixtures("tgtd")
def test_snapshot_agent_takes_only_luns_on_rbd(monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture) -> None:
    agent = RbdSnapshotAgent()
    monkeypatch.setattr(tgt, "show_targets", lambda timeout=0: [])
    assert not agent.can_snapshot(lun_disk())  # tgtd has no such LUN: no word about it
    monkeypatch.setattr(tgt, "show_targets", lambda timeout=0: targets())

    def unusable(*_args: Any, **_kwargs: Any) -> Any:
        raise StorageError("disk sda: cannot connect to the Ceph cluster: PermissionError")

    monkeypatch.setattr(ceph, "open_image", unusable)
    rbd_snapshots._WARNED.clear()
    with caplog.at_level(logging.WARNING):
        assert not agent.can_snapshot(lun_disk())
        assert not agent.can_snapshot(lun_disk())
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings == ["disk sda is a LUN on Ceph RBD but gets no RBD snapshots (it is copied "
                        "from storage instead): disk sda: cannot connect to the Ceph cluster: "
                        "PermissionError"]
    assert not agent.holds_writes(lun_disk())  # unknown: the guest is held


def test_an_rbd_disk_holds_its_writes() -> None:
    disk = RawDisk("vdb", SourceKind.RBD, "disk", rbd=RbdSource(pool="rbd", image="img"))
    assert holds_writes("rbd", disk)
    assert not holds_writes("tgt-reflink", lun_disk())
