"""Consistency windows: freezing the guest's filesystems or pausing its vCPUs, briefly.

A window is opened around the instant a backup's point in time is fixed (QMP
transaction, storage snapshots) and closed as soon as possible. It is always
closed: on errors, on SIGTERM (the CLI turns it into an exception) and, for a
run killed outright, by the next run, which finds the marker file a window
leaves while it is open and thaws or resumes the guest.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import libvirt
import libvirt_qemu

from libvirt_rdm_backup.domain.connection import is_paused
from libvirt_rdm_backup.errors import LibvirtError, OperationError, RdmBackupError

log = logging.getLogger(__name__)

MARKER_DIR = os.environ.get("RDM_BACKUP_WINDOW_DIR", "/run/libvirt-rdm-backup/windows")
# seconds libvirt waits for the guest agent before giving up
AGENT_TIMEOUT = int(os.environ.get("RDM_BACKUP_AGENT_TIMEOUT", "10"))
QUIESCE_MODES = ("try", "required")


@dataclass
class Window:
    """How the point in time was fixed and how long the guest was held."""

    method: str
    paused_ms: float = 0.0
    frozen_filesystems: int = 0
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, object]:
        """The manifest's ``consistency`` document."""
        data: dict[str, object] = {"method": self.method, "paused_ms": round(self.paused_ms, 1)}
        if self.frozen_filesystems:
            data["frozen_filesystems"] = self.frozen_filesystems
        if self.notes:
            data["notes"] = list(self.notes)
        return data


def _marker(domain_uuid: str) -> str:
    return os.path.join(MARKER_DIR, f"{domain_uuid}.json")


def _write_marker(domain_uuid: str, kinds: list[str]) -> None:
    os.makedirs(MARKER_DIR, mode=0o700, exist_ok=True)
    with open(_marker(domain_uuid), "w", encoding="utf-8") as stream:
        json.dump({"kinds": kinds, "pid": os.getpid()}, stream)


def _drop_marker(domain_uuid: str) -> None:
    try:
        os.unlink(_marker(domain_uuid))
    except FileNotFoundError:
        pass


def recover_window(dom: libvirt.virDomain) -> list[str]:
    """Thaw or resume a guest that a killed run left frozen or paused; returns what was done.

    Call it only while holding the domain's lock (so no live run owns the window).
    """
    path = _marker(dom.UUIDString())
    try:
        with open(path, encoding="utf-8") as stream:
            kinds = list(json.load(stream).get("kinds", []))
    except FileNotFoundError:
        return []
    except (OSError, ValueError, AttributeError):
        kinds = ["freeze", "pause"]
    done = []
    if "pause" in kinds and is_paused(dom):  # first: the agent needs running vCPUs
        try:
            dom.resume()
            done.append("resumed the guest")
        except libvirt.libvirtError as err:
            log.warning("could not resume the guest left paused by a killed run: %s", err)
    if "freeze" in kinds:
        try:
            dom.fsThaw()
            done.append("thawed the guest's filesystems")
        except libvirt.libvirtError as err:
            log.warning("could not thaw the guest left frozen by a killed run: %s", err)
    _drop_marker(dom.UUIDString())
    for item in done:
        log.warning("a killed backup had left the window open: %s", item)
    return done


def _agent_answers(dom: libvirt.virDomain) -> None:
    """Ping the guest agent first: a freeze sent to a hung agent could run much later."""
    try:
        libvirt_qemu.qemuAgentCommand(dom, '{"execute": "guest-ping"}', AGENT_TIMEOUT, 0)
    except libvirt.libvirtError as err:
        raise _AgentSilent(err.get_error_message()) from err


class _AgentSilent(Exception):
    """The guest agent did not answer a ping."""


