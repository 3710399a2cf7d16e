"""Which project files a stage script runs: the code dependencies dvc.yaml must list.

DVC re-runs a stage only when one of its listed ``deps`` changes, so a module the stage
imports but does not list is a stale-result bug (an edit to it leaves ``dvc repro`` saying
"up to date"). :func:`module_files` follows every ``import ccnf...`` / ``from ccnf... import``
of a script, at any depth (imports inside functions too, since they run), plus the model
classes the registry names by import path, and returns the files; :func:`uncovered` says which
of them a stage's deps miss. ``tests/test_dvc_deps.py`` runs it on every stage of dvc.yaml;
``ccnf deps STAGE`` prints the list.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterable
from pathlib import Path

PACKAGE = "ccnf"


def _module_file(root: Path, module: str) -> Path | None:
    """The file of a dotted module name under ``root`` (a package's __init__.py), or None."""
    base = root.joinpath(*module.split("."))
    for path in (base.with_suffix(".py"), base / "__init__.py"):
        if path.is_file():
            return path
    return None


def _imports(path: Path, module: str) -> set[str]:
    """Dotted names of the ccnf modules ``path`` imports (absolute or relative), and of the
    modules named by ``"ccnf.x.y:Name"`` strings (registry entries)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1])
                name = f"{base}.{node.module}" if node.module else base
            else:
                name = node.module or ""
            found.add(name)
            # `from ccnf.x import y` may import the submodule ccnf.x.y
            found |= {f"{name}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Constant) and isinstance(node.value, str):
            target, sep, _ = node.value.partition(":")
            if sep and target.startswith(f"{PACKAGE}."):
                found.add(target)
    return {m for m in found if m == PACKAGE or m.startswith(f"{PACKAGE}.")}


def module_files(root: Path, scripts: Iterable[Path]) -> set[Path]:
    """Every project file that running ``scripts`` can execute: the scripts, the ccnf modules
    they reach through imports (transitively), and each package's __init__.py on the way;
    stage helpers next to a script (``from _common import ...``) count too. Paths relative
    to ``root``."""
    root = Path(root)
    todo: list[tuple[Path, str]] = []
    for script in scripts:
        todo.append((root / script, ""))
    seen: set[Path] = set()
    while todo:
        path, module = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        names = _imports(path, module) if module else _script_imports(path)
        for name in names:
            parts = name.split(".")
            # the module and every package above it run on import
            for i in range(1, len(parts) + 1):
                dotted = ".".join(parts[:i])
                file = _module_file(root, dotted)
                if file is not None and file not in seen:
                    todo.append((file, dotted))
        if not module:  # sibling helpers of a stage script (stages/_common.py)
            for local in _local_imports(path):
                todo.append((path.parent / f"{local}.py", ""))
    return {p.relative_to(root) for p in seen}


def _script_imports(path: Path) -> set[str]:
    return _imports(path, "__main__")


def _local_imports(path: Path) -> set[str]:
    """Top-level modules a script imports from its own folder (e.g. ``_common``)."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and not node.level and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return {n for n in names if "." not in n and (path.parent / f"{n}.py").is_file()}


def uncovered(files: Iterable[Path], deps: Iterable[str]) -> list[Path]:
    """The files no dep covers (a dep covers itself and, for a folder, everything below)."""
    dep_paths = [Path(d) for d in deps]
    return sorted(
        f for f in files
        if not any(f == d or d in f.parents for d in dep_paths)
    )


def stage_code(dvc_yaml: Path) -> dict[str, tuple[Path, list[str]]]:
    """{stage: (its script, its deps)} for every stage of dvc.yaml whose command runs
    ``python <script>.py`` (a foreach stage's ``do`` counts once)."""
    import yaml

    raw = yaml.safe_load(Path(dvc_yaml).read_text(encoding="utf-8"))
    out: dict[str, tuple[Path, list[str]]] = {}
    for name, stage in raw.get("stages", {}).items():
        body = stage.get("do", stage)
        words = str(body.get("cmd", "")).split()
        script = next((w for w in words if w.endswith(".py")), None)
        if script is not None:
            out[name] = (Path(script), [str(d) for d in body.get("deps", [])])
    return out


def minimal_deps(root: Path, files: Iterable[Path]) -> list[str]:
    """The shortest dep list that covers ``files`` exactly: a package folder below ``ccnf/``
    whose every module is needed is listed as the folder, anything else file by file."""
    root = Path(root)
    need = set(files)
    out: set[Path] = set(need)
    for folder in sorted({p.parent for p in need}, key=lambda p: len(p.parts)):
        if len(folder.parts) < 2 or folder.parts[0] != PACKAGE:
            continue
        modules = {p.relative_to(root) for p in (root / folder).rglob("*.py")
                   if "__pycache__" not in p.parts}
        if modules <= need and not any(a in out for a in folder.parents):
            out = {p for p in out if folder not in p.parents} | {folder}
    return sorted(str(p) for p in out)


def rewrite_code_deps(text: str, code: dict[str, list[str]]) -> str:
    """dvc.yaml ``text`` with each listed stage's code deps (entries under ccnf/ or stages/)
    replaced by ``code[stage]``; its other deps (data, outputs of earlier stages) follow them
    unchanged, and comments and layout elsewhere are kept."""
    lines = text.split("\n")
    out: list[str] = []
    stage = None
    i = 0
    while i < len(lines):
        line = lines[i]
        head = re.match(r"^  ([A-Za-z0-9_@-]+):\s*$", line)
        if head:
            stage = head.group(1)
        if stage in code and re.match(r"^\s*deps:\s*$", line):
            out.append(line)
            i += 1
            indent, others = None, []
            while i < len(lines):
                item = re.match(r"^(\s*)- (.*)$", lines[i])
                if not item or (indent is not None and item.group(1) != indent):
                    break
                indent = item.group(1)
                value = item.group(2).strip()
                if not value.startswith((f"{PACKAGE}/", "stages/")):
                    others.append(value)
                i += 1
            out += [f"{indent}- {v}" for v in [*code[stage], *others]]
            continue
        out.append(line)
        i += 1
    return "\n".join(out)
