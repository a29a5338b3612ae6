"""The snapshot agents: which one can snapshot a disk, and which one made a snapshot.

The agents (:mod:`.tgt_snapshots`, :mod:`.loop_snapshots`, :mod:`.rbd_snapshots`) build on the
snapshot vocabulary of :mod:`.snapshots`; this registry sits above them.
"""

from __future__ import annotations

import logging
from typing import Any

from libvirt_rdm_backup.domain.disks import RawDisk
from libvirt_rdm_backup.errors import RdmBackupError, StorageError
from libvirt_rdm_backup.storage.loop_snapshots import LoopReflinkAgent
from libvirt_rdm_backup.storage.rbd_snapshots import RbdSnapshotAgent
from libvirt_rdm_backup.storage.snapshots import SnapshotAgent, StorageSnapshot, scope_problem
from libvirt_rdm_backup.storage.tgt_snapshots import TgtReflinkAgent

log = logging.getLogger(__name__)


def snapshot_agents() -> list[SnapshotAgent]:
    """Every snapshot agent, in the order :func:`find_snapshot_agent` tries them."""
    return [TgtReflinkAgent(), LoopReflinkAgent(), RbdSnapshotAgent()]


def find_snapshot_agent(disk: RawDisk) -> SnapshotAgent | None:
    """The first agent that can snapshot ``disk``, or None."""
    return next((agent for agent in snapshot_agents() if agent.can_snapshot(disk)), None)


def holds_writes(name: str, disk: RawDisk) -> bool:
    """True when agent ``name``'s snapshot of ``disk`` alone holds every write acknowledged
    before it, so the guest need not be held for it (an ``rbd`` snapshot, see
    :meth:`RbdSnapshotAgent.holds_writes`)."""
    agent = agent_by_name(name)
    return isinstance(agent, RbdSnapshotAgent) and agent.holds_writes(disk)


def agent_by_name(name: str) -> SnapshotAgent:
    """The agent called ``name`` (raises StorageError for an unknown one)."""
    for agent in snapshot_agents():
        if agent.name == name:
            return agent
    raise StorageError(f"unknown snapshot agent {name!r}")


def manifest_snapshot(data: dict[str, Any], disk: RawDisk, repo_id: str, chain: str,
                      backup_id: str) -> tuple[SnapshotAgent, StorageSnapshot] | None:
    """The storage snapshot manifest ``backup_id`` keeps of ``disk``, once proven ours.

    Its name must be one of this repository's chain's names for the disk, and
    its agent must own it (:meth:`SnapshotAgent.owns`). Otherwise a warning
    names the manifest and the disk, and None says: touch nothing, build nothing on it.
    """
    try:
        snap = StorageSnapshot.from_dict(data)
        agent = agent_by_name(snap.agent)
        problem = scope_problem(snap.name, repo_id, chain, disk.target) or agent.owns(disk, snap)
    except RdmBackupError as err:
        problem = err.message
    except (KeyError, TypeError, ValueError) as err:
        problem = f"malformed handle ({err})"
    if problem:
        log.warning("backup %s: the storage snapshot it names for %s is refused and left "
                    "untouched: %s", backup_id, disk.target, problem)
        return None
    return agent, snap
