"""Reading a running disk at a point in time (fleecing), and writing resync layers.

Fleecing, as QEMU 7.2 does it: a scratch qcow2 node whose backing is the live
disk's node, and a ``blockdev-backup`` job with ``sync: "none"`` from the disk
to the scratch node. The job's copy-before-write filter copies the old contents
of a cluster into the scratch image before a guest write lands on it, so the
scratch node reads as the disk did when the job started; clusters the guest
did not write fall through to the live disk. Because the source is in the
scratch node's backing chain, QEMU makes these copies serialising with reads of
the scratch node: a reader never sees a guest write that came after the point.
QEMU's own NBD server exports the scratch node read-only.
With ``break_snapshot`` (what backups use on a local connection) the point is read
instead through the break-snapshot copy-before-write filter of
:mod:`libvirt_rdm_backup.qemu.guard`, whose ``snapshot-access`` node is exported: no
scratch file in the repository, and a failing copy breaks the point, never the guest's
write. The filter goes in front of the device by :meth:`FleecingExport.insert`, right
after the transaction that adds the new dirty bitmap.

The NBD socket: QEMU runs as ``libvirt-qemu`` and could not create a socket in
a directory only root can use. We create and bind the listening unix socket
ourselves in a fresh 0700 directory under :data:`SOCKET_ROOT`, hand it to QEMU
with ``getfd`` and start the server with ``nbd-server-start`` on an ``addr`` of
type ``fd`` (QEMU 7.2 accepts a bound socket and listens on it). Only root can
connect, and nothing has to be chowned to QEMU's user.

:func:`resync_layer` reads such an export once, compares per-chunk digests with
the last backup's :class:`ChunkMap` and writes only the changed chunks into a
new qcow2 layer on top of the previous point, through ``qemu-nbd``.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, suppress
from typing import IO, Any

import nbd

from libvirt_rdm_backup.errors import (
    CommandError,
    OperationError,
    QmpError,
    RdmBackupError,
    RepositoryError,
    StorageError,
)
from libvirt_rdm_backup.process import die_with_parent, require_tool, stall_timeout
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.qemu.blockdev import _free_fdset_id
from libvirt_rdm_backup.qemu.guard import GuardedSource
from libvirt_rdm_backup.qemu.jobs import backup_action, transaction
from libvirt_rdm_backup.qemu.monitor import Monitor
from libvirt_rdm_backup.qemu.names import object_name
from libvirt_rdm_backup.repository.chunkmap import (
    ALGORITHM,
    CHUNK,
    DIGEST_SIZE,
    ChunkMap,
    chunk_count,
    chunk_digest,
    differing,
    set_zero_range,
    zero_changes,
    zero_digest,
)

log = logging.getLogger(__name__)

SOCKET_ROOT = "/run/libvirt-rdm-backup"
REQUEST = 4 * 1024 * 1024  # bytes per NBD read request
IN_FLIGHT = 4  # read requests kept in flight
STATUS_WINDOW = 1024 * 1024 * 1024  # bytes asked about per block-status round
MAX_ZERO = 1024 * 1024 * 1024  # bytes per NBD zero request
QMP_TIMEOUT = 30.0
SERVER_TIMEOUT = 30.0

ProgressCallback = Callable[[int, int], None]


class FleecingExport:
    """A point-in-time NBD export of a running disk; see :func:`fleecing_export`."""

    def __init__(
        self,
        monitor: Monitor,
        node_name: str,
        disk: str,
        scratch_path: str,
        size: int,
        socket_root: str = SOCKET_ROOT,
        break_snapshot: bool = False,
    ) -> None:
        self.monitor = monitor
        self.node_name = node_name
        self.disk = disk
        self.scratch_path = scratch_path
        self.size = size
        self.socket_root = socket_root
        token = secrets.token_hex(3)
        self.scratch_node = object_name("fleece", disk, token)
        self.job_id = object_name("fleecejob", disk, token)
        self.export_name = object_name("export", disk, token)
        self._fd_name = object_name("nbdsock", disk, token)
        self._file_created = False
        self._fdset_id: int | None = None
        self._node_added = False
        self._server_started = False
        self._export_added = False
        self._socket_dir: str | None = None
        self._uri: str | None = None
        # the point read through a break-snapshot filter (local fleecing image) instead
        self._guard = GuardedSource(monitor, node_name, disk, size) if break_snapshot else None

    @property
    def uri(self) -> str:
        """``nbd+unix:///EXPORT?socket=PATH`` (after :meth:`export`)."""
        if self._uri is None:
            raise OperationError("the fleecing export is not started")
        return self._uri

    def attach(self) -> None:
        """Create the scratch image and add it to QEMU as a node backed by the disk."""
        if self._guard is not None:
            self._node_added = True  # what attach leaves on failure goes with close()
            self._guard.attach()
            return
        try:
            fd = os.open(
                self.scratch_path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600
            )
        except OSError as err:
            raise OperationError(
                f"cannot create scratch image {self.scratch_path}: {err.strerror}"
            ) from err
        os.close(fd)
        self._file_created = True
        img.create(self.scratch_path, "qcow2", self.size)
        fd = os.open(self.scratch_path, os.O_RDWR | os.O_CLOEXEC)
        try:
            fdset_id = _free_fdset_id(self.monitor)
            self.monitor.execute(
                "add-fd", {"fdset-id": fdset_id, "opaque": self.scratch_node}, files=[fd]
            )
            self._fdset_id = fdset_id
        finally:
            os.close(fd)
        self.monitor.execute(
            "blockdev-add",
            {
                "driver": "qcow2",
                "node-name": self.scratch_node,
                "discard": "unmap",
                "detect-zeroes": "unmap",
                "file": {"driver": "file", "filename": f"/dev/fdset/{fdset_id}"},
                "backing": self.node_name,
            },
        )
        self._node_added = True

    def actions(self) -> list[dict[str, Any]]:
        """The transaction actions that fix the point in time (``blockdev-backup`` sync=none).

        Put them into the same QMP ``transaction`` as the dirty-bitmap-add of the
        next incremental backup, then call :meth:`export`.
        """
        if self._guard is not None:
            return []
        return [backup_action(self.job_id, self.node_name, self.scratch_node, sync="none")]

    def insert(self) -> None:
        """Right after :meth:`actions` ran: fix the point of a break-snapshot filter."""
        if self._guard is not None:
            self._guard.insert()

    def start(self) -> str:
        """Run :meth:`actions` in a transaction of their own, then :meth:`export`."""
        transaction(self.monitor, self.actions())
        self.insert()
        return self.export()

    def export(self) -> str:
        """Start QEMU's NBD server on our socket and export the scratch node read-only."""
        self._socket_dir = private_socket_dir(self.socket_root)
        path = os.path.join(self._socket_dir, "nbd.sock")
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            try:
                listener.bind(path)
                listener.listen(16)
            except OSError as err:
                raise OperationError(f"cannot listen on {path}: {err.strerror}") from err
            start_nbd_server(self.monitor, listener, self._fd_name)
        finally:
            listener.close()
        self._server_started = True
        self.monitor.execute(
            "block-export-add",
            {
                "type": "nbd",
                "id": self.export_name,
                "node-name": (self.scratch_node if self._guard is None
                              else self._guard.source(None)[0]),
                "name": self.export_name,
                "writable": False,
            },
        )
        self._export_added = True
        self._uri = f"nbd+unix:///{self.export_name}?socket={path}"
        return self._uri

    def check(self) -> None:
        """Raise OperationError unless the fleecing job still runs (the point is intact)."""
        if self._guard is not None:
            return  # a broken point is seen by its reads, which fail
        jobs = {str(j["id"]): j for j in self.monitor.execute("query-jobs") or []}
        state = jobs.get(self.job_id)
        if state is None:
            raise OperationError(f"fleecing job {self.job_id} is gone")
        if state.get("status") not in ("running", "ready", "paused", "standby"):
            raise OperationError(
                f"fleecing job {self.job_id} is {state.get('status')}: "
                f"{state.get('error') or 'no error given'}"
            )

    def close(self) -> None:
        """Tear down in reverse order; every step runs, the first failure is raised."""
        errors: list[RdmBackupError] = []

        def step(what: str, action: Callable[[], None]) -> None:
            try:
                action()
            except RdmBackupError as err:
                log.warning("fleecing teardown: %s: %s", what, err)
                errors.append(err)
            except OSError as err:
                log.warning("fleecing teardown: %s: %s", what, err)
                errors.append(OperationError(f"{what}: {err}"))

        if self._export_added:
            step("remove NBD export", self._remove_export)
        if self._server_started:
            step("stop NBD server", self._stop_server)
        if self._node_added and self._guard is not None:
            step("remove copy-before-write filter", self._remove_guard)
        elif self._node_added:
            step("stop fleecing job", self._stop_job)
            step("remove scratch node", self._remove_node)
        if self._fdset_id is not None:
            step("remove fd set", self._remove_fdset)
        if self._file_created:
            step("delete scratch image", self._delete_scratch)
        if self._socket_dir is not None:
            step("delete socket directory", self._delete_socket_dir)
        self._uri = None
        if errors:
            raise errors[0]

    def _remove_export(self) -> None:
        try:
            self.monitor.execute("block-export-del", {"id": self.export_name})
        except QmpError:
            self.monitor.execute("block-export-del", {"id": self.export_name, "mode": "hard"})
        deadline = time.monotonic() + QMP_TIMEOUT
        while any(
            e.get("id") == self.export_name
            for e in self.monitor.execute("query-block-exports") or []
        ):
            if time.monotonic() > deadline:
                raise OperationError(f"NBD export {self.export_name} did not go away")
            time.sleep(0.05)
        self._export_added = False

    def _stop_server(self) -> None:
        self.monitor.execute("nbd-server-stop")
        self._server_started = False

    def _stop_job(self) -> None:
        deadline = time.monotonic() + QMP_TIMEOUT
        cancelled = False
        while True:
            jobs = {str(j["id"]): j for j in self.monitor.execute("query-jobs") or []}
            state = jobs.get(self.job_id)
            if state is None:
                return
            status = state.get("status")
            if status in ("concluded", "null"):
                self.monitor.execute("job-dismiss", {"id": self.job_id})
                if not cancelled and state.get("error"):
                    raise OperationError(
                        f"fleecing job {self.job_id} failed: {state.get('error')}"
                    )
                return
            if not cancelled and status != "aborting":
                self.monitor.execute("job-cancel", {"id": self.job_id})
                cancelled = True
            if time.monotonic() > deadline:
                raise OperationError(f"fleecing job {self.job_id} did not stop")
            time.sleep(0.05)

    def _remove_guard(self) -> None:
        assert self._guard is not None
        self._guard.close(None)
        self._node_added = False

    def _remove_node(self) -> None:
        self.monitor.execute("blockdev-del", {"node-name": self.scratch_node})
        self._node_added = False

    def _remove_fdset(self) -> None:
        self.monitor.execute("remove-fd", {"fdset-id": self._fdset_id})
        self._fdset_id = None

    def _delete_scratch(self) -> None:
        with suppress(FileNotFoundError):
            os.unlink(self.scratch_path)
        self._file_created = False

    def _delete_socket_dir(self) -> None:
        assert self._socket_dir is not None
        shutil.rmtree(self._socket_dir)
        self._socket_dir = None


