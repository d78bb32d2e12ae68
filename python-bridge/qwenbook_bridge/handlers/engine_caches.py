"""The key/value caches of the live paged engines, as status and the `gpu` broadcast report them
(protocol.json's EngineCache): each model's notebook chat engine and each OpenAI server's engine hold a
cache sized at start, often most of a GPU, so the memory gauge says whose it is and how full."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from qwenbook_bridge.engine.generate.paged.scheduler import PagedEngine
    from qwenbook_bridge.engine.llama_cpp.engine import LlamaCppEngine

Role = Literal["chat", "server"]


def engine_cache(model_id: str, role: Role, engine: PagedEngine | LlamaCppEngine) -> dict[str, Any]:
    """One engine's EngineCache item. `stats()` copies a few counters, so this is cheap enough for the
    once-a-second telemetry."""
    s = engine.stats()
    item: dict[str, Any] = {
        "model_id": model_id,
        "role": role,
        "device": str(engine.device),  # as DeviceMemory names it (cuda:0, cpu), so a gauge finds its device
        "blocks_total": s.blocks_total,
        "blocks_used": s.blocks_used,
        "block_size": s.block_size,
        "cache_bytes": s.cache_bytes,
        "prefix_hit_rate": s.prefix_hit_rate,
        "running": s.active,
        "waiting": s.waiting,
    }
    # The share only means something when it sized the cache; a fixed block count (the chat engine's rows
    # times context) leaves it out, as the protocol leaves out every absent value.
    if engine.config.num_blocks is None:
        item["memory_utilization"] = float(engine.config.memory_utilization)
    return item


def cache_items(chat: list[tuple[str, PagedEngine | LlamaCppEngine]],
                servers: list[tuple[str, PagedEngine | LlamaCppEngine]]) -> list[dict[str, Any]]:
    """The chat engines' items, then the servers'."""
    return [*(engine_cache(model_id, "chat", engine) for model_id, engine in chat),
            *(engine_cache(model_id, "server", engine) for model_id, engine in servers)]
