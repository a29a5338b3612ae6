"""The fault suite's summary counts what ran, what passed and names what did not."""

from __future__ import annotations

from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MINI_SUITE = """
import pytest

@pytest.mark.fault
def test_survived():
    pass

@pytest.mark.fault
def test_not_survived():
    assert False

@pytest.mark.bad_input
@pytest.mark.parametrize("text", ["a", "b", "c"])
def test_refused(text):
    assert text != "c"

@pytest.mark.bad_input
def test_skipped():
    pytest.skip("not here")

@pytest.mark.hostile
def test_contained():
    pass

def test_unmarked():
    pass
"""


def test_summary_counts_faults_and_inputs(pytester: pytest.Pytester,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("RDMB_SUITE_TALLY", raising=False)  # the run around this one's
    pytester.makeconftest('pytest_plugins = ["tests.suite_report"]\n')
    pytester.makepyfile(test_mini=MINI_SUITE)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=5, failed=2, skipped=1)
    result.stdout.fnmatch_lines([
        "*fault and bad-input suite*",
        "faults survived: 1/2",
        "  not survived: test_mini.py::test_not_survived",
        "bad inputs refused: 2/3",
        "  not refused: test_mini.py::test_refused?c?",
        "hostile inputs contained: 1/1",
    ])


def test_no_summary_without_marked_tests(pytester: pytest.Pytester,
                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.delenv("RDMB_SUITE_TALLY", raising=False)
    pytester.makeconftest('pytest_plugins = ["tests.suite_report"]\n')
    pytester.makepyfile(test_plain="def test_plain():\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1)
    assert "fault and bad-input suite" not in result.stdout.str()


def test_runs_in_workers_and_alone_add_up(pytester: pytest.Pytester,
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """``make test``'s two runs (parallel workers, then the serial tests) append to one tally
    file instead of printing; the combined summary and count cover both."""
    from tests.suite_report import combined

    tally = pytester.path / "tally.jsonl"
    monkeypatch.setenv("PYTHONPATH", str(ROOT))
    monkeypatch.setenv("RDMB_SUITE_TALLY", str(tally))
    pytester.makeconftest('pytest_plugins = ["tests.suite_report"]\n')
    pytester.makepyfile(test_mini=MINI_SUITE)
    workers = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-n", "2",
                                            "-k", "not refused")
    workers.assert_outcomes(passed=3, failed=1, skipped=1)
    assert "fault and bad-input suite" not in workers.stdout.str()  # left to the combined one
    alone = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-k", "refused")
    alone.assert_outcomes(passed=2, failed=1)
    lines, count_line = combined(str(tally))
    assert lines == ["faults survived: 1/2", "  not survived: test_mini.py::test_not_survived",
                     "bad inputs refused: 2/3", "  not refused: test_mini.py::test_refused[c]",
                     "hostile inputs contained: 1/1"]
    assert count_line.startswith("5 passed, 2 failed, 1 skipped in ")
    assert count_line.endswith("s (all runs)")
