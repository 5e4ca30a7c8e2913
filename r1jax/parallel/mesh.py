"""Device meshes from `MeshConfig`, the checks that a model and batch fit them, and multi-host start-up.

A mesh always has the four axes `data`, `fsdp`, `expert`, `tensor` (size-1 axes included), so the
rules and the code never ask which axes exist. Across slices (TPU multi-slice) or nodes (GPU, when
`dcn_*` factors are set) the mesh is a hybrid one: the DCN factors tile the slices, the in-slice
factors tile each slice, so only data/fsdp/expert traffic crosses the slower network.

Multi-host: every process runs the same program. `initialize_distributed()` must run before anything
touches a device; it reads the environment the launchers in `launch/` set up (see `settings_from_env`).
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
from collections.abc import Mapping

import jax
from jax.sharding import AbstractMesh, AxisType, Mesh

from r1jax.config import MESH_AXES, MeshConfig, ModelConfig, TrainConfig
from r1jax.errors import ConfigError
from r1jax.parallel.rules import axes_of

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- multi-host start-up


@dataclasses.dataclass(frozen=True)
class DistributedSettings:
    """How this process joins the job. `coordinator` etc. None: jax.distributed detects them."""

    method: str  # "explicit" | "slurm" | "tpu" | "auto"
    coordinator: str | None = None
    num_processes: int | None = None
    process_id: int | None = None
    local_device_ids: tuple[int, ...] | None = None


def _int(env: Mapping, key: str, low: int = 0) -> int:
    try:
        v = int(env[key])
    except ValueError:
        raise ConfigError(f"{key}: expected an integer, got {env[key]!r}") from None
    if v < low:
        raise ConfigError(f"{key}: must be >= {low}, got {v}")
    return v


def settings_from_env(env: Mapping[str, str] = os.environ) -> DistributedSettings | None:
    """Which multi-process job (if any) this process belongs to, from its environment:

    - explicit: `R1JAX_COORDINATOR_ADDRESS` (host:port of process 0), `R1JAX_NUM_PROCESSES`,
      `R1JAX_PROCESS_ID`, optional `R1JAX_LOCAL_DEVICE_IDS` (launch/local.sh, launch/k8s GPU,
      launch/slurm_gpu.sbatch set these);
    - `R1JAX_DISTRIBUTED=auto`: let jax.distributed detect the cluster (Cloud TPU VM pods via the
      metadata server, GKE TPU via TPU_WORKER_HOSTNAMES, SLURM, Open MPI);
    - a SLURM step with more than one task, or a GKE TPU pod with several workers: detected.
    None: a single process.
    """
    if "R1JAX_COORDINATOR_ADDRESS" in env:
        address = env["R1JAX_COORDINATOR_ADDRESS"]
        host, _, port = address.rpartition(":")
        if not host or not port.isdigit():
            raise ConfigError(f"R1JAX_COORDINATOR_ADDRESS: expected host:port, got {address!r}")
        for key in ("R1JAX_NUM_PROCESSES", "R1JAX_PROCESS_ID"):
            if key not in env:
                raise ConfigError(f"{key}: required with R1JAX_COORDINATOR_ADDRESS")
        n = _int(env, "R1JAX_NUM_PROCESSES", 1)
        i = _int(env, "R1JAX_PROCESS_ID")
        if i >= n:
            raise ConfigError(f"R1JAX_PROCESS_ID: must be < R1JAX_NUM_PROCESSES={n}, got {i}")
        ids = None
        if env.get("R1JAX_LOCAL_DEVICE_IDS"):
            try:
                ids = tuple(int(x) for x in env["R1JAX_LOCAL_DEVICE_IDS"].split(","))
            except ValueError:
                raise ConfigError(f"R1JAX_LOCAL_DEVICE_IDS: expected comma-separated integers, got "
                                  f"{env['R1JAX_LOCAL_DEVICE_IDS']!r}") from None
        return DistributedSettings("explicit", address, n, i, ids)
    mode = env.get("R1JAX_DISTRIBUTED", "")
    if mode not in ("", "auto", "off"):
        raise ConfigError(f"R1JAX_DISTRIBUTED: expected 'auto' or 'off', got {mode!r}")
    if mode == "off":
        return None
    if mode == "auto":
        return DistributedSettings("auto")
    if "SLURM_STEP_ID" in env and "SLURM_NTASKS" in env and _int(env, "SLURM_NTASKS", 1) > 1:
        return DistributedSettings("slurm")  # an srun step of several tasks
    if len([h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h]) > 1:
        return DistributedSettings("tpu")
    return None


def initialize_distributed(env: Mapping[str, str] = os.environ) -> DistributedSettings | None:
    """Join the multi-process job described by the environment (no-op for a single process, or when
    already joined). CPU collectives across processes go through gloo."""
    settings = settings_from_env(env)
    if settings is None or jax.distributed.is_initialized():
        return settings
    # Cross-process collectives on CPU devices need gloo (accelerators use NCCL/ICI regardless).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    log.info("jax.distributed.initialize via %s (process %s of %s, coordinator %s)", settings.method,
             settings.process_id, settings.num_processes, settings.coordinator)
    try:
        jax.distributed.initialize(
            coordinator_address=settings.coordinator, num_processes=settings.num_processes,
            process_id=settings.process_id,
            local_device_ids=list(settings.local_device_ids) if settings.local_device_ids else None)
    except ValueError as e:  # auto-detection found no cluster: jax names the missing argument
        key = "R1JAX_COORDINATOR_ADDRESS" if settings.method == "explicit" else "R1JAX_DISTRIBUTED"
        raise ConfigError(f"{key}: jax.distributed could not join the {settings.method} job: {e}") from None
    return settings


# --------------------------------------------------------------------------- meshes


def _prefixed(fn, *args):
    try:
        return fn(*args)
    except ConfigError as e:
        raise ConfigError(f"mesh.{e}") from None


def num_slices(devices) -> int:
    """Granules the DCN factors tile: TPU slices when devices carry `slice_index`, else processes."""
    if hasattr(devices[0], "slice_index"):
        return len({d.slice_index for d in devices})
    return len({d.process_index for d in devices})


def _uses_dcn(cfg: MeshConfig) -> bool:
    return any(getattr(cfg, k) != 1 for k in ("dcn_data", "dcn_fsdp", "dcn_expert"))


def mesh_shape(cfg: MeshConfig, num_devices: int, slices: int = 1) -> dict[str, int]:
    """{axis: size} for this many devices (and slices); errors name the `mesh.*` key."""
    return _prefixed(cfg.shape, num_devices, slices if _uses_dcn(cfg) else 1)


def _tpu_grid(shape: list[int], devices):
    """TPU devices laid out as `shape` (axes outermost first) on the chips' torus.

    Each axis is mapped onto whole physical axes (e.g. 16 = 4x4 of a 4x4x4 v5p slice) when such an
    assignment exists: every collective then runs on complete rings. When none exists (fsdp=8 on
    4x4x4: 8 is no product of the physical 4s) a physical axis is split between mesh axes, as
    `jax.make_mesh` only does for v5e; the step runs, with less bandwidth on the split axes."""
    from jax.experimental import mesh_utils

    try:
        return mesh_utils.create_device_mesh(shape, devices)
    except NotImplementedError:
        log.info("mesh %s does not map onto whole axes of the TPU torus: splitting physical axes", shape)
        return mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)


def build_mesh(cfg: MeshConfig, devices=None) -> Mesh:
    """A `Mesh` over `devices` (default: all) with the four axes, auto-sharded (GSPMD) axes.

    `devices` may be compile-only devices of a TPU topology that is not attached
    (`jax.experimental.topologies`), which is how `r1jax plan --topology` compiles for a pod."""
    devices = list(jax.devices() if devices is None else devices)
    types = (AxisType.Auto,) * len(MESH_AXES)
    tpu = devices[0].platform == "tpu"
    if not _uses_dcn(cfg):
        shape = mesh_shape(cfg, len(devices))
        sizes = tuple(shape[a] for a in MESH_AXES)
        if tpu:
            slices = len({getattr(d, "slice_index", 0) for d in devices})
            if slices > 1:  # jax.make_mesh refuses these too: a mesh axis would silently cross the DCN
                raise ConfigError(f"mesh.dcn_data: the devices are {slices} TPU slices; set the cross-slice "
                                  f"factors (e.g. mesh.dcn_data={slices}) so only those axes cross slices")
            return Mesh(_tpu_grid(list(sizes), devices), MESH_AXES, axis_types=types)
        return jax.make_mesh(sizes, MESH_AXES, axis_types=types, devices=devices)
    from jax.experimental import mesh_utils

    slices = num_slices(devices)
    ici, dcn = _prefixed(cfg.ici_dcn, len(devices), slices)
    grid = mesh_utils.create_hybrid_device_mesh(
        [ici[a] for a in MESH_AXES], [dcn[a] for a in MESH_AXES], devices,
        process_is_granule=not hasattr(devices[0], "slice_index"), allow_split_physical_axes=tpu)
    return Mesh(grid, MESH_AXES, axis_types=types)


def abstract_mesh(cfg: MeshConfig, num_devices: int, slices: int = 1) -> AbstractMesh:
    """The mesh's shape and names without devices (planning and lowering for hardware not here)."""
    shape = mesh_shape(cfg, num_devices, slices)
    return AbstractMesh(tuple(shape[a] for a in MESH_AXES), MESH_AXES, axis_types=(AxisType.Auto,) * len(MESH_AXES))


