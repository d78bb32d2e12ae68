"""Drives a Jupyter kernel through jupyter_client for the integration tests: starts it by kernelspec name in
a given folder, runs cells in order and prints, as one JSON line, what each cell sent back.

usage: python kernel_driver.py KERNEL_NAME CWD CELLS_JSON
  CELLS_JSON: [{"code": "...", "interrupt_after_output": false, "right_after_error": false}, ...]
              or, for requests queued together, {"batch": ["code", "code", ...]}
  Each result: {"status", "stream", "errors": [{ename, evalue}], "displays": [{msg_type, data, display_id}]}
  A batch's result: {"status": "batch", "batch": [results], "statuses": [[index, state], ...]}, the
  status messages of its requests in the order they arrived.
A cell with interrupt_after_output gets the kernel's interrupt once its first text has arrived: a
stream, or the first update of a widget (its first display shows the request before any token).
After a failed cell the next one is sent half a second later, as a person would, unless it has
right_after_error: then it is sent as soon as the failed cell's reply and idle status are in.
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


def new_output():
    return {"status": None, "stream": "", "errors": [], "displays": []}


def collect(km, kc, ids, earlier, interrupt_on_output=False):
    """Follows the requests `ids` until each is idle and has its execute_reply; output that arrives late for an
    earlier cell (by parent msg_id) goes to that cell. With interrupt_on_output the kernel is interrupted once
    the first text arrives. Returns each request's output and the status messages in the order they came."""
    outs = {i: new_output() for i in ids}
    statuses, idle = [], set()
    limit = CELL_TIMEOUT_S * len(ids)
    deadline = time.monotonic() + limit
    while len(idle) < len(ids):
        if time.monotonic() > deadline:
            raise SystemExit(f"{len(ids)} request(s) did not finish within {limit} s")
        msg = kc.get_iopub_msg(timeout=CELL_TIMEOUT_S)
        parent = msg["parent_header"].get("msg_id")
        kind, content = msg["msg_type"], msg["content"]
        if parent in earlier:
            record(earlier[parent], kind, content)
            continue
        if parent not in outs:
            continue
        record(outs[parent], kind, content)
        if kind == "status":
            statuses.append([ids.index(parent), content["execution_state"]])
            if content["execution_state"] == "idle":
                idle.add(parent)
        if interrupt_on_output and kind in ("stream", "update_display_data"):
            km.interrupt_kernel()
            interrupt_on_output = False
    replies = 0
    while replies < len(ids):
        reply = kc.get_shell_msg(timeout=CELL_TIMEOUT_S)
        parent = reply["parent_header"].get("msg_id")
        if parent in outs and reply["msg_type"] == "execute_reply":
            outs[parent]["status"] = reply["content"]["status"]
            replies += 1
    earlier.update(outs)
    return [outs[i] for i in ids], statuses


def run_cell(km, kc, cell, earlier):
    (out,), _ = collect(km, kc, [kc.execute(cell["code"])], earlier, bool(cell.get("interrupt_after_output")))
    return out


def run_batch(km, kc, codes, earlier):
    """Sends every request at once (as Run All does), then collects each one's output and reply."""
    outs, statuses = collect(km, kc, [kc.execute(code) for code in codes], earlier)
    return {**new_output(), "status": "batch", "batch": outs, "statuses": statuses}


def main() -> None:
    kernel_name, cwd, cells = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    km, kc = start_new_kernel(kernel_name=kernel_name, cwd=cwd, startup_timeout=120)
    try:
        results, earlier = [], {}
        for cell in cells:
            if results and results[-1]["status"] not in ("ok", "batch") and not cell.get("right_after_error"):
                # A person does not re-run the instant a cell failed; most cells are sent as they would be.
                time.sleep(0.5)
            if "batch" in cell:
                results.append(run_batch(km, kc, cell["batch"], earlier))
            else:
                results.append(run_cell(km, kc, cell, earlier))
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
    print(json.dumps(results, ensure_ascii=False))


if __name__ == "__main__":
    main()
