"""Serve a model as an OpenAI-compatible API without a notebook.

    python -m qwenbook_bridge.openai.cli Qwen/Qwen2.5-7B-Instruct --port 8000 [--adapter NAME=DIR ...] [--api-key K]

Loads the model once, serves until Ctrl-C (or SIGTERM), then closes the port and exits 0.

LoRA adapters are served by name beside the base model, as vLLM's --lora-modules: `--adapter NAME=DIR`
(repeatable) makes a request whose "model" is NAME decode through the adapter in DIR; every other request
(the base model's name, its hub id or folder, or no model) gets the base model. `--adapter DIR` without a
name serves the adapter as the folder's name. --name names the base model. With exactly one adapter the
"Serving NAME at URL" line names the adapter, so a client that asks for the printed name gets the adapter's
output (as when the adapter was applied on top of the model); with several it names the base model.
vLLM's spelling works too: `--lora-modules NAME=DIR [NAME=DIR ...]`, or a JSON object
'{"name": NAME, "path": DIR}' in place of NAME=DIR.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import signal
import sys
import threading
from dataclasses import replace
from pathlib import Path

from qwenbook_bridge.engine.errors import EngineError


def default_name(source: str) -> str:
    """The id clients pass as `model` for the base: the hub id as written, else the model folder's name."""
    return source.rstrip("/") if "/" in source and not Path(source).exists() else Path(source.rstrip("/")).name


def adapter_option(text: str) -> tuple[str, str]:
    """`--adapter NAME=DIR` or `--adapter DIR` as (name, folder). A value that is an existing folder is a DIR
    even if it holds '=' (a folder named a=b); otherwise the text before the first '=' is the name. vLLM's
    JSON form '{"name": NAME, "path": DIR}' is read too."""
    if text.lstrip().startswith("{"):
        try:
            spec = json.loads(text)
        except json.JSONDecodeError as exc:
            raise argparse.ArgumentTypeError(f"{text!r} is not valid JSON ({exc.msg}): write NAME=DIR or "
                                             '{"name": NAME, "path": DIR}') from None
        if not isinstance(spec, dict) or not isinstance(spec.get("name"), str) or not isinstance(spec.get("path"), str):
            raise argparse.ArgumentTypeError(f'{text!r} needs string fields "name" and "path", e.g. '
                                             '{"name": "huanhuan", "path": "./out/adapter"}')
        name, folder = spec["name"], spec["path"]
        if not name.strip() or name != name.strip() or not folder:
            raise argparse.ArgumentTypeError(f"{text!r} needs a non-empty name without surrounding spaces and a "
                                             "non-empty path")
        return name, folder
    name, sep, folder = text.partition("=")
    if not sep or Path(text).expanduser().is_dir():
        folder = text
        name = Path(text.rstrip("/")).name
    if not name.strip() or name != name.strip():
        raise argparse.ArgumentTypeError(f"{text!r} has no adapter name: write NAME=DIR, e.g. huanhuan=./out/adapter")
    if not folder:
        raise argparse.ArgumentTypeError(f"{text!r} has no adapter folder: write NAME=DIR, e.g. {name}=./out/adapter")
    return name, folder


def adapters_from(options: list[tuple[str, str]] | None) -> dict[str, str]:
    """The --adapter options as name -> folder, refusing one name given twice."""
    adapters: dict[str, str] = {}
    for name, folder in options or []:
        if name in adapters:
            raise EngineError(f"--adapter names {name!r} twice ({adapters[name]} and {folder}): give each adapter "
                              "its own name with NAME=DIR")
        adapters[name] = str(Path(folder).expanduser().absolute())
    return adapters


_UNITS = {"": 1, "b": 1, "k": 1024, "kb": 1000, "kib": 1024, "m": 1024 ** 2, "mb": 1000 ** 2, "mib": 1024 ** 2,
          "g": 1024 ** 3, "gb": 1000 ** 3, "gib": 1024 ** 3}


