"""The variant catalog: validation, `dvc exp run -S` overrides, running through DVC."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from conftest import REPO
from typer.testing import CliRunner

from ccnf.catalog import (
    Experiment,
    apply_overrides,
    load_catalog,
    match_records,
    parse_exp_show,
    parse_override,
    run_leaving_children,
    schema_key_error,
)
from ccnf.cli import app
from ccnf.config import parse_params
from ccnf.errors import CcnfError

PARAMS = REPO / "params.yaml"
CATALOG = REPO / "catalog.yaml"


def _write_catalog(tmp_path: Path, experiments: dict, **top) -> Path:
    doc = {"reference": "E11", "ci_subset": [], **top,
           "experiments": {"E11": {"description": "default", "overrides": []}, **experiments}}
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


def _load_error(tmp_path: Path, experiments: dict, **top) -> str:
    with pytest.raises(CcnfError) as err:
        load_catalog(_write_catalog(tmp_path, experiments, **top), PARAMS)
    return err.value.render()


# ----------------------------------------------------------------------------- the file


def test_repository_catalog_is_valid_and_complete() -> None:
    cat = load_catalog(CATALOG, PARAMS)
    for required in ("E0", "E1", "E2", "E3", "E4", "E5", "E6", "E7", "E9-cal", "E10", "E11",
                     "E12-1", "P6", "P6-sn0", "U", "W-half", "replay", "joint", "S-oracle",
                     "B-gaussian", "B-flow_bank"):
        assert required in cat.experiments, required
    assert cat.reference == "E11" and cat.experiments["E11"].overrides == ()
    assert set(cat.ci_subset) <= set(cat.experiments) and 1 <= len(cat.ci_subset) <= 4
    e0 = cat.experiments["E0"]
    assert e0.overrides == ("loss.lambda_center=0.0",)
    assert e0.note is not None and (e0.note.image_auroc, e0.note.pixel_auroc) == (0.6811, 0.8360)
    # every experiment differs from the reference, and no two experiments are the same run
    base = yaml.safe_load(PARAMS.read_text())
    seen: dict[str, str] = {}
    for exp in cat.experiments.values():
        applied = json.dumps(exp.expected_params(base), sort_keys=True)
        assert applied not in seen, f"{exp.id} is the same run as {seen.get(applied)}"
        seen[applied] = exp.id


def test_catalog_runs_every_confound_switch_in_both_positions() -> None:
    """Issue 10: each confound is a switch, and the catalog measures both of its positions."""
    cat = load_catalog(CATALOG, PARAMS)
    base = yaml.safe_load(PARAMS.read_text())
    switches = {("loss", "negatives"): {"task", "seen"},
                ("flow", "prototypes"): {"fixed", "shared"},
                ("flow", "spectral_norm_switch"): {"absorb", "jump"},
                ("score", "level_fusion"): {"mean", "standardized", "position"}}
    found: dict[tuple[str, str], set[str]] = {key: set() for key in switches}
    for exp in cat.experiments.values():
        applied = apply_overrides(base, exp.overrides)
        for section, key in switches:
            found[(section, key)].add(str(applied[section][key]))
    assert found == switches
    # the SN switch only matters where spectral norm turns on after task 0: both positions there
    late = [apply_overrides(base, e.overrides)["flow"] for e in cat.experiments.values()]
    late = [f["spectral_norm_switch"] for f in late
            if f["spectral_norm"] and not f["spectral_norm_first_task"]]
    assert set(late) == {"absorb", "jump"}


def test_unknown_key_names_the_experiment_and_suggests(tmp_path: Path) -> None:
    msg = _load_error(tmp_path, {"Ebad": {"description": "x",
                                          "overrides": ["loss.lambda_centre=0.1"]}})
    assert "Ebad" in msg and "loss.lambda_centre" in msg
    assert "did you mean 'loss.lambda_center'" in msg
    msg = _load_error(tmp_path, {"Ebad": {"description": "x", "overrides": ["floww.prior=x"]}})
    assert "Ebad" in msg and "'floww.prior' is not a params key" in msg


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        ("loss.lambda_center=-1.0", "loss.lambda_center"),  # negative weight
        ("train.strategy=sometimes", "train.strategy"),  # not one of the literals
        ("flow.hidden_dim=wide", "flow.hidden_dim"),  # text for an int
        ("score.proto_power=3", "score.proto_power"),
        ("train.strategy=replay", "replay_buffer"),  # cross-field rule of the schema
    ],
)
def test_bad_value_names_the_experiment_and_key(tmp_path: Path, override: str,
                                                expected: str) -> None:
    msg = _load_error(tmp_path, {"Ebad": {"description": "x", "overrides": [override]}})
    assert "experiment 'Ebad'" in msg and expected in msg


@pytest.mark.parametrize(
    ("experiments", "top", "expected"),
    [
        ({"E1": {"description": "x", "overrides": ["+loss.new=1"]}}, {}, "adds or deletes"),
        ({"E1": {"description": "x", "overrides": ["~loss.lambda_mi"]}}, {}, "adds or deletes"),
        ({"E1": {"description": "x", "overrides": ["loss.lambda_mi=0.1,0.2"]}}, {}, "sweep"),
        ({"E1": {"description": "x", "overrides": ["loss.lambda_mi=0.1", "loss.lambda_mi=0.2"]}},
         {}, "sets 'loss.lambda_mi' twice"),
        ({"E1": {"description": "x", "overrides": ["loss=1"]}}, {}, "whole section"),
        ({"E 1": {"description": "x", "overrides": []}}, {}, "not usable as a DVC experiment"),
        ({"E1": {"description": "x", "overides": []}}, {}, "overides"),
        ({"E1": {"description": "x", "overrides": []}}, {"ci_subset": ["E9"]}, "unknown "
         "experiment 'E9'"),
        ({"E1": {"description": "x", "overrides": []}}, {"reference": "E1"}, None),
        ({"E1": {"description": "x", "overrides": [],
                 "note": {"label": "n", "image_auroc": 1.5, "pixel_auroc": 0.8}}}, {},
         "image_auroc"),
    ],
)
def test_malformed_catalogs_are_rejected(tmp_path: Path, experiments: dict, top: dict,
                                         expected: str | None) -> None:
    if expected is None:  # a valid variant of the file: loads
        cat = load_catalog(_write_catalog(tmp_path, experiments, **top), PARAMS)
        assert cat.reference == top["reference"]
        return
    assert expected in _load_error(tmp_path, experiments, **top)


def test_reference_with_overrides_and_duplicate_ids_are_rejected(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text("reference: E11\nexperiments:\n  E11:\n    description: a\n"
                    "    overrides: [seed=1]\n")
    with pytest.raises(CcnfError, match="reference 'E11' has overrides"):
        load_catalog(path, PARAMS)
    path.write_text("reference: E11\nexperiments:\n  E11:\n    description: a\n"
                    "  E0:\n    description: b\n  E0:\n    description: c\n")
    with pytest.raises(CcnfError, match="duplicate key 'E0'"):
        load_catalog(path, PARAMS)


def test_select_orders_and_rejects_unknown_ids() -> None:
    cat = load_catalog(CATALOG, PARAMS)
    assert [e.id for e in cat.select(["E6", "E0"])] == ["E0", "E6"]  # catalog order
    assert [e.id for e in cat.select([], ci=True)] == [
        i for i in cat.ids if i in cat.ci_subset]
    assert len(cat.select([], all_=True)) == len(cat.ids)
    with pytest.raises(CcnfError, match="did you mean 'E9-cal'"):
        cat.select(["E9cal"])
    with pytest.raises(CcnfError, match="no experiment selected"):
        cat.select([])


# ----------------------------------------------------------------------------- overrides


@pytest.mark.parametrize(
    ("text", "key", "value"),
    [
        ("loss.lambda_center=0.0", "loss.lambda_center", 0.0),
        ("train.sub_epochs=3", "train.sub_epochs", 3),
        ("train.sub_epochs=null", "train.sub_epochs", None),
        ("flow.feature_norm=true", "flow.feature_norm", True),
        ("flow.prior=class_mixture", "flow.prior", "class_mixture"),
        ("train.lr=1e-3", "train.lr", 0.001),  # a float for DVC (PyYAML would say '1e-3')
        ("loss.noise_sigmas=[0.1,0.2]", "loss.noise_sigmas", [0.1, 0.2]),
        ("backbone.name='123'", "backbone.name", "123"),
    ],
)
def test_parse_override_types_values_like_dvc(text: str, key: str, value: object) -> None:
    got_key, got = parse_override(text)
    assert got_key == key and got == value and type(got) is type(value)


def test_apply_overrides_walks_lists_and_refuses_new_keys() -> None:
    raw = yaml.safe_load(PARAMS.read_text())
    out = apply_overrides(raw, ["loss.noise_sigmas.0=0.3", "train.sub_epochs=2"])
    assert out["loss"]["noise_sigmas"][0] == 0.3 and out["train"]["sub_epochs"] == 2
    assert raw["train"]["sub_epochs"] is None  # the input is not modified
    with pytest.raises(CcnfError, match=r"no key 'loss\.lambda_centre'"):
        apply_overrides(raw, ["loss.lambda_centre=1.0"])
    with pytest.raises(CcnfError, match="not an index"):
        apply_overrides(raw, ["loss.noise_sigmas.9=0.1"])
    assert schema_key_error("flow.prior") is None
    assert schema_key_error("data.classes.0") is None
    assert schema_key_error("tasks.t0.prev") is None
    assert "is a value" in (schema_key_error("seed.x") or "")


def test_overrides_equal_what_dvc_exp_run_writes(tmp_path: Path) -> None:
    """Every catalog entry: our applied params == DVC's own `-S` rewrite of params.yaml.

    `dvc exp run -S` calls dvc.utils.hydra.apply_overrides on params.yaml (queue/base.py);
    call it on a copy and compare the parsed files, value and type.
    """
    from dvc.utils.hydra import apply_overrides as dvc_apply

    cat = load_catalog(CATALOG, PARAMS)
    base = yaml.safe_load(PARAMS.read_text())
    for exp in cat.experiments.values():
        target = tmp_path / f"{exp.id}.yaml"
        shutil.copy(PARAMS, target)
        dvc_apply(target, [*exp.data_overrides, *exp.overrides])
        theirs = yaml.safe_load(target.read_text())
        ours = exp.expected_params(base)
        assert json.dumps(ours, sort_keys=True) == json.dumps(theirs, sort_keys=True), exp.id
        parse_params(ours)


def test_a_protocol_entry_switches_the_split_to_its_analogue(tmp_path: Path) -> None:
    """protocol: 15x1 becomes data.protocol and the added tasks; on 15 classes it is itself."""
    path = _write_catalog(tmp_path, {
        "one": {"description": "one class per task", "protocol": "15x1",
                "overrides": ["train.strategy=adapters"]},
        "three": {"description": "three tasks", "protocol": "3x5"},
    })
    cat = load_catalog(path, PARAMS)
    one, three = cat.experiments["one"], cat.experiments["three"]
    assert one.data_overrides[0] == "data.protocol=15x1"
    assert "+tasks.t14={prev: models/t13}" in one.data_overrides
    assert three.data_overrides == ("data.protocol=3x5", "~tasks.t3", "~tasks.t4")
    params = parse_params(one.expected_params(yaml.safe_load(PARAMS.read_text())))
    assert len(params.split) == 15 and params.train.strategy == "adapters"
    assert one.set_args()[-2:] == ["-S", "train.strategy=adapters"]


def test_protocol_entries_are_checked(tmp_path: Path) -> None:
    misfit = _load_error(tmp_path, {"x": {"description": "d", "protocol": "4x4"}})
    assert "experiments.x" in misfit and "4x4" in misfit
    by_hand = _load_error(tmp_path, {"x": {"description": "d",
                                           "overrides": ["data.protocol=15x1"]}})
    assert "protocol:" in by_hand


def test_a_wrong_application_would_be_caught(tmp_path: Path) -> None:
    """The comparison above can fail: a value typed differently is told apart."""
    from dvc.utils.hydra import apply_overrides as dvc_apply

    target = tmp_path / "p.yaml"
    shutil.copy(PARAMS, target)
    dvc_apply(target, ["train.sub_epochs=3"])
    theirs = yaml.safe_load(target.read_text())
    wrong = apply_overrides(yaml.safe_load(PARAMS.read_text()), ["train.sub_epochs='3'"])
    assert json.dumps(wrong, sort_keys=True) != json.dumps(theirs, sort_keys=True)


# ----------------------------------------------------------------------------- through DVC

FAKE_STAGE = """\
import hashlib, json, os, yaml
p = yaml.safe_load(open("params.yaml"))
h = int(hashlib.sha1(json.dumps(p, sort_keys=True).encode()).hexdigest()[:6], 16) / 16**6
m = {s: {"image_auroc": round(h, 6), "pixel_auroc": 0.7, "aupro": 0.4, "image_forgetting": 0.1,
         "pixel_forgetting": 0.05} for s in ("nf", "proto", "hybrid")}
