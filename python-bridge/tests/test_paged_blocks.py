"""The paged cache's block pool (engine/generate/paged/blocks.py): reference counts, prefix caching keyed by
exact token content, least-recently-released eviction, and the memory budget the cache is sized from."""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest
import torch

from qwenbook_bridge.engine.errors import InvalidOptionError
from qwenbook_bridge.engine.generate.paged import blocks as blocks_module
from qwenbook_bridge.engine.generate.paged.blocks import (CPU_CACHE_CAP_BYTES, BlockPool, CacheShape, NoFreeBlocks,
    cache_budget_bytes)

BS = 4  # tokens a block


def run(pool: BlockPool, tokens: list[int], namespace: object = None) -> tuple[list[int], list[int]]:
    """What the scheduler does for a prompt: take the cached prefix, allocate the rest, commit each full block
    once it has been computed. Returns (block table, the blocks that were prefix hits)."""
    hits = pool.match_prefix(tokens, namespace=namespace)
    table = hits + pool.allocate(-(-len(tokens) // BS) - len(hits))
    for i in range(len(hits), len(tokens) // BS):
        pool.commit(table[i], tokens[i * BS:(i + 1) * BS], table[i - 1] if i else None, namespace=namespace)
    return table, hits


A = [1, 2, 3, 4, 5, 6, 7, 8]
B = [11, 12, 13, 14, 15, 16, 17, 18]


def test_allocate_and_release_count_references() -> None:
    pool = BlockPool(num_blocks=4, block_size=BS)
    first = pool.allocate(3)
    assert len(set(first)) == 3 and pool.used_count == 3 and pool.free_count == 1 and pool.can_allocate(1)
    assert not pool.can_allocate(2)
    for i, b in enumerate(first[:2]):
        pool.commit(b, A[i * BS:(i + 1) * BS], first[i - 1] if i else None)
    shared = pool.match_prefix(A + [9])  # a second sequence takes references on the two committed blocks
    assert shared == first[:2] and pool.used_count == 3
    pool.release(first)
    assert pool.used_count == 2, "blocks still held by the second sequence must stay in use"
    assert pool.free_count == 2
    with pytest.raises(ValueError, match="released 2 time"):
        pool.release([shared[0], shared[0]])
    assert pool.used_count == 2, "a refused release changes nothing"
    pool.release(shared)
    assert pool.used_count == 0 and pool.free_count == 4
    with pytest.raises(ValueError, match="held 0 time"):
        pool.release([first[2]])


def test_a_second_sequence_finds_the_shared_prefix_and_the_stats_count_it() -> None:
    pool = BlockPool(num_blocks=8, block_size=BS)
    first, hits = run(pool, A + [100, 101])
    assert hits == []
    second, hits = run(pool, A + [200])
    assert hits == first[:2] and second[:2] == first[:2] and second[2] not in first
    stats = pool.stats()
    assert (stats.queries, stats.query_tokens, stats.hit_tokens) == (2, 10 + 9, 8)
    assert stats.cached_blocks == 2 and stats.hit_rate == pytest.approx(8 / 19)
    pool.release(first)
    pool.release(second)
    third, hits = run(pool, A + [300])  # found again after every holder let go: cached blocks outlive sequences
    assert hits == first[:2]
    assert pool.stats().hit_tokens == 16


def test_a_partly_filled_block_is_never_matched() -> None:
    pool = BlockPool(num_blocks=8, block_size=BS)
    table, _ = run(pool, A + [9, 10])  # the third block holds 2 of its 4 tokens and is not committed
    assert pool.match_prefix(A + [9, 10, 11, 12, 13]) == table[:2]
    with pytest.raises(ValueError, match="full block of 4 tokens, got 2"):
        pool.commit(table[2], [9, 10], table[1])


def test_at_least_one_token_is_always_left_to_compute() -> None:
    pool = BlockPool(num_blocks=8, block_size=BS)
    table, _ = run(pool, A)
    assert pool.match_prefix(A) == table[:1], "the last prompt token must run to give the next token's logits"
    assert pool.match_prefix(A[:4]) == []
    assert pool.match_prefix(A + [9]) == table[:2]
    pool.release(table + table[:1] + table)  # every reference taken above
    queries = pool.stats().queries
    assert pool.peek_prefix(A + [9]) == 2
    assert (pool.stats().queries, pool.used_count) == (queries, 0), "peek neither counts nor takes"


def test_eviction_takes_the_least_recently_released_cached_block() -> None:
    pool = BlockPool(num_blocks=4, block_size=BS)
    a, _ = run(pool, A)
    b, _ = run(pool, B)
    pool.release(a)  # released first, so evicted first; within a sequence the tail goes before the head
    pool.release(b)
    assert pool.free_count == 4 and pool.stats().cached_blocks == 4
    assert pool.allocate(1) == [a[1]]
    assert pool.match_prefix(A + [9]) == [a[0]], "the evicted second block of A is missed"
    assert pool.match_prefix(B + [9]) == b, "B was released later and stays cached"
    pool.release([a[0]])
    pool.release(b)  # B is now the most recently released
    assert pool.allocate(1) == [a[0]]
    assert pool.match_prefix(A + [9]) == []
    stats = pool.stats()
    assert stats.evictions == 2 and stats.cached_blocks == 2


def test_never_used_blocks_go_before_cached_ones() -> None:
    pool = BlockPool(num_blocks=4, block_size=BS)
    a, _ = run(pool, A)
    pool.release(a)
    fresh = pool.allocate(2)
    assert not set(fresh) & set(a) and pool.stats().evictions == 0
    assert pool.match_prefix(A + [9]) == a


def test_a_cached_child_is_found_again_once_its_evicted_parent_is_recomputed() -> None:
    pool = BlockPool(num_blocks=3, block_size=BS)
    a, _ = run(pool, A)
    pool.release([a[0]])  # the head released before the tail, so the head is evicted first
    pool.release([a[1]])
    extra = pool.allocate(2)  # the never-used block, then the head of A
    assert a[0] in extra and pool.match_prefix(A + [9]) == []
    pool.release(extra)
    head, hits = run(pool, A[:4] + [9])  # a request that computes the head again
    assert hits == []
    pool.release(head)
    assert pool.match_prefix(A + [9]) == [head[0], a[1]], "the tail is reused without being computed again"


def test_no_free_blocks_when_every_block_is_held() -> None:
    pool = BlockPool(num_blocks=4, block_size=BS)
    held = pool.allocate(3)
    with pytest.raises(NoFreeBlocks) as raised:
        pool.allocate(2)
    message = str(raised.value)
    assert "2 key/value cache block(s)" in message and "1 of the cache's 4 blocks" in message
    assert "memory_utilization" in message and "num_blocks" in message
    assert (raised.value.needed, raised.value.available, raised.value.total) == (2, 1, 4)
    assert pool.used_count == 3, "a refused allocation takes nothing"
    pool.release(held)
    assert len(pool.allocate(4)) == 4


def test_a_hash_collision_cannot_return_another_prompts_blocks() -> None:
    # Every block hashes alike, so only the exact comparison of parent and tokens tells contents apart.
    pool = BlockPool(num_blocks=16, block_size=BS, block_hash=lambda parent, tokens: 0)
    first, _ = run(pool, [1, 1, 1, 1, 7, 7, 7, 7])
    assert pool.match_prefix([2, 2, 2, 2, 9]) == []
    other = [2, 2, 2, 2, 7, 7, 7, 7]  # the same second block after a different first block
    assert pool.match_prefix(other + [9]) == []
    second, hits = run(pool, other + [9])
    assert hits == [] and not set(second) & set(first)
    assert pool.match_prefix(other + [9]) == second[:2]
    assert pool.match_prefix([1, 1, 1, 1, 7, 7, 7, 7, 9]) == first
    assert pool.match_prefix([1, 1, 1, 1, 8, 8, 8, 8, 9]) == first[:1]


def test_identical_blocks_committed_twice_are_kept_and_shared() -> None:
    pool = BlockPool(num_blocks=8, block_size=BS)
    # Two requests for the same prompt prefilled in the same step: neither found the other's blocks.
    x = pool.allocate(2)
    y = pool.allocate(2)
    for t in (x, y):
        pool.commit(t[0], A[:4], None)
        pool.commit(t[1], A[4:], t[0])
    pool.commit(x[1], A[4:], x[0])  # committing again is a no-op
    assert pool.stats().cached_blocks == 4
    with pytest.raises(ValueError, match="already committed with other content"):
        pool.commit(x[1], B[4:], x[0])
    pool.release(y)
    hit = pool.match_prefix(A + [9])
    assert hit == x, "a held duplicate is shared rather than a cached one taken out of the evictable set"
    pool.release(x)
    pool.release(hit)
    assert len(pool.allocate(8)) == 8 and pool.stats().cached_blocks == 0


def test_commit_refuses_blocks_out_of_order() -> None:
    pool = BlockPool(num_blocks=4, block_size=BS)
    t = pool.allocate(2)
    with pytest.raises(ValueError, match="commit a sequence's blocks in order"):
        pool.commit(t[1], A[4:], t[0])
    with pytest.raises(ValueError, match="not held"):
        pool.commit(3, A[:4], None)
    with pytest.raises(ValueError, match="0..3"):
        pool.commit(4, A[:4], None)


def test_namespaces_keep_adapters_apart_and_forget_drops_one() -> None:
    pool = BlockPool(num_blocks=8, block_size=BS)
    tuned, _ = run(pool, A, namespace="huanhuan")
    assert pool.match_prefix(A + [9]) == [], "keys and values computed by an adapter are not the base model's"
    base, hits = run(pool, A + [9])
    assert hits == []
    assert pool.match_prefix(A + [9], namespace="huanhuan") == tuned
    pool.release(tuned)  # the adapter's blocks: once by their sequence, once by the match above
    pool.release(tuned)
    pool.release(base)
    assert pool.stats().cached_blocks == 4
    held, hits = run(pool, A + [9], namespace="huanhuan")
    assert hits == tuned
    pool.forget("huanhuan")  # the adapter was replaced
    assert pool.match_prefix(A + [9], namespace="huanhuan") == []
    assert pool.match_prefix(A + [9]) == base[:2], "the base model's blocks are untouched"
    pool.release(base[:2])
    pool.release(held)  # held forgotten blocks become free, not cached, when released
    assert pool.stats().cached_blocks == 2
    again, hits = run(pool, A + [9], namespace="huanhuan")
    assert hits == [] and pool.match_prefix(A + [9], namespace="huanhuan") == again[:2]


def test_a_block_allocated_before_a_forget_is_never_cached_under_the_new_weights() -> None:
    pool = BlockPool(num_blocks=8, block_size=BS)
    early = pool.allocate(2)  # a prompt being prefilled when its adapter is replaced
    pool.forget("x")
    pool.commit(early[0], A[:4], None, namespace="x")
    pool.commit(early[1], A[4:], early[0], namespace="x")
    assert pool.match_prefix(A + [9], namespace="x") == [], "part of it may hold the old adapter's keys"
    pool.release(early)
    assert pool.stats().cached_blocks == 0
    fresh, _ = run(pool, A, namespace="x")
    assert pool.match_prefix(A + [9], namespace="x") == fresh
    other = pool.allocate(1)
    pool.forget("y")  # another namespace's forget leaves this one alone
    pool.commit(other[0], B[:4], None, namespace="x")
    assert pool.match_prefix(B[:4] + [9], namespace="x") == other


def test_without_prefix_caching_nothing_is_kept() -> None:
    pool = BlockPool(num_blocks=4, block_size=BS, prefix_caching=False)
    a, hits = run(pool, A)
    assert hits == []
    pool.release(a)
    assert pool.match_prefix(A + [9]) == [] and pool.stats().cached_blocks == 0
    assert pool.stats().queries == 2 and pool.stats().hit_tokens == 0


def test_bad_pool_sizes_are_refused() -> None:
    with pytest.raises(InvalidOptionError, match="num_blocks must be a positive whole number, got 0"):
        BlockPool(num_blocks=0, block_size=BS)
    with pytest.raises(InvalidOptionError, match="block_size"):
        BlockPool(num_blocks=4, block_size=2.5)  # type: ignore[arg-type]


def test_bytes_per_block_of_a_qwen2_5_7b_shape() -> None:
    shape = CacheShape(num_layers=28, num_kv_heads=4, head_dim=128, dtype=torch.bfloat16, block_size=16)
    assert shape.bytes_per_block() == 2 * 28 * 16 * 4 * 128 * 2 == 917_504
    assert CacheShape(28, 4, 128, torch.float32, 16).bytes_per_block() == 2 * 917_504
    with pytest.raises(InvalidOptionError, match="head_dim"):
        CacheShape(28, 4, 0, torch.bfloat16, 16)


def test_cpu_budget_is_positive_and_below_available_ram() -> None:
    before = psutil.virtual_memory().available
    budget = cache_budget_bytes(torch.device("cpu"), 0.5)
    after = psutil.virtual_memory().available
    assert 0 < budget < max(before, after) and budget <= CPU_CACHE_CAP_BYTES
    smaller = cache_budget_bytes("cpu", 0.5, weights_bytes=budget // 2)
    assert smaller < budget, "weights still to load come out of the budget"


@pytest.mark.parametrize("utilization", [0, -0.1, 1.5, float("nan"), True, "0.9"])
def test_a_utilization_outside_zero_to_one_is_refused(utilization: object) -> None:
    with pytest.raises(InvalidOptionError, match=r"memory_utilization must be a fraction in \(0, 1\]"):
        cache_budget_bytes("cpu", utilization)  # type: ignore[arg-type]


def test_a_budget_too_small_is_a_clear_error() -> None:
    with pytest.raises(InvalidOptionError) as raised:
        cache_budget_bytes("cpu", 0.01, minimum=CPU_CACHE_CAP_BYTES * 2)
    message = str(raised.value)
    assert "needs at least" in message and "Raise memory_utilization" in message and "num_blocks" in message


def test_the_cpu_budget_follows_a_container_memory_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    limit, usage, inactive = 2 * 2**30, 2**30 + 2**29, 2**28  # 2 GiB limit, 1.5 GiB used of which 0.25 reclaimable
    (tmp_path / "max").write_text(f"{limit}\n")
    (tmp_path / "current").write_text(f"{usage}\n")
    (tmp_path / "stat").write_text(f"anon 123\ninactive_file {inactive}\nactive_file 5\n")
    monkeypatch.setattr(blocks_module, "CGROUP_MEMORY_FILES",
                        ((str(tmp_path / "max"), str(tmp_path / "current"), str(tmp_path / "stat"), "inactive_file"),))
    expected = limit - (usage - inactive)
    assert expected < psutil.virtual_memory().available, "the test needs a limit below this machine's free RAM"
    assert cache_budget_bytes("cpu", 0.5) == expected // 2
    (tmp_path / "max").write_text("max\n")  # no limit: the machine's RAM counts
    assert cache_budget_bytes("cpu", 0.5) > expected // 2


def test_the_cuda_budget_leaves_room_for_what_is_in_use(monkeypatch: pytest.MonkeyPatch) -> None:
    total, free, reserved, allocated = 100 * 2**30, 60 * 2**30, 30 * 2**30, 25 * 2**30
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda device=None: (free, total))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device=None: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device=None: allocated)
    # 40 GiB in use on the card, 5 GiB of it held unused by PyTorch's allocator and usable again: 35 GiB.
    assert cache_budget_bytes(torch.device("cuda", 0), 0.9) == int(0.9 * total) - 35 * 2**30
    assert cache_budget_bytes("cuda:0", 0.9, weights_bytes=2**30) == int(0.9 * total) - 36 * 2**30
    with pytest.raises(InvalidOptionError, match=r"cuda:0 has 100.0 GiB with 35.0 GiB in use"):
        cache_budget_bytes("cuda:0", 0.3)


def test_random_traffic_keeps_every_block_in_one_state_and_every_hit_exact() -> None:
    """Sequences start (with prefixes drawn from a few shared ones), grow, finish and are preempted at random,
    and adapters are forgotten, against a record of what each block was filled with: every block is held,
    cached or free and never two of these, and every block match_prefix returns holds exactly the tokens asked
    for, computed under the namespace asked for and not forgotten since."""
    import random

    rng = random.Random(19)
    # A weak hash, so that different contents often share one (the exact comparison must tell them apart).
    pool = BlockPool(num_blocks=24, block_size=BS, block_hash=lambda parent, tokens: (parent + sum(tokens)) % 7)
    filled: dict[int, tuple[object, int, tuple[int, ...]]] = {}  # block -> (namespace, its forget count, tokens)
    forgets = {None: 0, "x": 0}
    stems = [[rng.randrange(6) for _ in range(n)] for n in (1, 3, 6, 12)]  # short ones start in a partial block
    running: list[dict] = []

    def commit_full(s: dict) -> None:
        while (s["committed"] + 1) * BS <= len(s["tokens"]):
            i = s["committed"]
            chunk = s["tokens"][i * BS:(i + 1) * BS]
            pool.commit(s["blocks"][i], chunk, s["blocks"][i - 1] if i else None, namespace=s["ns"])
            if s["blocks"][i] not in s["matched"]:
                filled[s["blocks"][i]] = (s["ns"], s["forgets"], tuple(chunk))
            s["committed"] += 1

    for _ in range(3000):
        op = rng.random()
        if op < 0.35 or not running:
            ns = rng.choice([None, "x"])
            tokens = rng.choice(stems) + [rng.randrange(2) for _ in range(rng.randrange(1, 6))]
            hits = pool.match_prefix(tokens, namespace=ns)
            for i, b in enumerate(hits):
                assert filled[b] == (ns, forgets[ns], tuple(tokens[i * BS:(i + 1) * BS])), "a hit of other content"
            assert len(hits) <= (len(tokens) - 1) // BS
            need = -(-len(tokens) // BS) - len(hits)
            while not pool.can_allocate(need) and running:
                pool.release(running.pop(rng.randrange(len(running)))["blocks"])  # preempt
            if not pool.can_allocate(need):
                pool.release(hits)
                continue
            s = {"ns": ns, "forgets": forgets[ns], "tokens": tokens, "blocks": hits + pool.allocate(need),
                 "committed": len(hits), "matched": set(hits)}
            commit_full(s)
            running.append(s)
        elif op < 0.75:
            s = rng.choice(running)  # decode one token, taking a block when the last one is full
            if len(s["tokens"]) == len(s["blocks"]) * BS:
                if not pool.can_allocate(1):
                    running.remove(s)
                    pool.release(s["blocks"])
                    continue
                s["blocks"] += pool.allocate(1)
            s["tokens"].append(rng.randrange(2))
            commit_full(s)
        elif op < 0.94:
            pool.release(running.pop(rng.randrange(len(running)))["blocks"])
        else:
            ns = rng.choice([None, "x"])
            pool.forget(ns)
            forgets[ns] += 1
        held = {b for s in running for b in s["blocks"]}
        assert pool.used_count == len(held) and pool.free_count == pool.num_blocks - len(held)
        evictable, free = set(pool._evictable), set(pool._free)
        assert len(free) == len(pool._free) and not (held & evictable or held & free or evictable & free)
        assert held | evictable | free == set(range(pool.num_blocks))
    assert pool.stats().evictions > 0 and pool.stats().hit_tokens > 0
