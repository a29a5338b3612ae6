"""``rekey``: the key of an encrypted file repository changed, on the real lab.

An encrypted full and an encrypted incremental are taken with one key; ``rekey`` gives
every layer another: both points restore byte-identical with the new key and are
refused with the old one (exit 2); no process's argv held either key; a wrong old key,
a new key equal to the old one and an ``rbd://`` target are refused with nothing changed
(NBD volumes: ``test_rekey_volume.py``).
A second test kills ``rekey`` (SIGKILL) at each of its steps on fresh copies of one
repository: other commands refuse the repository meanwhile, a rekey with other keys is
refused, ``rekey`` again finishes, and every point restores with the new key.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.errors import OperationError, UsageError
from libvirt_rdm_backup.qemu import luks_slots
from tests.e2e.test_encrypted_layers import argv_watch, enc_vm, files_holding, point  # noqa: F401
from tests.e2e.test_prune import _kill_when
from tests.e2e.test_prune_dry_run import EXE
from tools.labkit import LabVM, MiB, guest_write, rdm_backup, same_bytes

pytestmark = pytest.mark.lab

RBD_TARGET = "rbd://rbd?conf=/var/lib/rdmb-lab/ceph/ceph.conf&id=rdmb-lab"  # refused unread


def _keys(workdir: Path) -> tuple[Path, Path, bytes, bytes]:
    old, new = workdir / "old-key", workdir / "new-key"
    old_secret, new_secret = (b"k-" + secrets.token_hex(24).encode() for _ in range(2))
    old.write_bytes(old_secret)
    new.write_bytes(new_secret)
    return old, new, old_secret, new_secret


def _two_points(vm: LabVM, repo: str, key: Path, disks: list[str] | None = None
                ) -> list[tuple[str, dict[str, Path]]]:
    """An encrypted full and incremental; (backup id, reference copies) of each."""
    made = []
    for n, level in enumerate(("full", "incremental")):
        if n:
            guest_write(vm.dom, "vdb", 0x41 + n, 12 * MiB, MiB)
        refs = point(vm, n)
        result = api.backup(vm.name, repo, level=level, encrypt_key_file=str(key),
                            disks=disks)
        made.append((result.manifest.backup_id,
                     {d: p for d, p in refs.items() if disks is None or d in disks}))
    return made


def _restores(vm: LabVM, repo: str, key: Path, made: list[tuple[str, dict[str, Path]]]
              ) -> None:
    for backup_id, refs in made:
        for disk, ref in refs.items():
            out = vm.workdir / f"out-{disk}.raw"
            api.restore(vm.name, repo, disk, str(out), backup_id=backup_id,
                        encrypt_key_file=str(key))
            assert same_bytes(out, ref), f"{disk} of {backup_id}"
            out.unlink()


def _layers(repo: str) -> list[Path]:
    return sorted(Path(repo).glob("*/2*/*.qcow2"))


def _tree_digest(repo: str) -> str:
    digest = hashlib.sha256()
    for path in sorted(Path(repo).rglob("*")):
        if path.is_file() and not path.name.startswith("."):
            digest.update(str(path).encode() + path.read_bytes())
    return digest.hexdigest()


def rekey_keeping_keys_hidden(target: str, old: Path, new: Path, old_secret: bytes,
                              new_secret: bytes) -> dict[str, object]:
    """``rdm-backup -vv rekey --json`` of ``target``, checked to succeed with neither key in
    any process's argv meanwhile nor in its output; its JSON result."""
    with argv_watch(old_secret) as leaked_old, argv_watch(new_secret) as leaked_new:
        done = rdm_backup("-vv", "rekey", "--target", target, "--encrypt-key-file", str(old),
                          "--new-key-file", str(new), "--json")
    assert done.returncode == 0, done.stderr
    assert leaked_old == [] and leaked_new == []
    assert old_secret not in (done.stdout + done.stderr).encode()
    assert new_secret not in (done.stdout + done.stderr).encode()
    assert "qemu-img amend" in done.stderr
    result: dict[str, object] = json.loads(done.stdout)
    return result


