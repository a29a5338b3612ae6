"""An RBD image as the destination of a restore: checked, or created thin, through librbd.

The bindings come through :mod:`.rbd` (the only module importing them), with its
credentials: a libvirt secret's key remembered there, or ``RDM_BACKUP_CEPH_KEYRING``.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup.domain.disks import RbdSource
from libvirt_rdm_backup.errors import StorageError, UsageError
from libvirt_rdm_backup.storage import rbd


@dataclass(frozen=True)
class DestImage:
    """What a restore found at its RBD destination."""

    created: bool  # made thin by this restore (removed again when the copy fails)
    size: int
    image_id: str


@contextmanager
def _pool(source: RbdSource, what: str) -> Iterator[tuple[Any, Any]]:
    """The connected cluster and an I/O context on the source's pool and namespace."""
    with rbd.cluster(source, what) as handle:
        try:
            ioctx = handle.open_ioctx(source.pool)
        except rbd.rados.Error as err:
            raise StorageError(f"{what}: cannot open pool {source.pool}: "
                               f"{type(err).__name__}") from err
        try:
            if source.namespace:
                ioctx.set_namespace(source.namespace)
            yield handle, ioctx
        finally:
            ioctx.close()


@contextmanager
def _ioctx(source: RbdSource, what: str) -> Iterator[Any]:
    with _pool(source, what) as (_handle, ioctx):
        yield ioctx


@dataclass(frozen=True)
class ImageState:
    """An existing image as its cluster reports it (for a restore to the original)."""

    size: int
    image_id: str
    cluster_fsid: str
    users: list[str]


def users(image: Any) -> list[str]:
    """Who has the open image: its watchers (clients that opened it), lockers and the owner
    of its exclusive lock."""
    found = [f"watcher {w.get('addr', '?')}" for w in image.watchers_list()]
    lockers = image.list_lockers() or {}
    found += [f"lock holder {client}" for client, _cookie, _addr in lockers.get("lockers", [])]
    try:
        owners = list(image.lock_get_owners())
    except rbd.rbd.Error:  # no exclusive-lock feature
        owners = []
    found += [f"exclusive lock owner {o.get('owner', '?')}" for o in owners
              if f"lock holder {o.get('owner')}" not in found]
    return found


def inspect(source: RbdSource, what: str) -> ImageState | None:
    """The image ``source`` names (None: there is none), opened read-only."""
    rbd.require(what)
    with _pool(source, what) as (handle, ioctx):
        try:
            with rbd.rbd.Image(ioctx, source.image, read_only=True) as image:
                return ImageState(int(image.size()), str(image.id()), str(handle.get_fsid()),
                                  users(image))
        except rbd.rbd.ImageNotFound:
            return None
        except (rbd.rados.Error, rbd.rbd.Error) as err:
            raise StorageError(f"{what}: cannot open RBD image {source.name}: "
                               f"{type(err).__name__}: {str(err)[:200]}") from err


def prepare(source: RbdSource, size: int, force: bool, what: str,
            expect_id: str | None = None) -> DestImage:
    """Check the image ``source`` names for a restore of ``size`` bytes, or create it thin
    (raises UsageError for one that is smaller, or in use unless ``force``; with
    ``expect_id``, for one that is missing or has another id)."""
    rbd.require(what)
    with _ioctx(source, what) as ioctx:
        try:
            with rbd.rbd.Image(ioctx, source.image, read_only=True) as image:
                have, image_id = int(image.size()), str(image.id())
                held = users(image)
        except rbd.rbd.ImageNotFound:
            if expect_id is not None:
                raise UsageError(f"{what}: RBD image {source.name} is gone") from None
            try:
                rbd.rbd.RBD().create(ioctx, source.image, size, old_format=False)
                with rbd.rbd.Image(ioctx, source.image, read_only=True) as image:
                    return DestImage(True, size, str(image.id()))
            except (rbd.rados.Error, rbd.rbd.Error) as err:
                raise StorageError(f"{what}: cannot create RBD image {source.name}: "
                                   f"{type(err).__name__}: {str(err)[:200]}") from err
        except (rbd.rados.Error, rbd.rbd.Error) as err:
            raise StorageError(f"{what}: cannot open RBD image {source.name}: "
                               f"{type(err).__name__}: {str(err)[:200]}") from err
    if expect_id is not None and image_id != expect_id:
        raise UsageError(f"{what}: RBD image {source.name} changed (image id {image_id}, "
                         f"was {expect_id}); nothing was written")
    if have < size:
        raise UsageError(f"restore target rbd:{source.name} is too small ({have} bytes, the "
                         f"disk has {size})")
    if held and not force:
        raise UsageError(f"restore target rbd:{source.name} is in use ({'; '.join(held)}); "
                         "use --force to overwrite it")
    return DestImage(False, have, image_id)


def remove(source: RbdSource, what: str) -> None:
    """Remove the image (one this restore created and could not fill)."""
    with _ioctx(source, what) as ioctx:
        try:
            rbd.rbd.RBD().remove(ioctx, source.image)
        except (rbd.rados.Error, rbd.rbd.Error) as err:
            raise StorageError(f"{what}: cannot remove RBD image {source.name}: "
                               f"{type(err).__name__}") from err
