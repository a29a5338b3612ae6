"""qcow2 layers read back from a repository or a volume: checked headers, explicit chains.

A layer's header is untrusted: it could name a backing file anywhere on the host,
an external data file, encryption, or be another format altogether. QEMU would
follow each of them when it opens the image by name. So:

* :func:`header_problem` parses the first 4 KiB of a layer with strict bounds and
  accepts only what this tool writes: qcow2 version 3, 64 KiB clusters, a zlib or
  zstd compression type, LUKS encryption only where the manifest records it, no
  external data file, no internal snapshots,
  no unknown feature or header extension, the virtual size the manifest records, and
  exactly the backing file name the repository layout implies (none for a full copy or
  a volume region).
* :func:`chain_node` builds the blockdev options of a point with the ``backing`` of
  every layer set explicitly (``null`` below the last), so that no name in a header
  is ever opened; :func:`json_filename` makes them a ``qemu-img``/``qemu-nbd`` filename.
"""

from __future__ import annotations

import errno
import json
import os
import struct
from collections.abc import Sequence
from typing import Any

from libvirt_rdm_backup.fileutil import read_regular
from libvirt_rdm_backup.qemu.secrets import SECRET_ID

FORMAT = "qcow2"
MAGIC = b"QFI\xfb"
VERSION = 3
CLUSTER_BITS = 16  # the 64 KiB clusters of every layer this tool creates
# bytes read of a layer: its header, extensions and backing file name (under 2 KiB as QEMU
# writes them; anything reaching further is refused)
HEADER_READ = 4096
MAX_BACKING_NAME = 1023  # QEMU's own limit
MAX_LUKS_HEADER = 16 << 20  # a LUKS header of QEMU's defaults takes 2 MiB of a layer

_HEADER = struct.Struct(">4sIQIIQIIQQIIQQQQII")  # the version 3 header up to header_length
_EXTENSION = struct.Struct(">II")
EXT_END = 0x00000000
EXT_BACKING_FORMAT = 0xE2792ACA
EXT_FEATURE_TABLE = 0x6803F857
EXT_BITMAPS = 0x23852875
EXT_ENCRYPTION = 0x0537BE77
EXT_DATA_FILE = 0x44415441
_KNOWN_EXTENSIONS = {EXT_BACKING_FORMAT, EXT_FEATURE_TABLE, EXT_BITMAPS, EXT_ENCRYPTION}
CRYPT_LUKS = 2  # the header's crypt_method of LUKS-encrypted images

INCOMPAT_DIRTY = 1 << 0
INCOMPAT_COMPRESSION = 1 << 3  # the compression type byte is not zlib (0)
_INCOMPAT_NAMES = {1: "is marked corrupt", 2: "has an external data file",
                   4: "uses extended L2 entries"}
COMPRESSION_OFFSET = 104  # the compression type byte, in headers of 112 bytes and more
COMPRESSION_TYPES = {0: "zlib", 1: "zstd"}
AUTOCLEAR_RAW_DATA = 1 << 1


def _name(raw: bytes) -> str:
    """A name from a header, quoted and shortened for a one-line message."""
    shown = repr(raw.decode("utf-8", errors="replace")[:256])
    return shown if len(shown) <= 200 else shown[:197] + "..."


def header_problem(data: bytes, backing: str | None, size: int | None = None,
                   encrypted: bool = False) -> str | None:
    """What in a layer's first bytes this tool did not write, or None.

    ``data``: the layer's first :data:`HEADER_READ` bytes (fewer for a short file).
    ``backing``: the backing file name the repository layout implies (None: none).
    ``size``: the disk size the manifest records (None: not checked).
    ``encrypted``: the manifest records the layer as LUKS-encrypted (else it must not be).
    """
    if len(data) < 4 or data[:4] != MAGIC:
        return "is not a qcow2 image"
    if len(data) < _HEADER.size:
        return "has a truncated qcow2 header"
    (_magic, version, backing_offset, backing_size, cluster_bits, virtual_size, crypt_method,
     _l1_size, _l1_offset, _rc_offset, _rc_clusters, snapshots, _snap_offset, incompatible,
     _compatible, autoclear, _refcount_order, header_length) = _HEADER.unpack_from(data)
    if version != VERSION:
        return f"is a version {version} qcow2 image, not one this tool writes"
    if cluster_bits != CLUSTER_BITS:
        return f"has {1 << min(cluster_bits, 63)}-byte clusters, not the 64 KiB this tool writes"
    if crypt_method != (CRYPT_LUKS if encrypted else 0):
        return "is not encrypted" if encrypted and crypt_method == 0 else "is encrypted"
    for bit, what in _INCOMPAT_NAMES.items():
        if incompatible & (1 << bit):
            return what
    known = INCOMPAT_DIRTY | INCOMPAT_COMPRESSION | sum(1 << b for b in _INCOMPAT_NAMES)
    if incompatible & ~known:
        return f"has unknown incompatible features {incompatible:#x}"
    if autoclear & AUTOCLEAR_RAW_DATA:
        return "has an external raw data file"
    if snapshots:
        return "holds internal snapshots"
    if size is not None and virtual_size != size:
        return f"is a {virtual_size}-byte image, the manifest says {size}"
    if not _HEADER.size <= header_length <= min(len(data), HEADER_READ) or header_length % 8:
        return f"has a malformed header length {header_length}"
    if compression_type(data, header_length, incompatible) is None:
        return "uses a compression type this tool does not write"
    extensions, problem = _extensions(data, header_length, encrypted)
    if problem is not None:
        return problem
    return _backing_problem(data, backing_offset, backing_size, backing,
                            extensions.get(EXT_BACKING_FORMAT))


