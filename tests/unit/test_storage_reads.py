"""What QEMU opens to read a disk from its storage; an RBD key never in argv or logs."""

from __future__ import annotations

import base64
import logging

import pytest

from libvirt_rdm_backup.domain.disks import RawDisk, RbdSource, SourceKind
from libvirt_rdm_backup.engine.storage_reads import image_opts, storage_endpoint
from libvirt_rdm_backup.redact import carries_secret, qmp_arguments
from libvirt_rdm_backup.storage import rbd

KEY = b"0123456789abcdef"


@pytest.fixture(autouse=True)
def no_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    rbd.forget_keys()
    monkeypatch.delenv(rbd.KEYRING_ENV, raising=False)


def rbd_disk() -> RawDisk:
    source = RbdSource("rbd", "img", hosts=(("127.0.0.1", 6789),), user="u",
                       secret_uuid="2a5e3f4e-7d7b-4b8e-9d0a-4f1e0b6c1d22")
    return RawDisk("vdb", SourceKind.RBD, "disk", rbd=source)


def test_block_and_iscsi_sources_are_unchanged() -> None:
    block = storage_endpoint(RawDisk("vdb", SourceKind.BLOCK, "disk", source_path="/dev/x"), 4)
    assert block.node["file"] == {"driver": "host_device", "filename": "/dev/x",
                                  "locking": "off"}
    assert block.objects == () and block.node["size"] == 4


@pytest.mark.skipif(not rbd.HAVE_RBD, reason="python3-rbd is not installed")
def test_rbd_source_names_its_key_by_a_secret_object() -> None:
    disk = rbd_disk()
    assert disk.rbd is not None
    rbd.remember_key(disk.rbd, KEY)
    endpoint = storage_endpoint(disk, 1 << 20)
    [secret] = endpoint.objects
    assert secret["qom-type"] == "secret" and secret["format"] == "base64"
    assert secret["data"] == base64.b64encode(KEY).decode()
    file = endpoint.node["file"]
    assert file["driver"] == "rbd" and file["key-secret"] == secret["id"]
    assert endpoint.node["size"] == 1 << 20
    assert base64.b64encode(KEY).decode() not in str(endpoint.node)


def test_secret_data_is_never_logged(caplog: pytest.LogCaptureFixture) -> None:
    arguments = {"qom-type": "secret", "id": "s", "data": "QUJD", "format": "base64"}
    assert carries_secret("object-add", arguments)
    assert not carries_secret("blockdev-add", {"data": "x"})
    shown = qmp_arguments("object-add", arguments)
    assert shown["data"] == "***" and arguments["data"] == "QUJD"
    assert qmp_arguments("query-jobs", None) == ""
    with caplog.at_level(logging.DEBUG):
        logging.getLogger("t").debug("qsd> %s", shown)
    assert "QUJD" not in caplog.text


def test_image_opts_flatten_nested_options() -> None:
    opts = image_opts({"driver": "raw", "file": {
        "driver": "rbd", "pool": "p,q", "server": [{"host": "h", "port": "1"}],
        "auth-client-required": ["cephx"], "read-only": True}})
    assert opts == ["driver=raw", "file.driver=rbd", "file.pool=p,,q", "file.server.0.host=h",
                    "file.server.0.port=1", "file.auth-client-required.0=cephx",
                    "file.read-only=on"]
