"""``ccnf data use``: point the study at a dataset and a protocol by rewriting params.yaml.

dvc.yaml's ``foreach`` needs one ``tasks`` entry per task, each naming the checkpoint it starts
from, and DVC templating cannot derive them. So the keys that decide the split (``data.source``,
``data.root``, ``data.classes``, ``data.protocol``, ``data.generate``) and the ``tasks`` chain
are rewritten together, by one command, and validated before anything is written::

    ccnf data use folder --root ../shared/realdata/industrial12 --protocol 3-3-2-2-2
    ccnf data use --protocol 15x1          # same data, another protocol

The file is edited in place with ruamel (as ``dvc exp run -S`` does): comments and every other
key stay. :func:`overrides` gives the same change as ``dvc exp run -S`` flags, for experiments
that should not touch the workspace's params.yaml.
"""

from __future__ import annotations

import copy
import difflib
import io
import re
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq

from ccnf.atomic import write_text
from ccnf.config import INIT_CHECKPOINT, SYNTHETIC_ROOT, Params, parse_params
from ccnf.data import split as split_mod
from ccnf.data.manifest import require_root
from ccnf.errors import CcnfError

# the keys this command owns, in the order they are inserted when missing
DATA_KEYS = ("source", "root", "classes", "protocol", "generate")


@dataclass(frozen=True)
class DataChoice:
    """What params.yaml will say about the data (``classes`` None: the source's own list)."""

    source: str
    root: str
    classes: list[str] | None
    protocol: str

    @property
    def generate(self) -> list[str]:
        return ["synthetic"] if self.source == "synthetic" else []

    def class_list(self) -> list[str]:
        known = split_mod.default_classes(self.source)
        return list(self.classes) if self.classes is not None else list(known or [])

    def n_tasks(self) -> int:
        """Tasks of the split; a protocol that does not fit is a :class:`CcnfError`."""
        classes = self.class_list()
        try:
            return len(split_mod.make_split(classes, self.protocol))
        except ValueError as err:
            raise CcnfError(
                str(err), where=f"--protocol {self.protocol}",
                fix="pick a protocol from the list above (README: Your own data)",
            ) from None

    def tasks(self) -> dict[str, dict[str, str]]:
        """The chain for dvc.yaml's foreach: t0 from models/init, t(i) from models/t(i-1)."""
        names = split_mod.task_names(self.n_tasks())
        prevs = [INIT_CHECKPOINT, *(f"models/{n}" for n in names[:-1])]
        return {n: {"prev": p} for n, p in zip(names, prevs, strict=True)}


def _resolve(root: str, base: Path) -> Path:
    """``root`` as stages see it: relative paths are relative to the repository (``base``)."""
    path = Path(root).expanduser()
    return path if path.is_absolute() else base / path


def _check_known_classes(choice: DataChoice, root: Path) -> None:
    """For mvtec / visa with their own class list: every class must be there on disk."""
    if choice.classes is not None or choice.source not in ("mvtec", "visa"):
        return
    if choice.source == "visa":
        from ccnf.data.visa import visa_classes

        present = visa_classes(root)
    else:
        present = sorted(p.name for p in root.iterdir() if (p / "train" / "good").is_dir())
    missing = [c for c in choice.class_list() if c not in present]
    if missing:
        raise CcnfError(
            f"{len(missing)} of the {choice.source} classes are not under {root}: "
            f"{', '.join(missing)}",
            where=f"--root {root}",
            fix=f"pass the classes you have: --classes {','.join(present) or 'a,b'} "
            "(or point --root at the complete dataset)",
        )


