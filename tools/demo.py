"""A real, self-explaining demonstration of rdm-backup on the lab (``make demo``).

It builds a VM with two raw disks, writes known data into them like a guest
would, backs the VM up with the real ``rdm-backup`` command, verifies the
backup, restores each raw disk to a new file and compares the bytes with
reference copies taken before the backup:

- vdb: a loop device over a 1 GiB sparse file (``losetup --offset`` 1 MiB),
  attached as ``<disk type='block' device='disk'>`` (virtio);
- sda: a 64 MiB file-backed LUN on the local tgtd, attached through QEMU's
  iSCSI initiator as ``<disk type='network' device='lun'>`` on virtio-scsi;
- vda: a small qcow2 system disk (not a raw disk: left out of the backup).

Everything is removed at the end, also on failure or Ctrl-C. With ``--keep``
the VM, its LUNs and the files stay in place for a closer look.
Exit status: 0 when every command succeeded and every disk matched, else 1.
"""

from __future__ import annotations

import argparse
import os
import shlex
import signal
import subprocess
import sys
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO_ROOT))

import libvirt  # noqa: E402

from libvirt_rdm_backup.errors import RdmBackupError  # noqa: E402
from libvirt_rdm_backup.process import run  # noqa: E402
from libvirt_rdm_backup.storage import tgt  # noqa: E402
from tools.labkit import (  # noqa: E402
    RUN_TOKEN,
    URI,
    LabVM,
    alias_of,
    block_disk,
    domain_type,
    guest_write,
    is_root,
    iscsi_disk,
    iscsi_target,
    loop_device,
    qcow2_disk,
    rdm_backup,
    rdmb_tmpdir,
    same_bytes,
    snapshot_source,
    test_domain,
)

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB
LOOP_FILE_SIZE = GiB
LOOP_OFFSET = MiB
LUN_SIZE = 64 * MiB
DOMAIN_NAME = f"rdmb-demo-{RUN_TOKEN}"

# (disk, pattern byte, offset, length): what the "guest" writes before the backup
WRITES = [
    ("vdb", 0x11, 0, MiB),
    ("vdb", 0x22, 300 * MiB, 256 * KiB),
    ("vdb", 0x33, LOOP_FILE_SIZE - LOOP_OFFSET - MiB, MiB),  # the last MiB of the disk
    ("sda", 0x44, 0, 64 * KiB),
    ("sda", 0x55, 32 * MiB, MiB),
    ("sda", 0x66, LUN_SIZE - MiB, MiB),
]
# ... and after it: the restored disks must not contain these
WRITES_AFTER = [
    ("vdb", 0x77, 0, 64 * KiB),
    ("sda", 0x88, 0, 64 * KiB),
]
RAW_DISKS = ("vdb", "sda")


class DemoFailure(Exception):
    """A step of the demonstration failed."""


def size_text(value: int) -> str:
    """Bytes as a short human string (``64 KiB``, ``1023 MiB``)."""
    if value == 0:
        return "0"
    for unit, factor in (("GiB", GiB), ("MiB", MiB), ("KiB", KiB)):
        if value >= factor and value % factor == 0:
            return f"{value // factor} {unit}"
    return f"{value} B"


def step(title: str) -> None:
    """Print a step heading."""
    print(f"\n== {title}", flush=True)


def say(text: str = "") -> None:
    """Print an explanation line under a step."""
    print(f"   {text}" if text else "", flush=True)


def show_output(text: str) -> None:
    """Print a command's output, indented."""
    for line in text.rstrip("\n").splitlines():
        print(f"     | {line}")
    sys.stdout.flush()


