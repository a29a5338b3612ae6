"""The qcow2 layer header check and explicit chains: real images, crafted headers, fuzz.

A layer read back from a repository or volume is accepted only as this tool writes
it; everything else is named in one line. The chain of a point is opened with every
``backing`` given, so a backing file or data file named in a header is never read.
"""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import time
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from libvirt_rdm_backup.errors import CommandError
from libvirt_rdm_backup.qemu import img
from libvirt_rdm_backup.qemu.layers import (
    EXT_BACKING_FORMAT,
    EXT_DATA_FILE,
    EXT_ENCRYPTION,
    HEADER_READ,
    chain_node,
    file_chain,
    file_problem,
    header_problem,
    json_filename,
    option_value,
)

pytestmark = pytest.mark.skipif(shutil.which("qemu-img") is None, reason="needs qemu-img")

MiB = 1 << 20
SIZE = 4 * MiB
PARENT = "../20261125T143000Z-1a2b3c/vdb.qcow2"
FUZZ = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def qemu_img(*args: str) -> None:
    """Run qemu-img; a LUKS key derivation's timing probe that fails under load
    ("Unable to get accurate CPU usage") is tried again, after a pause growing to 2 s."""
    for attempt in range(10):
        proc = subprocess.run(["qemu-img", *args], capture_output=True, text=True, check=False)
        if "accurate CPU usage" not in proc.stderr:
            break
        time.sleep(min(2.0, 0.1 * 2 ** attempt))
    assert proc.returncode == 0, proc.stderr


def qemu_io(path: Path, command: str, fmt: str = "qcow2") -> None:
    subprocess.run(["qemu-io", "-f", fmt, "-c", command, str(path)], check=True,
                   capture_output=True)


def create(path: Path, *options: str, size: int = SIZE) -> Path:
    qemu_img("create", "-q", "-f", "qcow2", *options, str(path), str(size))
    return path


def head(path: Path) -> bytes:
    return path.read_bytes()[:HEADER_READ]


@pytest.fixture
def full(tmp_path: Path) -> Path:
    return create(tmp_path / "full.qcow2")


@pytest.fixture
def layer(tmp_path: Path) -> Path:
    return create(tmp_path / "layer.qcow2", "-u", "-b", PARENT, "-F", "qcow2")


def test_what_this_tool_writes_is_accepted(full: Path, layer: Path) -> None:
    assert file_problem(str(full), None, SIZE) is None
    assert file_problem(str(layer), PARENT, SIZE) is None
    assert file_problem(str(full), None) is None  # size not checked


@pytest.mark.parametrize(("backing", "expected", "problem"), [
    ("/etc/shadow", PARENT, "names backing file '/etc/shadow', the manifest implies"),
    ("/etc/shadow", None, "names backing file '/etc/shadow', the manifest implies none"),
    ("../20261125T143000Z-ffffff/vdb.qcow2", PARENT, "the manifest implies"),
    ("nbd://127.0.0.1:10809/x", PARENT, "names backing file 'nbd://"),
    ("json:{\"driver\":\"file\",\"filename\":\"/etc/shadow\"}", PARENT, "names backing file"),
])
def test_a_backing_file_other_than_the_layout_implies_is_refused(
        tmp_path: Path, backing: str, expected: str | None, problem: str) -> None:
    image = create(tmp_path / "x.qcow2", "-u", "-b", backing, "-F", "raw")
    found = file_problem(str(image), expected, SIZE)
    assert found is not None and problem in found and "\n" not in found


def test_a_missing_backing_file_or_format_is_refused(full: Path, tmp_path: Path) -> None:
    assert "names no backing file" in str(file_problem(str(full), PARENT, SIZE))
    raw_format = create(tmp_path / "r.qcow2", "-u", "-b", PARENT, "-F", "raw")
    assert "backing format 'raw'" in str(file_problem(str(raw_format), PARENT, SIZE))


def test_data_files_encryption_and_other_formats_are_refused(tmp_path: Path) -> None:
    dummy = tmp_path / "dummy.raw"
    dummy.write_bytes(bytes(SIZE))
    data_file = create(tmp_path / "df.qcow2", "-o", f"data_file={dummy},data_file_raw=on")
    assert file_problem(str(data_file), None, SIZE) == "has an external data file"
    secret = ["--object", "secret,id=s0,data=abc"]
    luks = create(tmp_path / "luks.qcow2", *secret,
                  "-o", "encrypt.format=luks,encrypt.key-secret=s0,encrypt.iter-time=100")
    aes = create(tmp_path / "aes.qcow2", *secret, "-o", "encrypt.format=aes,encrypt.key-secret=s0")
    assert file_problem(str(luks), None, SIZE) == "is encrypted"
    assert file_problem(str(aes), None, SIZE) == "is encrypted"
    assert file_problem(str(dummy), None, SIZE) == "is not a qcow2 image"
    luks_raw = tmp_path / "luks.raw"
    qemu_img("create", "-q", "-f", "luks", *secret, "-o", "key-secret=s0,iter-time=100",
             str(luks_raw), "1M")
    assert file_problem(str(luks_raw), None, SIZE) == "is not a qcow2 image"
    vmdk = tmp_path / "x.vmdk"
    qemu_img("create", "-q", "-f", "vmdk", str(vmdk), "1M")
    assert file_problem(str(vmdk), None, SIZE) == "is not a qcow2 image"


