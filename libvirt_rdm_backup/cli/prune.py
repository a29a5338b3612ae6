"""``prune``, and the retention options ``backup --prune`` shares with it."""

from __future__ import annotations

import argparse
import re
from typing import Any

from libvirt_rdm_backup import api
from libvirt_rdm_backup.cli.output import EXIT_OK, emit
from libvirt_rdm_backup.engine.prune import PruneResult
from libvirt_rdm_backup.engine.prune_plan import ChainPlan
from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.repository.retention import MAX_COUNT, RULES, RetentionPolicy

KEEP_HELP = {
    "last": "keep the N newest points",
    "hourly": "keep the newest point of each of the last N hours that have one",
    "daily": "keep the newest point of each of the last N days that have one",
    "weekly": "keep the newest point of each of the last N ISO weeks that have one",
    "monthly": "keep the newest point of each of the last N months that have one",
    "yearly": "keep the newest point of each of the last N years that have one",
}


def count(text: str) -> int:
    """A positive whole number of points or periods (argparse type)."""
    if not re.fullmatch(r"[0-9]{1,12}", text) or not 0 < int(text) <= MAX_COUNT:
        raise argparse.ArgumentTypeError(f"not a positive whole number: {text!r}")
    return int(text)


def add_keep_options(parser: argparse.ArgumentParser, after: str) -> None:
    """The ``--keep-*`` options, in the order their rules are applied."""
    for rule in RULES:
        parser.add_argument(f"--keep-{rule}", type=count, metavar="N",
                            help=f"{KEEP_HELP[rule]} {after}")


def retention_policy(args: argparse.Namespace) -> RetentionPolicy | None:
    """The policy the ``--keep-*`` options give (None when none is given)."""
    counts = {rule: getattr(args, f"keep_{rule}") for rule in RULES}
    if all(value is None for value in counts.values()):
        return None
    return RetentionPolicy(**{f"keep_{rule}": value for rule, value in counts.items()})


def backup_retention(args: argparse.Namespace) -> RetentionPolicy | None:
    """``backup``'s ``--prune`` with its ``--keep-*`` options (None: no prune)."""
    policy = retention_policy(args)
    if args.prune and policy is None:
        raise UsageError("backup: --prune needs at least one --keep-* option")
    if policy is not None and not args.prune:
        raise UsageError("backup: --keep-* options need --prune")
    return policy


def _text(plans: list[ChainPlan]) -> str:
    """The dry run as text: per chain, one line per point, oldest first."""
    lines = []
    for plan in plans:
        lines.append(f"chain {plan.chain} of {plan.domain_name} ({plan.domain_uuid}): "
                     f"keep {len(plan.kept)}, drop {len(plan.dropped)}")
        for point in plan.points:
            protected = point.protected and f"protected: {point.protected}"
            why = ", ".join(w for w in (point.rule, protected) if w)
            lines.append(f"{point.action:5} {point.backup_id}  {point.manifest.created}  "
                         f"{point.manifest.level:12} {why}".rstrip())
    return "".join(line + "\n" for line in lines)


def cmd_prune(args: argparse.Namespace) -> int:
    """Decide which points of each chain stay; ``--dry-run`` shows it and changes nothing."""
    if (args.domain is None) == (not args.all):
        raise UsageError("prune: give a DOMAIN or --all" if args.domain is None
                         else "prune: give a DOMAIN or --all, not both")
    policy = retention_policy(args)
    if policy is None:
        raise UsageError("prune: give at least one --keep-* option")
    if args.dry_run:
        plans = api.plan_prune(args.target, policy, args.domain, args.chain)
        emit(args, [plan.to_dict() for plan in plans], lambda: _text(plans))
        return EXIT_OK
    done = api.prune(args.target, policy, args.domain, args.chain,
                     encrypt_key_file=args.encrypt_key_file)
    emit(args, [pruned_dict(plan, result) for plan, result in done],
         lambda: "".join(_text([plan]) + _summary(result) for plan, result in done))
    return EXIT_OK


def pruned_dict(plan: ChainPlan, result: PruneResult) -> dict[str, Any]:
    """A chain of the ``prune --json`` document once pruned: the decisions, and what
    the merges moved and the repository gave back."""
    return {**plan.to_dict(), "dropped": result.dropped, "bytes_moved": result.bytes_moved,
            "freed_bytes": result.freed_bytes,
            "merges": [{"disk": m.merge.disk, "kept": m.merge.kept,
                        "dropped": list(m.merge.dropped), "base": m.merge.base,
                        "direction": m.merge.direction, "bytes_moved": m.bytes_moved}
                       for m in result.merges]}


def _summary(result: PruneResult) -> str:
    return (f"dropped {len(result.dropped)}, merged {len(result.merges)} layer(s): "
            f"{result.bytes_moved} bytes moved, {result.freed_bytes} bytes freed\n")


def cmd_rekey(args: argparse.Namespace) -> int:
    """Change the key of an encrypted file repository or NBD volume (or finish a change
    cut short)."""
    if args.encrypt_key_file is None or args.new_key_file is None:
        raise UsageError("rekey: give --encrypt-key-file OLD and --new-key-file NEW")
    result = api.rekey(args.target, args.encrypt_key_file, args.new_key_file,
                       args.tls_creds)
    emit(args, result.to_dict(),
         lambda: f"{'finished the key change of' if result.resumed else 'changed the key of'} "
                 f"{result.layers} layer(s) of {result.backups} backup(s) in "
                 f"{result.repository}\n")
    return EXIT_OK
