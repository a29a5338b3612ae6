"""A small ext4 filesystem on a loop device that can be "crashed": what it never synced is lost.

:meth:`CrashFs.crash` copies the image file as the loop device left it (only what the
filesystem wrote down, not its dirty page cache), drops the mounted filesystem and mounts
the copy in its place: the state after a power loss. ``commit=600`` keeps the journal from
committing on its own in between, so only flushes (``fsync``, NBD flush) make data durable.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

from tools.labkit import loop_device

OPTIONS = "commit=600"


class CrashFs:
    """An ext4 filesystem in ``work``/fs.img, mounted at ``work``/mnt while in use."""

    def __init__(self, work: Path, size: int) -> None:
        self.image, self.mount = work / "fs.img", work / "mnt"
        self.mount.mkdir()
        with open(self.image, "wb") as stream:
            stream.truncate(size)
        subprocess.run(["mkfs.ext4", "-q", "-F", "-m", "0", str(self.image)], check=True)
        self._stack = ExitStack()

    def _mount(self) -> None:
        device = self._stack.enter_context(loop_device(self.image))
        subprocess.run(["mount", "-o", OPTIONS, device, str(self.mount)], check=True)
        self._stack.callback(subprocess.run, ["umount", "-l", str(self.mount)], check=False)

    def crash(self) -> None:
        """Lose every write the filesystem did not sync: remount it from a copy of its
        image as it is on the (loop) device now, and drop the page cache."""
        crashed = self.image.with_name("fs-crashed.img")
        shutil.copyfile(self.image, crashed)  # the device's content, without dirty pages
        self._stack.close()  # the lazily unmounted filesystem may write back: not to the copy
        os.replace(crashed, self.image)
        Path("/proc/sys/vm/drop_caches").write_text("3\n")
        self._mount()

    def fill(self) -> Path:
        """Take all room left on the filesystem with a ballast file; returns it."""
        ballast = self.mount / "ballast"
        free = os.statvfs(self.mount)
        subprocess.run(["fallocate", "-l", str(free.f_bavail * free.f_frsize), str(ballast)],
                       check=False)
        with contextlib.suppress(OSError), open(ballast, "ab") as stream:
            stream.write(bytes(1 << 20))  # the last blocks fallocate could not take
        return ballast


@contextlib.contextmanager
def crash_fs(work: Path, size: int) -> Iterator[CrashFs]:
    """A mounted :class:`CrashFs`; unmounted and its loop device detached afterwards."""
    fs = CrashFs(work, size)
    fs._mount()
    try:
        yield fs
    finally:
        fs._stack.close()
