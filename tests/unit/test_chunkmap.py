"""Chunk digest maps: digests of real qcow2 layers against the raw bytes, file format."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import struct
import subprocess
from pathlib import Path

import pytest

from libvirt_rdm_backup.errors import RepositoryError
from libvirt_rdm_backup.repository.chunkmap import chunkmap_of_layer
from libvirt_rdm_backup.repository.chunks import (
    ALGORITHM,
    CHUNK,
    DIGEST_SIZE,
    MAGIC,
    ZERO_DIGEST,
    ChunkMap,
    chunk_count,
    zero_digest,
)
from tests.oracles import changed_chunks, is_zero_chunk

KiB = 1024
MiB = 1024 * KiB
SIZE = 4 * MiB + 3 * 512  # a short last chunk

pytestmark = pytest.mark.skipif(
    shutil.which("qemu-img") is None or shutil.which("qemu-io") is None,
    reason="qemu-img and qemu-io are needed",
)


def qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def qemu_io(path: Path, *commands: str, fmt: str = "qcow2") -> None:
    argv = ["qemu-io", "-f", fmt]
    for command in commands:
        argv += ["-c", command]
    proc = subprocess.run([*argv, str(path)], check=True, capture_output=True, text=True)
    assert "error" not in proc.stdout.lower() + proc.stderr.lower(), proc.stdout + proc.stderr


def make_image(path: Path, size: int = SIZE, backing: Path | None = None,
               cluster_size: int = CHUNK) -> Path:
    argv = ["create", "-q", "-f", "qcow2", "-o", f"cluster_size={cluster_size}"]
    if backing is not None:
        argv += ["-b", backing.name, "-F", "qcow2"]
    qemu_img(*argv, str(path), str(size))
    return path


def reference_map(image: Path, tmp: Path) -> ChunkMap:
    """The map computed from scratch over the raw contents (qemu-img convert)."""
    raw = tmp / f"{image.name}.rdmb-ref.raw"
    qemu_img("convert", "-f", "qcow2", "-O", "raw", str(image), str(raw))
    data = raw.read_bytes()
    raw.unlink()
    digests = b"".join(
        hashlib.sha256(data[i : i + CHUNK]).digest()[:16]
        for i in range(0, len(data), CHUNK)
    )
    return ChunkMap(len(data), CHUNK, ALGORITHM, digests)


@pytest.fixture
def work(tmp_path: Path) -> Path:
    path = tmp_path / "rdmb-chunkmap"
    path.mkdir()
    return path


@pytest.fixture
def full(work: Path) -> Path:
    image = make_image(work / "rdmb-full.qcow2")
    qemu_io(
        image,
        "write -P 0xab 0 200k",  # chunks 0-3, the last one partly
        "write -z 1M 128k",  # zero clusters
        "write -P 0x11 3M 64k",
        "write -P 0x22 4M 1536",  # the short last chunk
    )
    return image


def test_zero_digests() -> None:
    assert ZERO_DIGEST == hashlib.sha256(bytes(CHUNK)).digest()[:16]
    assert len(ZERO_DIGEST) == DIGEST_SIZE
    assert zero_digest(1536) == hashlib.sha256(bytes(1536)).digest()[:16]
    assert zero_digest(1536) != ZERO_DIGEST
    zero = ChunkMap.zero(SIZE)
    assert zero.count == chunk_count(SIZE) == 65
    assert all(is_zero_chunk(zero, i) for i in range(zero.count))
    assert zero.digest(64) == zero_digest(1536)


def test_full_image_matches_raw_contents(work: Path, full: Path) -> None:
    got = chunkmap_of_layer(str(full), None, SIZE)
    assert got == reference_map(full, work)
    assert not is_zero_chunk(got, 0) and not is_zero_chunk(got, 3) and is_zero_chunk(got, 4)
    assert is_zero_chunk(got, 16) and not is_zero_chunk(got, 48) and not is_zero_chunk(got, 64)


def test_empty_image_is_all_zero(work: Path) -> None:
    image = make_image(work / "rdmb-empty.qcow2")
    assert chunkmap_of_layer(str(image), None, SIZE) == ChunkMap.zero(SIZE)


def test_layer_keeps_parent_digests_and_reads_only_its_clusters(work: Path, full: Path) -> None:
    parent = chunkmap_of_layer(str(full), None, SIZE)
    layer = make_image(work / "rdmb-layer.qcow2", backing=full)
    qemu_io(
        layer,
        "write -P 0xcd 64k 64k",  # chunk 1 overwritten
        "write -z 3M 64k",  # chunk 48 becomes zero
        "write -P 0x01 2M 1k",  # chunk 32: a small write, the cluster is copied up
        "write -P 0x33 4M 512",  # part of the short last chunk
    )
    got = chunkmap_of_layer(str(layer), parent, SIZE)
    assert got == reference_map(layer, work)
    assert changed_chunks(got, parent) == [1, 32, 48, 64]
    assert is_zero_chunk(got, 48)

    # Chunks outside the layer are never read: a made-up parent digest survives.
    fake = bytearray(parent.digests)
    fake[5 * DIGEST_SIZE : 6 * DIGEST_SIZE] = b"\x5a" * DIGEST_SIZE
    kept = chunkmap_of_layer(str(layer), ChunkMap(SIZE, CHUNK, ALGORITHM, fake), SIZE)
    assert kept.digest(5) == b"\x5a" * DIGEST_SIZE
    assert changed_chunks(kept, got) == [5]


def test_layer_without_parent_map_is_refused(work: Path, full: Path) -> None:
    layer = make_image(work / "rdmb-layer.qcow2", backing=full)
    qemu_io(layer, "write -P 0xcd 64k 64k")
    with pytest.raises(RepositoryError, match="backing chain"):
        chunkmap_of_layer(str(layer), None, SIZE, lower=[str(full)])


def test_layer_over_an_empty_base_needs_no_parent(work: Path) -> None:
    base = make_image(work / "rdmb-base.qcow2")
    layer = make_image(work / "rdmb-layer.qcow2", backing=base)
    qemu_io(layer, "write -P 0x44 128k 64k")
    assert chunkmap_of_layer(str(layer), None, SIZE, lower=[str(base)]) == reference_map(
        layer, work)


def test_parent_of_another_size_is_refused(work: Path, full: Path) -> None:
    with pytest.raises(RepositoryError, match="does not fit"):
        chunkmap_of_layer(str(full), ChunkMap.zero(SIZE - 512), SIZE)
    with pytest.raises(RepositoryError, match="expected"):
        chunkmap_of_layer(str(full), None, SIZE + 512)


def test_compressed_clusters_are_read_through_the_chain(work: Path, full: Path) -> None:
    compressed = work / "rdmb-compressed.qcow2"
    qemu_img("convert", "-c", "-f", "qcow2", "-O", "qcow2", str(full), str(compressed))
    assert chunkmap_of_layer(str(compressed), None, SIZE) == reference_map(full, work)


def test_small_clusters_split_chunks(work: Path, full: Path) -> None:
    parent = chunkmap_of_layer(str(full), None, SIZE)
    layer = make_image(work / "rdmb-small.qcow2", backing=full, cluster_size=4096)
    qemu_io(layer, "write -P 0x55 68k 4k", "write -z 8k 4k", "write -P 0x66 2M 64k")
    got = chunkmap_of_layer(str(layer), parent, SIZE, lower=[str(full)])
    assert got == reference_map(layer, work)
    assert changed_chunks(got, parent) == [0, 1, 32]


def test_the_chain_is_the_one_given_not_the_one_the_header_names(work: Path, full: Path
                                                                 ) -> None:
    """Chunks read through the chain come from the layers given, never from the file the
    layer's header names (here a file that must not be read)."""
    parent = chunkmap_of_layer(str(full), None, SIZE)
    layer = make_image(work / "rdmb-small.qcow2", backing=full, cluster_size=4096)
    qemu_io(layer, "write -P 0x55 68k 4k")
    expected = chunkmap_of_layer(str(layer), parent, SIZE, lower=[str(full)])
    decoy = work / "rdmb-decoy.raw"
    decoy.write_bytes(b"\x77" * SIZE)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(decoy), "-F", "raw", str(layer))
    os.chmod(decoy, 0)
    before = os.stat(decoy).st_atime_ns
    assert chunkmap_of_layer(str(layer), parent, SIZE, lower=[str(full)]) == expected
    assert os.stat(decoy).st_atime_ns == before


