"""Reuses the CPU suite's fixtures (the tiny model) for the tests that need the wandb package."""

import importlib.util
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import cpu_conftest as _loader  # noqa: E402  (found through the path above)

cpu_conftest = _loader.load()

tiny_model_dir = cpu_conftest.tiny_model_dir  # noqa: F401  (a fixture, found by name)


def pytest_configure(config: object) -> None:
    """One line where wandb is missing, instead of a failure per test."""
    import pytest

    if importlib.util.find_spec("wandb") is None:
        pytest.exit("python-bridge/tests_wandb: needs the wandb package (pip install wandb)", returncode=1)
