"""Lab fixtures shared by the tests and the tools (bench, demo): real domains, loop devices,
iSCSI LUNs on the loopback tgtd, scratch directories, simulated guest writes, QEMU inspection.

Dependencies point one way: tests/ and tools/ import this module, and it imports only the
library and system packages (never ``tests.*``), so the bench runs from a tree without the tests.

Every context manager removes what it made, also when the body fails:
:func:`test_domain` destroys and undefines its domain, :func:`loop_device` detaches its loop
device, :func:`iscsi_target` deletes its target with ``--force``, :func:`rdmb_tmpdir` and
:func:`rdmb_reflink_tmpdir` remove their directories. Names carry ``rdmb`` and
:data:`RUN_TOKEN` (unique per run). tgtd is only ever started bound to 127.0.0.1
(:func:`ensure_tgtd`) and is left running for others.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from xml.sax.saxutils import quoteattr

import libvirt
import libvirt_qemu

from libvirt_rdm_backup.domain.disks import IscsiSource
from libvirt_rdm_backup.errors import CommandError
from libvirt_rdm_backup.process import run
from libvirt_rdm_backup.storage import tgt

REPO_ROOT = Path(__file__).resolve().parents[1]
URI = "qemu:///system"
MiB = 1024 * 1024
GiB = 1024 * MiB

RUN_TOKEN = uuid.uuid4().hex[:8]
PORTAL_HOST = "127.0.0.1"
PORTAL_PORT = 3260
TIMEOUT = 60.0
REFLINK_DIR = Path("/var/lib/rdmb-lab/reflink")  # tools/lab.sh up mounts a reflink XFS here
_counter = iter(range(1, 1_000_000))


def unique_name(prefix: str = "rdmb") -> str:
    """A name with ``rdmb``, the run token and a per-run counter."""
    return f"{prefix}-{RUN_TOKEN}-{next(_counter)}"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((PORTAL_HOST, 0))
        return int(sock.getsockname()[1])


def is_root() -> bool:
    """True when running as root (loop devices and tgtadm need it)."""
    return os.geteuid() == 0


@dataclass(frozen=True)
class IscsiLun:
    """A LUN on the loopback tgtd."""

    iqn: str
    tid: int
    lun: int = 1
    host: str = PORTAL_HOST
    port: int = PORTAL_PORT

    @property
    def source(self) -> IscsiSource:
        """The LUN as a domain's iSCSI source."""
        return IscsiSource(self.host, self.port, self.iqn, self.lun)

    @property
    def url(self) -> str:
        """libiscsi URL (``iscsi://127.0.0.1:3260/IQN/1``)."""
        return self.source.url


@contextlib.contextmanager
def rdmb_tmpdir() -> Iterator[Path]:
    """A temporary directory under /var/tmp whose name holds ``rdmb`` and the run token."""
    with tempfile.TemporaryDirectory(prefix=f"rdmb-{RUN_TOKEN}-", dir="/var/tmp") as path:
        os.chmod(path, 0o755)
        yield Path(path)


def reflink_dir() -> Path:
    """The lab's reflink-capable XFS mount (``tools/lab.sh up``); RuntimeError when missing."""
    if not os.path.ismount(REFLINK_DIR):
        raise RuntimeError(f"no reflink filesystem mounted at {REFLINK_DIR} (run `make lab-up`)")
    return REFLINK_DIR


@contextlib.contextmanager
def rdmb_reflink_tmpdir() -> Iterator[Path]:
    """A fresh directory on the lab's reflink XFS (name with ``rdmb`` and the run token)."""
    with tempfile.TemporaryDirectory(prefix=f"rdmb-{RUN_TOKEN}-", dir=reflink_dir()) as path:
        os.chmod(path, 0o755)
        yield Path(path)


