"""``verify --deep``: read a point whole through QEMU, and compare it with its chunk map.

The digests of the stored files say the files are as written; reading the point
through QEMU also proves that its layers open and decrypt (with the key given) and
read as the disk did when the point was made (the chunk map's per-chunk digests were
taken from the data before it was stored). A point without a chunk map (NBD volumes)
is still read whole.
"""

from __future__ import annotations

from typing import Any

from libvirt_rdm_backup.engine.stores import Store
from libvirt_rdm_backup.errors import RdmBackupError, UsageError
from libvirt_rdm_backup.qemu.layers import json_filename
from libvirt_rdm_backup.qemu.nbd_io import NbdError, connect_nbd, disconnect_nbd
from libvirt_rdm_backup.qemu.nbd_server import qemu_nbd_server
from libvirt_rdm_backup.repository.chain import DiskPoint
from libvirt_rdm_backup.repository.chunks import CHUNK, DIGEST_SIZE, chunk_digest

READ = 64 * CHUNK  # bytes per NBD read (4 MiB)


def read_problem(store: Store, points: list[DiskPoint]) -> str | None:
    """What reading the point ``points`` (itself first) whole through QEMU finds wrong.

    Raises UsageError for an encrypted point without its key.
    """
    record = points[0].record
    node = store.image_node(points)  # refuses an encrypted point without its key
    try:
        expected = store.chunk_map(points[0])
        with qemu_nbd_server(json_filename(node), None, readonly=True) as uri:
            handle = connect_nbd(uri)
            try:
                return _compare(handle, record.size, expected.digests if expected else None)
            finally:
                disconnect_nbd(handle)
    except UsageError:
        raise
    except (RdmBackupError, NbdError) as err:
        return f"cannot be read through QEMU: {err}"


def _compare(handle: Any, size: int, digests: bytes | bytearray | None) -> str | None:
    """Read ``size`` bytes of the export in pieces; the first chunk that differs, or None."""
    if int(handle.get_size()) != size:
        return f"reads as {handle.get_size()} bytes, not {size}"
    offset = 0
    while offset < size:
        data = handle.pread(min(READ, size - offset), offset)
        if digests is not None:
            view = memoryview(data)
            for start in range(0, len(data), CHUNK):
                index = (offset + start) // CHUNK
                if chunk_digest(view[start:start + CHUNK]) != \
                        digests[index * DIGEST_SIZE:(index + 1) * DIGEST_SIZE]:
                    return (f"reads differently from its chunk map at byte "
                            f"{offset + start}")
        offset += len(data)
    return None
