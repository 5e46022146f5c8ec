"""Run directory: orbax checkpoints verified on restore, metrics.jsonl / eval.jsonl, resumption.

Layout of `--out DIR`:

    checkpoints/<step>/state/    orbax: {"params", "opt_state", "rng"} as sharded arrays
    checkpoints/<step>/meta/     JSON: step, data position (sequences consumed), seed, the
                                 arguments that fix the trajectory, the model config
    checkpoints/<step>/digests/  JSON: a fingerprint, shape and dtype of every array of the
                                 state, the sha256 of the meta data, and its own sha256
    corrupt-checkpoints/<step>/  checkpoints that failed verification on --resume (moved
                                 aside, never deleted)
    metrics.jsonl                one object per step: step, loss, lr, grad_norm, tokens_per_s
                                 (and "skipped": true for a non-finite step)
    eval.jsonl                   one object per held-out evaluation: step, loss, perplexity
    shardings.json               where every parameter / optimizer array lives (from .sharding)
    export/                      the final parameters as a converted cca_jax model directory

A checkpoint at step `s` holds the state after `s` updates; the batch of the next step is
rebuilt from `(seed, s)` (train/data.py), and the RNG key is stored with the state. Restoring
passes abstract arrays with shardings, so each device reads only its own shards (the mesh
may differ from the one that saved). Saves are asynchronous; `close` waits for them.

Integrity: orbax writes each checkpoint into a temporary directory and renames it into place
when complete, so a crash never leaves a half-written `<step>/` (leftover temporary
directories are removed when the next run starts). What it does not catch is a checkpoint
damaged afterwards (a flipped or truncated file). So every array's fingerprint (two 32-bit
position-weighted sums of its 32-bit words, computed on the devices: independent of the
sharding, so a restore on another mesh checks the same numbers) is stored in the `digests`
item, written atomically with the checkpoint, and compared after every restore; the meta
data is covered by a sha256. A checkpoint that cannot be read, or reads back other values,
or holds a non-finite value, raises `CorruptCheckpoint`. A non-finite state is never saved.

Logs are appended a line at a time; a torn last line (a crash mid-write) is dropped with a
note, and dropping the lines after a resumed checkpoint replaces the file atomically. A save
is refused up front if the disk has no room for it; a write that fails anyway (full disk,
quota, read-only) is recognised by `write_failure`, and the many tracebacks orbax's threads
would print for it are dropped (the caller reports it in one line).
"""
from __future__ import annotations

import errno
import hashlib
import inspect
import json
import logging
import math
import os
import re
import shutil
import sys
from pathlib import Path
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np

DIGESTS_FORMAT = 1
CORRUPT_DIR = "corrupt-checkpoints"


class CorruptCheckpoint(Exception):
    """A checkpoint that cannot be read back, or reads back other values than were saved."""

    def __init__(self, step: int, path: Path, reason: str):
        super().__init__(f"checkpoint {step} ({path}) is unusable: {reason}")
        self.step, self.path, self.reason = step, path, reason


class NonFiniteState(ValueError):
    """A state with NaN or Inf values, which is never saved."""


class LogError(ValueError):
    """A metrics.jsonl / eval.jsonl line that is not a log record (and not a torn last line)."""


# ----------------------------------------------------------------------------- fingerprints

_MIX = np.uint32(0x9E3779B1)   # odd: multiplying by it permutes the 32-bit integers


def _words(x):
    """The array's contents as uint32 words (1-, 2- and 4-byte elements: one word each)."""
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    kind = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    return jax.lax.bitcast_convert_type(x, kind).astype(jnp.uint32)


def _linear_index(shape) -> jax.Array:
    """uint32 row-major element index of an array of `shape` (wrapping past 2**32)."""
    index = jnp.zeros(shape, jnp.uint32)
    stride = 1
    for dim in reversed(range(len(shape))):
        index = index + jax.lax.broadcasted_iota(jnp.uint32, shape, dim) * np.uint32(stride)
        stride = (stride * shape[dim]) % (1 << 32)
    return index


