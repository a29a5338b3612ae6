"""Foundation acceptance on the real lab: discovery, mapping, full backup, restore, verify."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from tools.labkit import (
    LOOP_OFFSET,
    LabVM,
    MiB,
    guest_write,
    lab_vm,
    rdm_backup,
    rdmb_tmpdir,
    same_bytes,
    snapshot_source,
)

pytestmark = pytest.mark.lab


def scatter_writes(vm: LabVM, target: str, size: int, count: int, length: int,
                   seed: int) -> list[tuple[int, int]]:
    """Write ``count`` distinct patterns of ``length`` bytes at random aligned offsets."""
    rng = random.Random(seed)
    slots = size // length
    written = []
    for index, slot in enumerate(rng.sample(range(slots), count)):
        offset = slot * length
        guest_write(vm.dom, target, 1 + (seed * 7 + index) % 254, offset, length)
        written.append((offset, length))
    return written


def test_disks_lists_raw_disks_with_mapping(vm: LabVM) -> None:
    proc = rdm_backup("disks", vm.name, "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["domain_uuid"] == vm.uuid
    raw = {d["target"]: d for d in doc["raw_disks"]}
    assert set(raw) == {"vdb", "sda"}
    assert [o["target"] for o in doc["other_disks"]] == ["vda"]
    assert "not a raw disk" in doc["other_disks"][0]["reason"]

    vdb = raw["vdb"]
    assert vdb["source_path"] == vm.loop and vdb["serial"] == "RDMBLOOP1"
    assert vdb["node_name"] and vdb["size"] == 1024 * MiB
    loop_node = vdb["mapping"]["storage"]
    assert loop_node["kind"] == "loop"
    extent = loop_node["extents"][0]
    assert extent["offset"] == LOOP_OFFSET and extent["length"] == 1024 * MiB
    assert extent["target"]["path"] == str(vm.loop_file)

    sda = raw["sda"]
    assert sda["device"] == "lun" and sda["iscsi"]["iqn"] == vm.iscsi.iqn
    lun_node = sda["mapping"]["storage"]
    identity = lun_node["identity"]
    assert identity["iqn"] == vm.iscsi.iqn and identity["lun"] == vm.iscsi.lun
    assert identity["portal"] == "127.0.0.1:3260"
    assert identity.get("serial") == identity["tgt"]["scsi_sn"], identity
    assert any(d["type"] == "naa" for d in identity.get("designators", [])), identity
    assert lun_node["extents"][0]["target"]["path"] == str(vm.iscsi_file)


def test_full_backup_is_point_in_time_and_restores_identically(vm: LabVM) -> None:
    with rdmb_tmpdir() as work:
        scatter_writes(vm, "vdb", 1024 * MiB, 24, 64 * 1024, seed=1)
        scatter_writes(vm, "sda", 64 * MiB, 12, 64 * 1024, seed=2)
        # the reference: the sources at the backup's point (nothing writes in between)
        vm.dom.suspend()
        try:
            refs = snapshot_source(vm, work / "ref")
        finally:
            vm.dom.resume()

        during: list[int] = []

        def write_during_backup(job: str, done: int, total: int) -> None:
            # called only after the point in time is fixed (jobs started, pause over)
            if not during:
                during.append(done)
                scatter_writes(vm, "vdb", 1024 * MiB, 8, 64 * 1024, seed=3)
                scatter_writes(vm, "sda", 64 * MiB, 4, 64 * 1024, seed=4)

        result = api.backup(vm.uuid, str(work / "repo"), progress=write_during_backup)
        assert during, "the backup made no progress report"
        scatter_writes(vm, "vdb", 1024 * MiB, 8, 64 * 1024, seed=5)

        manifest = result.manifest
        assert manifest.level == "full" and manifest.domain_uuid == vm.uuid
        records = {d.disk.target: d for d in manifest.disks}
        assert records["vdb"].data_path == "qemu"
        assert records["sda"].data_path == "storage"  # a LUN never gets a QEMU job
        assert manifest.consistency["method"] == "pause"
        assert manifest.consistency["paused_ms"] > 0

        for disk in ("vdb", "sda"):
            out = work / f"restored-{disk}.raw"
            proc = rdm_backup("restore", vm.name, "--target", str(work / "repo"),
                              "--disk", disk, "--to", str(out), "--json")
            assert proc.returncode == 0, proc.stderr
            assert same_bytes(out, refs[disk]), f"{disk} differs from the point in time"
            assert os.stat(out).st_blocks * 512 < os.path.getsize(out) // 4  # sparse
        # and the source really moved on since the point
        assert not same_bytes(vm.loop, refs["vdb"])


def test_zeros_take_no_space() -> None:
    with lab_vm() as vm:
        repo = vm.workdir / "repo"
        # 10 MiB of data in 40 pieces of 256 KiB spread over the 1 GiB LUN
        for index in range(40):
            guest_write(vm.dom, "vdb", 0x30 + index, index * 25 * MiB + 512 * 1024, 256 * 1024)
        proc = rdm_backup("backup", vm.name, "--target", str(repo), "--disk", "vdb", "--json")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert set(doc) >= {"backup_id", "domain_uuid", "level", "disks"}
        disk = doc["disks"][0]
        assert disk["disk"] == "vdb" and disk["size"] == 1024 * MiB
        data_file = Path(doc["path"]) / "vdb.qcow2"
        on_disk = os.stat(data_file).st_blocks * 512
        assert on_disk <= 12 * MiB + 512 * 1024, on_disk
        assert disk["bytes_transferred"] == 10 * MiB


@pytest.mark.fault
def test_list_verify_and_flipped_byte(vm: LabVM) -> None:
    with rdmb_tmpdir() as work:
        repo = str(work / "repo")
        guest_write(vm.dom, "vdb", 0x5a, 5 * MiB, MiB)
        first = rdm_backup("backup", vm.name, "--target", repo, "--json")
        assert first.returncode == 0, first.stderr
        backup_id = json.loads(first.stdout)["backup_id"]

        listed = json.loads(rdm_backup("list", "--target", repo, "--json").stdout)
        assert [b["backup_id"] for b in listed] == [backup_id]
        assert listed[0]["level"] == "full" and listed[0]["created"]
        assert {d["disk"] for d in listed[0]["disks"]} == {"vdb", "sda"}

        ok = rdm_backup("verify", "--target", repo, vm.name)
        assert ok.returncode == 0, ok.stderr

        data_file = Path(json.loads(first.stdout)["path"]) / "vdb.qcow2"
        with open(data_file, "r+b") as stream:
            stream.seek(os.path.getsize(data_file) // 2)
            byte = stream.read(1)
            stream.seek(-1, os.SEEK_CUR)
            stream.write(bytes([byte[0] ^ 0xFF]))
        bad = rdm_backup("verify", "--target", repo, "--json")
        assert bad.returncode == 5
        report = json.loads(bad.stdout)
        assert [(d["disk"], d["ok"]) for d in report["disks"] if not d["ok"]] == [("vdb", False)]
        assert backup_id in bad.stderr and "vdb" in bad.stderr
        assert "Traceback" not in bad.stderr

        # a restore never writes silently wrong data
        out = work / "never.raw"
        refused = rdm_backup("restore", vm.name, "--target", repo, "--disk", "vdb",
                             "--to", str(out))
        assert refused.returncode == 5 and not out.exists()


@pytest.mark.bad_input
def test_bad_input_exit_codes(vm: LabVM) -> None:
    with rdmb_tmpdir() as work:
        repo = str(work / "repo")
        proc = rdm_backup("backup", "rdmb-no-such-domain", "--target", repo)
        assert proc.returncode == 3 and "not found" in proc.stderr
        assert proc.stderr.count("\n") == 1

        proc = rdm_backup("backup", vm.name, "--target", repo, "--disk", "vda")
        assert proc.returncode == 2
        assert "vda is not a raw disk" in proc.stderr and "qcow2" in proc.stderr

        proc = rdm_backup("backup", vm.name, "--target", repo, "--disk", "vdz")
        assert proc.returncode == 3

        proc = rdm_backup("backup", vm.name, "--target", repo, "--disk", "vdb")
        assert proc.returncode == 0, proc.stderr
        small = work / "small.raw"
        with open(small, "wb") as stream:
            stream.truncate(16 * MiB)
        proc = rdm_backup("restore", vm.name, "--target", repo, "--disk", "vdb",
                          "--to", str(small))
        assert proc.returncode == 2 and "too small" in proc.stderr
        assert os.path.getsize(small) == 16 * MiB

        proc = rdm_backup("restore", vm.name, "--target", repo, "--disk", "vdb", "--to", vm.loop)
        assert proc.returncode == 2 and "in use by running domain" in proc.stderr
        # the storage below a running domain's disks is in use as well
        for below in (vm.loop_file, vm.iscsi_file):
            proc = rdm_backup("restore", vm.name, "--target", repo, "--disk", "vdb",
                              "--to", str(below))
            assert proc.returncode == 2 and "in use by running domain" in proc.stderr, below

        proc = rdm_backup("restore", vm.name, "--target", repo, "--disk", "vdb",
                          "--to", str(work / "x.raw"), "--backup", "../../etc")
        assert proc.returncode == 2

        proc = rdm_backup("backup", vm.name)
        assert proc.returncode == 2 and proc.stderr.startswith("rdm-backup")
