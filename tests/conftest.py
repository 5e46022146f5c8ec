"""Shared test helpers: golden vectors, random CCA inputs and relative errors."""
from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

# A persistent XLA compilation cache shared by the test workers and the `python -m` processes
# the tests start (they inherit the environment): the same programs (a tiny model's train step
# in every fine-tuning subprocess, the same attention shapes in several tests) compile once.
# Set before jax is imported; an outer setting wins.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(REPO / ".pytest_cache" / "jax-compilation"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")


def _accelerator_plugin_installed() -> bool:
    """Whether a jax GPU/TPU plugin is installed (found without importing jax)."""
    import importlib.util
    import pkgutil

    if importlib.util.find_spec("jax_plugins") is None:
        return False
    import jax_plugins
    return any(True for _ in pkgutil.iter_modules(jax_plugins.__path__))


# On a CPU-only machine the suite is dominated by XLA compile time (hundreds of tiny programs,
# each run once or twice): LLVM's -O0 backend halves it (measured: the whole suite 18.4 ->
# 10.4 min on 2 cores). XLA's HLO passes (fusion, simplification, buffer assignment) are the
# same; only the machine code is less optimised, and floating-point results move by about one
# ulp (no FMA contraction), far inside every tolerance here. The test processes inherit it.
# Not on machines with an accelerator plugin (the GPU tests' kernels); an outer setting wins.
#
# XLA's CPU fusion emitters (MLIR kernels per fusion) cost more compile time than the LLVM IR
# emitters they replace: turning them off halves the compile time of the context-parallel
# training test (vag compiles 20.8 -> 9.9 s, the process 71 -> 44 s) with the same results
# within its 1e-5 tolerance. The flag exists in jaxlib 0.10 and is gone from 0.12 (where an
# unknown flag in XLA_FLAGS aborts the process), so it is set only where a child process with
# it starts jax (once per test session: the workers and their children inherit XLA_FLAGS).
_OPT_FLAG = "--xla_backend_optimization_level"
_EMITTERS_FLAG = "--xla_cpu_use_fusion_emitters"


def _jax_accepts(flag: str) -> bool:
    """Whether this jaxlib starts with `flag` in XLA_FLAGS (an unknown flag aborts it)."""
    import subprocess
    import sys

    env = dict(os.environ, XLA_FLAGS=flag, JAX_PLATFORMS="cpu")
    probe = subprocess.run([sys.executable, "-c", "import jax; jax.devices()"], env=env,
                           capture_output=True, timeout=120)
    return probe.returncode == 0


if os.environ.get("JAX_PLATFORMS") == "cpu" or not _accelerator_plugin_installed():
    _flags = os.environ.get("XLA_FLAGS", "")
    if _OPT_FLAG not in _flags:
        _flags = f"{_flags} {_OPT_FLAG}=0"
    if _EMITTERS_FLAG not in _flags and _jax_accepts(f"{_EMITTERS_FLAG}=false"):
        _flags = f"{_flags} {_EMITTERS_FLAG}=false"
    os.environ["XLA_FLAGS"] = _flags.strip()

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

from tests.golden.torch_randn import TorchCPUGenerator  # noqa: E402

# The authors' golden vectors, inside the repository (tests/golden/README.md).
GOLDEN_DIR = Path(__file__).resolve().parent / "golden"


def _golden_specs() -> dict[str, dict]:
    return {case["name"]: case for case in json.loads((GOLDEN_DIR / "cases.json").read_text())}


def golden_cases() -> list[str]:
    return list(_golden_specs())


@functools.lru_cache(maxsize=None)
def _golden_inputs(name: str) -> dict[str, np.ndarray]:
    """q, k, v and dout drawn again from the case's seed, each checked against its sha256."""
    case = _golden_specs()[name]
    B, L, H, Hkv, d = (case[key] for key in ("B", "L", "H", "Hkv", "d"))
    generator = TorchCPUGenerator(case["seed"])
    shapes = {"q": (B, L, H, d), "k": (B, L, Hkv, d), "v": (B, L, Hkv, d), "dout": (B, L, H, d)}
    inputs = {}
    for key, shape in shapes.items():
        array = generator.randn(*shape).astype(np.float32)
        digest = hashlib.sha256(array.tobytes()).hexdigest()
        if digest != case["inputs_sha256"][key]:
            raise AssertionError(f"golden case {name}: re-drawn {key} has sha256 {digest}, "
                                 f"cases.json pins {case['inputs_sha256'][key]}")
        array.flags.writeable = False
        inputs[key] = array
    return inputs


@pytest.fixture
def load_golden():
    def load(name: str) -> dict[str, np.ndarray]:
        with np.load(GOLDEN_DIR / f"{name}.npz") as data:
            gold = {key: data[key] for key in data.files}
        return {**_golden_inputs(name), **gold}
    return load


@pytest.fixture(scope="session")
def smollm2_hf_dir(tmp_path_factory, worker_id):
    """SmolLM2-135M-Instruct as a Hugging Face directory (bfloat16 weights), materialised once
    per test run and shared by every test worker (a file lock makes the others wait)."""
    pytest.importorskip("torch", reason="the extra [torch] is needed to materialise SmolLM2 "
                                        "with transformers")
    from filelock import FileLock

    from convert.smollm2 import materialize_smollm2
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    # pytest-xdist gives each worker its own base temp inside one directory of the run.
    root = tmp_path_factory.getbasetemp()
    if worker_id != "master":
        root = root.parent
    target = root / "smollm2-hf-bfloat16"
    with FileLock(str(root / "smollm2-hf-bfloat16.lock")):
        if not target.is_dir():
            # As on the GPU machine: the GGUF split into checksummed parts, joined back, and
            # read from that copy (--gguf) instead of from the installed package.
            from convert import parts
            from convert.smollm2 import gguf_location

            folder, name = gguf_location()
            parts.split(folder / name, root / "gguf-parts", part_size=40 << 20)
            joined = parts.join(root / "gguf-parts", root / name)
            materialize_smollm2(target, dtype="bfloat16", gguf_file=joined)
    return target


def value_and_grads(fn, q, k, v, dout):
    """(out, dq, dk, dv) of `fn(q, k, v)` with cotangent `dout`, the whole VJP jitted as one
    program (op-by-op dispatch compiles every primitive on its own: ~7x slower here)."""
    @jax.jit
    def run(q, k, v, dout):
        out, vjp = jax.vjp(fn, q, k, v)
        return (out, *vjp(dout))
    return run(q, k, v, dout)


def relative_error(x, reference) -> float:
    x = np.asarray(x, np.float64)
    reference = np.asarray(reference, np.float64)
    assert x.shape == reference.shape, (x.shape, reference.shape)
    assert np.all(np.isfinite(x)), "non-finite values"
    return float(np.linalg.norm(x - reference) / np.linalg.norm(reference))


def random_qkv(seed: int, B: int, L: int, H: int, Hkv: int, d: int, dtype=np.float32):
    keys = jax.random.split(jax.random.PRNGKey(seed), 4)
    q = jax.random.normal(keys[0], (B, L, H, d), dtype)
    k = jax.random.normal(keys[1], (B, L, Hkv, d), dtype)
    v = jax.random.normal(keys[2], (B, L, Hkv, d), dtype)
    dout = jax.random.normal(keys[3], (B, L, H, d), dtype)
    return q, k, v, dout
