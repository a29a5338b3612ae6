"""Pull mode on the real lab: point-in-time NBD exports read by third-party tools."""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import libvirt
import libvirt_qemu
import nbd
import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.errors import OperationError, UsageError
from tools.labkit import (
    LabVM,
    MiB,
    block_disk,
    guest_write,
    lab_vm,
    loop_device,
    qemu_leftovers,
    qmp,
    rdm_backup,
    same_bytes,
)

pytestmark = pytest.mark.lab

CLUSTER = 64 * 1024
LOOP_SIZE = 256 * MiB
SOCKET_ROOT = "/run/libvirt-rdm-backup/"


@pytest.fixture(scope="module")
def vm() -> Iterator[LabVM]:
    """A small acceptance VM (vdb: loop LUN, sda: iSCSI passthrough LUN), running."""
    with lab_vm(loop_size=LOOP_SIZE, lun_size=16 * MiB) as built:
        yield built


def bitmap_names(dom: libvirt.virDomain) -> set[str]:
    """Names of the named dirty bitmaps of every block node (fleecing adds unnamed ones)."""
    nodes = qmp(dom, "query-named-block-nodes", {"flat": True})
    return {str(b["name"]) for n in nodes  # type: ignore[attr-defined]
            for b in n.get("dirty-bitmaps") or [] if "name" in b}


def nbd_server_running(dom: libvirt.virDomain) -> bool:
    """True when QEMU runs an NBD server (stops it: only call it where none should run)."""
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, '{"execute": "nbd-server-stop"}', 0))
    return "error" not in reply


def assert_clean(vm: LabVM, uri: str | None = None) -> None:
    """Nothing of an export is left in QEMU, nor its socket directory on the host."""
    assert qemu_leftovers(vm.dom) == []
    assert not [b for b in bitmap_names(vm.dom) if b.startswith("rdmb-dirty-")]
    assert not nbd_server_running(vm.dom)
    if uri is not None and "socket=" in uri:
        assert not os.path.exists(os.path.dirname(uri.partition("socket=")[2]))


def read_export(uri: str, dest: Path) -> Path:
    """A third party's copy of an export: ``qemu-img convert`` of the NBD URI."""
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", uri, str(dest)], check=True)
    return dest


def copy_device(device: str, dest: Path) -> Path:
    """A raw copy of a host block device as it is now."""
    subprocess.run(["qemu-img", "convert", "-U", "-f", "raw", "-O", "raw", device, str(dest)],
                   check=True)
    return dest


def scatter(vm: LabVM, disk: str, rng: random.Random, count: int,
            offsets: list[int] | None = None) -> list[int]:
    """Guest writes of one cluster at random cluster offsets (or at ``offsets``)."""
    chosen = offsets or [rng.randrange(0, LOOP_SIZE - CLUSTER, CLUSTER) for _ in range(count)]
    for offset in chosen:
        guest_write(vm.dom, disk, rng.randrange(1, 250), offset, CLUSTER)
    return chosen


@contextmanager
def paused(vm: LabVM) -> Iterator[None]:
    """The guest's vCPUs stopped (monitor writes still land); resumed at the latest on exit."""
    vm.dom.suspend()
    try:
        yield
    finally:
        if vm.dom.info()[0] == libvirt.VIR_DOMAIN_PAUSED:
            vm.dom.resume()


def dirty_map(uri: str, context: str) -> list[tuple[int, int]]:
    """The dirty ranges (offset, length) an NBD client sees in ``context`` (``nbdinfo``)."""
    out = subprocess.run(["nbdinfo", "--json", f"--map={context}", uri], check=True,
                         capture_output=True, text=True).stdout
    return [(e["offset"], e["length"]) for e in json.loads(out) if e["type"] & 1]


def runs(offsets: list[int]) -> list[tuple[int, int]]:
    """Cluster offsets as merged (offset, length) ranges."""
    merged: list[list[int]] = []
    for offset in sorted(set(offsets)):
        if merged and merged[-1][0] + merged[-1][1] == offset:
            merged[-1][1] += CLUSTER
        else:
            merged.append([offset, CLUSTER])
    return [(a, b) for a, b in merged]


