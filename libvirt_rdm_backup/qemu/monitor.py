"""The QMP channel to a running QEMU: what the engine's flows need (:class:`Monitor`),
and its implementation through libvirt-qemu (:class:`LibvirtMonitor`).

libvirt owns the QEMU monitor socket; ``qemuMonitorCommand`` forwards a QMP
command, and ``qemuMonitorCommandWithFiles`` also passes open file
descriptors (used with ``add-fd`` so QEMU never needs to open our paths).

libvirt waits for QEMU's answer without a limit, and a QEMU whose monitor is
held (storage that stopped answering, a stopped process) never answers; so each
command runs in a worker thread and is given up after ``RDM_BACKUP_QMP_TIMEOUT``
seconds (default: the stall limit of data movers). The same limit bounds the wait
for a change QEMU was asked for (a cancelled job, a removed export).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable, Sequence
from typing import Any, Protocol, TypeVar

import libvirt
import libvirt_qemu

from libvirt_rdm_backup.errors import LibvirtError, OperationError, QmpError
from libvirt_rdm_backup.process import env_seconds, stall_timeout
from libvirt_rdm_backup.redact import qmp_arguments

log = logging.getLogger(__name__)

QMP_TIMEOUT_ENV = "RDM_BACKUP_QMP_TIMEOUT"
T = TypeVar("T")


def qmp_timeout() -> float:
    """Seconds to wait for QEMU: its answer to one monitor command, or a change it was asked
    for (cancelled jobs gone, a removed NBD export no longer listed)."""
    return env_seconds(QMP_TIMEOUT_ENV, stall_timeout())


def bounded(call: Callable[[], T], what: str) -> T:
    """Run a blocking libvirt ``call`` in a worker thread; OperationError after :func:`qmp_timeout`.

    The worker is left behind blocked (a daemon thread: it does not keep the tool
    alive); libvirt fails later calls on the domain once its own job wait ends.
    """
    limit = qmp_timeout()
    outcome: list[Any] = []

    def work() -> None:
        try:
            outcome.append((True, call()))
        except BaseException as err:  # handed to the waiting thread
            outcome.append((False, err))

    worker = threading.Thread(target=work, name=f"qmp {what}", daemon=True)
    worker.start()
    worker.join(limit)
    if not outcome:
        raise OperationError(f"QEMU did not answer {what} within {limit:g} s (its monitor is "
                             "held, e.g. by storage that stopped answering); giving up")
    ok, value = outcome[0]
    if ok:
        return value  # type: ignore[no-any-return]
    raise value


class Monitor(Protocol):
    """Synchronous QMP access to one QEMU process (a domain's, or a storage daemon's)."""

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, files: Sequence[int] = ()
    ) -> Any:
        """Run a QMP command and return its ``return`` value.

        ``files`` are open descriptors passed along with the command (``add-fd``,
        ``getfd``); QEMU gets its own copies. Raises QmpError when QEMU answers with
        an error, another RdmBackupError when the monitor cannot be reached or does
        not answer in time.
        """
        ...


class LibvirtMonitor:
    """:class:`Monitor` of a libvirt domain's QEMU, through libvirt-qemu (QMP passthrough)."""

    def __init__(self, dom: libvirt.virDomain) -> None:
        self.dom = dom

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, files: Sequence[int] = ()
    ) -> Any:
        """Run a QMP command and return its ``return`` value.

        Raises QmpError when QEMU answers with an error, LibvirtError when the
        monitor cannot be reached (domain not running, libvirt gone).
        """
        message: dict[str, Any] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        text = json.dumps(message)
        log.debug("qmp> %s %s", command, json.dumps(qmp_arguments(command, arguments)))
        def call() -> str:
            if files:
                return str(libvirt_qemu.qemuMonitorCommandWithFiles(
                    self.dom, text, list(files), 0)[0])
            return str(libvirt_qemu.qemuMonitorCommand(self.dom, text, 0))

        try:
            reply_text = bounded(call, command)
        except libvirt.libvirtError as err:
            raise LibvirtError(f"QMP {command} failed: {err.get_error_message()}") from err
        reply = json.loads(reply_text)
        log.debug("qmp< %s", reply_text[:2000])
        if "error" in reply:
            error = reply["error"]
            raise QmpError(command, str(error.get("class", "")), str(error.get("desc", "")))
        return reply.get("return")

    def hmp(self, command: str) -> str:
        """Run a human-monitor command and return its output text."""
        name = command.split()[0] if command.split() else "HMP"
        try:
            return bounded(lambda: str(libvirt_qemu.qemuMonitorCommand(
                self.dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP)), name)
        except libvirt.libvirtError as err:
            raise LibvirtError(f"HMP {name} failed: {err}") from err
