"""The suite's own scheduling (tests/conftest.py): slow tests dealt over xdist's first blocks by their seconds."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest

from conftest import _xdist_blocks, pytest_collection_modifyitems


class _Item:
    """A collected test as the ordering hook sees it: a name and maybe a slow marker."""

    def __init__(self, name: str, seconds: float | None = None) -> None:
        self.name, self.seconds = name, seconds

    def get_closest_marker(self, name: str) -> Any:
        return SimpleNamespace(kwargs={"seconds": self.seconds}) if name == "slow" and self.seconds else None


def _order(items: list[_Item], workers: int, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    monkeypatch.setenv("PYTEST_XDIST_WORKER_COUNT", str(workers))
    pytest_collection_modifyitems(None, items)  # type: ignore[arg-type]
    return [i.name for i in items]


def test_blocks_are_the_sizes_worksteal_sends() -> None:
    assert _xdist_blocks(534, 2) == [267, 267]
    assert _xdist_blocks(5, 2) == [2, 3] and _xdist_blocks(10, 3) == [3, 3, 4]


def test_slow_tests_start_each_workers_block_longest_first_to_the_least_loaded(monkeypatch: pytest.MonkeyPatch) -> None:
    items = [_Item(f"q{i}") for i in range(4)] + [_Item("rlcm", 90), _Item("ddpo", 168), _Item("d3po", 116)]
    items += [_Item(f"q{i}") for i in range(4, 7)]
    order = _order(items, 2, monkeypatch)
    # Blocks of 5: DDPO alone on the first worker, D3PO then RLCM (206 s) on the second; the quick ones fill up.
    assert order == ["ddpo", "q0", "q1", "q2", "q3", "d3po", "rlcm", "q4", "q5", "q6"]


def test_one_process_or_too_few_tests_keeps_slow_tests_first(monkeypatch: pytest.MonkeyPatch) -> None:
    items = [_Item("q0"), _Item("a", 10), _Item("b", 50)]
    assert _order(list(items), 1, monkeypatch) == ["b", "a", "q0"]
    # Two workers, blocks of 1 and 2: b opens the first block, a the second.
    assert _order(list(items), 2, monkeypatch) == ["b", "a", "q0"]
    four = [_Item("s1", 9), _Item("s2", 8), _Item("s3", 7), _Item("s4", 6)]  # loads 9 + 6 and 8 + 7
    assert _order(list(four), 2, monkeypatch) == ["s1", "s4", "s2", "s3"]
    # Three equal slow tests in blocks of 1 and 2: the first worker's hand (x, z) does not fit its block of 1.
    crowded = [_Item("x", 1), _Item("y", 1), _Item("z", 1)]
    assert _order(list(crowded), 2, monkeypatch) == ["x", "y", "z"]
