"""Per-request KV blocks on top of the block pool, with prefix caching.

Full blocks are identified by a hash chain: hash(parent block's hash, this block's token ids), so
equal hashes mean equal whole prefixes. Only full blocks are cached.
"""

from __future__ import annotations

import hashlib
from array import array

from compiled_llm.kv_cache.block_pool import BlockPool, KVBlock
from compiled_llm.request import Request

_ROOT_HASH = b"compiled-llm-prefix-root"


def block_hash(parent: bytes, token_ids: list[int]) -> bytes:
    return hashlib.sha256(parent + array("q", token_ids).tobytes()).digest()


class KVCacheManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool) -> None:
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.pool = BlockPool(num_blocks, enable_prefix_caching)
        self._blocks: dict[str, list[KVBlock]] = {}
        self._hashes: dict[str, list[bytes]] = {}  # hashes of the request's full blocks so far
        self._num_cached: dict[str, int] = {}  # how many of its blocks are in the prefix index
        # Prefix-cache statistics, in tokens.
        self.prefix_queries = 0
        self.prefix_hits = 0

    # --- lookup ---------------------------------------------------------------------------------
    def _full_block_hashes(self, request: Request, num_tokens: int) -> list[bytes]:
        hashes = self._hashes.setdefault(request.request_id, [])
        bs = self.block_size
        while (len(hashes) + 1) * bs <= num_tokens:
            i = len(hashes)
            parent = hashes[-1] if hashes else _ROOT_HASH
            hashes.append(block_hash(parent, request.token_ids(i * bs, (i + 1) * bs)))
        return hashes

    def get_computed_blocks(self, request: Request) -> tuple[list[KVBlock], int]:
        """The longest cached prefix of a request not yet started, as (blocks, num_tokens).
        At least one token is always left to compute, since its logits are needed; none is
        read for a request that wants its prompt's logprobs."""
        if not self.enable_prefix_caching or request.needs_prompt_logprobs:
            return [], 0
        hashes = self._full_block_hashes(request, request.num_tokens - 1)
        hits: list[KVBlock] = []
        for h in hashes:
            block = self.pool.get_cached(h)
            if block is None:
                break
            hits.append(block)
        self.prefix_queries += request.num_tokens
        self.prefix_hits += len(hits) * self.block_size
        return hits, len(hits) * self.block_size

    # --- allocation -----------------------------------------------------------------------------
    def allocate_slots(
        self,
        request: Request,
        num_new_tokens: int,
        computed: list[KVBlock] | None = None,
        cache_prefix: bool = True,
    ) -> bool:
        """Make room for `num_new_tokens` more tokens after the computed ones (plus `computed`
        prefix hits for a request being admitted). False, with nothing changed, if blocks run
        out. `cache_prefix=False` enters no block in the prefix index: speculative decoding's
        draft model writes ahead of the target into slots the target computes later, and a
        block is hashed only when the step that fills it is scheduled."""
        computed = computed or []
        blocks = self._blocks.setdefault(request.request_id, [])
        total = request.num_computed_tokens + len(computed) * self.block_size + num_new_tokens
        needed = -(-total // self.block_size) - len(blocks) - len(computed)
        reclaimed = sum(1 for b in computed if b.ref_cnt == 0)  # idle hits leave the free list
        if needed + reclaimed > self.pool.num_free_blocks:
            return False
        self.pool.touch(computed)
        blocks.extend(computed)
        if needed > 0:
            blocks.extend(self.pool.allocate(needed))
        if self.enable_prefix_caching and cache_prefix:
            known = min(total, request.num_tokens)
            hashes = self._full_block_hashes(request, known)
            start = self._num_cached.get(request.request_id, len(computed))
            for i in range(start, known // self.block_size):
                self.pool.cache(blocks[i], hashes[i])
            self._num_cached[request.request_id] = max(start, known // self.block_size)
        return True

    def trim(self, request: Request) -> None:
        """Free the request's blocks past those its computed tokens fill (speculative decoding:
        slots allocated for drafts that were rejected). They hold no cached prefix: only blocks
        full of verified tokens are hashed."""
        blocks = self._blocks.get(request.request_id)
        if not blocks:
            return
        keep = -(-request.num_computed_tokens // self.block_size)
        assert self._num_cached.get(request.request_id, 0) <= keep
        extra = blocks[keep:]
        del blocks[keep:]
        self.pool.free(list(reversed(extra)))

    def free(self, request: Request) -> None:
        blocks = self._blocks.pop(request.request_id, [])
        self._num_cached.pop(request.request_id, None)
        self.pool.free(list(reversed(blocks)))

    def forget(self, request: Request) -> None:
        """Free the request's blocks and its cached hashes (it is finished for good)."""
        self.free(request)
        self._hashes.pop(request.request_id, None)

    def block_ids(self, request: Request) -> list[int]:
        return [b.block_id for b in self._blocks.get(request.request_id, [])]

    @property
    def num_free_blocks(self) -> int:
        return self.pool.num_free_blocks

    def usage(self) -> float:
        return self.pool.usage()

    def prefix_cache_hit_rate(self) -> float:
        return self.prefix_hits / self.prefix_queries if self.prefix_queries else 0.0
