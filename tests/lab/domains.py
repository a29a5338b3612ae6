"""Real test domains: defined, started and always removed again."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from xml.sax.saxutils import quoteattr

import libvirt
import libvirt_qemu

URI = "qemu:///system"


@dataclass(frozen=True)
class DiskSpec:
    """One disk of a test domain."""

    target: str
    xml: str


def block_disk(
    target: str, path: str, device: str = "disk", serial: str | None = None, bus: str = "virtio"
) -> DiskSpec:
    """A ``<disk type='block'>`` on a host block device."""
    serial_xml = f"<serial>{serial}</serial>" if serial else ""
    return DiskSpec(
        target,
        (
            f"<disk type='block' device='{device}'>"
            "<driver name='qemu' type='raw' cache='none' io='native'/>"
            f"<source dev={quoteattr(path)}/><target dev='{target}' bus='{bus}'/>"
            f"{serial_xml}</disk>"
        ),
    )


def iscsi_disk(
    target: str, iqn: str, lun: int, device: str = "lun", host: str = "127.0.0.1", port: int = 3260
) -> DiskSpec:
    """A ``<disk type='network'>`` iSCSI LUN on the scsi bus."""
    return DiskSpec(
        target,
        (
            f"<disk type='network' device='{device}'><driver name='qemu' type='raw'/>"
            f"<source protocol='iscsi' name={quoteattr(f'{iqn}/{lun}')}>"
            f"<host name='{host}' port='{port}'/></source>"
            f"<target dev='{target}' bus='scsi'/></disk>"
        ),
    )


def qcow2_disk(target: str, path: str) -> DiskSpec:
    """A qcow2 image file (not a raw disk)."""
    return DiskSpec(
        target,
        (
            "<disk type='file' device='disk'><driver name='qemu' type='qcow2'/>"
            f"<source file={quoteattr(path)}/><target dev='{target}' bus='virtio'/></disk>"
        ),
    )


LAB_DOMAIN_TYPE = "/run/rdmb-lab/domain-type"


def domain_type() -> str:
    """What the lab decided (``tools/lab.sh up``): ``kvm`` where the QEMU user can use /dev/kvm,
    else ``qemu`` (TCG); without that record, ``kvm`` where /dev/kvm exists."""
    try:
        with open(LAB_DOMAIN_TYPE, encoding="ascii") as f:
            decided = f.read().strip()
    except OSError:
        decided = ""
    if decided in ("kvm", "qemu"):
        return decided
    return "kvm" if os.path.exists("/dev/kvm") else "qemu"


def domain_xml(name: str, disks: list[DiskSpec]) -> str:
    """A minimal firmware-only domain: q35, 64 MiB, no NIC, a console."""
    devices = "".join(d.xml for d in disks)
    return f"""<domain type='{domain_type()}'>
  <name>{name}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>64</memory>
  <vcpu>1</vcpu>
  <os><type arch='x86_64' machine='q35'>hvm</type></os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='scsi' model='virtio-scsi'/>
    {devices}
    <console type='pty'/>
    <memballoon model='none'/>
  </devices>
