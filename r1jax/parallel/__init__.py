"""Parallelism: meshes and multi-host start-up (`mesh`) and logical-axis rules and shardings (`rules`).

Nothing here imports the model: the rules map logical axis names to mesh axes, and the model names its
tensors' axes. Expert-parallel dispatch lives with the MoE in `r1jax.model`; memory planning is the
`r1jax plan` command (`r1jax.plan`). Nothing here branches on the number of devices: shardings come from
the mesh and the rules table, and the same code runs on one CPU device and on a pod.
"""
