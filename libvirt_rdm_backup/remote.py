"""The backup-server side of remote backups: asking the hypervisor's agent over SSH.

What libvirt's remote URI cannot answer (where a raw disk's bytes live on the
hypervisor) comes from ``rdm-backup agent`` on the hypervisor (:mod:`.agent`),
reached with the system's OpenSSH client::

    agent = SshAgent("ssh://root@hv1.example.com:22", identity="/etc/rdm-backup/agent_key",
                     known_hosts="/etc/rdm-backup/known_hosts")
    mapping = agent.map_disk(disk)     # the RawDiskMapping, computed on hv1

Authentication is SSH's: a key the hypervisor's ``authorized_keys`` restricts
to ``command="rdm-backup agent",restrict``, and the hypervisor's host key,
checked strictly (never accepted on first use). No new listener anywhere.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import re
import selectors
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.errors import (
    LibvirtError,
    NotFoundError,
    OperationError,
    RdmBackupError,
    RepositoryError,
    StorageError,
    UsageError,
    VerificationError,
)
from libvirt_rdm_backup.storage.base import RawDiskMapping

log = logging.getLogger(__name__)

DEFAULT_COMMAND = ("rdm-backup", "agent")
MAX_ANSWER = 4 << 20  # bytes of stdout accepted from the agent (a mapping is a few KiB)
MAX_STDERR = 64 << 10  # bytes of ssh's stderr kept (the last ones)
_CHUNK = 1 << 16
_URI_RE = re.compile(
    r"^ssh://(?:(?P<user>[A-Za-z0-9_][A-Za-z0-9._-]{0,31})@)?"
    r"(?P<host>\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9.-]+)(?::(?P<port>[0-9]{1,5}))?/?$")
_LABEL_RE = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
# error classes an answer may name whose constructor takes the message alone
_ERRORS: dict[str, type[RdmBackupError]] = {
    cls.__name__: cls for cls in (UsageError, NotFoundError, OperationError, LibvirtError,
                                  StorageError, RepositoryError, VerificationError)}
_BY_EXIT = {2: UsageError, 3: NotFoundError, 5: VerificationError}


@dataclass(frozen=True)
class AgentAddress:
    """Where the hypervisor's agent is reached: ``ssh://[user@]host[:port]``."""

    host: str  # a host name, an IPv4 address or an IPv6 address (without brackets)
    user: str | None = None
    port: int | None = None

    @property
    def uri(self) -> str:
        """The canonical ``ssh://`` form."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        user = f"{self.user}@" if self.user else ""
        port = f":{self.port}" if self.port is not None else ""
        return f"ssh://{user}{host}{port}"


def _check_host(host: str) -> str:
    if host.startswith("["):
        try:
            return str(ipaddress.IPv6Address(host[1:-1]))
        except ValueError as err:
            raise UsageError(f"invalid IPv6 address {host}") from err
    if re.fullmatch(r"[0-9.]+", host):
        try:
            return str(ipaddress.IPv4Address(host))
        except ValueError as err:
            raise UsageError(f"invalid IPv4 address {host}") from err
    name = host.removesuffix(".")
    if len(name) > 253 or not all(_LABEL_RE.fullmatch(label) for label in name.split(".")):
        raise UsageError(f"invalid host name {host!r}")
    return host


def parse_agent_uri(text: str) -> AgentAddress:
    """``ssh://[user@]host[:port]`` (raises UsageError for anything else).

    No password, path, query or fragment; a host name, an IPv4 address or a
    bracketed IPv6 address; a port in 1..65535.
    """
    match = _URI_RE.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise UsageError(f"invalid agent address {str(text)[:200]!r}: want "
                         "ssh://[user@]host[:port]")
    host = _check_host(match["host"])
    port = None
    if match["port"] is not None:
        port = int(match["port"])
        if not 1 <= port <= 65535:
            raise UsageError(f"invalid agent address {text!r}: port {port} is out of range")
    return AgentAddress(host=host, user=match["user"], port=port)


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return " ".join(lines[-1].split())[:500] if lines else ""


@dataclass(frozen=True)
class _Exchange:
    """What one ssh run gave: its exit status, stdout (at most MAX_ANSWER bytes), stderr."""

    returncode: int
    stdout: bytes
    stderr: str


def _exchange(argv: list[str], data: bytes, timeout: float, where: str) -> _Exchange:
    """Run ``argv`` with ``data`` on stdin; its output read as it comes, bounded.

    Raises OperationError when the tool cannot start, does not finish within
    ``timeout`` seconds, or writes more than MAX_ANSWER bytes to stdout (it is
    killed then, its output not read further).
    """
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE)
    except FileNotFoundError as err:
        raise OperationError(f"required tool {argv[0]!r} is not installed") from err
    except OSError as err:
        raise OperationError(f"cannot run {argv[0]}: {err.strerror}") from err
    assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
    deadline = time.monotonic() + timeout
    out, diag = bytearray(), bytearray()
    pending = memoryview(data)
    with selectors.DefaultSelector() as selector:
        try:
            os.set_blocking(proc.stdin.fileno(), False)
            selector.register(proc.stdin, selectors.EVENT_WRITE)
            selector.register(proc.stdout, selectors.EVENT_READ)
            selector.register(proc.stderr, selectors.EVENT_READ)
            while selector.get_map():
                left = deadline - time.monotonic()
                if left <= 0:
                    raise OperationError(f"{where} did not answer within {timeout:g} s")
                for key, _events in selector.select(left):
                    if key.fileobj is proc.stdin:
                        try:
                            pending = pending[os.write(key.fd, pending[:_CHUNK]):]
                        except BlockingIOError:
                            continue
                        except BrokenPipeError:
                            pending = pending[:0]
                        if not pending:
                            selector.unregister(proc.stdin)
                            proc.stdin.close()
                        continue
                    chunk = os.read(key.fd, _CHUNK)
                    if not chunk:
                        selector.unregister(key.fileobj)
                    elif key.fileobj is proc.stdout:
                        out += chunk
                        if len(out) > MAX_ANSWER:
                            raise OperationError(f"{where} sent an answer larger than "
                                                 f"{MAX_ANSWER} bytes")
                    else:
                        diag = (diag + chunk)[-MAX_STDERR:]
            returncode = proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired as timed_out:
            raise OperationError(f"{where} did not answer within {timeout:g} s") from timed_out
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for stream in (proc.stdin, proc.stdout, proc.stderr):
                stream.close()
    return _Exchange(returncode, bytes(out), diag.decode("utf-8", "replace"))


class SshAgent:
    """The agent of one hypervisor, asked through ``ssh`` (one connection per request).

    ``identity``: the private key file (passed to ssh with ``-i``; never read
    here). ``known_hosts``: the file with the hypervisor's host key (default:
    ssh's own, ``~/.ssh/known_hosts``); the host key is always checked strictly.
    ``timeout``: seconds a request may take, connection included. ``command``:
    the remote command (a forced command in ``authorized_keys`` overrides it).
    ``ssh``: the ssh client (default: ``ssh`` on PATH).
    """

    def __init__(self, uri: str, identity: str | None = None, known_hosts: str | None = None,
                 timeout: float = 60, *, command: Sequence[str] = DEFAULT_COMMAND,
                 ssh: str | None = None) -> None:
        self.address = parse_agent_uri(uri)
        if not timeout > 0:
            raise UsageError("the agent timeout must be a positive number of seconds")
        for what, path in (("identity file", identity), ("known hosts file", known_hosts)):
            if path is not None and not os.path.isfile(path):
                raise UsageError(f"{what} {path} does not exist")
        if not command or any(not arg or "\n" in arg for arg in command):
            raise UsageError("the agent command must be non-empty words")
        self.identity = identity
        self.known_hosts = known_hosts
        self.timeout = float(timeout)
        self.command = tuple(command)
        self.ssh = ssh

    @property
    def uri(self) -> str:
        """The agent's address, ``ssh://[user@]host[:port]``."""
        return self.address.uri

    def argv(self) -> list[str]:
        """The ssh command line (an argv list; it names the identity file, never its key)."""
        ssh = self.ssh or shutil.which("ssh")
        if ssh is None:
            raise OperationError("required tool 'ssh' is not installed (openssh-client)")
        connect = max(1, min(int(self.timeout), 30))
        argv = [ssh, "-T", "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
                "-o", f"ConnectTimeout={connect}", "-o", "LogLevel=ERROR"]
        if self.known_hosts is not None:
            argv += ["-o", f"UserKnownHostsFile={self.known_hosts}",
                     "-o", "GlobalKnownHostsFile=/dev/null"]
        if self.identity is not None:
            argv += ["-i", self.identity, "-o", "IdentitiesOnly=yes"]
        if self.address.port is not None:
            argv += ["-p", str(self.address.port)]
        if self.address.user is not None:
            argv += ["-l", self.address.user]
        return [*argv, "--", self.address.host, *self.command]

    def request(self, payload: dict[str, Any]) -> dict[str, Any]:
        """Send one request, return the agent's answer (``ok`` is true).

        Raises OperationError (one line) when ssh fails, times out or the answer
        is malformed; an answer with ``ok: false`` raises the project error class
        it names (UsageError, NotFoundError, StorageError, ...), else the class of
        its exit code, else OperationError, with the agent's message.
        """
        where = f"agent {self.uri}"
        proc = _exchange(self.argv(), json.dumps(payload).encode(), self.timeout, where)
        if proc.returncode == 255:  # ssh itself: connection, host key, authentication
            detail = _last_line(proc.stderr) or "exit 255"
            raise OperationError(f"ssh to {self.uri} failed: {detail}")
        if not proc.stdout.strip():
            detail = _last_line(proc.stderr) or f"exit {proc.returncode}"
            raise OperationError(f"{where} gave no answer: {detail}")
        answer = _parse_answer(proc.stdout, where)
        if answer.get("ok") is True:
            return answer
        message = answer.get("error")
        message = " ".join(message.split())[:1000] if isinstance(message, str) else "failed"
        code = answer.get("exit_code")
        cls = _ERRORS.get(str(answer.get("error_class")))
        if cls is None:
            cls = _BY_EXIT.get(code, OperationError) if isinstance(code, int) else OperationError
        raise cls(f"{where}: {message}")

    def version(self) -> dict[str, Any]:
        """The agent's version answer (``version``, ``protocol``, ``ops``)."""
        return self.request({"op": "version"})

    def map_disk(self, disk: RawDisk) -> RawDiskMapping:
        """The raw disk mapping of ``disk``, computed on the hypervisor.

        Raises what :meth:`request` raises; StorageError when the hypervisor
        cannot map the disk; OperationError for an answer that is not the
        mapping of this disk.
        """
        answer = self.request({"op": "map", "disk": disk.to_dict()})
        try:
            mapping = RawDiskMapping.from_dict(answer["mapping"])
        except (KeyError, TypeError, ValueError, AttributeError, RecursionError) as err:
            raise OperationError(f"agent {self.uri} sent a malformed mapping of "
                                 f"{disk.target}: {' '.join(str(err).split())[:200]}") from err
        if mapping.disk != disk.target:
            raise OperationError(f"agent {self.uri} sent the mapping of {mapping.disk[:64]!r} "
                                 f"for disk {disk.target}")
        return mapping


def _parse_answer(stdout: bytes, where: str) -> dict[str, Any]:
    """The answer: the last line of stdout, a JSON object with a boolean ``ok``.

    Raises OperationError (one line) for anything else: bytes that are not UTF-8,
    a line that is not JSON, JSON that is not an answer.
    """
    try:
        text = stdout.decode("utf-8")
    except UnicodeDecodeError as err:
        raise OperationError(f"{where} sent an answer that is not UTF-8 "
                             f"(byte {err.start})") from err
    lines = [line for line in text.splitlines() if line.strip()]
    try:
        answer = json.loads(lines[-1] if lines else "")
    except (ValueError, RecursionError) as err:
        raise OperationError(f"{where} sent an answer that is not JSON: "
                             f"{' '.join(str(err).split())[:200]}") from err
    if not isinstance(answer, dict) or not isinstance(answer.get("ok"), bool):
        raise OperationError(f"{where} sent an answer that is not a JSON object with "
                             "a boolean 'ok'")
    return answer
