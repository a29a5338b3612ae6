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
def _ioctx(source: RbdSource, what: str) -> Iterator[Any]:
    with rbd.cluster(source, what) as handle:
        try:
            ioctx = handle.open_ioctx(source.pool)
        except rbd.rados.Error as err:
            raise StorageError(f"{what}: cannot open pool {source.pool}: "
                               f"{type(err).__name__}") from err
        try:
            if source.namespace:
                ioctx.set_namespace(source.namespace)
            yield ioctx
        finally:
            ioctx.close()


def users(image: Any) -> list[str]:
    """Who has the open image: its watchers (clients that opened it) and lockers."""
    found = [f"watcher {w.get('addr', '?')}" for w in image.watchers_list()]
    lockers = image.list_lockers() or {}
    found += [f"lock holder {client}" for client, _cookie, _addr in lockers.get("lockers", [])]
    return found


def prepare(source: RbdSource, size: int, force: bool, what: str) -> DestImage:
    """Check the image ``source`` names for a restore of ``size`` bytes, or create it thin
    (raises UsageError for one that is smaller, or in use unless ``force``)."""
    rbd.require(what)
    with _ioctx(source, what) as ioctx:
        try:
            with rbd.rbd.Image(ioctx, source.image, read_only=True) as image:
                have, image_id = int(image.size()), str(image.id())
                held = users(image)
        except rbd.rbd.ImageNotFound:
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
