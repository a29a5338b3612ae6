"""Section ``atrest``: backups at rest, compressed (``compress="zstd"``, ``"zlib"``) and
encrypted (``encrypt_key_file=``), against a plain full backup and ``zstd -T0``.

A LUN of its own: a file of ``--size-mib`` whose ``--fill`` holds compressible text in
scattered ``--extent-mib`` extents (lines of this repository's Python sources and Markdown
documents, drawn at random, so no extent repeats another), zeros elsewhere (holes with
``--sparse``); a loop device over it is ``vdb`` of a firmware-only domain. A key file of
random UTF-8 text (mode 0600) for the encrypted backups. Then ``--repeat`` rounds in an
order rotated per round, each measured after the page-cache drop, into a fresh repository
(or output file) each:

- ``atrest_plain_s``: :func:`api.backup` of vdb, ``level="full"`` (the whole call);
- ``atrest_zstd_s``, ``atrest_zlib_s``: the same with ``compress="zstd"`` / ``"zlib"``;
- ``atrest_encrypted_s``: the same with ``encrypt_key_file=KEY``;
- ``atrest_zstd_cli_s``: ``zstd -T0 -q -f -o OUT /dev/loopX`` (level 3, every core; ``-f``
  lets it read a block device) reading the device itself, timed as the whole command.

Reported: the time and the bytes each result takes on disk (``st_blocks`` of the repository
or of ``OUT``), and the ratios: compressed stored / plain stored, zstd in the repository /
``zstd -T0``, compressed time / plain time, encrypted time / plain time (goal <= 1.3). As
context, ``atrest_luks_create_s``: ``qemu-img create`` of one empty layer with the tool's LUKS
options (QEMU 7.2 runs its PBKDF2 benchmark twice per new LUKS header, ~2.5 s of CPU here
whatever the iteration time), and ``atrest_encrypted_floor_ratio``: (plain + that) / plain, the
ratio an encrypted full could reach if encrypting the data cost nothing. Unless
``--no-verify``, the first round's results are restored (:func:`api.restore` to a file, or
``zstd -d``) and compared with the LUN (``qemu-img compare``).
"""

from __future__ import annotations

import argparse
import os
import random
import secrets
import subprocess
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from libvirt_rdm_backup import api
from libvirt_rdm_backup.qemu.layer_format import LayerFormat
from libvirt_rdm_backup.qemu.secrets import SECRET_ID
from tools.bench.common import (
    DISK,
    Lab,
    MiB,
    allocated_bytes,
    data_extents,
    goal,
    median,
    remove_tree,
    same_content,
    say,
    settle,
)
from tools.labkit import REPO_ROOT, block_disk, loop_device, test_domain, unique_name

ATREST_METHODS = ("atrest_plain_s", "atrest_zstd_s", "atrest_zlib_s", "atrest_encrypted_s",
                  "atrest_zstd_cli_s")
LABELS = {
    "atrest_plain_s": "plain full",
    "atrest_zstd_s": "full, compress=zstd",
    "atrest_zlib_s": "full, compress=zlib",
    "atrest_encrypted_s": "full, encrypt_key_file",
    "atrest_zstd_cli_s": "zstd -T0 -q of the device",
}
COMPRESS = {"atrest_zstd_s": "zstd", "atrest_zlib_s": "zlib"}


def corpus_lines() -> list[bytes]:
    """The lines of this repository's Python sources and Markdown documents."""
    lines: list[bytes] = []
    for pattern in ("libvirt_rdm_backup/**/*.py", "tools/**/*.py", "tests/**/*.py",
                    "docs/*.md", "*.md"):
        for path in sorted(REPO_ROOT.glob(pattern)):
            lines.extend(path.read_bytes().splitlines(keepends=True))
    return [line for line in lines if line.strip()]


def text_extent(rng: random.Random, lines: list[bytes], size: int) -> bytes:
    """``size`` bytes of lines drawn at random."""
    parts: list[bytes] = []
    total = 0
    while total < size:
        batch = rng.choices(lines, k=4096)
        parts.extend(batch)
        total += sum(len(line) for line in batch)
    return b"".join(parts)[:size]


