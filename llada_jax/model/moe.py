"""Expert-parallel routed experts inside `jax.shard_map` (SCALE.md §4; MaxText's `layers/moe.py`).

The GSPMD `ragged` back end sorts the GLOBAL token set: its routing ids and dispatched rows are
all-gathered / all-reduced across the mesh, so dispatch memory and traffic follow the global
batch. Here every device works on its own tokens only:

  1. route and sort the local tokens by expert (`model.route`, the same router as the oracles);
  2. exchange the sorted rows over the `expert` mesh axis, each row to the shard owning its
     expert (`PaddedExchange`: one `all_to_all` of fixed-size per-destination slots, runs on
     XLA:CPU; `RaggedExchange`: `jax.lax.ragged_all_to_all`, for accelerators);
  3. one grouped matmul per projection over the local experts (`jax.lax.ragged_dot`), with the
     expert width split over the `tensor` axis (a `psum` after the down projection);
  4. send the results back the same way, unsort and combine with the router weights.

Three parts, as MaxText organises it: pure offset arithmetic from per-shard group sizes
(`send_plan`, `ragged_plan`, `padded_slots`, tested against tables worked out by hand); a body
(`local_experts`) that takes the exchange as an argument; and specs built from logical names by
`llada_jax.parallel.sharding` (`expert_parallel` reads the mesh axes of `exp`, `expert_mlp`, `act_batch`).

Buffer sizes. A static program needs a static receive buffer. With `moe_capacity_factor == 0`
(the default) it is the worst case, so nothing can drop whatever the routing: a token sends at
most `min(k, E_local)` rows to one shard, so a destination slot holds `T_local * min(k, E_local)`
rows and the exchange buffer is `P` of those (it grows with the expert-parallel degree P, up to
E/k times the balanced size). With `moe_capacity_factor = c > 0` a slot holds
`ceil(c * T_local * k / P)` rows, so per-device buffers stay flat as P grows at a fixed
per-device batch; rows beyond a slot's capacity are dropped (they contribute zero, like
capacity-based MoE systems) and COUNTED: the layer sows `moe_dropped` (see `model.MoE`), never a
silent change of results.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable, Optional, Protocol

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec
from jaxtyping import Array, Float, Int

from llada_jax.model.config import ModelConfig
from llada_jax.parallel.sharding import DEFAULT_RULES, logical_to_spec


# ---------------------------------------------------------------------------------------- offsets
def exclusive_cumsum(x: Int[Array, "... N"]) -> Int[Array, "... N"]:
    return jnp.cumsum(x, axis=-1) - x


def send_plan(group_sizes: Int[Array, " E"], num_shards: int) -> tuple[Int[Array, " P"], Int[Array, " P"]]:
    """(rows to each shard, where they start in the expert-sorted local rows), from the local
    per-expert counts. Shard j owns experts [j * E/P, (j+1) * E/P)."""
    sizes = group_sizes.reshape(num_shards, -1).sum(-1)
    return sizes, exclusive_cumsum(sizes)


def padded_slots(sorted_expert: Int[Array, " M"], group_sizes: Int[Array, " E"], num_shards: int,
                 capacity: int) -> tuple[Int[Array, " M"], Array]:
    """Slot of each expert-sorted row in the [P * capacity] send buffer, and whether it fits.

    Row i goes to shard j = its expert // E_local, at position i - (start of shard j's rows)."""
    e_local = group_sizes.shape[0] // num_shards
    _, starts = send_plan(group_sizes, num_shards)
    dst = sorted_expert // e_local
    pos = jnp.arange(sorted_expert.shape[0], dtype=jnp.int32) - starts[dst]
    fits = pos < capacity
    return jnp.where(fits, dst * capacity + pos, num_shards * capacity), fits


