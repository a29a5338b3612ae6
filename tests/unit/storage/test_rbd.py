"""RBD disks without a cluster: client configuration, credentials, the mapping tree.

The real cluster is exercised by tests/lab/test_rbd_disks.py.
"""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from libvirt_rdm_backup.domain.disks import RawDisk, RbdSource, SourceKind
from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.storage import map_disk, rbd
from libvirt_rdm_backup.storage.base import RawDiskMapping
from libvirt_rdm_backup.storage.rbd_mapping import RbdAgent

KEY = b"\x01\x02 not a real cephx key \xff"
UUID = "2a5e3f4e-7d7b-4b8e-9d0a-4f1e0b6c1d22"


def source(**fields: object) -> RbdSource:
    base: dict[str, object] = {"pool": "vms", "image": "vm-1", "user": "libvirt",
                               "hosts": (("192.0.2.1", 6789), ("2001:db8::2", None)),
                               "secret_uuid": UUID}
    base.update(fields)
    return RbdSource(**base)  # type: ignore[arg-type]


@pytest.fixture(autouse=True)
def no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    rbd.forget_keys()
    monkeypatch.delenv(rbd.KEYRING_ENV, raising=False)


def test_monitors_come_from_the_hosts_of_the_disk() -> None:
    assert rbd.monitor_hosts(source()) == "192.0.2.1:6789,[2001:db8::2]:6789"
    assert rbd.monitor_hosts(source(hosts=())) is None


def test_the_key_of_the_libvirt_secret_goes_to_librados_in_memory() -> None:
    rbd.remember_key(source(), KEY)
    conffile, conf = rbd.client_conf(source(secret_uuid=UUID.upper()), "disk vdb")
    assert conffile is None  # the disk names its monitors: no config file is read
    assert conf["key"] == base64.b64encode(KEY).decode()
    assert conf["mon_host"].startswith("192.0.2.1:6789") and "keyring" not in conf
    assert int(conf["client_mount_timeout"]) <= 60


def test_without_hosts_ceph_reads_its_own_config() -> None:
    rbd.remember_key(source(), KEY)
    assert rbd.client_conf(source(hosts=()), "disk vdb")[0] == ""
    assert rbd.client_conf(source(config_file="/etc/ceph/b.conf"), "d")[0] == "/etc/ceph/b.conf"


def test_a_hidden_secret_without_keyring_is_one_clear_line() -> None:
    with pytest.raises(StorageError) as err:
        rbd.client_conf(source(), "disk vdb")
    text = str(err.value)
    assert "disk vdb" in text and "client.libvirt" in text and rbd.KEYRING_ENV in text
    assert "\n" not in text


def test_a_keyring_file_must_be_private(tmp_path: Path,
                                        monkeypatch: pytest.MonkeyPatch) -> None:
    keyring = tmp_path / "ceph.client.libvirt.keyring"
    keyring.write_text("[client.libvirt]\n\tkey = AQB...\n")
    keyring.chmod(0o644)
    monkeypatch.setenv(rbd.KEYRING_ENV, str(keyring))
    with pytest.raises(StorageError, match="chmod 600"):
        rbd.client_conf(source(), "disk vdb")
    keyring.chmod(0o600)
    assert rbd.client_conf(source(), "disk vdb")[1]["keyring"] == str(keyring)
    monkeypatch.setenv(rbd.KEYRING_ENV, str(tmp_path / "missing"))
    with pytest.raises(StorageError, match="cannot use"):
        rbd.client_conf(source(), "disk vdb")


def test_no_auth_needs_no_key() -> None:
    conffile, conf = rbd.client_conf(source(secret_uuid=None, user=None), "disk vdb")
    assert "key" not in conf and "keyring" not in conf and conffile is None


def test_secret_by_usage_name() -> None:
    by_usage = source(secret_uuid=None, secret_usage="ceph client.libvirt")
    assert rbd.secret_ref(by_usage) == "usage:ceph client.libvirt"
    rbd.remember_key(by_usage, KEY)
    assert rbd.knows_key(by_usage) and not rbd.knows_key(source())


@pytest.mark.skipif(not rbd.HAVE_RBD, reason="python3-rbd is not installed")
def test_feature_names() -> None:
    assert rbd.feature_names(1 | 4 | 8 | 16 | 32) == [
        "layering", "exclusive-lock", "object-map", "fast-diff", "deep-flatten"]
    assert rbd.feature_names(1 << 40) == ["bit-40"]


def test_missing_bindings_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rbd, "HAVE_RBD", False)
    disk = RawDisk("vdb", SourceKind.RBD, "disk", rbd=source())
    with pytest.raises(StorageError) as err:
        map_disk(disk)
    assert "disk vdb" in str(err.value) and "python3-rbd" in str(err.value)


FACTS = rbd.ImageFacts(
    cluster_fsid="5871ab55-954b-4ee5-9ab9-5ba8e4b32453",
    monitors=["v2:192.0.2.1:3300,v1:192.0.2.1:6789"], pool="vms", pool_id=3, namespace=None,
    image="vm-1", image_id="10336af8be50", size=10 * 4194304 + 512, object_size=4194304,
    order=22, features=["layering", "exclusive-lock"], features_mask=5,
    block_name_prefix="rbd_data.10336af8be50", data_pool_id=3, stripe_unit=4194304,
    stripe_count=1)


