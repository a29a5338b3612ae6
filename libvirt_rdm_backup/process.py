"""Running external tools: argv lists only, never a shell; failures become CommandError."""

from __future__ import annotations

import logging
import shutil
import subprocess
from collections.abc import Sequence

from libvirt_rdm_backup.errors import CommandError, OperationError

log = logging.getLogger(__name__)


def require_tool(name: str) -> str:
    """Absolute path of ``name`` on PATH (raises OperationError when missing)."""
    path = shutil.which(name)
    if path is None:
        raise OperationError(f"required tool {name!r} is not installed")
    return path


def run(
    argv: Sequence[str],
    *,
    check: bool = True,
    timeout: float | None = None,
    input_text: str | None = None,
) -> subprocess.CompletedProcess[str]:
    """Run ``argv`` and capture its text output.

    Raises CommandError when the tool exits non-zero (and ``check`` is set) or
    times out; OperationError when it cannot be started at all.
    """
    log.debug("run: %s", " ".join(argv))
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout,
            input=input_text,
            check=False,
        )
    except FileNotFoundError as err:
        raise OperationError(f"required tool {argv[0]!r} is not installed") from err
    except subprocess.TimeoutExpired as err:
        raise CommandError(argv, -1, f"timed out after {timeout} s") from err
    if check and proc.returncode != 0:
        raise CommandError(argv, proc.returncode, proc.stderr or proc.stdout)
    return proc
