"""Section ``prune``: a chain of a full and ``PRUNE_CHAIN`` incrementals of the LUN (``--dirty``
rewritten before each), then ``prune --keep-last 1``: the full stays (the next differential
builds on it), the newest incremental takes in the data of the others.

Reported: the prune's time (the ``api.prune`` call), the bytes QEMU wrote into the kept
layer (its own data before and after, from ``qemu-img map``), and those that had to move:
the data of the dropped layers the kept layer does not hide, or, merged the other way, the
data of the kept layer and the newer dropped ones (the fewer of the two), computed here from
the layers' maps. Goal: bytes moved <= 1.1 x bytes that must move. The newest point is
compared with the LUN before and after.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from libvirt_rdm_backup import api
from libvirt_rdm_backup.qemu import img, layers
from libvirt_rdm_backup.repository.retention import RetentionPolicy
from libvirt_rdm_backup.targets.volume_space import Region, normalize, subtract, total
from tools.bench.common import (
    Lab,
    MiB,
    dirty_offsets,
    goal,
    remove_tree,
    rewrite,
    same_content,
    say,
    settle,
    timed_backup,
)

PRUNE_CHAIN = 20  # incrementals on the full

def own_ranges(path: Path) -> list[Region]:
    """(offset, length) byte ranges a layer holds data for itself (its backing not opened)."""
    node = layers.json_filename(layers.chain_node([layers.file_node(str(path))]))
    return [(e.start, e.length) for e in img.iter_map(node) if e.data and not e.zero]


def section_prune(lab: Lab) -> dict[str, Any]:
    """The chain, the prune, and what moved (see the module)."""
    args = lab.args
    assert lab.dom is not None
    repo = lab.work / "rdmb-prune-repo"
    try:
        settle(args)
        full = timed_backup(lab.name, repo, "full")
        layers_of = [full.image]
        for number in range(PRUNE_CHAIN):
            offsets = dirty_offsets(lab.size, args.dirty, f"rdmb-dirty-prune-{args.seed}-{number}")
            rewrite(lab.dom, offsets, 0x20 + number)
            layers_of.append(timed_backup(lab.name, repo, "incremental").image)
        say(f"prune: a full and {PRUNE_CHAIN} incrementals of {args.dirty:.0%} each")
        own = [own_ranges(path) for path in layers_of]
        kept, dropped = own[-1], [r for layer in own[1:-1] for r in layer]
        up = total(subtract(dropped, kept))
        down = total(normalize([*kept, *(r for layer in own[2:-1] for r in layer)]))
        must = min(up, down)
        started = time.monotonic()
        [(_plan, result)] = api.prune(str(repo), RetentionPolicy(keep_last=1), lab.name)
        seconds = time.monotonic() - started
        [merge] = result.merges
        before = own[-1] if merge.merge.direction == "up" else own[1]
        moved = total(own_ranges(layers_of[-1])) - total(before)
        verified = None if args.no_verify else same_content(lab.device, layers_of[-1],
                                                            "qcow2")
    finally:
        remove_tree(repo)
    say(f"prune: {seconds:.2f} s, {merge.merge.direction}, moved {moved / MiB:.1f} MiB, "
        f"had to move {must / MiB:.1f} MiB")
    return {
        "prune_chain": PRUNE_CHAIN,
        "prune_s": round(seconds, 3),
        "prune_direction": merge.merge.direction,
        "prune_bytes_moved": moved,
        "prune_bytes_reported": result.bytes_moved,
        "prune_bytes_must_move": must,
        "prune_bytes_up": up,
        "prune_bytes_down": down,
        "prune_freed_bytes": result.freed_bytes,
        "prune_moved_ratio": round(moved / must, 4) if must else 1.0,
        "prune_verified_identical": verified,
    }


def print_prune(doc: dict[str, Any]) -> None:
    print(f"== prune: a full and {doc['prune_chain']} incrementals, prune --keep-last 1 "
          f"(the newest takes in the others; {doc['prune_direction']})")
    print(f"  time:                              {doc['prune_s']:8.3f} s")
    print(f"  bytes moved (kept layer's growth): {doc['prune_bytes_moved'] / MiB:8.1f} MiB "
          f"(reported {doc['prune_bytes_reported'] / MiB:.1f} MiB)")
    print(f"  bytes that must move:              {doc['prune_bytes_must_move'] / MiB:8.1f} MiB "
          f"(up {doc['prune_bytes_up'] / MiB:.1f}, down {doc['prune_bytes_down'] / MiB:.1f})")
    print(f"  freed:                             {doc['prune_freed_bytes'] / MiB:8.1f} MiB")
    print(f"  moved / must move:                 {goal(doc, 'prune_moved_ratio')}")
    verified = doc["prune_verified_identical"]
    if verified is not None:
        print(f"  the newest point vs the LUN after the prune: "
              f"{'identical' if verified else 'DIFFERENT'}")
    print()
