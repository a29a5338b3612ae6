"""Reading and writing NBD exports through libnbd: the one user of the ``nbd`` binding.

Reads are pipelined (:data:`IN_FLIGHT` requests of :data:`REQUEST` bytes) and
skip what ``base:allocation`` reports as zero; writes of a resync layer merge
zero runs into NBD zero requests (:class:`LayerWriter`); unused regions of a
volume are trimmed (:func:`trim`).
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from typing import Any

import nbd

from libvirt_rdm_backup.errors import OperationError
from libvirt_rdm_backup.process import stall_timeout

log = logging.getLogger(__name__)

REQUEST = 4 * 1024 * 1024  # bytes per NBD read request
IN_FLIGHT = 4  # read requests kept in flight
STATUS_WINDOW = 1024 * 1024 * 1024  # bytes asked about per block-status round
MAX_ZERO = 1024 * 1024 * 1024  # bytes per NBD zero request
MAX_TRIM = 1024 * 1024 * 1024  # bytes per NBD trim request

NbdError = nbd.Error  # what libnbd raises when a command or the connection fails

Segment = tuple[int, int, bool]  # (offset, length, reads as zero)


def connect_nbd(uri: str, allocation: bool = False, tls_dir: str | None = None) -> Any:
    """A libnbd handle connected to ``uri`` (asking for ``base:allocation`` if wanted; with
    ``tls_dir``, TLS required and the x509 credentials of that directory)."""
    handle = nbd.NBD()
    if tls_dir is not None:
        handle.set_tls(nbd.TLS_REQUIRE)
        handle.set_tls_certificates(tls_dir)
    if allocation:
        handle.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    handle.connect_uri(uri)
    return handle


def disconnect_nbd(handle: Any) -> None:
    """Close a libnbd handle's connection (``shutdown`` where there is no ``close``)."""
    close = getattr(handle, "close", None)  # libnbd >= 1.16
    try:
        if close is not None:
            close()
        else:
            handle.shutdown()
    except nbd.Error as err:
        log.debug("NBD disconnect: %s", err)


def trim(handle: Any, offset: int, length: int) -> bool:
    """Tell the server that ``length`` bytes at ``offset`` are unused, so that it may give
    their space back (a punched hole in a sparse file); False when it takes no trims.

    Trimming what is trimmed already is harmless and cheap. Raises NbdError.
    """
    if not handle.can_trim():
        return False
    end = offset + length
    while offset < end:
        count = min(MAX_TRIM, end - offset)
        handle.trim(count, offset)
        offset += count
    return True


def has_allocation(handle: Any) -> bool:
    """True when the server answers ``base:allocation`` block status on ``handle``."""
    return bool(handle.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))


def _block_status(handle: Any, count: int, offset: int) -> list[int]:
    """``base:allocation`` entries (length, flags, length, flags, ...) from ``offset``."""
    got: list[int] = []

    def collect(context: str, _offset: int, entries: list[int], _err: Any) -> int:
        if context == nbd.CONTEXT_BASE_ALLOCATION:
            got.extend(entries)
        return 0

    handle.block_status(count, offset, collect)
    return got


def _extents(handle: Any, start: int, end: int) -> list[Segment]:
    """(start, end, zero) extents covering [start, end), from block status."""
    extents: list[Segment] = []
    cur = start
    while cur < end:
        got = _block_status(handle, end - cur, cur)
        if not got:
            raise OperationError(f"NBD server reported no block status at {cur}")
        for i in range(0, len(got) - 1, 2):
            stop = min(cur + got[i], end)
            extents.append((cur, stop, bool(got[i + 1] & nbd.STATE_ZERO)))
            cur = stop
            if cur >= end:
                break
    return extents