def test_save_load_round_trip(work: Path, full: Path) -> None:
    cmap = chunkmap_of_layer(str(full), None, SIZE)
    path = work / "rdmb.chunkmap"
    cmap.save(str(path))
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert ChunkMap.load(str(path)) == cmap
    cmap.save(str(path))  # replaces atomically
    assert ChunkMap.load(str(path)) == cmap
    assert [p.name for p in work.iterdir() if p.name.endswith(".tmp")] == []
    empty = ChunkMap.zero(0)
    empty.save(str(path))
    assert ChunkMap.load(str(path)) == empty


def _header(data: bytes) -> tuple[dict[str, object], bytes]:
    (length,) = struct.unpack_from(">I", data, len(MAGIC))
    start = len(MAGIC) + 4
    return json.loads(data[start : start + length]), data[start + length :]


def _with_header(header: dict[str, object], body: bytes) -> bytes:
    head = json.dumps(header).encode()
    return MAGIC + struct.pack(">I", len(head)) + head + body


def test_malformed_files_are_refused(work: Path) -> None:
    cmap = ChunkMap.zero(SIZE)
    path = work / "rdmb.chunkmap"
    cmap.save(str(path))
    good = path.read_bytes()
    header, body = _header(good)
    flipped = bytearray(body)
    flipped[100] ^= 1
    cases = {
        "empty": b"",
        "magic": b"XXXXXXXX" + good[8:],
        "truncated": good[:-1],
        "longer": good + b"\0",
        "header length": MAGIC + struct.pack(">I", 1 << 30) + good[12:],
        "not json": MAGIC + struct.pack(">I", 3) + b"{x}" + body,
        "not an object": _with_header([], body),  # type: ignore[arg-type]
        "format": _with_header({**header, "format": "other"}, body),
        "version": _with_header({**header, "version": 2}, body),
        "algorithm": _with_header({**header, "algorithm": "sha256"}, body),
        "count": _with_header({**header, "count": 64}, body),
        "size": _with_header({**header, "size": -1}, body),
        "size type": _with_header({**header, "size": "4M"}, body),
        "checksum": _with_header(header, bytes(flipped)),
    }
    for name, data in cases.items():
        bad = work / f"rdmb-bad-{name.replace(' ', '-')}.chunkmap"
        bad.write_bytes(data)
        with pytest.raises(RepositoryError, match="malformed"):
            ChunkMap.load(str(bad))
    with pytest.raises(RepositoryError, match="cannot read"):
        ChunkMap.load(str(work / "rdmb-missing.chunkmap"))


