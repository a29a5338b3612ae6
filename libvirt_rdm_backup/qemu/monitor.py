"""The QMP channel to a running domain's QEMU, through libvirt-qemu.

libvirt owns the QEMU monitor socket; ``qemuMonitorCommand`` forwards a QMP
command, and ``qemuMonitorCommandWithFiles`` also passes open file
descriptors (used with ``add-fd`` so QEMU never needs to open our paths).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

import libvirt
import libvirt_qemu

from libvirt_rdm_backup.errors import LibvirtError, QmpError

log = logging.getLogger(__name__)


class Monitor:
    """Synchronous QMP (and HMP) access to one domain."""

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
        log.debug("qmp> %s", text)
        try:
            if files:
                reply_text = libvirt_qemu.qemuMonitorCommandWithFiles(
                    self.dom, text, list(files), 0
                )[0]
            else:
                reply_text = libvirt_qemu.qemuMonitorCommand(self.dom, text, 0)
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
        try:
            return str(
                libvirt_qemu.qemuMonitorCommand(
                    self.dom, command, libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP
                )
            )
        except libvirt.libvirtError as err:
            raise LibvirtError(f"HMP {command.split()[0]} failed: {err}") from err