def test_rekey_gives_every_layer_the_new_key(enc_vm: LabVM) -> None:  # noqa: F811
    vm = enc_vm
    repo = str(vm.workdir / "repo")
    old, new, old_secret, new_secret = _keys(vm.workdir)
    made = _two_points(vm, repo, old)
    same = vm.workdir / "same-key"
    same.write_bytes(old_secret)
    before = _tree_digest(repo)
    refused = rdm_backup("rekey", "--target", repo, "--encrypt-key-file", str(new),
                         "--new-key-file", str(old))
    assert refused.returncode == 2, refused.stderr
    assert len(refused.stderr.strip().splitlines()) == 1
    for target, wrong_old, new_file in ((repo, old, same), (repo, new, new),
                                        (RBD_TARGET, old, new)):
        with pytest.raises(UsageError):
            api.rekey(target, str(wrong_old), str(new_file))
    assert _tree_digest(repo) == before  # nothing changed

    result = rekey_keeping_keys_hidden(repo, old, new, old_secret, new_secret)
    assert (result["layers"], result["backups"], result["resumed"]) == (4, 2, False)
    assert not (Path(repo) / ".rekey-journal.json").exists()
    assert files_holding(repo, old_secret) == files_holding(repo, new_secret) == []

    _restores(vm, repo, new, made)
    out = vm.workdir / "refused.raw"
    refused = rdm_backup("restore", vm.name, "--target", repo, "--disk", "vdb", "--to",
                         str(out), "--encrypt-key-file", str(old))
    assert refused.returncode == 2, refused.stderr
    assert not out.exists()
    layers = _layers(repo)
    assert len(layers) == 4
    for layer in layers:  # the old key opens no layer any more
        assert not luks_slots.opens_with(str(layer), str(old), str(new), new=False)
    assert api.verify(repo).ok
    # the chain goes on with the new key
    later = api.backup(vm.name, repo, level="incremental", encrypt_key_file=str(new))
    assert later.manifest.disk("vdb").level == "incremental"  # type: ignore[union-attr]


def _amending(rekey: int) -> bool:
    """A ``qemu-img amend`` of the rekey ``rekey`` (a pid) runs."""
    found = subprocess.run(["pgrep", "-P", str(rekey), "-f", "qemu-img amend"],
                           capture_output=True, check=False)
    return found.returncode == 0


def _changed(pristine: Path, repo: Path, pattern: str) -> bool:
    for path in repo.glob(pattern):
        try:
            if path.read_bytes() != (pristine / path.relative_to(repo)).read_bytes():
                return True
        except OSError:
            continue
    return False


@pytest.mark.fault
def test_a_rekey_killed_at_each_step_is_finished_by_the_next(enc_vm: LabVM  # noqa: F811
                                                              ) -> None:
    vm = enc_vm
    pristine = vm.workdir / "pristine"
    old, new, _old_secret, _new_secret = _keys(vm.workdir)
    made = _two_points(vm, str(pristine), old, disks=["vdb"])
    steps: list[tuple[str, Callable[[Path, int], bool]]] = [
        ("journal written", lambda r, _: (r / ".rekey-journal.json").exists()),
        ("a key slot being changed", lambda _, pid: _amending(pid)),
        ("a manifest written again", lambda r, _: _changed(pristine, r, "*/2*/manifest.json")),
    ]
    killed = 0
    repo = vm.workdir / "repo"
    argv = [str(EXE), "rekey", "--target", str(repo), "--encrypt-key-file", str(old),
            "--new-key-file", str(new)]
    for step, seen in steps:
        shutil.rmtree(repo, ignore_errors=True)
        shutil.copytree(pristine, repo)
        killed += _kill_when(argv, functools.partial(seen, repo))
        assert (repo / ".rekey-journal.json").exists(), step
        if step == steps[0][0]:  # others refuse the repository meanwhile
            refused = rdm_backup("restore", vm.name, "--target", str(repo), "--disk", "vdb",
                                 "--to", str(vm.workdir / "no.raw"), "--encrypt-key-file",
                                 str(new))
            assert refused.returncode == 4, (step, refused.stderr)
            assert "rekey again" in refused.stderr, step
            with pytest.raises(OperationError, match="rekey again"):
                api.verify(str(repo))
            with pytest.raises(UsageError, match="begun with"):
                api.rekey(str(repo), str(new), str(old))
        done = api.rekey(str(repo), str(old), str(new))
        assert done.resumed and done.layers == 2, step
        assert not (repo / ".rekey-journal.json").exists(), step
        assert api.verify(str(repo)).ok, step
        _restores(vm, str(repo), new, made[1:])  # the incremental reads both layers
    _restores(vm, str(repo), new, made[:1])
    assert killed >= 3  # most steps were caught while rekey ran