def _fingerprint(x):
    """(uint32[2] fingerprint, all finite) of one array.

    sum(w_i * (2i + 1)) and sum(w_i * (MIX * i | 1)) modulo 2**32 over its words w_i: a
    change of any single word changes the first (the weights are odd, hence invertible), the
    second catches most swaps; integer sums do not depend on the reduction order, so any
    sharding gives the same numbers.
    """
    words = _words(x)
    index = _linear_index(words.shape)
    first = jnp.sum(words * (index * np.uint32(2) + np.uint32(1)), dtype=jnp.uint32)
    second = jnp.sum(words * ((index * _MIX) | np.uint32(1)), dtype=jnp.uint32)
    finite = (jnp.all(jnp.isfinite(x)) if jnp.issubdtype(x.dtype, jnp.inexact)
              else jnp.array(True))
    return jnp.stack([first, second]), finite


_fingerprints_jit = jax.jit(lambda leaves: [_fingerprint(x) for x in leaves])


def fingerprints(tree) -> dict[str, dict]:
    """{array path: {"shape", "dtype", "fingerprint" (hex), "finite"}} of a tree of arrays."""
    paths, leaves = zip(*jax.tree_util.tree_leaves_with_path(tree)) if jax.tree.leaves(tree) \
        else ((), ())
    values = jax.device_get(_fingerprints_jit(list(leaves)))
    return {jax.tree_util.keystr(path): {
        "shape": list(leaf.shape), "dtype": str(leaf.dtype),
        "fingerprint": "".join(f"{int(w):08x}" for w in np.asarray(words)),
        "finite": bool(finite)} for path, leaf, (words, finite) in zip(paths, leaves, values)}


def canonical_sha256(data: Any) -> str:
    return hashlib.sha256(json.dumps(data, sort_keys=True, separators=(",", ":"))
                          .encode()).hexdigest()


def _chain(err: BaseException) -> list[BaseException]:
    """`err` and the exceptions it was raised from, outermost first."""
    seen = [err]
    while (seen[-1].__cause__ or seen[-1].__context__) is not None and len(seen) < 20:
        seen.append(seen[-1].__cause__ or seen[-1].__context__)
    return seen


def _reason(err: BaseException) -> str:
    """The innermost cause of `err` in one line (orbax wraps tensorstore's precise message in
    a generic one)."""
    root = [e for e in _chain(err) if not isinstance(e, StopIteration)][-1]  # json's internals
    text = (str(root).strip().splitlines() or [""])[0]
    return f"{type(root).__name__}: {text[:300]}" if text else type(root).__name__


# A failed write: full disk, quota, file size limit, read-only or inaccessible location, I/O.
_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EIO)


def write_failure(err: BaseException) -> str | None:
    """"<reason>: <file>" if `err` (or what it was raised from) is a failure to write to
    disk, as an OSError or as tensorstore's message (orbax passes that on as a ValueError);
    else None."""
    for e in _chain(err):
        if isinstance(e, OSError) and e.errno in _WRITE_ERRNOS:
            return f"{e.strerror or os.strerror(e.errno)}{f': {e.filename}' if e.filename else ''}"
        text = str(e)
        for code in _WRITE_ERRNOS:
            if os.strerror(code) in text:
                where = re.search(r'(?:Failed writing|writing): "([^"]+)"', text)
                return f"{os.strerror(code)}{f': {where.group(1)}' if where else ''}"
    return None