def test_export_is_a_point_in_time_of_the_running_disk(vm: LabVM) -> None:
    work, rng = vm.workdir, random.Random(31)
    before = scatter(vm, "vdb", rng, 40)
    scratch = work / "scratch"
    scratch.mkdir()
    with paused(vm):
        ref = copy_device(vm.loop, work / "ref.raw")
        with api.export(vm.name, ["vdb"], scratch_dir=str(scratch)) as handle:
            vm.dom.resume()
            # after the point: rewrite what was written before, and write elsewhere
            scatter(vm, "vdb", rng, 0, before[:20])
            scatter(vm, "vdb", rng, 20)
            uri = handle.uris["vdb"]
            assert list(handle.uris) == ["vdb"] and handle.bitmap_context is None
            assert uri.startswith("nbd+unix:///vdb?socket=" + SOCKET_ROOT)
            sock_dir = os.path.dirname(uri.partition("socket=")[2])
            assert stat.S_IMODE(os.stat(sock_dir).st_mode) == 0o700
            assert handle.point_in_time.endswith("Z")
            assert same_bytes(read_export(uri, work / "qemu-img.raw"), ref)
            subprocess.run(["nbdcopy", uri, str(work / "nbdcopy.raw")], check=True)
            assert same_bytes(work / "nbdcopy.raw", ref)
            assert not same_bytes(copy_device(vm.loop, work / "live.raw"), ref)
            with pytest.raises(OperationError, match="another backup"):
                api.backup(vm.name, str(work / "repo-busy"), disks=["vdb"])
            with pytest.raises(OperationError, match="another backup"):
                with api.export(vm.name, ["vdb"]):
                    pass
            handle.check()
            reader = nbd.NBD()  # still connected at teardown: cut off, not waited for
            reader.connect_uri(uri)
            assert reader.get_size() == LOOP_SIZE
    assert_clean(vm, uri)
    with pytest.raises(nbd.Error):
        reader.pread(CLUSTER, 0)
    assert os.listdir(scratch) == []
    for name in ("ref.raw", "qemu-img.raw", "nbdcopy.raw", "live.raw"):
        (work / name).unlink()


def test_two_disks_share_one_server_and_one_point() -> None:
    with ExitStack() as stack:
        vm = stack.enter_context(lab_vm(loop_size=LOOP_SIZE, lun_size=16 * MiB))
        second = vm.workdir / "second-lun.img"
        with open(second, "wb") as stream:
            stream.truncate(LOOP_SIZE)
        loop2 = stack.enter_context(loop_device(second))
        # the domain goes first, then the loop device it holds
        stack.callback(lambda: vm.dom.destroy() if vm.dom.isActive() else None)
        vm.dom.attachDeviceFlags(block_disk("sdb", loop2, bus="scsi").xml,
                                 libvirt.VIR_DOMAIN_AFFECT_LIVE)
        rng = random.Random(5)
        before = {disk: scatter(vm, disk, rng, 20) for disk in ("vdb", "sdb")}
        with paused(vm):
            refs = {"vdb": copy_device(vm.loop, vm.workdir / "ref-vdb.raw"),
                    "sdb": copy_device(loop2, vm.workdir / "ref-sdb.raw")}
            with api.export(vm.name, ["vdb", "sdb"], listen="127.0.0.1:0") as handle:
                vm.dom.resume()
                for disk in ("vdb", "sdb"):
                    scatter(vm, disk, rng, 0, before[disk][:10])
                    scatter(vm, disk, rng, 10)
                document = handle.to_dict()
                host, _, port = str(document["listen"]).rpartition(":")
                assert host == "127.0.0.1" and int(port) > 0
                assert handle.uris == {"vdb": f"nbd://127.0.0.1:{port}/vdb",
                                       "sdb": f"nbd://127.0.0.1:{port}/sdb"}
                for disk, uri in handle.uris.items():
                    out = read_export(uri, vm.workdir / f"export-{disk}.raw")
                    assert same_bytes(out, refs[disk]), f"{disk} is not the point in time"
        assert_clean(vm)
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", int(port)), timeout=5).close()


