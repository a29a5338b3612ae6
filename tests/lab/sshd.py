"""A private sshd on loopback for tests: fresh keys, one forced command, removed afterwards.

:func:`loopback_sshd` runs ``/usr/sbin/sshd -D -e -f CONFIG`` on 127.0.0.1 and a free port
with its own host key, accepting one fresh client key that ``authorized_keys`` restricts
to ``command="...",restrict``. The system's sshd (if any) and its configuration are not
touched; only ``/run/sshd``, the privilege separation directory, is created when missing.
"""

from __future__ import annotations

import os
import pwd
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import libvirt_rdm_backup

SSHD = "/usr/sbin/sshd"
PRIVSEP_DIR = "/run/sshd"
_PLAIN_PATH_RE = re.compile(r"^/[A-Za-z0-9_./+-]+$")


def agent_command() -> str:
    """The forced command that runs ``rdm-backup agent`` of the tree under test.

    sshd gives a session an environment of its own (no ``PYTHONPATH``), so the
    command names the tree this process imports; on a clean checkout that is the
    one the venv's editable install points at anyway.
    """
    tree = Path(libvirt_rdm_backup.__file__).resolve().parent.parent
    script = Path(sys.executable).parent / "rdm-backup"
    for path in (tree, script):
        if not _PLAIN_PATH_RE.fullmatch(str(path)):
            raise ValueError(f"path {path} is unsafe in a forced command")
    return f"env PYTHONPATH={tree} {script} agent"


@dataclass(frozen=True)
class SshdInfo:
    """How to reach the private sshd."""

    host: str
    port: int
    user: str
    identity: Path  # the client's private key, accepted with the forced command
    known_hosts: Path  # the server's host key, for StrictHostKeyChecking=yes
    workdir: Path
    log: Path  # sshd's own log (-e)

    @property
    def uri(self) -> str:
        """The agent address, ``ssh://user@127.0.0.1:port``."""
        return f"ssh://{self.user}@{self.host}:{self.port}"

    def new_key(self, name: str) -> Path:
        """Another fresh client key (not authorized): for tests of refused keys."""
        return _keygen(self.workdir / name, name)

    def ssh_argv(self, *command: str, identity: Path | None = None) -> list[str]:
        """A plain ssh command line to this server (for tests that bypass SshAgent)."""
        return ["ssh", "-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"UserKnownHostsFile={self.known_hosts}", "-o", "IdentitiesOnly=yes",
                "-i", str(identity or self.identity), "-p", str(self.port), "-l", self.user,
                "--", self.host, *command]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _keygen(path: Path, comment: str) -> Path:
    subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment,
                    "-f", str(path)], check=True, capture_output=True)
    return path


def _config(work: Path, port: int, host_key: Path, authorized: Path, user: str) -> str:
    return "\n".join([
        f"Port {port}",
        "ListenAddress 127.0.0.1",
        f"HostKey {host_key}",
        f"PidFile {work / 'sshd.pid'}",
        f"AuthorizedKeysFile {authorized}",
        "AuthorizedPrincipalsFile none",
        "StrictModes no",
        "PermitRootLogin prohibit-password",
        "PubkeyAuthentication yes",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "HostbasedAuthentication no",
        "UsePAM no",
        f"AllowUsers {user}",
        "PermitUserEnvironment no",
        "X11Forwarding no",
        "PrintMotd no",
        "LogLevel VERBOSE",
        "",
    ])


def _wait_listening(proc: subprocess.Popen[bytes], port: int, log: Path) -> bool:
    """True once sshd accepts connections; False when it exited first."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return True
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"sshd did not listen on 127.0.0.1:{port}: {log.read_text()[-2000:]}")


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()  # SIGTERM to this pid: the listener; sessions end on their own
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def loopback_sshd(command: str) -> Iterator[SshdInfo]:
    """A private sshd on 127.0.0.1 whose one accepted key runs ``command`` and nothing else.

    ``command`` goes into ``authorized_keys`` as ``command="<command>",restrict``, so
    it must not contain double quotes, backslashes or newlines.
    """
    if any(c in command for c in '"\\\n\r'):
        raise ValueError(f"unsafe forced command {command!r}")
    if not os.path.exists(SSHD):
        raise RuntimeError(f"{SSHD} is missing: install openssh-server (make install)")
    user = pwd.getpwuid(os.getuid()).pw_name
    work = Path(tempfile.mkdtemp(prefix="rdmb-sshd-", dir="/var/tmp"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        os.chmod(work, 0o700)
        if not os.path.isdir(PRIVSEP_DIR):
            os.makedirs(PRIVSEP_DIR, mode=0o755, exist_ok=True)
        host_key = _keygen(work / "host_key", "rdmb-test-host")
        client_key = _keygen(work / "client_key", "rdmb-test-client")
        authorized = work / "authorized_keys"
        public = (work / "client_key.pub").read_text().strip()
        authorized.write_text(f'command="{command}",restrict {public}\n')
        host_public = " ".join((work / "host_key.pub").read_text().split()[:2])
        known_hosts = work / "known_hosts"
        log = work / "sshd.log"
        config = work / "sshd_config"
        for _attempt in range(5):  # a free port may be taken between probe and bind
            port = _free_port()
            config.write_text(_config(work, port, host_key, authorized, user))
            check = subprocess.run([SSHD, "-t", "-f", str(config)], capture_output=True,
                                   text=True, check=False)
            if check.returncode != 0:
                raise RuntimeError(f"sshd -t refused the test config: {check.stderr.strip()}")
            with open(log, "ab") as stream:
                proc = subprocess.Popen([SSHD, "-D", "-e", "-f", str(config)],
                                        stdin=subprocess.DEVNULL, stdout=stream, stderr=stream)
            procs.append(proc)
            if _wait_listening(proc, port, log):
                break
            _stop(proc)
        else:
            raise RuntimeError(f"sshd did not start: {log.read_text()[-2000:]}")
        known_hosts.write_text(f"[127.0.0.1]:{port} {host_public}\n")
        yield SshdInfo(host="127.0.0.1", port=port, user=user, identity=client_key,
                       known_hosts=known_hosts, workdir=work, log=log)
    finally:
        for proc in procs:
            _stop(proc)
        shutil.rmtree(work, ignore_errors=True)
