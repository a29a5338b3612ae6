"""libvirt block copies of a running domain's disk onto its real source, and the pivot.

A copy is libvirt's own job (``virDomainBlockCopy`` with a transient job: the persistent
definition is not touched), in write-blocking mode (``SYNCHRONOUS_WRITES``: a guest write
completes only once it reached the destination too, so the copy always converges), onto
an existing destination (``REUSE_EXT``: the LUN is written, never created or formatted).
Once it is ready, ``virDomainBlockJobAbort`` with ``PIVOT`` switches the disk onto the
destination; libvirt's live XML then names the LUN again.
"""

from __future__ import annotations

from dataclasses import dataclass

import libvirt

from libvirt_rdm_backup.errors import LibvirtError

COPY_FLAGS = (libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB
              | libvirt.VIR_DOMAIN_BLOCK_COPY_REUSE_EXT
              | libvirt.VIR_DOMAIN_BLOCK_COPY_SYNCHRONOUS_WRITES)
# what libvirt answers to a pivot asked too early: the mirror is not ready yet
NOT_READY = (libvirt.VIR_ERR_BLOCK_COPY_ACTIVE, libvirt.VIR_ERR_OPERATION_INVALID)


@dataclass(frozen=True)
class CopyState:
    """Where a disk's block copy stands."""

    done: int
    total: int
    bandwidth: int  # bytes/s (0: no limit)

    @property
    def caught_up(self) -> bool:
        """Everything was copied once (the mirror may be ready to pivot)."""
        return self.total > 0 and self.done >= self.total


def start_copy(dom: libvirt.virDomain, disk: str, destination: str, speed: int) -> None:
    """Start copying ``disk`` onto ``destination`` (disk XML); ``speed``: bytes/s, 0: no
    limit."""
    params: dict[str, int] = {}
    if speed:
        params[libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH] = speed
    try:
        dom.blockCopy(disk, destination, params, COPY_FLAGS)
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot start the copy of {disk} onto its LUN: "
                           f"{err.get_error_message()}") from err


def copy_state(dom: libvirt.virDomain, disk: str) -> CopyState | None:
    """The disk's block job (None: there is none)."""
    try:
        info = dom.blockJobInfo(disk, libvirt.VIR_DOMAIN_BLOCK_JOB_INFO_BANDWIDTH_BYTES)
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot read the copy of {disk}: {err.get_error_message()}") from err
    if not info:
        return None
    return CopyState(int(info.get("cur", 0)), int(info.get("end", 0)),
                     int(info.get("bandwidth", 0)))


def pivot(dom: libvirt.virDomain, disk: str) -> bool:
    """Switch ``disk`` onto its copy; False when the mirror is not ready yet."""
    try:
        dom.blockJobAbort(disk, libvirt.VIR_DOMAIN_BLOCK_JOB_ABORT_PIVOT)
    except libvirt.libvirtError as err:
        if err.get_error_code() in NOT_READY:
            return False
        raise LibvirtError(f"cannot switch {disk} onto its LUN: "
                           f"{err.get_error_message()}") from err
    return True


def cancel_copy(dom: libvirt.virDomain, disk: str) -> None:
    """Stop the copy without switching (the disk stays on its overlay); errors ignored."""
    try:
        dom.blockJobAbort(disk, 0)
    except libvirt.libvirtError:
        pass


def pause_reason(dom: libvirt.virDomain) -> int | None:
    """libvirt's reason the domain is paused (None: it is not paused)."""
    try:
        state, reason = dom.state()
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot query domain state: {err.get_error_message()}") from err
    return int(reason) if state == libvirt.VIR_DOMAIN_PAUSED else None


def resume(dom: libvirt.virDomain) -> None:
    """Let the vCPUs run (a guest stopped by an I/O error retries the failed request)."""
    try:
        dom.resume()
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot resume the domain: {err.get_error_message()}") from err
