"""Drives a Jupyter kernel through jupyter_client for the integration tests: starts it by kernelspec name in
a given folder, runs cells in order and prints, as one JSON line, what each cell sent back.

usage: python kernel_driver.py KERNEL_NAME CWD CELLS_JSON
  CELLS_JSON: [{"code": "...", "interrupt_after_output": false}, ...]
  Each result: {"status", "stream", "errors": [{ename, evalue}], "displays": [{msg_type, data, display_id}]}
A cell with interrupt_after_output gets the kernel's interrupt once its first text has arrived: a
stream, or the first update of a widget (its first display shows the request before any token).
"""

from __future__ import annotations

import json
import sys
import time

from jupyter_client.manager import start_new_kernel

CELL_TIMEOUT_S = 120


def record(out, kind, content):
    if kind == "stream":
        out["stream"] += content["text"]
    elif kind == "error":
        out["errors"].append({"ename": content["ename"], "evalue": content["evalue"]})
    elif kind in ("display_data", "update_display_data", "execute_result"):
        out["displays"].append({"msg_type": kind, "data": content.get("data", {}),
                                "display_id": content.get("transient", {}).get("display_id")})


def run_cell(km, kc, cell, earlier):
    """Runs one cell; output that arrives late for an earlier cell (by parent msg_id) goes to that cell."""
    msg_id = kc.execute(cell["code"])
    out = {"status": None, "stream": "", "errors": [], "displays": []}
    interrupted = not cell.get("interrupt_after_output")
    deadline = time.monotonic() + CELL_TIMEOUT_S
    idle = False
    while not idle:
        if time.monotonic() > deadline:
            raise SystemExit(f"cell did not finish within {CELL_TIMEOUT_S} s: {cell['code'][:80]!r}")
        msg = kc.get_iopub_msg(timeout=CELL_TIMEOUT_S)
        parent = msg["parent_header"].get("msg_id")
        kind, content = msg["msg_type"], msg["content"]
        if parent in earlier:
            record(earlier[parent], kind, content)
            continue
        if parent != msg_id:
            continue
        record(out, kind, content)
        if kind == "status" and content["execution_state"] == "idle":
            idle = True
        if not interrupted and kind in ("stream", "update_display_data"):
            km.interrupt_kernel()
            interrupted = True
    while True:
        reply = kc.get_shell_msg(timeout=CELL_TIMEOUT_S)
        if reply["parent_header"].get("msg_id") == msg_id and reply["msg_type"] == "execute_reply":
            break
    out["status"] = reply["content"]["status"]
    earlier[msg_id] = out
    return out


def main() -> None:
    kernel_name, cwd, cells = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    km, kc = start_new_kernel(kernel_name=kernel_name, cwd=cwd, startup_timeout=120)
    try:
        results, earlier = [], {}
        for cell in cells:
            results.append(run_cell(km, kc, cell, earlier))
            if results[-1]["status"] != "ok":
                # tslab aborts every execute request that arrives within 200 ms of a failed cell (as
                # ipykernel's stop-on-error does); a person never re-runs that fast, so wait as they would.
                time.sleep(0.5)
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
