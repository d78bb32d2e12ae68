"""The CPU suite's conftest as a module, for the folders beside it (tests_gpu, tests_wandb) that reuse its fixtures:
pytest registers each folder's conftest under the same name, so it is loaded from its file under another."""

import importlib.util
from pathlib import Path
from types import ModuleType


def load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("cpu_conftest", Path(__file__).with_name("conftest.py"))
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
