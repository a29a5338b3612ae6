"""The reflink agents' clones: files in :data:`SNAPSHOT_DIR` beside the file they clone.

Nothing here follows a symlink: a clone is only ever a regular file in the real
snapshot directory (:func:`open_snapshot_dir`).
"""

from __future__ import annotations

import errno
import logging
import os
import stat

from libvirt_rdm_backup.errors import StorageError
from libvirt_rdm_backup.storage import reflink

log = logging.getLogger("libvirt_rdm_backup.storage.snapshots")

SNAPSHOT_DIR = ".rdmb-snapshots"


def clone_path(source: str, name: str) -> str:
    """Where the reflink clone ``name`` of file ``source`` lives: ``<dir>/.rdmb-snapshots/``."""
    return os.path.join(os.path.dirname(os.path.abspath(source)), SNAPSHOT_DIR, f"{name}.img")


def make_clone(source: str, name: str) -> str:
    """Clone ``source`` as snapshot ``name`` beside it (directory made 0700); its path."""
    path = clone_path(source, name)
    try:
        reflink.reflink_clone(source, path)
    except StorageError:
        if os.path.isdir(os.path.dirname(path)):
            raise
        try:
            os.mkdir(os.path.dirname(path), 0o700)
        except FileExistsError:
            pass
        except OSError as err:
            raise StorageError(f"cannot create {os.path.dirname(path)}: {err.strerror}") from err
        reflink.reflink_clone(source, path)
    return path


def open_snapshot_dir(directory: str) -> int:
    """A descriptor of the snapshot directory itself, never of what a symlink names.

    Raises FileNotFoundError when it is missing, StorageError when it is not a directory.
    """
    try:
        return os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except FileNotFoundError:
        raise
    except OSError as err:
        raise StorageError(f"{directory} is not a snapshot directory: {err.strerror}") from err


def _clone_mode(backing: str, name: str) -> int | None:
    """``lstat`` mode of clone ``name`` of ``backing`` (no symlink followed); None: missing."""
    path = clone_path(backing, name)
    try:
        fd = open_snapshot_dir(os.path.dirname(path))
    except FileNotFoundError:
        return None
    try:
        return os.lstat(os.path.basename(path), dir_fd=fd).st_mode
    except FileNotFoundError:
        return None
    except OSError as err:
        raise StorageError(f"cannot look at {path}: {err.strerror}") from err
    finally:
        os.close(fd)


def clone_problem(backing: str, name: str) -> str | None:
    """Why clone ``name`` of ``backing`` must not be touched (None: a regular file, or none)."""
    try:
        mode = _clone_mode(backing, name)
    except StorageError as err:
        return err.message
    if mode is not None and not stat.S_ISREG(mode):
        return f"{clone_path(backing, name)} is not a regular file"
    return None


def clone_exists(backing: str, name: str) -> bool:
    """True when clone ``name`` of ``backing`` is a regular file (no symlink followed)."""
    mode = _clone_mode(backing, name)
    return mode is not None and stat.S_ISREG(mode)


def remove_clone(backing: str, name: str) -> None:
    """Delete clone ``name`` of ``backing`` (idempotent), and its directory once empty.

    Only a regular file in the real snapshot directory is deleted (no symlink followed).
    """
    path = clone_path(backing, name)
    directory, entry = os.path.split(path)
    try:
        fd = open_snapshot_dir(directory)
    except FileNotFoundError:
        return
    try:
        if not stat.S_ISREG(os.lstat(entry, dir_fd=fd).st_mode):
            raise StorageError(f"refusing to delete {path}: not a regular file")
        os.unlink(entry, dir_fd=fd)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise StorageError(f"cannot delete snapshot file {path}: {err.strerror}") from err
    finally:
        os.close(fd)
    try:
        os.rmdir(directory)
    except OSError as err:
        if err.errno not in (errno.ENOTEMPTY, errno.EEXIST, errno.ENOENT):
            log.debug("keeping %s: %s", directory, err)
