"""Which classes, in which tasks: the class lists of the data sources and the named protocols.

The task split is never written out by hand in params.yaml. It is ``data.classes`` (the class
order; ``null`` means the source's own list, :func:`default_classes`) cut into consecutive
tasks by ``data.protocol``:

* ``AxB``: A tasks of B classes each (A * B must be the number of classes), e.g. ``5x3``;
* ``A-B[-C...]``: tasks of A, B, C... classes in this order (they must sum to the number of
  classes), e.g. ``10-5`` (ten classes, then five), ``14-1``, ``3-3-2-2-2``;
* ``one-per-task`` (= ``Nx1``) and ``all-in-one`` (= ``1xN``) for any number of classes N.

So any split is a class order plus task sizes: ``[[a, c], [b]]`` is classes ``[a, c, b]`` with
protocol ``2-1``. A protocol that does not fit the number of classes is an error that lists the
ones that do, with the analogues of the MVTec AD protocols (:func:`analogues`).

Everything here is pure (no file system, no heavy imports): :mod:`ccnf.config` validates
params.yaml with it, and the stages that depend on the split list this file in dvc.yaml.
"""

from __future__ import annotations

import difflib
import re

SOURCES: tuple[str, ...] = ("synthetic", "mvtec", "visa", "folder")

# The embedded dataset's order (ccnf/data/synthetic/classes.py, SYNTHETIC_SPLIT flattened): cut
# 5x3 it puts every near-duplicate pair in two different tasks (tests check the two agree).
SYNTHETIC_ORDER: tuple[str, ...] = (
    "weave", "mesh", "washer",
    "granite", "caplet", "brushed",
    "twill", "oak", "ic",
    "perforated", "tablet", "hide",
    "terrazzo", "hexnut", "gear",
)

# MVTec AD's 15 classes in alphabetical order: cut 5x3 this is the DNE/IUF/CDAD split.
MVTEC_CLASSES: tuple[str, ...] = (
    "bottle", "cable", "capsule", "carpet", "grid", "hazelnut", "leather", "metal_nut", "pill",
    "screw", "tile", "toothbrush", "transistor", "wood", "zipper",
)

# VisA's 12 objects (the ``object`` column of split_csv/1cls.csv) in alphabetical order.
VISA_CLASSES: tuple[str, ...] = (
    "candle", "capsules", "cashew", "chewinggum", "fryum", "macaroni1", "macaroni2", "pcb1",
    "pcb2", "pcb3", "pcb4", "pipe_fryum",
)

_KNOWN: dict[str, tuple[str, ...]] = {
    "synthetic": SYNTHETIC_ORDER,
    "mvtec": MVTEC_CLASSES,
    "visa": VISA_CLASSES,
}
_LABEL = {"synthetic": "embedded synthetic", "mvtec": "MVTec AD", "visa": "VisA"}

ONE_PER_TASK = "one-per-task"
ALL_IN_ONE = "all-in-one"
_GRID = re.compile(r"^([1-9][0-9]*)x([1-9][0-9]*)$")
_SIZES = re.compile(r"^[1-9][0-9]*(-[1-9][0-9]*)+$")

# The continual protocols of the literature, named as on MVTec AD (15 classes), with what each
# means, so that an error on another class count can name its analogue.
MVTEC_PROTOCOLS: dict[str, str] = {
    "5x3": "five tasks of three: DNE, IUF, CDAD, our default",
    "15x1": "one class per task: UCAD, CADIC, DeCoFlow",
    "10-5": "ten classes, then five",
    "14-1": "fourteen classes, then one",
    "3x5": "three tasks of five",
}


def default_classes(source: str) -> tuple[str, ...] | None:
    """The class list ``data.classes: null`` stands for; None for ``folder`` (no default)."""
    return _KNOWN.get(source)


def check_classes(source: str, classes: list[str]) -> None:
    """Raise ValueError naming the bad entry if ``classes`` cannot be this source's classes."""
    if not classes:
        raise ValueError("data.classes is empty: list at least one class (or null)")
    seen: set[str] = set()
    for c in classes:
        if c in seen:
            raise ValueError(f"data.classes lists '{c}' twice: each class belongs to one task")
        seen.add(c)
        if not c or c in (".", "..") or "/" in c or "\\" in c:
            raise ValueError(f"data.classes: '{c}' is not a folder name")
    known = _KNOWN.get(source)
    if known is None:
        return
    for c in classes:
        if c not in known:
            hint = difflib.get_close_matches(c, known, n=1, cutoff=0.6)
            raise ValueError(
                f"data.classes: '{c}' is not a class of the {_LABEL[source]} data"
                + (f" (did you mean '{hint[0]}'?)" if hint else "")
                + f"; its classes: {', '.join(known)}"
                + ("" if source == "synthetic" else
                   ". For a dataset with other class folders use data.source folder")
            )


