"""The hypervisor agent looks up only what a real disk can be, and reads only bounded input.

Each hostile request runs the real agent process (``python -m libvirt_rdm_backup.agent``)
and must be refused in one JSON line with exit status 2, with nothing read: the
sacrificial file is watched with inotify (any open or read shows), the iSCSI portal is a
socket of the test (any connection attempt shows). The backup-server side is checked with
fake ssh clients that answer too much, in the wrong encoding or not in JSON.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import socket
import stat
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from libvirt_rdm_backup import agent
from libvirt_rdm_backup.agent_admission import check_block_source, domain_iscsi_sources
from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk, SourceKind
from libvirt_rdm_backup.errors import OperationError, UsageError
from libvirt_rdm_backup.remote import MAX_ANSWER, SshAgent
from libvirt_rdm_backup.storage.base import StorageNode
from libvirt_rdm_backup.storage.sysfs import SysfsAgent

from .storage.sysfs_tree import SysfsTree

PATTERN = b"RDMB-SACRIFICIAL-0xA5A5-DO-NOT-READ\n"
IQN = "iqn.2024-01.lab.rdmb:admission"
_IN_ACCESS, _IN_OPEN, _IN_NONBLOCK = 0x1, 0x20, 0o4000


def run_agent(request: bytes | str, *, env: dict[str, str] | None = None,
              timeout: float = 60) -> tuple[int, dict[str, Any], str]:
    data = request.encode() if isinstance(request, str) else request
    proc = subprocess.run([sys.executable, "-m", "libvirt_rdm_backup.agent"], input=data,
                          capture_output=True, timeout=timeout, check=False,
                          env={**os.environ, "LIBVIRT_DEFAULT_URI": "test:///default",
                               **(env or {})})
    stdout = proc.stdout.decode()
    assert stdout.count("\n") == 1, stdout
    assert b"Traceback" not in proc.stderr
    return proc.returncode, json.loads(stdout), stdout


def map_request(**disk: Any) -> str:
    base = RawDisk(target="vdb", source_kind=SourceKind.BLOCK, device="disk").to_dict()
    return json.dumps({"op": "map", "disk": {**base, **disk}})


@contextmanager
def untouched(path: Path) -> Iterator[None]:
    """Fails unless ``path`` is neither opened nor read meanwhile (inotify)."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = libc.inotify_init1(_IN_NONBLOCK)
    assert fd >= 0
    try:
        assert libc.inotify_add_watch(fd, os.fsencode(path), _IN_ACCESS | _IN_OPEN) >= 0
        yield
        with pytest.raises(BlockingIOError):
            events = os.read(fd, 4096)
            pytest.fail(f"{path} was opened or read ({len(events)} bytes of events)")
    finally:
        os.close(fd)


def sacrificial(tmp_path: Path) -> Path:
    path = tmp_path / "sacrificial"
    path.write_bytes(PATTERN)
    return path


# -- source_path: a block device node, nothing else ------------------------------------


@pytest.mark.hostile
@pytest.mark.parametrize("kind", ["regular-file", "devnum-file", "directory", "fifo",
                                  "dev-null", "symlink-to-file", "symlink-to-block"])
def test_a_source_that_is_no_block_device_is_refused_unread(tmp_path: Path, kind: str) -> None:
    victim = sacrificial(tmp_path)
    if kind == "regular-file":
        path = victim
    elif kind == "devnum-file":  # what a fixture dev node used to look like
        path = tmp_path / "loop0"
        path.write_text("7:0\n")
        victim = path
    elif kind == "directory":
        path = tmp_path
    elif kind == "fifo":
        path = tmp_path / "fifo"
        os.mkfifo(path)
    elif kind == "dev-null":
        path = Path("/dev/null")
    elif kind == "symlink-to-file":
        path = tmp_path / "link"
        path.symlink_to(victim)
    else:
        if os.geteuid() != 0:
            pytest.skip("making a block device node needs root")
        node = tmp_path / "blocknode"
        os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 0))
        path = tmp_path / "link"
        path.symlink_to(node)
    with untouched(victim):
        code, answer, _ = run_agent(map_request(source_path=str(path)))
    assert code == 2 and answer["ok"] is False and answer["exit_code"] == 2, answer
    assert answer["error_class"] == "UsageError" and "refused" in answer["error"]
    assert PATTERN.decode().strip() not in answer["error"]


