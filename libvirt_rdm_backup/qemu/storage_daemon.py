"""A private ``qemu-storage-daemon``, driven over QMP with ``qemu.qmp``.

One daemon per operation: it runs the block layer (nodes, exports, jobs) outside
any guest. We listen on a unix socket in a private 0700 directory and the daemon
connects to it (``--chardev socket,server=off``), so there is no waiting for a
socket to appear: the session starts when the daemon is up, or the start fails
when it exits first; the directory is removed once connected. The daemon's argv
holds the socket path only: everything else (credentials objects included) is
created over QMP.

The daemon dies with the tool (``PR_SET_PDEATHSIG``, even when the tool is
killed by SIGKILL: SIGTERM, a clean quit, or SIGKILL for a copy that must stop at
once) and is stopped with ``quit`` when the tool is done with it.
``qemu.qmp`` is asynchronous: a private event loop runs in a thread, and the
methods here are synchronous. :meth:`StorageDaemon.execute` has the shape of
:meth:`~libvirt_rdm_backup.qemu.monitor.Monitor.execute`; jobs and exports are
awaited through QEMU's events (``JOB_STATUS_CHANGE``, ``BLOCK_EXPORT_DELETED``),
not polled.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Coroutine, Sequence
from types import TracebackType
from typing import IO, Any, TypeVar

from qemu.qmp import ExecuteError, Message, QMPClient, QMPError, Runstate

from libvirt_rdm_backup.errors import OperationError, QmpError
from libvirt_rdm_backup.process import die_with_parent, killed_with_parent, require_tool
from libvirt_rdm_backup.qemu.layers import option_value
from libvirt_rdm_backup.qemu.monitor import qmp_timeout
from libvirt_rdm_backup.redact import carries_secret, qmp_arguments

log = logging.getLogger(__name__)

DAEMON = "qemu-storage-daemon"
QUIT_GRACE = 30.0  # seconds the daemon gets to flush and exit after ``quit``
JOB_ENDED = ("concluded", "null")
T = TypeVar("T")


class StorageDaemon:
    """A private ``qemu-storage-daemon`` and the QMP session to it.

    Use as a context manager (or :meth:`start` / :meth:`close`)::

        with StorageDaemon("receive") as daemon:
            daemon.execute("blockdev-add", {...})
    """

    def __init__(self, name: str = "rdmb", pass_fds: Sequence[int] = (),
                 killed_with_tool: bool = False, arguments: Sequence[str] = ()) -> None:
        self.name = name
        self.pass_fds = tuple(pass_fds)  # inherited by the daemon (opened as /dev/fd/N)
        # more command-line options (``--object``, ``--nbd-server``: what QMP cannot do,
        # such as listening on an inherited socket)
        self.arguments = tuple(arguments)
        # SIGKILL instead of SIGTERM (a clean quit) when the tool dies
        self.killed_with_tool = killed_with_tool
        self._dir: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._qmp: QMPClient | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._exited: asyncio.Future[int] | None = None
        self._stderr: IO[bytes] | None = None
        self._stderr_tail = ""

    # -- life ---------------------------------------------------------------------------

    def __enter__(self) -> StorageDaemon:
        return self.start()

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def start(self) -> StorageDaemon:
        """Start the daemon and its QMP session (OperationError when it cannot start)."""
        if self._loop is not None:
            raise OperationError(f"{DAEMON} {self.name} was already started")
        self._dir = tempfile.mkdtemp(prefix="rdmb-qsd-")  # 0700: only we reach the socket
        self._loop = asyncio.new_event_loop()
        # the daemon is forked from this thread, and PR_SET_PDEATHSIG follows the forking
        # thread: it lives until close() (or until the process dies)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True,
                                        name=f"{DAEMON} {self.name}")
        running = threading.Event()
        self._loop.call_soon(running.set)  # the loop is not running yet: no race
        self._thread.start()
        running.wait()  # else a busy host could see the loop not yet running, and give up
        try:
            self._call(self._start(), qmp_timeout(), "start")
        except BaseException:
            self.close()
            raise
        return self

    async def _start(self) -> None:
        assert self._dir is not None
        socket_path = os.path.join(self._dir, "qmp.sock")
        self._qmp = QMPClient(f"{DAEMON} {self.name}")
        await self._qmp.start_server(socket_path)
        stderr_path = os.path.join(self._dir, "stderr")
        self._stderr = open(stderr_path, "w+b")  # noqa: SIM115 - kept until close()
        os.unlink(stderr_path)
        argv = [require_tool(DAEMON),
                "--chardev", f"socket,id=rdmb-qmp,path={option_value(socket_path)},server=off",
                "--monitor", "chardev=rdmb-qmp", *self.arguments]
        log.debug("run: %s", " ".join(argv))
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                stderr=self._stderr, pass_fds=self.pass_fds,
                preexec_fn=killed_with_parent if self.killed_with_tool else die_with_parent)
        except OSError as err:
            raise OperationError(f"cannot start {DAEMON}: {err.strerror}") from err
        self._exited = asyncio.ensure_future(self._proc.wait())
        accepted = asyncio.ensure_future(self._qmp.accept())
        await asyncio.wait({accepted, self._exited}, return_when=asyncio.FIRST_COMPLETED)
        if not accepted.done():
            accepted.cancel()
            with contextlib.suppress(BaseException):
                await accepted
            raise OperationError(f"{DAEMON} exited with status {self._exited.result()} "
                                 f"before it connected{self._why()}")
        accepted.result()
        # connected: nothing of the directory is needed again, nothing is left if we are killed
        shutil.rmtree(self._dir, ignore_errors=True)
        log.debug("%s %s runs as pid %d", DAEMON, self.name, self._proc.pid)

    def close(self, grace: float = QUIT_GRACE) -> None:
        """Stop the daemon: ``quit`` (it flushes and closes every node), killed when it does
        not exit within ``grace`` seconds; then the loop, its thread and the private
        directory."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        try:
            if thread.is_alive():
                with contextlib.suppress(OperationError, concurrent.futures.TimeoutError):
                    self._call(self._quit(grace), 2 * grace + 10, "quit")
        finally:
            if thread.is_alive():
                loop.call_soon_threadsafe(loop.stop)
                thread.join(10)
            if not thread.is_alive():
                loop.close()
            self._loop = self._thread = None
            if self._stderr is not None:
                self._stderr.close()
                self._stderr = None
            if self._dir is not None:
                shutil.rmtree(self._dir, ignore_errors=True)
                self._dir = None

    async def _quit(self, grace: float) -> None:
        qmp, proc, exited = self._qmp, self._proc, self._exited
        if proc is not None and exited is not None and not exited.done():
            if qmp is not None and qmp.runstate == Runstate.RUNNING:
                with contextlib.suppress(QMPError, OSError, EOFError, asyncio.TimeoutError):
                    await asyncio.wait_for(qmp.execute("quit"), grace)
            else:  # no session: SIGTERM quits it as cleanly
                with contextlib.suppress(ProcessLookupError):
                    proc.terminate()
            try:
                await asyncio.wait_for(asyncio.shield(exited), grace)
            except TimeoutError:
                # a short grace is a daemon given up after a failure, which is reported
                (log.warning if grace >= QUIT_GRACE else log.info)(
                    "%s %s did not quit within %g s; killing it", DAEMON, self.name, grace)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await exited
        if qmp is not None:
            with contextlib.suppress(QMPError, OSError, EOFError):
                await qmp.disconnect()

    @property
    def pid(self) -> int | None:
        """The daemon's process id (None before it started)."""
        return None if self._proc is None else self._proc.pid

    def wait(self) -> int:
        """Block until the daemon exits on its own; its exit status (negative: a signal).

        A signal handler of the caller that raises interrupts the wait.
        """
        assert self._exited is not None, "the daemon was not started"
        return self._call(self._wait_exit(), None, "wait")

    async def _wait_exit(self) -> int:
        assert self._exited is not None
        return await asyncio.shield(self._exited)

    # -- QMP ----------------------------------------------------------------------------

    def execute(
        self, command: str, arguments: dict[str, Any] | None = None, files: Sequence[int] = ()
    ) -> Any:
        """Run a QMP command and return its ``return`` value.

        ``files``: at most one open file descriptor, passed along (SCM_RIGHTS) for the
        command to take (``getfd``, ``add-fd``). Raises QmpError when QEMU answers with
        an error, OperationError when the daemon does not answer or is gone.
        """
        if len(files) > 1:
            raise OperationError(f"QMP {command}: one file descriptor per command")
        return self._call(self._execute(command, arguments, files), qmp_timeout(), command)

    async def _execute(self, command: str, arguments: dict[str, Any] | None,
                       files: Sequence[int]) -> Any:
        qmp = self._session()
        log.debug("qsd> %s %s", command, qmp_arguments(command, arguments))
        for fd in files:
            qmp.send_fd_scm(fd)
        # a secret travels: qemu.qmp's own debug log of the raw message stays off meanwhile
        library_log = logging.getLogger("qemu.qmp")
        level = library_log.level
        if carries_secret(command, arguments):
            library_log.setLevel(max(level, logging.INFO))
        try:
            reply = await qmp.execute(command, arguments)
        except ExecuteError as err:
            raise QmpError(command, err.error_class, str(err)) from err
        finally:
            library_log.setLevel(level)
        log.debug("qsd< %s", str(reply)[:2000])
        return reply

    def wait_job(self, job_id: str, timeout: float | None = None) -> None:
        """Wait (on ``JOB_STATUS_CHANGE``) until job ``job_id`` has ended or is gone.

        OperationError when the job ended with an error, or did not end within ``timeout``
        seconds (None: no limit).
        """
        self._call(self._wait_job(job_id), timeout, f"job {job_id}")

    async def _wait_job(self, job_id: str) -> None:
        qmp = self._session()
        with qmp.listener("JOB_STATUS_CHANGE",
                          lambda event: _data(event).get("id") == job_id) as listener:
            status = await self._job_status(job_id)
            while status is not None and status not in JOB_ENDED:
                status = str(_data(await listener.get()).get("status"))
            self._forget_events()
        if status == "concluded":
            error = next((job.get("error") for job in await self._jobs()
                          if job.get("id") == job_id), None)
            if error:
                raise OperationError(f"job {job_id} failed: {error}")

    def watch_job(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        """Job ``job_id``'s ``query-jobs`` entry once its status changes (``JOB_STATUS_CHANGE``)
        or ``timeout`` seconds passed, whichever comes first; at once when it has already
        ended. None when there is no such job."""
        return self._call(self._watch_job(job_id, timeout), timeout + qmp_timeout(),
                          f"the state of job {job_id}")

    async def _watch_job(self, job_id: str, timeout: float) -> dict[str, Any] | None:
        qmp = self._session()
        with qmp.listener("JOB_STATUS_CHANGE",
                          lambda event: _data(event).get("id") == job_id) as listener:
            job = await self._job(job_id)
            if job is not None and job.get("status") not in JOB_ENDED:
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(listener.get(), timeout)
                job = await self._job(job_id)
            self._forget_events()
        return job

    async def _job(self, job_id: str) -> dict[str, Any] | None:
        return next((job for job in await self._jobs() if job.get("id") == job_id), None)

    async def _jobs(self) -> list[dict[str, Any]]:
        jobs = await self._execute("query-jobs", None, ())
        return [job for job in jobs if isinstance(job, dict)] if isinstance(jobs, list) else []

    async def _job_status(self, job_id: str) -> str | None:
        for job in await self._jobs():
            if job.get("id") == job_id:
                return str(job.get("status"))
        return None

    def wait_export_deleted(self, export_id: str, timeout: float | None = None) -> None:
        """Wait (on ``BLOCK_EXPORT_DELETED``) until export ``export_id`` is gone: after
        ``block-export-del`` it lingers while clients still hold it."""
        self._call(self._wait_export_deleted(export_id), timeout, f"export {export_id}")

    async def _wait_export_deleted(self, export_id: str) -> None:
        qmp = self._session()
        with qmp.listener("BLOCK_EXPORT_DELETED",
                          lambda event: _data(event).get("id") == export_id) as listener:
            exports = await self._execute("query-block-exports", None, ())
            if any(isinstance(item, dict) and item.get("id") == export_id
                   for item in exports or ()):
                await listener.get()
            self._forget_events()

    # -- plumbing -----------------------------------------------------------------------

    def _session(self) -> QMPClient:
        if self._qmp is None:
            raise OperationError(f"{DAEMON} {self.name} is not running")
        return self._qmp

    def _forget_events(self) -> None:
        """Drop what the catch-all listener kept: a long-lived daemon must not pile them up."""
        if self._qmp is not None:
            self._qmp.events.clear()

    def _call(self, work: Coroutine[Any, Any, T], timeout: float | None, what: str) -> T:
        """Run ``work`` on the private loop and wait for it; QMP and OS failures become
        OperationError, and so does a ``timeout`` (seconds) that runs out."""
        loop = self._loop
        if loop is None or not loop.is_running():
            work.close()
            raise OperationError(f"{DAEMON} {self.name} is not running")
        future = asyncio.run_coroutine_threadsafe(work, loop)
        try:
            return future.result(timeout)
        except concurrent.futures.TimeoutError as err:
            future.cancel()
            raise OperationError(f"{DAEMON} {self.name}: {what} did not complete within "
                                 f"{timeout:g} s; giving up") from err
        except (QMPError, OSError, EOFError) as err:
            raise OperationError(f"{DAEMON} {self.name}: {what} failed: "
                                 f"{err or type(err).__name__}{self._why()}") from err
        except BaseException:
            future.cancel()
            raise

    def _why(self) -> str:
        """The last line the daemon wrote to stderr, as ``: line`` (empty if none)."""
        if self._stderr is not None:
            with contextlib.suppress(OSError, ValueError):
                size = self._stderr.seek(0, os.SEEK_END)
                self._stderr.seek(max(0, size - 4096))
                lines = self._stderr.read().decode(errors="replace").strip().splitlines()
                if lines:
                    self._stderr_tail = lines[-1]
        return f": {self._stderr_tail}" if self._stderr_tail else ""

    def last_error(self) -> str:
        """The last line the daemon wrote to stderr (empty if none)."""
        return self._why().removeprefix(": ")


def _data(event: Message) -> dict[str, Any]:
    data = event.get("data")
    return data if isinstance(data, dict) else {}
