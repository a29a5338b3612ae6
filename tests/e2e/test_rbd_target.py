"""Backups kept on Ceph (an ``rbd://`` target): a VM with an RBD disk and a loop-device disk,
full then incrementals written by the guest's QEMU into RBD images, each point an RBD snapshot;
every point restored byte for byte from the target, `list`, `verify` (a good chain, then a
tampered manifest), `serve`, `prune --keep-last 1` with `rbd du` showing the space given
back; the cephx key in no output or -vv log."""

from __future__ import annotations

import json
import random
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.engine.rbd_sink import RbdSink
from libvirt_rdm_backup.engine.rbd_store import RbdStore
from tools import cephkit, labkit
from tools.labkit import MiB, guest_write, same_bytes

pytestmark = pytest.mark.lab

RBD_SIZE = 64 * MiB
LOOP_SIZE = 64 * MiB
CLUSTER = 64 * 1024


@dataclass
class TargetVM(cephkit.RbdLoopVM):
    """A firmware-only domain (vdb on RBD, vdc on a loop device) and an rbd:// target."""

    prefix: str

    @property
    def target(self) -> str:
        return f"rbd://{cephkit.POOL}/{self.prefix}?conf={cephkit.CEPH_CONF}&id={cephkit.CLIENT}"


def _remove_target(prefix: str) -> None:
    """Remove the target's images (with their snapshots) and index object."""
    import rados
    import rbd

    with cephkit.cluster() as handle:
        ioctx = handle.open_ioctx(cephkit.POOL)
        try:
            for name in rbd.RBD().list(ioctx):
                if name.startswith(f"{prefix}."):
                    with rbd.Image(ioctx, name) as image:
                        for snap in list(image.list_snaps()):
                            image.remove_snap(snap["name"])
                    rbd.RBD().remove(ioctx, name)
            try:
                ioctx.remove_object(f"{prefix}.index")
            except rados.ObjectNotFound:
                pass
        finally:
            ioctx.close()


@pytest.fixture
def target_vm(ceph: None, run_token: str, rdmb_tmp: Path) -> Iterator[TargetVM]:
    prefix = f"rdmb-{run_token}-t"
    try:
        with cephkit.rbd_and_loop_vm(f"rdmb-{run_token}-rbdt", rdmb_tmp, RBD_SIZE, LOOP_SIZE,
                                     4 * MiB) as vm:
            yield TargetVM(vm.dom, vm.image, vm.loop_file, vm.work, prefix)
    finally:
        _remove_target(prefix)


def write(vm: TargetVM, rng: random.Random, offsets: list[int]) -> int:
    """Guest writes of 64 KiB to each disk at ``offsets`` (the same at each point: later
    points overwrite what earlier ones hold); the bytes written to one disk."""
    for disk in ("vdb", "vdc"):
        for offset in offsets:
            guest_write(vm.dom, disk, rng.randrange(1, 250), offset, CLUSTER)
    return len(offsets) * CLUSTER


def rbd_du(vm: TargetVM) -> int:
    """``rbd du``'s total of the target's images, snapshots included (each image asked on its
    own: a pool-wide ``du`` aborts when another test removes an image of the pool meanwhile)."""
    import rbd

    with cephkit.ioctx() as ctx:
        names = [n for n in rbd.RBD().list(ctx) if n.startswith(f"{vm.prefix}.")]
    total = 0
    for name in names:
        proc = subprocess.run(["rbd", "-c", str(cephkit.CEPH_CONF), "--id", "admin", "du",
                               f"{cephkit.POOL}/{name}", "--format", "json"],
                              capture_output=True, text=True, check=True, timeout=120)
        total += sum(int(i["used_size"]) for i in json.loads(proc.stdout)["images"])
    return total


def cli(*args: str, ok: bool = True) -> subprocess.CompletedProcess[str]:
    proc = labkit.rdm_backup(*args)
    if ok:
        assert proc.returncode == 0, proc.stderr
    return proc


def restore_all(vm: TargetVM, points: list[tuple[str, dict[str, Path]]], key: str) -> None:
    for backup_id, refs in points:
        for disk, ref in refs.items():
            out = vm.work / f"restore-{backup_id}-{disk}.raw"
            proc = cli("-vv", "restore", vm.name, "--target", vm.target, "--disk", disk,
                       "--to", str(out), "--backup", backup_id)
            assert key not in proc.stdout + proc.stderr
            assert same_bytes(out, ref), f"{disk} of {backup_id} differs"
            out.unlink()


