"""Consistency windows: freezing the guest's filesystems or pausing its vCPUs, briefly.

A window is opened around the instant a backup's point in time is fixed (QMP
transaction, storage snapshots) and closed as soon as possible. It is always
closed: on errors, on SIGTERM (the CLI turns it into an exception) and, for a
run killed outright, by a watchdog process (:mod:`libvirt_rdm_backup.watchdog`)
within a second, or else by the next run: both find the record a window leaves
while it is open (and after an undo that failed) and thaw or resume the guest.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import libvirt
import libvirt_qemu

from libvirt_rdm_backup import watchdog
from libvirt_rdm_backup.domain.connection import is_paused
from libvirt_rdm_backup.errors import LibvirtError, OperationError, RdmBackupError
from libvirt_rdm_backup.locks import lock_dir
from libvirt_rdm_backup.modes import Quiesce, WindowMethod, parse_choice
from libvirt_rdm_backup.window_record import (
    agent_timeout,
    drop_marker,
    marker_dir,
    set_agent_timeout,
    write_marker,
)

log = logging.getLogger(__name__)



@dataclass
class Window:
    """How the point in time was fixed and how long the guest was held."""

    method: WindowMethod
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


def _agent_answers(dom: libvirt.virDomain) -> None:
    """Ping the guest agent first: a freeze sent to a hung agent could run much later."""
    try:
        libvirt_qemu.qemuAgentCommand(dom, '{"execute": "guest-ping"}', agent_timeout(), 0)
    except libvirt.libvirtError as err:
        raise _AgentSilent(err.get_error_message()) from err


class _AgentSilent(Exception):
    """The guest agent did not answer a ping."""


def _freeze(dom: libvirt.virDomain, quiesce: Quiesce, window: Window) -> bool | None:
    """Freeze the guest's filesystems through the guest agent.

    True: frozen; None: not frozen, nothing sent (the agent does not answer);
    False: the freeze failed or timed out, and may still happen later.
    """
    try:
        _agent_answers(dom)
    except _AgentSilent as err:
        _without_freeze(f"guest agent does not answer: {err}", quiesce, window, err)
        return None
    try:
        set_agent_timeout(dom)
        window.frozen_filesystems = int(dom.fsFreeze(None, 0))
        return True
    except libvirt.libvirtError as err:
        _without_freeze("guest agent could not freeze the filesystems: "
                        f"{err.get_error_message()}", quiesce, window, err)
        return False


def _without_freeze(reason: str, quiesce: Quiesce, window: Window, err: Exception) -> None:
    """No freeze: fail with ``--quiesce=required``, else say the backup is crash-consistent."""
    if quiesce is Quiesce.REQUIRED:
        raise OperationError(f"{reason} (--quiesce=required)") from err
    log.warning("%s; the backup is crash-consistent", reason)
    window.notes.append(f"{reason}; crash-consistent instead")


def _thaw(dom: libvirt.virDomain) -> None:
    try:
        set_agent_timeout(dom)
        dom.fsThaw(None, 0)
    except libvirt.libvirtError as err:
        raise LibvirtError(
            f"cannot thaw the guest's filesystems: {err.get_error_message()}; they stay "
            "frozen until the guest agent answers again: a watchdog retries the thaw for "
            f"{watchdog.linger():g} s, and the next backup of the domain thaws them") from err


def _pause(dom: libvirt.virDomain) -> None:
    """Pause the vCPUs (the caller saw them running)."""
    try:
        dom.suspend()
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot pause domain: {err.get_error_message()}") from err


def _resume(dom: libvirt.virDomain) -> None:
    if not is_paused(dom):
        return  # the pause was interrupted before it happened
    try:
        dom.resume()
    except libvirt.libvirtError as err:
        raise LibvirtError(f"cannot resume domain: {err.get_error_message()}") from err


@dataclass
class _Hold:
    """What a window holds of a running guest, and how it lets go of it.

    ``held`` lists what was (or may have been) done, in order: each entry goes in
    (and the record the watchdog and the next run read is written) before its action.
    """

    dom: libvirt.virDomain
    uuid: str
    window: Window
    guard: watchdog.Watchdog | None
    started: float
    held: list[str] = field(default_factory=list)

    def freeze(self, mode: Quiesce) -> bool | None:
        """Freeze the filesystems through the guest agent (see :func:`_freeze`)."""
        write_marker(self.uuid, ["freeze"])
        self.held.append("freeze")  # an interrupted freeze may still freeze: thaw then
        try:
            frozen = _freeze(self.dom, mode, self.window)
        except RdmBackupError:
            self.held.remove("freeze")  # the agent refused: nothing to thaw
            raise
        if frozen:
            self.window.method = WindowMethod.FSFREEZE
        elif frozen is False:
            self.held[self.held.index("freeze")] = "maybe-frozen"
        else:
            self.held.remove("freeze")  # nothing was sent to the agent
            drop_marker(self.uuid)
        return frozen

    def pause(self) -> None:
        """Pause the vCPUs, unless something else already did."""
        if is_paused(self.dom):
            self.window.method = WindowMethod.ALREADY_PAUSED
            return
        write_marker(self.uuid, [*self.held, "pause"])
        self.held.append("pause")
        _pause(self.dom)
        self.window.method = (WindowMethod.FSFREEZE_PAUSE if "freeze" in self.held
                              else WindowMethod.PAUSE)

    def _undo(self, raise_errors: bool) -> tuple[list[BaseException], list[str]]:
        """Resume, then thaw; the errors met and the kinds of hold still in place."""
        errors: list[BaseException] = []
        failed: list[str] = []
        for kind, undo in (("pause", _resume), ("freeze", _thaw)):
            if kind in self.held:
                try:
                    undo(self.dom)
                except LibvirtError as err:
                    if errors or not raise_errors:  # the first one is raised: said once
                        log.error("%s", err)
                    errors.append(err)
                    failed.append(kind)
        if "maybe-frozen" in self.held:
            # a freeze that timed out may still run once the agent wakes up: thaw, and
            # when that fails too, leave the thaw to the watchdog and the next run
            try:
                _thaw(self.dom)
            except LibvirtError as err:
                log.info("thaw after a failed freeze: %s", err)
                failed.append("freeze")
        return errors, failed

    def release(self, raise_errors: bool) -> None:
        """Undo what is held, record what could not be undone, and stop the watchdog."""
        errors, failed = self._undo(raise_errors)
        if self.held:
            self.window.paused_ms = (time.monotonic() - self.started) * 1000.0
        if failed:
            write_marker(self.uuid, failed)  # the watchdog and the next run retry
        else:
            drop_marker(self.uuid)
        if self.guard is not None:
            self.guard.stop()
        if errors and raise_errors:
            raise errors[0]


def _run_before(before: Callable[[], None] | None, guard: watchdog.Watchdog | None) -> None:
    """Run ``before``; when it fails, the watchdog started for the window stops."""
    if before is None:
        return
    try:
        before()
    except BaseException:
        if guard is not None:
            guard.stop()
        raise


@contextmanager
def consistency_window(
    dom: libvirt.virDomain | None, *, quiesce: Quiesce | str | None = None, pause: bool = False,
    before: Callable[[], None] | None = None,
) -> Iterator[Window]:
    """Hold the guest still for the block: filesystems frozen and/or vCPUs paused.

    ``quiesce`` (``try`` or ``required``) freezes the filesystems through the guest
    agent; ``pause`` pauses the vCPUs, which a caller asks for when a freeze is not
    enough (raw LUN copies) or did not happen. Both are undone on exit, always:
    each undo is registered before its action, so an interrupt arriving in between
    (SIGTERM) still thaws and resumes. ``dom`` None (a shut-off domain) holds nothing.
    ``before`` runs just before the guest is held (the storage's writeback, so that
    the little that gets dirty until the hold is all a snapshot inside it waits for).
    """
    if dom is None:
        if before is not None:
            before()
        yield Window(method=WindowMethod.OFFLINE)
        return
    mode = parse_choice(Quiesce, quiesce, "quiesce mode") if quiesce is not None else None
    window = Window(method=WindowMethod.QMP_TRANSACTION)
    uuid = dom.UUIDString()
    guard = _start_watchdog(dom) if quiesce is not None or (pause and not is_paused(dom)) \
        else None
    _run_before(before, guard)
    hold = _Hold(dom, uuid, window, guard, started=time.monotonic())
    try:
        if mode is not None:
            frozen = hold.freeze(mode)
            pause = pause or not frozen  # crash-consistent instead: pause the vCPUs
        if pause:
            hold.pause()
        if not hold.held:
            drop_marker(uuid)
        yield window
    except BaseException:
        hold.release(raise_errors=False)  # never hide the error that ended the window
        raise
    hold.release(raise_errors=True)


_EARLY: dict[str, watchdog.Watchdog] = {}  # domain uuid -> watchdog started ahead


def _start_watchdog(dom: libvirt.virDomain) -> watchdog.Watchdog | None:
    """A watchdog (up and connected) that undoes the window should the tool die inside it."""
    guard = _EARLY.pop(dom.UUIDString(), None) or _spawn_watchdog(dom)
    return guard if guard is not None and guard.wait_ready() else None


def _spawn_watchdog(dom: libvirt.virDomain) -> watchdog.Watchdog | None:
    try:
        uri = str(dom.connect().getURI())
    except libvirt.libvirtError as err:
        log.warning("no watchdog for the consistency window: %s", err)
        return None
    return watchdog.start(uri, dom.UUIDString(), marker_dir(), lock_dir())


@contextmanager
def watchdog_ahead(dom: libvirt.virDomain | None) -> Iterator[None]:
    """Start the watchdog of a window opened inside this block now, so that it comes up
    while the backup prepares (a Python process and a libvirt connection take a while);
    one left unused is let go on exit. ``dom`` None: nothing."""
    if dom is None:
        yield
        return
    uuid = dom.UUIDString()
    guard = _spawn_watchdog(dom)
    if guard is not None:
        _EARLY[uuid] = guard
    try:
        yield
    finally:
        unused = _EARLY.pop(uuid, None)
        if unused is not None:
            unused.stop()
