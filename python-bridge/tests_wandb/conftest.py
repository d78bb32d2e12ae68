"""Reuses the CPU suite's fixtures (the tiny model) for the tests that need the wandb package."""

import importlib.util
import sys
from pathlib import Path

_cpu_tests = Path(__file__).resolve().parents[1] / "tests"
sys.path.insert(0, str(_cpu_tests))
_spec = importlib.util.spec_from_file_location("cpu_conftest", _cpu_tests / "conftest.py")
assert _spec and _spec.loader
cpu_conftest = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(cpu_conftest)

tiny_model_dir = cpu_conftest.tiny_model_dir  # noqa: F401  (a fixture, found by name)


def pytest_configure(config: object) -> None:
    """One line where wandb is missing, instead of a failure per test."""
    import pytest

    if importlib.util.find_spec("wandb") is None:
        pytest.exit("python-bridge/tests_wandb: needs the wandb package (pip install wandb)", returncode=1)
