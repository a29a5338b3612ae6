"""Restore to the original devices found by identity, every disk at once, and a new domain from
a backup, on the real lab: a loop LUN and an iSCSI LUN on the loopback tgtd."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest
from lxml import etree

import tools.labkit as labkit
from libvirt_rdm_backup.storage import tgt
from tests.lab.domains import assert_running
from tools.labkit import (
    URI,
    LabVM,
    MiB,
    block_disk,
    guest_write,
    lab_vm,
    loop_device,
    rdm_backup,
    rdmb_tmpdir,
    remove_domain,
    same_bytes,
    snapshot_source,
    unique_name,
)

pytestmark = pytest.mark.lab
LOOP_SIZE = 64 * MiB


@dataclass
class Backed:
    """The VM, its repository with one backup of both disks, and the disks' bytes then."""

    vm: LabVM
    repo: Path
    backup_id: str
    refs: dict[str, Path]


def digest(path: Path | str) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as stream:
        while block := stream.read(4 * MiB):
            sha.update(block)
    return sha.hexdigest()


def scribble(path: Path | str, offset: int, pattern: int, length: int = 2 * MiB) -> None:
    """Overwrite part of a device or backing file from the host, as a broken guest might."""
    fd = os.open(path, os.O_WRONLY)
    try:
        os.pwrite(fd, bytes([pattern]) * length, offset)
        os.fsync(fd)
    finally:
        os.close(fd)


def disk_bytes(backed: Backed) -> dict[str, str]:
    return {"vdb": digest(backed.vm.loop), "sda": digest(backed.vm.iscsi_file)}


@pytest.fixture(scope="module")
def backed() -> Iterator[Backed]:
    with lab_vm(loop_size=LOOP_SIZE) as vm:
        guest_write(vm.dom, "vdb", 0x5A, MiB, 3 * MiB)
        guest_write(vm.dom, "sda", 0x6B, 5 * MiB, 2 * MiB)
        repo = vm.workdir / "repo"
        vm.dom.suspend()
        try:
            refs = snapshot_source(vm, vm.workdir / "ref")
            proc = rdm_backup("backup", vm.name, "--target", str(repo), "--json")
        finally:
            vm.dom.resume()
        assert proc.returncode == 0, proc.stderr
        yield Backed(vm, repo, json.loads(proc.stdout)["backup_id"], refs)


def restore(backed: Backed, *args: str) -> subprocess.CompletedProcess[str]:
    return rdm_backup("restore", backed.vm.name, "--target", str(backed.repo), *args)


def test_devices_in_use_by_the_running_domain_are_refused(backed: Backed) -> None:
    before = disk_bytes(backed)
    for disk in ("vdb", "sda"):
        proc = restore(backed, "--disk", disk, "--to-original")
        assert proc.returncode == 2, proc.stderr
        assert "in use by" in proc.stderr and proc.stderr.count("\n") == 1, proc.stderr
    assert disk_bytes(backed) == before
    assert_running(backed.vm.dom)
    backed.vm.dom.destroy()  # the rest restores onto the domain's devices while it is off


def test_dry_run_names_devices_and_identities_and_writes_nothing(backed: Backed) -> None:
    scribble(backed.vm.loop, 2 * MiB, 0x11)
    scribble(backed.vm.iscsi_file, 6 * MiB, 0x22)
    before = disk_bytes(backed)
    proc = restore(backed, "--all-disks", "--to-original", "--dry-run", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["dry_run"] is True and doc["mode"] == "to-original"
    entries = {d["disk"]: d for d in doc["disks"]}
    assert entries["vdb"]["path"] == backed.vm.loop
    assert entries["vdb"]["matched_on"].startswith(f"loop backing file {backed.vm.loop_file} ")
    assert entries["sda"]["path"] == backed.vm.iscsi.url
    assert entries["sda"]["matched_on"].startswith("VPD 0x83 designators naa.")
    assert "on the local tgtd" in entries["sda"]["matched_on"]
    assert {d["size"] for d in doc["disks"]} == {LOOP_SIZE, 64 * MiB}
    assert all(d["data_bytes"] is None for d in doc["disks"])
    assert disk_bytes(backed) == before
    text = restore(backed, "--all-disks", "--to-original", "--dry-run")
    assert text.returncode == 0 and "would restore vdb" in text.stdout, text.stderr


def test_a_lun_with_another_serial_is_refused(backed: Backed) -> None:
    lun = tgt.find_lun(backed.vm.iscsi.iqn, backed.vm.iscsi.lun)
    assert lun is not None

    def set_serial(serial: str) -> None:
        subprocess.run(["tgtadm", "--lld", "iscsi", "--op", "update", "--mode", "logicalunit",
                        "--tid", str(backed.vm.iscsi.tid), "--lun", str(backed.vm.iscsi.lun),
                        "--params", f"scsi_sn={serial}"], check=True)

    before = disk_bytes(backed)
    set_serial("rdmbother1")
    try:
        proc = restore(backed, "--all-disks", "--to-original")
    finally:
        set_serial(lun.scsi_sn)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        f"rdm-backup: error: sda: {backed.vm.iscsi.url} has serial rdmbother1, the backup's "
        f"LUN had {lun.scsi_sn}")
    assert disk_bytes(backed) == before  # vdb, which matched, was not written either


def test_both_disks_go_back_to_their_original_devices(backed: Backed) -> None:
    proc = restore(backed, "--all-disks", "--to-original", "--json")
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["backup_id"] == backed.backup_id and doc["dry_run"] is False
    entries = {d["disk"]: d for d in doc["disks"]}
    assert set(entries) == {"vdb", "sda"}
    assert entries["vdb"]["zeroed_bytes"] >= 2 * MiB  # the scribbled range
    assert all(d["data_bytes"] > 0 for d in doc["disks"])
    assert same_bytes(backed.vm.loop, backed.refs["vdb"])
    assert same_bytes(backed.vm.iscsi_file, backed.refs["sda"])


