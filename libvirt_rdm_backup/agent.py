"""The hypervisor side of remote backups: ``rdm-backup agent``, run by sshd.

A backup server drives the hypervisor through libvirt's remote URI, but some
answers only the hypervisor has: where a raw disk's bytes live (its sysfs, its
tgtd, its view of the iSCSI LUNs). It asks them through OpenSSH::

    ssh -o BatchMode=yes -T [-p PORT] [-i KEY] user@hypervisor rdm-backup agent

with one JSON request on stdin, and reads one JSON line on stdout. On the
hypervisor the key is restricted in ``authorized_keys``::

    command="/usr/local/bin/rdm-backup agent",restrict ssh-ed25519 AAAA... backup-server

so it runs this and nothing else; sshd puts the client's own command into
``SSH_ORIGINAL_COMMAND``, which is ignored: the request is on stdin.

Requests and answers (see docs/remote-backups.md)::

    {"op": "version"}              -> {"ok": true, "version": "0.1.0", "protocol": 1,
                                       "ops": ["map", "version"]}
    {"op": "map", "disk": {...}}   -> {"ok": true, "mapping": {...}}
    (the disk is RawDisk.to_dict(), the mapping RawDiskMapping.to_dict())
    any failure                    -> {"ok": false, "error": "one line",
                                       "error_class": "StorageError", "exit_code": 4}

The request is untrusted: at most :data:`MAX_REQUEST` bytes, read within
``RDM_BACKUP_AGENT_TIMEOUT`` seconds (default 30), strict JSON, every field of
the disk checked for its type and length, and only a block device or an iSCSI LUN
of a domain on this host is looked up (:mod:`.agent_admission`). The answer is
always one JSON line, never a traceback; the exit status is the answer's
``exit_code`` (0 when ``ok``; 2 for a request that is malformed or refused).
"""

from __future__ import annotations

import io
import json
import logging
import os
import re
import select
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import IO, Any

from libvirt_rdm_backup import __version__
from libvirt_rdm_backup.agent_admission import IscsiSources, admit, domain_iscsi_sources
from libvirt_rdm_backup.domain.disks import IscsiSource, RawDisk, SourceKind
from libvirt_rdm_backup.errors import OperationError, RdmBackupError, UsageError
from libvirt_rdm_backup.process import env_seconds
from libvirt_rdm_backup.storage import map_disk
from libvirt_rdm_backup.storage.base import StorageAgent

log = logging.getLogger(__name__)

PROTOCOL = 1
MAX_REQUEST = 1 << 20  # bytes of JSON read from stdin, at most
MAX_STRING = 4096  # characters of any string field of a disk
TIMEOUT_ENV = "RDM_BACKUP_AGENT_TIMEOUT"
DEFAULT_TIMEOUT = 30.0  # seconds the whole request may take to arrive
ANSWER_FACTOR = 10  # the answer is due within this many times that
OPS = ("map", "version")
EXIT_OK = 0

_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_TOKEN_RE = re.compile(r"^[A-Za-z0-9_.:+-]{1,256}$")
_HCTL_RE = re.compile(r"^(?:scsi_host)?\d+:\d+:\d+:\d+$")
_HOST_RE = re.compile(r"^[A-Za-z0-9._:\[\]-]{1,255}$")
_IQN_RE = re.compile(r"^[A-Za-z0-9._:-]{1,223}$")
_OPTIONAL_STRINGS = ("bus", "alias", "serial", "wwn", "source_path", "driver_type", "pool",
                     "volume", "node_name")