def choose(
    current: dict[str, Any],
    *,
    source: str | None = None,
    root: str | None = None,
    protocol: str | None = None,
    classes: list[str] | None = None,
    base: Path = Path("."),
) -> DataChoice:
    """The data choice from the command's options, defaults from ``current`` (params as read).

    What is not given keeps its current value while the source stays the same; the class list
    is kept only when neither ``--root`` nor ``--classes`` is given (a protocol switch). With a
    root given, ``folder`` lists its class folders alphabetically and ``mvtec`` / ``visa`` use
    their official classes (``null``). Checks the root on disk.
    """
    data = current.get("data") or {}
    cur_source = data.get("source", "synthetic")
    cur_root = data.get("root", SYNTHETIC_ROOT)
    source = source or cur_source
    root_given = root is not None
    if source not in split_mod.SOURCES:
        hint = difflib.get_close_matches(source, split_mod.SOURCES, n=1)
        raise CcnfError(
            f"unknown data source '{source}'" + (f" (did you mean '{hint[0]}'?)" if hint else ""),
            fix=f"use one of {', '.join(split_mod.SOURCES)} (folder: any MVTec-layout root)",
        )
    if source == "synthetic":
        if root not in (None, SYNTHETIC_ROOT):
            raise CcnfError(
                f"the synthetic data lives in {SYNTHETIC_ROOT} (the synth stage writes it), "
                f"not {root}",
                fix="drop --root, or use source folder for MVTec-layout images on disk",
            )
        root = SYNTHETIC_ROOT
    else:
        if root is None and source == cur_source:
            root = cur_root
        if root is None:
            raise CcnfError(
                f"data source '{source}' needs the dataset's folder",
                fix=f"ccnf data use {source} --root PATH ...",
            )
        require_root(
            _resolve(root, base),
            "pass the folder holding the classes (relative paths are relative to the repository)",
            what="dataset root", where=f"--root {root}")
    if classes is None and not root_given and source == cur_source:
        classes = data.get("classes")  # e.g. --protocol alone: the same data, another split
    if classes is None and source == "folder":
        from ccnf.data.sources import discover_classes

        classes = discover_classes(_resolve(root, base))
    choice = DataChoice(
        source=source, root=root, classes=classes,
        protocol=protocol or data.get("protocol") or "5x3",
    )
    if source != "synthetic":
        _check_known_classes(choice, _resolve(root, base))
    try:
        split_mod.check_classes(source, choice.class_list())
    except ValueError as err:
        raise CcnfError(str(err), fix="pass --classes with the classes to use") from None
    choice.n_tasks()  # a protocol that does not fit fails here, before anything is written
    return choice


def apply_choice(raw: dict[str, Any], choice: DataChoice) -> dict[str, Any]:
    """A plain copy of ``raw`` with the data keys and the tasks chain of ``choice``."""
    out = copy.deepcopy(raw)
    out.pop("splits", None)
    data = out.setdefault("data", {})
    data |= {
        "source": choice.source,
        "root": choice.root,
        "classes": None if choice.classes is None else list(choice.classes),
        "protocol": choice.protocol,
        "generate": choice.generate,
    }
    out["tasks"] = choice.tasks()
    return out


def _yaml() -> YAML:
    y = YAML(typ="rt")
    y.default_flow_style = False
    y.width = 4096  # never wrap a long comment or path
    y.indent(mapping=2, sequence=2, offset=0)
    # write null as `null` (ruamel's default, an empty value, reads back the same but hides it)
    y.representer.add_representer(
        type(None), lambda r, _: r.represent_scalar("tag:yaml.org,2002:null", "null")
    )
    return y


def _seq(items: list[str]) -> CommentedSeq | list:
    return CommentedSeq(items) if items else []


_TOP_KEY = re.compile(r"^([A-Za-z_][\w-]*):")


def _block_start(lines: list[str], i: int) -> int:
    """Index of the first of the comment lines directly above line ``i`` (``i`` if none)."""
    while i > 0 and lines[i - 1].startswith("#"):
        i -= 1
    return i


def _gapped_sections(text: str) -> set[str]:
    """Top-level keys that have a blank line above them (above their comment lines)."""
    lines = text.split("\n")
    out = set()
    for i, line in enumerate(lines):
        m = _TOP_KEY.match(line)
        if m:
            k = _block_start(lines, i)
            if k > 0 and not lines[k - 1].strip():
                out.add(m.group(1))
    return out


def _restore_gaps(text: str, gapped: set[str]) -> str:
    """Put back the blank line above each key of ``gapped`` that lost it.

    ruamel keeps a blank line as a comment of the element before it, so replacing the tasks
    mapping drops the blank line between the last task and the next section.
    """
    out: list[str] = []
    for line in text.split("\n"):
        m = _TOP_KEY.match(line)
        if m and m.group(1) in gapped:
            k = _block_start(out, len(out))
            if k > 0 and out[k - 1].strip():
                out.insert(k, "")
        out.append(line)
    return "\n".join(out)


_EOL_COMMENT = re.compile(r"^(\s*[\w-]+:[^#'\"]*?)(\s+)(#.*)$")


def _align_comments(text: str, keys: tuple[str, ...]) -> str:
    """Put the end-of-line comments of ``keys`` back in the file's usual comment column.

    ruamel moves a comment right when a longer value pushes it, and keeps it there once read
    back: without this, switching to a long root and back would leave the comments adrift.
    """
    lines = text.split("\n")
    columns = [len(m.group(1)) + len(m.group(2)) for m in map(_EOL_COMMENT.match, lines) if m]
    if not columns:
        return text
    usual = max(set(columns), key=columns.count)
    for i, line in enumerate(lines):
        m = _EOL_COMMENT.match(line)
        if m and m.group(1).strip().split(":")[0] in keys:
            code = m.group(1).rstrip()
            lines[i] = code + " " * max(1, usual - len(code)) + m.group(3)
    return "\n".join(lines)