</domain>"""


@contextmanager
def test_domain(
    name: str, disks: list[DiskSpec], start: bool = True
) -> Iterator[libvirt.virDomain]:
    """Define (and start) a domain; destroy and undefine it afterwards, always."""
    conn = libvirt.open(URI)
    dom = conn.defineXML(domain_xml(name, disks))
    try:
        if start:
            dom.create()
        yield dom
    finally:
        remove_domain(dom.UUIDString())
        try:
            conn.close()
        except libvirt.libvirtError:
            pass


def remove_domain(uuid: str) -> None:
    """Destroy and undefine a domain through a fresh connection.

    A fresh one, because the test's own connection may be dead: tests restart libvirtd.
    """
    conn = libvirt.open(URI)
    try:
        try:
            dom = conn.lookupByUUIDString(uuid)
        except libvirt.libvirtError:
            return
        try:
            if dom.isActive():
                dom.destroy()
        except libvirt.libvirtError:
            pass
        try:
            dom.undefine()
        except libvirt.libvirtError:
            pass
    finally:
        conn.close()


def alias_of(dom: libvirt.virDomain, target: str) -> tuple[str, str]:
    """(alias, bus) of the disk with this target dev, from the live XML."""
    from lxml import etree

    root = etree.fromstring(dom.XMLDesc(0).encode())
    for disk in root.iter("disk"):
        tgt = disk.find("target")
        if tgt is not None and tgt.get("dev") == target:
            alias = disk.find("alias")
            assert alias is not None
            return str(alias.get("name")), str(tgt.get("bus"))
    raise KeyError(target)


QEMU_LOG_DIR = "/var/log/libvirt/qemu"
QEMU_IO_WAIT = 60.0  # seconds for a qemu-io result to reach the domain's log


class GuestWriteError(AssertionError):
    """A simulated guest write failed (as the domain's QEMU log says)."""


def qemu_log(dom: libvirt.virDomain) -> str:
    """The domain's QEMU log, where HMP ``qemu-io`` prints its results."""
    return os.path.join(QEMU_LOG_DIR, f"{dom.name()}.log")


def try_guest_write(
    dom: libvirt.virDomain, target: str, pattern: int, offset: int, length: int
) -> str | None:
    """Write like the guest would (HMP ``qemu-io`` on the device's qdev path).

    Returns None when QEMU wrote every byte, else its error line. HMP replies with
    an empty string either way: the result is read from the domain's QEMU log.
    """
    alias, bus = alias_of(dom, target)
    qdev = f"/machine/peripheral/{alias}" + ("/virtio-backend" if bus == "virtio" else "")
    log = qemu_log(dom)
    start = os.path.getsize(log)
    libvirt_qemu.qemuMonitorCommand(
        dom,
        f'qemu-io -d {qdev} "write -P {pattern:#x} {offset} {length}"',
        libvirt_qemu.VIR_DOMAIN_QEMU_MONITOR_COMMAND_HMP,
    )
    done = re.compile(rf"^wrote {length}/{length} bytes at offset {offset}$", re.M)
    deadline = time.monotonic() + QEMU_IO_WAIT
    while True:
        with open(log, "rb") as stream:
            stream.seek(start)
            text = stream.read().decode(errors="replace")
        failed = re.search(r"^write failed: .*$", text, re.M)
        if failed:
            return failed.group(0)
        if done.search(text):
            return None
        if time.monotonic() > deadline:
            return f"no result of the write in {log} after {QEMU_IO_WAIT:g} s"
        time.sleep(0.01)


def guest_write(
    dom: libvirt.virDomain, target: str, pattern: int, offset: int, length: int
) -> None:
    """:func:`try_guest_write`, raising GuestWriteError when the write failed."""
    error = try_guest_write(dom, target, pattern, offset, length)
    if error is not None:
        raise GuestWriteError(f"guest write of {length} bytes at {offset} to {target}: {error}")


def running_state(dom: libvirt.virDomain) -> tuple[int, int]:
    """(state, reason) of the domain, as ``virsh domstate --reason`` shows them."""
    state, reason = dom.state()
    return int(state), int(reason)


def assert_running(dom: libvirt.virDomain) -> None:
    """The guest runs: not paused (for an I/O error, or left paused), not shut off; the
    reason it runs (booted, unpaused, restored, ...) is shown when it does not."""
    state, reason = running_state(dom)
    assert state == libvirt.VIR_DOMAIN_RUNNING, (state, reason)


def rdm_backup(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (the venv's console script) and capture its output."""
    exe = os.path.join(
        os.path.dirname(os.path.realpath(__file__)), "..", "..", ".venv", "bin", "rdm-backup"
    )
    argv = [exe] if os.path.exists(exe) else ["python", "-m", "libvirt_rdm_backup.cli"]
    return subprocess.run([*argv, *args], capture_output=True, text=True, timeout=600, check=False)


def qmp(dom: libvirt.virDomain, command: str, arguments: dict[str, object] | None = None
        ) -> object:
    """One QMP command through libvirt; returns its ``return`` value."""
    import json

    message: dict[str, object] = {"execute": command}
    if arguments:
        message["arguments"] = arguments
    reply = json.loads(libvirt_qemu.qemuMonitorCommand(dom, json.dumps(message), 0))
    assert "error" not in reply, reply
    return reply["return"]


def qemu_leftovers(dom: libvirt.virDomain) -> list[str]:
    """Jobs, block nodes and exports of this tool still present in QEMU."""
    found = [f"job {j['id']}" for j in qmp(dom, "query-jobs")  # type: ignore[attr-defined]
             if str(j["id"]).startswith("rdmb-")]
    found += [f"node {n['node-name']}" for n in qmp(  # type: ignore[attr-defined]
        dom, "query-named-block-nodes", {"flat": True}) if n["node-name"].startswith("rdmb-")]
    found += [f"export {e['id']}" for e in qmp(dom, "query-block-exports")  # type: ignore[attr-defined]
              if str(e["id"]).startswith("rdmb-")]
    return found


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


def dirty_bitmaps(dom: libvirt.virDomain) -> set[str]:
    """Names of every dirty bitmap on every block node of the domain."""
    names: set[str] = set()
    for node in qmp(dom, "query-named-block-nodes", {"flat": True}):  # type: ignore[attr-defined]
        # a job's own bitmap has no name
        names |= {b["name"] for b in node.get("dirty-bitmaps") or [] if "name" in b}
    return names


def iscsi_hostdev(iqn: str, lun: int, host: str = "127.0.0.1", port: int = 3260) -> DiskSpec:
    """A SCSI passthrough ``<hostdev>`` of an iSCSI LUN (QEMU's initiator, scsi-generic)."""
    return DiskSpec("hostdev0", (
        "<hostdev mode='subsystem' type='scsi'>"
        f"<source protocol='iscsi' name={quoteattr(f'{iqn}/{lun}')}>"
        f"<host name='{host}' port='{port}'/></source></hostdev>"
    ))