class _Unparsable(UsageError):
    """The request is not a JSON object of at most MAX_REQUEST bytes (exit status 2)."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _error(err: BaseException) -> dict[str, Any]:
    """The answer for a failure: one line, the error class and its exit code."""
    if isinstance(err, RdmBackupError):
        return {"ok": False, "error": _one_line(str(err)) or type(err).__name__,
                "error_class": "UsageError" if isinstance(err, _Unparsable)
                else type(err).__name__, "exit_code": err.exit_code}
    return {"ok": False, "error": _one_line(f"internal error: {type(err).__name__}: {err}"),
            "error_class": "OperationError", "exit_code": 4}


# -- validation of the untrusted disk -------------------------------------------------


def _string(data: dict[str, Any], key: str, *, required: bool = False) -> str | None:
    value = data.get(key)
    if value is None:
        if required:
            raise UsageError(f"malformed disk: {key} is missing")
        return None
    if not isinstance(value, str):
        raise UsageError(f"malformed disk: {key} is not a string")
    if len(value) > MAX_STRING or _CONTROL_RE.search(value):
        raise UsageError(f"malformed disk: {key} is too long or has control characters")
    if required and not value:
        raise UsageError(f"malformed disk: {key} is empty")
    return value


def _integer(value: Any, key: str, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise UsageError(f"malformed disk: {key} is not an integer in [{low}, {high}]")
    return value


def _iscsi(value: Any) -> IscsiSource | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"host", "port", "iqn", "lun"}:
        raise UsageError("malformed disk: iscsi must have exactly host, port, iqn and lun")
    host, iqn = value["host"], value["iqn"]
    if not isinstance(host, str) or not _HOST_RE.fullmatch(host) or host.startswith("-"):
        raise UsageError("malformed disk: iscsi.host is not a host name or address")
    if not isinstance(iqn, str) or not _IQN_RE.fullmatch(iqn):
        raise UsageError("malformed disk: iscsi.iqn is not an iSCSI name")
    return IscsiSource(host=host, port=_integer(value["port"], "iscsi.port", 1, 65535),
                       iqn=iqn, lun=_integer(value["lun"], "iscsi.lun", 0, 65535))


def disk_from_request(data: Any) -> RawDisk:
    """The :class:`RawDisk` a request names, checked field by field (UsageError if not).

    Accepts what :meth:`RawDisk.to_dict` writes; unknown keys are ignored, as
    :meth:`RawDisk.from_dict` does.
    """
    if not isinstance(data, dict):
        raise UsageError("malformed disk: not a JSON object")
    if len(data) > 64:
        raise UsageError("malformed disk: too many keys")
    strings = {key: _string(data, key) for key in _OPTIONAL_STRINGS}
    target = _string(data, "target", required=True)
    device = _string(data, "device", required=True)
    kind = _string(data, "source_kind", required=True)
    assert target is not None and device is not None and kind is not None
    if not _TOKEN_RE.fullmatch(target):
        raise UsageError("malformed disk: target is not a device name")
    if not _TOKEN_RE.fullmatch(device):
        raise UsageError("malformed disk: device is not a device kind")
    if kind not in {str(k) for k in SourceKind}:
        raise UsageError(f"malformed disk: unknown source_kind {kind[:64]!r}")
    path = strings["source_path"]
    if path is not None and not (path.startswith("/") or _HCTL_RE.fullmatch(path)):
        raise UsageError("malformed disk: source_path is neither an absolute path nor H:B:T:L")
    readonly = data.get("readonly", False)
    if not isinstance(readonly, bool):
        raise UsageError("malformed disk: readonly is not a boolean")
    size = data.get("size")
    if size is not None:
        size = _integer(size, "size", 0, 1 << 63)
    iscsi = _iscsi(data.get("iscsi"))
    if kind == SourceKind.ISCSI and iscsi is None:
        raise UsageError("malformed disk: an iscsi disk without its iscsi source")
    try:
        return RawDisk.from_dict({
            **strings, "target": target, "device": device, "source_kind": kind,
            "readonly": readonly, "size": size,
            "iscsi": None if iscsi is None else {"host": iscsi.host, "port": iscsi.port,
                                                 "iqn": iscsi.iqn, "lun": iscsi.lun}})
    except (KeyError, TypeError, ValueError) as err:
        raise UsageError(f"malformed disk: {_one_line(str(err))[:200]}") from err


# -- requests -------------------------------------------------------------------------


def handle(request: Any, agents: Sequence[StorageAgent] | None = None,
           sources: IscsiSources = domain_iscsi_sources) -> dict[str, Any]:
    """The answer to one request (a parsed JSON value); never raises for bad requests.

    ``agents``: the mapping agents to try (default: :func:`storage.default_agents`);
    ``sources``: the iSCSI sources of this host's domains (default: asked of libvirt).
    """
    try:
        if not isinstance(request, dict):
            raise UsageError("the request is not a JSON object")
        op = request.get("op")
        if not isinstance(op, str):
            raise UsageError("the request has no op")
        if op == "version":
            return {"ok": True, "version": __version__, "protocol": PROTOCOL, "ops": list(OPS)}
        if op == "map":
            if "disk" not in request:
                raise UsageError("map: the request has no disk")
            disk = disk_from_request(request["disk"])
            admit(disk, sources)
            log.info("map: disk %s (%s)", disk.target, disk.source or "no source")
            return {"ok": True, "mapping": map_disk(disk, agents).to_dict()}
        raise UsageError(f"unknown op {op[:64]!r} (one of {', '.join(OPS)})")
    except Exception as err:  # noqa: BLE001 - every failure becomes an answer
        if not isinstance(err, RdmBackupError):
            log.debug("agent request failed", exc_info=True)
        return _error(err)


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_request(raw: bytes | str) -> Any:
    """The JSON value of a request (raises :class:`UsageError` when it is not one)."""
    if len(raw) > MAX_REQUEST:
        raise _Unparsable(f"the request is larger than {MAX_REQUEST} bytes")
    if not raw.strip():
        raise _Unparsable("empty request: one JSON object is expected on stdin")
    try:
        text = raw.decode("utf-8") if isinstance(raw, bytes) else raw
        value = json.loads(text, parse_constant=_no_constant)
    except RecursionError as err:
        raise _Unparsable("the request is not JSON: nested too deeply") from err
    except ValueError as err:  # JSONDecodeError, UnicodeDecodeError, huge integers
        raise _Unparsable(f"the request is not JSON: {_one_line(str(err))[:200]}") from err
    if not isinstance(value, dict):
        raise _Unparsable("the request is not a JSON object")
    return value


def _fileno(stream: IO[Any]) -> int | None:
    try:
        return stream.fileno()
    except (OSError, ValueError, AttributeError):  # io.UnsupportedOperation is an OSError
        return None


def _read_fd(fd: int, timeout: float) -> bytes:
    """At most MAX_REQUEST + 1 bytes up to end of input, all within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    chunks: list[bytes] = []
    size = 0
    while size <= MAX_REQUEST:
        left = deadline - time.monotonic()
        if left <= 0 or not select.select([fd], [], [], left)[0]:
            raise _Unparsable(f"no complete request within {timeout:g} s")
        chunk = os.read(fd, min(1 << 16, MAX_REQUEST + 1 - size))
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    return b"".join(chunks)


