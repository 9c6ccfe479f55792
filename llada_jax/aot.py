"""Ahead-of-time compilation for TPU topologies on a machine without TPUs (SCALE.md §1).

With `libtpu` installed (the `tpu` extra), XLA's real TPU compiler runs on a CPU-only host: a
program lowered with abstract inputs for a TPU *topology* compiles as it would on the pod and
reports its memory per chip. This answers "does this run fit on that slice?" before renting it,
the way MaxText's `train_compile.py` does. `launch/compile.py` is the command line.

What is compiled is the project's own code, unchanged:
  sft     `train.make_train_step` jitted by `train.jit_train_step`, state shardings from
          `train.state_shardings` (the trainer's optimizer, accumulation and batch sharding);
  rl      `rl.make_rl_step` (EBPO / ESPO from `cfg.rl`, `rl_loop.build_rl_config`: layout
          `rl.vectorize` batch|scan, `rl.grad_mode` direct|replay) jitted the way `rl_loop.run_rl`
          does, on a batch of `prompts_per_step * group_size` rollouts of `data.seq_len` tokens;
  decode  `decode.decode`, the jitted Draft-and-Edit loop with the KV cache, on a batch of
          `data.batch_size` canvases of `prompt_length + gen_length` tokens.

Every input is a `jax.ShapeDtypeStruct` with its `NamedSharding` on a mesh built from the
topology's devices (`jax.experimental.topologies`), so nothing is allocated. The caller must
run with `JAX_PLATFORMS=cpu` (set before JAX initialises; `launch/compile.py` does it): the
default backend stays the CPU, and creating a concrete array (a PRNG key) on a device-less TPU
client would fail.

Memory per chip comes from `compiled.memory_analysis()`; `total = arguments + outputs - aliased
(donated) + temporaries + generated code`, and a plan `fits` when total <= 90% of the chip's HBM
(headroom for fragmentation and runtime buffers). When XLA refuses (`CompileTimeHbmOom`,
RESOURCE_EXHAUSTED) the numbers are parsed out of its message into `NotFitError`.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections
from jax.sharding import NamedSharding, PartitionSpec

from llada_jax.model import backends

GIB = 1 << 30
FIT_FRACTION = 0.9
JOBS = ("sft", "rl", "decode")


# ------------------------------------------------------------------------------ topologies
@dataclasses.dataclass(frozen=True)
class Generation:
    dims: int  # 2D (v5e, v6e) or 3D (v5p) torus
    cores_per_chip: int  # what a Cloud name counts: v5p-64 is 64 TensorCores = 32 chips
    hbm_bytes: int  # per chip, as the TPU compiler reports it available (its OOM message)


# HBM per chip as libtpu 0.0.52's compiler reports it available ("exceeds available HBM (95.73G)",
# binary units), measured here by compiling a program that does not fit on each generation.
GENERATIONS = {
    "v5p": Generation(dims=3, cores_per_chip=2, hbm_bytes=round(95.73 * GIB)),
    "v5e": Generation(dims=2, cores_per_chip=1, hbm_bytes=round(15.75 * GIB)),
    "v6e": Generation(dims=2, cores_per_chip=1, hbm_bytes=round(31.24 * GIB)),
}
ALIASES = {"v5litepod": "v5e", "v6litepod": "v6e"}
# Slice shapes of the Cloud accelerator types (2D: chips; 3D: grown from 2x2x1 by doubling the
# smallest axis, the last one first: 2x2x1, 2x2x2, 2x2x4, 2x4x4, 4x4x4, 4x4x8, 4x8x8, 8x8x8, ...).
_SHAPES_2D = {1: (1, 1), 4: (2, 2), 8: (2, 4), 16: (4, 4), 32: (4, 8), 64: (8, 8), 128: (8, 16), 256: (16, 16)}


@dataclasses.dataclass(frozen=True)
class Topology:
    generation: str
    shape: tuple[int, ...]

    @property
    def chips(self) -> int:
        return math.prod(self.shape)

    @property
    def name(self) -> str:  # what jax.experimental.topologies takes
        return f"{self.generation}:{'x'.join(map(str, self.shape))}"

    @property
    def cloud_name(self) -> str:
        return f"{self.generation}-{self.chips * GENERATIONS[self.generation].cores_per_chip}"

    @property
    def hbm_bytes(self) -> int:
        return GENERATIONS[self.generation].hbm_bytes


def _shape_3d(chips: int) -> tuple[int, int, int]:
    shape = [2, 2, 1]
    while math.prod(shape) < chips:
        i = max(k for k in range(3) if shape[k] == min(shape))
        shape[i] *= 2
    return shape[0], shape[1], shape[2]


def parse_topology(text: str) -> Topology:
    """`v5p-64` (Cloud: v5p counts TensorCores, 2 per chip; v5e / v6e count chips) or `v5p:2x4x4`."""
    expected = ("a TPU topology like v5p-64, v6e-32, v5e-16 (Cloud names) or v5p:2x4x4, v5e:4x4 "
                f"(generation:shape); generations {sorted(GENERATIONS)}")
    m = re.fullmatch(r"\s*([a-z0-9]+)\s*(?:-(\d+)|:(\d+(?:x\d+)*))\s*", text.lower())
    if not m:
        raise ValueError(f"topology: expected {expected}, found {text!r}")
    gen_name = ALIASES.get(m.group(1), m.group(1))
    if gen_name not in GENERATIONS:
        raise ValueError(f"topology: expected {expected}, found generation {m.group(1)!r} in {text!r}")
    gen = GENERATIONS[gen_name]
    if m.group(3):
        shape = tuple(int(s) for s in m.group(3).split("x"))
        if len(shape) != gen.dims or min(shape) < 1:
            raise ValueError(f"topology: expected a {gen.dims}D shape of positive sizes for {gen_name}, "
                             f"found {m.group(3)!r} in {text!r}")
        return Topology(gen_name, shape)
    count = int(m.group(2))
    if count % gen.cores_per_chip:
        raise ValueError(f"topology: {gen_name}-N counts TensorCores ({gen.cores_per_chip} per chip): expected "
                         f"an even N, found {count} in {text!r}")
    chips = count // gen.cores_per_chip
    if gen.dims == 2:
        if chips not in _SHAPES_2D:
            raise ValueError(f"topology: expected {gen_name}-N with N in {sorted(_SHAPES_2D)}, found {text!r}; "
                             f"give the shape instead ({gen_name}:AxB)")
        return Topology(gen_name, _SHAPES_2D[chips])
    if chips < 4 or chips & (chips - 1):
        raise ValueError(f"topology: expected {gen_name}-N with N/2 chips a power of two >= 4, found {text!r}; "
                         f"give the shape instead ({gen_name}:AxBxC)")
    return Topology(gen_name, _shape_3d(chips))


def topology_devices(topology: Topology) -> list:
    """The compile-only TPU devices of the slice (needs libtpu and JAX_PLATFORMS=cpu)."""
    try:
        import libtpu  # noqa: F401
    except ImportError as e:
        raise ImportError("libtpu is not installed: compiling for a TPU topology needs the TPU compiler "
                          "(pip install -e '.[tpu]')") from e
    # Several compile processes at once (tests, other users) must not fight over libtpu's
    # single-process lock file; no device is opened here.
    os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
    os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
    from jax.experimental import topologies

    devices = list(topologies.get_topology_desc(topology_name=topology.name, platform="tpu").devices)
    if len(devices) != topology.chips:
        raise RuntimeError(f"topology {topology.name}: expected {topology.chips} devices, libtpu gave {len(devices)}")
    return devices


# ------------------------------------------------------------------------------ jobs
@dataclasses.dataclass
class Job:
    """A jitted program and its abstract (sharded) arguments, plus what describes it in the report."""

    fn: Callable
    args: tuple
    info: dict


def _abstract(tree, shardings):
    return jax.tree_util.tree_map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def _key(mesh):
    return jax.ShapeDtypeStruct((), jax.eval_shape(lambda: jax.random.key(0)).dtype,
                                sharding=NamedSharding(mesh, PartitionSpec()))


def _batch(mesh, shapes: dict) -> dict:
    from llada_jax import train

    plain = {k: jax.ShapeDtypeStruct(s, d) for k, (s, d) in shapes.items()}
    return _abstract(plain, train.batch_sharding(mesh, plain))


def _state(model_config, tx, mesh):
    from llada_jax import train

    shardings = train.state_shardings(model_config, tx, mesh)
    return _abstract(train.init_state_abstract(model_config, tx), shardings), shardings


def _model_info(cfg, model_config) -> dict:
    return dict(model=cfg.model.preset if not cfg.model.get("hf_dir") else cfg.model.hf_dir,
                dtype=model_config.dtype, param_dtype=model_config.param_dtype, remat=model_config.remat_policy,
                moe_impl=model_config.moe_impl, attention=getattr(model_config, "attention_impl", "xla"))


def sft_job(cfg: ml_collections.ConfigDict, mesh) -> Job:
    """The trainer's update step on a global batch of `data.batch_size` x `data.seq_len` tokens; with
    `lora.rank > 0` the LoRA step: adapters and their Adam state in the state, the base (in
    `lora.base_dtype`, else `model.overrides.param_dtype`) a frozen argument."""
    import flax.linen as nn

    from llada_jax import model, train
    from llada_jax.model import lora
    from llada_jax.parallel import sharding

    model_config = backends.resolve(train.build_model_config(cfg), mesh)
    obj_config = train.build_objective(cfg, model_config)
    tx = train.make_optimizer(cfg)
    settings = lora.LoraConfig.from_mapping(cfg.get("lora"))
    b, length = cfg.data.batch_size, cfg.data.seq_len
    batch = _batch(mesh, {"tokens": ((b, length), jnp.int32), "loss_mask": ((b, length), jnp.bool_),
                          "doc_ids": ((b, length), jnp.int32)})
    step = train.make_train_step(model_config, obj_config, tx, train.learning_rate_schedule(cfg),
                                 cfg.optim.accum_steps, lora_config=settings)
    info = dict(_model_info(cfg, model_config), batch=b, seq_len=length, block_size=obj_config.block_size,
                accum_steps=cfg.optim.accum_steps, lora_rank=settings.rank)
    if not settings.enabled:
        state, shardings = _state(model_config, tx, mesh)
        return Job(train.jit_train_step(step, shardings, mesh, batch), (state, batch, _key(mesh)), info)
    # LoRA: the state is the adapters (trainer.lora_setup), the frozen base a fourth argument.
    base_boxed = model.abstract_params(train.lora_base_config(model_config, settings))
    boxed = lora.abstract_adapters(base_boxed, settings)
    shardings = train.state_shardings(model_config, tx, mesh, boxed=boxed)
    state = _abstract(train.init_state_abstract(model_config, tx, boxed), shardings)
    base_sh = sharding.param_shardings(base_boxed, mesh)
    base = _abstract(nn.meta.unbox(base_boxed), base_sh)
    info["trainable_params"] = lora.count(state.params)
    info["base_dtype"] = settings.base_dtype or model_config.param_dtype
    fn = train.jit_train_step(step, shardings, mesh, batch, base_sh)
    return Job(fn, (state, batch, _key(mesh), base), info)


def rl_job(cfg: ml_collections.ConfigDict, mesh) -> Job:
    """One update of `cfg.rl.algorithm` (EBPO or ESPO) on one mini-batch of the step's
    `prompts_per_step * group_size` rollouts of `data.seq_len` tokens (`rl.mini_batches` of them,
    each accumulated over `optim.accum_steps` micro-batches), jitted as `rl_loop.run_rl` does (the
    same program serves the on-policy first update and the later ones), θ_old's (and, at
    beta > 0, the reference's) terms as inputs. DiPO is not planned: its batch holds the decoder's recorded writes per position,
    whose count is known only after decoding."""
    import numpy as np

    from llada_jax import rl, train
    from llada_jax.rl import loop as rl_loop

    if "rl" not in cfg:
        raise ValueError("config: --job=rl needs an `rl` section (configs/rl.py, configs/rl_pod.py)")
    r = cfg.rl
    if r.algorithm == "dipo":
        raise ValueError("rl.algorithm: expected 'ebpo' or 'espo' for --job=rl, found 'dipo' (its batch shape "
                         "depends on the decoding trajectory)")
    model_config = backends.resolve(train.build_model_config(cfg), mesh)
    block = cfg.objective.block_size
    length = rl_loop.bucket(cfg.data.seq_len, block)  # as rl_loop packs the rollouts
    b = rl_loop.check_update_config(cfg, mesh)  # the rollouts of one update (a mini-batch)
    config = rl_loop.build_rl_config(cfg)
    tx = rl_loop.make_rl_optimizer(cfg)
    state, shardings = _state(model_config, tx, mesh)
    shapes = {"tokens": ((b, length), jnp.int32), "completion_mask": ((b, length), jnp.bool_),
              "advantages": ((b,), jnp.float32), "sample_mask": ((b,), jnp.bool_),
              "example_ids": ((b,), jnp.int32)}
    terms = (rl.terms_shape({"tokens": np.empty((b, length), np.int8)}, config), jnp.float32)
    if config.beta > 0:
        shapes["ref_terms"] = terms
    shapes["old_terms"] = terms
    batch = _batch(mesh, shapes)
    fn = rl_loop._jit_rl_step(rl.make_rl_step(model_config, config, tx, accum_steps=cfg.optim.accum_steps),
                              shardings, mesh, batch)
    on_policy = jax.ShapeDtypeStruct((), jnp.bool_, sharding=NamedSharding(mesh, PartitionSpec()))
    info = dict(_model_info(cfg, model_config), algorithm=r.algorithm, rollouts=r.prompts_per_step * r.group_size,
                mini_batches=r.get("mini_batches", 1), accum_steps=cfg.optim.accum_steps, seq_len=length, block_size=block,
                num_timesteps=config.likelihood.num_timesteps, vectorize=config.likelihood.vectorize,
                grad_mode=config.grad_mode)
    return Job(fn, (state, batch, _key(mesh), on_policy), info)


def decode_job(cfg: ml_collections.ConfigDict, mesh, *, prompt_length: int, gen_length: int,
               temperature: float = 0.0, mbe_window: int = 0, use_cache: bool = True,
               quantize: Optional[str] = None) -> Job:
    """The decoding loop on `data.batch_size` prompts of `prompt_length` tokens, `gen_length` new ones;
    `quantize` ("int8" / "fp8"): the layers' projections stored quantized (`model.quant`)."""
    from llada_jax import decode, model, train
    from llada_jax.parallel import sharding

    model_config = backends.resolve(train.build_model_config(cfg), mesh)
    n = cfg.data.batch_size
    block = cfg.objective.block_size
    for field, v in (("prompt_length", prompt_length), ("gen_length", gen_length)):
        if v < 1:
            raise ValueError(f"{field}: expected a positive integer, found {v}")
    length = math.ceil((prompt_length + gen_length) / block) * block
    if length > model_config.max_position_embeddings:
        raise ValueError(f"prompt_length + gen_length: expected a canvas <= max_position_embeddings="
                         f"{model_config.max_position_embeddings}, found {length}")
    p_sh = sharding.param_shardings(model.abstract_params(model_config), mesh)
    params = _abstract(_unboxed_params(model_config), p_sh)
    if quantize:
        from llada_jax.model import quant

        params = quant.abstract_quantized(params, quantize)
    rows = lambda shape, dtype: jax.ShapeDtypeStruct(  # noqa: E731
        shape, dtype, sharding=sharding.logical_sharding(("act_batch",) + (None,) * (len(shape) - 1), shape, mesh))
    replicated = NamedSharding(mesh, PartitionSpec())
    scalar = lambda dtype: jax.ShapeDtypeStruct((), dtype, sharding=replicated)  # noqa: E731
    knobs = decode.Knobs(
        threshold=scalar(jnp.float32), editing_threshold=scalar(jnp.float32), temperature=scalar(jnp.float32),
        top_k=scalar(jnp.int32), top_p=scalar(jnp.float32), penalty_lambda=scalar(jnp.float32),
        max_post_steps=scalar(jnp.int32), eos_early_stop=scalar(jnp.bool_), llada20=scalar(jnp.bool_))
    settings = decode.DecodeSettings(
        block_length=block, mask_id=model_config.mask_token_id, eos_id=model_config.eos_token_id,
        pad_id=model_config.pad_token_id, greedy=temperature == 0.0, filter_top=False, use_cache=use_cache,
        mbe_window=mbe_window)  # the prefill is a chunked loop inside decode (no static length)
    fn = jax.jit(lambda *a: decode.decode(*a, config=model_config, settings=settings))
    args = (params, rows((n, length), jnp.int32), rows((n,), jnp.int32), rows((n,), jnp.int32), knobs, _key(mesh))
    info = dict(_model_info(cfg, model_config), batch=n, prompt_length=prompt_length, gen_length=gen_length,
                canvas=length, block_size=block, greedy=settings.greedy, use_cache=use_cache, mbe_window=mbe_window,
                quantize=quantize)
    return Job(fn, args, info)


