"""Run directory: orbax checkpoints, metrics.jsonl / eval.jsonl, resumption.

Layout of `--out DIR`:

    checkpoints/<step>/state/   orbax: {"params", "opt_state", "rng"} as sharded arrays
    checkpoints/<step>/meta/    JSON: step, data position (sequences consumed), seed, the
                                arguments that fix the trajectory, the model config
    metrics.jsonl               one object per step: step, loss, lr, grad_norm, tokens_per_s
    eval.jsonl                  one object per held-out evaluation: step, loss, perplexity
    shardings.json              where every parameter / optimizer array lives (from .sharding)
    export/                     the final parameters as a converted cca_jax model directory

A checkpoint at step `s` holds the state after `s` updates; the batch of the next step is
rebuilt from `(seed, s)` (train/data.py), and the RNG key is stored with the state. Restoring
passes abstract arrays with shardings, so each device reads only its own shards (the mesh
may differ from the one that saved). Saves are asynchronous; `close` waits for them.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Mapping

import jax


class RunDirectory:
    def __init__(self, out: Path, keep: int):
        import orbax.checkpoint as ocp

        self.out = Path(out).expanduser().absolute()
        self.metrics_file = self.out / "metrics.jsonl"
        self.eval_file = self.out / "eval.jsonl"
        self._ocp = ocp
        self.manager = ocp.CheckpointManager(
            self.out / "checkpoints",
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True,
                                                 enable_async_checkpointing=True),
            item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state: Mapping, meta: Mapping[str, Any]) -> None:
        ocp = self._ocp
        if step in self.manager.all_steps():
            return
        self.manager.save(step, args=ocp.args.Composite(
            state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(dict(meta))), force=True)

    def restore_meta(self, step: int) -> dict:
        ocp = self._ocp
        return dict(self.manager.restore(
            step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"])

    def restore(self, step: int, abstract_state) -> dict:
        ocp = self._ocp
        return self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state)))["state"]

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()

    # ------------------------------------------------------------------ logs

    def truncate_logs(self, step: int) -> None:
        """Drop log lines of steps after `step` (written after the checkpoint being resumed)."""
        if jax.process_index() != 0:
            return
        for file in (self.metrics_file, self.eval_file):
            if not file.is_file():
                continue
            kept = []
            for line in file.read_text().splitlines():
                if line.strip() and json.loads(line)["step"] <= step:
                    kept.append(line)
            file.write_text("".join(f"{line}\n" for line in kept))

    def log(self, file: Path, record: Mapping[str, Any]) -> None:
        if jax.process_index() != 0:
            return
        with open(file, "a") as f:
            f.write(json.dumps(dict(record)) + "\n")

    def read_log(self, file: Path) -> list[dict]:
        if not file.is_file():
            return []
        return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]


def abstract_with_shardings(tree, shardings):
    """ShapeDtypeStructs carrying the target shardings (orbax restores straight into them)."""
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)
