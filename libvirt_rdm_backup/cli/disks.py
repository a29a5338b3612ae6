"""``disks`` and ``map``: a domain's disks, and how its raw disks map to storage."""

from __future__ import annotations

import argparse
import json

from libvirt_rdm_backup import api
from libvirt_rdm_backup.cli.output import EXIT_OK, emit, human_size


def cmd_disks(args: argparse.Namespace) -> int:
    """List raw disks (with identifiers and mapping) and the disks that are not raw."""
    report = api.describe(args.domain, args.connect)
    inventory, mappings = report.inventory, report.mappings
    document = {
        "domain_name": inventory.domain_name,
        "domain_uuid": inventory.domain_uuid,
        "running": inventory.running,
        "raw_disks": [
            {**d.to_dict(),
             "mapping": m.to_dict() if (m := mappings.get(d.target)) else None,
             "mapping_error": report.mapping_errors.get(d.target),
             "paused_copy": report.paused_copies.get(d.target)}
            for d in inventory.raw
        ],
        "other_disks": [d.to_dict() for d in inventory.other],
    }

    def text() -> str:
        lines = [f"domain {inventory.domain_name} ({inventory.domain_uuid}), "
                 f"{'running' if inventory.running else 'shut off'}"]
        for d in inventory.raw:
            lines.append(
                f"  {d.target:8} raw  {d.source_kind}/{d.device:4} {human_size(d.size):>10}  "
                f"{d.source}" + (f"  serial={d.serial}" if d.serial else "")
            )
            mapping = mappings.get(d.target)
            if d.target in report.mapping_errors:
                lines.append(f"           -> no mapping: {report.mapping_errors[d.target]}")
            if d.target in report.paused_copies:
                lines.append(f"           -> copied while the guest is paused: "
                             f"{report.paused_copies[d.target]}")
            if mapping is not None:
                for node, offset, length in mapping.root.leaves():
                    lines.append(f"           -> {node.kind} {node.path or node.name} "
                                 f"offset {offset} length {length}")
        for o in inventory.other:
            lines.append(f"  {o.target:8} not raw: {o.reason}")
        return "\n".join(lines) + "\n"

    emit(args, document, text)
    return EXIT_OK


def cmd_map(args: argparse.Namespace) -> int:
    """Print the raw disk mapping documents."""
    mappings = api.map_disks(args.domain, args.disk or None, args.connect)
    document = [m.to_dict() for m in mappings]
    emit(args, document, lambda: json.dumps(document, indent=2) + "\n")
    return EXIT_OK
