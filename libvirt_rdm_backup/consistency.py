"""Consistency windows: pausing a domain's vCPUs for as short a time as possible."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import libvirt

from libvirt_rdm_backup.domain.connection import is_paused
from libvirt_rdm_backup.errors import LibvirtError

log = logging.getLogger(__name__)


@dataclass
class Window:
    """How long the guest was stopped (0 when it was not paused by us)."""

    method: str
    paused_ms: float = 0.0


@contextmanager
def paused(dom: libvirt.virDomain) -> Iterator[Window]:
    """Pause the vCPUs for the block and resume them on exit, also on errors.

    A domain that was already paused stays paused and is not resumed.
    """
    window = Window(method="pause")
    if is_paused(dom):
        window.method = "already-paused"
        yield window
        return
    try:
        dom.suspend()
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot pause domain: {err.get_error_message()}") from err
    started = time.monotonic()
    try:
        yield window
    finally:
        try:
            dom.resume()
        except libvirt.libvirtError as err:
            log.error("could not resume domain after backup: %s", err)
            raise LibvirtError(f"cannot resume domain: {err.get_error_message()}") from err
        finally:
            window.paused_ms = (time.monotonic() - started) * 1000.0
