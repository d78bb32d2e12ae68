"""Executes a notebook top to bottom with the Qwen kernel (nbclient) and writes the executed copy.

Used by the notebook suite; also handy by hand: python tests/notebooks/execute.py NB OUT [--timeout S]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import CellExecutionError


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("notebook")
    p.add_argument("out")
    p.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    p.add_argument("--kernel", default="qwen-ts")
    a = p.parse_args()
    nb = nbformat.read(a.notebook, as_version=4)
    client = NotebookClient(nb, timeout=a.timeout, kernel_name=a.kernel,
                            resources={"metadata": {"path": str(Path(a.notebook).parent.resolve())}})
    t0 = time.time()
    status = 0
    try:
        client.execute()
    except CellExecutionError as e:
        print(f"cell failed: {e}", file=sys.stderr)
        status = 1
    nb.metadata["qwenbook_run_seconds"] = round(time.time() - t0, 1)
    nbformat.write(nb, a.out)
    return status


if __name__ == "__main__":
    sys.exit(main())
