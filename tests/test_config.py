from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from ccnf.config import load_params, parse_params
from ccnf.errors import CcnfError


def _error(raw: dict) -> str:
    with pytest.raises(CcnfError) as info:
        parse_params(raw)
    return str(info.value)


def test_repository_params_are_valid() -> None:
    p = load_params(Path(__file__).resolve().parent.parent / "params.yaml")
    assert len(p.task_names) == 5
    assert all(len(classes) == 3 for classes in p.split)
    assert len(set(p.classes)) == 15


def test_mvtec_default_split_is_alphabetical_5x3(raw_params: dict) -> None:
    classes = [c for task in raw_params["splits"]["mvtec"] for c in task]
    assert classes == sorted(classes) and len(classes) == 15
    assert [len(t) for t in raw_params["splits"]["mvtec"]] == [3] * 5


def test_misspelled_key_names_key_and_closest(raw_params: dict) -> None:
    raw_params["loss"]["lamda_center"] = 0.1
    msg = _error(raw_params)
    assert "unknown key 'loss.lamda_center'" in msg
    assert "did you mean 'loss.lambda_center'" in msg


def test_misspelled_section(raw_params: dict) -> None:
    raw_params["flows"] = raw_params.pop("flow")
    msg = _error(raw_params)
    assert "unknown key 'flows'" in msg and "'flow'" in msg


def test_negative_weight_rejected(raw_params: dict) -> None:
    raw_params["loss"]["lambda_mi"] = -0.1
    assert "loss.lambda_mi" in _error(raw_params)


def test_float_written_as_yaml_string_rejected(raw_params: dict) -> None:
    raw_params["train"]["lr"] = "1e-3"
    msg = _error(raw_params)
    assert "train.lr" in msg and "decimal point" in msg


def test_empty_task_rejected(raw_params: dict) -> None:
    raw_params["splits"]["synthetic"][2] = []
    assert "splits.synthetic.2 is empty" in _error(raw_params)


def test_class_in_two_tasks_rejected(raw_params: dict) -> None:
    split = raw_params["splits"]["mvtec"]
    split[1].append(split[0][0])
    msg = _error(raw_params)
    assert f"class '{split[0][0]}' is in task 0 and task 1" in msg


def test_split_length_must_match_tasks(raw_params: dict) -> None:
    raw_params["splits"]["mvtec"] = raw_params["splits"]["mvtec"][:4]
    assert "splits.mvtec has 4 tasks but tasks defines 5" in _error(raw_params)


def test_broken_task_chain_rejected(raw_params: dict) -> None:
    raw_params["tasks"]["t2"]["prev"] = "models/t0"
    assert "tasks.t2.prev must be 'models/t1'" in _error(raw_params)


def test_synthetic_source_requires_embedded_root(raw_params: dict) -> None:
    raw_params["data"]["root"] = "/somewhere/else"
    assert "data.root must be 'data/synthetic'" in _error(raw_params)


def test_mvtec_source_uses_mvtec_split(raw_params: dict) -> None:
    raw = copy.deepcopy(raw_params)
    raw["data"].update(source="mvtec", root="/data/mvtec_ad")
    p = parse_params(raw)
    assert p.classes[:3] == ["bottle", "cable", "capsule"]


def test_weights_file_required_for_file_weights(raw_params: dict) -> None:
    raw_params["backbone"]["weights"] = "file"
    assert "weights_file" in _error(raw_params)


def test_load_params_errors_name_the_file(tmp_path: Path) -> None:
    with pytest.raises(CcnfError, match="params file not found"):
        load_params(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("seed: [unclosed\n")
    with pytest.raises(CcnfError, match="not valid YAML"):
        load_params(bad)
    other = tmp_path / "p.yaml"
    raw = yaml.safe_load((Path(__file__).resolve().parent.parent / "params.yaml").read_text())
    raw["seed"] = -1
    other.write_text(yaml.safe_dump(raw))
    with pytest.raises(CcnfError) as info:
        load_params(other)
    assert str(other) in str(info.value) and "seed" in str(info.value)


def test_params_synthetic_split_is_the_generators(raw_params: dict) -> None:
    from ccnf.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_SPLIT

    assert raw_params["splits"]["synthetic"] == SYNTHETIC_SPLIT
    assert sorted(c for t in SYNTHETIC_SPLIT for c in t) == sorted(SYNTHETIC_CLASSES)


def test_bank_models_reject_ccnf_only_settings(raw_params: dict) -> None:
    raw_params["model"]["kind"] = "gaussian"
    raw_params["train"]["strategy"] = "replay"
    raw_params["train"]["replay_buffer"] = 3
    with pytest.raises(CcnfError, match=r"does not apply to model\.kind 'gaussian'"):
        parse_params(raw_params)
    raw_params["train"]["strategy"] = "naive"
    raw_params["score"]["class_select"] = "prototype"
    with pytest.raises(CcnfError, match="class centres"):
        parse_params(raw_params)
    raw_params["score"]["class_select"] = "likelihood"
    assert parse_params(raw_params).model.kind == "gaussian"


def test_params_yaml_reads_as_dvc_reads_it() -> None:
    """DVC parses params.yaml with ruamel, which rejects duplicate keys PyYAML lets through."""
    from conftest import REPO
    from ruamel.yaml import YAML

    loaded = YAML(typ="rt").load((REPO / "params.yaml").read_text())
    assert set(loaded) >= {"seed", "device", "data", "flow", "loss", "train", "score", "eval"}
