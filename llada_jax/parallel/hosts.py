"""Many hosts: the distributed runtime, global batches from host slices, barriers, the primary.

Everything a launcher and a training loop need to run on several processes lives here (the
big_vision `train.py` + `utils` pattern), so the rest of the package asks three questions only:
which rows of the global batch does this process read (`batch_rows`), how do its rows become
one global array (`global_batch`), and may it write shared files (`is_primary`, `barrier`).

- `initialize()` starts `jax.distributed` before anything touches a device: with no arguments
  on TPU pods and under SLURM (JAX reads the cluster), with `--coordinator_address`,
  `--num_processes` and `--process_id` otherwise; several CPU processes on one machine behave
  like hosts (gloo collectives), which is how the multi-host paths are tested here.
- A global batch is split over the mesh's batch axes (`data`, `fsdp`, `expert`). Each process
  reads the rows its devices hold and `jax.make_array_from_process_local_data` assembles them;
  a batch that does not divide those axes is an error naming the sizes, never a replication
  (a replicated "global" batch made of different host data lets processes diverge silently).
- One process (index 0) writes logs, metrics, tokenizers and prepared data; the others wait
  at a `barrier` and then read what it wrote.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, NamedTuple, Optional

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

# The mesh axes that split the batch, in the order the rule table (`act_batch`) lists them.
BATCH_AXES = ("data", "fsdp", "expert")


class BatchShardingError(ValueError):
    """A global batch that cannot be split evenly over the mesh's batch axes or the processes."""


# ------------------------------------------------------------------------------ the runtime
def define_flags() -> None:
    """The absl flags every launcher shares (call once at module level of a launcher)."""
    from absl import flags

    flags.DEFINE_string("coordinator_address", None,
                        "HOST:PORT of process 0's coordinator (multi-process runs outside TPU pods / SLURM).")
    flags.DEFINE_integer("num_processes", None, "Number of processes (hosts) in the run.")
    flags.DEFINE_integer("process_id", None, "This process's index in [0, num_processes).")
    flags.DEFINE_enum("cpu_collectives", "gloo", ["gloo", "mpi", "none"],
                      "Collectives between CPU processes (the CPU rehearsal of a pod).")


def initialize_from_flags() -> None:
    """`initialize` with the values of `define_flags`' flags."""
    from absl import flags

    f = flags.FLAGS
    initialize(f.coordinator_address, f.num_processes, f.process_id, cpu_collectives=f.cpu_collectives)


def _cluster_detected() -> bool:
    """Whether JAX's own cluster detection will find several processes (TPU pod, SLURM, MPI)."""
    env = os.environ
    if int(env.get("SLURM_NTASKS", env.get("SLURM_NPROCS", "1")) or 1) > 1 and "SLURM_JOB_ID" in env:
        return True
    if "," in env.get("TPU_WORKER_HOSTNAMES", "") or env.get("MEGASCALE_COORDINATOR_ADDRESS"):
        return True
    if int(env.get("OMPI_COMM_WORLD_SIZE", "1") or 1) > 1:
        return True
    return bool(env.get("JAX_COORDINATOR_ADDRESS"))


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None, *, cpu_collectives: str = "gloo") -> bool:
    """Starts the distributed runtime when the run has several processes; returns whether it did.

    With no arguments it starts only on a detected cluster (TPU pod, SLURM, MPI, or
    `$JAX_COORDINATOR_ADDRESS`), where JAX fills in everything. Given explicitly, all three of
    `coordinator_address`, `num_processes` and `process_id` are needed. Must run before
    anything touches a device; calling it again is a no-op.
    """
    given = {"coordinator_address": coordinator_address, "num_processes": num_processes, "process_id": process_id}
    if any(v is not None for v in given.values()):
        missing = [k for k, v in given.items() if v is None]
        if missing and not _cluster_detected():
            raise ValueError(f"--{missing[0]}: expected a value with --{', --'.join(k for k in given if k not in missing)}"
                             f" (all of --coordinator_address, --num_processes, --process_id), found none")
        if num_processes is not None and num_processes < 1:
            raise ValueError(f"--num_processes: expected >= 1, found {num_processes}")
        if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
            raise ValueError(f"--process_id: expected 0 <= process_id < num_processes={num_processes}, found {process_id}")
        if num_processes == 1:
            return False
    elif not _cluster_detected():
        return False
    if jax.distributed.is_initialized():
        return True
    if cpu_collectives != "none":
        # Only the CPU backend reads this; on TPU / GPU it is inert (their collectives are native).
        jax.config.update("jax_cpu_collectives_implementation", cpu_collectives)
    jax.distributed.initialize(**given)
    return True


def is_primary() -> bool:
    """The process that writes shared files (logs, metrics, tokenizer, prepared data)."""
    return jax.process_index() == 0


_BARRIER_COUNTS: dict[str, int] = {}


