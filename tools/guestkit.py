"""A real tiny Linux guest for lab tests and tools (the bench): a guest OS that writes to its
disks and runs qemu-ga.

The kernel and initramfs come from ``tools/build-guest.sh`` (built on first use and cached in
``$RDMB_GUEST_DIR``, default ``/var/cache/rdmb-guest``). The domain is ``type='qemu'`` (TCG:
KVM on the lab machines does not boot a Linux kernel), machine ``pc`` with ACPI (libvirt leaves
ACPI out unless ``<acpi/>`` is asked for; PCI hotplug needs it), direct kernel boot, 256 MiB,
one vCPU, no NIC; the command loop answers about 8 s after ``create()``.

Two ways in:

* the command channel, the guest's ``/dev/ttyS1`` as a unix socket on the host
  (:meth:`Guest.run`): busybox ``sh`` runs each command; the protocol is in build-guest.sh;
* the QEMU guest agent through libvirt (:meth:`Guest.agent`, ``dom.fsFreeze()`` ...).

Commands left running in the background must redirect their output (``>/dev/null 2>&1 &``),
or it ends up inside the output of later commands.
"""

from __future__ import annotations

import base64
import itertools
import json
import os
import pwd
import re
import shlex
import socket
import subprocess
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import libvirt
import libvirt_qemu

from tools.labkit import URI, DiskSpec, rdmb_tmpdir, remove_domain

ROOT = Path(__file__).resolve().parents[1]
BUILD_SCRIPT = ROOT / "tools" / "build-guest.sh"
BUILD_TIMEOUT = 900.0
BOOT_TIMEOUT = 60.0
AGENT_CHANNEL = "org.qemu.guest_agent.0"
CMD_SOCKET = "cmd.sock"
CONSOLE_LOG = "console.log"
MEMORY_MIB = 256
CMDLINE = "console=ttyS0 panic=-1 quiet"
QEMU_USER = "libvirt-qemu"

_BEGIN = "__RDMB_BEGIN__"
_DONE = re.compile(r"__RDMB_DONE__ (\S+) (-?\d+)$")


class GuestError(Exception):
    """The guest did not boot, did not answer, or a command failed."""


class GuestTimeout(GuestError, TimeoutError):
    """No answer from the guest in time."""


def guest_dir() -> Path:
    """Where build-guest.sh puts the guest (``$RDMB_GUEST_DIR`` or /var/cache/rdmb-guest)."""
    return Path(os.environ.get("RDMB_GUEST_DIR", "/var/cache/rdmb-guest"))


