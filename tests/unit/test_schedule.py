"""``schedule``: instance names, the environment file, the units systemd reads, and the
install and uninstall of a timer into a unit directory of the test."""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from libvirt_rdm_backup.cli import main
from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.schedule import install as installer
from libvirt_rdm_backup.schedule.texts import (
    PACKAGED_COMMAND,
    SERVICE,
    TIMER,
    check_instance,
    env_file,
    packaged,
    service_unit,
    timer_dropin,
)

SYSTEMD_ANALYZE = "/usr/bin/systemd-analyze"


@pytest.mark.parametrize("name", ["nightly", "repo1", "nas_b.weekly", "a:b", "x-y", "9"])
def test_good_instance_names(name: str) -> None:
    assert check_instance(name) == name


@pytest.mark.bad_input
@pytest.mark.parametrize("name", ["", "../etc", "a/b", "a..b", "a b", "tab\t", ".hidden",
                                  "-flag", "a\\x2fb", "new\nline", "x" * 101, "a%i", "a$b",
                                  "é"])
def test_bad_instance_names(name: str) -> None:
    with pytest.raises(UsageError):
        check_instance(name)


def test_env_file_quotes_what_systemd_unquotes() -> None:
    text = env_file('/srv/my "repo"/$x`y\\z', ["--jobs", "2", "--exclude", "t*"])
    assert 'RDM_BACKUP_TARGET="/srv/my \\"repo\\"/\\$x\\`y\\\\z"\n' in text
    assert 'RDM_BACKUP_OPTIONS="--jobs 2 --exclude t*"\n' in text
    with pytest.raises(UsageError):
        env_file("/srv/repo\nRDM_BACKUP_OPTIONS=--evil", [])
    with pytest.raises(UsageError):
        env_file("/srv/repo", ["--chain", "a b"])


def _env_of(path: Path) -> dict[str, str]:
    """The environment file as systemd reads it (``systemd-run`` is not at hand: its parser's
    rules for double quotes, the ones :func:`env_file` writes for)."""
    values = {}
    for line in path.read_text().splitlines():
        if line.startswith("#") or not line:
            continue
        key, _, raw = line.partition("=")
        assert raw[0] == raw[-1] == '"'
        body, out, index = raw[1:-1], [], 0
        while index < len(body):
            if body[index] == "\\" and body[index + 1] in '"\\`$':
                index += 1
            out.append(body[index])
            index += 1
        values[key] = "".join(out)
    return values


def test_install_writes_the_units_and_a_private_env_file(tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]
                                                         ) -> None:
    units, config = tmp_path / "units", tmp_path / "etc"
    code = main(["schedule", "install", "nightly", "--target", "/srv/backup repo",
                 "--options", "--jobs 2 --quiesce --exclude 'test-*' --prune --keep-daily 7",
                 "--on-calendar", "*-*-* 02:30", "--unit-dir", str(units),
                 "--config-dir", str(config), "--json"])
    assert code == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["timer"] == "rdm-backup@nightly.timer" and not doc["systemctl_done"]
    assert doc["commands"] == ["systemctl daemon-reload",
                               "systemctl enable --now rdm-backup@nightly.timer"]
    env = config / "nightly.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert stat.S_IMODE(config.stat().st_mode) == 0o700
    assert _env_of(env) == {"RDM_BACKUP_TARGET": "/srv/backup repo",
                            "RDM_BACKUP_OPTIONS": "--jobs 2 --quiesce --exclude test-* "
                                                  "--prune --keep-daily 7"}
    service = (units / SERVICE).read_text()
    assert f"EnvironmentFile={config}/%i.env" in service
    assert f"ConditionPathExists={config}/%i.env" in service
    assert "ExecStart=/" in service and "backup --all --target ${RDM_BACKUP_TARGET} " \
        "$RDM_BACKUP_OPTIONS" in service
    assert (units / TIMER).read_text() == packaged(TIMER)
    dropin = units / "rdm-backup@nightly.timer.d" / "schedule.conf"
    assert dropin.read_text() == "[Timer]\nOnCalendar=\nOnCalendar=*-*-* 02:30\n"
    assert sorted(doc["files"]) == sorted(str(p) for p in (units / SERVICE, units / TIMER,
                                                            dropin, env))

    # installed again without --on-calendar: back to the packaged nightly schedule
    assert main(["schedule", "install", "nightly", "--target", "/srv/r", "--unit-dir",
                 str(units), "--config-dir", str(config)]) == 0
    assert not dropin.parent.exists()
    assert _env_of(env) == {"RDM_BACKUP_TARGET": "/srv/r", "RDM_BACKUP_OPTIONS": ""}


