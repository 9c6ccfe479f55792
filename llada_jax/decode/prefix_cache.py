"""A prefix cache across requests: the K/V of whole prompt blocks, in a radix tree over blocks.

Under the block-causal mask a block's K/V depend only on the tokens of that block and of the
blocks before it (at fixed positions 0, B, 2B, ...), so two prompts that share their first h
whole blocks share those blocks' K/V exactly. The engine (`llada_jax.decode.engine`) looks a
prompt up here before its prefill, copies the K/V of the matched blocks into the slot's cache
rows and prefills only the blocks after them; once the prefill is done it inserts the prompt's
new blocks. Only blocks entirely inside the prompt are ever stored: the prompt's last partial
block shares its block with generated tokens, which the decoding loop rewrites.

The tree: the root is the empty prefix, each node one block of B token ids (its edge label) and
the K/V of that block for every layer, `{"dense"|"moe": {"k", "v": [layers, B, K, H]}}` host
(NumPy) arrays, so the cache costs no accelerator memory and a hit is one host-to-device copy.
A node's K/V are valid only below its parent's, so eviction removes leaves: least recently used
first (a lookup touches its whole path, deepest node first, so a parent is never older than its
children and the least recently used node is always a leaf). `budget_bytes` bounds the K/V bytes
held; a block that cannot fit after evicting everything else not on its own path is not stored.
"""

from __future__ import annotations

import collections
from typing import Any, Sequence

import numpy as np


class _Node:
    __slots__ = ("key", "parent", "children", "kv", "nbytes")

    def __init__(self, key, parent, kv, nbytes):
        self.key, self.parent, self.kv, self.nbytes = key, parent, kv, nbytes
        self.children: dict[tuple[int, ...], _Node] = {}


def block_bytes(kv) -> int:
    """Bytes of one block's K/V pytree."""
    return int(sum(np.asarray(x).nbytes for g in kv.values() for x in g.values()))


class PrefixCache:
    """Whole-block prompt prefixes -> their K/V, LRU-evicted under `budget_bytes`.

    `match(prompt)` gives the matched blocks' K/V (touching them), `insert(prompt, first, kv_of)`
    stores blocks `first ..` of a prompt whose blocks `< first` are already cached. Counters:
    `hits` / `misses` (lookups that matched at least one block / none), `hit_blocks`, `evictions`.
    """

    def __init__(self, block_length: int, budget_bytes: int):
        from llada_jax.decode.options import fail

        if isinstance(block_length, bool) or not isinstance(block_length, int) or block_length < 1:
            fail("block_length", "an integer >= 1", block_length)
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)) or budget_bytes < 0:
            fail("prefix_cache_bytes", "an integer >= 0 (0: no prefix cache)", budget_bytes)
        self.block_length, self.budget_bytes = block_length, int(budget_bytes)
        self._root = _Node((), None, None, 0)
        self._lru: collections.OrderedDict[int, _Node] = collections.OrderedDict()  # oldest first
        self.nbytes = 0
        self.hits = self.misses = self.hit_blocks = self.evictions = 0

    def __len__(self) -> int:
        return len(self._lru)

    def _blocks(self, prompt: Sequence[int]) -> list[tuple[int, ...]]:
        b = self.block_length
        return [tuple(int(t) for t in prompt[i * b:(i + 1) * b]) for i in range(len(prompt) // b)]

    def _touch(self, path: list[_Node]):
        for node in reversed(path):  # deepest first: a parent ends up more recent than its children
            self._lru.move_to_end(id(node))

    def _walk(self, blocks) -> list[_Node]:
        path, node = [], self._root
        for key in blocks:
            node = node.children.get(key)
            if node is None:
                break
            path.append(node)
        return path

    def match(self, prompt: Sequence[int]) -> list[Any]:
        """K/V of the longest cached run of the prompt's leading whole blocks, one pytree per
        block (empty on a miss); the matched blocks become the most recently used."""
        path = self._walk(self._blocks(prompt))
        self._touch(path)
        self.hits += bool(path)
        self.misses += not path
        self.hit_blocks += len(path)
        return [n.kv for n in path]

    def cached_blocks(self, prompt: Sequence[int]) -> int:
        """How many leading whole blocks of `prompt` are cached (no touch, no counting)."""
        return len(self._walk(self._blocks(prompt)))

    def insert(self, prompt: Sequence[int], first: int, kv_of) -> int:
        """Stores the prompt's whole blocks `first ..` (`kv_of(j)` -> block j's K/V pytree of host
        arrays), under its blocks `< first`, which must be cached. Returns how many were stored:
        fewer when the budget cannot hold them beside the path they hang from."""
        blocks = self._blocks(prompt)
        path = self._walk(blocks)
        if len(path) < first:
            raise ValueError(f"insert: blocks 0..{first - 1} of the prompt must be cached, found "
                             f"{len(path)} (evicted since the lookup?)")
        stored = 0
        for j in range(len(path), len(blocks)):
            parent = path[-1] if path else self._root
            kv = kv_of(j)
            size = block_bytes(kv)
            if not self._make_room(size, keep=path):
                break
            node = _Node(blocks[j], parent, kv, size)
            parent.children[blocks[j]] = node
            self._lru[id(node)] = node
            self.nbytes += size
            path.append(node)
            stored += 1
        self._touch(path)
        return stored

    def _make_room(self, size: int, keep: list[_Node]) -> bool:
        """Evicts least recently used leaves not in `keep` until `size` more bytes fit."""
        if size > self.budget_bytes:
            return False
        kept = {id(n) for n in keep}
        while self.nbytes + size > self.budget_bytes:
            victim = next((n for k, n in self._lru.items() if k not in kept and not n.children), None)
            if victim is None:
                return False
            self._evict(victim)
        return True

    def _evict(self, node: _Node):
        del node.parent.children[node.key]
        del self._lru[id(node)]
        self.nbytes -= node.nbytes
        self.evictions += 1

    def clear(self):
        """Drops every entry (e.g. the weights changed: cached K/V belong to the old ones)."""
        self._root = _Node((), None, None, 0)
        self._lru.clear()
        self.nbytes = 0

    def keys(self) -> list[tuple[tuple[int, ...], ...]]:
        """Every cached prefix as its tuple of blocks, least recently used first (for tests)."""
        out = []
        for node in self._lru.values():
            chain = []
            while node is not self._root:
                chain.append(node.key)
                node = node.parent
            out.append(tuple(reversed(chain)))
        return out