def test_images_this_tool_does_not_write_are_refused(tmp_path: Path) -> None:
    v2 = create(tmp_path / "v2.qcow2", "-o", "compat=0.10")
    assert "version 2" in str(file_problem(str(v2), None, SIZE))
    small = create(tmp_path / "small.qcow2", "-o", "cluster_size=4096")
    assert "4096-byte clusters" in str(file_problem(str(small), None, SIZE))
    snap = create(tmp_path / "snap.qcow2")
    qemu_img("snapshot", "-c", "s1", str(snap))
    assert file_problem(str(snap), None, SIZE) == "holds internal snapshots"
    plain = create(tmp_path / "plain.qcow2")
    assert "the manifest says 8388608" in str(file_problem(str(plain), None, 2 * SIZE))


def test_compressed_layers_are_accepted_other_compression_types_refused(tmp_path: Path) -> None:
    for kind in ("zstd", "zlib"):
        layer = create(tmp_path / f"{kind}.qcow2", "-o", f"compression_type={kind}")
        assert file_problem(str(layer), None, SIZE) is None
    data = bytearray((tmp_path / "zstd.qcow2").read_bytes()[:HEADER_READ])
    data[104] = 7  # a compression type QEMU does not know
    assert "compression type" in str(header_problem(bytes(data), None, SIZE))


def test_what_is_not_a_regular_file_is_refused(full: Path, tmp_path: Path) -> None:
    link = tmp_path / "link.qcow2"
    link.symlink_to(full)
    assert file_problem(str(link), None, SIZE) == "is not a regular file"
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    assert file_problem(str(fifo), None, SIZE) == "is not a regular file"  # never blocks
    assert file_problem("/dev/null", None, SIZE) == "is not a regular file"
    assert file_problem(str(tmp_path / "gone.qcow2"), None, SIZE) == "is missing"


# -- crafted headers ------------------------------------------------------------------------

def _put(data: bytes, offset: int, fmt: str, value: int) -> bytes:
    out = bytearray(data)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def _extensions_at(data: bytes, extensions: list[tuple[int, bytes]]) -> bytes:
    """``data`` with its header extensions replaced (the backing name moved after them)."""
    (header_length,) = struct.unpack_from(">I", data, 100)
    (b_offset,) = struct.unpack_from(">Q", data, 8)
    (b_size,) = struct.unpack_from(">I", data, 16)
    name = data[b_offset:b_offset + b_size]
    area = b""
    for kind, body in extensions:
        area += struct.pack(">II", kind, len(body)) + body + bytes(-len(body) % 8)
    area += bytes(8)
    out = bytearray(data)
    out[header_length:header_length + len(area) + len(name)] = area + name
    if b_size:
        struct.pack_into(">Q", out, 8, header_length + len(area))
    return bytes(out)


def test_crafted_headers(full: Path, layer: Path) -> None:
    good, child = head(full), head(layer)
    assert header_problem(good, None, SIZE) is None
    assert header_problem(child, PARENT, SIZE) is None
    assert header_problem(good[:50], None) == "has a truncated qcow2 header"
    assert header_problem(b"", None) == "is not a qcow2 image"
    assert header_problem(_put(good, 32, ">I", 2), None) == "is encrypted"
    assert header_problem(_put(good, 72, ">Q", 1 << 1), None) == "is marked corrupt"
    assert header_problem(_put(good, 72, ">Q", 1 << 2), None) == "has an external data file"
    assert "unknown incompatible" in str(header_problem(_put(good, 72, ">Q", 1 << 40), None))
    assert header_problem(_put(good, 72, ">Q", 1), None) is None  # only dirty: harmless
    assert header_problem(_put(good, 88, ">Q", 1 << 1), None) == "has an external raw data file"
    assert "header length" in str(header_problem(_put(good, 100, ">I", 70000), None))
    assert "header length" in str(header_problem(_put(good, 100, ">I", 105), None))
    assert "clusters" in str(header_problem(_put(good, 20, ">I", 200), None))
    # backing file name out of bounds, too long, or where the header is
    assert "malformed backing" in str(header_problem(_put(child, 8, ">Q", 1 << 62), PARENT))
    assert "malformed backing" in str(header_problem(_put(child, 16, ">I", 5000), PARENT))
    assert "malformed backing" in str(header_problem(_put(child, 8, ">Q", 0), PARENT))
    # header extensions: data file name, encryption, unknown, twice, past the cluster
    assert header_problem(_extensions_at(good, [(EXT_DATA_FILE, b"/etc/shadow")]),
                          None) == "names an external data file"
    assert header_problem(_extensions_at(good, [(EXT_ENCRYPTION, bytes(16))]),
                          None) == "is encrypted"
    assert "unknown header extension" in str(header_problem(
        _extensions_at(good, [(0x12345678, b"x")]), None))
    assert "twice" in str(header_problem(_extensions_at(
        child, [(EXT_BACKING_FORMAT, b"qcow2"), (EXT_BACKING_FORMAT, b"qcow2")]), PARENT))
    assert header_problem(_extensions_at(child, [(EXT_BACKING_FORMAT, b"qcow2")]),
                          PARENT) is None
    endless = _extensions_at(good, [(EXT_BACKING_FORMAT, b"")])[:HEADER_READ]
    (header_length,) = struct.unpack_from(">I", good, 100)
    endless = _put(endless, header_length + 4, ">I", 1 << 31)
    assert "past its first 4 KiB" in str(header_problem(endless, None))
    assert "past its first 4 KiB" in str(header_problem(good[:header_length], None))


