"""Which exit code of several failed backups a run of many reports: the most severe one.

Most severe first (docs/exit-codes.md): 5 (stored data or the repository is damaged) before 4
(a backup failed) before 3 (something was not found) before 2 (bad usage or input). A code that
is none of these (a backup killed by a signal, a tool that could not start) counts as 4.
"""

from __future__ import annotations

from collections.abc import Iterable

from libvirt_rdm_backup.errors import (
    NotFoundError,
    OperationError,
    UsageError,
    VerificationError,
)

OK = 0
SEVERITY: tuple[int, ...] = (
    VerificationError.exit_code,
    OperationError.exit_code,
    NotFoundError.exit_code,
    UsageError.exit_code,
)


def normalized(code: int) -> int:
    """``code`` when it is one of the tool's exit codes, else 4 (the operation failed)."""
    return code if code == OK or code in SEVERITY else OperationError.exit_code


def most_severe(codes: Iterable[int]) -> int:
    """0 when every code is 0, else the most severe of the failures (see :data:`SEVERITY`)."""
    failed = {normalized(code) for code in codes} - {OK}
    for code in SEVERITY:
        if code in failed:
            return code
    return OK
