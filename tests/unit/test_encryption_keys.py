"""Keys of encrypted layers: read from a file, never shown, handed to QEMU by path or
descriptor; the repository's key id record; the header check of LUKS layers."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any, cast

import pytest

from libvirt_rdm_backup.engine.plan import DiskPlan
from libvirt_rdm_backup.engine.sinks import Sink, create_layers
from libvirt_rdm_backup.errors import RepositoryError, UsageError
from libvirt_rdm_backup.modes import Compression
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.qemu.layer_format import LayerFormat
from libvirt_rdm_backup.qemu.secrets import (
    SECRET_ID,
    LayerKey,
    active_secret,
    guest_secret,
    key_file,
    secret_definition,
)
from libvirt_rdm_backup.repository.encryption import (
    RECORD,
    check_key,
    new_record,
    read_record,
    write_record,
)
from tests.unit.fake_monitor import FakeMonitor

REPO = Path(__file__).resolve().parents[2]
SECRET = b"correct horse battery staple 7f3a\n"


def test_a_key_is_never_shown(tmp_path: Path) -> None:
    path = tmp_path / "key"
    path.write_bytes(SECRET)
    key = LayerKey.from_file(str(path))
    assert "horse" not in repr(key) and "horse" not in str(key)
    salt = os.urandom(16)
    assert key.key_id(salt) == LayerKey(SECRET).key_id(salt) != key.key_id(os.urandom(16))
    assert len(key.key_id(salt)) == 64 and "horse" not in key.key_id(salt)


@pytest.mark.parametrize(("content", "message"), [
    (b"", "is empty"), (b"\xff\xfe binary", "UTF-8 text"), (b"a\0b", "UTF-8 text"),
    (b"x" * 5000, "more than 4096 bytes"),
])
def test_bad_key_files_are_refused_in_one_line(tmp_path: Path, content: bytes,
                                               message: str) -> None:
    path = tmp_path / "key"
    path.write_bytes(content)
    with pytest.raises(UsageError, match=message) as caught:
        LayerKey.from_file(str(path))
    assert "\n" not in str(caught.value)
    with pytest.raises(UsageError, match="cannot read the encryption key file"):
        LayerKey.from_file(str(tmp_path / "missing"))


def test_the_key_file_of_a_command_is_private_and_removed(tmp_path: Path) -> None:
    assert active_secret() is None
    shm = _key_entries()
    with key_file(LayerKey(SECRET)) as path:
        fd = int(path.rsplit("/", 1)[1])
        assert path == f"/proc/{os.getpid()}/fd/{fd}"
        assert Path(path).read_bytes() == SECRET  # what a QEMU this tool starts reads
        assert os.readlink(path).startswith("/memfd:rdmb-key")  # named by no directory
        assert stat.S_IMODE(os.fstat(fd).st_mode) == 0o400
        assert os.get_inheritable(fd) is False
        assert active_secret() == {"qom-type": "secret", "id": SECRET_ID, "format": "raw",
                                   "file": path}
        assert "horse" not in secret_definition(path)
        # a QEMU tool started meanwhile reads the key by that path (the LUKS header opens)
        image = str(tmp_path / "k.luks")
        for _attempt in range(10):  # QEMU's key-derivation benchmark may measure 0 ms
            proc = subprocess.run(
                ["qemu-img", "create", "--object", secret_definition(path), "-q", "-f", "luks",
                 "-o", f"key-secret={SECRET_ID},iter-time=10", image, "1M"],
                capture_output=True, text=True, check=False)
            if "accurate CPU usage" not in proc.stderr:
                break
        assert proc.returncode == 0, proc.stderr
        opened = subprocess.run(
            ["qemu-img", "info", "--object", secret_definition(path), "--image-opts",
             f"driver=luks,key-secret={SECRET_ID},file.filename={image}"],
            capture_output=True, text=True, check=False)
        assert opened.returncode == 0, opened.stderr
    with pytest.raises(OSError):
        os.fstat(fd)  # closed: the kernel frees the file with its last descriptor
    assert active_secret() is None
    assert _key_entries() - shm == set()  # nothing left in the memory file system


def test_a_killed_command_leaves_no_key_anywhere() -> None:
    """SIGKILL inside the block: no file is left that holds the key."""
    script = ("import sys, time\n"
              "from libvirt_rdm_backup.qemu.secrets import LayerKey, key_file\n"
              "with key_file(LayerKey(sys.stdin.buffer.read())) as path:\n"
              "    print(path, flush=True)\n"
              "    time.sleep(60)\n")
    before = _key_entries()
    child = subprocess.Popen([sys.executable, "-c", script], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, cwd=str(REPO))
    assert child.stdin is not None and child.stdout is not None
    child.stdin.write(SECRET)
    child.stdin.close()
    path = child.stdout.readline().decode().strip()
    try:
        assert Path(path).read_bytes() == SECRET
    finally:
        child.kill()
        child.wait()
    assert not os.path.exists(path)
    assert _key_entries() - before == set()


def _key_entries() -> set[str]:
    """Entries of the memory file system a key file of this tool could be (none now)."""
    root = Path("/dev/shm")
    return {p.name for p in root.iterdir() if p.name.startswith("rdmb-key")} \
        if root.is_dir() else set()

def test_the_guest_qemu_gets_the_key_by_descriptor_never_in_a_message() -> None:
    monitor = FakeMonitor()
    monitor.on("add-fd", {"fdset-id": 3, "fd": 41})
    with guest_secret(monitor, LayerKey(SECRET), "rdmb-key-vdb-abc123") as secret_id:
        assert secret_id == "rdmb-key-vdb-abc123"
    assert [c.command for c in monitor.calls] == ["add-fd", "object-add", "remove-fd",
                                                  "object-del"]
    assert monitor.calls[0].files == 1
    assert monitor.arguments("object-add") == [{
        "qom-type": "secret", "id": "rdmb-key-vdb-abc123", "format": "raw",
        "file": "/proc/self/fd/41"}]
    assert "horse" not in repr([c.arguments for c in monitor.calls])


def test_the_repository_record_names_the_key_without_telling_it(tmp_path: Path) -> None:
    key, other = LayerKey(SECRET), LayerKey(b"another key")
    root = str(tmp_path)
    assert read_record(root) is None
    check_key(None, None, "repository R")  # nothing encrypted yet: anything goes
    record = new_record(key.key_id)
    write_record(root, record)
    assert read_record(root) == record
    assert "horse" not in (tmp_path / RECORD).read_text()
    check_key(record, key.key_id, "repository R")
    with pytest.raises(UsageError, match="give --encrypt-key-file"):
        check_key(record, None, "repository R")
    with pytest.raises(UsageError, match="is not the key of repository R"):
        check_key(record, other.key_id, "repository R")
    with pytest.raises(RepositoryError, match="changed during the backup"):
        write_record(root, new_record(other.key_id))
    (tmp_path / RECORD).write_text('{"format": "libvirt-rdm-backup/encryption"}')
    with pytest.raises(RepositoryError, match="not an encryption record"):
        read_record(root)


def test_compressed_encrypted_layers_are_refused() -> None:
    with pytest.raises(UsageError, match="stores the compressed clusters .* unencrypted"):
        LayerFormat(Compression.ZSTD, key_id="ab" * 32)
    options = LayerFormat(key_id="ab" * 32).create_options()
    assert options["encrypt.format"] == "luks" and options["encrypt.key-secret"] == SECRET_ID


def test_luks_layers_pass_the_header_check_only_where_recorded(tmp_path: Path) -> None:
    luks, plain = tmp_path / "luks.qcow2", tmp_path / "plain.qcow2"
    with key_file(LayerKey(SECRET)) as path, img.objects(secret_definition(path)):
        img.create(str(luks), "qcow2", 1 << 20,
                   options=LayerFormat(key_id="ab" * 32).create_options())
    img.create(str(plain), "qcow2", 1 << 20)
    assert layers.file_problem(str(luks), None, 1 << 20, encrypted=True) is None
    assert layers.file_problem(str(luks), None, 1 << 20) == "is encrypted"
    assert layers.file_problem(str(plain), None, 1 << 20, encrypted=True) == "is not encrypted"
    assert layers.is_encrypted(str(luks)) and not layers.is_encrypted(str(plain))
    assert layers.file_chain([str(luks)])["encrypt"] == {"format": "luks",
                                                        "key-secret": SECRET_ID}
    assert SECRET not in luks.read_bytes()


def test_encrypted_layers_are_created_side_by_side_with_the_key() -> None:
    # several encrypted layers of one backup are created at once, each creation seeing the
    # key's secret object of the command (QEMU's LUKS setup takes seconds of CPU each)
    both = threading.Barrier(2, timeout=10)  # broken if the two never run at once
    seen: list[dict[str, Any] | None] = []

    class Sink2:
        layer_format = LayerFormat(key_id="k")

        def create(self, plan: DiskPlan) -> None:
            seen.append(active_secret())
            both.wait()

    with key_file(LayerKey(b"key\n")) as path:
        create_layers(cast(Sink, Sink2()), [cast(DiskPlan, "vdb"), cast(DiskPlan, "vdc")])
    assert seen == [{"qom-type": "secret", "id": SECRET_ID, "format": "raw", "file": path}] * 2
