"""One exception tree for the whole library.

Every error a caller can meet derives from :class:`RdmBackupError`; each class
carries the CLI exit code that reports it::

    RdmBackupError              exit 4  (the operation failed)
     ├── UsageError             exit 2  (bad usage or bad input)
     │    └── NotRawDiskError   exit 2  (a disk was named that is not a raw disk)
     ├── NotFoundError          exit 3  (domain, disk or backup not found)
     ├── OperationError         exit 4
     │    ├── LibvirtError      exit 4  (libvirt refused or failed)
     │    ├── QmpError          exit 4  (QEMU refused a QMP command)
     │    ├── CommandError      exit 4  (an external tool failed)
     │    ├── TrackingLostError exit 4  (the level asked for needs tracking that was lost)
     │    ├── StorageError      exit 4  (a storage agent could not map or copy)
     │    └── RepositoryError   exit 4  (the repository is unusable)
     └── VerificationError      exit 5  (stored data does not match its digest)
          └── DamagedBackupError exit 5 (a published backup is damaged: naming it)
"""

from __future__ import annotations

from collections.abc import Sequence


class RdmBackupError(Exception):
    """Root of every error raised by libvirt_rdm_backup."""

    exit_code: int = 4

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class UsageError(RdmBackupError):
    """Bad usage or bad input (exit 2)."""

    exit_code = 2


class NotRawDiskError(UsageError):
    """A disk was selected that is not a raw disk; ``reason`` says why."""

    def __init__(self, disk: str, reason: str) -> None:
        super().__init__(f"disk {disk} is not a raw disk: {reason}")
        self.disk = disk
        self.reason = reason


class NotFoundError(RdmBackupError):
    """A domain, disk or backup does not exist (exit 3)."""

    exit_code = 3


class OperationError(RdmBackupError):
    """The operation was attempted and failed (exit 4)."""

    exit_code = 4


class LibvirtError(OperationError):
    """libvirt refused or failed a call."""


class QmpError(OperationError):
    """QEMU answered a QMP command with an error."""

    def __init__(self, command: str, error_class: str, desc: str) -> None:
        super().__init__(f"QEMU refused {command}: {desc}")
        self.command = command
        self.error_class = error_class
        self.desc = desc


class CommandError(OperationError):
    """An external command failed."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str) -> None:
        tool = argv[0] if argv else "?"
        detail = stderr.strip().splitlines()[-1] if stderr.strip() else f"exit {returncode}"
        super().__init__(f"{tool} failed: {detail}")
        self.argv = list(argv)
        self.returncode = returncode
        self.stderr = stderr


class TrackingLostError(OperationError):
    """The requested level needs dirty tracking that was lost (exit 4, with the reason)."""

    def __init__(self, disk: str, level: str, reason: str) -> None:
        super().__init__(f"no {level} backup of {disk} is possible: {reason}")
        self.disk = disk
        self.level = level
        self.reason = reason


class StorageError(OperationError):
    """A storage agent could not identify, map or read a disk."""


class RepositoryError(OperationError):
    """The backup repository is missing, malformed or not writable."""


class VerificationError(RdmBackupError):
    """Stored data does not match its recorded digest (exit 5)."""

    exit_code = 5


class DamagedBackupError(VerificationError):
    """A published backup is damaged or builds on one that is (exit 5).

    Its manifest is unreadable, or a layer is missing, has the wrong size or does
    not match its digest. ``disk`` is None when the whole backup is affected.
    """

    def __init__(self, backup_id: str, problem: str, disk: str | None = None) -> None:
        where = f"backup {backup_id}" + (f" disk {disk}" if disk else "")
        super().__init__(f"{where}: {problem}")
        self.backup_id = backup_id
        self.disk = disk
        self.problem = problem
