"""``rekey`` of an NBD volume served by ``rdm-backup receive``, on the real lab.

An encrypted full and an encrypted incremental of a raw disk go into a volume with one key
(once for the module; each test serves a copy of the volume file). ``rekey``
gives every layer another through NBD: the records name the new key, both points
restore byte-identical with it and are refused with the old one (exit 2); no process's
argv held either key, nor does the volume file. A second test kills ``rekey`` (SIGKILL)
mid-way (one layer has both keys, QEMU is giving the other its new one): other commands
refuse the volume meanwhile, a rekey with other keys is refused, ``rekey`` again
finishes, and every point restores with the new key. A third serves the volume over TLS:
``rekey`` needs ``--tls-creds`` there, and QEMU reaches the layers through it.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.errors import OperationError, UsageError
from libvirt_rdm_backup.qemu import layers
from libvirt_rdm_backup.qemu.secrets import LayerKey
from libvirt_rdm_backup.targets.volume_format import SLOT, Superblock
from tests.e2e.test_encrypted_layers import files_holding, fill_text
from tests.e2e.test_prune import _kill_when
from tests.e2e.test_prune_dry_run import EXE
from tests.e2e.test_rekey import (
    RBD_TARGET,
    _keys,
    _restores,
    _two_points,
    rekey_keeping_keys_hidden,
)
from tests.lab.tls import make_certificates
from tests.lab.volume_server import VolumeServer
from tools.labkit import LabVM, MiB, lab_vm, rdm_backup, rdmb_tmpdir, same_bytes

pytestmark = pytest.mark.lab

VOLUME_SIZE = 1 << 30
Made = list[tuple[str, dict[str, Path]]]


@dataclass
class Points:
    """The module's VM, its two points in a volume file (not served) and their keys."""

    vm: LabVM
    volume: Path
    made: Made
    old: Path
    new: Path
    old_secret: bytes
    new_secret: bytes

    @contextmanager
    def served(self, tls_dir: Path | None = None) -> Iterator[tuple[Path, VolumeServer]]:
        """A copy of the volume file, served for the block (over TLS with ``tls_dir``)."""
        with rdmb_tmpdir() as work:
            copy = work / "volume.img"
            subprocess.run(["cp", "--sparse=always", str(self.volume), str(copy)], check=True)
            with _served(copy, tls_dir) as server:
                yield copy, server


@pytest.fixture(scope="module")
def points() -> Iterator[Points]:
    with lab_vm(loop_size=32 * MiB, lun_size=16 * MiB) as vm, rdmb_tmpdir() as work:
        fill_text(vm.loop, 8 * MiB)
        old, new, old_secret, new_secret = _keys(vm.workdir)
        volume = work / "volume.img"
        with _served(volume) as server:
            made = _two_points(vm, server.uri, old, disks=["vdb"])
        yield Points(vm, volume, made, old, new, old_secret, new_secret)


@contextmanager
def _served(path: Path, tls_dir: Path | None = None) -> Iterator[VolumeServer]:
    server = VolumeServer(path, size=VOLUME_SIZE, tls_dir=tls_dir)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _table(path: Path) -> Superblock | None:
    """The newest table of contents in a volume file (None: none readable yet)."""
    found = []
    with open(path, "rb") as stream:
        for offset in (0, SLOT):
            stream.seek(offset)
            block = Superblock.from_bytes(stream.read(SLOT))
            if block is not None:
                found.append(block)
    return max(found, key=lambda s: s.generation) if found else None


def _key_ids(uri: str) -> set[str]:
    return {str(r.encryption["key_id"]) for m in api.list_backups(uri)
            for r in m.disks if r.encryption}


def test_rekey_gives_every_layer_of_a_volume_the_new_key(points: Points) -> None:
    vm, old, new = points.vm, points.old, points.new
    old_secret, new_secret = points.old_secret, points.new_secret
    with points.served() as (volume, server):
        uri = server.uri
        salt = {str(r.encryption["salt"]) for m in api.list_backups(uri)
                for r in m.disks if r.encryption}
        assert len(salt) == 1
        new_id = LayerKey.from_file(str(new)).key_id(bytes.fromhex(salt.pop()))
        before = _key_ids(uri)
        refused = rdm_backup("rekey", "--target", uri, "--encrypt-key-file", str(new),
                             "--new-key-file", str(old))
        assert refused.returncode == 2, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        with pytest.raises(UsageError):
            api.rekey(RBD_TARGET, str(old), str(new))
        assert _key_ids(uri) == before  # nothing changed

        result = rekey_keeping_keys_hidden(uri, old, new, old_secret, new_secret)
        assert (result["layers"], result["backups"], result["resumed"]) == (2, 2, False)
        assert result["key_id"] == new_id
        assert _key_ids(uri) == {new_id}
        table = _table(volume)
        assert table is not None and table.rekey is None and table.lease is None

        _restores(vm, uri, new, points.made)
        out = vm.workdir / "refused.raw"
        refused = rdm_backup("restore", vm.name, "--target", uri, "--disk", "vdb", "--to",
                             str(out), "--encrypt-key-file", str(old))
        assert refused.returncode == 2, refused.stderr
        assert not out.exists()
        assert api.verify(uri).ok  # the records name the layers' new digests
        server.stop()
        assert files_holding(str(volume.parent), old_secret) == []
        assert files_holding(str(volume.parent), new_secret) == []