def ragged_plan(all_sizes: Int[Array, "P E"], shard, capacity: int):
    """`ragged_all_to_all` arguments of `shard` for the dispatch, from every shard's per-expert
    counts ([P, E], row s = shard s's local counts), with a receive buffer of `capacity` rows.

    Returns (input_offsets, send_sizes, output_offsets, recv_sizes), each [P]:
      input_offsets[j]  where my rows for shard j start in my sorted rows
      send_sizes[j]     how many I send to j (after truncation to j's buffer)
      output_offsets[j] where they land in j's receive buffer (after all earlier senders' rows)
      recv_sizes[s]     how many I receive from s
    Receivers keep senders' rows in sender order; rows past `capacity` are cut from the last
    senders' tails (MaxText's `_truncate_matrix`), and both sides agree on the cut.
    """
    num_shards = all_sizes.shape[0]
    traffic = all_sizes.reshape(num_shards, num_shards, -1).sum(-1)  # [src, dst]
    clamped = jnp.minimum(jnp.cumsum(traffic, axis=0), capacity)  # over senders
    kept = jnp.diff(clamped, axis=0, prepend=jnp.zeros_like(clamped[:1]))  # [src, dst] after truncation
    input_offsets = exclusive_cumsum(traffic[shard])
    output_offsets = (clamped - kept)[shard]
    return input_offsets, kept[shard], output_offsets, kept[:, shard]


def received_experts(recv_group_sizes: Int[Array, "P El"], recv_sizes: Int[Array, " P"], rows: int,
                     chunk_starts: Optional[Int[Array, " P"]] = None, chunk: Optional[int] = None) -> Int[Array, " R"]:
    """Local expert id of each row of a receive buffer (El for an empty or dropped row).

    Sender s's rows sit at `chunk_starts[s]` (ragged) or `s * chunk` (padded), sorted by expert
    with `recv_group_sizes[s]` rows per local expert, of which the first `recv_sizes[s]` arrived."""
    num_shards, e_local = recv_group_sizes.shape
    r = jnp.arange(rows, dtype=jnp.int32)
    if chunk is not None:
        src, pos = r // chunk, r % chunk
    else:
        src = jnp.clip(jnp.searchsorted(chunk_starts, r, side="right") - 1, 0, num_shards - 1)
        pos = r - chunk_starts[src]
    ends = jnp.cumsum(recv_group_sizes, axis=-1)[src]  # [R, El]
    expert = jnp.sum(pos[:, None] >= ends, axis=-1)
    valid = (pos >= 0) & (pos < recv_sizes[src])
    return jnp.where(valid, expert, e_local).astype(jnp.int32)


# ---------------------------------------------------------------------------------------- exchanges
class Exchange(Protocol):
    """Moves expert-sorted rows to the shards owning their experts and results back."""

    def dispatch(self, rows, sorted_expert, group_sizes) -> tuple[Array, Array, Any]:
        """-> (received rows [R, D], their local expert ids [R] (E_local = none), state for combine)."""

    def combine(self, out_rows, state) -> Array:
        """Results [R, D] back to their senders -> [M, D] in the sorted local order (zeros if dropped)."""


@dataclasses.dataclass(frozen=True)
class PaddedExchange:
    """One `all_to_all` of fixed [P, capacity, D] slots each way (works on XLA:CPU).

    A shard's rows for destination j fill slot j from its start; the local expert ids travel in
    the same layout (int32 [P, capacity]), so the receiver needs no offsets."""

    axis: tuple[str, ...]
    num_shards: int
    capacity: int  # rows per destination slot

    def dispatch(self, rows, sorted_expert, group_sizes):
        p, cap = self.num_shards, self.capacity
        e_local = group_sizes.shape[0] // p
        slot, fits = padded_slots(sorted_expert, group_sizes, p, cap)
        buf = jnp.zeros((p * cap, rows.shape[1]), rows.dtype).at[slot].set(rows, mode="drop")
        ids = jnp.full((p * cap,), e_local, jnp.int32).at[slot].set(sorted_expert % e_local, mode="drop")
        recv = self._a2a(buf.reshape(p, cap, -1)).reshape(p * cap, -1)
        recv_ids = self._a2a(ids.reshape(p, cap)).reshape(p * cap)
        return recv, recv_ids, (slot, fits)

    def combine(self, out_rows, state):
        slot, fits = state
        back = self._a2a(out_rows.reshape(self.num_shards, self.capacity, -1)).reshape(out_rows.shape)
        return jnp.where(fits[:, None], back.at[slot].get(mode="fill", fill_value=0), 0)

    def _a2a(self, x):
        if self.num_shards == 1:
            return x
        return jax.lax.all_to_all(x, self.axis, 0, 0, tiled=True)