def barrier(name: str, timeout_s: int = 3600) -> None:
    """Every process waits here until all have arrived (a no-op with one process).

    A barrier of the coordination service, not a device collective: it needs no compiled
    program and waits as long as `timeout_s` (a collective's first rendezvous does not: gloo
    gives CPU processes 30 s)."""
    if jax.process_count() == 1:
        return
    from jax._src import distributed  # the runtime's client; jax has no public barrier API

    n = _BARRIER_COUNTS[name] = _BARRIER_COUNTS.get(name, 0) + 1
    client = distributed.global_state.client
    if client is None:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)
        return
    client.wait_at_barrier(f"llada_jax/{name}/{n}", timeout_in_ms=timeout_s * 1000)


def compile_together(jitted, *args, name: str, **static):
    """`jitted.lower(*args, **static).compile()`, then a barrier: every process starts running a
    new program at about the same time whatever its compile time (CPU processes that reach a
    collective more than 30 s apart fail in gloo's rendezvous). Call the result with `args`."""
    compiled = jitted.lower(*args, **static).compile()
    barrier(f"compiled/{name}")
    return compiled


def on_primary_then_all(name: str, fn, *args, **kwargs):
    """Runs `fn` on the primary, then (after a barrier) on the others: for "create if missing"
    steps (tokenizer, prepared data) that the primary writes and the others then read."""
    out = fn(*args, **kwargs) if is_primary() else None
    barrier(name)
    return out if is_primary() else fn(*args, **kwargs)


# ------------------------------------------------------------------------------ global batches
def batch_axes(mesh: Mesh) -> tuple[str, ...]:
    """The mesh axes of size > 1 that split the batch."""
    return tuple(a for a in BATCH_AXES if mesh.shape.get(a, 1) > 1)


def batch_ways(mesh: Mesh) -> int:
    """How many ways the mesh's batch axes split a batch (their sizes' product)."""
    return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_spec(mesh: Mesh, global_batch: int, ndim: int = 1, what: str = "data.batch_size") -> PartitionSpec:
    """The PartitionSpec of a `[global_batch, ...]` array: rows over every batch axis. A batch
    that those axes do not divide is an error naming the sizes (never a replication)."""
    axes = batch_axes(mesh)
    ways = math.prod(mesh.shape[a] for a in axes)
    if global_batch % ways:
        raise BatchShardingError(
            f"{what}: expected a multiple of the mesh's batch axes "
            f"({' x '.join(f'{a}={mesh.shape[a]}' for a in axes)} = {ways}), found {global_batch}")
    rows = axes if len(axes) > 1 else (axes[0] if axes else None)
    return PartitionSpec(rows, *([None] * (ndim - 1)))


def batch_sharding(mesh: Mesh, global_batch: int, ndim: int = 1, what: str = "data.batch_size") -> NamedSharding:
    return NamedSharding(mesh, batch_spec(mesh, global_batch, ndim, what))


def batch_rows(mesh: Mesh, global_batch: int, what: str = "data.batch_size") -> tuple[int, int]:
    """`(index, count)`: this process reads slice `index` of `count` equal, contiguous slices of
    the global batch (rows `[index * B/count, (index + 1) * B/count)`).

    `count` is the number of distinct row ranges the processes' devices hold: the process count
    when the batch axes span the processes, fewer when processes share rows (e.g. a `tensor`
    axis across hosts). Raises if the batch does not divide the batch axes."""
    sh = batch_sharding(mesh, global_batch, 1, what)
    ranges: dict[int, set] = {}
    for device, index in sh.devices_indices_map((global_batch,)).items():
        sl = index[0]
        ranges.setdefault(device.process_index, set()).add((sl.start or 0, global_batch if sl.stop is None else sl.stop))
    spans = {}
    for proc, rs in ranges.items():
        rs = sorted(rs)
        if any(b[0] != a[1] for a, b in zip(rs, rs[1:])):
            raise BatchShardingError(f"mesh: process {proc}'s devices hold non-contiguous rows {rs} of the batch; "
                                     f"order the mesh's devices by process")
        spans[proc] = (rs[0][0], rs[-1][1])
    distinct = sorted(set(spans.values()))
    sizes = {hi - lo for lo, hi in distinct}
    if len(sizes) != 1 or sum(sizes) * len(distinct) != global_batch:
        raise BatchShardingError(f"mesh: the processes hold overlapping or unequal row ranges {distinct} of a "
                                 f"batch of {global_batch}")
    return distinct.index(spans[jax.process_index()]), len(distinct)


def local_batch_size(mesh: Mesh, global_batch: int, what: str = "data.batch_size") -> int:
    """Rows of the global batch this process reads."""
    _, count = batch_rows(mesh, global_batch, what)
    return global_batch // count


def global_batch(mesh: Mesh, local: Mapping[str, np.ndarray], global_size: Optional[int] = None,
                 what: str = "data.batch_size") -> dict[str, jax.Array]:
    """This process's rows (`[B/count, ...]` numpy arrays) as global `[B, ...]` arrays split over
    the batch axes. `global_size` defaults to the local rows times the number of row slices."""
    first = next(iter(local.values()))
    if global_size is None:
        # The count does not depend on the batch size beyond divisibility: ask with one row per slice.
        _, count = batch_rows(mesh, batch_ways(mesh), what)
        global_size = first.shape[0] * count
    _, count = batch_rows(mesh, global_size, what)
    out = {}
    for k, v in local.items():
        v = np.asarray(v)
        if v.shape[0] * count != global_size:
            raise BatchShardingError(f"{what}: process {jax.process_index()} has {v.shape[0]} rows of {k!r}; expected "
                                     f"{global_size} // {count} slices = {global_size // count}")
        out[k] = jax.make_array_from_process_local_data(
            batch_sharding(mesh, global_size, v.ndim, what), v, (global_size,) + v.shape[1:])
    return out