def private_socket_dir(root: str = SOCKET_ROOT) -> str:
    """A fresh 0700 directory under ``root`` (created 0700 too) for an NBD socket."""
    try:
        os.makedirs(root, mode=0o700, exist_ok=True)
        return tempfile.mkdtemp(prefix="rdmb-nbd-", dir=root)
    except OSError as err:
        raise OperationError(
            f"cannot create a socket directory in {root}: {err.strerror}"
        ) from err


def start_nbd_server(monitor: Monitor, listener: socket.socket, fd_name: str) -> None:
    """Start QEMU's NBD server on ``listener``, a bound, listening socket of ours.

    The socket (unix or TCP) goes to QEMU with ``getfd`` as ``fd_name`` and
    ``nbd-server-start`` listens on it (``addr`` of type ``fd``); the caller
    closes its own copy. QEMU runs one NBD server per process: one already
    running (another backup, a libvirt pull-mode backup) is an OperationError.
    """
    try:
        monitor.execute("getfd", {"fdname": fd_name}, files=[listener.fileno()])
    except OSError as err:
        raise OperationError(f"cannot pass the NBD socket to QEMU: {err.strerror}") from err
    try:
        monitor.execute("nbd-server-start", {"addr": {"type": "fd", "data": {"str": fd_name}}})
    except QmpError as err:
        with suppress(RdmBackupError):
            monitor.execute("closefd", {"fdname": fd_name})
        if "already running" in err.desc:
            raise OperationError(
                "QEMU already runs an NBD server for this domain (another backup, or a "
                "libvirt pull-mode backup); it is not ours to use or stop"
            ) from err
        raise