@dataclasses.dataclass(frozen=True)
class RaggedExchange:
    """`jax.lax.ragged_all_to_all` into a receive buffer of `capacity` rows (GPU / TPU).

    The per-expert counts of every shard are all-gathered first ([P, E] int32: the only
    collective whose size depends on P, and it is tiny); from them every shard computes the same
    offsets (`ragged_plan`). `ragged_all_to_all` is a parameter so that CPU tests can run the
    offset arithmetic through an emulation (XLA:CPU does not implement the primitive)."""

    axis: tuple[str, ...]
    num_shards: int
    capacity: int  # rows of the receive buffer
    ragged_all_to_all: Callable = jax.lax.ragged_all_to_all

    def dispatch(self, rows, sorted_expert, group_sizes):
        p, cap = self.num_shards, self.capacity
        e_local = group_sizes.shape[0] // p
        shard = _shard_index(self.axis)
        all_sizes = group_sizes[None] if p == 1 else jax.lax.all_gather(group_sizes, self.axis, tiled=False)
        all_sizes = all_sizes.reshape(p, -1)
        in_off, send, out_off, recv = ragged_plan(all_sizes, shard, cap)
        out = jnp.zeros((cap, rows.shape[1]), rows.dtype)
        received = self.ragged_all_to_all(rows, out, in_off, send, out_off, recv, axis_name=self.axis)
        recv_groups = all_sizes.reshape(p, p, e_local)[:, shard]  # [src, El] sent to me
        ids = received_experts(recv_groups, recv, cap, chunk_starts=exclusive_cumsum(recv))
        # Which of my sorted rows made it: rows for shard j past send[j] were cut.
        pos = jnp.arange(rows.shape[0], dtype=jnp.int32) - in_off[sorted_expert // e_local]
        fits = pos < send[sorted_expert // e_local]
        # The way back: my receive buffer's chunks return to where each sender took them from.
        traffic = all_sizes.reshape(p, p, e_local).sum(-1)
        back_out_off = exclusive_cumsum(traffic)[:, shard]  # where my chunk sits in sender s's rows
        return received, ids, (rows.shape[0], exclusive_cumsum(recv), recv, back_out_off, send, fits)

    def combine(self, out_rows, state):
        m, in_off, send, out_off, recv, fits = state
        out = jnp.zeros((m, out_rows.shape[1]), out_rows.dtype)
        back = self.ragged_all_to_all(out_rows, out, in_off, send, out_off, recv, axis_name=self.axis)
        return jnp.where(fits[:, None], back, 0)


def _shard_index(axes: tuple[str, ...]):
    """This device's index along the (possibly several) mesh axes, row-major as collectives order them."""
    idx = 0
    for a in axes:
        idx = idx * jax.lax.axis_size(a) + jax.lax.axis_index(a)
    return idx


# ---------------------------------------------------------------------------------------- body
def grouped_swiglu(rows: Float[Array, "R D"], expert: Int[Array, " R"], wi_gate, wi_up, wo, dtype,
                   tensor_axes: tuple[str, ...] = ()) -> Float[Array, "R D"]:
    """SwiGLU of each row through its local expert (id E_local = no expert: zero), grouped by expert
    for `ragged_dot`; `F` may be split over `tensor_axes` (a psum joins the down projection)."""
    e_local = wi_gate.shape[0]
    order = jnp.argsort(expert, stable=True)
    sizes = jnp.bincount(expert, length=e_local + 1)[:e_local].astype(jnp.int32)  # none-rows sort last
    x = rows[order]
    g = jax.lax.ragged_dot(x, wi_gate.astype(dtype), sizes)  # [R, F_local]
    u = jax.lax.ragged_dot(x, wi_up.astype(dtype), sizes)
    y = jax.lax.ragged_dot(nn.silu(g) * u, wo.astype(dtype), sizes)  # [R, D], partial over tensor
    if tensor_axes:
        y = jax.lax.psum(y, tensor_axes)
    return jnp.zeros_like(y).at[order].set(y)


def route(x: Float[Array, "T D"], router_kernel, expert_bias, config: ModelConfig):
    """Sigmoid router with group-limited top-k (REFERENCE §1), fp32 throughout.

    `expert_bias` steers only the selection; the weights use the unbiased scores.
    Returns (expert ids [T, k], combine weights [T, k] fp32).
    """
    c = config
    logits = x.astype(jnp.float32) @ router_kernel.astype(jnp.float32)  # [T, E]
    scores = jax.nn.sigmoid(logits)
    sel = scores + expert_bias.astype(jnp.float32)
    t = sel.shape[0]
    per_group = c.num_experts // c.n_group
    group_scores = jax.lax.top_k(sel.reshape(t, c.n_group, per_group), 2)[0].sum(-1)  # [T, n_group]
    _, group_idx = jax.lax.top_k(group_scores, c.topk_group)  # [T, topk_group]
    group_keep = jax.nn.one_hot(group_idx, c.n_group, dtype=jnp.bool_).any(axis=-2)  # [T, n_group]
    expert_keep = jnp.repeat(group_keep, per_group, axis=-1)  # [T, E]
    _, idx = jax.lax.top_k(jnp.where(expert_keep, sel, -jnp.inf), c.num_experts_per_tok)
    w = jnp.take_along_axis(scores, idx, axis=-1)
    if c.num_experts_per_tok > 1:
        w = w / (w.sum(-1, keepdims=True) + 1e-20)
    return idx, w * c.routed_scaling_factor


def experts_ragged(x, idx, w, wi_gate, wi_up, wo, dtype):
    """Dropless sorted dispatch: tokens grouped by expert, one ragged_dot per projection."""
    t, kk = idx.shape
    e = wi_gate.shape[0]
    flat = idx.reshape(-1)  # [T*k]
    order = jnp.argsort(flat, stable=True)
    rows = x[order // kk]  # [T*k, D] sorted by expert
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    g = jax.lax.ragged_dot(rows, wi_gate.astype(dtype), sizes)
    u = jax.lax.ragged_dot(rows, wi_up.astype(dtype), sizes)
    out = jax.lax.ragged_dot(nn.silu(g) * u, wo.astype(dtype), sizes)  # [T*k, D]
    out = jnp.zeros_like(out).at[order].set(out).reshape(t, kk, -1)
    return jnp.einsum("tkd,tk->td", out.astype(jnp.float32), w).astype(dtype)


def experts_dense(x, idx, w, wi_gate, wi_up, wo, dtype):
    """Every expert on every token, combined with a [T, E] weight matrix that is zero off the top-k.

    Written as three plain 2-D matmuls over the flattened (expert, hidden) axis: the combine
    weight scales the hidden activations before the down projection, so the sum over experts is
    part of that matmul and no [T, E, D] tensor exists (2.5x faster loss+grad on XLA:CPU than
    per-expert batched einsums).
    """
    e, d, f = wi_gate.shape
    t = x.shape[0]
    combine = jnp.einsum("tke,tk->te", jax.nn.one_hot(idx, e, dtype=jnp.float32), w)  # [T, E]
    g = (x @ wi_gate.astype(dtype).transpose(1, 0, 2).reshape(d, e * f)).reshape(t, e, f)
    u = (x @ wi_up.astype(dtype).transpose(1, 0, 2).reshape(d, e * f)).reshape(t, e, f)
    h = (nn.silu(g) * u).astype(jnp.float32) * combine[:, :, None]
    return h.astype(dtype).reshape(t, e * f) @ wo.astype(dtype).reshape(e * f, -1)


def tile_slots(sorted_expert: Int[Array, " M"], group_sizes: Int[Array, " E"], tile: int,
               num_tiles: int) -> tuple[Int[Array, " M"], Int[Array, " N"]]:
    """Where each expert-sorted row goes when every expert's rows are padded to whole tiles of
    `tile` rows: (slot of each row in the [num_tiles * tile] buffer, expert of each tile; E for a
    tile no expert uses). Expert e's rows fill its tiles from their start, in sorted order."""
    e = group_sizes.shape[0]
    tiles_per = (group_sizes + tile - 1) // tile  # [E]
    first_tile = exclusive_cumsum(tiles_per)
    first_row = exclusive_cumsum(group_sizes)
    pos = jnp.arange(sorted_expert.shape[0], dtype=jnp.int32) - first_row[sorted_expert]
    slots = first_tile[sorted_expert] * tile + pos
    tile_expert = jnp.searchsorted(jnp.cumsum(tiles_per), jnp.arange(num_tiles, dtype=jnp.int32), side="right")
    return slots.astype(jnp.int32), jnp.minimum(tile_expert, e).astype(jnp.int32)


def num_tiles(rows: int, num_experts: int, tile: int) -> int:
    """Tiles that always suffice: sum_e ceil(s_e / tile) <= ceil(rows / tile) + num_experts - 1."""
    return -(-rows // tile) + num_experts - 1


def experts_tiled(x, idx, w, wi_gate, wi_up, wo, dtype, *, tile: int = 128):
    """Dropless sorted dispatch without `ragged_dot`: rows sorted by expert, each expert's rows
    padded to whole tiles of `tile` rows (one expert per tile), then one batched matmul per
    projection over the tiles with each tile's expert weights gathered.

    Work is (T*k + E*(tile-1)) rows at most, whatever the routing; XLA:GPU's ragged_dot lowering
    pads every group to all T*k rows (E times the work, openxla/xla#46000). The price is the
    gathered weights, [tiles, D, F] per projection (D/tile times the hidden activations)."""
    t, kk = idx.shape
    e, d, _ = wi_gate.shape
    flat = idx.reshape(-1)  # [T*k]
    order = jnp.argsort(flat, stable=True)
    sorted_expert = flat[order].astype(jnp.int32)
    sizes = jnp.bincount(flat, length=e).astype(jnp.int32)
    n = num_tiles(t * kk, e, tile)
    slots, tile_expert = tile_slots(sorted_expert, sizes, tile, n)
    rows = x[order // kk].astype(dtype)  # [T*k, D] sorted by expert
    tiles = jnp.zeros((n * tile, d), dtype).at[slots].set(rows, unique_indices=True).reshape(n, tile, d)
    pick = jnp.minimum(tile_expert, e - 1)  # an unused tile holds zero rows: any expert gives zeros
    g = jnp.einsum("nmd,ndf->nmf", tiles, wi_gate.astype(dtype)[pick])
    u = jnp.einsum("nmd,ndf->nmf", tiles, wi_up.astype(dtype)[pick])
    out = jnp.einsum("nmf,nfd->nmd", nn.silu(g) * u, wo.astype(dtype)[pick]).reshape(n * tile, -1)
    out = out[slots]  # [T*k, D] sorted order
    out = jnp.zeros_like(out).at[order].set(out).reshape(t, kk, -1)
    return jnp.einsum("tkd,tk->td", out.astype(jnp.float32), w).astype(dtype)


EXPERT_IMPLS = {"ragged": experts_ragged, "dense": experts_dense, "tiled": experts_tiled}


def local_experts(x: Float[Array, "T D"], router, bias, wi_gate, wi_up, wo, *, config, exchange: Exchange,
                  num_shards: int, tensor_axes: tuple[str, ...] = ()):
    """The per-device body: route local tokens, exchange, grouped matmul, exchange back, combine.

    `wi_*`/`wo` hold this shard's E/P experts. Returns (y [T, D], idx [T, k], weight [T, k],
    dropped rows (int32 scalar, this device's))."""
    dtype = jnp.dtype(config.dtype)
    t, k = x.shape[0], config.num_experts_per_tok
    idx, w = route(x, router, bias, config)
    flat = idx.reshape(-1)  # [T*k]
    order = jnp.argsort(flat, stable=True)
    sorted_expert = flat[order].astype(jnp.int32)
    group_sizes = jnp.bincount(flat, length=config.num_experts).astype(jnp.int32)
    rows = x[order // k]  # [T*k, D] sorted by expert
    recv, recv_expert, state = exchange.dispatch(rows, sorted_expert, group_sizes)
    out = grouped_swiglu(recv, recv_expert, wi_gate, wi_up, wo, dtype, tensor_axes)
    back = exchange.combine(out, state)  # [T*k, D] sorted order, zeros where dropped
    dropped = jnp.sum(~state[-1]).astype(jnp.int32)
    unsorted = jnp.zeros_like(back).at[order].set(back).reshape(t, k, -1)
    y = jnp.einsum("tkd,tk->td", unsorted.astype(jnp.float32), w).astype(dtype)
    return y, idx, w, dropped


# ---------------------------------------------------------------------------------------- capacity
def slot_capacity(tokens_local: int, config, num_shards: int) -> int:
    """Rows per destination slot of the padded exchange (see the module docstring)."""
    k, e_local = config.num_experts_per_tok, config.num_experts // num_shards
    worst = tokens_local * min(k, e_local)
    if config.moe_capacity_factor <= 0:
        return worst
    return min(worst, _round_up(math.ceil(config.moe_capacity_factor * tokens_local * k / num_shards), 8))


def receive_capacity(tokens_local: int, config, num_shards: int) -> int:
    """Rows of the ragged exchange's receive buffer."""
    k, e_local = config.num_experts_per_tok, config.num_experts // num_shards
    worst = num_shards * tokens_local * min(k, e_local)
    if config.moe_capacity_factor <= 0:
        return worst
    return min(worst, _round_up(math.ceil(config.moe_capacity_factor * tokens_local * k), 8))


def _round_up(n: int, m: int) -> int:
    return -(-n // m) * m


# ---------------------------------------------------------------------------------------- layer
EXCHANGES = ("padded", "ragged")


def expert_parallel(x: Float[Array, "B T D"], router, bias, wi_gate, wi_up, wo, config, *,
                    exchange: Optional[str] = None, rules=None, ragged_all_to_all: Callable = jax.lax.ragged_all_to_all):
    """Routed experts of `x` under the current mesh (`jax.set_mesh`), expert-parallel.

    Returns (y [B, T, D], idx [B, T, k], weight [B, T, k], dropped rows (int32, whole mesh)).
    `exchange`: "padded" (all_to_all) or "ragged" (ragged_all_to_all); by default the ragged one on
    GPU / TPU meshes and the padded one on CPU, read from the mesh's devices. Without a mesh the
    body runs on this device alone (P = 1, no collective).
    """
    c = config
    mesh = jax.sharding.get_abstract_mesh()
    rules = rules or nn.get_logical_axis_rules() or DEFAULT_RULES
    b, t, d = x.shape
    if mesh.empty:
        ex = PaddedExchange((), 1, slot_capacity(b * t, c, 1))
        y, idx, w, dropped = local_experts(x.reshape(b * t, d), router, bias, wi_gate, wi_up, wo, config=c,
                                           exchange=ex, num_shards=1)
        return y.reshape(b, t, d), idx.reshape(b, t, -1), w.reshape(b, t, -1), dropped

    shape = dict(mesh.shape)
    w_spec = logical_to_spec(("exp", None, "expert_mlp"), wi_gate.shape, shape, rules)
    wo_spec = logical_to_spec(("exp", "expert_mlp", None), wo.shape, shape, rules)
    ep_axes, tp_axes = _axes(w_spec[0]), _axes(w_spec[2])
    # Tokens flattened to [B*T, D] and split like the batch: the same layout as [B, T, D] split on
    # B when B divides, and still split when only B*T does (e.g. decoding one sequence).
    x_spec = logical_to_spec(("act_batch", None), (b * t, d), shape, rules)
    batch_axes = _axes(x_spec[0])
    if not set(ep_axes) <= set(batch_axes):
        raise ValueError(f"moe_impl=expert_parallel: expected the {b}x{t} tokens to split over the expert axes "
                         f"{ep_axes} (sizes {[shape[a] for a in ep_axes]}), found them split over {batch_axes}")
    p = math.prod(shape[a] for a in ep_axes)
    t_local = b * t // math.prod(shape[a] for a in batch_axes)
    kind = exchange or _default_exchange(mesh)
    if kind == "padded" or p == 1:  # no expert axis: nothing to exchange, the padded one is the identity
        ex = PaddedExchange(ep_axes, p, slot_capacity(t_local, c, p))
    elif kind == "ragged":
        ex = RaggedExchange(ep_axes, p, receive_capacity(t_local, c, p), ragged_all_to_all)
    else:
        raise ValueError(f"exchange: expected one of {EXCHANGES}, found {kind!r}")

    def body(xl, router_, bias_, g_, u_, o_):
        y, idx, w, dropped = local_experts(xl, router_, bias_, g_, u_, o_, config=c, exchange=ex, num_shards=p,
                                           tensor_axes=tp_axes)
        dropped = jax.lax.psum(dropped, batch_axes)
        if tp_axes:  # identical on every tensor shard; pmax only makes the replication visible
            dropped = jax.lax.pmax(dropped, tp_axes)
        return y, idx, w, dropped

    rows = PartitionSpec(x_spec[0], None)
    fn = jax.shard_map(body, in_specs=(x_spec, PartitionSpec(), PartitionSpec(), w_spec, w_spec, wo_spec),
                       out_specs=(rows, rows, rows, PartitionSpec()))
    y, idx, w, dropped = fn(x.reshape(b * t, d), router, bias, wi_gate, wi_up, wo)
    return y.reshape(b, t, d), idx.reshape(b, t, -1), w.reshape(b, t, -1), dropped


def _axes(entry) -> tuple[str, ...]:
    if entry is None:
        return ()
    return tuple(entry) if isinstance(entry, tuple) else (entry,)


def _default_exchange(mesh) -> str:
    """The platform of the mesh in force (so an AOT compile for TPU on a CPU host picks "ragged").

    Read from the abstract mesh's device kind, which is what a trace under `jit` sees (the
    concrete mesh, `jax.sharding.get_mesh()`, is not available there); the default backend only
    when the mesh does not say."""
    dev = getattr(mesh, "abstract_device", None)
    platform = getattr(dev, "platform", None)
    if not platform:
        try:
            platform = jax.sharding.get_mesh().devices.flat[0].platform
        except Exception:  # no concrete mesh either: the default backend decides
            platform = jax.default_backend()
    return "padded" if platform == "cpu" else "ragged"


# ---------------------------------------------------------------------------------------- audits
_COLLECTIVE = re.compile(r"\s(all-to-all|ragged-all-to-all|all-gather|all-reduce|reduce-scatter|collective-permute)"
                         r"(?:-start)?\(")
_ARRAY = re.compile(r"\b(pred|[subf]\d+|bf16)\[([\d,]*)\]")
_BYTES = {"pred": 1, "bf16": 2}


def collective_buffers(hlo_text: str) -> list[tuple[str, int]]:
    """(op, result bytes) of every collective in a compiled program's text (`compiled.as_text()`).

    For audits: a collective whose size follows the global batch shows up as growing with the
    device count at a fixed per-device batch."""
    out = []
    for line in hlo_text.splitlines():
        m = _COLLECTIVE.search(line)
        if not m or " = " not in line[:m.start() + 1]:
            continue
        result_type = line[line.index(" = ") + 3:m.start() + 1]
        nbytes = 0
        for dtype, dims in _ARRAY.findall(result_type):
            size = math.prod(int(d) for d in dims.split(",") if d) if dims else 1
            nbytes += size * _BYTES.get(dtype, max(int(re.sub(r"\D", "", dtype)) // 8, 1))
        out.append((m.group(1), nbytes))
    return out
