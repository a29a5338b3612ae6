"""The file of a journal (a prune's, a key change's): read bounded and without following a
symlink, written atomically and synced, removed when its work is done. ``what`` names the
journal in error lines ("prune journal")."""

from __future__ import annotations

import json
import os
from typing import Any

from libvirt_rdm_backup.errors import RepositoryError
from libvirt_rdm_backup.fileutil import read_regular, write_atomic


def read_text(path: str, what: str, limit: int) -> str | None:
    """The journal's text (None: there is none); RepositoryError when it cannot be read,
    is over ``limit`` bytes or is not UTF-8."""
    try:
        data = read_regular(path, limit + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise RepositoryError(f"cannot read {what} {path}: {err.strerror}") from err
    if len(data) > limit:
        raise RepositoryError(f"{what} {path} is over {limit} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise RepositoryError(f"{what} {path} is not UTF-8 text") from err


def write_text(path: str, text: str, what: str) -> None:
    """Replace the journal atomically (mode 0600, synced before what it describes changes)."""
    try:
        write_atomic(path, text.encode("utf-8"), mode=0o600)
    except OSError as err:
        raise RepositoryError(f"cannot write the {what}: {err.strerror}") from err


def remove(path: str, what: str) -> None:
    """The journal's work is complete: it goes (already gone is fine)."""
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
    except OSError as err:
        raise RepositoryError(f"cannot remove the {what}: {err.strerror}") from err


def parse(text: str, what: str, format_name: str, version: int) -> dict[str, Any]:
    """The journal's JSON object, once its format and version are the tool's own."""
    try:
        data = json.loads(text)
    except (ValueError, RecursionError) as err:
        raise RepositoryError(f"{what} is not JSON: {err}") from err
    if not isinstance(data, dict) or data.get("format") != format_name:
        raise RepositoryError(f"{what} has an unknown format")
    if data.get("version") != version:
        raise RepositoryError(f"{what} version {data.get('version')!r} is unknown")
    return data