def tamper(vm: TargetVM, backup_id: str) -> None:
    """Change one hex digit of vdb's digest in the backup's manifest (in the index object)."""
    import rados

    with cephkit.cluster() as handle:
        ioctx = handle.open_ioctx(cephkit.POOL)
        try:
            with rados.ReadOpCtx() as op:
                values, _ = ioctx.get_omap_vals(op, "", "m.", 1000)
                ioctx.operate_read_op(op, f"{vm.prefix}.index")
                found = {k: v for k, v in values if k.endswith(backup_id)}
            [(key, value)] = found.items()
            manifest = json.loads(value)
            digest = next(d for d in manifest["disks"] if d["disk"] == "vdb")["digest"]
            digest["value"] = ("0" if digest["value"][0] != "0" else "1") + digest["value"][1:]
            with rados.WriteOpCtx() as op:
                ioctx.set_omap(op, (key,), (json.dumps(manifest).encode(),))
                ioctx.operate_write_op(op, f"{vm.prefix}.index")
        finally:
            ioctx.close()


def test_backups_kept_on_ceph(target_vm: TargetVM) -> None:
    vm, rng = target_vm, random.Random(17)
    key = (cephkit.CEPH_DIR / f"ceph.client.{cephkit.CLIENT}.keyring").read_text()
    key = key.split("key = ")[1].split()[0]
    points, records = [], []
    offsets = [rng.randrange(0, LOOP_SIZE - CLUSTER, CLUSTER) for _ in range(6)]
    for index, level in enumerate(["full", "incremental", "incremental"]):
        written = write(vm, rng, offsets)
        refs = cephkit.references(vm, index)
        proc = cli("-vv", "backup", vm.name, "--target", vm.target, "--level", level, "--json")
        assert key not in proc.stdout + proc.stderr
        result = json.loads(proc.stdout)
        disks = {d["disk"]: d for d in result["disks"]}
        assert {d["level"] for d in disks.values()} == {level}, disks
        if index:  # the objects the point took: the dirty 64 KiB clusters, no more
            for disk in disks.values():
                assert 0 < disk["stored_bytes"] <= written * 1.2, disk
        points.append((result["backup_id"], refs))
        records.append(disks)
    listed = json.loads(cli("list", vm.name, "--target", vm.target, "--json").stdout)
    assert [b["backup_id"] for b in listed] == [p[0] for p in points]
    restore_all(vm, points, key)
    assert json.loads(cli("verify", vm.name, "--target", vm.target, "--json").stdout)["ok"]

    before = rbd_du(vm)
    proc = cli("-vv", "prune", vm.name, "--target", vm.target, "--keep-last", "1")
    assert key not in proc.stdout + proc.stderr
    after = rbd_du(vm)
    assert after < before, (before, after)
    listed = json.loads(cli("list", vm.name, "--target", vm.target, "--json").stdout)
    assert [b["backup_id"] for b in listed] == [points[-1][0]]
    assert listed[0]["parent"] is None
    restore_all(vm, points[-1:], key)  # the kept point reads as before: nothing was merged
    served_copy = vm.work / "served.raw"
    with api.serve(vm.name, vm.target, "vdb", socket=str(vm.work / "serve.sock")) as served:
        subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", served.uri,
                        str(served_copy)], check=True, capture_output=True, timeout=300)
    assert same_bytes(served_copy, points[-1][1]["vdb"])

    tamper(vm, points[-1][0])
    proc = cli("verify", vm.name, "--target", vm.target, ok=False)
    assert proc.returncode == 5, proc.stderr
    assert "sha256 mismatch" in proc.stderr, proc.stderr
    print(f"rbd du before prune {before}, after {after}; records {records}")