def _unboxed_params(model_config):
    import flax.linen as nn

    from llada_jax import model

    return nn.meta.unbox(model.abstract_params(model_config))


def build_job(job: str, cfg: ml_collections.ConfigDict, mesh, **decode_kw) -> Job:
    if job == "sft":
        return sft_job(cfg, mesh)
    if job == "rl":
        return rl_job(cfg, mesh)
    if job == "decode":
        return decode_job(cfg, mesh, **decode_kw)
    raise ValueError(f"job: expected one of {JOBS}, found {job!r}")


# ------------------------------------------------------------------------------ compile and report
class NotFitError(RuntimeError):
    """XLA refused to compile: the program needs more HBM per chip than there is."""

    def __init__(self, message: str, required_bytes: Optional[int], available_bytes: Optional[int],
                 what: Optional[str], xla_message: str):
        super().__init__(message)
        self.required_bytes = required_bytes
        self.available_bytes = available_bytes
        self.what = what
        self.xla_message = xla_message


_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40, "P": 1 << 50}
_OOM_PATTERNS = (
    # libtpu 0.0.52: "... the total memory required for HLO temporaries (702.02G) exceeds available HBM (95.73G)"
    re.compile(r"required for (?P<what>[^()]+?) \((?P<req>[\d.]+)(?P<ru>[KMGTP]?)i?B?\) exceeds available HBM "
               r"\((?P<avail>[\d.]+)(?P<au>[KMGTP]?)i?B?\)"),
    # older compilers: "Ran out of memory in memory space hbm. Used 702.02G of 95.73G hbm."
    re.compile(r"(?P<what>memory) space hbm\. Used (?P<req>[\d.]+)(?P<ru>[KMGTP]?)i?B? of "
               r"(?P<avail>[\d.]+)(?P<au>[KMGTP]?)i?B? hbm"),
)


