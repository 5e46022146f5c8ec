"""Fixtures for the fine-tuning tests: a tiny random model, a small corpus, and runners for
`python -m train.finetune` in a subprocess with 8 CPU devices, and for several runs of it in
one such subprocess (XLA_FLAGS must be set before jax starts, so multi-device runs never share
this pytest process)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.train.tiny import make_corpus, make_tiny_model

REPO = Path(__file__).resolve().parents[2]

# One small trajectory shared by the 8x1, 4x2 and resume tests (float32 on the CPU).
TINY_ARGS = ["--seq-len", "32", "--group-size", "4", "--window-size", "8", "--batch-size", "8",
             "--lr", "3e-3", "--warmup-steps", "2", "--eval-sequences", "8", "--seed", "3"]


def finetune_env(devices: int = 8) -> dict:
    """Environment of a child process with `devices` CPU devices, offline."""
    env = dict(os.environ)
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") +
                        f" --xla_force_host_platform_device_count={devices}").strip()
    env["JAX_PLATFORMS"] = "cpu"
    env["HF_HUB_OFFLINE"] = "1"
    env["HF_DATASETS_OFFLINE"] = "1"
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def finetune_command(args) -> list[str]:
    return [sys.executable, "-m", "train.finetune", *map(str, args)]


def run_finetune(args, devices: int = 8, timeout: float = 240) -> subprocess.CompletedProcess:
    return subprocess.run(finetune_command(args), cwd=REPO, env=finetune_env(devices),
                          capture_output=True, text=True, timeout=timeout)


# Several runs in one process: train.finetune's command line, main(), once per argument list, each run's
# stdout and stderr captured at the file-descriptor level (C++ logging included, as a
# subprocess's would be). Every `python -m train.finetune` launch spends ~6 s importing jax,
# transformers and orbax and tracing the train step before its first update.
SEQUENCE = textwrap.dedent("""
    import json, os, shutil, sys, tempfile, traceback
    from train.finetune import cli

    def run(args):
        files = [tempfile.TemporaryFile(), tempfile.TemporaryFile()]
        sys.stdout.flush(), sys.stderr.flush()
        saved = [os.dup(1), os.dup(2)]
        os.dup2(files[0].fileno(), 1), os.dup2(files[1].fileno(), 2)
        try:
            code = cli.main(args)
        except SystemExit as exit:
            code = exit.code
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(saved[0], 1), os.dup2(saved[1], 2)
        for f in files:
            f.seek(0)
        return [code] + [f.read().decode(errors="replace") for f in files]

    results = []
    for kind, arg in json.load(open(sys.argv[1])):
        if kind == "remove":
            shutil.rmtree(arg)
        elif kind == "copy":
            shutil.copy(*arg)
        elif kind == "copytree":
            shutil.copytree(*arg)
        else:
            results.append(run(arg))
    json.dump(results, open(sys.argv[2], "w"))
""")


def run_finetune_sequence(steps, workdir: Path, devices: int = 8,
                          timeout: float = 600) -> list[subprocess.CompletedProcess]:
    """The runs of `steps` one after the other in one child process with `devices` CPU
    devices. A step is ("run", argument list), ("remove", directory), ("copy", (file,
    destination)) or ("copytree", (directory, destination)), the last three done between the
    runs. One result per run, as `run_finetune` would have returned it."""
    workdir.mkdir(parents=True, exist_ok=True)
    plan, report = workdir / "sequence.json", workdir / "results.json"
    plan.write_text(json.dumps([(kind, str(arg) if kind == "remove" else [str(a) for a in arg])
                                for kind, arg in steps]))
    child = subprocess.run([sys.executable, "-c", SEQUENCE, str(plan), str(report)], cwd=REPO,
                           env=finetune_env(devices), capture_output=True, text=True,
                           timeout=timeout, check=False)
    assert child.returncode == 0 and report.is_file(), child.stdout + child.stderr
    commands = [finetune_command(arg) for kind, arg in steps if kind == "run"]
    return [subprocess.CompletedProcess(command, code, stdout, stderr)
            for command, (code, stdout, stderr) in zip(commands, json.loads(report.read_text()))]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


class Tiny:
    def __init__(self, root: Path):
        self.root = root
        self.model = make_tiny_model(root / "model")
        self.train = make_corpus(root / "train", documents=12, seed=0)
        self.eval = make_corpus(root / "eval", documents=3, seed=1)

    def args(self, out: Path, *extra) -> list:
        return ["--model", self.model, "--data", *self.train, "--eval-data", *self.eval,
                "--out", out, *TINY_ARGS, *extra]


@pytest.fixture(scope="session")
def tiny(tmp_path_factory) -> Tiny:
    return Tiny(tmp_path_factory.mktemp("tiny"))
