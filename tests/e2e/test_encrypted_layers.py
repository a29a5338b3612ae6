"""``--encrypt-key-file``: LUKS-encrypted layers in a file repository, on the real lab.

Both raw disks hold a known text. An encrypted full (the CLI, ``-vv``) and an encrypted
incremental are taken: every point restores byte-identical with the key; without it,
or with another key, restore is refused (exit 2) and nothing is written; plain
backups and backups with another key are refused; no file of the repository holds the
text; the key never appears in any process's argv while the tool runs, in its ``-vv``
output or in the manifests; verify needs no key, verify --deep reads through QEMU.
Encrypted points have no chunk map (no digest of a plain chunk is stored), also in a chain
that starts with a plain full. The same in an NBD volume, whose file on the backup server
holds neither.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.repository.chunks import CHUNK, chunk_digest
from tests.lab.volume_server import VolumeServer
from tools.labkit import (
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

MARK = b"PLAINTEXT-MARK-7Q"


@contextmanager
def argv_watch(secret: bytes) -> Iterator[list[str]]:
    """Read every process's ``/proc/PID/cmdline`` over and over while the block runs; the
    yielded list gets the pids whose argv held ``secret``."""
    found: list[str] = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.005):  # a few ms apart: QEMU's tools live for seconds
            for pid in os.listdir("/proc"):
                if not pid.isdigit():
                    continue
                try:
                    with open(f"/proc/{pid}/cmdline", "rb") as stream:
                        if secret in stream.read():
                            found.append(pid)
                except OSError:
                    continue

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    try:
        yield found
    finally:
        stop.set()
        thread.join()


def fill_text(path: str | Path, length: int) -> None:
    lines = b"".join(MARK + b" line %08d of a known text\n" % n for n in range(length // 40))
    with open(path, "r+b") as stream:
        stream.write(lines[:length])
        os.fsync(stream.fileno())


def point(vm: LabVM, index: int) -> dict[str, Path]:
    vm.dom.suspend()
    try:
        return snapshot_source(vm, vm.workdir / f"ref-{index}")
    finally:
        vm.dom.resume()


def files_holding(root: str, needle: bytes) -> list[str]:
    """The files under ``root`` that contain ``needle`` (``grep -rl``)."""
    done = subprocess.run(["grep", "-rlF", needle.decode(), root], capture_output=True,
                          check=False)
    return done.stdout.decode().split()


@pytest.fixture
def enc_vm() -> Iterator[LabVM]:
    with lab_vm(loop_size=32 * MiB, lun_size=16 * MiB) as vm:
        fill_text(vm.loop, 8 * MiB)
        fill_text(vm.iscsi_file, 4 * MiB)
        yield vm


def test_encrypted_chain(enc_vm: LabVM) -> None:
    vm = enc_vm
    repo = str(vm.workdir / "repo")
    secret = b"k-" + secrets.token_hex(24).encode()
    key, wrong = vm.workdir / "key", vm.workdir / "wrong"
    key.write_bytes(secret)
    wrong.write_bytes(b"k-" + secrets.token_hex(24).encode())
    refs = [point(vm, 0)]
    with argv_watch(secret) as leaked:
        done = rdm_backup("-vv", "backup", vm.name, "--target", repo, "--json",
                          "--encrypt-key-file", str(key))
        assert done.returncode == 0, done.stderr
        for n in range(4):
            guest_write(vm.dom, "vdb", 0x41 + n, (12 + 2 * n) * MiB, MiB)
        refs.append(point(vm, 1))
        inc = api.backup(vm.name, repo, level="incremental", encrypt_key_file=str(key))
        ids = [json.loads(done.stdout)["backup_id"], inc.manifest.backup_id]
        for backup_id, ref in zip(ids, refs, strict=True):
            for disk, path in ref.items():
                out = vm.workdir / f"out-{disk}.raw"
                restored = rdm_backup("restore", vm.name, "--target", repo, "--disk", disk,
                                      "--to", str(out), "--backup", backup_id,
                                      "--encrypt-key-file", str(key))
                assert restored.returncode == 0, restored.stderr
                assert same_bytes(out, path), f"{disk} of {backup_id}"
                out.unlink()
        deep = rdm_backup("verify", "--target", repo, "--deep", "--encrypt-key-file", str(key))
        assert deep.returncode == 0, deep.stderr + deep.stdout
    assert leaked == []
    assert secret not in (done.stdout + done.stderr).encode()
    assert "object-add" in done.stderr  # -vv logs the QMP commands, the secret's too
    disks = json.loads(done.stdout)["disks"]
    assert {d["disk"] for d in disks} == {"vdb", "sda"}
    assert inc.manifest.disk("vdb").level == "incremental"  # type: ignore[union-attr]
    for manifest in api.list_backups(repo, vm.uuid):
        assert {d.encryption["format"] for d in manifest.disks  # type: ignore[index]
                } == {"luks"}
    # the repository holds neither the text nor the key
    assert files_holding(repo, MARK) == []
    assert files_holding(repo, secret) == []

    out = vm.workdir / "refused.raw"
    for extra in ([], ["--encrypt-key-file", str(wrong)]):
        refused = rdm_backup("restore", vm.name, "--target", repo, "--disk", "vdb",
                             "--to", str(out), *extra)
        assert refused.returncode == 2, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
        assert not out.exists() and not list(vm.workdir.glob(".refused.raw*"))
    for extra in ([], ["--encrypt-key-file", str(wrong)],
                  ["--encrypt-key-file", str(key), "--compress"]):
        refused = rdm_backup("backup", vm.name, "--target", repo, *extra)
        assert refused.returncode == 2, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    assert len(api.list_backups(repo, vm.uuid)) == 2
    plain = rdm_backup("verify", "--target", repo)  # the digests need no key
    assert plain.returncode == 0, plain.stderr
    no_key = rdm_backup("verify", "--target", repo, "--deep")
    assert no_key.returncode == 2, no_key.stderr

    # no chunk map: neither a file nor a record, and no digest of a plain chunk anywhere
    assert not list(Path(repo).rglob("*.chunks"))
    for manifest in api.list_backups(repo, vm.uuid):
        assert [(d.chunk_map, d.chunk_map_digest) for d in manifest.disks] == [(None, None)] * 2
    assert plain_digests_in(repo, refs[1]) == 0

    # another incremental (auto: tracking is intact), then a prune merges the first one into
    # it: encrypted layers on both sides, no chunk map expected
    guest_write(vm.dom, "vdb", 0x51, 20 * MiB, MiB)
    refs.append(point(vm, 2))
    last = api.backup(vm.name, repo, encrypt_key_file=str(key))
    assert last.manifest.disk("vdb").level == "incremental"  # type: ignore[union-attr]
    rules = ["prune", vm.uuid, "--target", repo, "--keep-last", "1"]
    refused = rdm_backup(*rules)
    assert refused.returncode == 2, refused.stderr
    pruned = rdm_backup(*rules, "--encrypt-key-file", str(key))
    assert pruned.returncode == 0, pruned.stderr
    kept = [m.backup_id for m in api.list_backups(repo, vm.uuid)]
    assert kept == [ids[0], last.manifest.backup_id]
    for disk in ("vdb", "sda"):
        out = vm.workdir / f"after-prune-{disk}.raw"
        api.restore(vm.name, repo, disk, str(out), encrypt_key_file=str(key))
        assert same_bytes(out, refs[2][disk]), disk
    assert files_holding(repo, MARK) == []
    assert not list(Path(repo).rglob("*.chunks"))
    assert api.verify(repo, deep=True, encrypt_key_file=str(key)).ok


def test_encrypted_resync(enc_vm: LabVM) -> None:
    """A resync after an encrypted point (which has no chunk map): read through a fleecing
    export, written by qemu-nbd into an encrypted layer."""
    vm = enc_vm
    repo = str(vm.workdir / "repo")
    key = vm.workdir / "key"
    key.write_bytes(b"k-" + secrets.token_hex(24).encode())
    api.backup(vm.name, repo, encrypt_key_file=str(key))
    fill_text(vm.loop, 2 * MiB)  # under QEMU's feet: only a resync sees it
    guest_write(vm.dom, "vdb", 0x51, 20 * MiB, MiB)
    ref = point(vm, 1)
    last = api.backup(vm.name, repo, level="resync", encrypt_key_file=str(key))
    assert last.manifest.disk("vdb").level == "resync"  # type: ignore[union-attr]
    for disk in ("vdb", "sda"):
        out = vm.workdir / f"after-resync-{disk}.raw"
        api.restore(vm.name, repo, disk, str(out), encrypt_key_file=str(key))
        assert same_bytes(out, ref[disk]), disk
    assert files_holding(repo, MARK) == []
    assert api.verify(repo, deep=True, encrypt_key_file=str(key)).ok


def test_plain_full_then_encrypted_incrementals() -> None:
    """A chain mixing points with chunk maps (a plain full) and without (encrypted
    incrementals on it): vdb copied by QEMU; sda, a LUN copied from storage snapshots, first
    compared with the plain full's map, then its changed ranges copied over an encrypted
    point; then an encrypted full. Every point restores, verify and verify --deep pass."""
    with lab_vm(loop_size=32 * MiB, lun_size=16 * MiB, reflink=True) as vm:
        fill_text(vm.loop, 8 * MiB)
        fill_text(vm.iscsi_file, 4 * MiB)
        repo = str(vm.workdir / "repo")
        key = vm.workdir / "key"
        key.write_bytes(b"k-" + secrets.token_hex(24).encode())
        refs = [point(vm, 0)]
        results = [api.backup(vm.name, repo)]
        assert plain_digests_in(repo, refs[0]) > 0  # the plain full's chunk maps hold them
        for n, level in enumerate(("auto", "auto", "full")):
            guest_write(vm.dom, "vdb", 0x41 + n, (12 + 2 * n) * MiB, MiB)
            guest_write(vm.dom, "sda", 0x41 + n, MiB + 4096 * (n + 1), 96 * 1024)
            guest_write(vm.dom, "sda", 0, (2 + n) * MiB, 128 * 1024)  # zeros over the text
            refs.append(point(vm, n + 1))
            results.append(api.backup(vm.name, repo, level=level, encrypt_key_file=str(key)))
        full_id = results[0].manifest.backup_id
        for record in results[0].manifest.disks:
            assert record.chunk_map is not None and record.encryption is None
        for result in results[1:]:
            for record in result.manifest.disks:
                assert record.level == ("full" if result is results[-1] else "incremental")
                assert record.encryption is not None
                assert (record.chunk_map, record.chunk_map_digest) == (None, None)
            assert result.manifest.disk("sda").data_path == "snapshot"  # type: ignore[union-attr]
        assert {p.parent.name for p in Path(repo).rglob("*.chunks")} == {full_id}
        for result, ref in zip(results, refs, strict=True):
            for disk, path in ref.items():
                out = vm.workdir / f"out-{disk}.raw"
                api.restore(vm.name, repo, disk, str(out),
                            backup_id=result.manifest.backup_id, encrypt_key_file=str(key))
                assert same_bytes(out, path), f"{disk} of {result.manifest.backup_id}"
                out.unlink()
        assert api.verify(repo).ok
        assert api.verify(repo, deep=True, encrypt_key_file=str(key)).ok


def plain_digests_in(root: str, ref: dict[str, Path], sample: int = 8) -> int:
    """How many chunk digests (as chunk maps hold them) of the first ``sample`` non-zero
    chunks of each raw image in ``ref`` appear in the files under ``root``."""
    wanted: list[bytes] = []
    for path in ref.values():
        data = path.read_bytes()
        pieces = (data[at:at + CHUNK] for at in range(0, len(data), CHUNK))
        wanted += [chunk_digest(p) for p in pieces if p.count(0) != len(p)][:sample]
    found = 0
    for file in Path(root).rglob("*"):
        if file.is_file():
            blob = file.read_bytes()
            found += sum(digest in blob for digest in wanted)
    return found


def test_encrypted_chain_in_an_nbd_volume(enc_vm: LabVM) -> None:
    vm = enc_vm
    secret = b"k-" + secrets.token_hex(24).encode()
    key, wrong = vm.workdir / "key", vm.workdir / "wrong"
    key.write_bytes(secret)
    wrong.write_bytes(b"k-" + secrets.token_hex(24).encode())
    with rdmb_tmpdir() as work:
        server = VolumeServer(work / "volume.img")
        server.start()
        try:
            refs = [point(vm, 0)]
            with argv_watch(secret) as leaked:
                full = api.backup(vm.name, server.uri, encrypt_key_file=str(key))
                for n, level in enumerate(("incremental", "incremental")):
                    guest_write(vm.dom, "vdb", 0x61 + n, (14 + 2 * n) * MiB, MiB)
                    refs.append(point(vm, n + 1))
                    api.backup(vm.name, server.uri, level=level, encrypt_key_file=str(key))
                ids = [m.backup_id for m in api.list_backups(server.uri, vm.uuid)]
                for backup_id, ref in zip(ids, refs, strict=True):
                    out = vm.workdir / "out.raw"
                    api.restore(vm.name, server.uri, "vdb", str(out), backup_id=backup_id,
                                encrypt_key_file=str(key))
                    assert same_bytes(out, ref["vdb"]), backup_id
                    out.unlink()
                pruned = rdm_backup("prune", vm.uuid, "--target", server.uri, "--keep-last",
                                    "1", "--encrypt-key-file", str(key))
                assert pruned.returncode == 0, pruned.stderr
                assert ids[1] not in [m.backup_id for m in api.list_backups(server.uri)]
                api.restore(vm.name, server.uri, "vdb", str(out), encrypt_key_file=str(key))
                assert same_bytes(out, refs[-1]["vdb"])
                assert api.verify(server.uri, deep=True, encrypt_key_file=str(key)).ok
            assert leaked == []
            assert {d.encryption["format"] for d in full.manifest.disks  # type: ignore[index]
                    } == {"luks"}
            out = vm.workdir / "refused.raw"
            for extra in ([], ["--encrypt-key-file", str(wrong)]):
                refused = rdm_backup("restore", vm.name, "--target", server.uri, "--disk",
                                     "vdb", "--to", str(out), *extra)
                assert refused.returncode == 2, refused.stderr
                assert not out.exists()
                refused = rdm_backup("backup", vm.name, "--target", server.uri, *extra)
                assert refused.returncode == 2, refused.stderr
            assert api.verify(server.uri).ok  # the digests need no key
        finally:
            server.stop()
        # the volume file (the backup server's disk) holds neither the text nor the key
        assert files_holding(str(work), MARK) == []
        assert files_holding(str(work), secret) == []


@contextmanager
def libvirtd_debug_log(path: Path) -> Iterator[Path]:
    """libvirtd logs at debug level, QMP traffic included, into ``path`` while the block
    runs (``virt-admin``, no restart); its own outputs and filters are put back after."""

    def current(what: str) -> str:
        shown = subprocess.run(["virt-admin", what], capture_output=True, text=True,
                               check=True).stdout
        return shown.split(":", 1)[1].strip() if ":" in shown else ""

    outputs, filters = current("daemon-log-outputs"), current("daemon-log-filters")
    subprocess.run(["virt-admin", "daemon-log-filters", "1:qemu 1:security 3:*"], check=True)
    subprocess.run(["virt-admin", "daemon-log-outputs", f"1:file:{path}"], check=True)
    try:
        yield path
    finally:
        subprocess.run(["virt-admin", "daemon-log-outputs", outputs or "3:stderr"], check=False)
        subprocess.run(["virt-admin", "daemon-log-filters", filters], check=False)


@pytest.mark.serial  # turns libvirtd's debug log on for every client
def test_the_key_is_not_in_libvirtds_debug_log(enc_vm: LabVM) -> None:
    """The key reaches the guest's QEMU through an fd libvirt passes, never in a QMP
    message that libvirtd logs at debug level."""
    vm = enc_vm
    repo = str(vm.workdir / "repo")
    secret = b"k-" + secrets.token_hex(24).encode()
    key = vm.workdir / "key"
    key.write_bytes(secret)
    with libvirtd_debug_log(vm.workdir / "libvirtd-debug.log") as log:
        api.backup(vm.name, repo, encrypt_key_file=str(key))
        guest_write(vm.dom, "vdb", 0x5A, 2 * MiB, MiB)
        inc = api.backup(vm.name, repo, level="incremental", encrypt_key_file=str(key))
        out = vm.workdir / "out-vdb.raw"
        api.restore(vm.name, repo, "vdb", str(out), encrypt_key_file=str(key))
    assert same_bytes(out, point(vm, 9)["vdb"])
    logged = log.read_bytes()
    assert b"blockdev-backup" in logged and b"add-fd" in logged  # QMP traffic was logged
    assert b'"secret"' in logged or b"qom-type" in logged
    assert secret not in logged
    record = inc.manifest.disk("vdb")
    assert record is not None and record.level == "incremental"
