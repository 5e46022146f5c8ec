"""Faults around conversion: outputs that would swallow the input, truncated or corrupted
weight files, a read-only location, and SIGINT / SIGTERM / SIGKILL while a directory is being
written. Each must end with the input intact, a clear `error:` (or the signal's exit status),
and no temporary folder left once the next run has finished."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cca_jax.convert import cli
from cca_jax.loading import from_pretrained
from cca_jax import hf, io
from cca_jax.converted import is_converted_dir

REPO = Path(__file__).resolve().parents[2]


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def hidden_temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and (
        ".tmp-" in p.name or ".old-" in p.name))


def expect_error(capsys, argv, *needles) -> str:
    assert cli.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


def dead_pid() -> int:
    process = subprocess.Popen([sys.executable, "-c", "pass"])
    process.wait()
    return process.pid


# ----------------------------------------------------------------------------- finding 2


def test_output_that_contains_the_input_is_refused_and_the_input_kept(make_hf_model,
                                                                      tmp_path, capsys):
    """`convert scratch/hf scratch --overwrite` deleted scratch/hf."""
    source, _ = make_hf_model("scratch/hf")
    scratch = source.parent
    before = snapshot(scratch)
    expect_error(capsys, [source, scratch, "--overwrite"], "contains the input directory",
                 "would delete the input")
    expect_error(capsys, [source, tmp_path, "--overwrite"], "contains the input directory")
    assert snapshot(scratch) == before
    # The same through a symbolic link to the input, and with --to-hf.
    link = tmp_path / "link-to-hf"
    link.symlink_to(source, target_is_directory=True)
    expect_error(capsys, [source, link, "--overwrite"], "is the input directory")
    cca = tmp_path / "cca"
    assert cli.main([str(source), str(cca)]) == 0
    converted = snapshot(cca)
    expect_error(capsys, ["--to-hf", cca / "params", tmp_path, "--overwrite"],
                 "contains the input directory")
    assert snapshot(cca) == converted and snapshot(scratch) == before
    assert hidden_temporaries(tmp_path) == [] and hidden_temporaries(scratch) == []


def test_existing_entry_inside_the_input_is_refused_a_new_folder_is_not(make_hf_model,
                                                                        tmp_path, capsys):
    source, _ = make_hf_model()
    before = snapshot(source)
    expect_error(capsys, [source, source / "model.safetensors", "--overwrite"],
                 "already exists inside the input", "delete part of the input")
    assert snapshot(source) == before
    assert cli.main([str(source), str(source / "cca")]) == 0   # only adds a folder
    assert is_converted_dir(source / "cca")
    assert {k: v for k, v in snapshot(source).items() if not k.startswith("cca")} == before


# ----------------------------------------------------------------------------- finding 7


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


CORRUPTIONS = {
    "half": lambda path: _truncate(path, path.stat().st_size // 2),
    "header_only": lambda path: _truncate(path, 8 + int.from_bytes(path.read_bytes()[:8],
                                                                   "little")),
    "five_bytes": lambda path: _truncate(path, 5),
    "empty": lambda path: _truncate(path, 0),
    "garbage_header": lambda path: path.write_bytes(b"\xff" * 64 + path.read_bytes()[64:]),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_truncated_or_corrupted_safetensors_is_named(make_hf_model, tmp_path, capsys,
                                                     corruption):
    source, _ = make_hf_model()
    weights = source / "model.safetensors"
    CORRUPTIONS[corruption](weights)
    damaged = snapshot(source)
    expect_error(capsys, [source, tmp_path / "cca"], str(weights), "truncated or corrupted")
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupted"):
        from_pretrained(source)
    assert snapshot(source) == damaged
    assert not (tmp_path / "cca").exists() and hidden_temporaries(tmp_path) == []


@pytest.mark.parametrize("fmt", ["sharded", "bin"])
def test_truncated_shard_or_pytorch_file_is_named(make_hf_model, tmp_path, capsys, fmt):
    source, _ = make_hf_model(kv_heads=2, fmt=fmt)
    victim = (sorted(source.glob("model-*.safetensors"))[1] if fmt == "sharded"
              else source / "pytorch_model.bin")
    _truncate(victim, victim.stat().st_size // 2)
    expect_error(capsys, [source, tmp_path / "cca"], victim.name, "truncated or corrupted")
    assert not (tmp_path / "cca").exists() and hidden_temporaries(tmp_path) == []


# ----------------------------------------------------------------------------- finding 9


@pytest.fixture
def read_only_dir(tmp_path, monkeypatch):
    """A directory nothing can be created in: mode 0555, and, since root ignores permission
    bits (CI runs as root here), mkdtemp there fails as it does on a read-only mount."""
    location = tmp_path / "read-only"
    location.mkdir()
    location.chmod(0o555)
    real_mkdtemp = tempfile.mkdtemp

    def mkdtemp(suffix=None, prefix=None, dir=None):
        if dir is not None and Path(dir) == location:
            raise OSError(30, "Read-only file system", str(location))
        return real_mkdtemp(suffix, prefix, dir)

    monkeypatch.setattr(tempfile, "mkdtemp", mkdtemp)
    yield location
    location.chmod(0o755)


def test_read_only_location_fails_before_any_weights_are_read(make_hf_model, read_only_dir,
                                                              capsys, monkeypatch):
    source, _ = make_hf_model()

    def must_not_read(*_args, **_kwargs):
        raise AssertionError("weights were read although OUT_DIR cannot be written")

    monkeypatch.setattr(hf, "load_hf_state_dict", must_not_read)
    for out in (read_only_dir / "cca", read_only_dir / "new" / "deeper"):
        expect_error(capsys, [source, out], "cannot write the output directory", str(out),
                     "is not writable")
    expect_error(capsys, [source, source / "config.json" / "cca"], "is not a directory")
    assert list(read_only_dir.iterdir()) == []


def test_default_modes_of_written_files(make_hf_model, tmp_path):
    """safetensors' writer leaves 0600; every written file gets the ordinary mode."""
    source, _ = make_hf_model()
    assert cli.main([str(source), str(tmp_path / "cca")]) == 0
    assert cli.main(["--to-hf", str(tmp_path / "cca"), str(tmp_path / "back")]) == 0
    modes = {p.name: p.stat().st_mode & 0o777 for p in (tmp_path / "back").iterdir()}
    assert modes["model.safetensors"] == io.default_file_mode(), modes
    assert set(modes.values()) == {io.default_file_mode()}, modes


