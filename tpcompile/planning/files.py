"""Plans as files: JSON and YAML, in two accepted forms, with errors that name the field.

A plan file is either

* the full schema (what ``tpcompile plan`` writes and ``Plan.model_dump`` gives): one
  entry per traced module with its layer styles, segments and block contract; or
* a flat mapping ``{fqn_or_glob: style}``, the form people write by hand::

      tok_embeddings: vocab_parallel
      layers.*.attention.wq: colwise     # ``*`` is one name component, ``**`` any number
      layers.*.attention.wo: rowwise
      output: colwise

A flat mapping carries no tp: the mesh decides. Both forms are checked against the model
(:func:`tpcompile.planning.bind.bind`) when applied, and against the graph by the analysis.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import ValidationError

from ..errors import PlanError
from .value import ModulePlan, Plan, Style

STYLES: tuple[str, ...] = get_args(Style)
FLAT_TYPE = "(flat)"  # module_type of the single entry a flat mapping loads into


def _format(path: Path, fmt: str | None) -> str:
    fmt = fmt or {".json": "json", ".yaml": "yaml", ".yml": "yaml"}.get(path.suffix.lower())
    if fmt not in ("json", "yaml"):
        raise PlanError(f"{path}: cannot tell the plan format from the suffix {path.suffix!r}; "
                        "name the file .yaml, .yml or .json")
    return fmt


def dumps(plan: Plan, fmt: str = "yaml") -> str:
    data = plan.model_dump(mode="json")
    for m in data["modules"]:  # detection fills styles in set order: sort for stable files
        m["styles"] = dict(sorted(m["styles"].items()))
        for key in ("packed", "grouped", "seq_dims", "summed", "sliced", "experts"):
            if not m[key]:
                del m[key]
    if fmt == "json":
        return json.dumps(data, indent=2) + "\n"
    return yaml.safe_dump(data, sort_keys=False, default_flow_style=None, width=100)


def save(plan: Plan, path: str | Path, fmt: str | None = None) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(dumps(plan, _format(path, fmt)))
    return path


def load(path: str | Path, fmt: str | None = None) -> Plan:
    path = Path(path)
    if not path.is_file():
        raise PlanError(f"plan file {path} does not exist")
    return loads(path.read_text(), _format(path, fmt), source=str(path))


class _Duplicate(ValueError):
    pass


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last)."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)  # type: ignore[no-untyped-call]
            if key in seen:
                raise _Duplicate(f"{key!r} is given twice (lines {seen[key]} and "
                                 f"{key_node.start_mark.line + 1}); keep one")
            seen[key] = key_node.start_mark.line + 1
        return super().construct_mapping(node, deep=deep)


def _unique_pairs(pairs: list[tuple[str, Any]]) -> dict:
    out: dict = {}
    for k, v in pairs:
        if k in out:
            raise _Duplicate(f"{k!r} is given twice; keep one")
        out[k] = v
    return out


def loads(text: str, fmt: str = "yaml", source: str = "<plan>") -> Plan:
    try:
        data = (json.loads(text, object_pairs_hook=_unique_pairs) if fmt == "json"
                else yaml.load(text, Loader=_StrictLoader))  # noqa: S506 (a SafeLoader)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        raise PlanError(f"{source}: not valid {fmt.upper()}: {e}") from None
    except _Duplicate as e:
        raise PlanError(f"{source}: {e}") from None
    return from_data(data, source)


def from_data(data: Any, source: str = "<plan>") -> Plan:
    """A Plan from parsed JSON/YAML: the full schema or a flat ``{fqn: style}`` mapping."""
    if not isinstance(data, dict) or not data:
        raise PlanError(f"{source}: a plan is a mapping (the full schema with 'modules', or "
                        f"{{layer_or_glob: style}}); got {type(data).__name__}")
    if "modules" in data:
        return _full(data, source)
    return flat_plan(data, source)


def _full(data: dict, source: str) -> Plan:
    try:
        return Plan.model_validate(data)
    except ValidationError as e:
        raise PlanError(f"{source}: " + "; ".join(_describe(err) for err in e.errors())) from None


def _describe(err: dict) -> str:
    loc = ".".join(str(p) for p in err["loc"])
    if err["type"] == "literal_error" and "styles" in err["loc"]:
        return f"{loc}: {_bad_style(err.get('input'))}"
    if err["type"] == "extra_forbidden":
        return f"{loc}: unknown field (remove it or check its spelling)"
    if err["type"] == "missing":
        return f"{loc}: required field missing"
    return f"{loc}: {err['msg']} (got {err.get('input')!r})"


def _bad_style(value: Any) -> str:
    near = difflib.get_close_matches(str(value), STYLES, n=1, cutoff=0.5)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return f"unknown style {value!r}{hint} Styles are: {', '.join(STYLES)}"


def flat_plan(mapping: dict[str, Any], source: str = "<plan>") -> Plan:
    """A flat ``{fqn_or_glob: style}`` mapping as a Plan with one entry (bound later)."""
    bad = [f"{k}: {_bad_style(v)}" for k, v in mapping.items() if v not in STYLES]
    bad += [f"{k!r}: a layer name must be a non-empty string of dotted names"
            for k in mapping if not isinstance(k, str) or not k or k.strip(".") != k]
    if bad:
        raise PlanError(f"{source}: " + "; ".join(bad))
    entry = ModulePlan(path="", members=[""], module_type=FLAT_TYPE, styles=dict(mapping))
    return Plan(tp=1, modules=[entry])


def is_flat(plan: Plan) -> bool:
    return len(plan.modules) == 1 and plan.modules[0].module_type == FLAT_TYPE


def to_yaml(plan: Plan) -> str:
    return dumps(plan, "yaml")


def from_yaml(text: str) -> Plan:
    return loads(text, "yaml")
