"""The device mesh: `--mesh` parsing, multi-host start-up, mesh construction.

The mesh always has four named axes, `("data", "fsdp", "tensor", "context")`:

- `DxT` (two numbers) is `1 x D x T`: the first number shards parameters, optimizer state and
  the batch (FSDP), the second splits heads / MLP width / vocabulary (tensor parallelism);
- `DxFxT` (three numbers) adds a pure data-parallel axis in front: the batch is split
  `D*F` ways, parameters and optimizer state `F` ways (and `T` ways for tensor parallelism);
- `DxFxTxC` (four numbers) adds context parallelism: every sequence is split `C` ways along
  its length (CCA exchanges core tokens and a halo, `cca_jax.context`);
- the named form `AXIS=N,...` (e.g. `context=8`, `fsdp=2,context=4`) gives any of the four
  axes by name; an axis not named has size 1.

One size may be `-1`: it is inferred from the device count. A product that does not equal
the device count is an error. `train/sharding.py` maps logical axis names onto these axes.
"""
from __future__ import annotations

import math
import os

MESH_AXES = ("data", "fsdp", "tensor", "context")

# Environment variables that mean "this process is one of several" (multi-host).
_COORDINATOR_VARS = ("JAX_COORDINATOR_ADDRESS",)
_PROCESS_COUNT_VARS = ("JAX_NUM_PROCESSES", "JAX_PROCESS_COUNT")
_CLUSTER_VARS = ("SLURM_NTASKS", "OMPI_COMM_WORLD_SIZE")
_distributed_started = False


def _parse_sizes(spec: str) -> list[int]:
    """The four sizes (data, fsdp, tensor, context) that `spec` writes, -1 kept."""
    text = spec.strip().lower()
    if "=" in text:
        sizes = dict.fromkeys(MESH_AXES, 1)
        seen = set()
        for item in text.split(","):
            name, _, value = item.partition("=")
            name = name.strip()
            if name not in sizes or name in seen:
                raise ValueError(f"--mesh: {name!r} is not a mesh axis or is given twice; the "
                                 f"axes are {', '.join(MESH_AXES)} (e.g. fsdp=2,context=4), "
                                 f"got {spec!r}")
            seen.add(name)
            try:
                sizes[name] = int(value)
            except ValueError:
                raise ValueError(f"--mesh: the size of {name} must be an integer, got "
                                 f"{spec!r}") from None
        return list(sizes.values())
    parts = text.split("x")
    if len(parts) not in (2, 3, 4):
        raise ValueError(f"--mesh must look like DxT, DxFxT, DxFxTxC or AXIS=N,... (e.g. 8x1, "
                         f"4x2, -1x1, 2x2x2, 1x1x1x8, context=8), got {spec!r}")
    try:
        sizes = [int(p) for p in parts]
    except ValueError:
        raise ValueError(f"--mesh must be integers separated by 'x' (e.g. 8x1, 4x2, -1x1), "
                         f"got {spec!r}") from None
    if len(sizes) == 2:
        sizes = [1] + sizes
    return sizes + [1] * (4 - len(sizes))


def mesh_shape(spec: str) -> list[int]:
    """The four sizes (data, fsdp, tensor, context) `spec` writes, one of them possibly -1 (no
    devices needed to read it).

    Raises ValueError naming the problem: malformed spec, or zero or negative sizes other than
    one `-1`.
    """
    sizes = _parse_sizes(spec)
    if sizes.count(-1) > 1:
        raise ValueError(f"--mesh may infer at most one axis with -1, got {spec!r}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ValueError(f"--mesh sizes must be positive (or one -1 to infer), got {spec!r}")
    return sizes


def parse_mesh(spec: str, device_count: int) -> tuple[int, int, int, int]:
    """(data, fsdp, tensor, context) sizes for `spec` on `device_count` devices.

    Raises ValueError naming the problem: malformed spec, zero or negative sizes other than
    one `-1`, or a product that does not match the device count.
    """
    sizes = mesh_shape(spec)
    if -1 in sizes:
        known = math.prod(s for s in sizes if s != -1)
        if device_count % known:
            raise ValueError(f"--mesh {spec}: cannot infer the -1 axis, {device_count} devices "
                             f"are not a multiple of {known}")
        sizes[sizes.index(-1)] = device_count // known
    if math.prod(sizes) != device_count:
        raise ValueError(f"--mesh {spec} needs {math.prod(sizes)} devices, but "
                         f"{device_count} are available ({_device_hint()}); use a mesh whose "
                         f"product is {device_count}, or -1 for one axis")
    return tuple(sizes)


def _device_hint() -> str:
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return "XLA_FLAGS sets the CPU device count"
    return ("on a CPU set XLA_FLAGS=--xla_force_host_platform_device_count=N before "
            "starting Python for N devices")


def _four(sizes) -> tuple[int, int, int, int]:
    """(data, fsdp, tensor, context): three sizes mean context 1."""
    sizes = tuple(int(x) for x in sizes)
    if len(sizes) not in (3, 4):
        raise ValueError(f"mesh sizes must be (data, fsdp, tensor[, context]), got {sizes}")
    return sizes + (1,) * (4 - len(sizes))


def describe_mesh(sizes) -> str:
    data, fsdp, tensor, context = _four(sizes)
    text = (f"mesh data={data} x fsdp={fsdp} x tensor={tensor}"
            + (f" x context={context}" if context > 1 else "")
            + f": batch split {data * fsdp} ways, parameters and optimizer state {fsdp} ways "
            f"(FSDP) and {tensor} ways over heads / MLP / vocabulary")
    if context > 1:
        text += f", every sequence split {context} ways along its length"
    return text


def make_mesh(sizes):
    """A `jax.sharding.Mesh` with axes MESH_AXES of the given sizes ((data, fsdp, tensor) or
    (data, fsdp, tensor, context); automatic axis types: the SPMD partitioner propagates
    shardings from jit's in/out shardings)."""
    import jax

    sizes = _four(sizes)
    axis_type = getattr(jax.sharding, "AxisType", None)
    if axis_type is not None:
        return jax.make_mesh(sizes, MESH_AXES, axis_types=(axis_type.Auto,) * len(MESH_AXES))
    return jax.make_mesh(sizes, MESH_AXES)


def maybe_initialize_distributed() -> bool:
    """Call `jax.distributed.initialize()` when the environment says this is a multi-process
    run; return True if it did. Must run before anything touches the devices.

    Triggers: `JAX_COORDINATOR_ADDRESS` (with `JAX_NUM_PROCESSES` or `JAX_PROCESS_COUNT`, and
    `JAX_PROCESS_ID`, passed on when set), or a SLURM / Open MPI job with more than one task
    (jax detects coordinator, process count and id itself). Once per process: a later call
    (another job in the same process) finds it done and returns False.
    """
    import jax

    global _distributed_started
    if _distributed_started:
        return False
    coordinator = next((os.environ[v] for v in _COORDINATOR_VARS if os.environ.get(v)), None)
    count = next((int(os.environ[v]) for v in _PROCESS_COUNT_VARS if os.environ.get(v)), None)
    cluster = any(int(os.environ.get(v, "1") or 1) > 1 for v in _CLUSTER_VARS)
    if coordinator is None and not cluster:
        return False
    kwargs = {}
    if coordinator is not None:
        kwargs["coordinator_address"] = coordinator
        if count is not None:
            kwargs["num_processes"] = count
        if os.environ.get("JAX_PROCESS_ID"):
            kwargs["process_id"] = int(os.environ["JAX_PROCESS_ID"])
    jax.distributed.initialize(**kwargs)
    _distributed_started = True
    return True