os.makedirs("metrics", exist_ok=True)
json.dump(m, open("metrics/summary.json", "w"))
open("ran_train.txt", "w").write("x")
"""

FAKE_DVC_YAML = """\
stages:
  extract:
    cmd: python -c "open('features.txt', 'w').write('f')"
    params:
    - backbone
    outs:
    - features.txt
  train:
    cmd: python train.py
    deps:
    - train.py
    - features.txt
    params:
    - flow
    - loss
    - train
    - score
    outs:
    - metrics/summary.json:
        cache: false
metrics:
- metrics/summary.json
"""


def _env() -> dict[str, str]:
    return {**os.environ, "DVC_NO_ANALYTICS": "1",
            "PATH": str(Path(sys.executable).parent) + os.pathsep + os.environ["PATH"]}


def _git(*args: str, cwd: Path) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env=_env())


def _dvc(*args: str, cwd: Path) -> str:
    proc = subprocess.run([sys.executable, "-m", "dvc", *args], cwd=cwd, capture_output=True,
                          text=True, env=_env())
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def mini_repo(tmp_path_factory) -> Path:
    """A git + DVC repo with the real params.yaml and catalog, and a 2-stage stand-in pipeline."""
    work = tmp_path_factory.mktemp("catalog_repo")
    shutil.copy(PARAMS, work / "params.yaml")
    shutil.copy(CATALOG, work / "catalog.yaml")
    (work / "train.py").write_text(FAKE_STAGE)
    (work / "dvc.yaml").write_text(FAKE_DVC_YAML)
    _git("init", "-q", cwd=work)
    _git("config", "user.name", "t", cwd=work)
    _git("config", "user.email", "t@t", cwd=work)
    _dvc("init", "-q", cwd=work)
    _dvc("repro", "-q", cwd=work)
    _git("add", "-A", cwd=work)
    _git("commit", "-qm", "base", cwd=work)
    return work


def test_catalog_run_equals_dvc_exp_run_with_its_overrides(mini_repo: Path,
                                                           monkeypatch) -> None:
    """`ccnf catalog run ID` records exactly params.yaml + ID's overrides, as DVC sees them."""
    monkeypatch.chdir(mini_repo)
    runner = CliRunner()
    res = runner.invoke(app, ["catalog", "run", "E4", "--timing", "timing.json"])
    assert res.exit_code == 0, res.output
    timing = json.loads((mini_repo / "timing.json").read_text())
    assert timing["ids"] == ["E4"] and timing["wall_s"] > 0
    assert timing["experiments"]["E4"]["stages_run"] == ["train"]  # extract reused

    show = json.loads(_dvc("exp", "show", "--json", cwd=mini_repo))
    records = {r.name: r for r in parse_exp_show(show)}
    cat = load_catalog("catalog.yaml", "params.yaml")
    e4 = cat.experiments["E4"]
    base = yaml.safe_load((mini_repo / "params.yaml").read_text())
    assert records["E4"].params == apply_overrides(base, e4.overrides)
    assert records["E4"].params != base
    # the same experiment typed by hand: DVC records the same params
    _dvc("exp", "run", "--queue", "-n", "E4-by-hand", *e4.set_args(), cwd=mini_repo)
    queued = json.loads(_dvc("exp", "show", "--json", cwd=mini_repo))
    hand = next(e["revs"][0] for c in queued for e in c.get("experiments") or []
                if e["name"] == "E4-by-hand")
    assert hand["data"]["params"]["params.yaml"]["data"] == records["E4"].params
    _dvc("queue", "remove", "E4-by-hand", cwd=mini_repo)
    rows = {r.exp.id: r for r in match_records(cat, parse_exp_show(show))}
    assert rows["E4"].problem is None
    assert rows["E11"].record is not None and rows["E11"].record.kind == "workspace"
    assert rows["E0"].record is None

    # the same command again keeps the finished experiment (a re-run after a crash finishes
    # the rest); --force replaces it; the table comes from DVC's records
    res = runner.invoke(app, ["catalog", "run", "E4"])
    assert res.exit_code == 0 and "kept: E4" in res.output and "nothing left" in res.output
    res = runner.invoke(app, ["catalog", "run", "E4", "--force"])
    assert res.exit_code == 0 and "replaced earlier experiment(s): E4" in res.output
    assert _dvc("exp", "list", "--name-only", cwd=mini_repo).split().count("E4") == 1
    res = runner.invoke(app, ["catalog", "table"])
    assert res.exit_code == 0
    e4_line = next(ln for ln in res.output.splitlines() if ln.startswith("| E4 |"))
    assert "| 0.7000 | 0.4000 | 0.1000 | 0.0500 |" in e4_line  # the stand-in stage's metrics
    assert next(ln for ln in res.output.splitlines() if ln.startswith("| E0 |")).count("—") == 8
    # every headline metric per score definition between two catalog experiments
    diff = json.loads(_dvc("metrics", "diff", "HEAD", "E4", "--all", "--json", cwd=mini_repo))
    keys = set(diff["metrics/summary.json"])
    for score in ("nf", "proto", "hybrid"):
        for metric in ("image_auroc", "pixel_auroc", "aupro", "image_forgetting",
                       "pixel_forgetting"):
            assert f"{score}.{metric}" in keys


