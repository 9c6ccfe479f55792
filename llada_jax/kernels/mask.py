"""Attention masks as descriptions, with a dense twin (REFERENCE §3).

A kernel that skips what a mask forbids must know the mask's *structure* at trace time, which a
dense `[B, T, T]` boolean hides. `AttentionMask` says which mask it is (a static `kind` and
`block_size`, hashable and free under `jit`) and carries the per-example parts as arrays:
`segment_ids` (packed documents: a query sees only keys of its own segment) and `key_valid`
(padding keys seen by no query). `dense(T)` is its twin, the `[B|1, T, T]` boolean the `xla`
oracle uses; `allowed(np, kind, block_size, T, q, k)` is the one structural rule that the twin,
the blocked kernel's tiles and the splash kernel's static mask are all built from.

Kinds (T = query = key length):
  bidirectional  every key
  block_causal   key block <= query block (inference mask)
  composite      the `[x_t ; x_0]` training mask over T = 2L (`masks.composite`); with
                 `window` K > 1 the Multi-Block Editing training mask (`masks.composite_mbe`):
                 a noisy block also sees the noisy copies of the next K - 1 blocks, and (with
                 `clean_sees_noisy`) a clean block sees the noisy copies of its next K - 1 blocks
  dense          an explicit `[B|1, T, T]` boolean (the public `forward(mask=...)` path and the
                 KV cache); only the `xla` implementation takes it.
"""

from __future__ import annotations

from typing import Optional

import flax.struct
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Bool, Int

KINDS = ("bidirectional", "block_causal", "composite", "dense")
STRUCTURED = ("bidirectional", "block_causal", "composite")


def allowed(xp, kind: str, block_size: int, length: int, q, k, window: int = 1, clean_sees_noisy: bool = False):
    """Structural rule: may query index `q` attend key index `k` (broadcasting index arrays)?

    `xp` is `numpy` (static tiles, splash masks) or `jax.numpy` (the dense twin); `length` is T.
    `window` / `clean_sees_noisy`: the composite mask's Multi-Block Editing links (window 1 = none).
    """
    if kind == "bidirectional":
        return xp.ones(xp.broadcast_shapes(xp.shape(q), xp.shape(k)), dtype=bool)
    if kind == "block_causal":
        return k // block_size <= q // block_size
    if kind == "composite":
        half = length // 2
        q_clean, k_clean = q >= half, k >= half
        q_blk, k_blk = (q % half) // block_size, (k % half) // block_size
        ahead = (k_blk >= q_blk) & (k_blk < q_blk + window)  # the query's block and the next window - 1
        noisy_noisy = ~q_clean & ~k_clean & ahead
        noisy_clean = ~q_clean & k_clean & (q_blk > k_blk)
        clean_clean = q_clean & k_clean & (q_blk >= k_blk)
        out = noisy_noisy | noisy_clean | clean_clean
        if clean_sees_noisy and window > 1:
            out = out | (q_clean & ~k_clean & ahead & (k_blk > q_blk))
        return out
    raise ValueError(f"AttentionMask.kind: expected one of {STRUCTURED}, found {kind!r}")