WRITER = textwrap.dedent("""
    import sys, time
    from cca_jax.io import atomic_directory
    with atomic_directory(sys.argv[1], overwrite=True) as tmp:
        (tmp / "half.bin").write_bytes(b"x" * 1000)
        print("inside", flush=True)
        time.sleep(60)
""")


def _start(code: str, *args) -> subprocess.Popen:
    process = subprocess.Popen([sys.executable, "-c", code, *map(str, args)], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    while not lines or lines[-1].strip() != "inside":   # progress lines come first
        lines.append(process.stdout.readline())
        assert lines[-1], ("".join(lines), process.stderr.read())
    return process


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_sigint_and_sigterm_remove_the_temporary_and_keep_the_target(tmp_path, signum):
    target = tmp_path / "out"
    target.mkdir()
    (target / "previous.txt").write_text("kept")
    process = _start(WRITER, target)
    assert len(hidden_temporaries(tmp_path)) == 1
    process.send_signal(signum)
    code = process.wait(timeout=30)
    # Ctrl-C: KeyboardInterrupt, the status of death by SIGINT; SIGTERM: exit status 143.
    assert code == (-signal.SIGINT if signum == signal.SIGINT else 128 + signal.SIGTERM)
    assert hidden_temporaries(tmp_path) == []
    assert snapshot(target) == {"previous.txt": b"kept"}


def test_after_sigkill_the_next_write_removes_the_stale_temporary(tmp_path):
    target = tmp_path / "out"
    process = _start(WRITER, target)
    process.kill()
    process.wait(timeout=30)
    stale = hidden_temporaries(tmp_path)
    assert len(stale) == 1 and f"-{process.pid}@" in stale[0]   # nothing could run
    assert io.stale_temporaries(target) == [tmp_path / stale[0]]
    with io.atomic_directory(target) as tmp:
        (tmp / "done.txt").write_text("new")
    assert hidden_temporaries(tmp_path) == [] and snapshot(target) == {"done.txt": b"new"}


def test_stale_temporaries_of_live_processes_and_other_targets_are_kept(tmp_path):
    target = tmp_path / "out"
    mine = tmp_path / f".out.tmp-{os.getpid()}@{io._host()}.abcd1234"   # this process
    other_target = tmp_path / f".other.tmp-{dead_pid()}@{io._host()}.abcd1234"
    other_host = tmp_path / f".out.tmp-{dead_pid()}@elsewhere.abcd1234"
    for path in (mine, other_target, other_host):
        path.mkdir()
    with io.atomic_directory(target) as tmp:
        (tmp / "x").write_text("x")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["out", mine.name, other_target.name, other_host.name])