@pytest.mark.parametrize("object_size", ["64K", "4M"])
def test_object_size_against_dirty_bytes(ceph: None, run_token: str, rdmb_tmp: Path,
                                         object_size: str) -> None:
    """A 512 MiB disk full of data: the full's time, and what an incremental of 32 scattered
    64 KiB writes stores (64 KiB objects: the dirty bytes; 4 MiB objects: whole objects)."""
    size, prefix = 512 * MiB, f"rdmb-{run_token}-o{object_size.lower()}"
    loop_file = labkit.make_file(rdmb_tmp / "disk.img", size)
    target = (f"rbd://{cephkit.POOL}/{prefix}?conf={cephkit.CEPH_CONF}&id={cephkit.CLIENT}"
              f"&object-size={object_size}")
    rng = random.Random(5)
    try:
        with labkit.loop_device(loop_file) as loop, labkit.test_domain(
                f"rdmb-{run_token}-objsz", [labkit.block_disk("vdb", loop)]) as dom:
            name = str(dom.name())
            full = json.loads(cli("backup", name, "--target", target, "--level", "full",
                                  "--json").stdout)
            offsets = rng.sample(range(0, size, 8 * MiB), 32)  # one write per 4 MiB object
            for offset in offsets:
                guest_write(dom, "vdb", rng.randrange(1, 250), offset, CLUSTER)
            incr = json.loads(cli("backup", name, "--target", target, "--level",
                                  "incremental", "--json").stdout)
            ref = rdmb_tmp / "ref.raw"
            dom.suspend()
            ref.write_bytes(loop_file.read_bytes())
            dom.resume()
            out = rdmb_tmp / "restored.raw"
            cli("restore", name, "--target", target, "--disk", "vdb", "--to", str(out))
            assert same_bytes(out, ref)
    finally:
        _remove_target(prefix)
    dirty = len(offsets) * CLUSTER
    stored = incr["disks"][0]["stored_bytes"]
    print(f"object size {object_size}: full of {size >> 20} MiB in {full['elapsed_s']:.2f} s, "
          f"incremental of {dirty} dirty bytes stored {stored} ({stored / dirty:.2f}x) "
          f"in {incr['elapsed_s']:.2f} s")
    if object_size == "64K":
        assert stored <= 1.2 * dirty
    else:
        assert stored == len(offsets) * 4 * MiB


def test_a_shut_off_domain_is_copied_into_the_target(ceph: None, run_token: str,
                                                     rdmb_tmp: Path) -> None:
    """A copy from storage (a private storage daemon writing into the image), twice: the
    second a full again (no resync on an rbd:// target), each restored byte for byte."""
    prefix = f"rdmb-{run_token}-off"
    target = f"rbd://{cephkit.POOL}/{prefix}?conf={cephkit.CEPH_CONF}&id={cephkit.CLIENT}"
    key = (cephkit.CEPH_DIR / f"ceph.client.{cephkit.CLIENT}.keyring").read_text()
    key = key.split("key = ")[1].split()[0]
    disk_file = labkit.make_file(rdmb_tmp / "disk.img", 32 * MiB)
    try:
        with labkit.loop_device(disk_file) as loop, labkit.test_domain(
                f"rdmb-{run_token}-rbdoff", [labkit.block_disk("vdb", loop)],
                start=False) as dom:
            name = str(dom.name())
            for index in range(2):
                with disk_file.open("r+b") as stream:
                    stream.seek(index * 8 * MiB)
                    stream.write(bytes([0x31 + index]) * MiB)
                ref = rdmb_tmp / f"ref-{index}.raw"
                ref.write_bytes(disk_file.read_bytes())
                proc = cli("-vv", "backup", name, "--target", target, "--json")
                assert key not in proc.stdout + proc.stderr
                [disk] = json.loads(proc.stdout)["disks"]
                assert (disk["data_path"], disk["level"]) == ("storage", "full"), disk
                out = rdmb_tmp / f"restored-{index}.raw"
                cli("restore", name, "--target", target, "--disk", "vdb", "--to", str(out))
                assert same_bytes(out, ref), f"point {index} differs"
    finally:
        _remove_target(prefix)


def test_an_unpublished_point_leaves_no_snapshot_and_one_writer_at_a_time(
        ceph: None, run_token: str) -> None:
    """A session that fails after its snapshot: the snapshot is removed, nothing is listed;
    a second writer of the same domain is refused at once."""
    from libvirt_rdm_backup.engine.stores import open_store
    from libvirt_rdm_backup.errors import OperationError

    prefix = f"rdmb-{run_token}-fail"
    target = f"rbd://{cephkit.POOL}/{prefix}?conf={cephkit.CEPH_CONF}&id={cephkit.CLIENT}"
    uuid = "00000000-0000-4000-8000-000000000001"
    try:
        with open_store(target, create=True) as store:
            assert isinstance(store, RbdStore)
            image = store.image_name(uuid, "vdb")
            with store.lock(uuid):
                with pytest.raises(OperationError, match="another run"), \
                        open_store(target) as other, other.lock(uuid):
                    pass
                with pytest.raises(RuntimeError), store.session(uuid, "b1") as session:
                    assert isinstance(session, RbdSink)
                    store.pool.ensure_image(image, 4 * MiB, 64 * 1024)
                    store.pool.create_snapshot(image, "b1")
                    session.snapshots.append(image)
                    raise RuntimeError("the capture failed")
            assert store.pool.snapshots(image) == []
            assert store.scan(uuid).backups == []
    finally:
        _remove_target(prefix)