def test_a_finished_seed_replicate_is_kept_as_a_row_is(mini_repo: Path, monkeypatch) -> None:
    """The same command with --seed, run again after a crash, keeps the replicates that
    finished (the failure report promises it) and runs the rest; --force replaces them."""
    monkeypatch.chdir(mini_repo)
    runner = CliRunner()
    res = runner.invoke(app, ["catalog", "run", "E4", "--seed", "1"])
    assert res.exit_code == 0, res.output
    res = runner.invoke(app, ["catalog", "run", "E4", "--seed", "1", "--seed", "2"])
    assert res.exit_code == 0, res.output
    kept = next(ln for ln in res.output.splitlines() if "kept:" in ln)
    assert "E4-seed1" in kept and "E4-seed2" not in kept
    names = _dvc("exp", "list", "--name-only", cwd=mini_repo).split()
    assert names.count("E4-seed1") == 1 and names.count("E4-seed2") == 1
    res = runner.invoke(app, ["catalog", "run", "E4", "--seed", "2", "--force"])
    assert res.exit_code == 0 and "replaced earlier experiment(s): E4-seed2" in res.output


def test_catalog_run_through_the_queue_with_two_workers(mini_repo: Path, monkeypatch) -> None:
    """--jobs 2: `dvc exp run --queue` per experiment, `dvc queue start -j 2`, wait, record."""
    monkeypatch.chdir(mini_repo)
    try:
        res = CliRunner().invoke(app, ["catalog", "run", "E0", "E6", "--jobs", "2",
                                       "--timing", "timing_q.json"])
    finally:
        # `dvc queue start` leaves its workers idling after the queue drains (the runner does
        # not stop them: a user's other queued runs may follow); a test must not leave them
        _dvc("queue", "stop", cwd=mini_repo)
    assert res.exit_code == 0, res.output
    timing = json.loads((mini_repo / "timing_q.json").read_text())
    assert timing["mode"] == "queue" and timing["jobs"] == 2
    for exp_id in ("E0", "E6"):
        assert timing["experiments"][exp_id]["ok"]
        assert timing["experiments"][exp_id]["stages_run"] == ["train"]
    records = {r.name: r for r in parse_exp_show(json.loads(_dvc("exp", "show", "--json",
                                                                  cwd=mini_repo)))}
    base = yaml.safe_load((mini_repo / "params.yaml").read_text())
    cat = load_catalog("catalog.yaml", "params.yaml")
    for exp_id in ("E0", "E6"):
        assert records[exp_id].params == apply_overrides(base, cat.experiments[exp_id].overrides)


