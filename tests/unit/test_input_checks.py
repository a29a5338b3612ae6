"""Input checks: URI passwords redacted, malformed targets and disk names, restore targets
inside the repository, remote libvirt connections."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from libvirt_rdm_backup.cli import main
from libvirt_rdm_backup.domain.connection import is_remote
from libvirt_rdm_backup.domain.disks import DiskInventory, RawDisk, SourceKind
from libvirt_rdm_backup.engine.discover import select_disks
from libvirt_rdm_backup.engine.restore import open_target, read_only_device, restore
from libvirt_rdm_backup.engine.verify import verify
from libvirt_rdm_backup.errors import NotFoundError, UsageError
from libvirt_rdm_backup.redact import redact
from libvirt_rdm_backup.repository.store import Repository
from libvirt_rdm_backup.targets.uri import parse_target
from tests.unit.test_repository import UUID, publish_one


@pytest.mark.parametrize(("text", "shown"), [
    ("qemu+tcp://user:s3cret@host/system", "qemu+tcp://user:***@host/system"),
    ("qemu+ssh://root:p@ss@hv1:22/system?keyfile=/k", "qemu+ssh://root:***@hv1:22/system?keyfile=/k"),
    ("to 'nbd://u:x@127.0.0.1/e': refused", "to 'nbd://u:***@127.0.0.1/e': refused"),
    ("a qemu+tls://a:b@h/ and nbd://c:d@i/x", "a qemu+tls://a:***@h/ and nbd://c:***@i/x"),
    ("qemu+tcp://user@host/system", "qemu+tcp://user@host/system"),
    ("nbd://127.0.0.1:10809/x", "nbd://127.0.0.1:10809/x"),
    ("no scheme: user:password@host", "no scheme: user:password@host"),
    ("cannot open iscsi://alice%s3cr%40t@10.0.0.1/iqn.x/1", "cannot open iscsi://alice%***@10.0.0.1/iqn.x/1"),
])
def test_redact(text: str, shown: str) -> None:
    assert redact(text) == shown


@pytest.mark.parametrize(("target", "words"), [
    ("nbd://127.0.0.1:0/x", "malformed NBD address"),
    ("file:///var/tmp/x%00y", "malformed file target"),
    ("file:///var/tmp/x%0Ay", "malformed file target"),
    ("nbd+unix:///x?socket=/tmp/a%00b", "needs ?socket="),
])
def test_malformed_targets(target: str, words: str) -> None:
    with pytest.raises(UsageError, match=words.replace("?", r"\?")):
        parse_target(target)


def test_target_errors_show_no_password() -> None:
    with pytest.raises(UsageError) as caught:
        parse_target("nbd://user:s3cret@127.0.0.1/x")
    assert "s3cret" not in str(caught.value) and "user:***@" in str(caught.value)


def test_connection_errors_show_no_password(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["-c", "qemu+tcp://user:s3cret@127.0.0.1:1/system", "disks", "vm"]) == 4
    err = capsys.readouterr().err
    assert "s3cret" not in err and "user:***@127.0.0.1:1" in err and err.count("\n") == 1


def inventory() -> DiskInventory:
    found = DiskInventory(domain_name="vm", domain_uuid=UUID, running=True)
    found.raw.append(RawDisk(target="vdb", source_kind=SourceKind.BLOCK, device="disk",
                             source_path="/dev/loop9"))
    return found


@pytest.mark.parametrize("name", ["../vdb", "vd/b", "vdb;id", "$(id)", "", ".x", "a\nb"])
def test_malformed_disk_names_are_usage_errors(name: str) -> None:
    with pytest.raises(UsageError, match="malformed disk name"):
        select_disks(inventory(), [name])
    with pytest.raises(NotFoundError):
        select_disks(inventory(), ["vdz"])


class FakeConnection:
    def __init__(self, uri: str) -> None:
        self.uri = uri

    def getURI(self) -> str:  # noqa: N802 - libvirt's name
        return self.uri


@pytest.mark.parametrize(("uri", "remote"), [
    ("qemu:///system", False), ("qemu+unix:///system", False), ("qemu:///session", False),
    ("qemu+tcp://127.0.0.1/system", True), ("qemu+tcp:///system", True),
    ("qemu+ssh://root@hv1/system", True), ("qemu+tls://hv1/system", True),
])
def test_remote_connections(uri: str, remote: bool) -> None:
    assert is_remote(FakeConnection(uri)) is remote


def test_repository_holds_its_paths(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    manifest = publish_one(repo)
    data = Path(repo.data_file(manifest, manifest.disks[0]))
    assert repo.holds(str(data)) and repo.holds(str(data.parent / "manifest.json"))
    assert repo.holds(str(tmp_path / "repo" / "new.raw"))
    (tmp_path / "link").symlink_to(data)
    os.link(data, tmp_path / "hard")
    (tmp_path / "dirlink").symlink_to(tmp_path / "repo")
    assert repo.holds(str(tmp_path / "link")) and repo.holds(str(tmp_path / "hard"))
    assert repo.holds(str(tmp_path / "dirlink" / "new.raw"))
    (tmp_path / "other.raw").write_bytes(b"x")
    assert not repo.holds(str(tmp_path / "other.raw"))
    assert not repo.holds(str(tmp_path / "new.raw"))
    assert not repo.holds(str(tmp_path / "repo-sibling" / "x"))


def test_restore_refuses_targets_in_the_repository(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    manifest = publish_one(repo)
    data = Path(repo.data_file(manifest, manifest.disks[0]))
    before = data.read_bytes()
    for to in (data, data.parent / "manifest.json", tmp_path / "repo" / "out.raw"):
        with pytest.raises(UsageError, match="inside the backup repository"):
            restore(None, "vm", repo.root, "vdb", str(to), force=True)
    assert data.read_bytes() == before


def test_restore_checks_its_input_first(tmp_path: Path) -> None:
    repo = Repository.open(str(tmp_path / "repo"), create=True)
    publish_one(repo)
    with pytest.raises(UsageError, match="malformed disk name"):
        restore(None, "vm", repo.root, "../vdb", str(tmp_path / "out.raw"))
    with pytest.raises(UsageError, match="malformed backup id"):
        verify(repo.root, "no-such-vm", "../x")
    with pytest.raises(UsageError, match="path is empty"), open_target("", 1024, False, None):
        pass


def test_a_device_that_cannot_be_asked_is_a_bad_target(tmp_path: Path) -> None:
    with open(tmp_path / "file", "wb") as stream, pytest.raises(UsageError, match="cannot be used"):
        read_only_device(stream.fileno(), "file")  # not a block device: the ioctl fails