def parse_mesh_spec(spec: str) -> list[str]:
    """'data=2,expert=4' -> ['mesh.data=2', 'mesh.expert=4'] (overrides for a config)."""
    out = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        key, sep, value = part.partition("=")
        if not sep or not key.strip() or not value.strip():
            raise ConfigError(f"--mesh: expected axis=size pairs like data=2,expert=4, got {part!r}")
        out.append(f"mesh.{key.strip()}={value.strip()}")
    return out


# --------------------------------------------------------------------------- what must divide


def check_model(model: ModelConfig, shape: dict[str, int]) -> None:
    """Splits the model cannot do without: experts over `expert`, heads over `tensor`."""
    if getattr(model, "n_routed_experts", 0) and model.n_routed_experts % shape["expert"]:
        raise ConfigError(f"mesh.expert: n_routed_experts={model.n_routed_experts} is not divisible by the "
                          f"expert axis ({shape['expert']})")
    if model.num_attention_heads % shape["tensor"]:
        raise ConfigError(f"mesh.tensor: num_attention_heads={model.num_attention_heads} is not divisible by "
                          f"the tensor axis ({shape['tensor']})")


def check_batch(rows: int, shape: dict[str, int], key: str, rules=None) -> None:
    """The rows of one (micro-)batch must split evenly over the batch axes (data×fsdp×expert)."""
    axes = axes_of("batch", rules)
    split = math.prod(shape[a] for a in axes)
    if rows % split:
        names = "×".join(f"{a}={shape[a]}" for a in axes)
        raise ConfigError(f"{key}: {rows} rows do not split over the batch axes {names} ({split})")


def check_train(cfg: TrainConfig, model: ModelConfig, shape: dict[str, int]) -> None:
    """Everything about a training run's mesh that can be wrong, before anything is compiled."""
    check_model(model, shape)
    accum = cfg.optimizer.grad_accum_steps
    key = "data.batch_size" if accum == 1 else "data.batch_size / optimizer.grad_accum_steps"
    check_batch(cfg.data.batch_size // accum, shape, key, cfg.mesh)
    if cfg.eval_data is not None:
        check_batch(cfg.eval_data.batch_size, shape, "eval_data.batch_size", cfg.mesh)
    if cfg.data.batch_size % jax.process_count():
        raise ConfigError(f"data.batch_size: {cfg.data.batch_size} rows do not split over "
                          f"{jax.process_count()} processes")