def is_hbm_oom(message: str) -> bool:
    return "CompileTimeHbmOom" in message or ("RESOURCE_EXHAUSTED" in message and "HBM" in message.upper())


def parse_hbm_oom(message: str) -> tuple[Optional[int], Optional[int], Optional[str]]:
    """(required bytes, available bytes, what) from XLA's out-of-HBM message (binary units)."""
    for pattern in _OOM_PATTERNS:
        m = pattern.search(message)
        if m:
            return (round(float(m["req"]) * _UNITS[m["ru"]]), round(float(m["avail"]) * _UNITS[m["au"]]),
                    m["what"].strip())
    return None, None, None


def gib(n: Optional[int]) -> Optional[float]:
    return None if n is None else round(n / GIB, 2)


def compile_job(job: Job, mesh, *, compiler_options: Optional[dict] = None):
    """`(compiled, seconds)`; raises `NotFitError` when XLA runs out of HBM."""
    import flax.linen as nn

    from llada_jax.parallel import sharding

    t0 = time.perf_counter()
    try:
        with jax.set_mesh(mesh), nn.logical_axis_rules(sharding.DEFAULT_RULES):
            compiled = job.fn.lower(*job.args).compile(compiler_options=compiler_options or None)
    except Exception as e:  # XlaRuntimeError / JaxRuntimeError: classify by message
        text = str(e)
        if not is_hbm_oom(text):
            raise
        req, avail, what = parse_hbm_oom(text)
        raise NotFitError(f"out of HBM after {time.perf_counter() - t0:.1f} s", req, avail, what,
                          text.split("\n")[0][:1000]) from None
    return compiled, time.perf_counter() - t0