@pytest.mark.hostile
def test_a_path_with_a_nul_is_refused() -> None:
    code, answer, _ = run_agent(map_request(source_path="/dev/loop0\x00/etc/shadow"))
    assert code == 2 and answer["exit_code"] == 2 and "control characters" in answer["error"]


def test_a_block_device_node_passes_wherever_it_is(tmp_path: Path) -> None:
    if os.geteuid() != 0:
        pytest.skip("making a block device node needs root")
    node = tmp_path / "blocknode"
    os.mknod(node, stat.S_IFBLK | 0o600, os.makedev(7, 0))
    check_block_source(str(node))
    check_block_source(str(tmp_path / "missing"))  # nothing to read: left to the mapping
    # a link in a directory of dev_root that only root writes is followed (udev's names)
    dev = tmp_path / "dev"
    (dev / "disk/by-id").mkdir(parents=True)
    (dev / "disk/by-id/wwn-0x1").symlink_to(node)
    check_block_source(str(dev / "disk/by-id/wwn-0x1"), dev_root=str(dev))
    (dev / "shm").mkdir(mode=0o1777)
    (dev / "shm").chmod(0o1777)
    (dev / "shm/x").symlink_to(node)
    with pytest.raises(UsageError, match="symbolic link outside"):
        check_block_source(str(dev / "shm/x"), dev_root=str(dev))


def test_the_production_sysfs_agent_takes_no_file_for_a_device(tmp_path: Path) -> None:
    tree = SysfsTree(tmp_path)
    tree.block("loop3", "7:3", 2048)  # dev/loop3 is a regular file holding 7:3
    assert tree.agent().map_path("/dev/loop3").name == "loop3"  # the fixture agent does
    production = SysfsAgent(sysfs_root=str(tree.sys), dev_root=str(tree.dev))
    disk = RawDisk(target="vdb", source_kind=SourceKind.BLOCK, device="disk",
                   source_path="/dev/loop3")
    with untouched(tree.dev / "loop3"):
        assert not production.can_map(disk)
        with pytest.raises(Exception, match="not a block device"):
            production.map_path("/dev/loop3")


# -- iSCSI: only the LUNs of this host's domains ------------------------------------------


@contextmanager
def listener() -> Iterator[socket.socket]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(8)
        yield sock


def nobody_connected(sock: socket.socket) -> bool:
    return not select.select([sock], [], [], 0)[0]


@pytest.mark.hostile
@pytest.mark.parametrize("kind", ["iscsi", "scsi-hostdev"])
def test_an_iscsi_portal_of_no_domain_is_refused_uncontacted(kind: str) -> None:
    with listener() as sock:
        port = sock.getsockname()[1]
        source = {"host": "127.0.0.1", "port": port, "iqn": IQN, "lun": 1}
        code, answer, _ = run_agent(map_request(source_kind=kind, device="lun",
                                                iscsi=source), timeout=30)
        assert nobody_connected(sock)
    assert code == 2 and answer["exit_code"] == 2 and answer["error_class"] == "UsageError"
    assert "not a disk of any domain on this host" in answer["error"]


DOMAINS = """<node>
  <domain type='test'>
    <name>rdmb-admission</name>
    <memory>65536</memory>
    <os><type>hvm</type></os>
    <devices>
      <disk type='network' device='lun'>
        <driver name='qemu' type='raw'/>
        <source protocol='iscsi' name='{iqn}/1'><host name='127.0.0.1' port='{port}'/></source>
        <target dev='sda' bus='scsi'/>
      </disk>
    </devices>
  </domain>
</node>
"""


class FakeIscsiAgent:
    name = "iscsi"

    def __init__(self) -> None:
        self.asked: list[IscsiSource] = []

    def can_map(self, disk: RawDisk) -> bool:
        return disk.iscsi is not None

    def map(self, disk: RawDisk) -> StorageNode:
        assert disk.iscsi is not None
        self.asked.append(disk.iscsi)
        return StorageNode(kind="iscsi-lun", name=disk.iscsi.iqn, path=disk.iscsi.url)


def test_only_the_luns_of_this_hosts_domains_are_asked(tmp_path: Path) -> None:
    config = tmp_path / "node.xml"
    config.write_text(DOMAINS.format(iqn=IQN, port=3261))
    uri = f"test://{config}"
    known = IscsiSource("127.0.0.1", 3261, IQN, 1)
    assert domain_iscsi_sources(uri) == {known}
    fake = FakeIscsiAgent()

    def ask(**iscsi: Any) -> dict[str, Any]:
        source = {"host": "127.0.0.1", "port": 3261, "iqn": IQN, "lun": 1, **iscsi}
        request = json.loads(map_request(source_kind="iscsi", device="lun", iscsi=source))
        return agent.handle(request, [fake], lambda: domain_iscsi_sources(uri))

    assert ask()["ok"] is True
    for other in ({"lun": 2}, {"port": 3260}, {"iqn": IQN + "x"}, {"host": "localhost"}):
        answer = ask(**other)
        assert answer["ok"] is False and answer["exit_code"] == 2, other
    assert fake.asked == [known]