def test_mapping_of_an_rbd_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[RbdSource] = []

    def facts(src: RbdSource, what: str) -> rbd.ImageFacts:
        seen.append(src)
        return FACTS

    monkeypatch.setattr(rbd, "image_facts", facts)
    disk = RawDisk("vdb", SourceKind.RBD, "disk", rbd=source())
    assert RbdAgent().can_map(disk)
    assert not RbdAgent().can_map(RawDisk("vdc", SourceKind.BLOCK, "disk", source_path="/dev/x"))
    mapping = map_disk(disk)
    assert seen == [source()] and mapping.agent == "rbd"
    doc = json.loads(json.dumps(mapping.to_dict()))
    root = doc["storage"]
    assert (root["kind"], root["name"], root["path"], root["size"]) == (
        "rbd-image", "vms/vm-1", "rbd:vms/vm-1", FACTS.size)
    ident = root["identity"]
    assert (ident["cluster_fsid"], ident["pool_id"], ident["image_id"], ident["object_size"],
            ident["block_name_prefix"]) == (FACTS.cluster_fsid, 3, "10336af8be50", 4194304,
                                            "rbd_data.10336af8be50")
    objects = root["extents"][0]["target"]
    assert objects["kind"] == "rados-objects" and objects["identity"]["objects"] == 11
    assert objects["identity"]["object_prefix"] == "rbd_data.10336af8be50"
    assert doc["identifiers"]["source_kind"] == "rbd"
    assert RawDiskMapping.from_dict(doc).to_dict() == doc


def test_no_key_in_a_mapping_or_a_disk(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rbd, "image_facts", lambda src, what: FACTS)
    rbd.remember_key(source(), KEY)
    disk = RawDisk("vdb", SourceKind.RBD, "disk", rbd=source())
    text = json.dumps([map_disk(disk).to_dict(), disk.to_dict()])
    assert base64.b64encode(KEY).decode() not in text and UUID in text
    assert os.environ.get(rbd.KEYRING_ENV) is None


def test_keyring_key_of_the_user(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    keyring = tmp_path / "k"
    keyring.write_text("[client.admin]\n\tkey = AAAA\n[client.libvirt]\n"
                       "\tcaps mon = \"profile rbd\"\n\tkey = BBBB==\n")
    keyring.chmod(0o600)
    assert rbd.keyring_key(str(keyring), "libvirt") == "BBBB=="
    with pytest.raises(StorageError, match="no key of client.nobody"):
        rbd.keyring_key(str(keyring), "nobody")
    monkeypatch.setenv(rbd.KEYRING_ENV, str(keyring))
    assert rbd.cephx_key(source(), "disk vdb") == "BBBB=="
    rbd.remember_key(source(), KEY)  # the libvirt secret wins
    assert rbd.cephx_key(source(), "disk vdb") == base64.b64encode(KEY).decode()


@pytest.mark.parametrize("value", ["AQB secret", "AQBé==", "AQB;mon_host=x", ""])
def test_a_keyring_key_that_is_not_base64_is_refused_unrepeated(tmp_path: Path,
                                                                  value: str) -> None:
    keyring = tmp_path / "k"
    keyring.write_text(f"[client.libvirt]\n\tkey = {value}\n", encoding="utf-8")
    keyring.chmod(0o600)
    with pytest.raises(StorageError, match="key of client.libvirt in .* is not base64") as err:
        rbd.keyring_key(str(keyring), "libvirt")
    assert "AQB" not in str(err.value)


def test_cephx_key_without_any() -> None:
    assert rbd.cephx_key(source(secret_uuid=None), "disk vdb") is None  # Ceph's own config
    with pytest.raises(StorageError, match="no cephx key"):
        rbd.cephx_key(source(), "disk vdb")


def test_qemu_blockdev_of_a_source() -> None:
    node = rbd.qemu_blockdev(source(namespace="ns", snapshot="s1"), "sec0")
    assert node == {"driver": "rbd", "pool": "vms", "image": "vm-1", "namespace": "ns",
                    "snapshot": "s1", "user": "libvirt",
                    "server": [{"host": "192.0.2.1", "port": "6789"},
                               {"host": "2001:db8::2", "port": "6789"}],
                    "key-secret": "sec0", "auth-client-required": ["cephx"]}
    plain = rbd.qemu_blockdev(source(hosts=(), user=None, config_file="/etc/c.conf"), None)
    assert plain == {"driver": "rbd", "pool": "vms", "image": "vm-1", "conf": "/etc/c.conf"}


class _TimedOut(Exception):
    pass


class _FakeRados:
    """Stands in for the rados module: every connection times out, and is counted."""

    Error = Exception
    TimedOut = _TimedOut
    connects = 0

    class Rados:
        def __init__(self, **_kwargs: object) -> None:
            pass

        def connect(self, timeout: int = 0) -> None:
            _FakeRados.connects += 1
            raise _TimedOut("[errno 110] RADOS timed out (error connecting to the cluster)")

        def shutdown(self) -> None:
            pass


def test_an_unreachable_cluster_is_asked_once(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(rbd, "HAVE_RBD", True)
    monkeypatch.setattr(rbd, "rados", _FakeRados)
    monkeypatch.setattr(rbd, "_UNREACHABLE", {})
    quiet = source(secret_uuid=None)
    for _ in range(3):
        with pytest.raises(StorageError, match="cannot connect to the Ceph cluster: _TimedOut"):
            with rbd.cluster(quiet, "disk vdb"):
                pass
    assert _FakeRados.connects == 1
    monkeypatch.setattr(rbd, "UNREACHABLE_MEMORY", 0.0)
    with pytest.raises(StorageError):
        with rbd.cluster(quiet, "disk vdb"):
            pass
    assert _FakeRados.connects == 2