def fill_text_lun(path: Path, size: int, args: argparse.Namespace) -> int:
    """The LUN's backing file: text in the chosen extents, zeros (or holes) elsewhere."""
    extent = int(args.extent_mib) * MiB
    chosen = set(data_extents(size, args.fill, extent, args.seed))
    rng, lines, zeros = random.Random(args.seed), corpus_lines(), bytes(extent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.ftruncate(fd, size)
        for index in range(size // extent):
            if index in chosen:
                os.pwrite(fd, text_extent(rng, lines, extent), index * extent)
            elif not args.sparse:
                os.pwrite(fd, zeros, index * extent)
        os.fsync(fd)
    finally:
        os.close(fd)
    return len(chosen) * extent


def write_key(path: Path) -> None:
    """A key file of random UTF-8 text (base64 of 32 random bytes), mode 0600."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as stream:
        stream.write(secrets.token_urlsafe(32) + "\n")


def run_one(name: str, device: str, key: str, out: Path, key_file: Path) -> float:
    """One measured method into ``out`` (a fresh repository, or the zstd output file)."""
    started = time.monotonic()
    if key == "atrest_zstd_cli_s":
        subprocess.run(["zstd", "-T0", "-q", "-f", "-o", str(out), device], check=True)
    elif key == "atrest_encrypted_s":
        api.backup(name, str(out), disks=[DISK], level="full", encrypt_key_file=str(key_file))
    else:
        api.backup(name, str(out), disks=[DISK], level="full", compress=COMPRESS.get(key))
    return time.monotonic() - started


def verify(name: str, device: str, key: str, out: Path, key_file: Path) -> bool:
    """Whether the result gives back the LUN's bytes (restored to a file, then compared)."""
    copy = out.parent / f"{out.name}-restored.img"
    try:
        if key == "atrest_zstd_cli_s":
            subprocess.run(["zstd", "-d", "-q", "-o", str(copy), str(out)], check=True)
        else:
            api.restore(name, str(out), DISK, str(copy),
                        encrypt_key_file=str(key_file) if key == "atrest_encrypted_s" else None)
        return same_content(device, copy, "raw")
    finally:
        remove_tree(copy)


def luks_create_seconds(path: Path, size: int, key_file: Path, repeat: int) -> list[float]:
    """``qemu-img create`` of an empty encrypted layer as the tool creates one (same LUKS
    options), ``repeat`` times: the fixed cost QEMU adds to every encrypted layer (its PBKDF2
    benchmark runs twice, whatever the key's iteration time). A run QEMU refuses with
    "Unable to get accurate CPU usage" is run again (not counted)."""
    options = LayerFormat(key_id="bench").create_options()
    argv = ["qemu-img", "create", "--object",
            f"secret,id={SECRET_ID},format=raw,file={key_file}", "-q", "-f", "qcow2", "-o",
            ",".join(f"{k}={v}" for k, v in options.items()), str(path), str(size)]
    times: list[float] = []
    try:
        while len(times) < repeat:
            started = time.monotonic()
            proc = subprocess.run(argv, capture_output=True, text=True, check=False)
            if proc.returncode == 0:
                times.append(time.monotonic() - started)
            elif "accurate CPU usage" not in proc.stderr:
                raise RuntimeError(f"qemu-img create failed: {proc.stderr.strip()}")
            path.unlink(missing_ok=True)
    finally:
        path.unlink(missing_ok=True)
    return times


def measure(lab: Lab, name: str, device: str, key_file: Path) -> dict[str, Any]:
    """The rotated rounds; times, stored bytes and first-round checks per method."""
    args = lab.args
    runs: dict[str, list[float]] = {key: [] for key in ATREST_METHODS}
    stored: dict[str, list[int]] = {key: [] for key in ATREST_METHODS}
    verified: dict[str, bool] = {}
    for round_no in range(args.repeat):
        shift = round_no % len(ATREST_METHODS)
        for key in ATREST_METHODS[shift:] + ATREST_METHODS[:shift]:
            out = lab.work / f"rdmb-atrest-{round_no}-{key.removesuffix('_s')}"
            try:
                settle(args)
                seconds = run_one(name, device, key, out, key_file)
                stored[key].append(allocated_bytes(out))
                if round_no == 0 and not args.no_verify:
                    verified[key] = verify(name, device, key, out, key_file)
            finally:
                remove_tree(out)
            runs[key].append(seconds)
            say(f"atrest round {round_no + 1}/{args.repeat}: {LABELS[key]}: {seconds:.2f} s")
    settle(args)
    luks = luks_create_seconds(lab.work / "rdmb-atrest-luks.qcow2", lab.size, key_file,
                               args.repeat)
    return {"runs": runs, "stored": stored, "verified": verified, "luks": luks}


def section_atrest(lab: Lab) -> dict[str, Any]:
    """Compressed and encrypted full backups against plain ones and zstd (see the module)."""
    lun_file = lab.work / "rdmb-atrest-lun.img"
    key_file = lab.work / "rdmb-atrest.key"
    with ExitStack() as stack:
        stack.callback(remove_tree, lun_file)
        stack.callback(remove_tree, key_file)
        say(f"filling {lun_file} ({lab.size // MiB} MiB, {lab.args.fill:.0%} text)")
        data_bytes = fill_text_lun(lun_file, lab.size, lab.args)
        write_key(key_file)
        device = stack.enter_context(loop_device(lun_file))
        name = unique_name("rdmb-bench-atrest")
        stack.enter_context(test_domain(name, [block_disk(DISK, device)]))
        found = measure(lab, name, device, key_file)
    return summarize(found, data_bytes, lab.args.no_verify)


def summarize(found: dict[str, Any], data_bytes: int, no_verify: bool) -> dict[str, Any]:
    """The JSON keys of the section from the rounds' results."""
    times = {key: median(values) for key, values in found["runs"].items()}
    stored = {key: int(median([float(v) for v in values]))
              for key, values in found["stored"].items()}
    plain_s, plain_b = times["atrest_plain_s"], stored["atrest_plain_s"]
    doc: dict[str, Any] = {"atrest_data_bytes": data_bytes}
    for key in ATREST_METHODS:
        doc[key] = round(times[key], 3)
        doc[key.removesuffix("_s") + "_stored_bytes"] = stored[key]
    for kind in ("zstd", "zlib"):
        doc[f"atrest_{kind}_stored_ratio_to_plain"] = round(
            stored[f"atrest_{kind}_s"] / plain_b, 3)
        doc[f"atrest_{kind}_time_ratio_to_plain"] = round(times[f"atrest_{kind}_s"] / plain_s, 3)
    doc["atrest_zstd_stored_ratio_vs_zstd_cli"] = round(
        stored["atrest_zstd_s"] / stored["atrest_zstd_cli_s"], 3)
    doc["atrest_zstd_cli_stored_ratio_to_plain"] = round(
        stored["atrest_zstd_cli_s"] / plain_b, 3)
    doc["atrest_encrypted_stored_ratio_to_plain"] = round(
        stored["atrest_encrypted_s"] / plain_b, 3)
    doc["atrest_encrypted_ratio_to_plain"] = round(times["atrest_encrypted_s"] / plain_s, 3)
    luks_s = median(found["luks"])
    doc["atrest_luks_create_s"] = round(luks_s, 3)
    doc["atrest_encrypted_floor_ratio"] = round((plain_s + luks_s) / plain_s, 3)
    doc["atrest_verified_identical"] = (None if no_verify
                                        else all(found["verified"].values()))
    doc["atrest_verified"] = found["verified"]
    doc["atrest_runs_s"] = {k: [round(v, 3) for v in vs] for k, vs in found["runs"].items()}
    return doc


def print_atrest(doc: dict[str, Any]) -> None:
    runs = doc["atrest_runs_s"]
    print(f"== atrest: full backups of {doc['atrest_data_bytes'] / MiB:.0f} MiB of text "
          "(random lines of this repository's sources and docs) on a LUN of its own, "
          "rotated order per round")
    print(f"  {'method':<28} {'median s':>9} {'stored MiB':>11} {'vs plain':>9}  runs (s)")
    plain_b = doc["atrest_plain_stored_bytes"]
    for key in ATREST_METHODS:
        stored_b = doc[key.removesuffix("_s") + "_stored_bytes"]
        print(f"  {LABELS[key]:<28} {doc[key]:>9.3f} {stored_b / MiB:>11.1f} "
              f"{stored_b / plain_b:>9.3f}  {', '.join(f'{v:.2f}' for v in runs[key])}")
    vs_cli = doc["atrest_zstd_stored_ratio_vs_zstd_cli"]
    print(f"  zstd stored / zstd -T0 stored:      {vs_cli:.3f}")
    print(f"  zstd time / plain time:             {doc['atrest_zstd_time_ratio_to_plain']:.3f}")
    print(f"  zlib time / plain time:             {doc['atrest_zlib_time_ratio_to_plain']:.3f}")
    print(f"  encrypted time / plain time:        {goal(doc, 'atrest_encrypted_ratio_to_plain')}")
    print(f"  context: qemu-img create of one empty LUKS layer: {doc['atrest_luks_create_s']:.3f} s"
          f" (QEMU's fixed cost per encrypted layer); (plain + it) / plain = "
          f"{doc['atrest_encrypted_floor_ratio']:.3f}")
    if doc["atrest_verified"]:
        checks = ", ".join(f"{k.removeprefix('atrest_').removesuffix('_s')}="
                           f"{'identical' if v else 'DIFFERENT'}"
                           for k, v in doc["atrest_verified"].items())
        print(f"  first round restored vs the LUN (qemu-img compare): {checks}")
    print()
