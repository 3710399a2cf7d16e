"""The catalog file: its schema (pydantic), the validated :class:`Catalog` of
:class:`Experiment` entries, and :func:`load_catalog`.

Each override of an entry must be a plain ``key=value`` on a key of the params schema, and
params.yaml with an experiment's overrides applied must pass :func:`ccnf.config.parse_params`;
every error names the experiment id and the key (with a did-you-mean hint where one fits).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from ccnf.catalog.overrides import (
    apply_overrides,
    close_match,
    parse_override,
    read_yaml,
    schema_key_error,
)
from ccnf.config import parse_params
from ccnf.data.split import analogues
from ccnf.data.use import DataChoice, apply_choice, choose
from ccnf.data.use import overrides as data_use_overrides
from ccnf.errors import CcnfError

CATALOG_FILE = Path("catalog.yaml")
PARAMS_FILE = "params.yaml"
# a valid git ref component that is also easy to type: DVC stores experiments as git refs
ID_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


class NoteFigure(BaseModel):
    """The research note's final averages on MVTec AD for the same variant (seeds/000)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    label: str = Field(min_length=1, description="the note's name for the run")
    image_auroc: float = Field(ge=0, le=1)
    pixel_auroc: float = Field(ge=0, le=1)
    image_forgetting: float | None = Field(None, ge=-1, le=1)
    pixel_forgetting: float | None = Field(None, ge=-1, le=1)


class _EntryModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    description: str = Field(min_length=1)
    # the split: an MVTec AD protocol name (5x3, 15x1, 10-5, 14-1, 3x5), run as its analogue
    # for the study's class count (ccnf.data.split.analogues), or any protocol that fits
    protocol: str | None = None
    overrides: list[str] = Field(default_factory=list)
    note: NoteFigure | None = None


class _CatalogModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reference: str
    ci_subset: list[str] = Field(default_factory=list)
    # named sets of experiments (e.g. the one benchmarks/industrial12.py runs on real images)
    subsets: dict[str, list[str]] = Field(default_factory=dict)
    # the experiments whose records the competence targets compare (study_report.TARGETS)
    targets: dict[str, str] = Field(default_factory=dict)
    experiments: dict[str, _EntryModel] = Field(min_length=1)


@dataclass(frozen=True)
class Experiment:
    """One catalog entry: an id, what it tests, its ``-S`` overrides, the note's figure.

    ``protocol`` (the entry's, as written) becomes ``data_overrides``: the ``-S`` flags that
    switch params.yaml to that split (``data.protocol`` and the ``tasks`` chain, tasks added
    with ``+`` and removed with ``~``, as ``ccnf data use --overrides`` prints them).
    """

    id: str
    description: str
    overrides: tuple[str, ...]
    note: NoteFigure | None = None
    protocol: str | None = None
    data_overrides: tuple[str, ...] = ()

    def set_args(self) -> list[str]:
        """The ``-S key=value`` arguments of ``dvc exp run`` for this experiment."""
        args: list[str] = []
        for o in (*self.data_overrides, *self.overrides):
            args += ["-S", o]
        return args

    def expected_params(self, base: dict[str, Any]) -> dict[str, Any]:
        """``base`` (a raw params dict) as this experiment runs it."""
        if self.protocol is not None:
            base = apply_choice(base, protocol_choice(base, self.protocol))
        return apply_overrides(base, self.overrides)

    def with_seed(self, seed: int) -> Experiment:
        """The same experiment at another ``seed``, named ``ID-seedN``: a replicate that checks
        a row's figure is not one seed's luck. Not a catalog row (``ccnf catalog table`` and
        ``check`` read the row itself); an entry that sets ``seed`` already cannot have one.
        """
        if seed < 0:
            raise CcnfError(f"seed must be >= 0, got {seed}", fix="pass --seed 1 (or 2, 3 ...)")
        if any(parse_override(o)[0] == "seed" for o in self.overrides):
            raise CcnfError(
                f"experiment '{self.id}' sets seed in its overrides: a replicate would override it",
                where=str(CATALOG_FILE),
                fix="run the entry as it is, or give it a sibling entry without its seed",
            )
        return replace(self, id=f"{self.id}-seed{seed}",
                       description=f"{self.description} (seed {seed})",
                       overrides=(*self.overrides, f"seed={seed}"))

    def dvc_command(self, *, queue: bool = False, temp: bool = False) -> list[str]:
        """``dvc exp run [--queue|--temp] -n ID -S k=v ...`` (as the user would type it)."""
        cmd = ["dvc", "exp", "run"]
        if queue:
            cmd.append("--queue")
        elif temp:
            cmd.append("--temp")
        return [*cmd, "-n", self.id, *self.set_args()]


def resolve_protocol(protocol: str, n_classes: int) -> str:
    """An MVTec AD protocol name's analogue for ``n_classes`` (itself for 15 classes); any
    other protocol name as it is."""
    return analogues(n_classes).get(protocol, protocol)


def protocol_choice(base: dict[str, Any], protocol: str) -> DataChoice:
    """The data choice that keeps ``base``'s data and switches it to ``protocol``."""
    classes = parse_params(base).classes
    return choose(base, protocol=resolve_protocol(protocol, len(classes)))



