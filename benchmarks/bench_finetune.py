"""Throughput of `python -m train.finetune`, attention="cca" against "full", same settings.

    python -m benchmarks.bench_finetune --config CONFIG.json --tokenizer DIR [--seq-len 16384]
        [--steps 8] [--rope-theta 1e6] [--mesh 1x1] [--out DIR]

Builds a Hugging Face LLaMA with the architecture of CONFIG.json and random weights (tokens/s
does not depend on the weight values; this lets a machine without the real checkpoint
measure a real model shape), then runs the fine-tuning CLI once per attention kind and reads
`tokens_per_s` from each run's metrics.jsonl (median over the steps after the first, which
includes compilation). A benchmark, not a test.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

from cca_jax.config import DEFAULT_CCA


def random_hf_model(config_path: Path, tokenizer_dir: Path, out: Path) -> Path:
    import torch
    import transformers

    config = transformers.LlamaConfig.from_pretrained(config_path)
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tokenizer_dir / name).is_file():
            shutil.copy(tokenizer_dir / name, out / name)
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_finetune", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="config.json of the model shape")
    parser.add_argument("--tokenizer", required=True, help="directory with tokenizer.json")
    parser.add_argument("--seq-len", type=int, default=16384)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--rope-theta", type=float, default=1e6)
    parser.add_argument("--mesh", default="1x1")
    parser.add_argument("--group-size", type=int, default=DEFAULT_CCA.group_size)
    parser.add_argument("--window-size", type=int, default=DEFAULT_CCA.window_size)
    parser.add_argument("--out", default="bench_finetune_out")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    model_dir = random_hf_model(Path(args.config), Path(args.tokenizer), out / "model")
    results = {}
    for attention in ("cca", "full"):
        run = out / f"run-{attention}"
        command = [sys.executable, "-m", "train.finetune", "--model", str(model_dir),
                   "--attention", attention, "--group-size", str(args.group_size),
                   "--window-size", str(args.window_size), "--seq-len", str(args.seq_len),
                   "--steps", str(args.steps), "--batch-size", "1", "--mesh", args.mesh,
                   "--rope-theta", str(args.rope_theta), "--eval-every", "0",
                   "--eval-sequences", "0", "--save-every", "0", "--no-export",
                   "--out", str(run), "--overwrite"]
        print("+", " ".join(command), flush=True)
        subprocess.run(command, check=True, env=os.environ.copy())
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        rates = [row["tokens_per_s"] for row in rows[1:]]
        results[attention] = {"tokens_per_s": statistics.median(rates),
                              "loss_first": rows[0]["loss"], "loss_last": rows[-1]["loss"],
                              "steps": len(rows)}
    speedup = results["cca"]["tokens_per_s"] / results["full"]["tokens_per_s"]
    (out / "bench_finetune.json").write_text(json.dumps(
        {"args": vars(args), "results": results, "speedup": speedup}, indent=2))
    print(f"\nseq-len {args.seq_len}, mesh {args.mesh}: cca "
          f"{results['cca']['tokens_per_s']:.0f} tokens/s, full "
          f"{results['full']['tokens_per_s']:.0f} tokens/s, ratio {speedup:.2f}x")
    return 0


if __name__ == "__main__":
    sys.exit(main())
