"""One process of the multi-host loading test (tests/parallel/test_hosts.py): a sharded HF load on the
global mesh, each process saving the shards it holds.

  python tests/parallel/multihost_load.py HF_DIR OUT_DIR MESH [--coordinator_address=... --num_processes=N --process_id=I]

MESH is data,fsdp,tensor,expert. Writes OUT_DIR/process_<i>.npz: for every shard this process
holds, `<leaf path>|<start:stop,...>` -> the shard's values.
"""

import os
import sys

from absl import app

from llada_jax import model
from llada_jax.model import hf
from llada_jax.parallel import hosts, sharding

hosts.define_flags()


def main(argv):
    hosts.initialize_from_flags()
    import jax
    import numpy as np

    hf_dir, out_dir, mesh_arg = argv[1], argv[2], argv[3]
    d, f, t, e = (int(x) for x in mesh_arg.split(","))
    mesh = sharding.make_mesh(data=d, fsdp=f, tensor=t, expert=e)
    config = hf.ModelConfig.from_hf_config(hf_dir)
    shardings = sharding.param_shardings(model.abstract_params(config), mesh)
    _, params = hf.load_hf_checkpoint(hf_dir, config=config, shardings=shardings)
    out = {}
    for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
        name = "/".join(p.key for p in path)
        for shard in leaf.addressable_shards:
            index = ",".join(f"{s.start or 0}:{n if s.stop is None else s.stop}" for s, n in zip(shard.index, leaf.shape))
            out[f"{name}|{index}"] = np.asarray(shard.data)
    os.makedirs(out_dir, exist_ok=True)
    np.savez(os.path.join(out_dir, f"process_{jax.process_index()}.npz"), **out)
    print(f"process {jax.process_index()}: {len(out)} shards", file=sys.stderr)


if __name__ == "__main__":
    app.run(main)