@dataclass(frozen=True)
class Catalog:
    """The validated catalog file."""

    path: Path
    reference: str
    ci_subset: tuple[str, ...]
    experiments: dict[str, Experiment]
    subsets: dict[str, tuple[str, ...]] = field(default_factory=dict)
    targets: dict[str, str] = field(default_factory=dict)

    @property
    def ids(self) -> list[str]:
        return list(self.experiments)

    def select(self, ids: Sequence[str], *, all_: bool = False, ci: bool = False) -> list[
        Experiment
    ]:
        """The experiments named by ``ids`` (catalog order), all of them, or the CI subset."""
        wanted = self.ids if all_ else list(ids) + (list(self.ci_subset) if ci else [])
        if not wanted:
            raise CcnfError(
                "no experiment selected",
                where=str(self.path),
                fix="name experiment ids, or pass --all or --ci (ccnf catalog list shows them)",
            )
        unknown = [i for i in wanted if i not in self.experiments]
        if unknown:
            hints = [
                f"'{u}'" + (f" (did you mean '{m[0]}'?)" if (m := close_match(u, self.ids)) else "")
                for u in unknown
            ]
            raise CcnfError(
                f"unknown experiment id {', '.join(hints)}",
                where=str(self.path),
                fix=f"use one of: {', '.join(self.ids)}",
            )
        chosen = set(wanted)
        return [e for i, e in self.experiments.items() if i in chosen]


def load_catalog(
    path: str | Path = CATALOG_FILE, params_path: str | Path = PARAMS_FILE
) -> Catalog:
    """Read and validate the catalog against the params schema and ``params_path``.

    Every problem is a :class:`CcnfError` that names the experiment id and the key.
    """
    path, params_path = Path(path), Path(params_path)
    raw = read_yaml(path, "catalog file")
    if not isinstance(raw, dict):
        raise CcnfError("the catalog must be a mapping", where=str(path),
                        fix="see catalog.yaml: reference, ci_subset, experiments")
    try:
        model = _CatalogModel.model_validate(raw)
    except ValidationError as err:
        lines = []
        for e in err.errors():
            loc = ".".join(str(p) for p in e["loc"])
            lines.append(f"{loc}: {e['msg']}")
        raise CcnfError(
            "invalid catalog:\n  - " + "\n  - ".join(lines),
            where=str(path),
            fix="each experiment is {description: text, overrides: [key=value, ...], "
            "note: {label, image_auroc, pixel_auroc}}",
        ) from None

    base = read_yaml(params_path, "params file")
    if not isinstance(base, dict):
        raise CcnfError("params file must be a mapping of sections", where=str(params_path))
    experiments: dict[str, Experiment] = {}
    for exp_id, entry in model.experiments.items():
        where = f"{path}: experiments.{exp_id}"
        if not ID_PATTERN.match(exp_id) or exp_id.endswith(".lock") or ".." in exp_id:
            raise CcnfError(
                f"experiment id '{exp_id}' is not usable as a DVC experiment name",
                where=where,
                fix="use letters, digits, '-', '_' and '.', starting with a letter or digit",
            )
        keys: dict[str, str] = {}
        for text in entry.overrides:
            try:
                key, _ = parse_override(text)
            except CcnfError as err:
                raise CcnfError(err.what, where=where, fix=err.fix) from None
            if key in keys:
                raise CcnfError(
                    f"experiment '{exp_id}' sets '{key}' twice ('{keys[key]}', '{text}')",
                    where=where,
                    fix="keep one value per key",
                )
            keys[key] = text
            problem = schema_key_error(key)
            if problem:
                raise CcnfError(f"experiment '{exp_id}': {problem}", where=where,
                                fix="use a key of params.yaml (ccnf/config.py)")
        if any(k == "tasks" or k.startswith(("tasks.", "data.protocol")) for k in keys):
            raise CcnfError(
                f"experiment '{exp_id}' overrides the split in its overrides",
                where=where,
                fix="give the split as the entry's protocol: (e.g. protocol: 15x1)",
            )
        data_flags: list[str] = []
        try:
            if entry.protocol is not None:
                data_flags = data_use_overrides(base, protocol_choice(base, entry.protocol))
            exp = Experiment(exp_id, entry.description, tuple(entry.overrides), entry.note,
                             entry.protocol, tuple(data_flags))
            parse_params(exp.expected_params(base),
                         f"{params_path} + catalog experiment '{exp_id}'")
        except CcnfError as err:
            raise CcnfError(
                f"experiment '{exp_id}': {err.what}",
                where=where,
                fix="correct the protocol or override(s) of this experiment",
            ) from None
        experiments[exp_id] = exp

    if model.reference not in experiments:
        raise CcnfError(f"reference '{model.reference}' is not an experiment of the catalog",
                        where=f"{path}: reference", fix=f"use one of {', '.join(experiments)}")
    if experiments[model.reference].overrides:
        raise CcnfError(f"reference '{model.reference}' has overrides",
                        where=f"{path}: reference",
                        fix="the reference is params.yaml itself: give it overrides: []")
    named = {"ci_subset": model.ci_subset,
             **{f"subsets.{k}": v for k, v in model.subsets.items()},
             **{f"targets.{k}": [v] for k, v in model.targets.items()}}
    for where_key, ids in named.items():
        for i in ids:
            if i not in experiments:
                raise CcnfError(f"{where_key} names unknown experiment '{i}'",
                                where=f"{path}: {where_key}", fix=f"use ids of {path}")
    return Catalog(path, model.reference, tuple(model.ci_subset), experiments,
                   {k: tuple(v) for k, v in model.subsets.items()}, dict(model.targets))
