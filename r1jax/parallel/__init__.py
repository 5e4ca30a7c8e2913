"""Parallelism: meshes and multi-host start-up (`mesh`), logical-axis rules and shardings (`rules`),
expert-parallel dispatch (`experts`), and memory planning (`plan`).

Nothing here branches on the number of devices: shardings come from the mesh and the rules table, and
the same code runs on one CPU device and on a pod.
"""