@contextmanager
def fleecing_export(
    monitor: Monitor,
    node_name: str,
    disk: str,
    scratch_path: str,
    size: int,
    socket_root: str = SOCKET_ROOT,
    break_snapshot: bool = False,
) -> Iterator[FleecingExport]:
    """Prepare a point-in-time export of block node ``node_name`` of a running domain.

    On entry the scratch image ``scratch_path`` (a new file, ``size`` bytes
    virtual) is created and added to QEMU backed by the disk. The caller then
    runs :meth:`FleecingExport.actions` in its QMP transaction (or calls
    :meth:`FleecingExport.start`) and :meth:`FleecingExport.export` for the NBD
    URI. On exit everything is removed again: export, NBD server, job, node,
    fd set, scratch image and socket directory; a teardown failure never hides
    the body's exception (it is logged), else the first one is raised.
    """
    fleece = FleecingExport(monitor, node_name, disk, scratch_path, size, socket_root,
                            break_snapshot)
    try:
        fleece.attach()
        yield fleece
    except BaseException:
        try:
            fleece.close()
        except RdmBackupError as err:
            log.error("fleecing teardown failed after an earlier error: %s", err)
        raise
    fleece.close()


@contextmanager
def qemu_nbd_server(
    path: str, fmt: str | None, *, readonly: bool, extra: Sequence[str] = ()
) -> Iterator[str]:
    """Serve an image with ``qemu-nbd`` on a private unix socket; yields its NBD URI.

    Writable exports turn zero writes into zero clusters (``--detect-zeroes=unmap``).
    The server is always stopped by its pid (SIGTERM, then SIGKILL). ``fmt`` None
    leaves the format to ``extra`` (e.g. ``--image-opts`` with ``driver=`` in ``path``).
    """
    exe = require_tool("qemu-nbd")
    sock_dir = tempfile.mkdtemp(prefix="rdmb-qemu-nbd-")
    sock = os.path.join(sock_dir, "nbd.sock")
    name = object_name("nbd", "image")
    argv = [exe, "--persistent", *(["-f", fmt] if fmt else []), "-k", sock, "-x", name]
    argv += ["--read-only"] if readonly else ["--discard=unmap", "--detect-zeroes=unmap"]
    argv += [*extra, path]
    try:
        with tempfile.TemporaryFile() as stderr:
            try:
                proc = subprocess.Popen(
                    argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=stderr,
                    preexec_fn=die_with_parent,
                )
            except OSError as err:
                raise OperationError(f"cannot run qemu-nbd: {err.strerror}") from err
            try:
                _wait_for_socket(proc, sock, argv, stderr)
                yield f"nbd+unix:///{name}?socket={sock}"
            finally:
                _stop_process(proc)
    finally:
        shutil.rmtree(sock_dir, ignore_errors=True)