@flax.struct.dataclass
class AttentionMask:
    """Which keys each query may attend: a static structure plus optional per-example arrays.

    Build with the class methods; `dense(T)` gives the boolean twin. Rows with no allowed key
    (only possible through `key_valid` / `segment_ids`, e.g. a padding query in a segment of
    its own with every key padded) have no defined output: implementations differ there.
    """

    kind: str = flax.struct.field(pytree_node=False)
    block_size: int = flax.struct.field(pytree_node=False, default=0)
    segment_ids: Optional[Int[Array, "B T"]] = None  # same id = same document
    key_valid: Optional[Bool[Array, "B T"]] = None  # False = a padding key nobody attends
    explicit: Optional[Bool[Array, "B T T"]] = None  # kind == "dense" only
    # composite only: Multi-Block Editing links (window 1 = the plain composite mask)
    window: int = flax.struct.field(pytree_node=False, default=1)
    clean_sees_noisy: bool = flax.struct.field(pytree_node=False, default=False)

    # ---------------------------------------------------------------- constructors
    @classmethod
    def bidirectional(cls, segment_ids=None, key_valid=None) -> "AttentionMask":
        return cls("bidirectional", 0, segment_ids, key_valid)

    @classmethod
    def block_causal(cls, block_size: int, segment_ids=None, key_valid=None) -> "AttentionMask":
        _check_block(block_size)
        return cls("block_causal", block_size, segment_ids, key_valid)

    @classmethod
    def composite(cls, block_size: int, segment_ids=None, key_valid=None, window: int = 1,
                  clean_sees_noisy: bool = False) -> "AttentionMask":
        """The training mask over `[x_t ; x_0]`; ids are over the full 2L (`concat([d, d], -1)`).

        `window` K > 1 adds the Multi-Block Editing links of `masks.composite_mbe`: a noisy block
        sees the noisy copies of blocks b .. b + K - 1, and with `clean_sees_noisy` a clean block
        those of b + 1 .. b + K - 1."""
        _check_block(block_size)
        if not isinstance(window, (int, np.integer)) or isinstance(window, bool) or window < 1:
            raise ValueError(f"AttentionMask.window: expected a positive integer, found {window!r}")
        return cls("composite", block_size, segment_ids, key_valid, None, int(window), bool(clean_sees_noisy))

    @property
    def links(self) -> dict:
        """The static Multi-Block Editing arguments of `allowed` (`window`, `clean_sees_noisy`)."""
        return dict(window=self.window, clean_sees_noisy=self.clean_sees_noisy)

    @classmethod
    def from_dense(cls, mask: Bool[Array, "B T S"]) -> "AttentionMask":
        return cls("dense", 0, None, None, mask)

    # ---------------------------------------------------------------- views
    @property
    def structured(self) -> bool:
        return self.kind in STRUCTURED

    def check(self, batch: int, q_len: int, k_len: int) -> None:
        """Raises ValueError naming the field when the mask cannot describe these shapes."""
        if self.kind not in KINDS:
            raise ValueError(f"AttentionMask.kind: expected one of {KINDS}, found {self.kind!r}")
        if self.kind == "dense":
            m = self.explicit
            if m is None or m.ndim != 3 or m.shape[1:] != (q_len, k_len) or m.shape[0] not in (1, batch):
                found = None if m is None else m.shape
                raise ValueError(f"AttentionMask.explicit: expected shape [1 or {batch}, {q_len}, {k_len}], "
                                 f"found {found}")
            return
        if q_len != k_len and (self.kind != "bidirectional" or self.segment_ids is not None
                               or self.key_valid is not None):
            raise ValueError(f"AttentionMask({self.kind}): expected equal query and key lengths, "
                             f"found {q_len} and {k_len}")
        if self.kind == "composite" and q_len % 2:
            raise ValueError(f"AttentionMask(composite): expected an even length 2L, found {q_len}")
        for name in ("segment_ids", "key_valid"):
            a = getattr(self, name)
            if a is not None and (a.ndim != 2 or a.shape[1] != q_len or a.shape[0] not in (1, batch)):
                raise ValueError(f"AttentionMask.{name}: expected shape [1 or {batch}, {q_len}], found {a.shape}")

    def structure(self, length: int) -> np.ndarray:
        """The static `[T, T]` part (numpy), without segment ids or padding."""
        i = np.arange(length)
        return np.asarray(allowed(np, self.kind, self.block_size, length, i[:, None], i[None, :], **self.links))

    def dynamic(self, q_idx=None, k_idx=None) -> Optional[Bool[Array, "B Tq Tk"]]:
        """The per-example part (segments, padding) restricted to query / key index arrays."""
        out = None
        if self.segment_ids is not None:
            sq = self.segment_ids if q_idx is None else self.segment_ids[:, q_idx]
            sk = self.segment_ids if k_idx is None else self.segment_ids[:, k_idx]
            out = sq[:, :, None] == sk[:, None, :]
        if self.key_valid is not None:
            kv = (self.key_valid if k_idx is None else self.key_valid[:, k_idx])[:, None, :]
            out = kv if out is None else out & kv
        return out

    def dense(self, length: int) -> Bool[Array, "B T T"]:
        """The dense twin: `[B or 1, T, T]`, True where query i may attend key j."""
        if self.kind == "dense":
            return self.explicit
        i = jnp.arange(length)
        m = allowed(jnp, self.kind, self.block_size, length, i[:, None], i[None, :], **self.links)[None]
        d = self.dynamic()
        return m if d is None else m & d


def _check_block(block_size) -> None:
    if not isinstance(block_size, (int, np.integer)) or isinstance(block_size, bool) or block_size < 1:
        raise ValueError(f"AttentionMask.block_size: expected a positive integer, found {block_size!r}")