def test_changed_chunks_and_geometry() -> None:
    first = ChunkMap.zero(SIZE)
    digests = bytearray(first.digests)
    for index in (0, 7, 64):
        digests[index * DIGEST_SIZE] ^= 0xFF
    second = ChunkMap(SIZE, CHUNK, ALGORITHM, digests)
    assert changed_chunks(first, second) == [0, 7, 64]
    assert changed_chunks(second, second) == []
    with pytest.raises(ValueError):
        ChunkMap(SIZE, CHUNK, ALGORITHM, b"\0" * 15)
    with pytest.raises(IndexError):
        first.digest(first.count)


def test_large_map_compares_by_blocks() -> None:
    size = 40000 * CHUNK
    first = ChunkMap.zero(size)
    digests = bytearray(first.digests)
    digests[39999 * DIGEST_SIZE + 3] ^= 1
    digests[5000 * DIGEST_SIZE] ^= 1
    assert changed_chunks(first, ChunkMap(size, CHUNK, ALGORITHM, digests)) == [5000, 39999]


def test_saving_into_a_missing_directory_fails_cleanly(work: Path) -> None:
    with pytest.raises(RepositoryError, match="cannot write"):
        ChunkMap.zero(CHUNK).save(str(work / "rdmb-missing" / "x.chunkmap"))
    assert os.listdir(work) == []


@pytest.mark.skipif(shutil.which("qemu-nbd") is None, reason="qemu-nbd is needed")
def test_resync_layer_from_a_sparse_export(work: Path, full: Path) -> None:
    """A resync over NBD writes exactly the changed chunks; holes are not read."""
    pytest.importorskip("nbd")
    from libvirt_rdm_backup.engine.resync import resync_layer
    from libvirt_rdm_backup.errors import StorageError
    from libvirt_rdm_backup.qemu.nbd_server import qemu_nbd_server

    parent = chunkmap_of_layer(str(full), None, SIZE)
    source = work / "rdmb-source.raw"
    qemu_img("convert", "-S", "4k", "-f", "qcow2", "-O", "raw", str(full), str(source))
    qemu_io(source, "write -P 0x77 2M 64k",  # a hole gets data
            "write -P 0x78 130k 2k",  # a small change in a data chunk
            "write -P 0x79 4M 1536",  # the short last chunk
            fmt="raw")
    subprocess.run(["fallocate", "-p", "-o", str(3 * MiB), "-l", str(64 * KiB), str(source)],
                   check=True)  # a data chunk becomes a hole
    subprocess.run(["fallocate", "-p", "-o", str(4 * KiB), "-l", str(8 * KiB), str(source)],
                   check=True)  # a hole inside chunk 0

    layer = work / "rdmb-resync.qcow2"
    with qemu_nbd_server(str(source), "raw", readonly=True) as uri:
        with pytest.raises(StorageError, match="expected"):
            resync_layer(uri, SIZE + 512, ChunkMap.zero(SIZE + 512), str(layer), full.name)
        assert not layer.exists()
        got, written = resync_layer(uri, SIZE, parent, str(layer), full.name)

    expected = reference_map(layer, work)
    assert got == expected
    assert changed_chunks(got, parent) == [0, 2, 32, 48, 64]
    assert is_zero_chunk(got, 48)
    assert written == 4 * CHUNK - CHUNK + 1536  # chunks 0, 2, 32 and the short one
    assert stat.S_IMODE(layer.stat().st_mode) == 0o600
    proc = subprocess.run(["qemu-img", "compare", "-q", "-f", "qcow2", "-F", "raw",
                           str(layer), str(source)], check=False)
    assert proc.returncode == 0
    assert chunkmap_of_layer(str(layer), parent, SIZE) == got
