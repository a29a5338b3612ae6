"""Backup options: one object, checked when made; the API's keywords fill it."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import pytest

from libvirt_rdm_backup import api
from libvirt_rdm_backup.consistency import Window
from libvirt_rdm_backup.engine import backup as engine
from libvirt_rdm_backup.engine.backup import BackupOptions
from libvirt_rdm_backup.errors import UsageError
from libvirt_rdm_backup.modes import Level, Quiesce, WindowMethod


def test_strings_become_members_and_json_keeps_the_strings() -> None:
    options = BackupOptions(level="incremental", quiesce="required")  # type: ignore[arg-type]
    assert options.level is Level.INCREMENTAL and options.quiesce is Quiesce.REQUIRED
    assert json.dumps({"level": options.level}) == '{"level": "incremental"}'
    window = Window(method=WindowMethod.FSFREEZE_PAUSE, paused_ms=1.0)
    assert json.dumps(window.to_dict()) == '{"method": "fsfreeze+pause", "paused_ms": 1.0}'
    assert f"{Level.RESYNC} backup" == "resync backup"


@pytest.mark.bad_input
@pytest.mark.parametrize(("fields", "message"), [
    ({"level": "weekly"}, "unknown level 'weekly' (one of full, incremental, differential, "
                          "resync, auto)"),
    ({"quiesce": "never"}, "unknown quiesce mode 'never' (one of try, required)"),
    ({"chain": "../x"}, "malformed chain name"),
    ({"max_pause": 0.0}, "--max-pause must be a positive number"),
])
def test_bad_options_are_refused_when_made(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        BackupOptions(**fields)


def test_keywords_override_the_options_object(monkeypatch: pytest.MonkeyPatch) -> None:
    taken: list[BackupOptions] = []

    @contextlib.contextmanager
    def no_connection(_uri: str | None) -> Iterator[None]:
        yield None

    def engine_backup(_conn: Any, domain: str, target: str, options: BackupOptions,
                      agent: Any) -> Any:
        assert (domain, target, agent) == ("vm", "/repo", None)
        taken.append(options)

    monkeypatch.setattr(api, "connection", no_connection)
    monkeypatch.setattr(engine, "backup", engine_backup)
    base = BackupOptions(chain="hourly", level=Level.FULL, max_pause=5.0)
    api.backup("vm", "/repo", ["vdb"], options=base, level="incremental")
    api.backup("vm", "/repo", quiesce="try")
    assert taken[0] == BackupOptions(disks=["vdb"], level=Level.INCREMENTAL, chain="hourly",
                                     max_pause=5.0)
    assert taken[1] == BackupOptions(quiesce=Quiesce.TRY)
    with pytest.raises(UsageError, match="unknown level"):
        api.backup("vm", "/repo", options=base, level="weekly")
    assert len(taken) == 2