def rewrite_params(path: Path, choice: DataChoice) -> Params:
    """Write ``choice`` into the params file at ``path``, comments kept; validated first."""
    path = Path(path)
    y = _yaml()
    original = path.read_text(encoding="utf-8")
    doc = y.load(original)
    if not isinstance(doc, CommentedMap):
        raise CcnfError("params file must be a mapping of sections", where=str(path))
    doc.pop("splits", None)  # params.yaml from before data.classes / data.protocol
    data = doc.get("data")
    if not isinstance(data, CommentedMap):
        data = CommentedMap()
        doc.insert(0, "data", data)
    values: dict[str, Any] = {
        "source": choice.source,
        "root": choice.root,
        "classes": None if choice.classes is None else _seq(list(choice.classes)),
        "protocol": choice.protocol,
        "generate": _seq(choice.generate),
    }
    for pos, key in enumerate(DATA_KEYS):
        if key in data:
            data[key] = values[key]  # keeps the key's place and its comments
        else:
            data.insert(pos, key, values[key])
    old = doc.get("tasks")
    tasks = CommentedMap()
    for name, entry in choice.tasks().items():
        tasks[name] = CommentedMap(entry)
    if isinstance(old, CommentedMap) and "tasks" in doc:
        doc["tasks"] = tasks
    else:
        doc.insert(list(doc).index("data") + 1, "tasks", tasks)
    buf = io.StringIO()
    y.dump(doc, buf)
    text = _restore_gaps(buf.getvalue(), _gapped_sections(original) | {"tasks"})
    text = _align_comments(text, DATA_KEYS)
    params = parse_params(yaml.safe_load(text), str(path))
    write_text(path, text)
    return params


_PLAIN = re.compile(r"^[A-Za-z0-9_./-]+$")


def _plain_string(text: str) -> bool:
    """Whether the override grammar reads ``text`` unquoted as this very string."""
    if not _PLAIN.match(text) or text.lower() in ("null", "true", "false", "nan", "inf"):
        return False
    for parse in (float, lambda t: int(t, 0)):
        try:
            parse(text)
        except ValueError:
            continue
        return False  # '01', '1e3': a number unquoted
    return True


def _hydra(value: Any) -> str:
    """A value in the override grammar of ``dvc exp run -S`` (text that would read as another
    type, e.g. a class folder named '01', is quoted)."""
    if value is None:
        return "null"
    if isinstance(value, list):
        return "[" + ",".join(_hydra(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_hydra(v)}" for k, v in value.items()) + "}"
    text = str(value)
    if _plain_string(text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def overrides(raw: dict[str, Any], choice: DataChoice) -> list[str]:
    """``dvc exp run -S`` overrides that turn params ``raw`` into the rewrite of ``choice``.

    Tasks that go away are deleted (``~tasks.tK``), new ones added (``+tasks.tK={...}``): a
    plain ``tasks={...}`` would be merged into the old mapping, not replace it.
    """
    if "splits" in raw:
        raise CcnfError(
            "params has a 'splits' section (from before data.classes / data.protocol)",
            fix="rewrite it once with ccnf data use (without --overrides)",
        )
    new = apply_choice(raw, choice)
    data, new_data = raw.get("data") or {}, new["data"]
    out = []
    for key in DATA_KEYS:
        if key not in data:
            out.append(f"+data.{key}={_hydra(new_data[key])}")
        elif data[key] != new_data[key]:
            out.append(f"data.{key}={_hydra(new_data[key])}")
    old_tasks, new_tasks = raw.get("tasks") or {}, new["tasks"]
    out += [f"~tasks.{name}" for name in old_tasks if name not in new_tasks]
    for name, entry in new_tasks.items():
        if name not in old_tasks:
            out.append(f"+tasks.{name}={_hydra(entry)}")
        elif old_tasks[name] != entry:
            out.append(f"tasks.{name}.prev={_hydra(entry['prev'])}")
    return out


def overrides_command(flags: list[str]) -> str:
    """The ``dvc exp run`` command line of these overrides, quoted for a POSIX shell."""
    return " ".join(["dvc", "exp", "run", *(f"-S {shlex.quote(f)}" for f in flags)])
