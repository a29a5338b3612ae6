"""Fleecing a running domain's raw disk and writing a resync layer, on the real lab."""

from __future__ import annotations

import hashlib
import os
import random
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest

from libvirt_rdm_backup.engine.resync import resync_layer
from libvirt_rdm_backup.errors import OperationError
from libvirt_rdm_backup.qemu.blockdev import find_device
from libvirt_rdm_backup.qemu.fleece import FleecingExport, fleecing_export
from libvirt_rdm_backup.qemu.monitor import LibvirtMonitor, Monitor
from libvirt_rdm_backup.qemu.names import is_ours
from libvirt_rdm_backup.repository.chunkmap import chunkmap_of_layer, layer_map
from libvirt_rdm_backup.repository.chunks import ALGORITHM, CHUNK, ChunkMap
from tests.oracles import changed_chunks, images_equal, is_zero_chunk
from tools import labkit
from tools.labkit import alias_of, block_disk, guest_write, loop_device, make_file, unique_name

pytestmark = pytest.mark.lab

MiB = 1024 * 1024
SIZE = 256 * MiB
CHUNKS = SIZE // CHUNK


@dataclass
class Lab:
    dom: libvirt.virDomain
    monitor: Monitor
    node_name: str
    loop: str
    workdir: Path
    socket_dirs: list[str] = field(default_factory=list)  # NBD socket directories it made


@pytest.fixture
def lab(rdmb_tmp: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Lab]:
    """A running domain with a 256 MiB loop LUN full of data as vdb; the NBD socket
    directories this test's process makes are recorded (other tests make their own)."""
    made: list[str] = []
    mkdtemp = tempfile.mkdtemp

    def recording(*args: Any, **kwargs: Any) -> str:
        path = str(mkdtemp(*args, **kwargs))
        if os.path.basename(path).startswith("rdmb-nbd-"):
            made.append(path)
        return path

    monkeypatch.setattr(tempfile, "mkdtemp", recording)
    with ExitStack() as stack:
        disk = make_file(rdmb_tmp / "rdmb-lun.img", SIZE)
        loop = stack.enter_context(loop_device(disk))
        name = unique_name("rdmb-fleece")
        dom = stack.enter_context(labkit.test_domain(name, [block_disk("vdb", loop)]))
        monitor = LibvirtMonitor(dom)
        node = find_device(monitor, alias_of(dom, "vdb")[0]).node_name
        yield Lab(dom, monitor, node, loop, rdmb_tmp, made)


def raw_map(path: Path) -> ChunkMap:
    """The chunk map of a raw file, computed from scratch."""
    digests = bytearray()
    size = 0
    with open(path, "rb") as stream:
        while chunk := stream.read(CHUNK):
            digests += hashlib.sha256(chunk).digest()[:16]
            size += len(chunk)
    return ChunkMap(size, CHUNK, ALGORITHM, digests)


def assert_nothing_left(lab: Lab, layer: Path | None = None) -> None:
    nodes = [n["node-name"] for n in lab.monitor.execute("query-named-block-nodes")]
    assert [n for n in nodes if is_ours(n)] == []
    assert lab.monitor.execute("query-block-exports") == []
    assert lab.monitor.execute("query-jobs") == []
    assert [s for s in lab.monitor.execute("query-fdsets") if any(
        is_ours(str(f.get("opaque", ""))) for f in s.get("fds", []))] == []
    assert not (lab.workdir / "rdmb-scratch.qcow2").exists()
    assert [d for d in lab.socket_dirs if os.path.exists(d)] == []
    if layer is not None:
        for pid in os.listdir("/proc"):
            if pid.isdigit():
                try:
                    cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                except OSError:
                    continue
                assert not (b"qemu-nbd" in cmdline and str(layer).encode() in cmdline), pid