def segments(handle: Any, size: int, use_status: bool, chunk: int) -> Iterator[Segment]:
    """(offset, length, reads_as_zero) in order over [0, size); starts are ``chunk``-aligned.

    Zero segments (from ``base:allocation``) hold whole chunks only; a chunk that
    is only partly zero is read.
    """
    if not use_status:
        yield 0, size, False
        return
    count = -(-size // chunk)
    pos = 0
    while pos < size:
        window_end = min(pos + STATUS_WINDOW, size)
        run_start = pos
        for start, end, zero in _extents(handle, pos, window_end):
            if not zero:
                continue
            first = -(-start // chunk)
            stop = count if end >= size else end // chunk
            if first >= stop:
                continue
            a, b = first * chunk, min(stop * chunk, size)
            if a > run_start:
                yield run_start, a - run_start, False
            yield a, b - a, True
            run_start = b
        if run_start < window_end:
            yield run_start, window_end - run_start, False
        pos = window_end


def _requests(segments: Iterator[Segment]) -> Iterator[Segment]:
    """Data segments cut into reads of at most REQUEST bytes."""
    for offset, length, zero in segments:
        if zero:
            yield offset, length, True
            continue
        for start in range(offset, offset + length, REQUEST):
            yield start, min(REQUEST, offset + length - start), False


def stream(handle: Any, segments: Iterator[Segment]
           ) -> Iterator[tuple[int, int, memoryview | None]]:
    """(offset, length, data or None for zeros) in order, IN_FLIGHT reads pipelined.

    A data view is valid until the next item is asked for (its buffer is reused).
    """
    free = [bytearray(REQUEST) for _ in range(IN_FLIGHT)]
    queue: deque[tuple[int, int, bytearray | None, Any, int]] = deque()
    requests = _requests(segments)
    upcoming = next(requests, None)
    while True:
        while upcoming is not None:
            offset, length, zero = upcoming
            if zero:
                if len(queue) >= 4 * IN_FLIGHT:
                    break
                queue.append((offset, length, None, None, 0))
            else:
                if not free:
                    break
                spare = free.pop()
                target = nbd.Buffer.from_buffer(memoryview(spare)[:length])
                cookie = handle.aio_pread(target, offset)
                queue.append((offset, length, spare, target, cookie))
            upcoming = next(requests, None)
        if not queue:
            return
        offset, length, buf, _target, cookie = queue.popleft()
        if buf is None:
            yield offset, length, None
            continue
        _wait_for(handle, cookie, offset)
        yield offset, length, memoryview(buf)[:length]
        free.append(buf)


def _wait_for(handle: Any, cookie: int, offset: int) -> None:
    """Wait for one read; give up when the export answers nothing for the stall limit."""
    limit = stall_timeout()
    last = time.monotonic()
    while not handle.aio_command_completed(cookie):
        if handle.poll(1000):
            last = time.monotonic()
        elif time.monotonic() - last > limit:
            raise OperationError(f"read at offset {offset} made no progress for {limit:g} s "
                                 "(is the storage answering?)")


class LayerWriter:
    """Writes changed chunks to the layer export; zero runs are merged into zero requests."""

    def __init__(self, handle: Any) -> None:
        self.handle = handle
        self.can_zero = bool(handle.can_zero())
        self.data_bytes = 0
        self.zero_bytes = 0
        self._zero_start = 0
        self._zero_end = 0

    def write(self, offset: int, data: memoryview) -> None:
        self.handle.pwrite(data, offset)
        self.data_bytes += len(data)

    def zero(self, offset: int, length: int) -> None:
        if self._zero_end == offset and self._zero_end > self._zero_start:
            self._zero_end += length
            return
        self.flush_zero()
        self._zero_start, self._zero_end = offset, offset + length

    def flush_zero(self) -> None:
        offset, end = self._zero_start, self._zero_end
        while offset < end:
            length = min(MAX_ZERO, end - offset)
            if self.can_zero:
                self.handle.zero(length, offset)
            else:
                self.handle.pwrite(bytes(min(length, REQUEST)), offset)
                length = min(length, REQUEST)
            self.zero_bytes += length
            offset += length
        self._zero_start = self._zero_end = 0

    def finish(self) -> None:
        self.flush_zero()
        self.handle.flush()
