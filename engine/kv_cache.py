"""KV block pool: fixed-size blocks, LRU free list, ref counts and a verified prefix cache."""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field

from engine.request import Request


@dataclass(slots=True)
class Block:
    block_id: int
    ref_count: int = 0
    block_hash: int | None = None
    token_ids: tuple[int, ...] | None = None  # kept to verify a hash hit (hash collisions are possible)


def chain_hash(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Hash of a full block that also covers every block before it."""
    return hash((parent_hash, token_ids))


@dataclass(slots=True)
class PrefixMatch:
    """Blocks found in the prefix cache for a request, with their chained hashes."""

    block_ids: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)


class BlockPool:
    """Owns block ids. A free block keeps its cached contents until it is reused (LRU order)."""

    def __init__(self, num_blocks: int, enable_prefix_caching: bool = True) -> None:
        self.num_blocks = num_blocks
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Front of the dict is evicted first.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - len(self._free)

    def allocate(self, count: int) -> list[int]:
        if count > len(self._free):
            raise RuntimeError(f"allocate({count}) with only {len(self._free)} free blocks")
        ids = []
        for _ in range(count):
            block_id, _ = self._free.popitem(last=False)
            block = self.blocks[block_id]
            if block.block_hash is not None:
                if self._cached.get(block.block_hash) == block_id:
                    del self._cached[block.block_hash]
                block.block_hash = None
                block.token_ids = None
            block.ref_count = 1
            ids.append(block_id)
        return ids

    def touch(self, block_ids: list[int]) -> None:
        """Take a reference on blocks found in the prefix cache."""
        for block_id in block_ids:
            block = self.blocks[block_id]
            if block.ref_count == 0:
                del self._free[block_id]
            block.ref_count += 1

    def release(self, block_ids: list[int]) -> None:
        # Tail blocks first, so a sequence's shared prefix outlives its private tail in the LRU.
        for block_id in reversed(block_ids):
            block = self.blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released twice"
            if block.ref_count == 0:
                self._free[block_id] = None
                if block.block_hash is None:
                    self._free.move_to_end(block_id, last=False)  # nothing worth keeping: reuse first

    def lookup(self, block_hash: int, token_ids: tuple[int, ...]) -> int | None:
        block_id = self._cached.get(block_hash)
        if block_id is None or self.blocks[block_id].token_ids != token_ids:
            return None
        return block_id

    def register(self, block_id: int, block_hash: int, token_ids: tuple[int, ...]) -> None:
        block = self.blocks[block_id]
        if block.block_hash is not None:
            return
        block.block_hash = block_hash
        block.token_ids = token_ids
        self._cached.setdefault(block_hash, block_id)

    def reset_prefix_cache(self) -> None:
        for block in self.blocks:
            block.block_hash = None
            block.token_ids = None
        self._cached.clear()


class KVCacheManager:
    """Maps requests to blocks: prefix matching, slot allocation, caching of full blocks."""

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True) -> None:
        self.block_size = block_size
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self.enable_prefix_caching = enable_prefix_caching
        self.prefix_queries = 0  # tokens looked up in the prefix cache
        self.prefix_hits = 0  # tokens found there

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free

    @property
    def usage(self) -> float:
        return self.pool.num_used / self.pool.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def match_prefix(self, request: Request) -> PrefixMatch:
        """Cached blocks holding a prefix of the request's tokens (never all of them: one must run)."""
        match = PrefixMatch()
        if not self.enable_prefix_caching:
            return match
        tokens = request.all_token_ids
        max_blocks = (len(tokens) - 1) // self.block_size
        parent: int | None = None
        bs = self.block_size
        for i in range(max_blocks):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            parent = chain_hash(parent, chunk)
            block_id = self.pool.lookup(parent, chunk)
            if block_id is None:
                break
            match.block_ids.append(block_id)
            match.block_hashes.append(parent)
        self.prefix_queries += len(tokens)
        self.prefix_hits += len(match.block_ids) * bs
        return match

    def allocate(
        self, request: Request, num_new_tokens: int, prefix: PrefixMatch | None = None, reserve: int = 0
    ) -> bool:
        """Make room for `num_new_tokens` more computed tokens; False (and no change) if it does not fit.

        `prefix` holds the prefix-cache hits of a request being admitted; `reserve` keeps that many
        blocks free afterwards (a watermark that avoids admitting work only to preempt it).
        """
        cached_blocks = prefix.block_ids if prefix else []
        start = request.num_computed_tokens + len(cached_blocks) * self.block_size
        needed = self.blocks_needed(start + num_new_tokens) - len(request.block_ids) - len(cached_blocks)
        revived = sum(1 for b in cached_blocks if self.pool.blocks[b].ref_count == 0)
        if needed + revived + reserve > self.pool.num_free:
            return False
        if prefix and cached_blocks:
            self.pool.touch(cached_blocks)
            request.block_ids.extend(cached_blocks)
            request.block_hashes.extend(prefix.block_hashes)
            request.num_computed_tokens += len(cached_blocks) * self.block_size
        if needed > 0:
            request.block_ids.extend(self.pool.allocate(needed))
        return True

    def trim(self, request: Request) -> None:
        """Give back blocks past the request's computed tokens (those of rejected draft tokens).
        They were never full of verified tokens, so none of them is in the prefix cache."""
        keep = self.blocks_needed(request.num_computed_tokens)
        if len(request.block_ids) > keep:
            assert len(request.block_hashes) <= keep
            self.pool.release(request.block_ids[keep:])
            del request.block_ids[keep:]

    def free(self, request: Request) -> None:
        self.pool.release(request.block_ids)
        request.block_ids = []
        request.block_hashes = []

    def cache_full_blocks(self, request: Request) -> None:
        """Publish the request's newly completed blocks in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        bs = self.block_size
        num_full = request.num_computed_tokens // bs
        hashes = request.block_hashes
        if len(hashes) >= num_full:
            return
        tokens = request.all_token_ids
        parent = hashes[-1] if hashes else None
        for i in range(len(hashes), num_full):
            chunk = tuple(tokens[i * bs : (i + 1) * bs])
            parent = chain_hash(parent, chunk)
            hashes.append(parent)
            self.pool.register(request.block_ids[i], parent, chunk)
