"""dvc.yaml's code dependencies cannot go stale: every module a stage can run is a dep."""

from __future__ import annotations

import shutil
from pathlib import Path

from conftest import REPO

from ccnf.depgraph import minimal_deps, module_files, rewrite_code_deps, stage_code, uncovered


def test_every_stage_lists_every_module_it_imports() -> None:
    stages = stage_code(REPO / "dvc.yaml")
    assert set(stages) == {"synth", "prepare", "extract", "init", "train", "evaluate",
                           "aggregate"}
    for name, (script, deps) in stages.items():
        files = module_files(REPO, [script])
        assert script in files and len(files) > 5, name
        missing = uncovered(files, deps)
        assert not missing, (
            f"stage {name} runs {[str(p) for p in missing]} but dvc.yaml does not list them; "
            f"run `ccnf deps` and write these code deps: {minimal_deps(REPO, files)}"
        )


def test_the_stages_that_learn_depend_on_the_optimizer_and_every_model() -> None:
    """The modules the issue found missing (train.py for init, optim/features/config for
    train, metrics for aggregate) and the registry's models, reached only by import path."""
    stages = stage_code(REPO / "dvc.yaml")
    for stage, module in (("init", "ccnf/train.py"), ("train", "ccnf/optim.py"),
                          ("train", "ccnf/features.py"), ("train", "ccnf/config.py"),
                          ("train", "ccnf/models/bank.py"), ("evaluate", "ccnf/models/ccnf.py"),
                          ("aggregate", "ccnf/metrics/ranking.py")):
        script, deps = stages[stage]
        assert Path(module) in module_files(REPO, [script]), (stage, module)
        assert not uncovered([Path(module)], deps), (stage, module)
    # and no stage drags in code it cannot run: data preparation never needs a model
    for stage in ("synth", "prepare", "extract"):
        files = module_files(REPO, [stages[stage][0]])
        assert not any(p.parts[:2] in (("ccnf", "models"), ("ccnf", "flows")) for p in files)


def _write(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        path = root / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)


def test_the_check_catches_a_missing_module(tmp_path: Path) -> None:
    """Lazy imports, relative imports, registry strings and stage helpers are all followed,
    and a module left out of the deps is reported."""
    _write(tmp_path, {
        "stages/run.py": "from _common import parse\n\ndef main():\n    import ccnf.a\n",
        "stages/_common.py": "from ccnf import b\n",
        "ccnf/__init__.py": "",
        "ccnf/a.py": "from .sub import c\n",
        "ccnf/b.py": 'MODELS = {"toy": "ccnf.sub.toy:Toy"}\n',
        "ccnf/sub/__init__.py": "",
        "ccnf/sub/c.py": "x = 1\n",
        "ccnf/sub/toy.py": "import ccnf.d\n",
        "ccnf/d.py": "",
        "ccnf/unused.py": "",
        "dvc.yaml": "stages:\n  run:\n    cmd: python stages/run.py\n    deps:\n"
                    "    - stages/run.py\n    - stages/_common.py\n    - ccnf/__init__.py\n"
                    "    - ccnf/a.py\n    - ccnf/b.py\n    - ccnf/sub\n",
    })
    script, deps = stage_code(tmp_path / "dvc.yaml")["run"]
    files = module_files(tmp_path, [script])
    assert Path("ccnf/unused.py") not in files
    assert uncovered(files, deps) == [Path("ccnf/d.py")]
    assert uncovered(files, [*deps, "ccnf/d.py"]) == []
    assert "ccnf/sub" in minimal_deps(tmp_path, files)


def test_rewriting_the_code_deps_keeps_the_data_deps_and_fixes_the_gap(tmp_path: Path) -> None:
    text = ("# comment\nstages:\n  run:\n    cmd: python stages/run.py\n    deps:\n"
            "    - stages/run.py\n    - ccnf/a.py\n    - features\n    - ${item.prev}\n"
            "    params:\n    - seed\n")
    out = rewrite_code_deps(text, {"run": ["ccnf/a.py", "ccnf/d.py", "stages/run.py"]})
    assert out.startswith("# comment\n") and out.endswith("    params:\n    - seed\n")
    assert "    - ccnf/a.py\n    - ccnf/d.py\n    - stages/run.py\n    - features\n" \
        "    - ${item.prev}\n" in out
    assert rewrite_code_deps(out, {"run": ["ccnf/a.py", "ccnf/d.py", "stages/run.py"]}) == out


def test_bytecode_caches_are_not_part_of_a_code_dependency(tmp_path: Path) -> None:
    """A checkout where Python wrote __pycache__ next to the code must hash ccnf/ as a clean
    clone does, or a dvc.lock made there is stale everywhere else (it happened: .dvcignore)."""
    from dvc.repo import Repo

    shutil.copy(REPO / ".dvcignore", tmp_path / ".dvcignore")
    repo = Repo.init(str(tmp_path), no_scm=True)
    code = tmp_path / "ccnf" / "flows"
    (code / "__pycache__").mkdir(parents=True)
    (code / "__pycache__" / "flow.cpython-311.pyc").write_bytes(b"\x00")
    (code / "flow.py").write_text("x = 1\n")
    assert repo.dvcignore.is_ignored(repo.fs, str(code / "__pycache__"))
    assert repo.dvcignore.is_ignored(repo.fs, str(code / "__pycache__" / "flow.cpython-311.pyc"))
    assert not repo.dvcignore.is_ignored(repo.fs, str(code / "flow.py"))
