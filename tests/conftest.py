"""Session-wide test setup shared by every test.

* The ``lab`` marker: such tests need the real lab (root, libvirtd on qemu:///system, tgtd, loop
  devices; ``make lab-up``). Without it they are skipped with the reason, except in CI
  (``CI=true``), where they fail so that a broken lab cannot hide behind skips.
* ``ceph``: the lab's Ceph cluster; without it the test is skipped (failed in CI).
* ``run_token``: 8 hex digits, unique per test run; put it into names of domains, targets, files.
* ``rdmb_tmp``: a fresh directory under /var/tmp whose path contains "rdmb" and the token
  (mode 0755 so that QEMU, running as libvirt-qemu, can reach files in it); removed afterwards.
* The tool's lock files and guest-hold records go to a directory of this run (set in the
  environment before the library is imported, so the CLI runs of the tests share it), which is
  removed when the run ends.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import settings

_RUN_STATE = tempfile.mkdtemp(prefix="rdmb-state-")
os.environ["RDM_BACKUP_LOCK_DIR"] = os.path.join(_RUN_STATE, "locks")
os.environ["RDM_BACKUP_WINDOW_DIR"] = os.path.join(_RUN_STATE, "windows")

pytest_plugins = ["tests.suite_report", "pytester"]

# property tests explore at random while developing; CI runs the same examples every time
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}:
    settings.load_profile("ci")

LIBVIRT_URI = "qemu:///system"
TMP_BASE = Path("/var/tmp")

_lab_problem_cache: list[str | None] = []


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in {"1", "true", "yes"}


def _probe_lab() -> str | None:
    """None when the lab answers, else why not."""
    if os.geteuid() != 0:
        return "the lab tests need root"
    virsh = shutil.which("virsh")
    if virsh is None:
        return "virsh is not installed (run `make lab-up`)"
    try:
        proc = subprocess.run(
            [virsh, "-c", LIBVIRT_URI, "version"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"`virsh -c {LIBVIRT_URI} version` did not answer: {exc} (run `make lab-up`)"
    if proc.returncode != 0:
        detail = proc.stderr.strip().splitlines()
        why = detail[-1] if detail else f"exit status {proc.returncode}"
        return f"`virsh -c {LIBVIRT_URI} version` failed: {why} (run `make lab-up`)"
    return None


def lab_problem() -> str | None:
    """The lab probe, run at most once per session."""
    if not _lab_problem_cache:
        _lab_problem_cache.append(_probe_lab())
    return _lab_problem_cache[0]


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("lab") is None:
        return
    problem = lab_problem()
    if problem is None:
        return
    if in_ci():
        pytest.fail(f"lab unavailable in CI (CI=true: lab tests never skip): {problem}", False)
    pytest.skip(f"lab unavailable: {problem}")


@pytest.fixture
def ceph() -> None:
    """The lab's Ceph cluster (``tools/lab.sh ceph-up``): skip unless it answers (fail in CI)."""
    from tools import cephkit

    problem = cephkit.unavailable()
    if problem is None:
        return
    if in_ci():
        pytest.fail(f"Ceph unavailable in CI (CI=true: lab tests never skip): {problem}", False)
    pytest.skip(f"Ceph unavailable: {problem}")


@pytest.fixture(scope="session")
def run_token() -> str:
    """Unique per test run: names made with it do not clash with other runs or leftovers."""
    return uuid.uuid4().hex[:8]


@pytest.fixture
def rdmb_tmp(run_token: str, request: pytest.FixtureRequest) -> Iterator[Path]:
    """A temporary directory under /var/tmp named rdmb-<token>-<test>-XXXX, mode 0755."""
    test = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name)[:40]
    path = Path(tempfile.mkdtemp(prefix=f"rdmb-{run_token}-{test}-", dir=TMP_BASE))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def pytest_unconfigure(config: pytest.Config) -> None:
    """Remove this run's lock files and guest-hold records."""
    shutil.rmtree(_RUN_STATE, ignore_errors=True)
