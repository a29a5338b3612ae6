"""Merging qcow2 layers of a backup chain: QEMU's stream and commit jobs on a private daemon.

Both keep what the top layer reads unchanged at every moment, so a chain stays
readable through a merge that is cut short:

- :func:`stream_into`: the top layer takes in the data of the layers between it and
  ``base`` that it does not hide (``block-stream``), then its header names ``base``.
- :func:`commit_into`: the data of every layer above ``bottom`` up to the top is
  written into ``bottom`` (``block-commit``); ``bottom`` then reads as the top did.
- :func:`rebase_onto`: the top layer takes in where it reads differently from another
  chain, then its header names that chain (``qemu-img rebase``: QEMU has no job for
  it; the chains are opened by the names in their headers, which the caller checked).

The chain is given as files, top first; every backing is explicit (no name in a
header is followed), and each header is checked by the caller before.
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from typing import Any

from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.qemu.block_copy import (
    JobHost,
    added_node,
    added_object,
    run_job,
)
from libvirt_rdm_backup.qemu.names import object_name
from libvirt_rdm_backup.qemu.secrets import active_secret


def stream_into(top: str, middle: Sequence[str], base: Sequence[str],
                backing_name: str | None, label: str, speed: int = 0) -> None:
    """Copy into ``top`` what it reads from ``middle`` (top first), then back it by ``base``.

    ``base``: the layers that stay below (top first; empty: ``top`` becomes whole);
    ``backing_name``: the backing file name written into ``top``'s header (None without
    a base); ``label``: a disk name (part of QEMU's node names). Runs on a private
    ``qemu-storage-daemon``.
    """
    from libvirt_rdm_backup.qemu.storage_daemon import StorageDaemon

    with StorageDaemon(f"stream {label}", killed_with_tool=True) as daemon, \
            ExitStack() as stack:
        names = _chain(daemon, stack, [top, *middle, *base], label, writable={0})
        arguments: dict[str, Any] = {"job-id": object_name("stream", label),
                                     "device": names[0], "auto-finalize": True,
                                     "auto-dismiss": False}
        if base:
            arguments["base-node"] = names[1 + len(middle)]
            arguments["backing-file"] = backing_name
        if speed:
            arguments["speed"] = speed
        _run(daemon, "block-stream", arguments, label)


def stream_node(top: dict[str, Any], base: str | None, objects: Sequence[dict[str, Any]],
                label: str, speed: int = 0) -> None:
    """:func:`stream_into` for a layer given as blockdev options with its whole chain
    (``top``: writable, its backing explicit); ``base``: the node name, inside that chain,
    of the layer that stays below (None: ``top`` becomes whole). The header gets an empty
    backing file name; the caller clears what else QEMU left there."""
    from libvirt_rdm_backup.qemu.storage_daemon import StorageDaemon

    with StorageDaemon(f"stream {label}", killed_with_tool=True) as daemon, \
            ExitStack() as stack:
        for obj in objects:
            stack.enter_context(added_object(daemon, obj))
        name = stack.enter_context(added_node(daemon, top, object_name("top", label)))
        arguments: dict[str, Any] = {"job-id": object_name("stream", label), "device": name,
                                     "auto-finalize": True, "auto-dismiss": False}
        if base is not None:
            arguments["base-node"] = base
            arguments["backing-file"] = ""
        if speed:
            arguments["speed"] = speed
        _run(daemon, "block-stream", arguments, label)


def commit_into(top: str, middle: Sequence[str], bottom: str, base: Sequence[str], size: int,
                label: str, speed: int = 0) -> None:
    """Write into ``bottom`` the data of ``top`` and ``middle`` (top first, above
    ``bottom``), so that ``bottom`` reads as ``top`` did; ``top`` and ``middle`` are left
    as they are, ``base`` (``bottom``'s backing layers, top first) is only read.
    ``size``: the disk's size."""
    from libvirt_rdm_backup.qemu.storage_daemon import StorageDaemon

    with tempfile.TemporaryDirectory(prefix="rdmb-commit-") as scratch, \
            StorageDaemon(f"commit {label}", killed_with_tool=True) as daemon, \
            ExitStack() as stack:
        overlay = os.path.join(scratch, "active.qcow2")
        img.create(overlay, layers.FORMAT, size)
        # an active layer above ``top``: the commit is then one of the layers below it,
        # which ends by itself (an active commit would wait for a completion)
        names = _chain(daemon, stack, [overlay, top, *middle, bottom, *base], label,
                       writable={0, 2 + len(middle)})
        arguments: dict[str, Any] = {"job-id": object_name("commit", label),
                                     "device": names[0], "top-node": names[1],
                                     "base-node": names[2 + len(middle)],
                                     "auto-finalize": True, "auto-dismiss": False}
        if speed:
            arguments["speed"] = speed
        _run(daemon, "block-commit", arguments, label)


def rebase_onto(top: str, old_below: Sequence[str], new_base: str, backing_name: str) -> None:
    """Make ``top`` read over the layer ``new_base`` as it reads over ``old_below`` (its
    whole old chain, top first, given explicitly; ``new_base`` and its own backing are
    opened by ``qemu-img`` from their names), then name it ``backing_name`` in the header.

    Idempotent: the differences are written into ``top`` first; what ``top`` reads
    through its old chain does not change.
    """
    from libvirt_rdm_backup.process import run

    image = layers.json_filename(layers.file_chain([top, *old_below]))
    run(["qemu-img", "rebase", *img.object_args(), "-q", "-f", layers.FORMAT, "-F",
         layers.FORMAT, "-b", new_base, image])
    rebase_name(top, backing_name)


def rebase_name(top: str, backing_name: str) -> None:
    """Write ``backing_name`` as ``top``'s backing file (the header only; nothing opened)."""
    from libvirt_rdm_backup.process import run

    # an encrypted layer is opened with its key (the header alone is written)
    image = layers.json_filename(layers.file_chain([top])) if layers.is_encrypted(top) else top
    run(["qemu-img", "rebase", *img.object_args(), "-q", "-u", "-f", layers.FORMAT, "-F",
         layers.FORMAT, "-b", backing_name, image])


def _chain(daemon: JobHost, stack: ExitStack, files: Sequence[str], label: str,
           writable: set[int]) -> list[str]:
    """Add the layers ``files`` (top first) as named nodes, each backed by the next, the
    last by nothing; returns their node names, top first."""
    names: list[str] = []
    below: str | None = None
    encrypted = [layers.is_encrypted(path) for path in files]
    if any(encrypted):
        secret = active_secret()
        if secret is None:
            raise UsageError(f"the layers of {label} are encrypted: give --encrypt-key-file "
                             "FILE")
        stack.enter_context(added_object(daemon, secret))
    for index in range(len(files) - 1, -1, -1):
        name = object_name(f"layer{index}", label)
        node: dict[str, Any] = {
            "driver": layers.FORMAT, "file": layers.file_node(files[index]),
            "read-only": index not in writable, "backing": below,
        }
        if encrypted[index]:
            node["encrypt"] = layers.encrypt_options(str(secret and secret["id"]))
        stack.enter_context(added_node(daemon, node, name))
        names.insert(0, name)
        below = name
    return names


def _run(daemon: JobHost, command: str, arguments: dict[str, Any], label: str) -> None:
    """Start the job and follow it to its end; cancel it when anything goes wrong."""
    run_job(daemon, command, arguments, label, what="merging layers")
