"""A typed wrapper of ``qemu-img``: argv lists, parsed JSON, errors as exceptions."""

from __future__ import annotations

import json
import subprocess
import tempfile
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup import retry
from libvirt_rdm_backup.errors import CommandError, OperationError
from libvirt_rdm_backup.process import die_with_parent, run

MAX_MAP_LINE = 4096  # one extent of ``qemu-img map --output=json`` is about 120 bytes
# QEMU's key-derivation benchmark of a new LUKS header measured no time (a coarse clock):
# it fails now and then under load, and works when run again
LUKS_BENCHMARK_FAILED = "Unable to get accurate CPU usage"
LUKS_ATTEMPTS = 10


@dataclass(frozen=True)
class MapExtent:
    """One extent of ``qemu-img map``: guest range and whether it holds data."""

    start: int
    length: int
    data: bool
    zero: bool
    depth: int = 0  # 0: in the image itself; n: in its n-th backing file
    present: bool = True
    offset: int | None = None  # host offset of the data in the file at ``depth``

    @property
    def end(self) -> int:
        """First byte after the extent."""
        return self.start + self.length


# ``--object`` definitions every qemu-img call gets (TLS credentials of NBD nodes)
_OBJECTS: ContextVar[tuple[str, ...]] = ContextVar("qemu_img_objects", default=())
# descriptors those calls inherit (a ``secret`` object reading its key from ``/dev/fd/N``)
_FDS: ContextVar[tuple[int, ...]] = ContextVar("qemu_img_fds", default=())


@contextmanager
def objects(*definitions: str, fds: tuple[int, ...] = ()) -> Iterator[None]:
    """Pass ``--object`` definitions (and the descriptors ``fds`` they read) to every
    qemu-img call made inside the block."""
    token = _OBJECTS.set(_OBJECTS.get() + definitions)
    fds_token = _FDS.set(_FDS.get() + fds)
    try:
        yield
    finally:
        _FDS.reset(fds_token)
        _OBJECTS.reset(token)


def object_args() -> list[str]:
    """The ``--object`` arguments of :func:`objects` (qemu-img and qemu-nbd take them)."""
    argv: list[str] = []
    for definition in _OBJECTS.get():
        argv += ["--object", definition]
    return argv


def object_fds() -> tuple[int, ...]:
    """The descriptors the objects of :func:`objects` read."""
    return _FDS.get()


def _qemu_img(command: str) -> list[str]:
    return ["qemu-img", command, *object_args()]


def check_end(path: str, fmt: str) -> int:
    """End offset of a qcow2 image's used area (``qemu-img check``)."""
    proc = run([*_qemu_img("check"), "--output=json", "-f", fmt, path], check=False,
               pass_fds=_FDS.get())
    try:
        return int(json.loads(proc.stdout)["image-end-offset"])
    except (ValueError, KeyError) as err:
        raise OperationError(f"cannot check {fmt} image: {proc.stderr.strip()}") from err


def create(path: str, fmt: str, size: int, backing: str | None = None,
           options: Mapping[str, str] | None = None) -> None:
    """Create an image (qcow2 with 64 KiB clusters by default).

    A ``backing`` name is only written into the header (``-u``): the backing file,
    which comes from a repository, is not opened. ``options``: creation options of the
    format (``-o``, e.g. ``compression_type``).
    """
    argv = [*_qemu_img("create"), "-q", "-f", fmt]
    if backing is not None:
        argv += ["-u", "-b", backing, "-F", "qcow2"]
    if options:
        argv += ["-o", ",".join(f"{k}={v.replace(',', ',,')}" for k, v in options.items())]
    argv += [path, str(size)]

    def attempt() -> None:
        try:
            run(argv, pass_fds=_FDS.get())
        except CommandError as err:
            if LUKS_BENCHMARK_FAILED in str(err):
                raise retry.Again() from err
            raise

    retry.luks_create(path, LUKS_ATTEMPTS)(attempt)


def forget_backing(path: str) -> None:
    """Write an image's header without a backing file or format (nothing else is opened;
    ``path`` may be a ``json:`` filename)."""
    run([*_qemu_img("rebase"), "-q", "-u", "-f", "qcow2", "-b", "", path], pass_fds=_FDS.get())


def info(path: str, fmt: str | None = None, backing_chain: bool = False) -> Any:
    """``qemu-img info --output=json`` (a list of dicts with ``backing_chain``)."""
    argv = [*_qemu_img("info"), "--output=json", "-U"]
    if fmt:
        argv += ["-f", fmt]
    if backing_chain:
        argv.append("--backing-chain")
    argv.append(path)
    return json.loads(run(argv, pass_fds=_FDS.get()).stdout)


def virtual_size(path: str, fmt: str | None = None) -> int:
    """The guest-visible size of an image or device."""
    return int(info(path, fmt)["virtual-size"])


def _extent(line: str) -> MapExtent:
    """One extent line of ``qemu-img map --output=json`` (``[{...},``, ``{...},``, ``{...}]``)."""
    e = json.loads(line.strip().removeprefix("[").removesuffix(",").removesuffix("]"))
    return MapExtent(
        start=int(e["start"]),
        length=int(e["length"]),
        data=bool(e["data"]),
        zero=bool(e["zero"]),
        depth=int(e.get("depth", 0)),
        present=bool(e.get("present", True)),
        offset=int(e["offset"]) if "offset" in e else None,
    )


def iter_map(path: str, fmt: str | None = None, image_opts: bool = False
             ) -> Iterator[MapExtent]:
    """Allocation map of an image, streamed: one extent at a time, lines of bounded length.

    ``path`` may be a ``json:`` filename (see :mod:`libvirt_rdm_backup.qemu.layers`).
    Raises CommandError when qemu-img fails, ValueError on output it cannot parse.
    """
    argv = [*_qemu_img("map"), "--output=json"]
    if image_opts:
        argv.append("--image-opts")
    elif fmt:
        argv += ["-f", fmt]
    argv.append(path)
    with tempfile.TemporaryFile() as stderr, subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=stderr,
            preexec_fn=die_with_parent, pass_fds=_FDS.get()) as proc:
        assert proc.stdout is not None
        try:
            while line := proc.stdout.readline(MAX_MAP_LINE):
                if len(line) >= MAX_MAP_LINE and not line.endswith(b"\n"):
                    raise ValueError("qemu-img map printed an overlong line")
                if line.strip() in (b"", b"[", b"]", b"[]"):
                    continue
                yield _extent(line.decode("ascii"))
        finally:
            if proc.poll() is None:
                proc.kill()
        if proc.wait() != 0:
            stderr.seek(0)
            raise CommandError(argv, proc.returncode, stderr.read(65536).decode(errors="replace"))


def map_extents(path: str, fmt: str | None = None, image_opts: bool = False) -> list[MapExtent]:
    """Allocation map of an image (its backing chain included), read as a stream."""
    return list(iter_map(path, fmt, image_opts))


def data_bytes(path: str, fmt: str | None = None, own_only: bool = False,
               extents: list[MapExtent] | None = None) -> int:
    """Bytes of an image that hold data (``own_only``: not counting its backing files)."""
    return sum(e.length for e in (extents if extents is not None else iter_map(path, fmt))
               if e.data and not e.zero and (e.depth == 0 or not own_only))