def test_dirty_bitmap_context_has_the_writes_since_the_last_backup(vm: LabVM) -> None:
    work, rng = vm.workdir, random.Random(47)
    repo = str(work / "repo")
    scatter(vm, "vdb", rng, 30)
    full = api.backup(vm.name, repo, disks=["vdb"], level="full").manifest
    chain_bitmap = full.disk("vdb").bitmap  # type: ignore[union-attr]
    assert chain_bitmap

    # written since the backup: scattered clusters, adjacent ones, and an unaligned write
    written = scatter(vm, "vdb", rng, 12) + scatter(
        vm, "vdb", rng, 0, [16 * MiB, 16 * MiB + CLUSTER, 16 * MiB + 2 * CLUSTER])
    guest_write(vm.dom, "vdb", 0x5A, 40 * MiB + 1000, 5000)
    written.append(40 * MiB)
    with api.export(vm.name, ["vdb"], target=repo, chain="elsewhere") as other:
        assert other.bitmap_context is None
        assert "chain elsewhere has no backup of vdb" in str(other.disks[0].bitmap_note)
    with paused(vm):
        ref = copy_device(vm.loop, work / "ref-dirty.raw")
        with api.export(vm.name, ["vdb"], target=repo) as handle:
            vm.dom.resume()
            after = scatter(vm, "vdb", rng, 0, [100 * MiB, written[0]])  # after the point
            context = handle.bitmap_context
            assert context is not None and context.startswith("qemu:dirty-bitmap:rdmb-dirty-")
            assert handle.disks[0].dirty_since == full.backup_id
            assert handle.to_dict()["disks"][0]["bitmap_context"] == context
            uri = handle.uris["vdb"]
            assert dirty_map(uri, context) == runs(written)
            # the same through libnbd's block status
            client = nbd.NBD()
            client.add_meta_context(context)
            client.connect_uri(uri)
            seen: list[tuple[int, int]] = []

            def collect(ctx: str, offset: int, entries: list[int], _err: object) -> int:
                pos = offset
                for length, flags in zip(entries[::2], entries[1::2], strict=True):
                    if ctx == context and flags & 1:
                        seen.append((pos, length))
                    pos += length
                return 0

            client.block_status(LOOP_SIZE, 0, collect)
            client.shutdown()
            assert runs([o for a, n in seen for o in range(a, a + n, CLUSTER)]) == runs(written)
            assert same_bytes(read_export(uri, work / "export-dirty.raw"), ref)
            assert chain_bitmap in bitmap_names(vm.dom)
    assert_clean(vm, uri)
    assert chain_bitmap in bitmap_names(vm.dom)

    # the chain's tracking went on through the export: the next incremental holds both
    with paused(vm):
        ref_inc = copy_device(vm.loop, work / "ref-inc.raw")
    inc = api.backup(vm.name, repo, disks=["vdb"], level="incremental").manifest
    record = inc.disk("vdb")
    assert record is not None and record.level == "incremental"
    assert record.parent == full.backup_id
    assert record.bytes_transferred == len(set(written + after)) * CLUSTER
    restored = work / "restored.raw"
    api.restore(vm.name, repo, "vdb", str(restored), backup_id=inc.backup_id)
    assert same_bytes(restored, ref_inc)
    assert qemu_leftovers(vm.dom) == []
    for name in ("ref-dirty.raw", "export-dirty.raw", "ref-inc.raw", "restored.raw"):
        (work / name).unlink()


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "rdm-backup"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "libvirt_rdm_backup.cli"]