def test_fleecing_resync_writes_only_changed_chunks(lab: Lab) -> None:
    base = lab.workdir / "rdmb-base.qcow2"
    subprocess.run(["qemu-img", "convert", "-U", "-f", "raw", "-O", "qcow2", lab.loop,
                    str(base)], check=True)
    parent = chunkmap_of_layer(str(base), None, SIZE)
    assert parent == raw_map(Path(lab.loop))

    rng = random.Random(20261125)
    changed = sorted(rng.sample(range(CHUNKS), CHUNKS // 100))
    for n, index in enumerate(changed):
        if n % 10 == 0:  # the chunk becomes all zero
            guest_write(lab.dom, "vdb", 0, index * CHUNK, CHUNK)
        elif n % 3 == 0:  # a small write inside the chunk
            guest_write(lab.dom, "vdb", 0x5A, index * CHUNK + 8192, 4096)
        else:
            guest_write(lab.dom, "vdb", 0x40 + n % 64, index * CHUNK, CHUNK)

    reference = lab.workdir / "rdmb-point.raw"
    layer = lab.workdir / "rdmb-layer.qcow2"
    with fleecing_export(FleecingExport(
            lab.monitor, lab.node_name, "vdb", str(lab.workdir / "rdmb-scratch.qcow2"),
            SIZE)) as fleece:
        lab.dom.suspend()
        try:
            subprocess.run(["qemu-img", "convert", "-U", "-f", "raw", "-O", "raw", lab.loop,
                            str(reference)], check=True)
            uri = fleece.start()
        finally:
            lab.dom.resume()
        # After the point: overwrite changed and unchanged chunks, zero a data chunk.
        for index in [*changed[:5], *rng.sample(range(CHUNKS), 20)]:
            guest_write(lab.dom, "vdb", 0xEE, index * CHUNK, CHUNK)
        guest_write(lab.dom, "vdb", 0, 100 * CHUNK, 4 * CHUNK)

        # ... and keep writing while the export is read.
        stop = threading.Event()
        during: list[int] = []

        def keep_writing() -> None:
            writer = random.Random(7)
            while not stop.is_set():
                index = writer.randrange(CHUNKS)
                guest_write(lab.dom, "vdb", 0xDD, index * CHUNK, CHUNK)
                during.append(index)

        thread = threading.Thread(target=keep_writing, name="rdmb-guest-writes")
        thread.start()
        try:
            started = time.monotonic()
            new_map, written = resync_layer(uri, SIZE, parent, str(layer), base.name)
            elapsed = time.monotonic() - started
        finally:
            stop.set()
            thread.join()
        fleece.check()
        assert during
    assert_nothing_left(lab, layer)

    point = raw_map(reference)
    assert new_map == point
    assert changed_chunks(new_map, parent) == changed
    assert point != raw_map(Path(lab.loop))  # the writes after the point were not read
    assert images_equal(str(layer), str(reference), "qcow2", "raw")
    assert chunkmap_of_layer(str(layer), parent, SIZE) == new_map

    nonzero = [i for i in changed if not is_zero_chunk(point, i)]
    assert written == len(nonzero) * CHUNK
    in_layer = {e.start // CHUNK + k for e in layer_map(str(layer)) if e.present
                for k in range(e.length // CHUNK)}
    assert in_layer == set(changed)
    allocated = layer.stat().st_blocks * 512
    assert allocated < SIZE // 20
    print(f"\nresync of {SIZE // MiB} MiB with {len(changed)} changed chunks: {elapsed:.2f} s, "
          f"{written} bytes written, layer allocates {allocated} bytes, "
          f"{len(during)} guest writes during the resync")


def test_foreign_nbd_server_is_refused_and_nothing_is_left(lab: Lab) -> None:
    foreign = lab.workdir / "rdmb-foreign"
    foreign.mkdir()
    os.chown(foreign, *_qemu_ids())
    sock = foreign / "nbd.sock"
    lab.monitor.execute("nbd-server-start",
                        {"addr": {"type": "unix", "data": {"path": str(sock)}}})
    try:
        with pytest.raises(OperationError, match="already runs an NBD server"), \
                fleecing_export(FleecingExport(
                    lab.monitor, lab.node_name, "vdb",
                    str(lab.workdir / "rdmb-scratch.qcow2"), SIZE)) as fleece:
            fleece.start()
        assert_nothing_left(lab)
    finally:
        lab.monitor.execute("nbd-server-stop")

    # A failure in the body propagates unchanged and still leaves nothing behind.
    with pytest.raises(RuntimeError, match="rdmb body"), \
            fleecing_export(FleecingExport(
                lab.monitor, lab.node_name, "vdb", str(lab.workdir / "rdmb-scratch.qcow2"),
                SIZE)) as fleece:
        fleece.start()
        raise RuntimeError("rdmb body")
    assert_nothing_left(lab)


def _qemu_ids() -> tuple[int, int]:
    import pwd

    entry = pwd.getpwnam("libvirt-qemu")
    return entry.pw_uid, entry.pw_gid
