"""Backups pushed by the VM's QEMU into an NBD export; list, verify, restore from its address."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.errors import OperationError
from tests.lab.volume_server import VolumeServer
from tools.labkit import (
    LabVM,
    MiB,
    guest_write,
    lab_vm,
    qemu_leftovers,
    rdm_backup,
    rdmb_tmpdir,
    same_bytes,
    snapshot_source,
)

pytestmark = pytest.mark.lab
# a disk whose copy still runs when a fault hits it right after its job started: PIECES
# writes of 8 MiB, one every 20 MiB (192 MiB to copy; the fault comes milliseconds in)
BIG_DISK = 512 * MiB
PIECES = 24


@pytest.fixture
def server() -> Iterator[VolumeServer]:
    with rdmb_tmpdir() as work:
        nbd_server = VolumeServer(work / "volume.img")
        nbd_server.start()
        try:
            yield nbd_server
        finally:
            nbd_server.stop()


def reference(vm: LabVM, tag: str) -> dict[str, Path]:
    vm.dom.suspend()
    try:
        return snapshot_source(vm, vm.workdir / f"ref-{tag}")
    finally:
        vm.dom.resume()


def restore_compare(vm: LabVM, target: str, backup_id: str, refs: dict[str, Path]) -> None:
    for disk, ref in refs.items():
        out = vm.workdir / f"out-{backup_id}-{disk}.raw"
        proc = rdm_backup("restore", vm.name, "--target", target, "--disk", disk, "--to",
                          str(out), "--backup", backup_id)
        assert proc.returncode == 0, proc.stderr
        assert same_bytes(out, ref), f"{disk} of {backup_id}"
        out.unlink()


def test_full_and_incremental_into_an_nbd_volume(server: VolumeServer) -> None:
    with lab_vm(loop_size=256 * MiB) as vm:
        for index in range(16):
            guest_write(vm.dom, "vdb", 0x10 + index, index * 16 * MiB, MiB)
        guest_write(vm.dom, "sda", 0x61, 0, 2 * MiB)
        refs0 = reference(vm, "0")
        proc = rdm_backup("backup", vm.name, "--target", server.uri, "--json")
        assert proc.returncode == 0, proc.stderr
        first = json.loads(proc.stdout)
        assert first["level"] == "full"
        guest_write(vm.dom, "vdb", 0x77, 100 * MiB, 3 * MiB)
        guest_write(vm.dom, "sda", 0x78, 8 * MiB, MiB)
        refs1 = reference(vm, "1")
        second = api.backup(vm.name, server.uri)
        vdb = second.manifest.disk("vdb")
        assert vdb is not None and vdb.level == "incremental" and vdb.data_path == "qemu"
        assert vdb.bytes_transferred == 3 * MiB  # only the dirty clusters went over NBD
        # the volume stores data, not zeros: the server's file holds little
        assert os.stat(server.path).st_blocks * 512 < 48 * MiB

        listed = json.loads(rdm_backup("list", "--target", server.uri, "--json").stdout)
        assert [b["backup_id"] for b in listed] == [first["backup_id"],
                                                     second.manifest.backup_id]
        assert rdm_backup("verify", "--target", server.uri).returncode == 0
        restore_compare(vm, server.uri, first["backup_id"], refs0)
        restore_compare(vm, server.uri, second.manifest.backup_id, refs1)
        # the mapping travels with the data
        assert second.manifest.disk("vdb").mapping is not None  # type: ignore[union-attr]
        manifest = api.list_backups(server.uri, vm.uuid)[-1]
        assert manifest.disk("vdb").mapping.to_dict() == api.map_disks(  # type: ignore[union-attr]
            vm.name, ["vdb"])[0].to_dict()


@pytest.mark.fault
def test_nbd_server_dying_mid_backup(server: VolumeServer) -> None:
    with lab_vm(loop_size=BIG_DISK) as vm:
        guest_write(vm.dom, "vdb", 0x21, 0, MiB)
        first = api.backup(vm.name, server.uri, disks=["vdb"])
        for index in range(PIECES):  # enough changed data to copy for a while
            guest_write(vm.dom, "vdb", 0x30 + index, index * 20 * MiB, 8 * MiB)
        exe = Path(sys.executable).parent / "rdm-backup"
        proc = subprocess.Popen([str(exe), "backup", vm.name, "--target", server.uri,
                                 "--disk", "vdb"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not any(item.startswith("job ") for item in qemu_leftovers(vm.dom)):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        server.stop(signal.SIGKILL)
        _out, err = proc.communicate(timeout=120)
        assert proc.returncode == 4, err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert qemu_leftovers(vm.dom) == []
        server.start()
        assert [m.backup_id for m in api.list_backups(server.uri)] == [
            first.manifest.backup_id]
        refs = reference(vm, "after")
        again = api.backup(vm.name, server.uri, disks=["vdb"], level="incremental")
        assert again.manifest.disk("vdb").parent == first.manifest.backup_id  # type: ignore[union-attr]
        restore_compare(vm, server.uri, again.manifest.backup_id, {"vdb": refs["vdb"]})


def test_receive_serves_the_same_backups_again(server: VolumeServer) -> None:
    with lab_vm(loop_size=64 * MiB) as vm:
        guest_write(vm.dom, "vdb", 0x51, 0, MiB)
        done = api.backup(vm.name, server.uri, disks=["vdb"])
        assert server.proc is not None
        server.proc.send_signal(signal.SIGTERM)
        assert server.proc.wait(30) == 0
        server.start()
        assert [m.backup_id for m in api.list_backups(server.uri)] == [done.manifest.backup_id]
        assert api.verify(server.uri).ok
    assert stat_mode(server.path) == 0o600
    proc = rdm_backup("receive", "--volume", str(server.path), "--listen", "0.0.0.0:10999")
    assert proc.returncode == 2 and "without TLS" in proc.stderr


def stat_mode(path: Path) -> int:
    return os.stat(path).st_mode & 0o777


@pytest.mark.bad_input
def test_plain_nbd_to_a_remote_address_is_refused() -> None:
    with pytest.raises(Exception) as err:
        api.backup("rdmb-none", "nbd://192.0.2.1/x")
    assert not isinstance(err.value, OperationError) or "unencrypted" in str(err.value)
    proc = rdm_backup("backup", "rdmb-none", "--target", "nbd://192.0.2.1:10809/x")
    assert proc.returncode == 2 and "unencrypted" in proc.stderr
    proc = rdm_backup("list", "--target", "nbd://127.0.0.1:1/bad name")
    assert proc.returncode == 2


REMOTE_URI = "qemu+tcp://127.0.0.1/system"


def test_backup_requested_through_a_remote_uri_by_uuid(server: VolumeServer) -> None:
    """A backup server drives the hypervisor through libvirt's remote protocol, VM by UUID."""
    with lab_vm(loop_size=128 * MiB) as vm:
        guest_write(vm.dom, "vdb", 0x41, 5 * MiB, 2 * MiB)
        refs = reference(vm, "remote-full")
        proc = rdm_backup("--connect", REMOTE_URI, "backup", vm.uuid, "--target", server.uri,
                          "--disk", "vdb", "--json")
        assert proc.returncode == 0, proc.stderr
        first = json.loads(proc.stdout)
        assert first["domain_uuid"] == vm.uuid and first["level"] == "full"
        guest_write(vm.dom, "vdb", 0x42, 50 * MiB, MiB)
        refs2 = reference(vm, "remote-inc")
        second = api.backup(vm.uuid, server.uri, disks=["vdb"], uri=REMOTE_URI)
        assert second.manifest.level == "incremental"
        restore_compare(vm, server.uri, first["backup_id"], {"vdb": refs["vdb"]})
        restore_compare(vm, server.uri, second.manifest.backup_id, {"vdb": refs2["vdb"]})
        listed = rdm_backup("--connect", REMOTE_URI, "disks", vm.uuid, "--json")
        assert listed.returncode == 0 and json.loads(listed.stdout)["domain_uuid"] == vm.uuid


