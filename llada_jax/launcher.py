"""What every launcher does before its own work: start the runtime, build the mesh and the model
config, load the checkpoint it starts from, and open the run's tokenizer.

Two entry points, by what a program starts from:

- `setup(cfg, workdir, init_from=...)`: a run config (launch/train.py, launch/rl.py,
  launch/quickstart.py): the model config and mesh come from the config, the initial parameters
  (optional) are read straight into their shards on that mesh, and the tokenizer is the config's,
  the run's, or the one the `init_from` run left beside its checkpoints.
- `load(checkpoint, ...)`: a checkpoint (launch/eval.py, launch/generate.py, launch/serve.py):
  an Orbax directory (training or converted) or a Hugging Face directory, its tokenizer, on an
  optional mesh.

Both call `start_runtime` first (the distributed runtime before anything touches a device, quiet
Orbax logging, the persistent compilation cache). The top layer: it imports what it wires
together and nothing imports it.
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple, Optional

from absl import flags, logging

from llada_jax.data.tokenizer import Tokenizer
from llada_jax.model import abstract_params, backends, hf, lora, quant
from llada_jax.model.config import DTYPES, ModelConfig
from llada_jax.parallel import hosts, sharding
from llada_jax.train import checkpoint, trainer


class Run(NamedTuple):
    """What a launcher starts with."""

    config: ModelConfig
    params: Any  # None: the run initialises its own
    tokenizer: Tokenizer
    mesh: Any  # jax.sharding.Mesh, or None for one device


def start_runtime() -> None:
    """The distributed runtime (from the hosts flags when the launcher defines them, else a
    detected cluster), Orbax's INFO logging off, and the persistent compilation cache. Calling it
    again is a no-op."""
    if "coordinator_address" in flags.FLAGS:
        hosts.initialize_from_flags()  # before anything touches a device
    logging.set_verbosity(logging.WARNING)  # Orbax logs every file operation at INFO
    trainer.enable_compilation_cache()


def is_hf_dir(path: str) -> bool:
    """A Hugging Face checkpoint directory (config.json + safetensors), as opposed to Orbax."""
    return os.path.exists(os.path.join(path, "config.json"))


def load_params(source: str, config: ModelConfig, mesh=None) -> tuple[ModelConfig, Any]:
    """Parameters from an HF or Orbax directory, checked against `config`, each leaf read straight
    into its shards on `mesh` (every process reads only its slices); one device without a mesh."""
    shardings = None if mesh is None else sharding.param_shardings(abstract_params(config), mesh)
    if is_hf_dir(source):
        return hf.load_hf_checkpoint(source, dtype=config.param_dtype, config=config, shardings=shardings)
    return checkpoint.load_params(source, config=config, shardings=shardings)


def setup(cfg, workdir: str, *, init_from: Optional[str] = None) -> Run:
    """The start of a config-driven run (train, RL, the quickstart).

    `init_from`: an HF directory, a params-only Orbax checkpoint (launch/convert.py's) or a
    trainer's checkpoints directory; without it (and without `cfg.model.hf_dir`) `params` is None.
    The model config's "auto" attention kernel and MoE back end are resolved for the mesh's
    platform (`model.backends`) and the choice printed once; the trainer stores the resolved
    config beside its checkpoints. When it is a run's checkpoints, that run's tokenizer.json and prepared data
    (`checkpoint.run_file`) fill `cfg.data.tokenizer` / `cfg.data.data_dir` where those are unset;
    an HF directory's or a converted checkpoint's own tokenizer.json fills `cfg.data.tokenizer`.
    """
    start_runtime()
    mesh = trainer.mesh_from_config(cfg)
    model_config = backends.resolve(trainer.build_model_config(cfg), mesh)  # "auto" by the mesh's platform
    if hosts.is_primary():
        print(backends.describe(model_config, mesh), flush=True)
    source = init_from or cfg.model.get("hf_dir") or None
    params = None
    if source:
        if init_from:
            adopt_run_files(cfg, init_from)
        # A LoRA run's frozen base is read straight into `lora.base_dtype` (a bf16 base never
        # exists in fp32 beside it); the model config keeps the run's param_dtype.
        settings = lora.LoraConfig.from_mapping(cfg.get("lora"))
        read_as = trainer.lora_base_config(model_config, settings) if settings.enabled else model_config
        loaded_config, params = load_params(source, read_as, mesh)
        model_config = loaded_config.replace(param_dtype=model_config.param_dtype)
    tokenizer = trainer.load_tokenizer(cfg, workdir)
    trainer.check_tokenizer(model_config, tokenizer)
    return Run(model_config, params, tokenizer, mesh)


def adopt_run_files(cfg, init_from: str) -> None:
    """Fills the unset `cfg.data.tokenizer` / `cfg.data.data_dir` from what `init_from` brings:
    an HF directory's own tokenizer.json, or the tokenizer.json and prepared data of the run that
    wrote those checkpoints (`checkpoint.run_file`)."""
    if is_hf_dir(init_from):
        hf_tok = os.path.join(init_from, "tokenizer.json")
        found = {"tokenizer": hf_tok if os.path.exists(hf_tok) else None}
    else:
        found = {"tokenizer": checkpoint.run_file(init_from, "tokenizer.json"),
                 "data_dir": checkpoint.run_file(init_from, "data")}
    with cfg.unlocked():
        for field, path in found.items():
            if path and not cfg.data.get(field):
                setattr(cfg.data, field, path)


def parse_mesh(text: str, devices=None):
    """A mesh from a `--mesh` flag: four sizes `data,fsdp,tensor,expert`, one of them may be -1."""
    try:
        d, f, t, e = (int(x) for x in text.split(","))
    except ValueError:
        raise ValueError(f"--mesh: expected four integers data,fsdp,tensor,expert, found {text!r}") from None
    return sharding.make_mesh(data=d, fsdp=f, tensor=t, expert=e, devices=devices)


def define_model_flags() -> None:
    """The flags of a checkpoint-driven program that pick how the model runs: `--dtype`,
    `--quantize`, `--quant_block` (passed on to `load` by `load_from_flags`)."""
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"],
                      "Compute dtype of activations and the KV cache (default: the checkpoint's: an HF "
                      "directory's torch_dtype, an Orbax run's training dtype).")
    flags.DEFINE_enum("quantize", None, list(quant.QUANT_KINDS),
                      "Store the layers' attention / expert / MLP projections as int8 or FP8 (e4m3fn) with "
                      "per-block scales, dequantized in the matmul (weight-only; model/quant.py).")
    flags.DEFINE_integer("quant_block", 128, "With --quantize: values per scale along the contraction dimension.")


def model_flag_values() -> dict:
    """`load`'s keywords from the flags of `define_model_flags`."""
    f = flags.FLAGS
    return dict(dtype=f.dtype, quantize=f.quantize, quant_block=f.quant_block)


def run_tokenizer(checkpoints: str) -> str:
    """The tokenizer.json of the run that wrote `checkpoints` (`checkpoint.run_file`); the error
    names every place looked at."""
    path = checkpoint.run_file(checkpoints, "tokenizer.json")
    if path is None:
        where = " or ".join(checkpoint.run_file_candidates(checkpoints, "tokenizer.json"))
        raise FileNotFoundError(f"tokenizer: expected a tokenizer.json at {where} (or pass one), found neither")
    return path


def load(path: str, tokenizer: Optional[str] = None, moe_impl: Optional[str] = None, mesh=None, *,
         dtype: Optional[str] = None, quantize: Optional[str] = None, quant_block: int = 128) -> Run:
    """The start of a checkpoint-driven program (evaluation, generation, serving).

    `path`: an Orbax directory (training or converted; the tokenizer defaults to the run's,
    `run_tokenizer`) or a Hugging Face directory (its own tokenizer.json by default; parameters in
    its stored dtype). With `mesh`, the parameters are read straight into their shards on it;
    without, whole onto one device. `moe_impl` overrides the MoE back end.

    `dtype`: the compute dtype of activations and of the KV cache (`ModelConfig.dtype`). By
    default the checkpoint's: an HF directory's `torch_dtype` (bf16 for the released models; fp32
    when it does not say), an Orbax checkpoint's stored compute dtype (the one its run trained
    with). `quantize` ("int8" or "fp8"): the layers' projections stored quantized with one scale
    per `quant_block` values of their contraction dimension (`model.quant`), in their shards."""
    start_runtime()
    if dtype is not None and dtype not in DTYPES:
        raise ValueError(f"dtype: expected one of {DTYPES}, found {dtype!r}")
    if quantize is not None and quantize not in quant.QUANT_KINDS:
        raise ValueError(f"quantize: expected one of {quant.QUANT_KINDS}, found {quantize!r}")
    if is_hf_dir(path):
        config = ModelConfig.from_hf_config(path)
        stored = hf.hf_param_dtype(path)
        config = config.replace(param_dtype=stored, dtype=stored) if stored else config
        tok_path = tokenizer or path
    else:
        config = checkpoint.read_config(path)
        tok_path = tokenizer or run_tokenizer(path)
    config, params = load_params(path, config, mesh)
    if dtype:
        config = config.replace(dtype=dtype)
    if moe_impl:
        config = config.replace(moe_impl=moe_impl)
    if quantize:
        shardings = None if mesh is None else sharding.param_shardings(abstract_params(config), mesh)
        params = quant.quantize_params(params, quantize, quant_block, shardings=shardings)
    return Run(config, params, Tokenizer.from_file(tok_path), mesh)