def make_file(path: Path, size: int, pattern: bytes = b"rdmb") -> Path:
    """A file of ``size`` bytes filled with a repeated pattern (each MiB tagged by its index)."""
    chunk = 1 << 20
    with path.open("wb") as out:
        for index in range(0, size, chunk):
            block = (f"{index // chunk:08d}".encode() + pattern) * (chunk // (8 + len(pattern)) + 1)
            out.write(block[: min(chunk, size - index)])
    return path


@contextlib.contextmanager
def loop_device(path: str | Path, offset: int = 0, sizelimit: int = 0) -> Iterator[str]:
    """Attach ``path`` to a free loop device (``losetup -f --show``); detach it afterwards."""
    argv = ["losetup", "-f", "--show"]
    if offset:
        argv += ["--offset", str(offset)]
    if sizelimit:
        argv += ["--sizelimit", str(sizelimit)]
    device = run([*argv, str(path)], timeout=TIMEOUT).stdout.strip()
    try:
        yield device
    finally:
        run(["losetup", "-d", device], timeout=TIMEOUT)


def _tgtadm(*args: str) -> str:
    return run(["tgtadm", "--lld", "iscsi", *args], timeout=TIMEOUT).stdout


def ensure_tgtd() -> None:
    """Start tgtd on the loopback portal unless one already answers tgtadm."""
    if tgt.tgtadm_available():
        return
    subprocess.run(
        ["tgtd", "--iscsi", f"portal={PORTAL_HOST}:{PORTAL_PORT}"],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        timeout=TIMEOUT,
        check=True,
    )
    deadline = time.monotonic() + 20
    while not tgt.tgtadm_available():
        if time.monotonic() > deadline:
            raise RuntimeError("tgtd did not start answering tgtadm")
        time.sleep(0.2)


def _new_target(iqn: str) -> int:
    """Create a target with the next free tid (retrying when another run takes it)."""
    error: CommandError | None = None
    for _attempt in range(20):
        used = {target.tid for target in tgt.show_targets()}
        tid = max(used, default=0) + 1
        try:
            _tgtadm("--op", "new", "--mode", "target", "--tid", str(tid), "-T", iqn)
        except CommandError as err:
            error = err
            continue
        return tid
    raise RuntimeError(f"could not create tgt target {iqn}: {error}")


@contextlib.contextmanager
def iscsi_target(backing_path: str | Path, iqn: str | None = None, bstype: str | None = None,
                 bsopts: str | None = None) -> Iterator[IscsiLun]:
    """A tgtd target with LUN 1 backed by ``backing_path`` (of backing store ``bstype``, with
    its ``bsopts``: tgt's rbd takes ``pool/image`` and ``conf=…;id=…``), open to all
    initiators."""
    ensure_tgtd()
    iqn = iqn or f"iqn.2026-11.org.rdmb:{unique_name('rdmb')}"
    tid = _new_target(iqn)
    store = (["--bstype", bstype] if bstype else []) + (["--bsopts", bsopts] if bsopts else [])
    try:
        _tgtadm(
            "--op", "new", "--mode", "logicalunit",
            "--tid", str(tid), "--lun", "1", "-b", str(backing_path), *store,
        )  # fmt: skip
        _tgtadm("--op", "bind", "--mode", "target", "--tid", str(tid), "-I", "ALL")
        yield IscsiLun(iqn=iqn, tid=tid)
    finally:
        _tgtadm("--op", "delete", "--mode", "target", "--tid", str(tid), "--force")



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


@contextlib.contextmanager
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


def qmp(dom: libvirt.virDomain, command: str, arguments: dict[str, object] | None = None
        ) -> object:
    """One QMP command through libvirt; returns its ``return`` value."""
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


def wait_for_port(port: int, timeout: float = 20) -> None:
    """Return once something accepts connections on 127.0.0.1:``port`` (RuntimeError after
    ``timeout`` seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on 127.0.0.1:{port}") from None
            time.sleep(0.05)


def rdm_backup_argv() -> list[str]:
    """How to run the ``rdm-backup`` command: the venv's console script, else the module."""
    exe = REPO_ROOT / ".venv" / "bin" / "rdm-backup"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "libvirt_rdm_backup.cli"]



def rdm_backup(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (the venv's console script) and capture its output."""
    return subprocess.run([*rdm_backup_argv(), *args], capture_output=True, text=True,
                          timeout=600, check=False)


# -- the acceptance VM: a loop LUN (with an offset), an iSCSI LUN on tgtd, a qcow2 system disk
LOOP_OFFSET = 3 * MiB


@dataclass
class LabVM:
    """Handles to everything the acceptance VM is made of."""

    dom: libvirt.virDomain
    name: str
    uuid: str
    workdir: Path
    loop: str
    loop_file: Path
    iscsi: IscsiLun
    iscsi_file: Path
    qcow2: Path


@contextlib.contextmanager
def lab_vm(loop_size: int = GiB, lun_size: int = 64 * MiB, start: bool = True,
           sizelimit: bool = True, reflink: bool = False) -> Iterator[LabVM]:
    """Build the VM and tear every piece of it down afterwards.

    ``reflink``: the LUNs' backing files live on the lab's reflink XFS, so the
    storage agents can take snapshots of them.
    """
    with contextlib.ExitStack() as stack:
        workdir = stack.enter_context(rdmb_reflink_tmpdir() if reflink else rdmb_tmpdir())
        loop_file = workdir / "loop-lun.img"
        with open(loop_file, "wb") as stream:
            stream.truncate(LOOP_OFFSET + loop_size + (MiB if sizelimit else 0))
        iscsi_file = workdir / "iscsi-lun.img"
        with open(iscsi_file, "wb") as stream:
            stream.truncate(lun_size)
        qcow2 = workdir / "system.qcow2"
        subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"], check=True)
        loop = stack.enter_context(loop_device(loop_file, offset=LOOP_OFFSET,
                                               sizelimit=loop_size if sizelimit else 0))
        lun = stack.enter_context(iscsi_target(iscsi_file))
        name = unique_name("rdmb-vm")
        disks = [
            qcow2_disk("vda", str(qcow2)),
            block_disk("vdb", loop, serial="RDMBLOOP1"),
            iscsi_disk("sda", lun.iqn, lun.lun, device="lun"),
        ]
        dom = stack.enter_context(test_domain(name, disks, start=start))
        yield LabVM(dom=dom, name=name, uuid=dom.UUIDString(), workdir=workdir, loop=loop,
                    loop_file=loop_file, iscsi=lun, iscsi_file=iscsi_file, qcow2=qcow2)


def snapshot_source(vm: LabVM, dest: Path) -> dict[str, Path]:
    """Raw copies of both raw disks as they are now (the caller keeps the guest still)."""
    dest.mkdir(parents=True, exist_ok=True)
    refs = {"vdb": dest / "vdb.raw", "sda": dest / "sda.raw"}
    subprocess.run(["qemu-img", "convert", "-U", "-f", "raw", "-O", "raw", vm.loop,
                    str(refs["vdb"])], check=True)
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "raw", vm.iscsi.url,
                    str(refs["sda"])], check=True)
    return refs


def same_bytes(first: Path | str, second: Path | str) -> bool:
    """Byte-for-byte comparison of two raw images (``cmp`` reads them in large blocks)."""
    return subprocess.run(["cmp", "-s", str(first), str(second)], check=False).returncode == 0


def fill(vm: LabVM, pieces: int, first: int = 0) -> None:
    """``pieces`` guest writes of 8 MiB spread over vdb (every 16 MiB), patterns from ``first``."""
    for index in range(pieces):
        guest_write(vm.dom, "vdb", 0x20 + (first + index) % 200, index * 16 * MiB, 8 * MiB)
