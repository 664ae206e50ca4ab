"""Routing: which models an incoming instance goes to (``MEDSERVE_ROUTES``, a YAML or JSON file).

The file holds a list of rules; the first rule whose ``match`` fits the instance names its models, and one
job is made per model. An instance no rule matches gets one ``skipped`` job with the reason. Example::

    rules:
      - name: chest x-ray
        match:
          modality: [DX, CR]            # one value or a list; any of them matches
          body_part_examined: CHEST
          photometric_interpretation: [MONOCHROME1, MONOCHROME2]
          rows: {min: 256, max: 4096}   # image size range, both bounds optional and inclusive
          columns: {min: 256}
        models: [lungs]
      - name: everything else
        match: {sop_class_uid: 1.2.840.10008.5.1.4.1.1.7}
        models: [lungs, nodules]

Match keys: ``modality``, ``body_part_examined``, ``sop_class_uid``, ``photometric_interpretation`` (values
compared exactly, code strings without case), ``rows`` and ``columns`` (``min``/``max``). A key the instance
lacks does not match; an empty ``match`` matches everything.

Without a file: every image (an instance with Pixel Data) goes to every ready model whose task has a DICOM
result type; other instances are skipped.

A bad file (unreadable, not YAML/JSON, an unknown key, a wrong type, a model the model directory does not
hold) stops the service at start: ``load_rules`` raises ``SettingsError`` naming the file and the line.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import yaml
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, ValidationError

from app.settings import SettingsError, env_name


def _as_list(value: Any) -> Any:
    return [value] if isinstance(value, str | int | float) else value


Values = Annotated[list[str], BeforeValidator(_as_list), Field(min_length=1)]


class SizeRange(BaseModel):
    """An inclusive range of a size in pixels."""

    model_config = ConfigDict(extra="forbid")
    min: int | None = Field(default=None, ge=1)
    max: int | None = Field(default=None, ge=1)

    def contains(self, value: int | None) -> bool:
        if value is None:
            return False
        return (self.min is None or value >= self.min) and (self.max is None or value <= self.max)


class Match(BaseModel):
    """What a rule matches; every key given must fit."""

    model_config = ConfigDict(extra="forbid")
    modality: Values | None = None
    body_part_examined: Values | None = None
    sop_class_uid: Values | None = None
    photometric_interpretation: Values | None = None
    rows: SizeRange | None = None
    columns: SizeRange | None = None


class Rule(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str | None = None
    match: Match = Field(default_factory=Match)
    models: Values


class RulesFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rules: list[Rule]


@dataclass(frozen=True)
class InstanceAttributes:
    """The attributes routing looks at (no identifying values)."""

    sop_class_uid: str
    modality: str | None = None
    body_part_examined: str | None = None
    photometric_interpretation: str | None = None
    rows: int | None = None
    columns: int | None = None
    has_pixels: bool = False


def _code(value: str | None) -> str | None:
    return None if value is None else value.strip().upper()


def rule_matches(match: Match, instance: InstanceAttributes) -> bool:
    """Whether every key of ``match`` fits ``instance``."""
    coded = (
        (match.modality, instance.modality),
        (match.body_part_examined, instance.body_part_examined),
        (match.photometric_interpretation, instance.photometric_interpretation),
    )
    for wanted, value in coded:
        if wanted is not None and _code(value) not in {_code(v) for v in wanted}:
            return False
    if match.sop_class_uid is not None and instance.sop_class_uid not in match.sop_class_uid:
        return False
    if match.rows is not None and not match.rows.contains(instance.rows):
        return False
    return match.columns is None or match.columns.contains(instance.columns)


@dataclass(frozen=True)
class Decision:
    """Where an instance goes: ``models`` (None: every ready model, the default routing) or, when empty,
    nowhere, with ``reason``; ``rule`` names the rule that matched."""

    models: list[str] | None
    rule: str | None = None
    reason: str = ""


class Router:
    """The routing rules in force (``rules=None``: the default routing)."""

    def __init__(self, rules: Sequence[Rule] | None = None, source: str | None = None) -> None:
        self.rules = list(rules) if rules is not None else None
        self.source = source

    def route(self, instance: InstanceAttributes) -> Decision:
        if self.rules is None:
            if instance.has_pixels:
                return Decision(None, reason="default routing: every image to every ready model")
            return Decision([], reason="not an image (no Pixel Data): the default routing sends images only")
        for position, rule in enumerate(self.rules, start=1):
            if rule_matches(rule.match, instance):
                return Decision(list(rule.models), rule=rule.name or f"rule {position}")
        return Decision(
            [], reason=f"no routing rule of {self.source or 'MEDSERVE_ROUTES'} matches this instance"
        )


def _node_at(node: yaml.Node, location: Sequence[Any]) -> yaml.Node:
    """The deepest YAML node along a pydantic error location."""
    for part in location:
        if isinstance(node, yaml.MappingNode):
            found = next((v for k, v in node.value if getattr(k, "value", None) == part), None)
            if found is None:
                return node
            node = found
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            return node
    return node


def _fail(path: Path, line: int | None, message: str) -> SettingsError:
    where = f"{path}, line {line}" if line is not None else str(path)
    return SettingsError(f"{env_name('routes')}: {where}: {message}")


def load_rules(path: Path, known_models: Collection[str]) -> Router:
    """Reads and checks the rules file (YAML, or JSON which YAML reads too).

    Raises:
        SettingsError: naming the file and the line of the first problem.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise _fail(path, None, f"cannot be read ({type(exc).__name__})") from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        raise _fail(path, line, f"not valid YAML or JSON: {exc.problem or exc.context}") from exc
    except yaml.YAMLError as exc:
        raise _fail(path, None, "not valid YAML or JSON") from exc
    if root is None:
        raise _fail(path, 1, "the file is empty; it needs a `rules:` list")
    try:
        parsed = RulesFile.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        node = _node_at(root, error["loc"])
        where = ".".join(str(part) for part in error["loc"]) or "the file"
        raise _fail(path, node.start_mark.line + 1, f"{where}: {error['msg']}") from exc
    for index, rule in enumerate(parsed.rules):
        for position, model in enumerate(rule.models):
            if model not in known_models:
                node = _node_at(root, ["rules", index, "models", position])
                available = ", ".join(sorted(known_models)) or "none"
                raise _fail(
                    path,
                    node.start_mark.line + 1,
                    f"rules.{index}.models: no model {model!r} in the model directory (available: {available})",
                )
    return Router(parsed.rules, source=path.name)
