"""Section ``resync``: a resync backup after a domain restart (QEMU's dirty bitmaps gone)
with 1% rewritten, against a full."""

from __future__ import annotations

import sys
from typing import Any

from libvirt_rdm_backup import modes
from tools.bench.common import (
    Lab,
    MiB,
    Taken,
    dirty_offsets,
    median,
    print_verified,
    remove_tree,
    rewrite,
    same_content,
    say,
    settle,
    timed_backup,
)

RESYNC_UNAVAILABLE = "not measured (level not available)"


def section_resync(lab: Lab) -> dict[str, Any]:
    """RESYNC SECTION: resync after a restart with 1% changed: time / full time, bytes stored.

    Measured only when the library offers ``level="resync"``
    (:class:`libvirt_rdm_backup.modes.Level`): a full backup into a fresh repository,
    the domain destroyed and started again (QEMU's dirty bitmaps are gone), ``--dirty`` of
    the LUN rewritten, then a ``resync`` backup, each after the page-cache drop. Reported:
    resync time / that full's time and the bytes the resync backup takes / rewritten bytes.
    """
    if "resync" not in {level.value for level in modes.Level}:
        print(f"resync: {RESYNC_UNAVAILABLE}", file=sys.stderr, flush=True)
        return {"resync": RESYNC_UNAVAILABLE}
    args = lab.args
    assert lab.dom is not None
    repo = lab.work / "rdmb-resync-repo"
    fulls: list[Taken] = []
    resyncs: list[Taken] = []
    dirty = 0
    verified: bool | None = None
    try:
        for round_no in range(args.repeat):
            settle(args)
            fulls.append(timed_backup(lab.name, repo, "full"))
            lab.dom.destroy()
            lab.dom.create()
            offsets = dirty_offsets(lab.size, args.dirty,
                                    f"rdmb-dirty-resync-{args.seed}-{round_no}")
            dirty = rewrite(lab.dom, offsets, 0x70 + round_no)
            settle(args)
            resyncs.append(timed_backup(lab.name, repo, "resync"))
            say(f"resync round {round_no + 1}/{args.repeat}: full {fulls[-1].seconds:.2f} s, "
                f"resync {resyncs[-1].seconds:.3f} s ({resyncs[-1].level})")
            if round_no == 0 and not args.no_verify:
                verified = same_content(lab.device, resyncs[-1].image, "qcow2")
    finally:
        remove_tree(repo)
    full_s = median([t.seconds for t in fulls])
    resync_s = median([t.seconds for t in resyncs])
    stored = int(median([float(t.stored_bytes) for t in resyncs]))
    return {
        "resync": "measured",
        "resync_level": resyncs[-1].level,
        "resync_dirty_bytes": dirty,
        "resync_full_s": round(full_s, 3),
        "resync_s": round(resync_s, 3),
        "resync_ratio_to_full": round(resync_s / full_s, 4),
        "resync_stored_bytes": stored,
        "resync_stored_ratio_to_dirty": round(stored / dirty, 4),
        "resync_verified_identical": verified,
        "resync_runs_s": {"full": [round(t.seconds, 3) for t in fulls],
                          "resync": [round(t.seconds, 3) for t in resyncs]},
    }


def print_resync(doc: dict[str, Any]) -> None:
    if doc["resync"] != "measured":
        print(f"== resync: {doc['resync']}")
        print()
        return
    print(f"== resync after a domain restart, {doc['resync_dirty_bytes'] / MiB:.2f} MiB "
          f"rewritten (level reported: {doc['resync_level']})")
    print(f"  full {doc['resync_full_s']:.3f} s, resync {doc['resync_s']:.3f} s: "
          f"ratio {doc['resync_ratio_to_full']:.3f}")
    print(f"  stored {doc['resync_stored_bytes'] / MiB:.3f} MiB: ratio to rewritten bytes "
          f"{doc['resync_stored_ratio_to_dirty']:.3f}")
    print_verified(doc, "resync_verified_identical", "chain (full + resync)")
    print()
