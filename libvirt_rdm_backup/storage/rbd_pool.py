"""A Ceph pool that keeps backups: RBD images, their snapshots, and rados objects with omaps.

The client side of an ``rbd://`` target (:mod:`libvirt_rdm_backup.engine.rbd_store`);
with :mod:`.rbd`, the only module that imports the bindings (guarded the same way).
The client authenticates as the target's user with the key of a keyring file:
``RDM_BACKUP_CEPH_KEYRING``, else the config file's ``keyring`` files that hold
the user's key, else ``ceph.client.USER.keyring`` beside the config file.
The key is read into this process's memory only (never argv, logs or error lines).
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections import deque
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from typing import Any

from libvirt_rdm_backup.errors import OperationError, StorageError, VerificationError
from libvirt_rdm_backup.storage import rbd as ceph

try:
    import rados
    import rbd
except ImportError:  # pragma: no cover - depends on the host
    rados = rbd = None

_ZEROS = bytes(4 << 20)
READ = 4 << 20  # bytes per read of a digest
IN_FLIGHT = 8  # reads of a digest at a time


def keyring_paths(conf: str, user: str, configured: str | None) -> list[str]:
    """Where the key of ``client.USER`` may be, in the order tried (module docstring)."""
    named = os.environ.get(ceph.KEYRING_ENV)
    if named:
        return [named]
    paths = [p.strip() for p in (configured or "").split(",") if os.path.isfile(p.strip())]
    return [*paths, os.path.join(os.path.dirname(conf), f"ceph.client.{user}.keyring")]


def user_key(conf: str, user: str, configured: str | None) -> str:
    """The base64 key of ``client.USER`` from the first keyring file that holds it."""
    paths = keyring_paths(conf, user, configured)
    for path in paths[:-1]:
        try:
            return ceph.keyring_key(path, user)
        except StorageError:
            continue
    return ceph.keyring_key(paths[-1], user)


def _error(what: str, err: Exception) -> StorageError:
    return StorageError(f"{what}: {type(err).__name__}: {str(err)[:200]}")


class RbdPool:
    """A connection to one pool as one user (open with :meth:`connect`, close after)."""

    def __init__(self, conf: str, user: str, pool: str) -> None:
        self.conf, self.user, self.pool = conf, user, pool
        self.key = ""
        self._handle: Any = None
        self._ioctx: Any = None

    def connect(self) -> RbdPool:
        """Connect (raises StorageError, one line, without the key)."""
        what = f"rbd://{self.pool}"
        ceph.require(what)
        if not os.path.isfile(self.conf):
            raise StorageError(f"{what}: no Ceph config file {self.conf}")
        try:
            probe = rados.Rados(rados_id=self.user, conffile=self.conf,
                                     conf=ceph.client_conf_options())
            configured = str(probe.conf_get("keyring") or "")
            probe.shutdown()
        except rados.Error as err:
            raise _error(f"{what}: cannot read {self.conf}", err) from err
        self.key = user_key(self.conf, self.user, configured)
        conf = {**ceph.client_conf_options(), "key": self.key}
        try:
            self._handle = rados.Rados(rados_id=self.user, conffile=self.conf, conf=conf)
            self._handle.connect(timeout=ceph.timeout())
            self._ioctx = self._handle.open_ioctx(self.pool)
        except rados.Error as err:
            self.close()
            raise _error(f"{what}: cannot reach the pool as client.{self.user}", err) from err
        return self

    def close(self) -> None:
        """Disconnect."""
        if self._ioctx is not None:
            self._ioctx.close()
            self._ioctx = None
        if self._handle is not None:
            self._handle.shutdown()
            self._handle = None

    def monitors(self) -> list[tuple[str, int]]:
        """The monitors' v1 addresses (QEMU's rbd driver takes host and port)."""
        found = []
        for entry in ceph.monitors(self._handle):
            for addr in entry.split(","):
                kind, _, hostport = addr.partition(":")
                host, _, port = hostport.rpartition(":")
                if kind == "v1" and host:
                    found.append((host.strip("[]"), int(port)))
        return found

    # rados objects: the index (omap) and its attributes

    def omap_keys(self, name: str, after: str, count: int) -> tuple[list[str], int]:
        """Up to ``count`` of an object's omap keys after ``after``, in order, and the
        object's version they were read at (``([], 0)`` when it is absent). The OSD may
        return fewer (it caps a reply at osd_max_omap_entries_per_request keys and
        osd_max_omap_bytes_per_request bytes): the end is a page without keys. A key that
        is not UTF-8 is a VerificationError (the bindings cannot name it to read past it)."""
        try:
            with rados.ReadOpCtx() as op:
                found, _ = self._ioctx.get_omap_keys(op, after, count)
                self._ioctx.operate_read_op(op, name)
                return [str(k) for k, _v in found], int(self._ioctx.get_last_version())
        except rados.ObjectNotFound:
            return [], 0
        except UnicodeDecodeError as err:
            raise VerificationError(f"{name} in pool {self.pool} holds an omap key that is "
                                    f"not UTF-8 ({bytes(err.object)[:64]!r}): not one this "
                                    "tool writes, and no key after it can be listed") from err
        except rados.Error as err:
            raise _error(f"cannot list the keys of {name} in pool {self.pool}", err) from err

    def omap_values(self, name: str, keys: Sequence[str]) -> tuple[dict[str, bytes], int]:
        """The values of those of ``keys`` that the object's omap holds, read in one op,
        and the object's version they were read at (``({}, 0)`` when it is absent). The
        OSD caps no reply by key: each value comes whole, as large as one write made it."""
        try:
            with rados.ReadOpCtx() as op:
                found, _ = self._ioctx.get_omap_vals_by_keys(op, tuple(keys))
                self._ioctx.operate_read_op(op, name)
                return ({str(k): bytes(v) for k, v in found},
                        int(self._ioctx.get_last_version()))
        except rados.ObjectNotFound:
            return {}, 0
        except rados.Error as err:
            raise _error(f"cannot read {name} in pool {self.pool}", err) from err

    def set_omap(self, name: str, values: dict[str, bytes], remove: tuple[str, ...] = ()
                 ) -> None:
        """Set and remove omap keys of an object in one atomic write."""
        try:
            with rados.WriteOpCtx() as op:
                if values:
                    self._ioctx.set_omap(op, tuple(values), tuple(values.values()))
                if remove:
                    self._ioctx.remove_omap_keys(op, remove)
                self._ioctx.operate_write_op(op, name)
        except rados.Error as err:
            raise _error(f"cannot write {name} in pool {self.pool}", err) from err

    @contextmanager
    def locked(self, name: str, lock: str) -> Iterator[None]:
        """An exclusive rados lock of this client on an object (fails at once when held)."""
        cookie = f"{socket.gethostname()}:{os.getpid()}"
        try:
            self._ioctx.lock_exclusive(name, lock, cookie, desc="rdm-backup writer")
        except rados.ObjectBusy as err:
            raise OperationError(f"another run writes these backups in pool {self.pool} "
                            f"({lock} is locked)") from err
        except rados.Error as err:
            raise _error(f"cannot lock {name} in pool {self.pool}", err) from err
        try:
            yield
        finally:
            try:
                self._ioctx.unlock(name, lock, cookie)
            except rados.Error:
                pass

    # images and snapshots

    def ensure_image(self, name: str, size: int, object_size: int) -> None:
        """A thin image of ``size`` bytes (created, or resized: its snapshots keep theirs)."""
        try:
            rbd.RBD().create(self._ioctx, name, size, order=object_size.bit_length() - 1)
            return
        except rbd.ImageExists:
            pass
        except (rados.Error, rbd.Error) as err:
            raise _error(f"cannot create RBD image {self.pool}/{name}", err) from err
        with self.image(name) as image:
            if int(image.size()) != size:
                image.resize(size)

    @contextmanager
    def image(self, name: str, snapshot: str | None = None) -> Iterator[Any]:
        """An open image (read-only at ``snapshot``)."""
        try:
            image = rbd.Image(self._ioctx, name, snapshot=snapshot,
                                   read_only=snapshot is not None)
        except (rados.Error, rbd.Error) as err:
            where = f"{name}@{snapshot}" if snapshot else name
            raise _error(f"cannot open RBD image {self.pool}/{where}", err) from err
        try:
            yield image
        finally:
            image.close()

    def snapshots(self, name: str) -> list[str]:
        """The image's snapshots, oldest first ([] when the image is absent)."""
        try:
            with self.image(name) as image:
                return [str(s["name"]) for s in sorted(image.list_snaps(), key=lambda s: s["id"])]
        except StorageError:
            return []

    def snapshot_sizes(self, name: str) -> dict[str, int]:
        """The image's snapshots: name -> size in bytes ({} when the image is absent)."""
        try:
            with self.image(name) as image:
                return {str(s["name"]): int(s["size"]) for s in image.list_snaps()}
        except StorageError:
            return {}

    def reset_head(self, name: str, snapshot: str) -> bool:
        """Make the image's head read as ``snapshot`` again when anything was written since
        (a backup cut short before its snapshot, another writer of the pool): an
        incremental written over it then holds nothing else. True when it had to."""
        with self.image(name) as image:
            try:
                sizes = {str(s["name"]): int(s["size"]) for s in image.list_snaps()}
                if snapshot not in sizes:
                    raise StorageError(f"{self.pool}/{name} has no snapshot {snapshot}")
                written: list[int] = []
                image.diff_iterate(0, int(image.size()), snapshot,
                                   lambda offset, _n, _e: written.append(offset),
                                   whole_object=True)
                if not written and int(image.size()) == sizes[snapshot]:
                    return False
                image.rollback_to_snap(snapshot)
            except (rados.Error, rbd.Error) as err:
                raise _error(f"cannot reset {self.pool}/{name} to {snapshot}", err) from err
        return True

    def create_snapshot(self, name: str, snapshot: str) -> None:
        """Snapshot the image."""
        with self.image(name) as image:
            try:
                image.create_snap(snapshot)
            except rbd.Error as err:
                raise _error(f"cannot snapshot {self.pool}/{name}", err) from err

    def remove_snapshot(self, name: str, snapshot: str) -> None:
        """Remove a snapshot (absent: nothing to do)."""
        with self.image(name) as image:
            try:
                image.remove_snap(snapshot)
            except rbd.ImageNotFound:
                pass
            except rbd.Error as err:
                raise _error(f"cannot remove {self.pool}/{name}@{snapshot}", err) from err

    def changed(self, name: str, snapshot: str | None, since: str | None,
                exact: bool = False) -> int:
        """Bytes of the objects written between ``since`` (None: the start) and
        ``snapshot`` (None: the image's head): what ``rbd du`` counts for it
        (``exact``: the extents written, not their whole objects)."""
        found = [0]

        def count(_offset: int, length: int, exists: bool) -> int:
            found[0] += length if exists else 0
            return 0

        with self.image(name, snapshot) as image:
            image.diff_iterate(0, int(image.size()), since, count, whole_object=not exact)
        return found[0]

    def used(self, name: str) -> int:
        """Bytes the image and its snapshots take (as ``rbd du``'s total)."""
        points: list[str | None] = [*self.snapshots(name), None]
        return sum(self.changed(name, snap, points[i - 1] if i else None)
                   for i, snap in enumerate(points))

    def digest(self, name: str, snapshot: str, algorithm: str) -> str:
        """Digest of a snapshot's contents, read once (holes hashed as zeros, not read;
        ``IN_FLIGHT`` reads at a time, hashed in order)."""
        hasher = hashlib.new(algorithm)
        with self.image(name, snapshot) as image, ThreadPoolExecutor(IN_FLIGHT) as pool:
            size = int(image.size())
            extents: list[tuple[int, int]] = []
            image.diff_iterate(0, size, None,
                               lambda o, n, e: extents.append((o, n)) if e else None)
            pending: deque[Future[bytes] | int] = deque()  # reads, or runs of zeros
            at = 0
            for offset, length in [*sorted(extents), (size, 0)]:
                pending.append(offset - at)
                for start in range(offset, offset + length, READ):
                    pending.append(pool.submit(image.read, start,
                                               min(READ, offset + length - start)))
                    while len(pending) > IN_FLIGHT:
                        _take(hasher, pending.popleft())
                at = offset + length
            while pending:
                _take(hasher, pending.popleft())
        return hasher.hexdigest()


def _take(hasher: Any, item: Future[bytes] | int) -> None:
    """Hash the next piece: a read's bytes, or a run of zeros."""
    if not isinstance(item, int):
        hasher.update(item.result())
        return
    while item > 0:
        step = min(item, len(_ZEROS))
        hasher.update(memoryview(_ZEROS)[:step])
        item -= step