@dataclass
class Demo:
    """The demonstration, step by step; ``vm`` is set once the VM is built."""

    stack: ExitStack
    started: float = field(default_factory=time.monotonic)
    vm: LabVM | None = None
    refs: dict[str, Path] = field(default_factory=dict)
    differ: list[str] = field(default_factory=list)

    # -- helpers ---------------------------------------------------------------

    def cli(self, *args: str) -> str:
        """Run the real ``rdm-backup`` command, print it and its output; fail on non-zero exit."""
        print(f"   $ rdm-backup {shlex.join(args)}", flush=True)
        proc = rdm_backup(*args)
        if proc.stdout:
            show_output(proc.stdout)
        if proc.stderr:
            show_output(proc.stderr)
        if proc.returncode != 0:
            raise DemoFailure(f"rdm-backup {args[0]} exited with {proc.returncode}")
        return proc.stdout

    # -- the steps -------------------------------------------------------------

    def build(self) -> LabVM:
        """Storage, then the VM, each removed again by the exit stack."""
        step("1. Storage: a loop-device LUN and an iSCSI LUN on the local tgtd")
        workdir = self.stack.enter_context(rdmb_tmpdir())
        say(f"work directory {workdir}")
        loop_file = workdir / "loop-lun.img"
        with open(loop_file, "wb") as stream:
            stream.truncate(LOOP_FILE_SIZE)
        say(f"{loop_file.name}: {size_text(LOOP_FILE_SIZE)} sparse file")
        loop = self.stack.enter_context(loop_device(loop_file, offset=LOOP_OFFSET))
        say(f"$ losetup -f --show --offset {LOOP_OFFSET} {loop_file.name}  ->  {loop} "
            f"({size_text(LOOP_FILE_SIZE - LOOP_OFFSET)}: the file minus the 1 MiB offset)")

        iscsi_file = workdir / "iscsi-lun.img"
        with open(iscsi_file, "wb") as stream:
            stream.truncate(LUN_SIZE)
        lun = self.stack.enter_context(iscsi_target(iscsi_file))
        say(f"{iscsi_file.name}: {size_text(LUN_SIZE)} file, exported by tgtd as "
            f"target {lun.tid} LUN {lun.lun}")
        say(f"   {lun.url}")

        qcow2 = workdir / "system.qcow2"
        run(["qemu-img", "create", "-q", "-f", "qcow2", str(qcow2), "64M"])
        say(f"{qcow2.name}: 64 MiB qcow2 image (the system disk)")

        step(f"2. The VM {DOMAIN_NAME}")
        disks = [
            qcow2_disk("vda", str(qcow2)),
            block_disk("vdb", loop, serial="RDMBDEMO1"),
            iscsi_disk("sda", lun.iqn, lun.lun, device="lun"),
        ]
        say("vda  <disk type='file' device='disk'>   qcow2 system disk (not a raw disk)")
        say(f"vdb  <disk type='block' device='disk'>  {loop} on virtio")
        say("sda  <disk type='network' device='lun'> the iSCSI LUN on a virtio-scsi controller,")
        say("     SCSI commands pass through to the LUN")
        dom = self.stack.enter_context(test_domain(DOMAIN_NAME, disks, start=True))
        say(f"defined and started: type {domain_type()}, q35, 64 MiB, firmware only "
            f"(uuid {dom.UUIDString()})")
        self.vm = LabVM(dom=dom, name=DOMAIN_NAME, uuid=dom.UUIDString(), workdir=workdir,
                        loop=loop, loop_file=loop_file, iscsi=lun, iscsi_file=iscsi_file,
                        qcow2=qcow2)
        return self.vm

    def write(self, vm: LabVM, writes: list[tuple[str, int, int, int]]) -> None:
        """Write patterns through the guest's own devices (HMP ``qemu-io -d``)."""
        qdevs = {}
        for disk in RAW_DISKS:
            alias, bus = alias_of(vm.dom, disk)
            qdevs[disk] = f"/machine/peripheral/{alias}" + (
                "/virtio-backend" if bus == "virtio" else "")
        for disk, pattern, offset, length in writes:
            guest_write(vm.dom, disk, pattern, offset, length)
            say(f'{disk}: qemu-io -d {qdevs[disk]} "write -P {pattern:#04x} {offset} {length}"'
                f"  ({size_text(length)} at {size_text(offset)})")

    def run(self) -> None:
        """Every step, in order (raises DemoFailure on the first failing command)."""
        vm = self.build()

        step("3. Guest writes: known patterns into both raw disks, through the monitor")
        self.write(vm, WRITES)

        step("4. What rdm-backup sees")
        self.cli("disks", vm.name)

        step("5. Reference copies of the raw disks, taken while the VM is paused")
        refdir = vm.workdir / "ref"
        paused_at = time.monotonic()
        vm.dom.suspend()
        try:
            self.refs = snapshot_source(vm, refdir)
        finally:
            vm.dom.resume()
        say(f"qemu-img convert {vm.loop} and {vm.iscsi.url} -> {refdir}/{{vdb,sda}}.raw "
            f"(VM paused {time.monotonic() - paused_at:.1f} s, then resumed)")

        repo = vm.workdir / "repo"
        step("6. Full backup with the real command line")
        say("vdb (device='disk') is copied by a QEMU backup job; sda (device='lun') is copied")
        say("from the storage side while the guest is paused for a moment: guest SCSI")
        say("passthrough I/O bypasses QEMU's block layer, so a LUN never gets a QEMU job")
        self.cli("backup", vm.name, "--target", str(repo))

        step("7. The guest goes on writing after the backup")
        self.write(vm, WRITES_AFTER)

        step("8. List and verify the repository")
        self.cli("list", "--target", str(repo))
        self.cli("verify", vm.name, "--target", str(repo))

        step("9. Restore each raw disk to a new file and compare with the reference")
        for disk in RAW_DISKS:
            out = vm.workdir / f"restored-{disk}.raw"
            self.cli("restore", vm.name, "--target", str(repo), "--disk", disk, "--to", str(out))
            if same_bytes(out, self.refs[disk]):
                say(f"{disk}: {out.name} vs ref/{disk}.raw: MATCH")
            else:
                first = subprocess.run(["cmp", str(out), str(self.refs[disk])],
                                       capture_output=True, text=True, check=False)
                say(f"{disk}: {out.name} vs ref/{disk}.raw: DIFFER ({first.stdout.strip()})")
                self.differ.append(disk)
            self.check_patterns(disk, out)

    def check_patterns(self, disk: str, restored: Path) -> None:
        """Show that the restored file holds the data of the backup's point in time."""
        with open(restored, "rb") as stream:
            for name, pattern, offset, length in WRITES:
                if name != disk:
                    continue
                stream.seek(offset)
                ok = stream.read(length) == bytes([pattern]) * length
                later = [p for n, p, o, _ in WRITES_AFTER if n == disk and o == offset]
                note = f" (not {later[0]:#04x}, written after the backup)" if later else ""
                say(f"     {size_text(length)} at {size_text(offset)}: "
                    + (f"{pattern:#04x}{note}" if ok else f"NOT {pattern:#04x}"))
                if not ok and disk not in self.differ:
                    self.differ.append(disk)

    # -- the end ---------------------------------------------------------------

    def report_kept(self) -> None:
        """Where everything is, for ``--keep``."""
        step("Kept (--keep)")
        vm = self.vm
        if vm is None:
            say("nothing was built")
            return
        say(f"VM         {vm.name} (running; virsh -c {URI} dominfo {vm.name})")
        say(f"loop LUN   {vm.loop} -> {vm.loop_file} (offset {LOOP_OFFSET})")
        say(f"iSCSI LUN  {vm.iscsi.url} (tgt target {vm.iscsi.tid}) -> {vm.iscsi_file}")
        say(f"files      {vm.workdir}/ (repo/, ref/, restored-*.raw)")
        say("`make lab-down` removes leftover rdmb* domains, iSCSI targets and loop devices")
        say(f"(and stops the lab); remove the files with: rm -rf {vm.workdir}")


