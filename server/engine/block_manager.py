"""KV block allocation and prefix caching: pure Python, no torch.

The KV cache is a pool of fixed-size blocks (``block_size`` tokens each). A
request owns a *block table*: the list of block ids that hold its tokens in
order, token ``i`` at ``table[i // block_size]``, offset ``i % block_size``.
Blocks are taken as the request grows and given back when it finishes, is
aborted or is preempted.

Prefix caching
--------------
Every FULL block whose tokens are all computed gets a content key: the key of
the block before it plus the block's token ids. Two requests whose first ``n``
full blocks hold the same tokens (a shared system prompt, a multi-turn chat)
therefore share those blocks: a new request looks its prompt up block by
block, takes every hit (its reference count goes up) and computes only the
rest. A block whose last user is gone keeps its contents and its key and goes
to the back of an LRU list; it is reused for new tokens only when no
never-used block is left, least recently freed first, and then loses its key.

Keys are Python hashes of ``(parent key, token tuple)``; a lookup also compares
the block's stored token tuple, so a hash collision on the last block cannot
hand back wrong KV (one in the parent chain would need a 64-bit collision).

Block 0 is reserved as a scratch block: CUDA-graph decode steps write the K/V
of idle rows there, and it is never read.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

SCRATCH_BLOCK = 0


@dataclass(slots=True)
class _Block:
    block_id: int
    ref_count: int = 0
    key: int | None = None  # content key once full and computed (prefix cache)
    tokens: tuple[int, ...] = ()  # the tokens behind ``key``


@dataclass(slots=True)
class PrefixStats:
    queried_tokens: int = 0  # prompt tokens looked up
    hit_tokens: int = 0  # of those, found in the cache

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.queried_tokens if self.queried_tokens else 0.0


class BlockManager:
    """Free list, reference counts, the prefix-cache index and its LRU. Not thread-safe."""

    def __init__(self, num_blocks: int, block_size: int, *, prefix_caching: bool = True) -> None:
        if num_blocks < 2:
            raise ValueError(f"num_blocks: must be >= 2 (one is scratch), got {num_blocks}")
        if block_size < 1:
            raise ValueError(f"block_size: must be >= 1, got {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.prefix_caching = prefix_caching
        self._blocks = [_Block(i) for i in range(num_blocks)]
        # Never-used (or key-less) blocks; popped from the end, so low ids go first.
        self._free: list[int] = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))
        # Blocks with a key and no user, least recently freed first.
        self._evictable: OrderedDict[int, None] = OrderedDict()
        self._by_key: dict[int, int] = {}  # content key -> block id
        self.stats = PrefixStats()

    # -- capacity ----------------------------------------------------------------------------

    @property
    def num_usable(self) -> int:
        """Blocks that can hold tokens (all but the scratch block)."""
        return self.num_blocks - 1

    @property
    def num_free(self) -> int:
        """Blocks that can be handed out now (never-used plus evictable cached ones)."""
        return len(self._free) + len(self._evictable)

    def usage(self) -> float:
        """Blocks held by requests / usable blocks, 0..1."""
        return 1.0 - self.num_free / self.num_usable

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # -- allocation ----------------------------------------------------------------------------

    def allocate(self, table: list[int], num_tokens: int) -> bool:
        """Grow ``table`` in place to cover ``num_tokens`` tokens; False (unchanged) if short."""
        need = self.blocks_needed(num_tokens) - len(table)
        if need <= 0:
            return True
        if need > self.num_free:
            return False
        for _ in range(need):
            table.append(self._take())
        return True

    def _take(self) -> int:
        if self._free:
            block = self._blocks[self._free.pop()]
        else:
            block_id, _ = self._evictable.popitem(last=False)
            block = self._blocks[block_id]
            self._drop_key(block)
        block.ref_count = 1
        return block.block_id

    def free(self, table: list[int]) -> None:
        """Release a request's blocks (the table is emptied)."""
        # Last blocks first: a chain's tail is evicted before its head, which
        # more requests share.
        for block_id in reversed(table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            if block.ref_count > 0:
                continue
            if block.key is not None:
                self._evictable[block_id] = None
            else:
                self._free.append(block_id)
        table.clear()

    # -- prefix cache ----------------------------------------------------------------------------

    def match_prefix(self, token_ids: list[int], table: list[int]) -> int:
        """Take the cached full blocks that start ``token_ids``; returns the tokens they cover.

        ``table`` must be empty; the hits are appended to it. At least one token
        is always left to compute, since the step that computes it is the one
        that samples the next token.
        """
        assert not table
        if not self.prefix_caching:
            return 0
        self.stats.queried_tokens += len(token_ids)
        bs = self.block_size
        key: int | None = None
        for start in range(0, len(token_ids) - 1 - bs + 1, bs):
            tokens = tuple(token_ids[start : start + bs])
            key = hash((key, tokens))
            block_id = self._by_key.get(key)
            if block_id is None or self._blocks[block_id].tokens != tokens:
                break
            block = self._blocks[block_id]
            if block.ref_count == 0:
                del self._evictable[block_id]
            block.ref_count += 1
            table.append(block_id)
        hit = len(table) * bs
        self.stats.hit_tokens += hit
        return hit

    def cache_full_blocks(
        self, token_ids: list[int], table: list[int], num_cached: int, num_computed: int
    ) -> int:
        """Give keys to the blocks completed since ``num_cached`` tokens; returns the new count.

        ``token_ids`` are the request's tokens (prompt then output), of which
        the first ``num_computed`` have K/V in ``table``.
        """
        if not self.prefix_caching:
            return num_computed
        bs = self.block_size
        first = num_cached // bs
        last = num_computed // bs  # blocks [first, last) are full and computed
        if last <= first:
            return num_cached
        key = self._blocks[table[first - 1]].key if first else None
        for i in range(first, last):
            block = self._blocks[table[i]]
            tokens = tuple(token_ids[i * bs : (i + 1) * bs])
            key = hash((key, tokens))
            if block.key is None:
                block.key = key
                block.tokens = tokens
                # Another request may have computed the same block first: its copy
                # stays in the index and this one is found by nobody.
                self._by_key.setdefault(key, block.block_id)
            elif block.key != key:  # cannot happen: a shared block holds what its key says
                raise AssertionError("prefix cache key mismatch")
        return last * bs

    def _drop_key(self, block: _Block) -> None:
        if block.key is not None:
            if self._by_key.get(block.key) == block.block_id:
                del self._by_key[block.key]
            block.key = None
            block.tokens = ()

    def reset_prefix_cache(self) -> None:
        """Forget every cached block that no request uses."""
        while self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            self._drop_key(self._blocks[block_id])
            self._free.append(block_id)