def _read_request(stdin: IO[bytes] | IO[str], timeout: float) -> bytes | str:
    """At most MAX_REQUEST + 1 bytes (or characters) up to end of input.

    A binary stream with a file descriptor is read within ``timeout`` seconds;
    other streams (in memory) as they come.
    """
    fd = _fileno(stdin)
    if fd is not None and not isinstance(stdin, io.TextIOBase):
        return _read_fd(fd, timeout)
    chunks: list[Any] = []
    size = 0
    while size <= MAX_REQUEST:
        chunk = stdin.read(MAX_REQUEST + 1 - size)
        if not chunk:
            break
        chunks.append(chunk)
        size += len(chunk)
    if not chunks:
        return b""
    return b"".join(chunks) if isinstance(chunks[0], bytes) else "".join(chunks)


@contextmanager
def _protected_stdout() -> Iterator[IO[str]]:
    """The real stdout for the answer; file descriptor 1 points at stderr meanwhile.

    Storage tools and C libraries must not corrupt the one-line answer with their
    own output: while the request is handled, whatever they (or ``print``) write to
    stdout goes to stderr (which ssh hands to the client separately).
    """
    sys.stdout.flush()
    python_stdout = sys.stdout
    saved = os.dup(1)
    try:
        os.dup2(2, 1)
        sys.stdout = sys.stderr
        with os.fdopen(os.dup(saved), "w", encoding="utf-8", closefd=True) as answer:
            yield answer
    finally:
        sys.stdout = python_stdout
        os.dup2(saved, 1)
        os.close(saved)