def test_nbd_over_tls_end_to_end() -> None:
    from tests.lab.tls import make_certificates

    with lab_vm(loop_size=64 * MiB) as vm, rdmb_tmpdir() as work:
        server_dir, client_dir = make_certificates(work / "pki")
        receiver = VolumeServer(work / "vol.img", export="rdmb-tls", tls_dir=server_dir)
        receiver.start()
        try:
            uri, port = receiver.uri, receiver.port
            assert uri == f"nbds://127.0.0.1:{port}/rdmb-tls"
            guest_write(vm.dom, "vdb", 0x71, MiB, 2 * MiB)
            refs = reference(vm, "tls")
            # without credentials: refused before anything is sent
            proc = rdm_backup("backup", vm.name, "--target", uri, "--disk", "vdb")
            assert proc.returncode == 2 and "--tls-creds" in proc.stderr
            proc = rdm_backup("backup", vm.name, "--target", uri, "--disk", "vdb",
                              "--tls-creds", str(client_dir), "--json")
            assert proc.returncode == 0, proc.stderr
            backup_id = json.loads(proc.stdout)["backup_id"]
            guest_write(vm.dom, "vdb", 0x72, 9 * MiB, MiB)
            refs2 = reference(vm, "tls2")
            inc = api.backup(vm.name, uri, disks=["vdb"], tls_dir=str(client_dir))
            assert inc.manifest.level == "incremental"
            assert api.verify(uri, tls_dir=str(client_dir)).ok
            for point, ref in ((backup_id, refs["vdb"]), (inc.manifest.backup_id, refs2["vdb"])):
                out = work / f"{point}.raw"
                api.restore(vm.name, uri, "vdb", str(out), backup_id=point,
                            tls_dir=str(client_dir))
                assert same_bytes(out, ref)
            # a plain client cannot talk to the TLS server
            plain = rdm_backup("list", "--target", f"nbd://127.0.0.1:{port}/rdmb-tls")
            assert plain.returncode == 4 and plain.stderr.count("\n") == 1
            assert qemu_leftovers(vm.dom) == []
        finally:
            receiver.stop()


