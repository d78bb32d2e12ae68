"""The worker's training options against protocol.json's TrainOptions and LoraOptions.

The notebook kernel derives its option names, defaults and enums from the schema, so the dataclasses the
worker builds from a train request must have exactly the schema's fields, with the schema's defaults
(absent default in the schema <=> None, or required, here) and its enum values.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import typing
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

SCHEMA = json.loads((Path(__file__).parents[1] / "qwenbook_bridge" / "schema" / "protocol.json").read_text("utf-8"))
DEFS = SCHEMA["$defs"]

# Where the training config lives: its current home first, then the module it moved from.
CONFIG_MODULES = ("qwenbook_bridge.engine.train.config", "qwenbook_bridge.engine.training_config")


def config_module() -> ModuleType:
    for name in CONFIG_MODULES:
        try:
            return importlib.import_module(name)
        except ModuleNotFoundError as e:
            # Only the module itself (or its package) being absent means "try the other name";
            # a missing dependency inside it is a real failure.
            if e.name is None or not name.startswith(e.name):
                raise
    raise AssertionError(f"no training config module: tried {', '.join(CONFIG_MODULES)}")


def as_json(value: Any) -> Any:
    """A Python default as it reads in JSON: tuples as lists, nested dataclasses as objects."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: as_json(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, (list, tuple)):
        return [as_json(v) for v in value]
    return value


def python_defaults(cls: type) -> dict[str, Any]:
    """Each field's default; fields without one map to the REQUIRED marker."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        if f.default is not dataclasses.MISSING:
            out[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            out[f.name] = f.default_factory()
        else:
            out[f.name] = REQUIRED
    return out


REQUIRED = object()


def drift(cls: type, def_name: str) -> list[str]:
    """Every way the dataclass and the schema's object disagree, worded to say which side to edit."""
    schema = DEFS[def_name]
    props: dict[str, dict[str, Any]] = schema["properties"]
    required = set(schema.get("required", []))
    ours = python_defaults(cls)
    problems = [f"{def_name}.{n} is in protocol.json but not a field of {cls.__name__}" for n in props if n not in ours]
    problems += [f"{cls.__name__}.{n} is not in protocol.json's {def_name}" for n in ours if n not in props]
    hints = typing.get_type_hints(cls)
    for name in (n for n in props if n in ours):
        prop, default = props[name], ours[name]
        if default is REQUIRED:
            if name not in required:
                problems.append(f"{cls.__name__}.{name} has no default, but {def_name} does not require it")
        elif "$ref" in prop and default is not None:
            nested = prop["$ref"].rsplit("/", 1)[-1]
            want = {k: p["default"] for k, p in DEFS[nested]["properties"].items() if "default" in p}
            got = {k: v for k, v in as_json(default).items() if v is not None}
            if got != want:
                problems.append(f"{cls.__name__}.{name} defaults to {got}, {nested}'s defaults are {want}")
        elif default is None:
            if "default" in prop:
                problems.append(f"{cls.__name__}.{name} defaults to None, protocol.json to {prop['default']!r}")
        elif "default" not in prop:
            problems.append(f"{cls.__name__}.{name} defaults to {default!r}, protocol.json gives no default")
        elif as_json(default) != prop["default"] or isinstance(default, bool) != isinstance(prop["default"], bool):
            problems.append(f"{cls.__name__}.{name} defaults to {default!r}, protocol.json to {prop['default']!r}")
        literal = [a for a in typing.get_args(hints[name]) if a is not type(None)] if typing.get_origin(hints[name]) is typing.Union \
            else [hints[name]]
        values = [v for t in literal if typing.get_origin(t) is typing.Literal for v in typing.get_args(t)]
        if values and sorted(values) != sorted(prop.get("enum", [])):
            problems.append(f"{cls.__name__}.{name} allows {values}, protocol.json's enum is {prop.get('enum')}")
    return problems


def test_train_config_matches_protocol_train_options() -> None:
    assert drift(config_module().TrainConfig, "TrainOptions") == []


def test_lora_settings_match_protocol_lora_options() -> None:
    assert drift(config_module().LoraSettings, "LoraOptions") == []


def test_preference_settings_match_protocol_preference_options() -> None:
    assert drift(config_module().PreferenceSettings, "PreferenceOptions") == []


@pytest.mark.parametrize("change, expected", [
    ("extra", "TrainConfig.label_smoothing is not in protocol.json's TrainOptions"),
    ("default", "TrainConfig.lr defaults to 0.001, protocol.json to 0.0001"),
    ("enum", "TrainConfig.schedule allows ['cosine', 'linear', 'constant', 'wsd'], protocol.json's enum is"),
])
def test_drift_is_caught(change: str, expected: str) -> None:
    """The check itself: a field, a default or an enum value changed on one side only is reported."""
    module = config_module()
    base = module.TrainConfig
    if change == "extra":
        cls = dataclasses.make_dataclass("TrainConfig", [("label_smoothing", float, dataclasses.field(default=0.0))],
                                         bases=(base,))
    elif change == "default":
        cls = dataclasses.make_dataclass("TrainConfig", [("lr", float, dataclasses.field(default=1e-3))], bases=(base,))
    else:
        cls = dataclasses.make_dataclass(
            "TrainConfig", [("schedule", typing.Literal["cosine", "linear", "constant", "wsd"],
                             dataclasses.field(default="cosine"))], bases=(base,))
    cls.__module__ = module.__name__
    assert any(p.startswith(expected) for p in drift(cls, "TrainOptions")), drift(cls, "TrainOptions")
