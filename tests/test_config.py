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


def _on_disk(raw: dict, source: str, root: str = "/data/ds") -> dict:
    raw["data"].update(source=source, root=root, generate=[])
    return raw


def test_default_params_resolve_to_the_split_and_chain_of_before(raw_params: dict) -> None:
    """Issue 14 restructured params; the default study must run the very same tasks."""
    before = [  # splits.synthetic of params.yaml before issue 14
        ["weave", "mesh", "washer"], ["granite", "caplet", "brushed"], ["twill", "oak", "ic"],
        ["perforated", "tablet", "hide"], ["terrazzo", "hexnut", "gear"],
    ]
    p = parse_params(raw_params)
    assert (p.data.source, p.data.root, p.data.generate) == (
        "synthetic", "data/synthetic", ["synthetic"])
    assert p.split == before and p.classes == [c for t in before for c in t]
    assert {n: t.prev for n, t in p.tasks.items()} == {
        "t0": "models/init", "t1": "models/t0", "t2": "models/t1", "t3": "models/t2",
        "t4": "models/t3"}


def test_mvtec_default_split_is_alphabetical_5x3(raw_params: dict) -> None:
    p = parse_params(_on_disk(raw_params, "mvtec"))
    assert p.classes == sorted(p.classes) and len(p.classes) == 15
    assert p.split[0] == ["bottle", "cable", "capsule"]
    assert p.split[-1] == ["transistor", "wood", "zipper"]
    assert [len(t) for t in p.split] == [3] * 5


def test_only_the_active_sources_split_is_validated(raw_params: dict) -> None:
    """One real class in one task: no synthetic split to shrink, no stale tasks to delete."""
    raw = _on_disk(raw_params, "folder", "/data/tiles")
    raw["data"].update(classes=["magnetic_tile"], protocol="all-in-one")
    raw["tasks"] = {"t0": {"prev": "models/init"}}
    p = parse_params(raw)
    assert p.split == [["magnetic_tile"]] and p.task_names == ["t0"]


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


def test_empty_class_list_rejected(raw_params: dict) -> None:
    raw_params["data"]["classes"] = []
    assert "data.classes is empty" in _error(raw_params)


def test_class_in_two_tasks_rejected(raw_params: dict) -> None:
    raw = _on_disk(raw_params, "folder")
    raw["data"].update(classes=["a", "b", "a"], protocol="3x1")
    raw["tasks"] = {f"t{i}": {"prev": "models/init" if i == 0 else f"models/t{i - 1}"}
                    for i in range(3)}
    assert "data.classes lists 'a' twice" in _error(raw)


def test_split_and_tasks_mismatch_names_the_command(raw_params: dict) -> None:
    raw_params["data"]["protocol"] = "15x1"
    msg = _error(raw_params)
    assert "cuts the 15 classes into 15 task(s), but tasks defines 5" in msg
    assert "ccnf data use synthetic --protocol 15x1" in msg


def test_protocol_that_does_not_fit_lists_the_ones_that_do(raw_params: dict) -> None:
    raw = _on_disk(raw_params, "folder")
    raw["data"]["classes"] = [f"c{i:02d}" for i in range(12)]
    msg = _error(raw)  # 5x3 needs 15 classes
    assert "data.protocol '5x3' needs 15 classes" in msg
    assert "5x3 -> 3-3-2-2-2" in msg and "10-5 -> 8-4" in msg and "14-1 -> 11-1" in msg


def test_broken_task_chain_rejected(raw_params: dict) -> None:
    raw_params["tasks"]["t2"]["prev"] = "models/t0"
    assert "tasks.t2.prev must be 'models/t1'" in _error(raw_params)


def test_synthetic_source_requires_embedded_root(raw_params: dict) -> None:
    raw_params["data"]["root"] = "/somewhere/else"
    assert "data.root must be 'data/synthetic'" in _error(raw_params)


def test_generate_follows_the_source(raw_params: dict) -> None:
    """synth runs for the synthetic source only (data.generate drives its foreach)."""
    raw = copy.deepcopy(raw_params)
    raw["data"].update(source="mvtec", root="/data/mvtec_ad")  # generate still [synthetic]
    msg = _error(raw)
    assert "data.generate is ['synthetic'] but data.source is 'mvtec'" in msg
    assert "-S 'data.generate=[]'" in msg
    raw_params["data"]["generate"] = []
    assert "data.generate must be [synthetic]" in _error(raw_params)