def byte_size(text: str) -> int:
    """'4194304', '4MiB', '512k' or '8 MB' as bytes (k/M/G alone are binary, as in curl and nginx)."""
    match = re.fullmatch(r"\s*(\d+)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else ""
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size: give bytes, or a number with KiB, MiB or GiB "
                                         "(e.g. 4MiB)")
    return int(match.group(1)) * _UNITS[unit]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m qwenbook_bridge.openai.cli", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("model", help="hub id (e.g. Qwen/Qwen2.5-7B-Instruct) or local model folder")
    p.add_argument("--port", type=int, default=8000, help="port to listen on; 0 picks a free one (default 8000)")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1, this machine only; 0.0.0.0 for every interface)")
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every request")
    p.add_argument("--name", default=None,
                   help="model id clients use for the base model (default: the hub id or the model folder's name)")
    p.add_argument("--adapter", type=adapter_option, action="append", default=None, metavar="NAME=DIR",
                   help="serve the LoRA adapter in DIR as model NAME beside the base model; repeatable. DIR alone "
                        "serves it as the folder's name")
    p.add_argument("--lora-modules", type=adapter_option, action="extend", nargs="+", dest="adapter",
                   metavar="NAME=DIR", help="vLLM's spelling of --adapter: one or more NAME=DIR (or JSON "
                   '{"name": ..., "path": ...})')
    p.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    p.add_argument("--dtype", default="auto", help="auto, bf16, fp16 or fp32 (default auto)")
    p.add_argument("--max-batch-size", type=int, default=32, help="requests decoded together (default 32)")
    p.add_argument("--context-length", type=int, default=None,
                   help="tokens per request, prompt included (default: the model's own)")
    p.add_argument("--memory-utilization", type=float, default=0.9,
                   help="share of the device's memory the model and its key/value cache may use (default 0.9)")
    p.add_argument("--max-queue", type=int, default=None,
                   help="requests that may wait for a place in the batch; more get 429 (default: 4 per batch row)")
    p.add_argument("--max-body", type=byte_size, default=None,
                   help="largest request body, e.g. 4MiB; larger ones get 413 (default 4MiB)")
    p.add_argument("--retry-after", type=int, default=None,
                   help="Retry-After seconds on a 429 (default: estimated from recent request times)")
    p.add_argument("--client-timeout", type=float, default=None,
                   help="seconds a client may take to send its request or leave a stream unread (default 30)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from qwenbook_bridge.openai.serve_config import ServeConfig

    try:
        limits = {k: v for k, v in (("max_body_bytes", args.max_body), ("client_timeout_s", args.client_timeout))
                  if v is not None}
        name = args.name or default_name(args.model)
        adapters = adapters_from(args.adapter)
        # Checked before torch is imported and the model loads (the adapter folders too), so a bad option is
        # refused at once rather than after seconds of imports or minutes of loading.
        options = ServeConfig(port=args.port, host=args.host, api_key=args.api_key, model_name=name,
                              max_batch_size=args.max_batch_size, context_length=args.context_length,
                              memory_utilization=args.memory_utilization, adapters=adapters,
                              max_queue=args.max_queue, retry_after_s=args.retry_after, **limits).validate()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    from qwenbook_bridge.engine.models.loading import LoadOptions, LoadProgress, load_model
    from qwenbook_bridge.openai.server import OpenAIServer

    def progress(p: LoadProgress) -> None:
        print(f"[{p.stage}] {p.message}", file=sys.stderr, flush=True)

    try:
        loaded = load_model(args.model, LoadOptions(dtype=args.dtype, device=args.device), progress)
        # An adapter's name wins over an alias that happens to equal it (a model folder named like the adapter).
        aliases = tuple({args.model, loaded.model_id} - {name, *adapters})
        server = OpenAIServer.for_loaded(loaded, replace(options, aliases=aliases))
        server.start()
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    shown = next(iter(adapters)) if len(adapters) == 1 else name
    for adapter, folder in adapters.items():
        print(f"[adapter] {adapter} served from {folder}", file=sys.stderr, flush=True)
    done = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: done.set())
    print(f"Serving {shown} at {server.url}  (Ctrl-C stops)", flush=True)
    if adapters:
        print(f"  models: {name} (base){''.join(f', {a} (adapter)' for a in adapters)}", flush=True)
    print(f"  {server.curl_example(shown)}", flush=True)
    while not done.wait(0.5):  # a timed wait lets the signal handler run promptly
        pass
    print("stopping…", file=sys.stderr, flush=True)
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