def leftovers(vm: LabVM) -> list[str]:
    """What of the demo still exists after the cleanup (should be nothing)."""
    found = []
    conn = libvirt.open(URI)
    try:
        if vm.name in conn.listDefinedDomains() or any(
            d.name() == vm.name for d in conn.listAllDomains()
        ):
            found.append(f"domain {vm.name}")
    finally:
        conn.close()
    loops = run(["losetup", "-l", "-n", "-O", "NAME,BACK-FILE"]).stdout
    if any(str(vm.loop_file) in line for line in loops.splitlines()):
        found.append(f"loop device on {vm.loop_file}")
    if tgt.find_target(vm.iscsi.iqn) is not None:
        found.append(f"iSCSI target {vm.iscsi.iqn}")
    if vm.workdir.exists():
        found.append(f"directory {vm.workdir}")
    return found


def preflight() -> None:
    """Fail early, with a hint, when the lab is not there."""
    if not is_root():
        raise DemoFailure("run as root (loop devices, tgtadm and qemu:///system need it)")
    try:
        libvirt.open(URI).close()
    except libvirt.libvirtError as err:
        raise DemoFailure(f"libvirt at {URI} does not answer ({err}); run `make lab-up`") from err
    if not tgt.tgtadm_available():
        raise DemoFailure("tgtd does not answer tgtadm; run `make lab-up`")


def main(argv: list[str] | None = None) -> int:
    """Run the demonstration; 0 when everything worked and matched."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--keep", action="store_true",
                        help="leave the VM, its LUNs and the files in place")
    args = parser.parse_args(argv)
    code = 1

    def interrupted(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt(signal.Signals(signum).name)

    # SIGTERM and SIGHUP unwind like Ctrl-C, so the cleanup runs for them too
    signal.signal(signal.SIGTERM, interrupted)
    signal.signal(signal.SIGHUP, interrupted)
    libvirt.registerErrorHandler(lambda _ctx, _err: None, None)  # errors are raised anyway
    with ExitStack() as stack:
        demo = Demo(stack)
        try:
            preflight()
            demo.run()
            code = 1 if demo.differ else 0
        except (DemoFailure, RdmBackupError, libvirt.libvirtError, OSError,
                subprocess.SubprocessError, AssertionError) as err:
            print(f"\nFAILED: {type(err).__name__}: {err}", file=sys.stderr, flush=True)
        step("Result")
        if code == 0:
            say(f"all raw disks restored byte for byte (MATCH: {', '.join(RAW_DISKS)}) "
                f"in {time.monotonic() - demo.started:.0f} s")
        elif demo.differ:
            say(f"DIFFER: {', '.join(demo.differ)}")
        else:
            say("a step failed (see above)")
        if args.keep:
            demo.report_kept()
            sys.stdout.flush()
            sys.stderr.flush()
            # Leave without unwinding the exit stack: the VM, LUNs and files stay.
            os._exit(code)
        step("Cleanup: destroy and undefine the VM, delete the target, detach the loop device")
    # the exit stack has run: check that nothing is left behind
    if demo.vm is not None:
        left = leftovers(demo.vm)
        if left:
            say("left behind: " + "; ".join(left))
            return 1
        say("nothing left behind")
    say(f"total {time.monotonic() - demo.started:.0f} s")
    return code


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("\ninterrupted (the demo cleaned up after itself)", file=sys.stderr)
        sys.exit(130)
