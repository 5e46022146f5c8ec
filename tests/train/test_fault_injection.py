"""Fault injection into fine-tuning runs (issue 12): kill -9 while checkpoints are written,
byte flips and truncations of every kind of checkpoint file, a torn metrics line, a file
system that refuses writes, a diverging run. Then `--resume`: nothing that was good before is
lost, the losses are exactly those of an uninterrupted run, damage is named in a warning or an
`error:` line (never a traceback), and no temporary directory is left behind.

Runs are in this process (one CPU device, like the reference run) except where a process must
die or run under a file size limit; the tiny model and corpus come from conftest.py.
"""
from __future__ import annotations

import contextlib
import errno
import io
import os
import random
import shutil
import signal
import subprocess
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from tests.train.conftest import REPO, finetune_command, finetune_env, read_jsonl
from train.finetune import cli

STEPS = 6
FAULT_ARGS = ("--eval-sequences", "0", "--no-export", "--save-every", "1")


class Run(NamedTuple):
    rc: int
    stdout: str
    stderr: str


def fine_tune(tiny, out: Path, *extra) -> Run:
    """`python -m train.finetune` in this process, output captured."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        rc = cli.main([str(a) for a in tiny.args(out, *FAULT_ARGS, *extra)])
    return Run(rc, stdout.getvalue(), stderr.getvalue())


def losses(out: Path) -> list[tuple[int, float, float]]:
    return [(m["step"], m["loss"], m["grad_norm"]) for m in read_jsonl(out / "metrics.jsonl")]


def checkpoint_steps(out: Path) -> list[int]:
    return sorted(int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit())


def leftovers(out: Path) -> list[str]:
    """Temporary files or directories anywhere in the run directory."""
    return [str(p) for p in out.rglob("*") if "tmp" in p.name]


def assert_clean(run: Run) -> None:
    assert "Traceback" not in run.stdout + run.stderr, run.stdout + run.stderr


@pytest.fixture(scope="module")
def reference(tiny, tmp_path_factory):
    """The uninterrupted run: 6 steps, a checkpoint after each (all kept)."""
    out = tmp_path_factory.mktemp("faults") / "reference"
    run = fine_tune(tiny, out, "--steps", STEPS, "--keep", STEPS)
    assert run.rc == 0, run.stdout + run.stderr
    assert checkpoint_steps(out) == list(range(1, STEPS + 1))
    return out, losses(out)


def copy_run(reference, target: Path, keep_until: int = STEPS) -> Path:
    """A copy of the reference run as it was after `keep_until` steps."""
    shutil.copytree(reference[0], target)
    for step in checkpoint_steps(target):
        if step > keep_until:
            shutil.rmtree(target / "checkpoints" / str(step))
    lines = (target / "metrics.jsonl").read_text().splitlines(keepends=True)
    (target / "metrics.jsonl").write_text("".join(lines[:keep_until]))
    return target


# ----------------------------------------------------------------------------- kill -9

KILL_TRIALS = 3


class KillTrial:
    """A run in a child process, killed (SIGKILL) `delay` seconds after the temporary
    directory of checkpoint `target` appears, i.e. while orbax writes or renames it."""

    def __init__(self, tiny, out: Path, target: int, delay: float):
        self.out, self.target, self.delay, self.seen = out, target, delay, None
        self.log = out.with_suffix(".log")
        args = tiny.args(out, *FAULT_ARGS, "--steps", STEPS, "--keep", 3)
        with open(self.log, "w") as log:
            self.proc = subprocess.Popen(finetune_command(args), cwd=REPO, env=finetune_env(1),
                                         stdout=log, stderr=subprocess.STDOUT)

    def poll(self) -> bool:
        """Kill when it is time; whether the process is still running."""
        if self.proc.poll() is not None:
            return False
        if self.seen is None:
            folder = self.out / "checkpoints"
            names = os.listdir(folder) if folder.is_dir() else []
            if any(n.startswith(f"{self.target}.") and "tmp" in n for n in names):
                self.seen = time.time()
        elif time.time() >= self.seen + self.delay:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        return True


def test_kill_9_while_checkpoints_are_written_loses_nothing(tiny, reference, tmp_path):
    """Seeded kill points (which checkpoint, how long after its write began), the trials side
    by side. Resuming starts from the newest complete checkpoint, ends with the reference's
    losses, and leaves no temporary directory."""
    rng = random.Random(12)
    trials = [KillTrial(tiny, tmp_path / f"kill{i}", rng.randint(2, 4), rng.uniform(0, 0.05))
              for i in range(KILL_TRIALS)]
    deadline = time.time() + 150
    try:
        while time.time() < deadline:
            running = [t.poll() for t in trials]   # every trial polled, each time
            if not any(running):
                break
            time.sleep(0.001)
    finally:
        for t in trials:
            if t.proc.poll() is None:
                t.proc.kill()
    for t in trials:
        assert t.proc.returncode == -signal.SIGKILL, t.log.read_text()
        committed = checkpoint_steps(t.out)       # the complete checkpoints at the kill
        assert committed, t.log.read_text()
        run = fine_tune(tiny, t.out, "--steps", STEPS, "--keep", 3, "--resume")
        assert run.rc == 0, run.stdout + run.stderr
        assert f"resumed from step {committed[-1]} " in run.stdout, (committed, run.stdout)
        assert "warning" not in run.stderr, run.stderr
        assert_clean(run)
        assert losses(t.out) == reference[1]
        assert checkpoint_steps(t.out) == [4, 5, 6]
        assert leftovers(t.out) == []


# ----------------------------------------------------------------------------- damaged files


def _largest(folder: Path) -> Path:
    return max(folder.iterdir(), key=lambda p: p.stat().st_size)


def _smallest(folder: Path) -> Path:
    return min(folder.iterdir(), key=lambda p: p.stat().st_size)


# Every kind of file in a checkpoint directory; `True`: damage must be detected (what it
# holds is read back on restore), `False`: orbax does not read it on restore, so damage loses
# nothing and the checkpoint stays usable (its arrays still match the digests).
FILE_KINDS = {
    "array data": (lambda c: _largest(c / "state" / "ocdbt.process_0" / "d"), True),
    "merged b-tree": (lambda c: _largest(c / "state" / "d"), True),
    "manifest.ocdbt": (lambda c: c / "state" / "manifest.ocdbt", True),
    "_METADATA": (lambda c: c / "state" / "_METADATA", True),
    "array_metadatas": (lambda c: c / "state" / "array_metadatas" / "process_0", True),
    "meta": (lambda c: c / "meta" / "metadata", True),
    "digests": (lambda c: c / "digests" / "metadata", True),
    "_sharding": (lambda c: c / "state" / "_sharding", False),
    "per-process manifest": (lambda c: c / "state" / "ocdbt.process_0" / "manifest.ocdbt",
                             False),
    "per-process b-tree": (lambda c: _smallest(c / "state" / "ocdbt.process_0" / "d"), False),
    "_CHECKPOINT_METADATA": (lambda c: c / "_CHECKPOINT_METADATA", False),
    "commit_success.txt": (lambda c: c / "commit_success.txt", False),
}


def ocdbt_values(path: Path) -> list[tuple[int, int]]:
    """(offset, length) of each value in `path`, a data file of a checkpoint's OCDBT store
    (state/ocdbt.process_0/d/*), that the store's b-tree points to: the bytes a restore reads.
    A data file holds more than that: after the values, tensorstore writes the per-process
    b-tree, which a restore never reads (it follows the merged b-tree in state/d/), so damage
    there is never seen (the flaky probe of issue 15: a random offset of the largest data file
    landed there about once in two hundred). Other files: none."""
    import tensorstore as ts

    if path.parent.name != "d" or not path.parent.parent.name.startswith("ocdbt.process_"):
        return []
    state = path.parents[2]
    name = str(path.relative_to(state))
    base = ts.KvStore.open(f"file://{state}/").result()
    pending = [ts.ocdbt.dump(base).result()["versions"][-1]["root"]["location"]]
    values = []
    while pending:                      # the b-tree, from its root (leaves: height 0)
        for entry in ts.ocdbt.dump(base, pending.pop()).result()["entries"]:
            for location in (v for v in entry.values() if isinstance(v, str)):
                kind, _, rest = location.partition(":")    # "kind:prefix:file:offset:length"
                prefix, _, rest = rest.partition(":")
                file, offset, length = rest.rsplit(":", 2)
                if kind == "btreenode":
                    pending.append(location)
                elif kind == "value" and prefix + file == name:
                    values.append((int(offset), int(length)))
    return sorted(values)


def damage_offset(path: Path, rng: random.Random, count: int) -> int:
    """Where damage of `count` bytes to `path` begins: in the middle of the largest value that
    a restore reads from it, if it is an OCDBT data file (a zstd frame whose payload is the
    raw bytes of one array: weights do not compress, so the damage changes that array's
    values and nothing else); elsewhere at a random offset."""
    values = ocdbt_values(path)
    if values:
        offset, length = max(values, key=lambda value: (value[1], -value[0]))
        assert length >= 4 * count, (path, values)
        return offset + (length - count) // 2
    return rng.randrange(max(1, path.stat().st_size - count))


def flip_bytes(path: Path, rng: random.Random, count: int = 64) -> None:
    """Invert `count` consecutive bytes (the issue's probe): of an array, in array data."""
    data = bytearray(path.read_bytes())
    start = damage_offset(path, rng, count)
    for i in range(start, min(len(data), start + count)):
        data[i] ^= 0xFF
    path.write_bytes(bytes(data))


def truncate(path: Path, rng: random.Random) -> None:
    """Cut the file short (a torn write): inside an array, in array data."""
    with open(path, "r+b") as f:
        f.truncate(damage_offset(path, rng, 1))


def damage(reference, tmp_path, faults, seed) -> Path:
    """A copy of the reference run with `faults` ({checkpoint step: (fault, [kinds])})
    applied, and a metrics.jsonl that ends in a torn line."""
    rng = random.Random(seed)
    out = copy_run(reference, tmp_path / "run")
    for step, (fault, kinds) in faults.items():
        for kind in kinds:
            fault(FILE_KINDS[kind][0](out / "checkpoints" / str(step)), rng)
    with open(out / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "loss": 1.2')           # a crash in the middle of a write
    return out


READ_KINDS = [name for name, (_, read) in FILE_KINDS.items() if read]


@pytest.mark.parametrize("first, second", [tuple((READ_KINDS + [None])[i:i + 2])
                                           for i in range(0, len(READ_KINDS), 2)])
def test_damaged_checkpoint_files_fall_back_to_the_newest_valid_checkpoint(tiny, reference,
                                                                           tmp_path, first,
                                                                           second):
    """Files that restoring reads, damaged: 64 bytes flipped in checkpoint 6 and a truncation
    in checkpoint 5 (one kind of file), the same in checkpoints 4 and 3 (another kind), and a
    torn last line in metrics.jsonl; then `--resume --save-every 1 --keep 3` (the issue's
    probe: NaN losses, exit 0, the good checkpoints rotated away). Every damaged checkpoint is
    named in a warning and moved aside, never deleted; training continues from the newest
    valid one with the reference's losses; rotation keeps 3 valid checkpoints."""
    faults = {6: (flip_bytes, [first]), 5: (truncate, [first])}
    if second is not None:
        faults.update({4: (flip_bytes, [second]), 3: (truncate, [second])})
    out = damage(reference, tmp_path, faults, seed=first)
    run = fine_tune(tiny, out, "--steps", STEPS, "--keep", 3, "--resume")
    assert run.rc == 0, run.stdout + run.stderr
    assert_clean(run)
    assert "dropped a torn last line" in run.stdout
    for step in faults:
        assert f"warning: checkpoint {step} ({out / 'checkpoints' / str(step)}) is unusable: " \
               in run.stderr, run.stderr
        assert f"warning: moved the unusable checkpoint {step} to " \
               f"{out / 'corrupt-checkpoints' / str(step)}" in run.stderr
    assert f"resumed from step {min(faults) - 1} " in run.stdout, run.stdout
    assert sorted(int(p.name) for p in (out / "corrupt-checkpoints").iterdir()) == sorted(faults)
    assert losses(out) == reference[1]
    assert checkpoint_steps(out) == [4, 5, 6]
    assert leftovers(out) == []
    if first == "array data":   # the checkpoints that rotation kept are valid
        again = fine_tune(tiny, out, "--steps", STEPS, "--keep", 3, "--resume")
        assert again.rc == 0 and "resumed from step 6 " in again.stdout
        assert "warning" not in again.stderr and checkpoint_steps(out) == [4, 5, 6]


def test_edits_that_keep_the_json_valid_are_caught_by_the_sha256(reference, tmp_path):
    """A changed number in the meta data (still valid JSON) or in the digests: caught."""
    import json

    from train.checkpoint import CorruptCheckpoint, RunDirectory

    out = copy_run(reference, tmp_path / "run")
    meta = out / "checkpoints" / "6" / "meta" / "metadata"
    meta.write_text(meta.read_text().replace('"data_position": 48', '"data_position": 40'))
    digests = out / "checkpoints" / "5" / "digests" / "metadata"
    record = json.loads(digests.read_text())
    entry = record["arrays"]["['rng']"]
    entry["fingerprint"] = entry["fingerprint"][::-1]
    digests.write_text(json.dumps(record))
    run_dir = RunDirectory(out, keep=3)
    with pytest.raises(CorruptCheckpoint, match="checkpoint 6 .* is unusable: its meta data "
                                                "is damaged"):
        run_dir.read_meta(6)
    with pytest.raises(CorruptCheckpoint, match="checkpoint 5 .* is unusable: its digests file "
                                                "is damaged"):
        run_dir.read_meta(5)
    assert run_dir.read_meta(4)["data_position"] == 32
    run_dir.close()


@pytest.mark.parametrize("fault6, fault5", [(flip_bytes, truncate), (truncate, flip_bytes)])
def test_damage_to_files_that_restoring_does_not_read_loses_nothing(tiny, reference, tmp_path,
                                                                    fault6, fault5):
    """The other kinds, all damaged at once in checkpoints 6 and 5: checkpoint 6 is still
    used, its arrays match their digests, and nothing is moved or deleted."""
    names = [name for name, (_, read) in FILE_KINDS.items() if not read]
    out = damage(reference, tmp_path, {6: (fault6, names), 5: (fault5, names)},
                 seed=fault6.__name__)
    run = fine_tune(tiny, out, "--steps", STEPS, "--keep", 3, "--resume")
    assert run.rc == 0, run.stdout + run.stderr
    assert_clean(run)
    assert "resumed from step 6 " in run.stdout and "warning" not in run.stderr
    assert losses(out) == reference[1]
    assert checkpoint_steps(out) == list(range(1, STEPS + 1))
    assert leftovers(out) == []


def test_no_valid_checkpoint_is_an_error_and_changes_nothing(tiny, reference, tmp_path):
    out = copy_run(reference, tmp_path / "run", keep_until=3)
    rng = random.Random(3)
    for step in (1, 2, 3):
        flip_bytes(FILE_KINDS["array data"][0](out / "checkpoints" / str(step)), rng)
    before = sorted(str(p.relative_to(out)) for p in out.rglob("*"))
    metrics = (out / "metrics.jsonl").read_text()
    run = fine_tune(tiny, out, "--steps", STEPS, "--resume")
    assert run.rc == 2, run.stdout + run.stderr
    assert_clean(run)
    error = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1 and "none of the 3 checkpoint(s)" in error[0], run.stderr
    for step in (1, 2, 3):
        assert f"{step}: 1 array(s) read back differ from what was saved" in error[0]
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*")) == before
    assert (out / "metrics.jsonl").read_text() == metrics


# ----------------------------------------------------------------------------- divergence


def test_a_non_finite_step_stops_the_run_without_a_checkpoint_of_it(tiny, tmp_path):
    """lr 1e30: the first update blows the weights up, the gradient norm of step 2 is NaN.
    Before: NaN losses, exit 0, NaN checkpoints rotating the good ones away."""
    out = tmp_path / "run"
    run = fine_tune(tiny, out, "--steps", STEPS, "--keep", 3, "--lr", "1e30")
    assert run.rc == 1, run.stdout + run.stderr
    assert_clean(run)
    error = [line for line in run.stderr.splitlines() if line.startswith("error:")]
    assert len(error) == 1, run.stderr
    assert error[0].startswith("error: step 2: non-finite gradient norm nan (1 such step(s) in "
                               "a row, --nan-patience 0); stopped without saving this state; "
                               "the newest checkpoint is step 1"), error
    assert checkpoint_steps(out) == [1] and leftovers(out) == []


def test_nan_patience_skips_that_many_steps_in_a_row(tiny, tmp_path):
    out = tmp_path / "run"
    run = fine_tune(tiny, out, "--steps", STEPS, "--keep", 3, "--lr", "1e30",
                    "--nan-patience", 2)
    assert run.rc == 1, run.stdout + run.stderr
    assert "warning: step 2: non-finite gradient norm nan; its update was skipped (1 of " \
           "--nan-patience 2 in a row)" in run.stderr
    assert "warning: step 3: non-finite" in run.stderr
    assert "error: step 4: non-finite gradient norm nan (3 such step(s) in a row" in run.stderr
    records = read_jsonl(out / "metrics.jsonl")
    assert [r.get("skipped", False) for r in records] == [False, True, True, True]
    # Skipped steps left the weights as they were: their checkpoints are valid (and finite),
    # the diverged step 4 has none; rotation kept the newest valid one.
    assert checkpoint_steps(out) == [1, 2, 3]


def test_nan_patience_is_documented_and_checked(capsys, tmp_path):
    assert "--nan-patience" in cli.build_parser().format_help()
    assert cli.main(["--nan-patience", "-1", "--out", str(tmp_path / "o")]) == 2
    assert "error: --nan-patience must be >= 0, got -1" in capsys.readouterr().err


def test_a_non_finite_state_is_never_saved(tmp_path):
    import jax.numpy as jnp

    from train.checkpoint import NonFiniteState, RunDirectory

    run_dir = RunDirectory(tmp_path / "run", keep=2)
    state = {"params": {"w": jnp.array([1.0, jnp.inf])}, "rng": jnp.zeros(2, jnp.uint32)}
    with pytest.raises(NonFiniteState, match=r"state after step 3 holds non-finite values "
                                             r"\(1 array\(s\), e.g. \['params'\]\['w'\]\)"):
        run_dir.save(3, state, {"step": 3})
    run_dir.close()
    assert run_dir.all_steps() == [] and leftovers(tmp_path) == []


# ----------------------------------------------------------------------------- disk full


def _one_error_line(run: Run, strict: bool = True) -> str:
    """The `error:` line; `strict`: the only line on stderr besides the progress bar."""
    assert_clean(run)
    lines = [line for line in run.stderr.splitlines()
             if line.strip() and not line.startswith("fine-tuning")]
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 1, run.stdout + run.stderr
    if strict:
        assert lines == errors, run.stderr
    return errors[0]


def test_a_full_disk_is_refused_before_compute(tiny, tmp_path, monkeypatch):
    from train import checkpoint

    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(checkpoint.shutil, "disk_usage",
                        lambda path: usage._replace(free=100_000))
    run = fine_tune(tiny, tmp_path / "run", "--steps", STEPS)
    assert run.rc == 1
    line = _one_error_line(run)
    assert "No space left on device: a checkpoint needs about" in line and "0.1 MB are free" \
        in line, line
    assert "compiled the train step" not in run.stdout


def test_a_full_disk_while_logging_is_one_error_line(tiny, tmp_path, monkeypatch):
    from train import checkpoint

    real_log = checkpoint.RunDirectory.log

    def log(self, file, record):
        if record["step"] == 3:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        real_log(self, file, record)
    monkeypatch.setattr(checkpoint.RunDirectory, "log", log)
    out = tmp_path / "run"
    run = fine_tune(tiny, out, "--steps", STEPS, "--keep", 3)
    assert run.rc == 1
    line = _one_error_line(run)
    assert f"(No space left on device: {out / 'metrics.jsonl'})" in line, line
    assert checkpoint_steps(out) == [1, 2] and leftovers(out) == []


def test_a_write_failing_inside_orbax_is_one_error_line_and_resume_recovers(tiny, reference,
                                                                            tmp_path):
    """A file size limit (RLIMIT_FSIZE, SIGXFSZ ignored) makes tensorstore's write of the
    checkpoint's array data fail half way, as a full disk does (no root needed for it):
    one `error:` line, the checkpoints before are intact, and --resume cleans up the
    temporary directory and ends with the reference's losses."""
    out = copy_run(reference, tmp_path / "run", keep_until=3)
    # The limit: twice the largest file of checkpoint 3 that is not array data, so every other
    # file the run writes fits and the ~0.9 MB of array data cannot. (Half the largest array
    # data file of checkpoint 3 was flaky: tensorstore splits a checkpoint's data into a number
    # of files that depends on timing, and under load all of checkpoint 4's came out smaller.)
    others = [p.stat().st_size for p in (out / "checkpoints" / "3").rglob("*")
              if p.is_file() and p.parent.name != "d"]
    data = [p.stat().st_size for p in (out / "checkpoints" / "3").rglob("*")
            if p.is_file() and p.parent.name == "d"]
    limit_kb = 2 * max(others) // 1024
    assert sum(data) > 8 * limit_kb * 1024, (others, data)
    command = " ".join(f"'{a}'" for a in finetune_command(
        tiny.args(out, *FAULT_ARGS, "--steps", STEPS, "--keep", 3, "--resume")))
    result = subprocess.run(["bash", "-c", f"ulimit -f {limit_kb}; trap '' XFSZ; exec {command}"],
                            cwd=REPO, env=finetune_env(1), capture_output=True, text=True,
                            timeout=240)
    assert result.returncode == 1, result.stdout + result.stderr
    line = _one_error_line(Run(result.returncode, result.stdout, result.stderr), strict=False)
    assert line.startswith("error: cannot write the run directory (File too large: "
                           f"{out / 'checkpoints' / '4.orbax-checkpoint-tmp'}"), line
    assert checkpoint_steps(out) == [1, 2, 3] and leftovers(out)
    run = fine_tune(tiny, out, "--steps", STEPS, "--keep", 3, "--resume")
    assert run.rc == 0, run.stdout + run.stderr
    assert "resumed from step 3 " in run.stdout
    assert losses(out) == reference[1]
    assert leftovers(out) == []