def test_rekey_of_a_volume_over_tls(points: Points) -> None:
    with rdmb_tmpdir() as certs:
        server_dir, client_dir = make_certificates(certs)
        with points.served(server_dir) as (_volume, server):
            uri = server.uri
            assert uri.startswith("nbds://")
            refused = rdm_backup("rekey", "--target", uri, "--encrypt-key-file",
                                 str(points.old), "--new-key-file", str(points.new))
            assert refused.returncode == 2 and "--tls-creds" in refused.stderr
            done = rdm_backup("rekey", "--target", uri, "--encrypt-key-file",
                              str(points.old), "--new-key-file", str(points.new),
                              "--tls-creds", str(client_dir), "--json")
            assert done.returncode == 0, done.stderr
            assert json.loads(done.stdout)["layers"] == 2
            backup_id, refs = points.made[-1]
            out = points.vm.workdir / "tls-out.raw"
            api.restore(points.vm.name, uri, "vdb", str(out), backup_id=backup_id,
                        encrypt_key_file=str(points.new), tls_dir=str(client_dir))
            assert same_bytes(out, refs["vdb"])
            out.unlink()


def _mid_way(volume: Path, uri: str) -> Callable[[int], bool]:
    """True once the first layer's LUKS header in the volume file changed (it got its new
    key slot) and a later ``qemu-img amend`` child of the rekey (a pid) runs: another layer
    is getting its slot, or the first is losing its old one (caught as it starts, while
    QEMU derives keys, before it writes)."""
    location = api.list_backups(uri)[0].disks[0].location or {}
    offset, length = int(location["offset"]), int(location["length"])
    with open(volume, "rb") as stream:
        stream.seek(offset)
        region = layers.luks_region(stream.read(layers.HEADER_READ), length)
        assert region is not None
        window = (offset + region[0], region[1])
        stream.seek(window[0])
        before = stream.read(window[1])
    earlier: set[str] | None = None  # the amends running when the change was seen

    def amends(rekey: int) -> set[str]:
        found = subprocess.run(["pgrep", "-P", str(rekey), "-f", "qemu-img amend"],
                               capture_output=True, text=True, check=False)
        return set(found.stdout.split())

    def ready(rekey: int) -> bool:
        nonlocal earlier
        if earlier is None:
            with open(volume, "rb") as stream:
                stream.seek(window[0])
                if stream.read(window[1]) == before:
                    return False
            earlier = amends(rekey)
            return False
        return bool(amends(rekey) - earlier)

    return ready


@pytest.mark.fault
def test_a_volume_rekey_killed_mid_way_is_finished_by_the_next(points: Points) -> None:
    vm, old, new = points.vm, points.old, points.new
    with points.served() as (volume, server):
        uri = server.uri
        argv = [str(EXE), "rekey", "--target", uri, "--encrypt-key-file", str(old),
                "--new-key-file", str(new)]
        # the first layer has both keys, the second is getting its new one (or the first
        # is losing its old one)
        assert _kill_when(argv, _mid_way(volume, uri))
        table = _table(volume)
        assert table is not None and table.rekey is not None
        refused = rdm_backup("restore", vm.name, "--target", uri, "--disk", "vdb", "--to",
                             str(vm.workdir / "no.raw"), "--encrypt-key-file", str(new))
        assert refused.returncode == 4, refused.stderr
        assert "rekey again with the same two key files" in refused.stderr
        with pytest.raises(OperationError, match="rekey again"):
            api.verify(uri)
        refused = rdm_backup("backup", vm.name, "--target", uri, "--encrypt-key-file",
                             str(old))
        assert refused.returncode == 4, refused.stderr
        with pytest.raises(UsageError, match="begun with"):
            api.rekey(uri, str(new), str(old))
        done = api.rekey(uri, str(old), str(new))
        assert done.resumed and done.layers == 2
        table = _table(volume)
        assert table is not None and table.rekey is None
        assert [m.backup_id for m in api.list_backups(uri)] == [i for i, _ in points.made]
        assert api.verify(uri).ok
        _restores(vm, uri, new, points.made)