class _AnswerLine:
    """The one answer line, written once: by the request, or by the watchdog."""

    def __init__(self, stdout: IO[str]) -> None:
        self._stdout = stdout
        self._lock = threading.Lock()
        self._sent = False

    def send(self, answer: dict[str, Any]) -> bool:
        """Write ``answer`` unless an answer was written already."""
        with self._lock:
            if self._sent:
                return False
            self._sent = True
            self._stdout.write(json.dumps(answer, separators=(",", ":")) + "\n")
            self._stdout.flush()
            return True


@contextmanager
def _watchdog(line: _AnswerLine, seconds: float) -> Iterator[None]:
    """End the process with a one-line failure when the request overruns ``seconds``.

    A storage tool or libvirt that never answers cannot hold the agent forever; its
    children have timeouts of their own.
    """
    def expire() -> None:
        failure = OperationError(f"the request was not answered within {seconds:g} s")
        if line.send(_error(failure)):
            os._exit(failure.exit_code)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()
    try:
        yield
    finally:
        timer.cancel()


def serve(stdin: IO[bytes] | IO[str], stdout: IO[str],
          agents: Sequence[StorageAgent] | None = None,
          sources: IscsiSources = domain_iscsi_sources, *, watchdog: bool = False) -> int:
    """Read one request from ``stdin``, write one JSON line to ``stdout``; the exit status.

    The exit status is the answer's ``exit_code`` (0 when it is ``ok``). The request
    must arrive within ``RDM_BACKUP_AGENT_TIMEOUT`` seconds; with ``watchdog`` (the
    agent process) the process ends with a failure answer when the answer is not
    ready within ANSWER_FACTOR times that.
    """
    if "SSH_ORIGINAL_COMMAND" in os.environ:  # a forced command: the request is on stdin
        log.debug("ignoring the client's command (SSH_ORIGINAL_COMMAND)")
    timeout = env_seconds(TIMEOUT_ENV, DEFAULT_TIMEOUT)
    line = _AnswerLine(stdout)
    with _watchdog(line, timeout * ANSWER_FACTOR) if watchdog else nullcontext():
        try:
            request = parse_request(_read_request(stdin, timeout))
        except (RdmBackupError, OSError) as err:
            answer = _error(err if isinstance(err, RdmBackupError)
                            else _Unparsable(f"cannot read the request: {err}"))
        else:
            answer = handle(request, agents, sources)
        line.send(answer)
    code = answer.get("exit_code", EXIT_OK)
    return code if isinstance(code, int) else EXIT_OK


def main(stdin: IO[bytes] | IO[str] | None = None, stdout: IO[str] | None = None) -> int:
    """``rdm-backup agent``: one request on stdin, one JSON line on stdout.

    Without arguments it serves the process's own stdin and stdout, with file
    descriptor 1 sent to stderr while the request is handled.
    """
    if stdin is None:
        stdin = sys.stdin.buffer
    if stdout is not None:
        return serve(stdin, stdout)
    with _protected_stdout() as answer:
        return serve(stdin, answer, watchdog=True)


if __name__ == "__main__":
    sys.exit(main())