def test_nbd_unix_socket_target() -> None:
    with lab_vm(loop_size=64 * MiB) as vm, rdmb_tmpdir() as work:
        sock = work / "sock" / "nbd.sock"
        sock.parent.mkdir()
        exe = Path(sys.executable).parent / "rdm-backup"
        receiver = subprocess.Popen(
            [str(exe), "receive", "--volume", str(work / "vol.img"), "--socket", str(sock),
             "--export", "rdmb-unix", "--json"], stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True)
        try:
            assert receiver.stdout is not None
            uri = json.loads(receiver.stdout.readline())["uri"]
            assert uri == f"nbd+unix:///rdmb-unix?socket={sock}"
            deadline = time.monotonic() + 20
            while not sock.exists():
                assert time.monotonic() < deadline
                time.sleep(0.05)
            guest_write(vm.dom, "vdb", 0x33, 2 * MiB, MiB)
            refs = reference(vm, "unix")
            result = api.backup(vm.name, uri, disks=["vdb"])
            assert result.manifest.disk("vdb").data_path == "qemu"  # type: ignore[union-attr]
            restore_compare(vm, uri, result.manifest.backup_id, {"vdb": refs["vdb"]})
        finally:
            receiver.send_signal(signal.SIGTERM)
            receiver.wait(30)


HOLD_LEASE = """
import sys, time
from libvirt_rdm_backup.targets.nbd_volume import NbdVolume
from libvirt_rdm_backup.targets.uri import parse_target
volume = NbdVolume.open(parse_target(sys.argv[1]))
volume.take_lease()
print("held", flush=True)
time.sleep(600)
"""