def test_a_kill_between_the_two_renames_of_overwrite_is_undone(tmp_path):
    """SIGKILL after the old target was moved aside and before the new one took its place:
    the next run puts the old target back instead of losing it."""
    target = tmp_path / "out"
    aside = tmp_path / f".out.old-{dead_pid()}@{io._host()}.abcd1234"
    (aside / "previous").mkdir(parents=True)
    (aside / "previous" / "weights.bin").write_bytes(b"old")
    (tmp_path / f".out.tmp-{dead_pid()}@{io._host()}.efgh5678").mkdir()
    assert not target.exists()
    restored = io.remove_stale_temporaries(target)
    assert len(restored) == 2 and snapshot(target) == {"weights.bin": b"old"}
    assert hidden_temporaries(tmp_path) == []


CONVERTER = textwrap.dedent("""
    import sys, time
    import cca_jax.converted as checkpoint
    copy = checkpoint.copy_tokenizer_files

    def copy_then_wait(src, dst):   # inside the atomic directory, after orbax has written
        names = copy(src, dst)
        print("inside", flush=True)
        time.sleep(60)
        return names

    checkpoint.copy_tokenizer_files = copy_then_wait
    from cca_jax.convert import cli
    sys.exit(cli.main(sys.argv[1:]))
""")


def test_converter_killed_while_writing_then_run_again(make_hf_model, tmp_path, capsys):
    """SIGINT, SIGTERM and SIGKILL in the middle of `python -m cca_jax.convert ... --overwrite`
    (orbax has written ~100 KB of parameters into the temporary folder): the previous
    OUT_DIR survives each, and after the next run no temporary folder is left."""
    source, _ = make_hf_model()
    out = tmp_path / "cca"
    assert cli.main([str(source), str(out)]) == 0
    capsys.readouterr()
    previous = snapshot(out)
    for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGKILL):
        process = _start(CONVERTER, source, out, "--overwrite")
        written = [p for p in tmp_path.iterdir() if ".tmp-" in p.name]
        assert written and any((written[0] / "params").rglob("*"))
        process.send_signal(signum)
        assert process.wait(timeout=60) != 0
        assert snapshot(out) == previous, signal.Signals(signum).name
        left = hidden_temporaries(tmp_path)
        assert left == ([] if signum != signal.SIGKILL else [written[0].name])
    assert cli.main([str(source), str(out), "--overwrite"]) == 0
    assert hidden_temporaries(tmp_path) == [] and is_converted_dir(out)
    model = from_pretrained(out)
    assert np.isfinite(np.asarray(model(np.zeros((1, 4), np.int32)))).all()