@FUZZ
@given(st.binary(max_size=512), st.integers(min_value=0, max_value=HEADER_READ))
def test_random_bytes_anywhere_in_a_header_are_refused_or_harmless(patch: bytes,
                                                                  at: int) -> None:
    """No input makes the check raise; what it accepts still passes every rule."""
    base = _BASE
    data = (base[:at] + patch + base[at + len(patch):])[:HEADER_READ]
    for expected in (None, PARENT):
        problem = header_problem(data, expected, SIZE)
        assert problem is None or ("\n" not in problem and len(problem) < 700)


@FUZZ
@given(st.binary(max_size=HEADER_READ))
def test_random_files_never_break_the_check(data: bytes) -> None:
    problem = header_problem(b"QFI\xfb" + data, PARENT)
    assert problem is None or "\n" not in problem


def _base_header() -> bytes:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "b.qcow2"
        create(path, "-u", "-b", PARENT, "-F", "qcow2")
        return head(path)


_BASE = _base_header() if shutil.which("qemu-img") else b""


# -- explicit chains ------------------------------------------------------------------------

def test_chain_nodes_give_every_backing() -> None:
    node = file_chain(["/r/a.qcow2", "/r/b.qcow2"])
    assert node == {"driver": "qcow2", "file": {"driver": "file", "filename": "/r/a.qcow2"},
                    "backing": {"driver": "qcow2",
                                "file": {"driver": "file", "filename": "/r/b.qcow2"},
                                "backing": None}}
    assert chain_node([{"driver": "file", "filename": "/x"}])["backing"] is None
    assert json.loads(json_filename(node).removeprefix("json:")) == node
    with pytest.raises(ValueError):
        chain_node([])


def test_a_chain_reads_the_layers_given_not_the_header_names(tmp_path: Path) -> None:
    """The header of the top layer names a decoy; the chain given reads the real parent,
    and the decoy is never opened (it is a FIFO: opening it would hang, reading nothing)."""
    work = tmp_path / "repo,with,commas"
    work.mkdir()
    base = create(work / "base.qcow2")
    qemu_io(base, "write -P 0x11 0 1M")
    top = create(work / "top.qcow2", "-u", "-b", "base.qcow2", "-F", "qcow2")
    qemu_io(top, "write -P 0x22 1M 1M")
    decoy = tmp_path / "decoy"
    os.mkfifo(decoy)
    qemu_img("rebase", "-u", "-f", "qcow2", "-b", str(decoy), "-F", "raw", str(top))
    out = tmp_path / "out.raw"
    qemu_img("convert", "-O", "raw", json_filename(file_chain([str(top), str(base)])), str(out))
    data = out.read_bytes()
    assert data[:MiB] == b"\x11" * MiB and data[MiB:2 * MiB] == b"\x22" * MiB
    assert data[2 * MiB:] == bytes(SIZE - 2 * MiB)
    extents = img.map_extents(json_filename(file_chain([str(top)])))
    assert [(e.start, e.depth, e.present) for e in extents][:2] == [(0, 0, False), (MiB, 0, True)]


def test_comma_paths_in_option_strings_are_escaped(tmp_path: Path) -> None:
    """A ``dir=`` with a comma reaches QEMU whole (it then looks for its files there)."""
    creds = tmp_path / "creds,dir=x,y"
    creds.mkdir()
    definition = f"tls-creds-x509,id=t0,endpoint=client,dir={option_value(str(creds))}"
    with img.objects(definition), pytest.raises(CommandError) as caught:
        img.info(str(tmp_path / "none.qcow2"))
    assert f"{creds}/ca-cert.pem" in caught.value.stderr
    opened = tmp_path / "a,b.raw"
    opened.write_bytes(bytes(MiB))
    proc = subprocess.run(["qemu-img", "info", "--image-opts",
                           f"driver=raw,file.driver=file,file.filename={option_value(str(opened))}"],
                          capture_output=True, text=True, check=False)
    assert proc.returncode == 0 and "1 MiB" in proc.stdout, proc.stderr