def test_unknown_class_of_a_known_source_suggests_the_name(raw_params: dict) -> None:
    raw = _on_disk(raw_params, "mvtec")
    raw["data"].update(classes=["bottle", "metalnut"], protocol="2x1")
    raw["tasks"] = {"t0": {"prev": "models/init"}, "t1": {"prev": "models/t0"}}
    msg = _error(raw)
    assert "'metalnut' is not a class of the MVTec AD data (did you mean 'metal_nut'?)" in msg
    assert "data.source folder" in msg


def test_folder_source_needs_its_class_list(raw_params: dict) -> None:
    msg = _error(_on_disk(raw_params, "folder", "/data/mine"))
    assert "data.classes is null" in msg
    assert "ccnf data use folder --root /data/mine --protocol 5x3" in msg


def test_old_splits_section_is_a_clear_error(raw_params: dict) -> None:
    raw_params["splits"] = {"synthetic": [["weave"]]}
    with pytest.raises(CcnfError, match="'splits' section") as info:
        parse_params(raw_params)
    assert "ccnf data use" in str(info.value)


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
    from ccnf.data.split import SYNTHETIC_ORDER
    from ccnf.data.synthetic import SYNTHETIC_CLASSES, SYNTHETIC_SPLIT

    assert parse_params(raw_params).split == SYNTHETIC_SPLIT
    assert list(SYNTHETIC_ORDER) == [c for t in SYNTHETIC_SPLIT for c in t]
    assert sorted(SYNTHETIC_ORDER) == sorted(SYNTHETIC_CLASSES)


def test_bank_models_reject_ccnf_only_settings(raw_params: dict) -> None:
    from ccnf.models import check_params

    raw_params["model"]["kind"] = "gaussian"
    raw_params["train"]["strategy"] = "replay"
    raw_params["train"]["replay_buffer"] = 3
    with pytest.raises(CcnfError, match=r"does not apply to model\.kind 'gaussian'"):
        check_params(parse_params(raw_params))
    raw_params["train"]["strategy"] = "naive"
    raw_params["score"]["class_select"] = "prototype"
    with pytest.raises(CcnfError, match="class centres"):
        check_params(parse_params(raw_params))
    raw_params["score"]["class_select"] = "likelihood"
    raw_params["score"]["headline"] = "hybrid"
    with pytest.raises(CcnfError, match=r"score of model\.kind 'gaussian'"):
        check_params(parse_params(raw_params))
    raw_params["score"]["headline"] = "nf"
    assert check_params(parse_params(raw_params)).kind == "gaussian"
    raw_params["model"]["kind"] = "gausian"
    with pytest.raises(CcnfError, match="did you mean 'gaussian'"):
        check_params(parse_params(raw_params))


def test_params_yaml_reads_as_dvc_reads_it() -> None:
    """DVC parses params.yaml with ruamel, which rejects duplicate keys PyYAML lets through."""
    from conftest import REPO
    from ruamel.yaml import YAML

    loaded = YAML(typ="rt").load((REPO / "params.yaml").read_text())
    assert set(loaded) >= {"seed", "device", "data", "flow", "loss", "train", "score", "eval"}


def test_mean_condition_without_the_positional_mean_names_both_keys(raw_params: dict) -> None:
    raw_params["flow"]["mean_condition_dim"] = 16
    parse_params(raw_params)  # the default keeps the mean map: accepted
    raw_params["flow"]["class_norm_mean"] = "channel"
    msg = _error(raw_params)
    assert "flow.mean_condition_dim" in msg and "flow.class_norm_mean: position" in msg


def test_mean_rank_and_mean_bits_together_name_both_keys(raw_params: dict) -> None:
    raw_params["flow"]["class_mean_bits"] = 4
    parse_params(raw_params)  # the whole map in 4 bits: accepted
    raw_params["flow"]["class_mean_rank"] = 1
    msg = _error(raw_params)
    assert "flow.class_mean_rank" in msg and "flow.class_mean_bits" in msg


def test_lloyd_levels_without_mean_bits_name_both_keys(raw_params: dict) -> None:
    raw_params["flow"]["class_mean_quantizer"] = "lloyd"
    msg = _error(raw_params)
    assert "flow.class_mean_quantizer" in msg and "flow.class_mean_bits" in msg
    raw_params["flow"]["class_mean_bits"] = 2
    parse_params(raw_params)  # 2-bit codes at Lloyd-Max levels: accepted


@pytest.mark.parametrize("key", ["class_mean_rank", "class_mean_bits"])
def test_a_compact_mean_map_on_a_model_that_keeps_whole_maps_is_refused(
    raw_params: dict, key: str
) -> None:
    raw_params["flow"][key] = 4
    raw_params["model"]["kind"] = "flow_bank"
    msg = _error(raw_params)
    assert f"flow.{key}" in msg and "model.kind" in msg