def _name(sizes: list[int]) -> str:
    """The shortest protocol name of these task sizes (``AxB`` when they are all equal)."""
    if len(set(sizes)) == 1:
        return f"{len(sizes)}x{sizes[0]}"
    return "-".join(str(s) for s in sizes)


def _even(n: int, tasks: int) -> list[int]:
    """``n`` classes in ``tasks`` tasks as evenly as possible, the larger tasks first."""
    q, r = divmod(n, tasks)
    return [q + 1] * r + [q] * (tasks - r)


def analogues(n: int) -> dict[str, str]:
    """{MVTec protocol: the protocol that plays its part for ``n`` classes}, where one exists.

    5x3 -> five tasks as even as possible; 15x1 -> one per task; 10-5 -> two tasks, two thirds
    then one third; 14-1 -> all but one, then one; 3x5 -> three tasks as even as possible.
    For 12 classes: 3-3-2-2-2, 12x1, 8-4, 11-1, 3x4.
    """
    out: dict[str, str] = {}
    if n >= 5:
        out["5x3"] = _name(_even(n, 5))
    if n >= 2:
        out["15x1"] = f"{n}x1"
        first = round(2 * n / 3)
        if 0 < first < n:
            out["10-5"] = f"{first}-{n - first}"
        out["14-1"] = f"{n - 1}-1"
    if n >= 3:
        out["3x5"] = _name(_even(n, 3))
    return out


def fitting(n: int) -> list[str]:
    """Grid protocols ``AxB`` that fit ``n`` classes (A * B = n), one class per task first."""
    return [f"{n // b}x{b}" for b in range(1, n + 1) if n % b == 0]


def _misfit(protocol: str, n: int, why: str) -> ValueError:
    ana = analogues(n)
    lines = [
        f"data.protocol '{protocol}' {why}, but the split has {n} classes.",
        f"Protocols for {n} classes: {ONE_PER_TASK} (= {n}x1), {ALL_IN_ONE} (= 1x{n}), "
        + "".join(f"{g}, " for g in fitting(n) if g not in (f"{n}x1", f"1x{n}"))
        + f"or task sizes that sum to {n} (A-B-C...).",
    ]
    if ana:
        lines.append(
            "The analogues of the MVTec AD protocols: "
            + ", ".join(f"{k} -> {v}" for k, v in ana.items())
            + "."
        )
    return ValueError(" ".join(lines))


def task_sizes(protocol: str, n: int) -> list[int]:
    """Number of classes in each task for ``n`` classes; ValueError says why not and what fits.

    >>> task_sizes("5x3", 15), task_sizes("10-5", 15), task_sizes("one-per-task", 3)
    ([3, 3, 3, 3, 3], [10, 5], [1, 1, 1])
    """
    if n < 1:
        raise ValueError("the split has no class")
    if protocol == ONE_PER_TASK:
        return [1] * n
    if protocol == ALL_IN_ONE:
        return [n]
    grid = _GRID.match(protocol)
    if grid:
        tasks, per = int(grid.group(1)), int(grid.group(2))
        if tasks * per != n:
            raise _misfit(protocol, n, f"needs {tasks * per} classes ({tasks} tasks of {per})")
        return [per] * tasks
    if _SIZES.match(protocol):
        sizes = [int(s) for s in protocol.split("-")]
        if sum(sizes) != n:
            raise _misfit(protocol, n, f"lists task sizes that sum to {sum(sizes)}")
        return sizes
    hint = protocol.replace(" ", "").replace("×", "x").replace("X", "x").replace("_", "-")
    raise ValueError(
        f"data.protocol '{protocol}' is not a protocol name"
        + (f" (did you mean '{hint}'?)" if hint != protocol and valid_name(hint) else "")
        + f": write AxB (A tasks of B classes, e.g. 5x3), A-B-C... (task sizes in order, "
        f"e.g. 10-5), {ONE_PER_TASK} or {ALL_IN_ONE}"
    )


def valid_name(protocol: str) -> bool:
    """Whether ``protocol`` is well formed (it may still not fit a class count)."""
    return protocol in (ONE_PER_TASK, ALL_IN_ONE) or bool(
        _GRID.match(protocol) or _SIZES.match(protocol)
    )


def make_split(classes: list[str] | tuple[str, ...], protocol: str) -> list[list[str]]:
    """Cut ``classes`` (in order) into consecutive tasks by ``protocol``: split[t] = task t."""
    out, start = [], 0
    for size in task_sizes(protocol, len(classes)):
        out.append(list(classes[start : start + size]))
        start += size
    return out


def task_names(n_tasks: int) -> list[str]:
    """The task keys a chain of ``n_tasks`` uses in params.yaml: t0, t1, ..."""
    return [f"t{i}" for i in range(n_tasks)]