def memory_report(compiled, hbm_bytes: int) -> dict:
    """Per-chip bytes of a compiled program and whether it fits in `FIT_FRACTION` of `hbm_bytes`."""
    m = compiled.memory_analysis()
    out = dict(argument_bytes=int(m.argument_size_in_bytes), output_bytes=int(m.output_size_in_bytes),
               alias_bytes=int(m.alias_size_in_bytes), temporary_bytes=int(m.temp_size_in_bytes),
               generated_code_bytes=int(m.generated_code_size_in_bytes))
    out["total_bytes"] = (out["argument_bytes"] + out["output_bytes"] - out["alias_bytes"] + out["temporary_bytes"]
                          + out["generated_code_bytes"])
    out["hbm_bytes"] = int(hbm_bytes)
    out["total_gib"], out["hbm_gib"] = gib(out["total_bytes"]), gib(hbm_bytes)
    out["fits"] = out["total_bytes"] <= FIT_FRACTION * hbm_bytes
    out["fits_rule"] = f"total <= {FIT_FRACTION:.0%} of HBM"
    return out


MESH_AXES = ("data", "fsdp", "tensor", "expert")


def mesh_section(cfg: ml_collections.ConfigDict, **overrides: Optional[int]) -> dict:
    """The config's `mesh` section with the axes given in `overrides` (None: the config's) replaced.

    An axis overridden to -1 takes the remaining chips, so the config's own -1 axes that are not
    overridden become 1 (only one axis may be -1)."""
    unknown = sorted(set(overrides) - set(MESH_AXES))
    if unknown:
        raise ValueError(f"mesh overrides: expected axes from {MESH_AXES}, found {unknown}")
    given = {k: v for k, v in overrides.items() if v is not None}
    axes = {k: int(cfg.mesh[k]) for k in MESH_AXES}
    if -1 in given.values():
        axes = {k: (1 if v == -1 else v) for k, v in axes.items()}
    axes.update(given)
    return axes


