"""Parallelism without a model: the logical-axis -> mesh rule table (`sharding`) and the
multi-host runtime (`hosts`: initialise, global batches from host slices, barriers, "am I the
primary") and preemption (`preemption`: SIGTERM latched into a stop every process agrees on).

Implements the mesh conventions of SCALE.md (axes `data, fsdp, tensor, expert`). The bottom
layer of the package: it imports nothing from llada_jax, so every other capability may use it.
"""
