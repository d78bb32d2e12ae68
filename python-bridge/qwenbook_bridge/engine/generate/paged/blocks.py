"""The key/value cache's blocks: which are free, who holds which, and which hold a known run of tokens.

The cache is `num_blocks` blocks of `block_size` token slots. A running sequence holds a list of blocks (its
block table); the pool counts references, so a block can sit in several tables at once when sequences share a
prefix. Prefix caching keys every FULL block by its content: the block's tokens after the exact content of all
blocks before it. A block filled by one request is committed under that key and stays cached after its last
holder lets go, so the next turn of a conversation, a shared system prompt or a repeated few-shot prefix finds
it with `match_prefix` instead of prefilling it again. Cached blocks nobody holds are evicted least recently
released first, and only when no never-used block is left.

Lookups go through a hash chain (a block's hash mixes its parent's hash with its own tokens, as vLLM does), but
a hash is only the index: every candidate's parent and tokens are compared exactly, so a collision costs a
miss, never another prompt's keys and values.

This module is bookkeeping only; the tensors live in runner.py. It is not thread-safe: the engine's step
thread owns the pool.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field

import psutil
import torch

from qwenbook_bridge.engine.errors import EngineError, InvalidOptionError

GiB = 1 << 30

# On the CPU the cache shares RAM with the notebook, Jupyter and the OS, and decoding there is compute-bound:
# 4 GiB holds about 75k tokens of a Qwen2.5-7B cache (bf16), more than a CPU decodes in minutes.
CPU_CACHE_CAP_BYTES = 4 * GiB

# Where a container's memory limit is read: cgroup v2, then v1 (limit, usage, stats, the stat of reclaimable
# page cache that usage includes).
CGROUP_MEMORY_FILES = (
    ("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current", "/sys/fs/cgroup/memory.stat", "inactive_file"),
    ("/sys/fs/cgroup/memory/memory.limit_in_bytes", "/sys/fs/cgroup/memory/memory.usage_in_bytes",
     "/sys/fs/cgroup/memory/memory.stat", "total_inactive_file"),
)

BlockHash = Callable[[int, tuple[int, ...]], int]


class NoFreeBlocks(EngineError):
    """Every block is held by a running sequence, so not even eviction can make room."""

    def __init__(self, message: str, needed: int, available: int, total: int) -> None:
        super().__init__(message)
        self.needed = needed
        self.available = available
        self.total = total


@dataclass(frozen=True)
class CacheShape:
    """The geometry of the paged key/value cache: per layer one K and one V tensor of
    [num_blocks * block_size, num_kv_heads, head_dim] in `dtype`."""

    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype
    block_size: int

    def __post_init__(self) -> None:
        for name in ("num_layers", "num_kv_heads", "head_dim", "block_size"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidOptionError(f"CacheShape.{name} must be a positive whole number, got {value!r}")
        if not isinstance(self.dtype, torch.dtype):
            raise InvalidOptionError(f"CacheShape.dtype must be a torch.dtype such as torch.bfloat16, got "
                                     f"{self.dtype!r}")

    def bytes_per_block(self) -> int:
        """K and V of `block_size` tokens in every layer."""
        return 2 * self.num_layers * self.block_size * self.num_kv_heads * self.head_dim * self.dtype.itemsize


def check_utilization(utilization: float) -> float:
    """`utilization` as a float in (0, 1], or a fixable error."""
    if isinstance(utilization, bool) or not isinstance(utilization, (int, float)) or not 0 < utilization <= 1:
        raise InvalidOptionError(
            f"memory_utilization must be a fraction in (0, 1] of the device's memory that the model and its "
            f"key/value cache may use (as vLLM's gpu_memory_utilization; 0.9 is usual), got {utilization!r}; "
            f"or set num_blocks to fix the cache's size yourself")
    return float(utilization)


def cache_budget_bytes(device: torch.device | str, utilization: float, weights_bytes: int = 0, *,
                       minimum: int = 1) -> int:
    """How many bytes the key/value cache may take on `device`.

    CUDA: `utilization` of the card's memory, less everything already in use there (this process's weights
    and CUDA context, other processes) except what PyTorch's allocator holds unused and can hand out again;
    the rest of the card stays free for a step's activations. CPU (and devices that share host RAM):
    `utilization` of the RAM available now, within the container's memory limit, at most
    CPU_CACHE_CAP_BYTES. `weights_bytes` is memory about to be taken that is not taken yet (weights still to
    be loaded); it is subtracted too. A budget below `minimum` bytes (the caller passes what one block, or
    one full-length sequence, needs) is a fixable error, never a negative number.
    """
    utilization = check_utilization(utilization)
    if isinstance(weights_bytes, bool) or not isinstance(weights_bytes, int) or weights_bytes < 0:
        raise InvalidOptionError(f"weights_bytes must be a whole number of bytes >= 0, got {weights_bytes!r}")
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        reusable = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        in_use = total - free - reusable
        budget = int(utilization * total) - in_use - weights_bytes
        where = (f"{device} has {total / GiB:.1f} GiB with {in_use / GiB:.1f} GiB in use, and "
                 f"memory_utilization {utilization} allows {utilization * total / GiB:.1f} GiB in all")
        fix = "free memory on the card (unload other models, stop other processes)"
    else:
        available, total = _ram_available()
        budget = min(int(utilization * available), CPU_CACHE_CAP_BYTES) - weights_bytes
        where = (f"this machine has {available / GiB:.1f} GiB of its {total / GiB:.1f} GiB of RAM available, and "
                 f"memory_utilization {utilization} allows {utilization * available / GiB:.1f} GiB of it")
        fix = "free RAM (unload other models, close other programs)"
    if weights_bytes:
        where += f", less {weights_bytes / GiB:.2f} GiB of weights still to load"
    if budget < minimum:
        raise InvalidOptionError(
            f"the key/value cache would get {max(budget, 0)} bytes but needs at least {minimum}: {where}. "
            f"Raise memory_utilization, {fix}, or set num_blocks to size the cache yourself")
    return budget


def _ram_available() -> tuple[int, int]:
    """(available, total) bytes of RAM for this process: psutil's figures, within a cgroup memory limit when
    one is set (psutil reports the host's RAM inside a container). Reclaimable page cache counts as available,
    as it does for psutil."""
    vm = psutil.virtual_memory()
    available, total = int(vm.available), int(vm.total)
    for limit_file, usage_file, stat_file, inactive_key in CGROUP_MEMORY_FILES:
        try:
            with open(limit_file, encoding="ascii") as f:
                text = f.read().strip()
            if text == "max":
                return available, total
            limit = int(text)
            with open(usage_file, encoding="ascii") as f:
                usage = int(f.read().strip())
            with open(stat_file, encoding="ascii") as f:
                stats = dict(line.split() for line in f if line.strip())
            usage -= int(stats.get(inactive_key, 0))
        except (OSError, ValueError):
            continue
        if limit < total:  # an unlimited cgroup reports a number beyond the machine's RAM
            return max(0, min(available, limit - usage)), limit
        return available, total
    return available, total


@dataclass(frozen=True)
class PrefixStats:
    queries: int  # match_prefix calls
    query_tokens: int  # tokens those calls asked about
    hit_tokens: int  # tokens they found cached (whole blocks)
    evictions: int  # cached blocks given to new content
    cached_blocks: int  # blocks holding committed content now, held or evictable

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


@dataclass(eq=False)
class _Content:
    """One distinct block content: `tokens` after the exact content `parent` (None: the start of a sequence in
    `root`). Kept while a cached block holds it or a kept child names it as parent, so a child committed
    after its parent was evicted is found again once the parent is recomputed."""

    parent: _Content | None
    root: tuple[Hashable, int]  # (namespace, its generation): the weights that computed the keys and values
    tokens: tuple[int, ...]
    key: int
    blocks: list[int] = field(default_factory=list)  # cached blocks holding exactly this content
    children: int = 0


def _default_hash(parent: int, tokens: tuple[int, ...]) -> int:
    return hash((parent, tokens))


class BlockPool:
    """Allocation, reference counts and prefix caching for `num_blocks` blocks of `block_size` tokens.

    A block is in exactly one state: held (reference count > 0), cached (no references, committed content,
    evictable, in release order) or free (no references, no content). `free_count` counts the last two, since
    `allocate` takes cached blocks when no free one is left.

    `namespace` (on match_prefix, peek_prefix and commit) keeps keys and values computed by different weights
    apart: the engine passes the row's adapter, so a prefix cached under one adapter is never found under
    another or under the base model; `forget(namespace)` drops one when its weights change.
    """

    def __init__(self, num_blocks: int, block_size: int, prefix_caching: bool = True, *,
                 block_hash: BlockHash = _default_hash) -> None:
        for name, value in (("num_blocks", num_blocks), ("block_size", block_size)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise InvalidOptionError(f"{name} must be a positive whole number, got {value!r}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = bool(prefix_caching)
        self._hash = block_hash
        self._refs = [0] * num_blocks
        self._content: list[_Content | None] = [None] * num_blocks
        self._free: collections.deque[int] = collections.deque(range(num_blocks))
        self._evictable: collections.OrderedDict[int, None] = collections.OrderedDict()  # oldest release first
        self._index: dict[int, list[_Content]] = {}
        self._generations: dict[Hashable, int] = {}
        # forget() calls so far, the count when each namespace was last forgotten, and the count when each block
        # was last allocated: a block allocated before its namespace was forgotten may hold keys and values of
        # the old weights, even if it is committed after.
        self._forgets = 0
        self._forgotten_at: dict[Hashable, int] = {}
        self._allocated_at = [0] * num_blocks
        self._used = 0
        self._cached = 0
        self._queries = self._query_tokens = self._hit_tokens = self._evictions = 0

    @property
    def free_count(self) -> int:
        """Blocks `allocate` can hand out now: never-used or released ones, and cached ones nobody holds."""
        return self.num_blocks - self._used

    @property
    def used_count(self) -> int:
        """Blocks held by at least one sequence."""
        return self._used

    def can_allocate(self, n: int) -> bool:
        return n <= self.free_count

    def match_prefix(self, tokens: Sequence[int], *, namespace: Hashable = None) -> list[int]:
        """The cached blocks holding exactly tokens[0:k*block_size], for the largest k with at least one token
        left over (the last prompt token must run to give the next token's logits); each gets a reference,
        which the caller gives back with `release` like any block it allocated."""
        self._queries += 1
        self._query_tokens += len(tokens)
        blocks = self._walk(tokens, namespace)
        for b in blocks:
            if self._refs[b] == 0:
                del self._evictable[b]
                self._used += 1
            self._refs[b] += 1
        self._hit_tokens += len(blocks) * self.block_size
        return blocks

    def peek_prefix(self, tokens: Sequence[int], *, namespace: Hashable = None) -> int:
        """How many blocks match_prefix would find now, without taking them or counting a query (to order
        waiting requests by their hits)."""
        return len(self._walk(tokens, namespace))

    def allocate(self, n: int) -> list[int]:
        """`n` blocks with one reference each: never-used or released blocks first, then the cached blocks
        released longest ago, whose content is forgotten."""
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise ValueError(f"allocate takes a whole number of blocks >= 0, got {n!r}")
        if n > self.free_count:
            raise NoFreeBlocks(
                f"{n} key/value cache block(s) of {self.block_size} tokens were needed, but only "
                f"{self.free_count} of the cache's {self.num_blocks} blocks are free ({self._used} are held by "
                f"running sequences). A larger cache holds more: raise memory_utilization (the fraction of the "
                f"device's memory the engine may use) or set num_blocks",
                needed=n, available=self.free_count, total=self.num_blocks)
        out = []
        for _ in range(n):
            if self._free:
                b = self._free.popleft()
            else:
                b, _ = self._evictable.popitem(last=False)
                self._detach(b)
                self._evictions += 1
            self._refs[b] = 1
            self._allocated_at[b] = self._forgets
            out.append(b)
        self._used += n
        return out

    def commit(self, block_id: int, tokens: Sequence[int], parent: int | None, *,
               namespace: Hashable = None) -> None:
        """Make held block `block_id`, just filled with `tokens`, findable by match_prefix after block `parent`
        (None: the sequence's first block). Commit a sequence's blocks in order, each once it is full.
        Committing a block again with the same content does nothing; a second block with content already
        cached is kept as a duplicate. With prefix caching off this only checks its arguments."""
        self._check_id(block_id)
        if self._refs[block_id] == 0:
            raise ValueError(f"block {block_id} is not held by any sequence; commit blocks while they are held")
        key = tuple(int(t) for t in tokens)
        if len(key) != self.block_size:
            raise ValueError(f"commit takes a full block of {self.block_size} tokens, got {len(key)}")
        parent_content = None
        if parent is not None:
            self._check_id(parent)
            parent_content = self._content[parent]
            if self.prefix_caching and (parent_content is None or self._refs[parent] == 0):
                raise ValueError(f"block {parent}, named as the parent of block {block_id}, is not a committed "
                                 f"block held by a sequence; commit a sequence's blocks in order while it holds them")
        if not self.prefix_caching:
            return
        if parent_content is not None:
            root = parent_content.root
        elif self._allocated_at[block_id] < self._forgotten_at.get(namespace, 0):
            root = (namespace, -1)  # filled (maybe in part) before a forget: never found, freed when released
        else:
            root = self._root(namespace)
        current = self._content[block_id]
        if current is not None:
            if current.parent is parent_content and current.tokens == key and current.root == root:
                return
            raise ValueError(f"block {block_id} is already committed with other content; a held block's tokens "
                             f"do not change, so this is a bookkeeping error in the caller")
        content = self._find(parent_content, root, key)
        if content is None:
            content = _Content(parent_content, root, key, self._key(parent_content, root, key))
            self._index.setdefault(content.key, []).append(content)
            if parent_content is not None:
                parent_content.children += 1
        content.blocks.append(block_id)
        self._content[block_id] = content
        self._cached += 1

    def release(self, blocks: Sequence[int]) -> None:
        """Drop one reference from each block. A block nobody holds any more stays cached (evictable) if it
        was committed, and is free otherwise. A sequence's blocks are released last first, so under pressure
        the tail of a sequence is evicted before the head other requests are likelier to share."""
        counts = collections.Counter(blocks)
        for b, n in counts.items():
            self._check_id(b)
            if n > self._refs[b]:
                raise ValueError(f"block {b} was released {n} time(s) but is held {self._refs[b]} time(s); "
                                 f"release each block once per allocate or match_prefix that returned it")
        for b in reversed(blocks):
            self._refs[b] -= 1
            if self._refs[b] == 0:
                self._used -= 1
                content = self._content[b]
                if content is not None and content.root[1] == self._generations.get(content.root[0], 0):
                    self._evictable[b] = None
                else:
                    if content is not None:
                        self._detach(b)
                    self._free.append(b)

    def forget(self, namespace: Hashable = None) -> None:
        """Forget every prefix cached under `namespace` (its adapter was replaced or removed): cached blocks
        become free now, and held ones when released. Blocks already allocated then are never cached under
        `namespace` later either, since part of them may have been computed before."""
        self._generations[namespace] = self._generations.get(namespace, 0) + 1
        self._forgets += 1
        self._forgotten_at[namespace] = self._forgets
        for b in list(self._evictable):
            content = self._content[b]
            if content is not None and content.root[0] == namespace:
                del self._evictable[b]
                self._detach(b)
                self._free.append(b)

    def stats(self) -> PrefixStats:
        return PrefixStats(queries=self._queries, query_tokens=self._query_tokens, hit_tokens=self._hit_tokens,
                           evictions=self._evictions, cached_blocks=self._cached)

    # -- the content index --

    def _root(self, namespace: Hashable) -> tuple[Hashable, int]:
        return (namespace, self._generations.get(namespace, 0))

    def _key(self, parent: _Content | None, root: tuple[Hashable, int], tokens: tuple[int, ...]) -> int:
        return self._hash(hash(root) if parent is None else parent.key, tokens)

    def _find(self, parent: _Content | None, root: tuple[Hashable, int], tokens: tuple[int, ...]) -> _Content | None:
        # The hash only narrows the search: parent, root and tokens must all be equal.
        for content in self._index.get(self._key(parent, root, tokens), ()):
            if content.parent is parent and content.root == root and content.tokens == tokens:
                return content
        return None

    def _walk(self, tokens: Sequence[int], namespace: Hashable) -> list[int]:
        if not self.prefix_caching:
            return []
        root, size = self._root(namespace), self.block_size
        blocks: list[int] = []
        parent = None
        for i in range((len(tokens) - 1) // size):
            content = self._find(parent, root, tuple(int(t) for t in tokens[i * size:(i + 1) * size]))
            if content is None or not content.blocks:
                break
            # Of duplicates, share one already held rather than pull another out of the evictable set.
            blocks.append(next((b for b in content.blocks if self._refs[b]), content.blocks[0]))
            parent = content
        return blocks

    def _detach(self, block_id: int) -> None:
        """Drop a block's content; drop the content too once no block holds it and no kept child names it."""
        content = self._content[block_id]
        assert content is not None
        content.blocks.remove(block_id)
        self._content[block_id] = None
        self._cached -= 1
        while content is not None and not content.blocks and content.children == 0:
            siblings = self._index[content.key]
            siblings.remove(content)
            if not siblings:
                del self._index[content.key]
            content = content.parent
            if content is not None:
                content.children -= 1

    def _check_id(self, block_id: int) -> None:
        if isinstance(block_id, bool) or not isinstance(block_id, int) or not 0 <= block_id < self.num_blocks:
            raise ValueError(f"block id {block_id!r} is not one of this pool's blocks 0..{self.num_blocks - 1}")
