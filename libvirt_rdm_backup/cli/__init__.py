"""``rdm-backup``: argparse → API → text or ``--json``. Nothing else lives here.

One module per group of commands (:mod:`.disks`, :mod:`.backups`, :mod:`.serving`,
:mod:`.host`), the argument parser (:mod:`.parser`) and what is printed
(:mod:`.output`); :func:`main` runs one command.
"""

from __future__ import annotations

import logging
import signal
import sys
from collections.abc import Sequence

from libvirt_rdm_backup.cli.output import EXIT_FAILED, RedactingFormatter, one_line
from libvirt_rdm_backup.cli.parser import build_parser
from libvirt_rdm_backup.errors import RdmBackupError


def _terminate(signum: int, _frame: object) -> None:
    """SIGTERM unwinds like an interrupt: every cleanup (resume, jobs, nodes) runs."""
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point: run one command, print one line on error, return the exit code."""
    parser = build_parser()
    verbose = 0
    signal.signal(signal.SIGTERM, _terminate)
    try:
        args = parser.parse_args(argv)
        verbose = args.verbose
        handler = logging.StreamHandler()
        handler.setFormatter(RedactingFormatter("rdm-backup: %(levelname)s: %(message)s"))
        logging.basicConfig(
            level=logging.DEBUG if verbose > 1 else logging.INFO if verbose else logging.WARNING,
            handlers=[handler],
        )
        # qemu.qmp's own lines only at -vv: its failures reach the user as our one-line errors
        logging.getLogger("qemu.qmp").setLevel(logging.DEBUG if verbose > 1 else logging.CRITICAL)
        code: int = args.func(args)
        return code
    except RdmBackupError as err:
        sys.stderr.write(f"rdm-backup: error: {one_line(str(err))}\n")
        return err.exit_code
    except KeyboardInterrupt:
        sys.stderr.write("rdm-backup: error: interrupted, the operation did not complete\n")
        return EXIT_FAILED
    except Exception as err:  # noqa: BLE001 - the CLI never shows a traceback
        if verbose:
            raise
        sys.stderr.write(
            f"rdm-backup: internal error: {type(err).__name__}: {one_line(str(err))}\n")
        return EXIT_FAILED