@pytest.mark.fault
def test_two_writers_by_two_addresses_are_excluded(server: VolumeServer) -> None:
    """Backups reaching one served volume as 127.0.0.1 and as localhost: one writer at a time."""
    by_ip, by_name = server.uri, server.uri.replace("127.0.0.1", "localhost")
    with lab_vm(loop_size=BIG_DISK) as big, lab_vm(loop_size=64 * MiB) as small:
        guest_write(small.dom, "vdb", 0x41, 0, MiB)
        small_ref = reference(small, "0")["vdb"]
        first = rdm_backup("backup", small.name, "--target", by_name, "--disk", "vdb", "--json")
        assert first.returncode == 0, first.stderr
        for index in range(PIECES):  # enough to copy for a while
            guest_write(big.dom, "vdb", 0x30 + index, index * 20 * MiB, 8 * MiB)
        big_ref = reference(big, "0")["vdb"]
        exe = Path(sys.executable).parent / "rdm-backup"
        writer = subprocess.Popen([str(exe), "backup", big.name, "--target", by_ip, "--disk",
                                   "vdb", "--json"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60
        while not any(item.startswith("job ") for item in qemu_leftovers(big.dom)):
            assert writer.poll() is None, writer.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(writer.pid, signal.SIGSTOP)  # the first writer holds the volume, mid-copy
        try:
            second = rdm_backup("backup", small.name, "--target", by_name, "--disk", "vdb")
        finally:
            os.kill(writer.pid, signal.SIGCONT)
        out, err = writer.communicate(timeout=300)
        assert writer.returncode == 0, err
        assert second.returncode == 4, second.stderr
        assert second.stderr.count("\n") == 1 and "being written by another backup" in second.stderr

        holder = subprocess.Popen([sys.executable, "-c", HOLD_LEASE, by_name],
                                  stdout=subprocess.PIPE, text=True)
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        blocked = rdm_backup("backup", small.name, "--target", by_ip, "--disk", "vdb")
        assert blocked.returncode == 4 and "being written by another backup" in blocked.stderr
        holder.kill()  # a writer killed while holding the lease does not block the next
        holder.wait()
        third = rdm_backup("backup", small.name, "--target", by_ip, "--disk", "vdb", "--json")
        assert third.returncode == 0, third.stderr

        ids = [json.loads(p)["backup_id"] for p in (first.stdout, out, third.stdout)]
        listed = json.loads(rdm_backup("list", "--target", by_name, "--json").stdout)
        assert [b["backup_id"] for b in listed] == ids
        assert rdm_backup("verify", "--target", by_ip).returncode == 0
        restore_compare(small, by_ip, ids[0], {"vdb": small_ref})
        restore_compare(big, by_name, ids[1], {"vdb": big_ref})
        restore_compare(small, by_name, ids[2], {"vdb": small_ref})


@pytest.mark.fault
def test_a_stalled_writer_taken_over_publishes_nothing(server: VolumeServer) -> None:
    """A writer that stops renewing its lease mid-copy is taken over; its publish then fails."""
    env = {**os.environ, "RDM_BACKUP_VOLUME_LEASE": "2"}
    by_ip, by_name = server.uri, server.uri.replace("127.0.0.1", "localhost")
    exe = Path(sys.executable).parent / "rdm-backup"
    with lab_vm(loop_size=BIG_DISK) as big, lab_vm(loop_size=64 * MiB) as small:
        guest_write(big.dom, "vdb", 0x22, 0, MiB)
        kept_ref = reference(big, "kept")["vdb"]
        kept = api.backup(big.name, by_ip, disks=["vdb"])
        for index in range(PIECES):
            guest_write(big.dom, "vdb", 0x50 + index, index * 20 * MiB, 8 * MiB)
        guest_write(small.dom, "vdb", 0x43, 0, MiB)
        small_ref = reference(small, "0")["vdb"]
        # held at 32 MiB/s (6 s for its 192 MiB), so that it is surely caught mid-copy
        writer = subprocess.Popen([str(exe), "backup", big.name, "--target", by_ip, "--disk",
                                   "vdb", "--bwlimit", "32"], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=env)
        deadline = time.monotonic() + 60
        while not any(item.startswith("job ") for item in qemu_leftovers(big.dom)):
            assert writer.poll() is None, writer.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.005)
        os.kill(writer.pid, signal.SIGSTOP)  # stalled: its lease is no longer renewed
        try:
            time.sleep(2.5)  # past the lease's ttl
            taker = subprocess.run([str(exe), "backup", small.name, "--target", by_name,
                                    "--disk", "vdb", "--json"], capture_output=True, text=True,
                                   env=env, timeout=300, check=False)
        finally:
            os.kill(writer.pid, signal.SIGCONT)
        _out, err = writer.communicate(timeout=300)
        assert taker.returncode == 0, taker.stderr
        assert writer.returncode == 4, err
        assert err.count("\n") == 1 and "lost its writer lease" in err
        assert qemu_leftovers(big.dom) == []

        ids = [kept.manifest.backup_id, json.loads(taker.stdout)["backup_id"]]
        listed = json.loads(rdm_backup("list", "--target", by_ip, "--json").stdout)
        assert [b["backup_id"] for b in listed] == ids
        assert rdm_backup("verify", "--target", by_name).returncode == 0
        restore_compare(small, by_ip, ids[1], {"vdb": small_ref})
        restore_compare(big, by_name, ids[0], {"vdb": kept_ref})
