"""Reuses the CPU suite's fixtures (tiny model, perturbed copies) for the GPU-only tests."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
import cpu_conftest as _loader  # noqa: E402  (found through the path above)

cpu_conftest = _loader.load()

tiny_model_dir = cpu_conftest.tiny_model_dir  # noqa: F401  (a fixture, found by name)
tiny_qwen3_dir = cpu_conftest.tiny_qwen3_dir  # noqa: F401
tiny_qwen3_moe_dir = cpu_conftest.tiny_qwen3_moe_dir  # noqa: F401


def pytest_configure(config: object) -> None:
    """Ends the run with one line on a machine without CUDA, instead of a collection traceback per file."""
    import pytest
    import torch

    if not torch.cuda.is_available():
        pytest.exit("python-bridge/tests_gpu: needs a CUDA GPU (none found); the CPU suite is python-bridge/tests",
                    returncode=1)
