"""Every config class survives ``to_dict`` -> ``from_dict`` (found automatically: a new config is covered)."""

from __future__ import annotations

import dataclasses
import importlib
import json
import pkgutil

import pytest

import dreamflow
from dreamflow import config as cfgio


def config_classes():
    """Every dataclass named ``*Config`` defined in a dreamflow module."""
    found = {}
    for info in pkgutil.walk_packages(dreamflow.__path__, "dreamflow."):
        if info.name.endswith("__main__"):
            continue
        module = importlib.import_module(info.name)
        for value in vars(module).values():
            if (isinstance(value, type) and dataclasses.is_dataclass(value) and value.__name__.endswith("Config")
                    and value.__module__ == module.__name__):
                found[f"{value.__module__}.{value.__qualname__}"] = value
    return [found[k] for k in sorted(found)]


def test_config_classes_are_found():
    names = {c.__name__ for c in config_classes()}
    assert {"GuidanceConfig", "SceneLoRAConfig", "NeRFStageConfig", "MeshStageConfig", "FastPathConfig",
            "ExportConfig", "DemoConfig"} <= names


@pytest.mark.parametrize("cls", config_classes(), ids=lambda c: c.__name__)
def test_config_round_trips_through_a_json_dict(cls):
    cfg = cls()
    data = json.loads(json.dumps(cfgio.to_dict(cfg)))  # what a state header or a log holds
    back = cfgio.from_dict(cls, data)
    assert back == cfg  # nested configs come back as their classes, tuples as tuples
    for f in dataclasses.fields(cls):
        value = getattr(cfg, f.name)
        assert type(getattr(back, f.name)) is type(value), f"{cls.__name__}.{f.name}"