def run_mesh(cfg: ml_collections.ConfigDict, devices, **overrides: Optional[int]):
    """The mesh `launch/train.py` / `launch/rl.py` would build from `cfg` (`train.mesh_from_config`,
    its `mesh` section resolved against the device count), over `devices`, with `overrides`."""
    from llada_jax import train

    plan_cfg = ml_collections.ConfigDict({"mesh": mesh_section(cfg, **overrides)})
    return train.mesh_from_config(plan_cfg, devices=devices)


def plan(job_name: str, cfg: ml_collections.ConfigDict, topology: Topology, *, data: Optional[int] = None,
         fsdp: Optional[int] = None, tensor: Optional[int] = None, expert: Optional[int] = None,
         hbm_mib: Optional[int] = None, **decode_kw) -> dict:
    """Compile `job_name` for `topology` and return the report (one JSON-able dict).

    The mesh is the run's: the config's `mesh` section over the topology's chips (`run_mesh`);
    `data` / `fsdp` / `tensor` / `expert` override single axes. "auto" attention / MoE back ends
    resolve for the TPU and that mesh (`model.backends`), as a run on the slice would.
    On an out-of-HBM refusal the report has `fits: false`, `error` (readable: the job, what needs
    how much, the shortfall), the parsed numbers and XLA's first line; callers exit nonzero.
    `hbm_mib` compiles as if each chip had that much HBM (`xla_tpu_max_hbm_size_mib`).
    """
    devices = topology_devices(topology)
    mesh = run_mesh(cfg, devices, data=data, fsdp=fsdp, tensor=tensor, expert=expert)
    hbm = topology.hbm_bytes if hbm_mib is None else hbm_mib << 20
    options = None if hbm_mib is None else {"xla_tpu_max_hbm_size_mib": int(hbm_mib)}
    report: dict[str, Any] = dict(job=job_name, topology=topology.name, cloud_name=topology.cloud_name,
                                  chips=topology.chips, mesh={k: int(v) for k, v in mesh.shape.items()})
    job = build_job(job_name, cfg, mesh, **decode_kw)
    report.update(job.info)
    t0 = time.perf_counter()
    try:
        compiled, seconds = compile_job(job, mesh, compiler_options=options)
    except NotFitError as e:
        report.update(fits=False, hbm_bytes=hbm if e.available_bytes is None else e.available_bytes,
                      required_bytes=e.required_bytes, shortfall_bytes=None, xla_message=e.xla_message,
                      compile_s=round(time.perf_counter() - t0, 1))
        if e.required_bytes is not None and e.available_bytes is not None:
            report["shortfall_bytes"] = e.required_bytes - e.available_bytes
            report["error"] = (
                f"{job_name} does not fit on {topology.name} ({topology.chips} chips, mesh "
                f"{_mesh_text(mesh)}): {e.what} need {gib(e.required_bytes)} GiB per chip, the chip has "
                f"{gib(e.available_bytes)} GiB of HBM; short by {gib(e.required_bytes - e.available_bytes)} GiB "
                f"({e.required_bytes / e.available_bytes:.1f}x)")
        else:
            report["error"] = (f"{job_name} does not fit on {topology.name} ({topology.chips} chips, mesh "
                               f"{_mesh_text(mesh)}): XLA ran out of HBM (its message could not be parsed; "
                               f"see xla_message)")
        return report
    report.update(memory_report(compiled, hbm))
    report["compile_s"] = round(seconds, 1)
    if not report["fits"]:
        report["error"] = (f"{job_name} compiles on {topology.name} but does not leave 10% headroom: "
                           f"{report['total_gib']} GiB per chip of {report['hbm_gib']} GiB HBM "
                           f"(limit {gib(int(FIT_FRACTION * hbm))} GiB)")
    return report


def _mesh_text(mesh) -> str:
    return " ".join(f"{k}={v}" for k, v in mesh.shape.items() if v > 1) or "1 device"