def test_every_disk_into_a_directory_then_refused_over_existing_files(backed: Backed) -> None:
    with rdmb_tmpdir() as out:
        proc = restore(backed, "--all-disks", "--to-dir", str(out), "--json")
        assert proc.returncode == 0, proc.stderr
        doc = json.loads(proc.stdout)
        assert doc["mode"] == "to-dir"
        assert sorted((d["disk"], d["path"]) for d in doc["disks"]) == [
            ("sda", str(out / "sda.raw")), ("vdb", str(out / "vdb.raw"))]
        for disk in ("vdb", "sda"):
            assert same_bytes(out / f"{disk}.raw", backed.refs[disk])
            assert os.stat(out / f"{disk}.raw").st_blocks * 512 < 16 * MiB  # sparse
        again = restore(backed, "--all-disks", "--to-dir", str(out))
        assert again.returncode == 2 and "exists" in again.stderr, again.stderr


def _disk_sources(dom: libvirt.virDomain) -> dict[str, str]:
    root = etree.fromstring(dom.XMLDesc(0).encode())
    found = {}
    for disk in root.iter("disk"):
        source = disk.find("source")
        target = disk.find("target")
        if source is not None and target is not None:
            found[str(target.get("dev"))] = str(source.get("file") or source.get("dev"))
    return found


def test_a_new_domain_runs_on_the_restored_files(backed: Backed) -> None:
    name = unique_name("rdmb-restored")
    with rdmb_tmpdir() as out:
        proc = restore(backed, "--all-disks", "--to-dir", str(out), "--define", name, "--start",
                       "--json")
        assert proc.returncode == 0, proc.stderr
        conn = libvirt.open(URI)
        try:
            dom = conn.lookupByName(name)
            uuid = dom.UUIDString()
            try:
                doc = json.loads(proc.stdout)
                assert doc["defined"] == name and doc["started"] is True
                assert_running(dom)
                assert uuid != backed.vm.uuid
                assert _disk_sources(dom) == {"vda": str(backed.vm.qcow2),
                                              "vdb": str(out / "vdb.raw"),
                                              "sda": str(out / "sda.raw")}
                (out / "again").mkdir()
                taken = restore(backed, "--all-disks", "--to-dir", str(out / "again"),
                                "--define", name)
                assert taken.returncode == 2 and "already exists" in taken.stderr, taken.stderr
                assert list((out / "again").iterdir()) == []
            finally:
                remove_domain(uuid)
        finally:
            conn.close()


def test_a_new_domain_runs_on_the_original_devices(backed: Backed) -> None:
    name = unique_name("rdmb-restored")
    proc = restore(backed, "--all-disks", "--to-original", "--define", name, "--start", "--json")
    assert proc.returncode == 0, proc.stderr
    conn = libvirt.open(URI)
    try:
        dom = conn.lookupByName(name)
        uuid = dom.UUIDString()
        try:
            assert json.loads(proc.stdout)["defined"] == name
            assert_running(dom)
            root = etree.fromstring(dom.XMLDesc(0).encode())
            sources = {str(d.find("target").get("dev")): d.find("source")  # type: ignore
                       for d in root.iter("disk")}
            assert sources["vdb"].get("dev") == backed.vm.loop  # type: ignore[union-attr]
            assert sources["sda"].get("name") == (  # type: ignore[union-attr]
                f"{backed.vm.iscsi.iqn}/{backed.vm.iscsi.lun}")
        finally:
            remove_domain(uuid)
    finally:
        conn.close()
    assert same_bytes(backed.vm.loop, backed.refs["vdb"])
    assert same_bytes(backed.vm.iscsi_file, backed.refs["sda"])


# -- loop devices that are not the original ------------------------------------------------------

def _offline_backup(work: Path, disk_file: Path) -> tuple[str, Path]:
    """A shut-off domain with one loop disk over ``disk_file``, backed up; it is undefined
    and its loop device detached afterwards."""
    repo = work / "repo"
    name = unique_name("rdmb-vm")
    with loop_device(disk_file) as loop, labkit.test_domain(name, [block_disk("vdb", loop)],
                                                      start=False):
        proc = rdm_backup("backup", name, "--target", str(repo), "--json")
        assert proc.returncode == 0, proc.stderr
    return name, repo


def test_another_loop_device_of_the_same_size_is_refused() -> None:
    with rdmb_tmpdir() as work:
        original, other = work / "lun.img", work / "other.img"
        for path in (original, other):
            with open(path, "wb") as stream:
                stream.truncate(16 * MiB)
        name, repo = _offline_backup(work, original)
        with loop_device(other) as loop:
            before = digest(loop)
            proc = rdm_backup("restore", name, "--target", str(repo), "--disk", "vdb",
                              "--to-original")
            assert proc.returncode == 2, proc.stderr
            assert f"vdb: no loop device of this host has {original} (inode " in proc.stderr
            assert digest(loop) == before


def test_a_smaller_original_device_is_refused() -> None:
    with rdmb_tmpdir() as work:
        original = work / "lun.img"
        with open(original, "wb") as stream:
            stream.truncate(16 * MiB)
        name, repo = _offline_backup(work, original)
        os.truncate(original, 8 * MiB)
        with loop_device(original) as loop:
            proc = rdm_backup("restore", name, "--target", str(repo), "--disk", "vdb",
                              "--to-original", "--force")
            assert proc.returncode == 2, proc.stderr
            assert proc.stderr.strip() == (
                f"rdm-backup: error: vdb: {loop} is 8 MiB, the disk is 16 MiB")