def host_local(x: jax.Array, mesh: Mesh) -> np.ndarray:
    """This process's rows of a global `[B, ...]` array (the inverse of `global_batch`), read from
    its addressable shards whatever the array's sharding (batch-split, replicated, or split on
    other dimensions too)."""
    index, count = batch_rows(mesh, x.shape[0], "rows")
    n = x.shape[0] // count
    lo = index * n
    out = np.empty((n,) + x.shape[1:], x.dtype)
    filled = np.zeros(out.shape, bool) if x.ndim else None
    for shard in x.addressable_shards:
        rows = shard.index[0]
        start, stop = rows.start or 0, x.shape[0] if rows.stop is None else rows.stop
        a, b = max(start, lo), min(stop, lo + n)
        if a >= b:
            continue
        dst = (slice(a - lo, b - lo),) + tuple(shard.index[1:])
        out[dst] = np.asarray(shard.data)[a - start:b - start]
        filled[dst] = True
    if not filled.all():
        raise ValueError(f"host_local: process {jax.process_index()} does not hold all of its rows [{lo}, {lo + n})")
    return out


# ------------------------------------------------------------------------------ process-local work
class ProcessBlocks(NamedTuple):
    """A mesh cut into one block of devices per process (`process_blocks`)."""
    local: Mesh    # this process's devices, the mesh's axis names, each axis this process's share of it
    stacked: Mesh  # every process's block along a leading "processes" axis: the mesh's devices


def process_blocks(mesh: Mesh) -> Optional[ProcessBlocks]:
    """`mesh` as one block per process (the same shape for all), or None where some process's
    devices are not a block of it. With one process, the block is the mesh."""
    owner = np.vectorize(lambda d: d.process_index)(mesh.devices)
    blocks = {}
    for p in np.unique(owner):
        mine = owner == p
        index = [np.flatnonzero(mine.any(axis=tuple(j for j in range(mine.ndim) if j != i))) for i in range(mine.ndim)]
        block = np.ix_(*index)
        if not mine[block].all():
            return None
        blocks[int(p)] = mesh.devices[block]
    if len({b.shape for b in blocks.values()}) != 1:
        return None
    stacked = Mesh(np.stack([blocks[p] for p in sorted(blocks)]), ("processes",) + tuple(mesh.axis_names),
                   axis_types=(jax.sharding.AxisType.Auto,) + tuple(mesh.axis_types))
    local = Mesh(blocks[jax.process_index()], mesh.axis_names, axis_types=mesh.axis_types)
    return ProcessBlocks(local=local, stacked=stacked)


_COPIES: dict = {}


def _identity(tree):
    return tree


def process_local_copy(tree: Any, blocks: ProcessBlocks, fn=None) -> Any:
    """A copy of `tree` (arrays on the mesh `blocks` cuts; `fn(tree)` if given, e.g. a cast) held
    whole by every process: each leaf laid out over this process's block as it is over the mesh
    (its PartitionSpec, on the block's smaller axes), returned as arrays of this process alone, on
    `blocks.local`. What a computation each process runs on its own takes (the RL rollouts of its
    own prompts). One jitted program that every process runs: the gathers across processes."""
    is_spec = lambda x: isinstance(x, PartitionSpec)
    specs = jax.tree_util.tree_map(
        lambda x: x.sharding.spec if isinstance(getattr(x, "sharding", None), NamedSharding) else PartitionSpec(), tree)
    flat, treedef = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)
    key = (fn, blocks.stacked, treedef, tuple(flat))
    if key not in _COPIES:  # one program per tree and function, traced once
        stacked = jax.tree_util.tree_map(lambda s: NamedSharding(blocks.stacked, s), specs, is_leaf=is_spec)
        _COPIES[key] = jax.jit(fn or _identity, out_shardings=stacked)
    copy = _COPIES[key](tree)
    return jax.tree_util.tree_map(
        lambda x, s: jax.make_array_from_single_device_arrays(
            x.shape, NamedSharding(blocks.local, s), [shard.data for shard in x.addressable_shards]),
        copy, specs, is_leaf=is_spec)


def allgather(x: Any) -> Any:
    """Every process's numpy values stacked as `[process_count, ...]` (a pytree; metrics
    reduction). With one process, `x[None]`."""
    if jax.process_count() == 1:
        return jax.tree_util.tree_map(lambda v: np.asarray(v)[None], x)
    from jax.experimental import multihost_utils

    return jax.tree_util.tree_map(np.asarray, multihost_utils.process_allgather(x, tiled=False))