def _freeze(dom: libvirt.virDomain, quiesce: str, window: Window) -> bool:
    """Freeze the guest's filesystems through the guest agent; False when it cannot."""
    try:
        _agent_answers(dom)
    except _AgentSilent as err:
        reason = f"guest agent does not answer: {err}"
        if quiesce == "required":
            raise OperationError(f"{reason} (--quiesce=required)") from err
        log.warning("%s; the backup is crash-consistent", reason)
        window.notes.append(f"{reason}; crash-consistent instead")
        return False
    try:
        try:
            dom.agentSetResponseTimeout(AGENT_TIMEOUT, 0)
        except (libvirt.libvirtError, AttributeError):
            pass
        window.frozen_filesystems = int(dom.fsFreeze(None, 0))
        return True
    except libvirt.libvirtError as err:
        reason = f"guest agent could not freeze the filesystems: {err.get_error_message()}"
        if quiesce == "required":
            raise OperationError(f"{reason} (--quiesce=required)") from err
        log.warning("%s; the backup is crash-consistent", reason)
        window.notes.append(f"{reason}; crash-consistent instead")
        return False


def _thaw(dom: libvirt.virDomain) -> None:
    try:
        dom.fsThaw(None, 0)
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot thaw the guest's filesystems: {err.get_error_message()}"
                           ) from err


def _pause(dom: libvirt.virDomain) -> bool:
    """Pause the vCPUs; False when the domain was already paused (then it stays so)."""
    if is_paused(dom):
        return False
    try:
        dom.suspend()
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot pause domain: {err.get_error_message()}") from err
    return True


def _resume(dom: libvirt.virDomain) -> None:
    if not is_paused(dom):
        return  # the pause was interrupted before it happened
    try:
        dom.resume()
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot resume domain: {err.get_error_message()}") from err


@contextmanager
def consistency_window(
    dom: libvirt.virDomain | None, *, quiesce: str | None = None, pause: bool = False
) -> Iterator[Window]:
    """Hold the guest still for the block: filesystems frozen and/or vCPUs paused.

    ``quiesce`` (``try`` or ``required``) freezes the filesystems through the guest
    agent; ``pause`` pauses the vCPUs, which a caller asks for when a freeze is not
    enough (raw LUN copies) or did not happen. Both are undone on exit, always:
    each undo is registered before its action, so an interrupt arriving in between
    (SIGTERM) still thaws and resumes. ``dom`` None (a shut-off domain) holds nothing.
    """
    if dom is None:
        yield Window(method="offline")
        return
    if quiesce is not None and quiesce not in QUIESCE_MODES:
        raise OperationError(f"unknown quiesce mode {quiesce!r}")
    window = Window(method="qmp-transaction")
    uuid = dom.UUIDString()
    held: list[str] = []  # what was (or may have been) done, in order
    started = time.monotonic()

    def release(raise_errors: bool) -> None:
        errors: list[BaseException] = []
        for kind, undo in (("pause", _resume), ("freeze", _thaw)):
            if kind in held:
                try:
                    undo(dom)
                except LibvirtError as err:
                    log.error("%s", err)
                    errors.append(err)
        if "maybe-frozen" in held:
            # a freeze that timed out may still run once the agent wakes up; a thaw
            # queued behind it undoes it (the agent works through commands in order)
            try:
                _thaw(dom)
            except LibvirtError as err:
                log.debug("thaw after a failed freeze: %s", err)
        if held:
            window.paused_ms = (time.monotonic() - started) * 1000.0
        _drop_marker(uuid)
        if errors and raise_errors:
            raise errors[0]

    try:
        if quiesce is not None:
            _write_marker(uuid, ["freeze"])
            held.append("freeze")  # an interrupted freeze may still freeze: thaw then
            try:
                frozen = _freeze(dom, quiesce, window)
            except RdmBackupError:
                held.remove("freeze")  # the agent refused: nothing to thaw
                raise
            if frozen:
                window.method = "fsfreeze"
            else:
                held.remove("freeze")
                held.append("maybe-frozen")
        if pause or "maybe-frozen" in held:
            if is_paused(dom):
                window.method = "already-paused"
            else:
                _write_marker(uuid, [*held, "pause"])
                held.append("pause")
                _pause(dom)
                window.method = "fsfreeze+pause" if "freeze" in held else "pause"
        if not held:
            _drop_marker(uuid)
        yield window
    except BaseException:
        release(raise_errors=False)  # never hide the error that ended the window
        raise
    release(raise_errors=True)