def test_cli_export_until_sigterm(vm: LabVM) -> None:
    work, rng = vm.workdir, random.Random(3)
    scatter(vm, "vdb", rng, 20)
    with ExitStack() as stack:
        stack.enter_context(paused(vm))
        ref = copy_device(vm.loop, work / "ref-cli.raw")
        proc = subprocess.Popen([*_cli(), "export", vm.name, "--disk", "vdb", "--json",
                                 "--timeout", "30"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        stack.callback(lambda: proc.kill() if proc.poll() is None else None)
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.communicate()[1]
        document = json.loads(line)
        vm.dom.resume()
        scatter(vm, "vdb", rng, 20)
        assert document["domain_name"] == vm.name and document["point_in_time"]
        assert document["bitmap_context"] is None
        uri = document["uris"]["vdb"]
        assert same_bytes(read_export(uri, work / "cli.raw"), ref)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 0, err
        assert out == "" and err == ""
    assert_clean(vm, uri)
    for name in ("ref-cli.raw", "cli.raw"):
        (work / name).unlink()


def test_cli_text_output_sigint_and_timeout(vm: LabVM) -> None:
    proc = subprocess.Popen([*_cli(), "export", vm.name, "--disk", "vdb", "--listen",
                             "127.0.0.1:0"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        head = [proc.stdout.readline(), proc.stdout.readline()]
        assert head[0].startswith(f"exporting vdb of {vm.name} at "), head
        uri = head[1].split()[1]
        assert uri.startswith("nbd://127.0.0.1:") and uri.endswith("/vdb")
        size = subprocess.run(["nbdinfo", "--size", uri], check=True, capture_output=True,
                              text=True).stdout
        assert int(size) == LOOP_SIZE
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert "stopped (SIGINT)" in out
    assert_clean(vm)

    done = rdm_backup("export", vm.name, "--disk", "vdb", "--listen", "0.0.0.0:0",
                      "--allow-remote", "--timeout", "1")
    assert done.returncode == 0, done.stderr
    assert "plaintext" in done.stderr and "nbd://0.0.0.0:" in done.stdout
    assert "stopped (timeout after 1 s)" in done.stdout
    assert_clean(vm)

    path = vm.workdir / "export.sock"
    done = rdm_backup("export", vm.name, "--disk", "vdb", "--socket", str(path), "--timeout",
                      "0.5")
    assert done.returncode == 0, done.stderr
    assert f"nbd+unix:///vdb?socket={path}" in done.stdout and not path.exists()
    assert_clean(vm)


def test_cli_refusals(vm: LabVM) -> None:
    cases = [
        (["--disk", "vdb", "--listen", "0.0.0.0:10809"], 2, "not a loopback address"),
        (["--disk", "vdb", "--listen", "localhost:10809"], 2, "IP address"),
        (["--disk", "vdb", "--listen", "127.0.0.1:10809", "--socket", "/tmp/x"], 2,
         "not allowed with"),
        (["--disk", "sda"], 2, "passthrough LUN"),
        (["--disk", "vda"], 2, "not a raw disk"),
        (["--disk", "vdx"], 3, "no disk 'vdx'"),
        (["--disk", "vdb", "--chain", "weekly"], 2, "--chain needs --target"),
        (["--disk", "vdb", "--timeout", "0"], 2, "--timeout"),
        (["--disk", "vdb", "--target", str(vm.workdir / "no-repo")], 3, "no repository"),
    ]
    for extra, code, message in cases:
        proc = rdm_backup("export", vm.name, *extra)
        assert proc.returncode == code, (extra, proc.stderr)
        assert message in proc.stderr and proc.stderr.count("\n") == 1, (extra, proc.stderr)
        assert proc.stdout == ""
    with pytest.raises(UsageError, match="loopback"):
        with api.export(vm.name, ["vdb"], listen="[::]:0"):
            pass
    assert_clean(vm)


def test_killed_export_is_removed_by_the_next_run(vm: LabVM) -> None:
    scratch = vm.workdir / "scratch-killed"
    scratch.mkdir()
    proc = subprocess.Popen([*_cli(), "export", vm.name, "--disk", "vdb", "--json",
                             "--scratch-dir", str(scratch)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, proc.communicate()[1]
    finally:
        proc.kill()
        proc.communicate()
    uri = json.loads(line)["uris"]["vdb"]
    assert qemu_leftovers(vm.dom) != []
    with api.export(vm.name, ["vdb"]) as handle:  # the next run cleans up first
        assert int(subprocess.run(["nbdinfo", "--size", handle.uris["vdb"]], check=True,
                                  capture_output=True, text=True).stdout) == LOOP_SIZE
    assert_clean(vm)
    os.unlink(uri.partition("socket=")[2])
    os.rmdir(os.path.dirname(uri.partition("socket=")[2]))