def compression_type(data: bytes, header_length: int, incompatible: int) -> str | None:
    """The layer's compression type (``zlib`` or ``zstd``), None for any other."""
    if not incompatible & INCOMPAT_COMPRESSION:
        return "zlib"
    if header_length <= COMPRESSION_OFFSET:
        return None
    return COMPRESSION_TYPES.get(data[COMPRESSION_OFFSET])


def _extensions(data: bytes, start: int, encrypted: bool
                ) -> tuple[dict[int, bytes], str | None]:
    """The header extensions (type -> data) from ``start``; or why they are refused."""
    found: dict[int, bytes] = {}
    pos = start
    while True:
        if pos + _EXTENSION.size > len(data):
            return found, "has header extensions past its first 4 KiB"
        kind, length = _EXTENSION.unpack_from(data, pos)
        pos += _EXTENSION.size
        if kind == EXT_END:
            return found, None
        if kind == EXT_ENCRYPTION and not encrypted:
            return found, "is encrypted"
        if kind == EXT_DATA_FILE:
            return found, "names an external data file"
        if kind not in _KNOWN_EXTENSIONS:
            return found, f"has an unknown header extension {kind:#010x}"
        if kind in found:
            return found, f"has header extension {kind:#010x} twice"
        if pos + length > len(data):
            return found, "has header extensions past its first 4 KiB"
        found[kind] = data[pos:pos + length]
        pos += -(-length // 8) * 8


def _backing_problem(data: bytes, offset: int, length: int, expected: str | None,
                     backing_format: bytes | None) -> str | None:
    if length == 0:
        if expected is not None:
            return f"names no backing file, the manifest implies {expected!r}"
        return None if backing_format is None else "names a backing format but no backing file"
    if length > MAX_BACKING_NAME or offset + length > len(data) or offset < _HEADER.size:
        return "has a malformed backing file name"
    raw = data[offset:offset + length]
    if expected is None:
        return f"names backing file {_name(raw)}, the manifest implies none"
    if raw != expected.encode():
        return f"names backing file {_name(raw)}, the manifest implies {expected!r}"
    if backing_format != FORMAT.encode():
        shown = "none" if backing_format is None else _name(backing_format)
        return f"names backing format {shown}, not {FORMAT}"
    return None


def read_head(path: str) -> bytes:
    """The first :data:`HEADER_READ` bytes of a regular file (symlinks are not followed).

    Raises OSError; ``EINVAL`` when ``path`` is not a regular file.
    """
    return read_regular(path, HEADER_READ)


def file_problem(path: str, backing: str | None, size: int | None = None,
                 encrypted: bool = False) -> str | None:
    """:func:`header_problem` of a layer file (None: this tool could have written it)."""
    try:
        data = read_head(path)
    except FileNotFoundError:
        return "is missing"
    except OSError as err:
        if err.errno in (errno.ELOOP, errno.EINVAL):
            return "is not a regular file"
        return f"is unreadable: {err.strerror}"
    return header_problem(data, backing, size, encrypted)


def is_encrypted(path: str) -> bool:
    """True when the layer file's header says LUKS (read before QEMU opens it)."""
    try:
        data = read_head(path)
    except OSError:
        return False  # QEMU's open reports it
    return len(data) >= _HEADER.size and data[:4] == MAGIC and \
        _HEADER.unpack_from(data)[6] == CRYPT_LUKS


def luks_region(data: bytes, file_size: int) -> tuple[int, int] | None:
    """Where the LUKS header of a checked encrypted layer lies in its file (offset, length;
    from its first bytes, as :func:`header_problem` accepted them, and the file's size);
    None: no such header, or not where QEMU puts one (past the qcow2 header cluster,
    cluster-aligned, within the file, clear of the L1 and refcount tables)."""
    if len(data) < _HEADER.size:
        return None
    fields = _HEADER.unpack_from(data)
    l1_size, l1_offset, rc_offset, rc_clusters, header_length = (
        fields[7], fields[8], fields[9], fields[10], fields[17])
    found, problem = _extensions(data, header_length, True)
    raw = found.get(EXT_ENCRYPTION)
    if problem is not None or raw is None or len(raw) != 16:
        return None
    offset, length = struct.unpack(">QQ", raw)
    if offset < 1 << CLUSTER_BITS or offset % (1 << CLUSTER_BITS) or \
            not 0 < length <= MAX_LUKS_HEADER or offset + length > file_size:
        return None
    tables = ((l1_offset, max(l1_size * 8, 1)), (rc_offset, max(rc_clusters, 1) << CLUSTER_BITS))
    if any(start < offset + length and offset < start + size for start, size in tables):
        return None  # QEMU would rewrite the tables where the LUKS header is
    return offset, length


def encrypt_options(secret_id: str) -> dict[str, Any]:
    """The ``encrypt`` options of a LUKS-encrypted layer's qcow2 node."""
    return {"format": "luks", "key-secret": secret_id}


def file_node(path: str) -> dict[str, Any]:
    """Blockdev options of a local file (protocol ``file``; the path needs no escaping)."""
    return {"driver": "file", "filename": path}


def chain_node(files: Sequence[dict[str, Any]], encrypted: Sequence[bool] = ()
               ) -> dict[str, Any]:
    """qcow2 layers over ``files`` (protocol nodes, top first), each backing explicit;
    ``encrypted``: which of them are LUKS-encrypted (opened with the key's secret object,
    :data:`~.secrets.SECRET_ID`)."""
    if not files:
        raise ValueError("a chain needs at least one layer")
    flags = list(encrypted) + [False] * (len(files) - len(encrypted))
    node: dict[str, Any] | None = None
    for file, flag in zip(reversed(files), reversed(flags), strict=True):
        node = {"driver": FORMAT, "file": file, "backing": node}
        if flag:
            node["encrypt"] = encrypt_options(SECRET_ID)
    assert node is not None
    return node


def file_chain(paths: Sequence[str]) -> dict[str, Any]:
    """:func:`chain_node` of local layer files, top first (encrypted where the checked
    header says so)."""
    return chain_node([file_node(p) for p in paths], [is_encrypted(p) for p in paths])


def held_fds(node: Any) -> tuple[int, ...]:
    """The descriptors the files of ``node`` (blockdev options, at any depth) are named by
    (``/dev/fd/N``): a process that opens the node must inherit them."""
    if isinstance(node, list):
        return tuple(fd for item in node for fd in held_fds(item))
    if not isinstance(node, dict):
        return ()
    name = node.get("filename")
    own = (int(name.removeprefix("/dev/fd/")),) if isinstance(name, str) \
        and name.startswith("/dev/fd/") and name.removeprefix("/dev/fd/").isdigit() else ()
    return own + tuple(fd for value in node.values() for fd in held_fds(value))


def node_data_bytes(node: dict[str, Any]) -> int:
    """Bytes of the image node ``node`` (blockdev options) that hold data: ``qemu-img map``
    opens the whole chain, inheriting the layer files the node names as ``/dev/fd/N``."""
    from libvirt_rdm_backup.qemu import img

    with img.objects(fds=held_fds(node)):
        return img.data_bytes(json_filename(node))


def json_filename(node: dict[str, Any]) -> str:
    """A ``json:`` filename that qemu-img and qemu-nbd open as exactly ``node``."""
    return "json:" + json.dumps(node, separators=(",", ":"))


def pinned_head(head: bytes, rest: dict[str, Any], size: int, path: str) -> dict[str, Any]:
    """A protocol node that reads ``head`` (checked bytes) at offset 0 and ``rest`` elsewhere.

    For layers QEMU would otherwise read again from a place that may answer differently
    (an NBD server): ``path`` becomes a small local qcow2 overlay of ``size`` bytes whose
    first cluster holds ``head``, backed by ``rest``; so QEMU opens exactly the header that
    was checked. ``path`` must be in a private directory; the caller removes it.
    """
    from libvirt_rdm_backup.process import run
    from libvirt_rdm_backup.qemu import img

    with open(path + ".head", "wb") as stream:
        stream.write(head)
    img.create(path, FORMAT, size)
    run(["qemu-io", "-f", FORMAT, "-c", f"write -q -s {path}.head 0 {len(head)}", path])
    os.unlink(path + ".head")
    return {"driver": FORMAT, "file": file_node(path), "backing": rest, "read-only": True}


def option_value(value: str) -> str:
    """``value`` for a QEMU option string (``key=value,...``): commas doubled."""
    return value.replace(",", ",,")
