"""The prune journal: what a prune of a domain's points is doing, written before it changes
anything, so that a prune cut short (killed, power lost) is finished by the next command.

``ROOT/<domain-uuid>/.prune-journal.json``::

    {"format": "libvirt-rdm-backup/prune-journal", "version": 1,
     "domain_uuid": ..., "chain": ..., "created": ...,
     "drop": [backup ids],
     "merges": [{"disk": "vdb", "kept": id, "dropped": [ids, newest first],
                 "base": id or null, "direction": "up" | "down"}]}

A merge moves the data of the ``dropped`` points of one disk (the kept point's parent
and its parents, down to ``base``, the next point kept) into the ``kept`` point's layer:
``up`` streams it into the kept layer; ``down`` commits the kept layer and the newer
dropped ones into the oldest dropped layer, which then replaces the kept layer;
``rebase`` (dropped layers another kept point took in already) writes into the kept
layer where it reads differently from ``base``, an older kept point, and backs it by it.

Read back as untrusted input: ids and names must be what the tool writes, and the
caller checks the merges against the manifests before acting on any of it.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass

from libvirt_rdm_backup.errors import RepositoryError, UsageError
from libvirt_rdm_backup.fileutil import read_regular, write_atomic
from libvirt_rdm_backup.repository.ids import check_backup_id, check_safe_name, check_uuid

JOURNAL = ".prune-journal.json"
FORMAT = "libvirt-rdm-backup/prune-journal"
VERSION = 1
MAX_JOURNAL = 4 << 20
DIRECTIONS = ("up", "down", "rebase")


@dataclass(frozen=True)
class Merge:
    """The dropped points of one disk whose data a kept point takes in."""

    disk: str
    kept: str
    dropped: tuple[str, ...]  # the kept point's parent first, down to the one above ``base``
    base: str | None  # the kept point below them (None: the kept point becomes a full copy)
    direction: str  # "up": streamed into the kept layer; "down": committed into the oldest;
    # "rebase": onto ``base``, a kept point that took the dropped layers in


@dataclass(frozen=True)
class Journal:
    """One prune of one chain of one domain."""

    domain_uuid: str
    chain: str
    created: str
    drop: tuple[str, ...]
    merges: tuple[Merge, ...]

    def dumps(self) -> str:
        """The journal as written (JSON, one document)."""
        return json.dumps({"format": FORMAT, "version": VERSION, **asdict(self)},
                          indent=1, sort_keys=True) + "\n"

    @classmethod
    def loads(cls, text: str) -> Journal:
        """Parse and check a journal; RepositoryError on anything the tool would not write."""
        try:
            data = json.loads(text)
        except (ValueError, RecursionError) as err:
            raise RepositoryError(f"prune journal is not JSON: {err}") from err
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise RepositoryError("prune journal has an unknown format")
        if data.get("version") != VERSION:
            raise RepositoryError(f"prune journal version {data.get('version')!r} is unknown")
        try:
            drop = tuple(check_backup_id(str(i)) for i in _list(data.get("drop")))
            journal = cls(
                domain_uuid=check_uuid(str(data.get("domain_uuid"))),
                chain=check_safe_name(str(data.get("chain")), "chain name"),
                created=str(data.get("created"))[:64],
                drop=drop,
                merges=tuple(_merge(m) for m in _list(data.get("merges"))),
            )
        except UsageError as err:
            raise RepositoryError(f"prune journal is malformed: {err}") from err
        _check_consistent(journal)
        return journal


def _list(value: object) -> list[object]:
    if not isinstance(value, list) or len(value) > 100_000:
        raise RepositoryError("prune journal is malformed: a list is missing or too long")
    return value


def _merge(value: object) -> Merge:
    if not isinstance(value, dict):
        raise RepositoryError("prune journal is malformed: a merge is not an object")
    base = value.get("base")
    direction = value.get("direction")
    if direction not in DIRECTIONS:
        raise RepositoryError(f"prune journal is malformed: direction {direction!r}")
    return Merge(
        disk=check_safe_name(str(value.get("disk")), "disk name"),
        kept=check_backup_id(str(value.get("kept"))),
        dropped=tuple(check_backup_id(str(i)) for i in _list(value.get("dropped"))),
        base=None if base is None else check_backup_id(str(base)),
        direction=str(direction),
    )


def _check_consistent(journal: Journal) -> None:
    """Merges take in dropped points only, onto points that stay."""
    dropped = set(journal.drop)
    for merge in journal.merges:
        if not merge.dropped or not set(merge.dropped) <= dropped:
            raise RepositoryError("prune journal is malformed: a merge takes in a point "
                                  "that is not dropped")
        if merge.kept in dropped or (merge.base is not None and merge.base in dropped):
            raise RepositoryError("prune journal is malformed: a merge onto a dropped point")


def journal_path(domain_dir: str) -> str:
    """Where the journal of a domain's prune is kept."""
    return os.path.join(domain_dir, JOURNAL)


def read_journal(domain_dir: str) -> Journal | None:
    """The journal of an unfinished prune of the domain, or None."""
    path = journal_path(domain_dir)
    try:
        data = read_regular(path, MAX_JOURNAL + 1)
    except FileNotFoundError:
        return None
    except OSError as err:
        raise RepositoryError(f"cannot read prune journal {path}: {err.strerror}") from err
    if len(data) > MAX_JOURNAL:
        raise RepositoryError(f"prune journal {path} is over {MAX_JOURNAL} bytes")
    try:
        return Journal.loads(data.decode("utf-8"))
    except UnicodeDecodeError as err:
        raise RepositoryError(f"prune journal {path} is not UTF-8 text") from err


def write_journal(domain_dir: str, journal: Journal) -> None:
    """Write the journal atomically (synced before anything it describes is changed)."""
    try:
        write_atomic(journal_path(domain_dir), journal.dumps().encode("utf-8"))
    except OSError as err:
        raise RepositoryError(f"cannot write the prune journal: {err.strerror}") from err


def remove_journal(domain_dir: str) -> None:
    """The prune is complete: the journal goes."""
    try:
        os.unlink(journal_path(domain_dir))
    except FileNotFoundError:
        pass
    except OSError as err:
        raise RepositoryError(f"cannot remove the prune journal: {err.strerror}") from err
