"""Overrides in ``dvc exp run -S`` syntax: parsing, applying to a raw params dict, checking
their keys against the params schema; and the YAML reader (duplicate keys are errors).

``parse_override`` uses Hydra's parser, as DVC does, so a value is typed exactly as
``dvc exp run -S`` types it (the tests compare with a real ``dvc exp run``).
"""

from __future__ import annotations

import copy
import difflib
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ccnf.config import Params
from ccnf.errors import CcnfError


def close_match(word: str, options: Iterable[str]) -> list[str]:
    """The one option closest to ``word`` (a did-you-mean hint), or an empty list."""
    return difflib.get_close_matches(word, list(options), n=1, cutoff=0.5)


class _UniqueKeyLoader(yaml.SafeLoader):
    """PyYAML's safe loader, but a repeated mapping key is an error, not 'last one wins'."""


def _construct_unique_mapping(loader: yaml.SafeLoader, node: yaml.MappingNode) -> dict:
    seen: set[Any] = set()
    for key_node, _ in node.value:
        key = loader.construct_object(key_node, deep=True)
        if key in seen:
            raise yaml.constructor.ConstructorError(
                None, None, f"duplicate key '{key}'", key_node.start_mark
            )
        seen.add(key)
    return loader.construct_mapping(node, deep=True)


_UniqueKeyLoader.add_constructor(
    yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, _construct_unique_mapping
)


def read_yaml(path: Path, what: str) -> Any:
    """Parse a YAML file, rejecting duplicate keys (which DVC's own parser also rejects)."""
    if not path.is_file():
        raise CcnfError(f"{what} not found: {path}", fix="run from the repository root")
    try:
        return yaml.load(path.read_text(encoding="utf-8"), Loader=_UniqueKeyLoader)
    except yaml.YAMLError as err:
        raise CcnfError(f"{what} is not valid YAML: {err}", where=str(path)) from None


def parse_override(text: str) -> tuple[str, Any]:
    """``"a.b=value"`` -> ``("a.b", value)``, the value typed as ``dvc exp run -S`` types it.

    DVC hands ``-S`` strings to Hydra's override parser; so does this function. Only plain
    changes of existing keys are accepted: no ``+key`` (add), ``~key`` (delete) or sweeps
    (``a=1,2``), none of which belongs in a catalog entry.
    """
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    try:
        ov = OverridesParser.create().parse_override(text)
    except HydraException as err:
        raise CcnfError(
            f"override '{text}' is not valid `dvc exp run -S` syntax: {err}",
            fix="write key.subkey=value, e.g. loss.lambda_center=0.0",
        ) from None
    if ov.is_add() or ov.is_force_add() or ov.is_delete():
        raise CcnfError(
            f"override '{text}' adds or deletes a key",
            fix="catalog overrides change existing params.yaml keys only: write key=value",
        )
    if ov.is_sweep_override():
        raise CcnfError(
            f"override '{text}' is a sweep (several values)",
            fix="one value per key; make one catalog entry per value",
        )
    if ov.value_type is None:
        raise CcnfError(f"override '{text}' has no value", fix="write key=value")
    return ov.key_or_group, _plain(ov.value())


def _plain(value: Any) -> Any:
    """Hydra's parsed value as plain Python (lists/dicts recursively, strings as str)."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, str):
        return str(value)
    return value


def _index(node: Any, parts: list[str], depth: int, text: str) -> Any:
    """The index of ``parts[depth]`` in ``node`` (a mapping key or a list position); an absent
    one raises CcnfError naming ``text`` (the override)."""
    part, here = parts[depth], ".".join(parts[: depth + 1])
    if isinstance(node, dict):
        if part not in node:
            hint = close_match(part, [str(k) for k in node])
            raise CcnfError(
                f"override '{text}': params has no key '{here}'"
                + (f" (did you mean '{'.'.join([*parts[:depth], hint[0]])}'?)" if hint else ""),
                fix="overrides change existing keys only (see params.yaml)",
            )
        return part
    if isinstance(node, list):
        if not part.isdigit() or int(part) >= len(node):
            raise CcnfError(
                f"override '{text}': '{here}' is not an index of a list of {len(node)} items",
                fix="index lists from 0: key.0=value",
            )
        return int(part)
    raise CcnfError(
        f"override '{text}': '{'.'.join(parts[:depth])}' is a value, not a section",
        fix="override the key itself, not a sub-key of it",
    )


def locate(raw: dict[str, Any], key: str, text: str) -> tuple[Any, Any]:
    """The container and index of the dotted ``key`` in ``raw`` (an integer part indexes a
    list); a key that is not already there raises CcnfError naming ``text`` (the override)."""
    parts = key.split(".")
    node: Any = raw
    for depth in range(len(parts) - 1):
        node = node[_index(node, parts, depth, text)]
    return node, _index(node, parts, len(parts) - 1, text)


def apply_overrides(raw: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """A deep copy of ``raw`` with each ``key=value`` applied, as ``dvc exp run -S`` would.

    Dotted keys walk mappings; an integer part indexes a list (``data.classes.0=a``). A key
    that is not already there is an error (DVC: "Could not override"), never a silent addition.
    """
    out = copy.deepcopy(raw)
    for text in overrides:
        key, value = parse_override(text)
        container, index = locate(out, key, text)
        container[index] = value
    return out


def schema_key_error(key: str) -> str | None:
    """Why ``key`` is not a key of the params schema (:class:`ccnf.config.Params`), or None."""
    model: type[BaseModel] = Params
    parts = key.split(".")
    for depth, part in enumerate(parts):
        fields = model.model_fields
        if part not in fields:
            prefix = ".".join(parts[:depth])
            hint = close_match(part, list(fields))
            where = f"'{prefix}'" if prefix else "params.yaml"
            msg = f"'{key}' is not a params key: {where} has no '{part}'"
            if hint:
                msg += f" (did you mean '{prefix + '.' if prefix else ''}{hint[0]}'?)"
            return msg
        ann = fields[part].annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
            continue
        # a leaf, or a free-form mapping/list (classes, tasks, out_indices, noise_sigmas):
        # anything below it is checked by parse_params on the applied result
        if depth < len(parts) - 1 and ann in (int, float, bool, str):
            return f"'{key}' goes below '{'.'.join(parts[: depth + 1])}', which is a value"
        return None
    return f"'{key}' names a whole section; override its keys one by one"
