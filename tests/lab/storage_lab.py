"""Real storage for lab tests: loop devices and iSCSI LUNs on a loopback tgtd.

Every context manager removes what it made, also when the body fails:
:func:`loop_device` detaches its loop device, :func:`iscsi_target` deletes its
target with ``--force``, :func:`rdmb_reflink_tmpdir` removes its directory on the
lab's reflink XFS (:func:`reflink_dir`). Names carry ``rdmb`` and :data:`RUN_TOKEN`
(unique per run). tgtd is only ever started bound to 127.0.0.1 (:func:`ensure_tgtd`)
and is left running for other tests.
"""

from __future__ import annotations

import contextlib
import os
import socket
import subprocess
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from libvirt_rdm_backup.domain.disks import IscsiSource
from libvirt_rdm_backup.errors import CommandError
from libvirt_rdm_backup.process import run
from libvirt_rdm_backup.storage import tgt

RUN_TOKEN = uuid.uuid4().hex[:8]
PORTAL_HOST = "127.0.0.1"
PORTAL_PORT = 3260
TIMEOUT = 60.0
REFLINK_DIR = Path("/var/lib/rdmb-lab/reflink")  # tools/lab.sh up mounts a reflink XFS here
_counter = iter(range(1, 1_000_000))


def unique_name(prefix: str = "rdmb") -> str:
    """A name with ``rdmb``, the run token and a per-run counter."""
    return f"{prefix}-{RUN_TOKEN}-{next(_counter)}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((PORTAL_HOST, 0))
        return int(sock.getsockname()[1])


def is_root() -> bool:
    """True when running as root (loop devices and tgtadm need it)."""
    return os.geteuid() == 0


@dataclass(frozen=True)
class IscsiLun:
    """A LUN on the loopback tgtd."""

    iqn: str
    tid: int
    lun: int = 1
    host: str = PORTAL_HOST
    port: int = PORTAL_PORT

    @property
    def source(self) -> IscsiSource:
        """The LUN as a domain's iSCSI source."""
        return IscsiSource(self.host, self.port, self.iqn, self.lun)

    @property
    def url(self) -> str:
        """libiscsi URL (``iscsi://127.0.0.1:3260/IQN/1``)."""
        return self.source.url


@contextlib.contextmanager
def rdmb_tmpdir() -> Iterator[Path]:
    """A temporary directory under /var/tmp whose name holds ``rdmb`` and the run token."""
    with tempfile.TemporaryDirectory(prefix=f"rdmb-{RUN_TOKEN}-", dir="/var/tmp") as path:
        os.chmod(path, 0o755)
        yield Path(path)


def reflink_dir() -> Path:
    """The lab's reflink-capable XFS mount (``tools/lab.sh up``); RuntimeError when missing."""
    if not os.path.ismount(REFLINK_DIR):
        raise RuntimeError(f"no reflink filesystem mounted at {REFLINK_DIR} (run `make lab-up`)")
    return REFLINK_DIR


@contextlib.contextmanager
def rdmb_reflink_tmpdir() -> Iterator[Path]:
    """A fresh directory on the lab's reflink XFS (name with ``rdmb`` and the run token)."""
    with tempfile.TemporaryDirectory(prefix=f"rdmb-{RUN_TOKEN}-", dir=reflink_dir()) as path:
        os.chmod(path, 0o755)
        yield Path(path)


def make_file(path: Path, size: int, pattern: bytes = b"rdmb") -> Path:
    """A file of ``size`` bytes filled with a repeated pattern (each MiB tagged by its index)."""
    chunk = 1 << 20
    with path.open("wb") as out:
        for index in range(0, size, chunk):
            block = (f"{index // chunk:08d}".encode() + pattern) * (chunk // (8 + len(pattern)) + 1)
            out.write(block[: min(chunk, size - index)])
    return path


@contextlib.contextmanager
def loop_device(path: str | Path, offset: int = 0, sizelimit: int = 0) -> Iterator[str]:
    """Attach ``path`` to a free loop device (``losetup -f --show``); detach it afterwards."""
    argv = ["losetup", "-f", "--show"]
    if offset:
        argv += ["--offset", str(offset)]
    if sizelimit:
        argv += ["--sizelimit", str(sizelimit)]
    device = run([*argv, str(path)], timeout=TIMEOUT).stdout.strip()
    try:
        yield device
    finally:
        run(["losetup", "-d", device], timeout=TIMEOUT)


def _tgtadm(*args: str) -> str:
    return run(["tgtadm", "--lld", "iscsi", *args], timeout=TIMEOUT).stdout


def ensure_tgtd() -> None:
    """Start tgtd on the loopback portal unless one already answers tgtadm."""
    if tgt.tgtadm_available():
        return
    subprocess.run(
        ["tgtd", "--iscsi", f"portal={PORTAL_HOST}:{PORTAL_PORT}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=TIMEOUT,
        check=True,
    )
    deadline = time.monotonic() + 20
    while not tgt.tgtadm_available():
        if time.monotonic() > deadline:
            raise RuntimeError("tgtd did not start answering tgtadm")
        time.sleep(0.2)


def _new_target(iqn: str) -> int:
    """Create a target with the next free tid (retrying when another run takes it)."""
    error: CommandError | None = None
    for _attempt in range(20):
        used = {target.tid for target in tgt.show_targets()}
        tid = max(used, default=0) + 1
        try:
            _tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
        except CommandError as err:
            error = err
            continue
        return tid
    raise RuntimeError(f"could not create tgt target {iqn}: {error}")


@contextlib.contextmanager
def iscsi_target(backing_path: str | Path, iqn: str | None = None) -> Iterator[IscsiLun]:
    """A tgtd target with LUN 1 backed by ``backing_path``, open to all initiators."""
    ensure_tgtd()
    iqn = iqn or f"iqn.2026-11.org.rdmb:{unique_name('rdmb')}"
    tid = _new_target(iqn)
    try:
        _tgtadm(
            "--op", "new", "--mode", "logicalunit",
            "--tid", str(tid), "--lun", "1", "-b", str(backing_path),
        )  # fmt: skip
        _tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", "ALL")
        yield IscsiLun(iqn=iqn, tid=tid)
    finally:
        _tgtadm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force")