def test_uninstall_keeps_the_units_while_another_instance_needs_them(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    units, config = tmp_path / "units", tmp_path / "etc"
    where = ["--unit-dir", str(units), "--config-dir", str(config)]
    for name in ("one", "two"):
        assert main(["schedule", "install", name, "--target", f"/srv/{name}",
                     "--on-calendar", "daily", *where]) == 0
    assert main(["schedule", "uninstall", "one", *where]) == 0
    assert not (config / "one.env").exists() and (units / SERVICE).exists()
    assert not (units / "rdm-backup@one.timer.d").exists()
    assert main(["schedule", "uninstall", "two", *where]) == 0
    assert sorted(os.listdir(units)) == [] and sorted(os.listdir(config)) == []
    capsys.readouterr()
    assert main(["schedule", "uninstall", "two", *where]) == 3
    assert capsys.readouterr().err.count("\n") == 1


@pytest.mark.bad_input
@pytest.mark.parametrize("argv", [
    ["schedule", "install", "../x", "--target", "/r"],
    ["schedule", "install", "a b", "--target", "/r"],
    ["schedule", "install", "ok"],
    ["schedule", "install", "ok", "--target", "/r", "--options", "--disk vdb"],
    ["schedule", "install", "ok", "--target", "/r", "--options", "--tar /elsewhere"],
    ["schedule", "install", "ok", "--target", "/r", "--options", "vm1"],
    ["schedule", "install", "ok", "--target", "/r", "--options", "--jobs many"],
    ["schedule", "install", "ok", "--target", "/r", "--options", "--bogus"],
    ["schedule", "install", "ok", "--target", "/r", "--options", "--keep-daily 7"],
    ["schedule", "install", "ok", "--target", "/r", "--options", "--chain 'a b'"],
    ["schedule", "install", "ok", "--target", "/r", "--options", "'unclosed"],
    ["schedule", "install", "ok", "--target", "/r", "--on-calendar", "at\nnoon"],
    ["schedule", "install", "ok", "--target", "nbd://h:port/x"],
    ["schedule", "uninstall", "ok", "--target", "/r"],
])
def test_bad_schedules_are_refused_before_anything_is_written(
        argv: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    where = ["--unit-dir", str(tmp_path / "units"), "--config-dir", str(tmp_path / "etc")]
    assert main([*argv, *where]) == 2
    err = capsys.readouterr().err
    assert err.startswith("rdm-backup: error: ") and err.count("\n") == 1
    assert not (tmp_path / "units").exists() and not (tmp_path / "etc").exists()


def test_systemctl_runs_only_where_systemd_is_the_init_system(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ran: list[list[str]] = []
    monkeypatch.setattr(installer, "run", lambda argv, **_: ran.append(list(argv)))
    monkeypatch.setattr(installer, "SYSTEMD_RUNTIME", str(tmp_path / "none"))
    units, config = str(tmp_path / "u"), str(tmp_path / "c")
    assert installer.install("a", "/r", [], None, units, config).commands and not ran
    monkeypatch.setattr(installer, "SYSTEMD_RUNTIME", str(tmp_path))
    assert installer.install("a", "/r", [], None, units, config, enable=False).commands
    assert not ran
    change = installer.install("a", "/r", [], None, units, config)
    assert change.enabled and not change.commands
    assert ran == [["systemctl", "daemon-reload"],
                   ["systemctl", "enable", "--now", "rdm-backup@a.timer"]]
    ran.clear()
    installer.uninstall("a", units, config)
    assert ran == [["systemctl", "disable", "--now", "rdm-backup@a.timer"],
                   ["systemctl", "daemon-reload"]]


@pytest.mark.skipif(not os.access(SYSTEMD_ANALYZE, os.X_OK),
                    reason=f"{SYSTEMD_ANALYZE} is not installed")
def test_systemd_analyze_verifies_the_shipped_units(tmp_path: Path) -> None:
    """The units as installed (an existing command, the instance's unit names linked to the
    templates, a drop-in) load without a single warning; no running systemd is needed."""
    command = shutil.which("true") or "/bin/true"
    (tmp_path / SERVICE).write_text(service_unit(command, "/etc/libvirt-rdm-backup"))
    assert PACKAGED_COMMAND in packaged(SERVICE)
    (tmp_path / TIMER).write_text(packaged(TIMER))
    for template in (SERVICE, TIMER):
        (tmp_path / template.replace("@", "@nightly")).symlink_to(template)
    dropin = tmp_path / "rdm-backup@nightly.timer.d"
    dropin.mkdir()
    (dropin / "schedule.conf").write_text(timer_dropin("Mon..Fri 02:30"))
    done = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(tmp_path / "rdm-backup@nightly.service"),
         str(tmp_path / "rdm-backup@nightly.timer")],
        capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stderr == "" and done.stdout == "", done.stderr
    for setting in ("Type=oneshot", "Nice=19", "IOSchedulingClass=idle", "KillMode=mixed",
                    "NoNewPrivileges=yes", "ProtectSystem=full"):
        assert setting in packaged(SERVICE)
    for setting in ("Persistent=true", "RandomizedDelaySec=", "OnCalendar="):
        assert setting in packaged(TIMER)


@pytest.mark.skipif(not os.access(SYSTEMD_ANALYZE, os.X_OK),
                    reason=f"{SYSTEMD_ANALYZE} is not installed")
def test_systemd_analyze_finds_a_broken_unit(tmp_path: Path) -> None:
    """The check above would see a mistake: a command that does not exist fails it."""
    (tmp_path / SERVICE).write_text(service_unit("/nonexistent/rdm-backup", "/etc/x"))
    (tmp_path / "rdm-backup@n.service").symlink_to(SERVICE)
    done = subprocess.run([SYSTEMD_ANALYZE, "verify", "--man=no",
                           str(tmp_path / "rdm-backup@n.service")],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0 and "/nonexistent/rdm-backup" in done.stderr
