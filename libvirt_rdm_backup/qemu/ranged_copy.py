"""Copies of given byte ranges as a QEMU backup job of a private ``qemu-storage-daemon``.

The ranges a storage reports as changed since an older snapshot become a dirty bitmap
of the source node: the daemon serves a ``null-co`` node of the same size, writable, on
an NBD socket in a private 0700 directory; an NBD zero request per range (no data)
marks its bitmap, which is merged into a bitmap of the source node. A ``blockdev-backup``
job (``sync=bitmap``) then copies those ranges, widened to the target's clusters, from
the source onto the target; areas that read as zero are written as zeroes. The target
keeps what it held everywhere else (the previous point of an image that holds a whole
point). Data moves inside the daemon only; the job is followed as a copy's
(:func:`~.block_copy.follow_job`).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

from libvirt_rdm_backup.errors import OperationError
from libvirt_rdm_backup.qemu.block_copy import (
    GIVE_UP_GRACE,
    Endpoint,
    ProgressCallback,
    added_node,
    added_pair,
    run_job,
)
from libvirt_rdm_backup.qemu.jobs import COPY_CHUNK, backup_action
from libvirt_rdm_backup.qemu.names import object_name
from libvirt_rdm_backup.qemu.nbd_io import MAX_ZERO, NbdError, connect_nbd, disconnect_nbd
from libvirt_rdm_backup.qemu.storage_daemon import StorageDaemon

Ranges = Sequence[tuple[int, int]]
GRANULARITY = 64 * 1024  # bytes per bit of the bitmap of ranges
BITMAP = "rdmb-ranges"


@contextmanager
def _private_dir() -> Iterator[str]:
    path = tempfile.mkdtemp(prefix="rdmb-ranges-")  # mode 0700
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _zero(handle: Any, ranges: Sequence[tuple[int, int]], size: int) -> None:
    """One NBD zero request per range (split at :data:`MAX_ZERO` bytes), within ``size``."""
    for offset, length in ranges:
        end = min(offset + length, size)
        while offset < end:
            count = min(MAX_ZERO, end - offset)
            handle.zero(count, offset)
            offset += count


def _mark(daemon: StorageDaemon, node: str, ranges: Sequence[tuple[int, int]],
          size: int, label: str) -> None:
    """Dirty the bitmap of ``node`` (a ``null-co`` node) over ``ranges``, by NBD zero
    requests to it served on a private socket."""
    export = object_name("marks", label)
    with _private_dir() as directory:
        path = os.path.join(directory, "marks.sock")
        daemon.execute("nbd-server-start", {"addr": {"type": "unix", "data": {"path": path}}})
        try:
            daemon.execute("block-export-add", {"type": "nbd", "id": export, "node-name": node,
                                                "name": "marks", "writable": True})
            try:
                handle = connect_nbd(f"nbd+unix:///marks?socket={path}")
                try:
                    _zero(handle, ranges, size)
                finally:
                    disconnect_nbd(handle)
            except NbdError as err:
                raise OperationError(f"copy of {label}: cannot mark its ranges: {err}"
                                     ) from err
            daemon.execute("block-export-del", {"id": export})
            daemon.wait_export_deleted(export)
        finally:
            daemon.execute("nbd-server-stop")


def copy_ranges(source: Endpoint, target: Endpoint, ranges: Ranges | Callable[[], Ranges | None],
                size: int, label: str, *, speed: int = 0, chunk: int = COPY_CHUNK,
                progress: ProgressCallback | None = None) -> bool:
    """Copy the ``(offset, length)`` byte ranges of ``source`` onto ``target`` (both
    ``size`` bytes) in a private daemon, which quits when the copy ends, however it ends.
    ``ranges`` may be a callable, called once the daemon has opened both (what it returns
    None for is not copied: returns False). ``speed``: bytes per second (0: no limit);
    ``chunk``: the largest request written."""
    if source.fd is not None or target.fd is not None:
        raise OperationError(f"copy of {label}: no endpoint is handed over as a descriptor")
    daemon = StorageDaemon(f"ranges {label}", killed_with_tool=True).start()
    try:
        copied = _run(daemon, source, target, ranges, size, label, speed, chunk, progress)
    except BaseException:
        daemon.close(grace=GIVE_UP_GRACE)
        raise
    daemon.close()
    return copied


def _run(daemon: StorageDaemon, source: Endpoint, target: Endpoint,
         ranges: Ranges | Callable[[], Ranges | None], size: int, label: str, speed: int,
         chunk: int, progress: ProgressCallback | None) -> bool:
    with ExitStack() as stack:
        src, dst = added_pair(stack, daemon, source, target, label)
        marks = stack.enter_context(added_node(daemon, {"driver": "null-co", "size": size},
                                               object_name("marks", label)))
        for node in (marks, src):
            daemon.execute("block-dirty-bitmap-add", {"node": node, "name": BITMAP,
                                                      "granularity": GRANULARITY})
        found = ranges() if callable(ranges) else ranges
        if found is None:
            return False
        _mark(daemon, marks, found, size, label)
        daemon.execute("block-dirty-bitmap-merge", {
            "node": src, "target": BITMAP, "bitmaps": [{"node": marks, "name": BITMAP}]})
        run_job(daemon, "blockdev-backup", backup_action(
            object_name("copy", label), src, dst, sync="bitmap", bitmap=BITMAP, speed=speed,
            chunk=chunk)["data"], label, progress=progress)
    return True