def build_guest(timeout: float = BUILD_TIMEOUT) -> Path:
    """Build the kernel and initramfs unless cached (tools/build-guest.sh); their directory."""
    env = dict(os.environ, RDMB_GUEST_DIR=str(guest_dir()))
    proc = subprocess.run(
        [str(BUILD_SCRIPT)], capture_output=True, text=True, timeout=timeout, check=False, env=env
    )
    if proc.returncode != 0:
        raise GuestError(f"{BUILD_SCRIPT} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    built = Path(proc.stdout.strip().splitlines()[-1])
    for name in ("vmlinuz", "initrd.gz"):
        if not (built / name).is_file():
            raise GuestError(f"{BUILD_SCRIPT} made no {built / name}")
    return built


def guest_domain_xml(
    name: str, disks: list[DiskSpec], guest_dir: Path | str, channel_dir: Path | str
) -> str:
    """The domain: TCG, direct kernel boot of the lab guest, its serial ports and agent channel.

    Serial port 0 is the kernel console (a pty, logged to ``channel_dir/console.log``); serial
    port 1 is the command channel, a unix socket ``channel_dir/cmd.sock`` that QEMU listens on.
    """
    if "rdmb" not in name:
        raise ValueError(f"lab domain names contain 'rdmb': {name!r}")
    kernel = Path(guest_dir) / "vmlinuz"
    initrd = Path(guest_dir) / "initrd.gz"
    sock = Path(channel_dir) / CMD_SOCKET
    log = Path(channel_dir) / CONSOLE_LOG
    devices = "\n    ".join(d.xml for d in disks)
    return f"""<domain type='qemu'>
  <name>{escape(name)}</name>
  <uuid>{uuid.uuid4()}</uuid>
  <memory unit='MiB'>{MEMORY_MIB}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc'>hvm</type>
    <kernel>{escape(str(kernel))}</kernel>
    <initrd>{escape(str(initrd))}</initrd>
    <cmdline>{CMDLINE}</cmdline>
  </os>
  <features><acpi/><apic/></features>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
    <controller type='scsi' model='virtio-scsi'/>
    <controller type='virtio-serial'/>
    {devices}
    <serial type='pty'>
      <log file={quoteattr(str(log))} append='off'/>
      <target port='0'/>
    </serial>
    <serial type='unix'>
      <source mode='bind' path={quoteattr(str(sock))}/>
      <target port='1'/>
    </serial>
    <console type='pty'><target type='serial' port='0'/></console>
    <channel type='unix'>
      <source mode='bind'/>
      <target type='virtio' name='{AGENT_CHANNEL}'/>
    </channel>
    <memballoon model='none'/>
  </devices>
</domain>"""


class Guest:
    """A running lab guest: its domain, command channel and agent."""

    def __init__(self, dom: libvirt.virDomain, channel_dir: Path) -> None:
        self.dom = dom
        self.name: str = dom.name()
        self.channel_dir = channel_dir
        self.boot_seconds: float | None = None
        self._sock: socket.socket | None = None
        self._buffer = b""
        self._ids = itertools.count(1)
        self._tag = uuid.uuid4().hex[:6]

    # --- command channel -----------------------------------------------------------------------

    def _connect(self, deadline: float) -> socket.socket:
        if self._sock is not None:
            return self._sock
        path = str(self.channel_dir / CMD_SOCKET)
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
            except OSError as err:
                sock.close()
                if time.monotonic() > deadline:
                    raise GuestTimeout(f"cannot connect to {path}: {err}") from err
                time.sleep(0.2)
                continue
            self._sock = sock
            return sock

    def _send(self, command: str) -> str:
        """Send one command; its id."""
        assert self._sock is not None
        ident = f"{self._tag}.{next(self._ids)}"
        payload = base64.b64encode(command.encode()).decode()
        try:
            self._sock.sendall(f"{ident} {payload}\n".encode())
        except OSError as err:
            raise GuestError(f"the command channel failed: {err}") from err
        return ident

    def _readline(self, deadline: float) -> str:
        """The next line from the guest (without its newline)."""
        assert self._sock is not None
        while b"\n" not in self._buffer:
            left = deadline - time.monotonic()
            if left <= 0:
                raise GuestTimeout("no answer on the command channel")
            self._sock.settimeout(left)
            try:
                data = self._sock.recv(65536)
            except TimeoutError as err:
                raise GuestTimeout("no answer on the command channel") from err
            except OSError as err:
                raise GuestError(f"the command channel failed: {err}") from err
            if not data:
                raise GuestError("the command channel was closed (did the guest stop?)")
            self._buffer += data
        line, _, self._buffer = self._buffer.partition(b"\n")
        return line.decode("utf-8", "replace").rstrip("\r")

    def _collect(self, ident: str, deadline: float) -> tuple[int, str]:
        """Output and exit status of command ``ident``; earlier answers are skipped."""
        begin = f"{_BEGIN} {ident}"
        output: list[str] | None = None
        while True:
            line = self._readline(deadline)
            if output is None:
                if line.endswith(begin):
                    output = []
                continue
            done = _DONE.search(line)
            if done and done.group(1) == ident:
                head = line[: done.start()]
                text = "\n".join(output) + ("\n" if output else "")
                return int(done.group(2)), text + head
            output.append(line)

    def run(self, cmd: str, timeout: float = 30) -> tuple[int, str]:
        """Run ``cmd`` with the guest's ``sh``; (exit status, stdout and stderr together)."""
        deadline = time.monotonic() + timeout
        self._connect(deadline)
        ident = self._send(cmd)
        try:
            return self._collect(ident, deadline)
        except GuestTimeout as err:
            raise GuestTimeout(f"guest command timed out after {timeout} s: {cmd!r}") from err

    def check(self, cmd: str, timeout: float = 30) -> str:
        """:meth:`run`, raising :class:`GuestError` unless the exit status is 0; the output."""
        rc, out = self.run(cmd, timeout)
        if rc != 0:
            raise GuestError(f"guest command failed ({rc}): {cmd!r}\n{out}")
        return out

    def wait_ready(self, timeout: float = BOOT_TIMEOUT) -> float:
        """Wait until the command loop answers; seconds waited. Fails early if the domain stops."""
        start = time.monotonic()
        deadline = start + timeout
        self._connect(deadline)
        sent: set[str] = set()
        while True:
            if not self.dom.isActive():
                raise GuestError(f"guest {self.name} stopped while booting\n{self.console_tail()}")
            if time.monotonic() > deadline:
                raise GuestTimeout(
                    f"guest {self.name} did not answer in {timeout} s\n{self.console_tail()}"
                )
            probe_end = min(deadline, time.monotonic() + 1.0)
            try:
                sent.add(self._send("true"))
                while True:
                    done = _DONE.search(self._readline(probe_end))
                    if done and done.group(1) in sent:
                        return time.monotonic() - start
            except GuestTimeout:
                continue
            except GuestError as err:
                raise GuestError(f"guest {self.name}: {err}\n{self.console_tail()}") from err

    def wait_path(self, path: str, timeout: float = 20) -> None:
        """Wait until ``path`` exists in the guest (devices appear asynchronously)."""
        tries = max(1, int(timeout * 10))
        quoted = shlex.quote(path)
        script = f"i=0; while [ ! -e {quoted} ]; do [ $i -ge {tries} ] && exit 1; " \
                 f"i=$((i+1)); sleep 0.1; done"
        rc, _ = self.run(script, timeout + 10)
        if rc != 0:
            raise GuestTimeout(f"{path} did not appear in the guest in {timeout} s")

    def dd_write(
        self, dev: str, offset: int, length: int, pattern: int, direct: bool = False
    ) -> None:
        """Write ``length`` bytes of ``pattern`` at byte ``offset`` of ``dev`` (busybox dd).

        The data is flushed to the device (``conv=fsync``); ``direct`` adds O_DIRECT (offset and
        length must then be multiples of the logical block size).
        """
        if not 0 <= pattern <= 0xFF:
            raise ValueError(f"pattern is one byte: {pattern}")
        oflag = "seek_bytes,direct" if direct else "seek_bytes"
        self.check(
            f"tr '\\000' '\\{pattern:03o}' </dev/zero | head -c {length} | "
            f"dd of={shlex.quote(dev)} bs=65536 seek={offset} iflag=fullblock "
            f"oflag={oflag} conv=notrunc,fsync 2>&1",
            timeout=120,
        )

    # --- agent ---------------------------------------------------------------------------------

    def agent(self, command: str, arguments: dict[str, object] | None = None,
              timeout: int = 10) -> object:
        """One guest agent command through libvirt; its ``return`` value."""
        message: dict[str, object] = {"execute": command}
        if arguments:
            message["arguments"] = arguments
        reply = json.loads(libvirt_qemu.qemuAgentCommand(self.dom, json.dumps(message), timeout, 0))
        if "error" in reply:
            raise GuestError(f"guest agent {command}: {reply['error']}")
        return reply.get("return")

    def wait_agent(self, timeout: float = 30) -> float:
        """Wait until qemu-ga answers ``guest-ping``; seconds waited."""
        start = time.monotonic()
        while True:
            try:
                self.agent("guest-ping", timeout=5)
                return time.monotonic() - start
            except libvirt.libvirtError as err:
                if time.monotonic() - start > timeout:
                    raise GuestTimeout(
                        f"guest agent of {self.name} does not answer: {err}"
                    ) from err
                time.sleep(0.5)

    # --- the rest ------------------------------------------------------------------------------

    def console_tail(self, lines: int = 40) -> str:
        """The end of the kernel console log (for error messages)."""
        try:
            text = (self.channel_dir / CONSOLE_LOG).read_text(errors="replace")
        except OSError as err:
            return f"(no console log: {err})"
        return "\n".join(text.splitlines()[-lines:])

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def _channel_dir_for_qemu(path: Path) -> None:
    """Let QEMU (user libvirt-qemu) create and use sockets in ``path``."""
    try:
        entry = pwd.getpwnam(QEMU_USER)
    except KeyError:
        path.chmod(0o777)
        return
    os.chown(path, entry.pw_uid, entry.pw_gid)
    path.chmod(0o755)


@contextmanager
def guest_vm(
    name: str, disks: list[DiskSpec], boot_timeout: float = BOOT_TIMEOUT
) -> Iterator[Guest]:
    """Build (if needed), define and start the lab guest; wait for its command loop.

    The domain is destroyed and undefined afterwards, always. ``Guest.boot_seconds`` is the
    time from ``create()`` until the command loop answered.
    """
    built = build_guest()
    with ExitStack() as stack:
        channel_dir = stack.enter_context(rdmb_tmpdir())
        _channel_dir_for_qemu(channel_dir)
        conn = libvirt.open(URI)
        stack.callback(conn.close)
        dom = conn.defineXML(guest_domain_xml(name, disks, built, channel_dir))
        stack.callback(remove_domain, dom.UUIDString())
        guest = Guest(dom, channel_dir)
        stack.callback(guest.close)
        started = time.monotonic()
        dom.create()
        guest.wait_ready(boot_timeout)
        guest.boot_seconds = time.monotonic() - started
        yield guest


