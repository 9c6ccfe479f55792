"""LoRA fine-tuning (train.run_training with `lora.rank > 0`): only adapters train, the base stays
bit-identical, checkpoints hold the adapters and the base's path, and a resumed run is exact."""

import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from helpers import load_config
from llada_jax import model, train
from llada_jax.model import lora
from llada_jax.train import checkpoint


def _cfg(data_dir, **overrides):
    small = {"data.num_train": 2000, "data.num_test": 50, "data.batch_size": 8, "data.data_dir": data_dir,
             "total_steps": 20, "checkpoint_every": 10, "log_every": 1, "mesh.data": 4, "mesh.fsdp": 2,
             "lora.rank": 4, "lora.alpha": 8.0, "lora.dropout": 0.25, "optim.lr": 1e-2, "optim.warmup_frac": 0.0,
             "optim.expert_bias_rate": 0.0}  # the quickstart's SFT balances experts; LoRA freezes the bias
    return load_config("quickstart.py", **{**small, **overrides})


def _rows(workdir):
    return [{k: v for k, v in r.items() if k not in ("tokens_per_s", "flops_per_s_per_device", "mfu")}
            for r in train.read_metrics(workdir)]


def _run(cfg, workdir, base, base_from):
    model_config = train.build_model_config(cfg)
    tokenizer = train.load_tokenizer(cfg, str(workdir))
    obj = train.build_objective(cfg, model_config, extra_special_ids=tokenizer.special_ids)
    it = train.train_iterator(cfg, str(workdir), tokenizer)
    return train.run_training(cfg, str(workdir), model_config, obj, it, init_params=base, progress=False,
                              base_from=base_from)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The quickstart's dataset at `_cfg`'s sizes, generated once for the LoRA runs below."""
    d = str(tmp_path_factory.mktemp("data"))
    train.open_examples(_cfg(d), d, "train")
    return d


def test_lora_sft_freezes_the_base_saves_adapters_only_and_resumes_exactly(tmp_path, data_dir):
    cfg = _cfg(data_dir)
    model_config = train.build_model_config(cfg)
    base = jax.jit(model.init_params, static_argnums=0)(model_config, jax.random.key(7))
    base_host = jax.device_get(base)
    checkpoint.save_params(str(tmp_path / "base"), model_config, base)
    workdir = tmp_path / "run"
    state = _run(cfg, workdir, base, str(tmp_path / "base"))
    first = _rows(workdir)
    assert [r["step"] for r in first] == list(range(1, 21))

    # the train state is the adapters and their optimizer state, nothing of the base
    names = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(state.params)[0]}
    assert names == {f"{t}_lora_{x}" for t in lora.TARGETS for x in "ab"}
    assert lora.count(state.params) < 0.2 * lora.count(base_host)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(base), base_host)
    trained = jax.device_get(state.params)
    assert all(np.any(b != 0) for p, b in jax.tree_util.tree_flatten_with_path(trained)[0] if str(p[-1].key).endswith("_b"))

    # the checkpoint stores the adapters and the base's path; loading it merges them into that base,
    # and every leaf that no adapter targets is the base's bit for bit
    ckpts = str(workdir / "checkpoints")
    stored = checkpoint.Checkpointer(ckpts)
    _, extra = checkpoint._stored_extra(stored, ckpts, 20)
    stored.close()
    assert extra["lora"] == {"rank": 4, "alpha": 8.0, "targets": list(lora.TARGETS), "dropout": 0.25,
                             "base_dtype": "", "base": str(tmp_path / "base")}
    meta = ocp.StandardCheckpointer().metadata(str(workdir / "checkpoints" / "20" / "state")).item_metadata
    stored_names = {str(p[-1].key) for p, _ in jax.tree_util.tree_flatten_with_path(meta.tree)[0]}
    assert stored_names - names == {"step", "count"}, stored_names  # adapters, Adam moments, counters
    _, merged = checkpoint.load_params(ckpts)
    want = lora.merge(base_host, trained, lora.LoraConfig(rank=4, alpha=8.0))
    for (path, got), w, b in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(merged))[0],
                                 jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(base_host)):
        np.testing.assert_array_equal(got, w)
        if str(path[-1].key) not in lora.TARGETS:
            np.testing.assert_array_equal(got, b)
        else:
            assert np.any(got != b), path

    # the adapters learned: the objective on a fixed batch and noise key is lower with them merged
    tokenizer = train.load_tokenizer(cfg, str(workdir))
    obj = train.build_objective(cfg, model_config, extra_special_ids=tokenizer.special_ids)
    batch = next(train.train_iterator(cfg, str(workdir), tokenizer))
    batch = {k: batch[k] for k in ("tokens", "loss_mask")} | {"example_ids": np.arange(8, dtype=np.int32)}
    loss = jax.jit(lambda p: train.objectives.loss_fn(p, model_config, obj, batch, jax.random.key(3))[0])
    assert float(loss(merged)) < 0.95 * float(loss(base_host)), (float(loss(merged)), float(loss(base_host)))

    # resume: drop the last checkpoint and rerun; the same rows and the same adapters bit for bit
    shutil.rmtree(workdir / "checkpoints" / "20")
    resumed = _run(cfg, workdir, base, str(tmp_path / "base"))
    assert _rows(workdir) == first
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(resumed.params), trained)

    # a rerun on another base, or with other settings, is refused naming the field
    with pytest.raises(ValueError, match="lora base: .* was trained on"):
        _run(cfg, workdir, base, str(tmp_path / "other"))
    with pytest.raises(ValueError, match=r"lora.rank: 4 adapts a base model, expected one"):
        _run(cfg, tmp_path / "nobase", None, None)


def test_adapter_checkpoint_exports_merged_to_hf_and_loads_merged_for_serving(tmp_path):
    """launch/convert.py --to_hf on a LoRA checkpoint writes the base with the adapters merged: the
    HF directory's logits equal the adapted model's (fp32, 1e-5 of the largest logit); the loader
    of generate / eval / serve (`launcher.load`) reads the same merged params bit for bit."""
    import subprocess
    import sys

    import jax.numpy as jnp

    from helpers import ROOT, assert_close_to_scale, xla_flags
    from llada_jax import launcher
    from llada_jax.model import hf

    config = model.get_config("tiny", moe_impl="dense")
    base = jax.device_get(jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(0)))
    checkpoint.save_params(str(tmp_path / "base"), config, base)
    settings = lora.LoraConfig(rank=4, alpha=8.0, targets=("q_proj", "o_proj", "wi_gate", "wo", "down_proj"))
    adapters = lora.init_adapters(base, settings, jax.random.key(1))
    leaves, treedef = jax.tree_util.tree_flatten(adapters)
    keys = jax.random.split(jax.random.key(2), len(leaves))
    adapters = jax.tree_util.tree_unflatten(treedef, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])
    ckpt = checkpoint.Checkpointer(str(tmp_path / "run" / "checkpoints"))
    ckpt.save(5, train.TrainState(step=jnp.int32(5), params=adapters, opt_state=()), force=True,
              extra={"model_config": checkpoint.config_to_json(config),
                     "lora": dict(settings.to_json(), base=str(tmp_path / "base"))})
    ckpt.close()

    env = dict(os.environ, XLA_FLAGS=xla_flags(1), JAX_PLATFORMS="cpu")
    out = subprocess.run([sys.executable, os.path.join(ROOT, "launch", "convert.py"), "--to_hf",
                          f"--orbax_dir={tmp_path / 'run' / 'checkpoints'}", f"--hf_dir={tmp_path / 'hf'}"],
                         env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout + out.stderr
    _, exported = hf.load_hf_checkpoint(str(tmp_path / "hf"), dtype="float32", config=config)
    tokens = jax.random.randint(jax.random.key(3), (2, 20), 0, config.vocab_size)
    fwd = jax.jit(model.forward, static_argnums=1)
    adapted = fwd(lora.combine(base, lora.prepare(adapters, settings)), config, tokens)
    assert float(jnp.max(jnp.abs(adapted - fwd(base, config, tokens)))) > 1e-2  # the adapters matter
    assert_close_to_scale(fwd(exported, config, tokens), adapted, 1e-5)

    # launcher.load (generate, eval, serve, the engine) reads params through launcher.load_params
    loaded_config = checkpoint.read_config(str(tmp_path / "run" / "checkpoints"))
    _, served = launcher.load_params(str(tmp_path / "run" / "checkpoints"), loaded_config)
    jax.tree_util.tree_map(np.testing.assert_array_equal, jax.device_get(served), jax.device_get(exported))


def test_aot_plans_the_lora_sft_step():
    """launch/compile.py's sft job with `lora.rank > 0` is the trainer's LoRA step: the state holds
    the adapters alone (their count reported), the base is a fourth, frozen argument, and it lowers
    on a mesh (the TPU compile itself is tests/test_aot.py's, with libtpu)."""
    from llada_jax import aot
    from llada_jax.parallel import sharding

    cfg = load_config("quickstart.py", **{"lora.rank": 4, "data.batch_size": 8, "optim.expert_bias_rate": 0.0})
    mesh = sharding.make_mesh(data=4, fsdp=2)
    job = aot.sft_job(cfg, mesh)
    state, _, _, base = job.args
    assert job.info["lora_rank"] == 4 and job.info["trainable_params"] == lora.count(state.params)
    assert lora.count(base) == train.build_model_config(cfg).param_counts()["total"]
    with jax.set_mesh(mesh):
        job.fn.lower(*job.args)


def test_lora_base_dtype_bfloat16_trains_fp32_adapters_on_a_base_cast_once(tmp_path, data_dir):
    """`lora.base_dtype=bfloat16`: the frozen base is cast once at the start (expert_bias stays fp32),
    the adapters and every optimizer moment are fp32, the loss goes down, and the model the checkpoint
    loads is the bf16-rounded base bit for bit wherever no adapter sits, with the adapters merged in
    fp32 on that rounded base elsewhere. A resume under another base_dtype is refused."""
    import flax.linen as nn
    import jax.numpy as jnp

    small = {"lora.dropout": 0.0, "total_steps": 6, "checkpoint_every": 3, "mesh.data": -1, "mesh.fsdp": 1}
    cfg = _cfg(data_dir, **small, **{"lora.base_dtype": "bfloat16"})
    model_config = train.build_model_config(cfg)
    base = jax.device_get(jax.jit(model.init_params, static_argnums=0)(model_config, jax.random.key(7)))
    checkpoint.save_params(str(tmp_path / "base"), model_config, base)
    # what the run trains on: each leaf rounded to its dtype under param_dtype=bfloat16 (the router
    # and expert_bias, which the model keeps in fp32, unchanged)
    dtypes = jax.tree_util.tree_map(lambda a: a.dtype, nn.meta.unbox(
        model.abstract_params(model_config.replace(param_dtype="bfloat16"))))
    assert {jnp.dtype(d) for d in jax.tree_util.tree_leaves(dtypes)} == {jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float32)}
    rounded = jax.tree_util.tree_map(lambda x, d: x.astype(d).astype(x.dtype), base, dtypes)

    frozen = train.lora_setup(cfg, model_config, train.mesh_from_config(cfg), base, str(tmp_path / "base"))
    for got, want, d in zip(*(jax.tree_util.tree_leaves(t) for t in (jax.device_get(frozen.base), rounded, dtypes))):
        assert got.dtype == d
        np.testing.assert_array_equal(got.astype(jnp.float32), want)
    del frozen

    workdir = tmp_path / "run"
    state = _run(cfg, workdir, base, str(tmp_path / "base"))
    rows = _rows(workdir)
    assert [r["step"] for r in rows] == list(range(1, 7))
    floats = [x for x in jax.tree_util.tree_leaves((state.params, state.opt_state)) if jnp.issubdtype(x.dtype, jnp.floating)]
    assert floats and all(x.dtype == jnp.float32 for x in floats)

    trained = jax.device_get(state.params)
    _, merged = checkpoint.load_params(str(workdir / "checkpoints"))
    want = lora.merge(rounded, trained, lora.LoraConfig.from_mapping(cfg.lora))
    for (path, got), w, r in zip(jax.tree_util.tree_flatten_with_path(jax.device_get(merged))[0],
                                 jax.tree_util.tree_leaves(want), jax.tree_util.tree_leaves(rounded)):
        assert got.dtype == jnp.float32, path
        np.testing.assert_array_equal(got, w)
        if str(path[-1].key) not in lora.TARGETS:
            np.testing.assert_array_equal(got, r)

    # the adapters learned: the objective on a fixed batch and noise key is lower than the base's
    tokenizer = train.load_tokenizer(cfg, str(workdir))
    obj = train.build_objective(cfg, model_config, extra_special_ids=tokenizer.special_ids)
    batch = next(train.train_iterator(cfg, str(workdir), tokenizer))
    batch = {k: batch[k] for k in ("tokens", "loss_mask")} | {"example_ids": np.arange(8, dtype=np.int32)}
    loss = jax.jit(lambda p: train.objectives.loss_fn(p, model_config, obj, batch, jax.random.key(3))[0])
    assert float(loss(merged)) < float(loss(rounded)), (float(loss(merged)), float(loss(rounded)))

    with pytest.raises(ValueError, match=r"lora.base_dtype: .* was trained with 'bfloat16', found ''"):
        _run(_cfg(data_dir, **small), workdir, base, str(tmp_path / "base"))
    with pytest.raises(ValueError, match=r"lora.base_dtype: expected one of \['', 'bfloat16', 'float32'\]"):
        lora.LoraConfig(rank=4, base_dtype="float16")


def test_base_is_read_straight_into_base_dtype(tmp_path):
    """launcher.setup reads a LoRA run's base with `param_dtype = lora.base_dtype`
    (`train.lora_base_config`): from an fp32 checkpoint each leaf arrives as its bf16 rounding
    (router and expert_bias fp32), no fp32 copy of the model in between."""
    from llada_jax import launcher

    config = model.get_config("tiny")
    base = jax.device_get(jax.jit(model.init_params, static_argnums=0)(config, jax.random.key(0)))
    checkpoint.save_params(str(tmp_path / "base"), config, base)
    read_as = train.lora_base_config(config, lora.LoraConfig(rank=4, base_dtype="bfloat16"))
    assert read_as.param_dtype == "bfloat16" and train.lora_base_config(config, lora.LoraConfig(rank=4)) is config
    _, loaded = launcher.load_params(str(tmp_path / "base"), read_as)
    assert {str(x.dtype) for x in jax.tree_util.tree_leaves(loaded)} == {"bfloat16", "float32"}
    for got, want in zip(jax.tree_util.tree_leaves(jax.device_get(loaded)), jax.tree_util.tree_leaves(base)):
        np.testing.assert_array_equal(got, want.astype(got.dtype))