# -- the request: bounded in size and time ----------------------------------------------


@pytest.mark.hostile
def test_a_request_that_never_ends_is_given_up() -> None:
    proc = subprocess.Popen([sys.executable, "-m", "libvirt_rdm_backup.agent"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE,
                            env={**os.environ, agent.TIMEOUT_ENV: "1"})
    assert proc.stdin is not None
    try:
        proc.stdin.write(b'{"op": "version", "pad": "')
        proc.stdin.flush()
        stdout, stderr = _wait_open(proc)
    finally:
        proc.kill()
        proc.wait()
        proc.stdin.close()
    answer = json.loads(stdout)
    assert proc.returncode == 2 and answer["exit_code"] == 2
    assert answer["error"] == "no complete request within 1 s"
    assert b"Traceback" not in stderr


def _wait_open(proc: subprocess.Popen[bytes]) -> tuple[bytes, bytes]:
    """Output of ``proc`` while its stdin stays open (``communicate`` would close it)."""
    assert proc.stdout is not None and proc.stderr is not None
    proc.wait(60)
    return proc.stdout.read(), proc.stderr.read()


@pytest.mark.hostile
def test_an_answer_that_never_comes_is_given_up(tmp_path: Path) -> None:
    """libvirt that accepts the connection and never answers: one line, exit 4."""
    with socket.socket(socket.AF_UNIX) as hung:
        hung.bind(str(tmp_path / "libvirt-sock"))
        hung.listen(1)
        uri = f"qemu+unix:///system?socket={tmp_path / 'libvirt-sock'}"
        source = {"host": "127.0.0.1", "port": 3260, "iqn": IQN, "lun": 1}
        code, answer, _ = run_agent(map_request(source_kind="iscsi", device="lun",
                                                iscsi=source),
                                    env={"LIBVIRT_DEFAULT_URI": uri, agent.TIMEOUT_ENV: "0.2"})
    assert code == 4 and answer["ok"] is False and answer["exit_code"] == 4
    assert answer["error"] == "the request was not answered within 2 s"


@pytest.mark.hostile
@pytest.mark.parametrize("raw", [b"\xff\xfe" + b'{"op": "version"}',
                                 b'{"op": "version", "pad": "' + b"x" * agent.MAX_REQUEST
                                 + b'"}'])
def test_oversized_and_undecodable_requests_exit_two(raw: bytes) -> None:
    code, answer, _ = run_agent(raw)
    assert code == 2 and answer["exit_code"] == 2 and len(answer["error"]) < 300


# -- the answer, on the backup server: bounded, UTF-8, JSON -------------------------------


def fake_ssh(tmp_path: Path, body: str) -> str:
    path = tmp_path / "fake-ssh"
    path.write_text("#!/bin/sh\ncat >/dev/null\n" + body + "\n")
    path.chmod(0o755)
    return str(path)


@pytest.mark.hostile
@pytest.mark.parametrize("body, fragment", [
    (f"head -c {64 << 20} /dev/zero | tr '\\000' x\ntouch \"$0.done\"",
     f"sent an answer larger than {MAX_ANSWER} bytes"),
    ("printf '\\377\\376{\"ok\": true}\\n'", "sent an answer that is not UTF-8"),
    ("echo '{\"ok\": true'", "sent an answer that is not JSON"),
    ("echo '[true]'", "sent an answer that is not a JSON object"),
])
def test_hostile_answers_are_one_line_agent_failures(tmp_path: Path, body: str,
                                                     fragment: str) -> None:
    ssh = fake_ssh(tmp_path, body)
    with pytest.raises(OperationError) as caught:
        SshAgent("ssh://hv1", ssh=ssh, timeout=60).version()
    message = str(caught.value)
    assert type(caught.value) is OperationError and caught.value.exit_code == 4
    assert message.startswith("agent ssh://hv1 ") and fragment in message
    assert "\n" not in message and len(message) < 400
    assert not Path(ssh + ".done").exists()  # the huge answer was not read to its end
