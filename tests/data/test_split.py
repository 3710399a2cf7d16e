"""Named protocols: how data.classes become tasks (ccnf/data/split.py)."""

from __future__ import annotations

import pytest

from ccnf.data.split import (
    MVTEC_CLASSES,
    MVTEC_PROTOCOLS,
    VISA_CLASSES,
    analogues,
    check_classes,
    make_split,
    task_sizes,
)


@pytest.mark.parametrize(
    ("protocol", "sizes"),
    [
        ("5x3", [3] * 5),
        ("15x1", [1] * 15),
        ("10-5", [10, 5]),
        ("14-1", [14, 1]),
        ("3x5", [5] * 3),
        ("one-per-task", [1] * 15),
        ("all-in-one", [15]),
        ("1x15", [15]),
        ("4-4-4-3", [4, 4, 4, 3]),
    ],
)
def test_mvtec_protocols_on_15_classes(protocol: str, sizes: list[int]) -> None:
    assert task_sizes(protocol, 15) == sizes


def test_every_literature_protocol_fits_mvtec() -> None:
    for name in MVTEC_PROTOCOLS:
        split = make_split(MVTEC_CLASSES, name)
        assert [c for t in split for c in t] == list(MVTEC_CLASSES)


def test_split_keeps_the_class_order_and_cuts_consecutively() -> None:
    assert make_split(["c", "a", "b", "d"], "1-3") == [["c"], ["a", "b", "d"]]
    assert make_split(list(MVTEC_CLASSES), "5x3")[1] == ["carpet", "grid", "hazelnut"]


def test_analogues_for_twelve_classes() -> None:
    """industrial12 and VisA have 12 classes: what each MVTec protocol becomes there."""
    assert analogues(12) == {
        "5x3": "3-3-2-2-2", "15x1": "12x1", "10-5": "8-4", "14-1": "11-1", "3x5": "3x4",
    }
    assert analogues(15) == {name: name for name in MVTEC_PROTOCOLS}
    for name in analogues(len(VISA_CLASSES)).values():
        assert sum(task_sizes(name, 12)) == 12


@pytest.mark.parametrize(
    ("protocol", "n", "message"),
    [
        ("5x3", 12, "needs 15 classes (5 tasks of 3), but the split has 12"),
        ("10-5", 12, "lists task sizes that sum to 15, but the split has 12"),
        ("5 x 3", 15, "not a protocol name (did you mean '5x3'?)"),
        ("10_5", 15, "did you mean '10-5'?"),
        ("0x3", 15, "not a protocol name"),
        ("15", 15, "not a protocol name"),
    ],
)
def test_bad_protocols_say_why(protocol: str, n: int, message: str) -> None:
    with pytest.raises(ValueError, match=r"data\.protocol") as info:
        task_sizes(protocol, n)
    assert message in str(info.value)


def test_misfit_lists_what_fits() -> None:
    with pytest.raises(ValueError) as info:
        task_sizes("3x5", 12)
    msg = str(info.value)
    assert "one-per-task (= 12x1), all-in-one (= 1x12), 6x2, 4x3, 3x4, 2x6," in msg
    assert "3x5 -> 3x4" in msg


def test_class_checks() -> None:
    check_classes("folder", ["pcb_00041", "cookie"])
    with pytest.raises(ValueError, match="twice"):
        check_classes("folder", ["a", "a"])
    with pytest.raises(ValueError, match="not a folder name"):
        check_classes("folder", ["a/b"])
    with pytest.raises(ValueError, match="did you mean 'macaroni1'"):
        check_classes("visa", ["macaroni_1"])
    with pytest.raises(ValueError, match="not a class of the embedded synthetic data"):
        check_classes("synthetic", ["bottle"])