def _wait_for_socket(
    proc: subprocess.Popen[bytes], sock: str, argv: list[str], stderr: IO[bytes]
) -> None:
    deadline = time.monotonic() + SERVER_TIMEOUT
    while True:
        code = proc.poll()
        if code is not None:
            stderr.seek(0)
            raise CommandError(argv, code, stderr.read().decode(errors="replace"))
        if os.path.exists(sock):
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(sock)
                return
            except OSError:
                pass
            finally:
                probe.close()
        if time.monotonic() > deadline:
            raise CommandError(argv, -1, f"no socket {sock} after {SERVER_TIMEOUT:.0f} s")
        time.sleep(0.02)


def _stop_process(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def connect_nbd(uri: str, allocation: bool = False) -> Any:
    """A libnbd handle connected to ``uri`` (asking for ``base:allocation`` if wanted)."""
    handle = nbd.NBD()
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


def _block_status(handle: Any, count: int, offset: int) -> list[int]:
    """``base:allocation`` entries (length, flags, length, flags, ...) from ``offset``."""
    got: list[int] = []

    def collect(context: str, _offset: int, entries: list[int], _err: Any) -> int:
        if context == nbd.CONTEXT_BASE_ALLOCATION:
            got.extend(entries)
        return 0

    handle.block_status(count, offset, collect)
    return got


def _segments(handle: Any, size: int, use_status: bool) -> Iterator[tuple[int, int, bool]]:
    """(offset, length, reads_as_zero) in order over [0, size); starts are chunk-aligned.

    Zero segments (from ``base:allocation``) hold whole chunks only; a chunk that
    is only partly zero is read.
    """
    if not use_status:
        yield 0, size, False
        return
    count = chunk_count(size)
    pos = 0
    while pos < size:
        window_end = min(pos + STATUS_WINDOW, size)
        extents: list[tuple[int, int, bool]] = []
        cur = pos
        while cur < window_end:
            got = _block_status(handle, window_end - cur, cur)
            if not got:
                raise OperationError(f"NBD server reported no block status at {cur}")
            for i in range(0, len(got) - 1, 2):
                end = min(cur + got[i], window_end)
                extents.append((cur, end, bool(got[i + 1] & nbd.STATE_ZERO)))
                cur = end
                if cur >= window_end:
                    break
        run_start = pos
        for start, end, zero in extents:
            if not zero:
                continue
            first = -(-start // CHUNK)
            stop = count if end >= size else end // CHUNK
            if first >= stop:
                continue
            a, b = first * CHUNK, min(stop * CHUNK, size)
            if a > run_start:
                yield run_start, a - run_start, False
            yield a, b - a, True
            run_start = b
        if run_start < window_end:
            yield run_start, window_end - run_start, False
        pos = window_end


def _requests(segments: Iterator[tuple[int, int, bool]]) -> Iterator[tuple[int, int, bool]]:
    """Data segments cut into reads of at most REQUEST bytes."""
    for offset, length, zero in segments:
        if zero:
            yield offset, length, True
            continue
        for start in range(offset, offset + length, REQUEST):
            yield start, min(REQUEST, offset + length - start), False


def _stream(handle: Any, segments: Iterator[tuple[int, int, bool]]
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


class _LayerWriter:
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


def _hash_range(view: memoryview, start: int, stop: int) -> bytes:
    return b"".join(chunk_digest(view[k * CHUNK : (k + 1) * CHUNK]) for k in range(start, stop))


def _hash_piece(pool: ThreadPoolExecutor, workers: int, view: memoryview) -> bytes:
    """Digests of every chunk of ``view``, hashed by ``workers`` threads."""
    n = chunk_count(len(view))
    if workers <= 1 or n < 2 * workers:
        return _hash_range(view, 0, n)
    bounds = [n * i // workers for i in range(workers + 1)]
    return b"".join(pool.map(_hash_range, [view] * workers, bounds[:-1], bounds[1:]))


def chunk_aligned(ranges: Sequence[tuple[int, int]], size: int
                  ) -> Iterator[tuple[int, int, bool]]:
    """``(offset, length)`` byte ranges widened to whole chunks and merged, as data segments."""
    spans: list[list[int]] = []
    for offset, length in sorted(ranges):
        if length <= 0:
            continue
        start = offset // CHUNK * CHUNK
        end = min(-(-(offset + length) // CHUNK) * CHUNK, size)
        if spans and start <= spans[-1][1]:
            spans[-1][1] = max(spans[-1][1], end)
        elif start < end:
            spans.append([start, end])
    for start, end in spans:
        yield start, end - start, False


def _resync(
    source: Any, writer: _LayerWriter, size: int, parent: ChunkMap,
    progress: ProgressCallback | None,
    only: Sequence[tuple[int, int]] | None = None,
) -> bytearray:
    """Read the source once (or only the ranges ``only``); write what differs from ``parent``.

    Returns the new digests: the parent's outside ``only``, freshly computed inside.
    """
    digests = bytearray(len(parent.digests)) if only is None else bytearray(parent.digests)
    use_status = bool(source.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION))
    segments = _segments(source, size, use_status) if only is None else chunk_aligned(only, size)
    workers = max(1, min(4, os.cpu_count() or 1))
    with ThreadPoolExecutor(workers) as pool:
        for offset, length, view in _stream(source, segments):
            first = offset // CHUNK
            stop = first + chunk_count(length)
            if view is None:
                set_zero_range(digests, size, first, stop)
                for index in zero_changes(parent.digests, size, first, stop):
                    writer.zero(index * CHUNK, min(CHUNK, size - index * CHUNK))
            else:
                digests[first * DIGEST_SIZE : stop * DIGEST_SIZE] = _hash_piece(
                    pool, workers, view
                )
                run: list[int] = []
                for index in differing(digests, parent.digests, first, stop):
                    chunk_len = min(CHUNK, size - index * CHUNK)
                    pos = index * DIGEST_SIZE
                    if digests[pos : pos + DIGEST_SIZE] == zero_digest(chunk_len):
                        writer.zero(index * CHUNK, chunk_len)
                        continue
                    if run and run[-1] + 1 != index:
                        _write_run(writer, view, first, run, size)
                        run = []
                    run.append(index)
                if run:
                    _write_run(writer, view, first, run, size)
            if progress is not None:
                progress(offset + length, size)
    writer.finish()
    return digests


def _write_run(writer: _LayerWriter, view: memoryview, first: int, run: list[int],
               size: int) -> None:
    start = (run[0] - first) * CHUNK
    end = min((run[-1] + 1 - first) * CHUNK, size - first * CHUNK)
    writer.write(run[0] * CHUNK, view[start:end])


def create_layer(layer_path: str, backing_relpath: str, size: int) -> None:
    """Create a new qcow2 layer (mode 0600) on top of ``backing_relpath`` (qcow2)."""
    if os.path.isabs(backing_relpath):
        raise RepositoryError(f"backing file {backing_relpath} must be relative to the layer")
    try:
        fd = os.open(layer_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    except OSError as err:
        raise RepositoryError(f"cannot create layer {layer_path}: {err.strerror}") from err
    os.close(fd)
    try:
        img.create(layer_path, "qcow2", size, backing=backing_relpath)
    except BaseException:
        os.unlink(layer_path)
        raise


def resync_layer(
    nbd_uri: str,
    size: int,
    parent_map: ChunkMap,
    layer_path: str,
    backing_relpath: str,
    progress: ProgressCallback | None = None,
    only: Sequence[tuple[int, int]] | None = None,
) -> tuple[ChunkMap, int]:
    """Write the chunks of the export ``nbd_uri`` that differ from ``parent_map`` as a new layer.

    The export is read once (zero extents that ``base:allocation`` reports are
    not read), or only the byte ranges ``only`` that the storage reported as
    changed, in pipelined 4 MiB requests; chunk digests are compared with
    ``parent_map``. ``layer_path`` is created as qcow2 backed by
    ``backing_relpath`` (relative to the layer's directory) and gets only the
    changed chunks: data through ``qemu-nbd``, chunks that became all-zero as
    NBD zero requests (zero clusters, no data). Returns the map of the export
    and the data bytes written. On failure the layer file is removed.
    """
    if (parent_map.size, parent_map.chunk_size, parent_map.algorithm) != (
        size,
        CHUNK,
        ALGORITHM,
    ):
        raise RepositoryError(
            f"parent chunk map ({parent_map.size} bytes, {parent_map.chunk_size}-byte chunks) "
            f"does not fit a {size}-byte disk"
        )
    started = time.monotonic()
    source = None
    created = False
    try:
        source = connect_nbd(nbd_uri, allocation=True)
        exported = int(source.get_size())
        if exported != size:
            raise StorageError(f"{nbd_uri} has {exported} bytes, expected {size}")
        create_layer(layer_path, backing_relpath, size)
        created = True
        # the layer alone, its backing file not opened: only whole clusters are
        # written (the last one up to the disk's end), so nothing is copied up
        layer_only = layers.json_filename(layers.file_chain([layer_path]))
        with qemu_nbd_server(layer_only, None, readonly=False) as layer_uri:
            target = connect_nbd(layer_uri)
            try:
                writer = _LayerWriter(target)
                digests = _resync(source, writer, size, parent_map, progress, only)
            finally:
                disconnect_nbd(target)
    except nbd.Error as err:
        if created:
            os.unlink(layer_path)
        raise OperationError(f"NBD I/O failed during resync of {layer_path}: {err}") from err
    except BaseException:
        if created:
            os.unlink(layer_path)
        raise
    finally:
        if source is not None:
            disconnect_nbd(source)
    log.info(
        "resync of %d bytes into %s: %d bytes written, %d zeroed, %.2f s",
        size, layer_path, writer.data_bytes, writer.zero_bytes, time.monotonic() - started,
    )
    return ChunkMap(size, CHUNK, ALGORITHM, digests), writer.data_bytes
