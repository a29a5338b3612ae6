"""What the commands print: text or one JSON document, sizes, one-line errors, progress."""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from collections.abc import Callable
from typing import Any

from libvirt_rdm_backup.redact import printable, redact

EXIT_OK = 0
EXIT_USAGE = 2
EXIT_FAILED = 4
EXIT_VERIFY = 5


def human_size(value: int | None) -> str:
    if value is None:
        return "?"
    size = float(value)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return str(value)


def emit(args: argparse.Namespace, document: Any, text: Callable[[], str]) -> None:
    if args.json:
        json.dump(document, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:  # names read back (domains, disks, backups) reach the terminal as text only
        sys.stdout.write(printable(text()))


def progress_printer() -> Callable[[str, int, int], None] | None:
    """A one-line progress bar on a terminal: done/total over all jobs, rate and ETA."""
    if not sys.stderr.isatty():
        return None
    started = time.monotonic()
    jobs: dict[str, tuple[int, int]] = {}

    def show(job: str, done: int, total: int) -> None:
        jobs[job] = (done, total)
        all_done = sum(d for d, _ in jobs.values())
        all_total = sum(t for _, t in jobs.values()) or 1
        elapsed = max(time.monotonic() - started, 1e-3)
        rate = all_done / elapsed
        eta = (all_total - all_done) / rate if rate > 0 else 0.0
        width = 30
        filled = int(width * all_done / all_total)
        sys.stderr.write(
            f"\r[{'#' * filled}{'.' * (width - filled)}] {human_size(all_done)} / "
            f"{human_size(all_total)}  {human_size(int(rate))}/s  ETA {eta:4.0f} s ")
        sys.stderr.flush()

    return show


def one_line(text: str) -> str:
    """Errors are one line (messages of tools may hold newlines) and show no URI passwords
    and no control characters."""
    return printable(redact(" ".join(text.split())))


class RedactingFormatter(logging.Formatter):
    """Log lines show no passwords of URIs (libvirt URIs, tool output, QMP traffic)."""

    def format(self, record: logging.LogRecord) -> str:
        return printable(redact(super().format(record)))