class _ReportedWriteFailures(logging.Filter):
    """Drops the tracebacks that orbax's threads and asyncio log for a failed checkpoint
    write (a dozen or more for one full disk): the run reports it in one `error:` line."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        if exc is None:
            exc = next((a for a in record.args or () if isinstance(a, BaseException)), None)
        return exc is None or write_failure(exc) is None


_WRITE_FAILURE_FILTER = _ReportedWriteFailures()


def _abandoned_io(unraisable) -> bool:
    """Whether an unraisable exception is the debris of an orbax operation that failed (and
    was reported): orbax runs tensorstore I/O on an event loop that it closes as soon as one
    operation fails (a damaged file on restore, a full disk on save). The completions of the
    others then raise "Event loop is closed" in tensorstore's threads; its coroutines, closed
    by the garbage collector, turn GeneratorExit into an exception; at exit, the same find
    the interpreter shutting down. Each prints a traceback, dozens for one failure."""
    value = unraisable.exc_value
    if isinstance(value, RuntimeError) and str(value) == "Event loop is closed":
        return True
    if isinstance(value, ImportError) and "Python is likely shutting down" in str(value):
        return True
    return inspect.iscoroutine(unraisable.object) and any(
        isinstance(e, GeneratorExit) for e in _chain(value))


def _drop_abandoned_io_debris() -> None:
    """Install (once) an unraisable-exception hook that drops `_abandoned_io` debris and
    passes everything else to the previous hook, and a logging filter that drops the
    tracebacks orbax and asyncio log for a failed write (reported as one `error:` line)."""
    previous = sys.unraisablehook
    if getattr(previous, "drops_abandoned_io", False):
        return

    def hook(unraisable):
        if not _abandoned_io(unraisable):
            previous(unraisable)
    hook.drops_abandoned_io = True
    sys.unraisablehook = hook
    for name in ("absl", "asyncio"):
        logging.getLogger(name).addFilter(_WRITE_FAILURE_FILTER)


# ----------------------------------------------------------------------------- run directory


class RunDirectory:
    def __init__(self, out: Path, keep: int):
        import orbax.checkpoint as ocp

        self.out = Path(out).expanduser().absolute()
        self.metrics_file = self.out / "metrics.jsonl"
        self.eval_file = self.out / "eval.jsonl"
        self.checkpoints = self.out / "checkpoints"
        self._ocp = ocp
        self._digests: dict[int, dict | None] = {}   # verified in read_meta, used by restore
        _drop_abandoned_io_debris()
        self.manager = ocp.CheckpointManager(
            self.checkpoints,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True,
                                                 cleanup_tmp_directories=True),
            item_names=("state", "meta", "digests"))

    def all_steps(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def step_dir(self, step: int) -> Path:
        return self.checkpoints / str(step)

    def check_free_space(self, nbytes: int, what: str) -> None:
        """OSError(ENOSPC) naming the sizes if the file system of checkpoints/ has less free
        space than `nbytes` (plus 5% and 1 MB): refuse before writing rather than fail half
        way through."""
        needed = int(nbytes * 1.05) + (1 << 20)
        free = shutil.disk_usage(self.checkpoints).free
        if free < needed:
            raise OSError(errno.ENOSPC, f"{os.strerror(errno.ENOSPC)}: {what} needs about "
                                        f"{needed / 1e6:,.1f} MB, {free / 1e6:,.1f} MB are free",
                          str(self.checkpoints))

    def save(self, step: int, state: Mapping, meta: Mapping[str, Any]) -> None:
        """Save asynchronously, with the digests; NonFiniteState (nothing written) if any
        array holds a NaN or Inf; OSError if there is no room for it."""
        ocp = self._ocp
        if step in self.manager.all_steps():
            return
        self.manager.wait_until_finished()   # the previous save's space is taken, or it failed
        self.check_free_space(state_bytes(state), f"checkpoint {step}")
        arrays = fingerprints(state)
        bad = [path for path, entry in arrays.items() if not entry.pop("finite")]
        if bad:
            raise NonFiniteState(f"the state after step {step} holds non-finite values "
                                 f"({len(bad)} array(s), e.g. {bad[0]}); not saved")
        meta = json.loads(json.dumps(dict(meta)))
        digests = {"format": DIGESTS_FORMAT, "step": step, "meta_sha256": canonical_sha256(meta),
                   "arrays": arrays}
        digests["sha256"] = canonical_sha256(digests)
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta),
            digests=ocp.args.JsonSave(digests)), force=True)

    def read_meta(self, step: int) -> dict:
        """The meta data of checkpoint `step`, checked against its digests (which are kept for
        `restore`); CorruptCheckpoint if either is unreadable or they disagree. A checkpoint
        written before digests existed has none: only `restore`'s finiteness check applies."""
        ocp = self._ocp
        path = self.step_dir(step)
        has_digests = (path / "digests").exists()
        items = {"meta": ocp.args.JsonRestore()}
        if has_digests:
            items["digests"] = ocp.args.JsonRestore()
        try:
            restored = self.manager.restore(step, args=ocp.args.Composite(**items))
            meta, digests = dict(restored["meta"]), restored.get("digests")
        except Exception as err:   # any failure to read it back makes it unusable
            raise CorruptCheckpoint(step, path, f"its meta data cannot be read "
                                                f"({_reason(err)})") from None
        if not has_digests:
            if "step" not in meta or meta.get("step") != step:
                raise CorruptCheckpoint(step, path, "its meta data and digests are missing or "
                                                    "damaged")
            print(f"note: checkpoint {step} has no digests (written before they existed): "
                  "only checked for non-finite values", flush=True)
            self._digests[step] = None
            return meta
        digests = dict(digests)
        claimed = digests.pop("sha256", None)
        if claimed != canonical_sha256(digests):
            raise CorruptCheckpoint(step, path, "its digests file is damaged (sha256 mismatch)")
        if digests.get("meta_sha256") != canonical_sha256(meta):
            raise CorruptCheckpoint(step, path, "its meta data is damaged (sha256 mismatch)")
        if digests.get("step") != step or meta.get("step") != step:
            raise CorruptCheckpoint(step, path, f"it says step {meta.get('step')}, not {step}")
        self._digests[step] = digests
        return meta

    def restore(self, step: int, abstract_state) -> dict:
        """The state of checkpoint `step`, verified against its digests (read_meta first);
        CorruptCheckpoint if it cannot be read, differs from what was saved, or is not
        finite."""
        ocp = self._ocp
        path = self.step_dir(step)
        if step not in self._digests:
            self.read_meta(step)
        try:
            state = self.manager.restore(step, args=ocp.args.Composite(
                state=ocp.args.StandardRestore(abstract_state)))["state"]
        except Exception as err:   # any failure to read it back makes it unusable
            raise CorruptCheckpoint(step, path, f"its arrays cannot be read "
                                                f"({_reason(err)})") from None
        arrays = fingerprints(state)
        nonfinite = [p for p, entry in arrays.items() if not entry.pop("finite")]
        digests = self._digests[step]
        if digests is not None:
            saved = digests.get("arrays", {})
            differ = sorted(set(saved) ^ set(arrays)) + [
                p for p in arrays if p in saved and saved[p] != arrays[p]]
            if differ:
                raise CorruptCheckpoint(step, path, f"{len(differ)} array(s) read back "
                                                    f"differ from what was saved (e.g. "
                                                    f"{differ[0]})")
        if nonfinite:
            raise CorruptCheckpoint(step, path, f"{len(nonfinite)} array(s) hold NaN or Inf "
                                                f"(e.g. {nonfinite[0]})")
        return state

    def quarantine(self, step: int) -> Path:
        """Move checkpoint `step` out of `checkpoints/` into `corrupt-checkpoints/` (never
        deleted: it may still be of use to someone); return where it went."""
        target_dir = self.out / CORRUPT_DIR
        target = target_dir / str(step)
        n = 1
        while target.exists():
            target, n = target_dir / f"{step}.{n}", n + 1
        if jax.process_index() == 0:
            target_dir.mkdir(parents=True, exist_ok=True)
            os.replace(self.step_dir(step), target)
        _sync(f"quarantine checkpoint {step}")
        self._digests.pop(step, None)
        self.manager.reload()
        return target

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    def finish_pending(self) -> None:
        """Let the saves under way complete, on the way out of an error (that error is the
        one reported: a failure here is only a warning)."""
        try:
            self.close()
        except Exception as err:
            print(f"warning: the checkpoint being written could not be completed "
                  f"({_reason(err)})", file=sys.stderr, flush=True)

    # ------------------------------------------------------------------ logs

    def _records(self, file: Path) -> list[tuple[str, dict]]:
        """(line, record) of every log line. A last line that is not a record is a write
        cut short by a crash: dropped with a note. Any other bad line is a LogError."""
        if not file.is_file():
            return []
        lines = [line for line in file.read_text(errors="replace").splitlines()
                 if line.strip()]
        out = []
        for number, line in enumerate(lines, 1):
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("not an object with an integer step")
            except ValueError as err:
                if number == len(lines):
                    print(f"note: {file}: dropped a torn last line (a write cut short by a "
                          f"crash): {line[:80]!r}", flush=True)
                    break
                raise LogError(f"{file}: line {number} is not a log record ({err}): "
                               f"{line[:80]!r}; fix or delete that line") from None
            out.append((line, record))
        return out

    def truncate_logs(self, step: int) -> None:
        """Drop log lines of steps after `step` (written after the checkpoint being resumed),
        and a torn last line; the files are replaced atomically."""
        from cca_jax.io import atomic_write_text

        if jax.process_index() != 0:
            return
        for file in (self.metrics_file, self.eval_file):
            if not file.is_file():
                continue
            kept = [line for line, record in self._records(file) if record["step"] <= step]
            atomic_write_text(file, "".join(f"{line}\n" for line in kept))

    def log(self, file: Path, record: Mapping[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        with open(file, "a") as f:
            f.write(json.dumps(dict(record)) + "\n")

    def read_log(self, file: Path) -> list[dict]:
        return [record for _, record in self._records(file)]


def state_bytes(tree) -> int:
    """Bytes of all arrays of a tree (arrays or ShapeDtypeStructs)."""
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _sync(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices(name)


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (orbax restores straight into them)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