def test_catalog_run_refuses_what_would_not_reach_the_experiment(mini_repo: Path,
                                                                   monkeypatch) -> None:
    """Uncommitted params would leak into every run; untracked code would be missing."""
    monkeypatch.chdir(mini_repo)
    params = mini_repo / "params.yaml"
    original = params.read_text()
    try:
        params.write_text(original.replace("seed: 0", "seed: 1", 1))
        res = CliRunner().invoke(app, ["catalog", "run", "E0"])
        assert res.exit_code == 1 and "uncommitted changes in params.yaml" in res.output
    finally:
        params.write_text(original)
    module = mini_repo / "ccnf" / "extra.py"
    module.parent.mkdir(exist_ok=True)
    module.write_text("X = 1\n")
    try:
        res = CliRunner().invoke(app, ["catalog", "run", "E0"])
        assert res.exit_code == 1 and "untracked source files ccnf/extra.py" in res.output
    finally:
        shutil.rmtree(module.parent)


def test_catalog_run_dry_run_prints_the_dvc_commands(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    res = CliRunner().invoke(app, ["catalog", "run", "E3-metaE4", "E0", "--dry-run"])
    assert res.exit_code == 0, res.output
    lines = res.output.strip().splitlines()
    assert lines == [
        "dvc exp run --temp -n E0 -S loss.lambda_center=0.0",
        "dvc exp run --temp -n E3-metaE4 -S train.first_task_reg_scale=0.1 "
        "-S train.meta_epochs=4",
    ]
    res = CliRunner().invoke(app, ["catalog", "run", "--ci", "--jobs", "2", "--dry-run"])
    assert res.exit_code == 0 and res.output.strip().endswith("dvc queue start -j 2")
    assert all("--queue" in ln for ln in res.output.strip().splitlines()[:-1])


def test_seed_replicates_run_the_row_at_another_seed_under_their_own_name(monkeypatch) -> None:
    monkeypatch.chdir(REPO)
    res = CliRunner().invoke(
        app, ["catalog", "run", "E0", "--seed", "1", "--seed", "2", "--seed", "1", "--dry-run"])
    assert res.exit_code == 0, res.output
    assert res.output.strip().splitlines() == [
        "dvc exp run --temp -n E0-seed1 -S loss.lambda_center=0.0 -S seed=1",
        "dvc exp run --temp -n E0-seed2 -S loss.lambda_center=0.0 -S seed=2",
    ]
    exp = Experiment("X", "d", ("a.b=1",), protocol="15x1", data_overrides=("data.protocol=15x1",))
    rep = exp.with_seed(3)
    assert (rep.id, rep.protocol, rep.data_overrides) == ("X-seed3", "15x1", exp.data_overrides)
    assert rep.set_args()[-2:] == ["-S", "seed=3"]
    base = yaml.safe_load((REPO / "params.yaml").read_text())
    assert Experiment("E", "d", ("loss.lambda_center=0.0",)).with_seed(2).expected_params(
        base)["seed"] == 2
    with pytest.raises(CcnfError, match="sets seed in its overrides"):
        Experiment("Y", "d", ("seed=4",)).with_seed(1)
    with pytest.raises(CcnfError, match="seed must be >= 0"):
        exp.with_seed(-1)


def test_catalog_list_and_errors_are_one_clean_message(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.chdir(REPO)
    res = CliRunner().invoke(app, ["catalog", "list"], env={"COLUMNS": "200"})
    assert res.exit_code == 0 and "E3-metaE4-subE3" in res.output and "0.6507" in res.output
    bad = _write_catalog(tmp_path, {"E1": {"description": "x", "overrides": ["lossy.x=1"]}})
    res = CliRunner().invoke(app, ["catalog", "list", "--catalog", str(bad)])
    assert res.exit_code == 1 and "error:" in res.output and "Traceback" not in res.output
    res = CliRunner().invoke(app, ["catalog", "run", "E99", "--dry-run"])
    assert res.exit_code == 1 and "unknown experiment id 'E99'" in res.output


def test_experiment_command_shape() -> None:
    exp = Experiment("X", "d", ("a.b=1", "c=x y"))
    assert exp.dvc_command(queue=True) == ["dvc", "exp", "run", "--queue", "-n", "X", "-S",
                                           "a.b=1", "-S", "c=x y"]


def test_a_command_that_leaves_children_returns_without_waiting_for_them(tmp_path: Path) -> None:
    """`dvc queue start` leaves its workers running; waiting on them hid the queue's progress
    (every experiment was seen only when the whole queue had drained)."""
    code = ("import subprocess, sys; "
            "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']); "
            "print('workers started')")
    start = time.monotonic()
    proc = run_leaving_children([sys.executable, "-c", code], tmp_path)
    assert time.monotonic() - start < 30  # a pipe would have kept it waiting for 60 s
    assert proc.returncode == 0 and proc.stdout.strip() == "workers started"


def test_an_override_pinning_a_later_default_matches_records_from_before_the_key() -> None:
    """A row that pins a key added later (``flow.class_norm_mean=channel`` after ``position``
    became the default) matches its records made before the key existed when the pinned value
    is the key's schema default (what the older code did); any other value cannot have run
    there and is a problem, never an error that stops the report."""
    from ccnf.catalog.records import params_mismatch

    older = {"flow": {"class_norm": True}, "loss": {"lambda_mi": 0.1}}  # no class_norm_mean
    ran = copy.deepcopy(older)
    pin = Experiment("C-channel-mean", "x", ("flow.class_norm_mean=channel",))
    assert params_mismatch(older, pin, ran) is None
    other = params_mismatch(older, Experiment("P", "x", ("flow.class_norm_mean=position",)), ran)
    assert other is not None and "flow.class_norm_mean=position" in other
    both = Experiment("Q", "x", ("flow.class_norm_mean=channel", "loss.lambda_mi=0.2"))
    assert "loss.lambda_mi: expected 0.2, recorded 0.1" in str(params_mismatch(older, both, ran))
    listed = {"data": {"classes": ["a", "b"]}}  # an index into a list is a key that exists
    first = Experiment("L", "x", ("data.classes.0=c",))
    got = str(params_mismatch(listed, first, listed))
    assert "data.classes: expected ['c', 'b'], recorded ['a', 'b']" in got


def test_a_commit_during_the_queue_is_named_as_the_reason(tmp_path: Path) -> None:
    from ccnf.catalog.runner import head_commit, not_held_reason

    _git("init", "-q", cwd=tmp_path)
    _git("config", "user.name", "t", cwd=tmp_path)
    _git("config", "user.email", "t@t", cwd=tmp_path)
    (tmp_path / "a").write_text("1")
    _git("add", "a", cwd=tmp_path)
    _git("commit", "-qm", "one", cwd=tmp_path)
    first = head_commit(tmp_path)
    (tmp_path / "a").write_text("2")
    _git("commit", "-qam", "two", cwd=tmp_path)
    second = head_commit(tmp_path)
    assert len(first) == 40 and first != second
    moved = not_held_reason(first, second)
    assert first[:7] in moved and second[:7] in moved
    assert f"dvc exp show --rev {first[:7]}" in moved and "run the same command again" in moved
    assert "HEAD moved" not in not_held_reason(second, second)
