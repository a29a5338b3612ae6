"""What tests assert about test domains, and how they hold a backup job while they do.

The domains themselves (disks, guest writes, QEMU inspection) are made by :mod:`tools.labkit`,
shared with the bench and the demo.
"""

from __future__ import annotations

import json
import subprocess
import time

import libvirt
import libvirt_qemu

from tools.labkit import qemu_leftovers, qmp


def running_state(dom: libvirt.virDomain) -> tuple[int, int]:
    """(state, reason) of the domain, as ``virsh domstate --reason`` shows them."""
    state, reason = dom.state()
    return int(state), int(reason)


def assert_running(dom: libvirt.virDomain) -> None:
    """The guest runs: not paused (for an I/O error, or left paused), not shut off; the
    reason it runs (booted, unpaused, restored, ...) is shown when it does not."""
    state, reason = running_state(dom)
    assert state == libvirt.VIR_DOMAIN_RUNNING, (state, reason)


def wait_for_job(dom: libvirt.virDomain, proc: subprocess.Popen[str], timeout: float = 60) -> None:
    """Wait until a backup run by ``proc`` has a job of this tool in the domain's QEMU."""
    deadline = time.monotonic() + timeout
    while not any(item.startswith("job ") for item in qemu_leftovers(dom)):
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < deadline, "no backup job started"
        time.sleep(0.005)


def slow_down_job(dom: libvirt.virDomain, disk: str, proc: subprocess.Popen[str]) -> bool:
    """Wait for the backup job of ``disk`` and throttle it to 1 MiB/s, so it runs for a while.

    False when the job ended before it could be slowed (the backup then runs to its end).
    """
    while proc.poll() is None:
        jobs = qmp(dom, "query-block-jobs")
        job = next((j for j in jobs  # type: ignore[attr-defined]
                    if j["device"].startswith(f"rdmb-job-{disk}-")), None)
        if job is None:
            continue
        if job["status"] != "running":
            return False
        reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(
            {"execute": "block-job-set-speed",
             "arguments": {"device": job["device"], "speed": 1 << 20}}), 0))
        if "error" not in reply:
            return True
        assert "concluded" in reply["error"]["desc"], reply
        return False
    return False
