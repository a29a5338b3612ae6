"""Shared fixtures of the end-to-end tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tools.labkit import LabVM, lab_vm


@pytest.fixture(scope="module")
def vm() -> Iterator[LabVM]:
    """The acceptance VM (running), shared by the tests of one module."""
    with lab_vm() as built:
        yield built
