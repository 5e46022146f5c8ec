"""Generate text with a KV cache: the compressed CCA cache (core tokens + raw window,
docs/cca.md §5) or a full cache. The continuation is streamed to stdout; progress and the
closing statistics (prefill seconds, decode tokens/s, cache bytes next to a full cache) go to
stderr.

`python -m cca_jax.generate`, the command line of `cca_jax.generate` (the paragraph above is
its --help description):

    python -m cca_jax.generate --model PATH (--prompt TEXT | --prompt-file FILE)
        --max-new-tokens N [--attention cca|full] [--group-size G --window-size W]
        [--full-attention-layers 3,11]
        [--temperature T --top-p P --seed S]

Every check of user input runs before the model is loaded and before anything is printed to
stdout (bad input: `error: ...` on stderr, exit code 2). The work is
`cca_jax.generate.CachedGeneration` on the model that `cca_jax.from_pretrained` loads with the
`CCAConfig` built from --group-size / --window-size.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import jax
import numpy as np

from cca_jax import command_line
from cca_jax.command_line import layer_indices_argument
from cca_jax.config import DEFAULT_CCA, CCAConfig, check_layer_indices, describe_layers
from cca_jax.generate import CachedGeneration, GenerationStats, Sampling, _check_max_new_tokens
from cca_jax.llama import check_token_ids


class _TextStream:
    """Prints the text of a growing token list as it is produced (whole characters only)."""

    def __init__(self, tokenizer, out):
        self.tokenizer, self.out = tokenizer, out
        self.tokens: list[int] = []
        self.printed = ""

    def add(self, token: int) -> None:
        self.tokens.append(int(token))
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.endswith("\ufffd"):      # an incomplete multi-byte character: wait
            return
        if text.startswith(self.printed):
            self.out.write(text[len(self.printed):])
            self.out.flush()
            self.printed = text

    def finish(self) -> None:
        text = self.tokenizer.decode(self.tokens, skip_special_tokens=True)
        if text.startswith(self.printed) and text != self.printed:
            self.out.write(text[len(self.printed):])
        self.out.write("\n")
        self.out.flush()


def _format_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _eos_ids(tokenizer, config) -> set[int]:
    ids = set()
    for value in (config.eos_token_id, getattr(tokenizer, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (tuple, list)):
            ids.update(int(v) for v in value)
    return ids


def _build_parser() -> argparse.ArgumentParser:
    parser = command_line.parser("cca_jax.generate", __doc__)
    parser.add_argument("--model", required=True, metavar="PATH",
                        help="a directory from `python -m cca_jax.convert`, or a Hugging Face "
                             "LLaMA/Qwen2 directory")
    prompt = parser.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", metavar="TEXT", help="the prompt text")
    prompt.add_argument("--prompt-file", metavar="FILE", help="read the prompt from this file")
    parser.add_argument("--max-new-tokens", type=int, required=True, metavar="N",
                        help="tokens to generate (>= 0); stops earlier at end-of-sequence "
                             "unless --ignore-eos")
    parser.add_argument("--attention", choices=("cca", "full"), default="cca",
                        help="cca: compressed CCA cache and CCA attention; full: ordinary "
                             "cache and causal attention (default: %(default)s)")
    parser.add_argument("--group-size", type=int, default=DEFAULT_CCA.group_size, metavar="G",
                        help="CCA group size g (default: %(default)s, the paper's)")
    parser.add_argument("--window-size", type=int, default=DEFAULT_CCA.window_size,
                        metavar="W", help="CCA local window w (default: %(default)s, the "
                                          "paper's)")
    parser.add_argument("--full-attention-layers", type=layer_indices_argument, default=None,
                        metavar="I,J", help="hybrid: these layers (from 0) use full attention "
                                            "and a full cache, the rest CCA; 'none' for no "
                                            "layer (default: what the model directory "
                                            "records, e.g. a train.finetune export)")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T",
                        help="0 = greedy (default), otherwise sample from softmax(logits / T)")
    parser.add_argument("--top-p", type=float, default=1.0, metavar="P",
                        help="nucleus sampling mass, in (0, 1] (default: %(default)s)")
    parser.add_argument("--seed", type=int, default=0, metavar="S",
                        help="sampling seed (default: %(default)s)")
    parser.add_argument("--dtype", choices=("auto", "float32", "bfloat16"), default="auto",
                        help="compute dtype; auto = bfloat16 on a GPU, float32 elsewhere")
    parser.add_argument("--max-length", type=int, default=None, metavar="L",
                        help="cache capacity in tokens (default: prompt + max-new-tokens)")
    parser.add_argument("--tokenizer", metavar="PATH", default=None,
                        help="tokenizer directory (default: the model directory)")
    parser.add_argument("--chat", action="store_true",
                        help="wrap the prompt in the tokenizer's chat template as a user turn")
    parser.add_argument("--ignore-eos", action="store_true",
                        help="keep generating after an end-of-sequence token")
    return parser


def _read_prompt(args) -> str:
    """The prompt text of --prompt or --prompt-file; ValueError / FileNotFoundError naming the
    argument when it is not UTF-8 text, not a file, or empty."""
    if args.prompt_file is not None:
        path = Path(args.prompt_file).expanduser()
        if path.is_dir():
            raise IsADirectoryError(f"--prompt-file {str(path)!r} is a directory; expected a "
                                    "UTF-8 text file")
        if not path.exists():
            raise FileNotFoundError(f"--prompt-file {str(path)!r} does not exist")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"--prompt-file {str(path)!r} is not UTF-8 text (byte "
                             f"0x{err.object[err.start]:02x} at offset {err.start})") from None
    else:
        text = args.prompt
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as err:
            # Python decodes command-line bytes that are not UTF-8 to lone surrogates.
            raw = text[err.start].encode("utf-8", "surrogateescape")
            raise ValueError(f"--prompt is not UTF-8 text (byte 0x{raw[0]:02x} at character "
                             f"{err.start}); pass UTF-8 text, or --prompt-file FILE") from None
    if not text.strip():
        raise ValueError("the prompt is empty")
    return text


def closing_report(stats: GenerationStats, max_length: int, stopped: str = "") -> list[str]:
    """The closing statistics lines: prefill, decode and cache bytes next to a full cache."""
    steps = max(stats.new_tokens - 1, 0)
    if stats.new_tokens == 0:
        lines = ["prefill: not run (no new tokens requested)", "decode: 0 tokens"]
    else:
        lines = [f"prefill: {stats.prompt_tokens} tokens in {stats.prefill_s:.2f} s "
                 f"({stats.prompt_tokens / max(stats.prefill_s, 1e-9):.0f} tokens/s, first "
                 f"token included; compile {stats.compile_s:.1f} s not included)"]
        if steps:
            lines.append(f"decode: {stats.new_tokens} tokens{stopped}, {steps} decode steps in "
                         f"{stats.decode_s:.2f} s = {stats.decode_tokens_per_s:.1f} tokens/s")
        else:
            lines.append(f"decode: {stats.new_tokens} token{stopped}, from the prefill; no "
                         "decode step")
    change = 1 - stats.cache_bytes / stats.full_cache_bytes
    # At short lengths the CCA cache (a ring of w + g raw slots)
    # can be larger than a full cache of the same length.
    relation = f"{100 * change:.1f}% less" if change >= 0 else f"{-100 * change:.1f}% more"
    kinds = stats.cache_bytes_by_kind
    split = ""
    if len(kinds) > 1:      # a hybrid model: each layer counted by its kind
        split = " (" + ", ".join(
            f"{layers} {'CCA' if kind == 'cca' else 'full-attention'} layer"
            f"{'s' if layers > 1 else ''} {_format_bytes(nbytes)}"
            for kind, (layers, nbytes) in kinds.items()) + ")"
    lines.append(f"cache: {_format_bytes(stats.cache_bytes)} ({stats.cache_bytes} bytes) for "
                 f"{max_length} positions{split}; a full cache would take "
                 f"{_format_bytes(stats.full_cache_bytes)} ({stats.full_cache_bytes} bytes): "
                 f"{relation}")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = _build_parser().parse_args(argv)
    err = sys.stderr
    try:
        # Every check that can fail on user input runs before the model is loaded and
        # before anything is printed to stdout.
        _check_max_new_tokens(args.max_new_tokens)
        Sampling(args.temperature, args.top_p)
        for name in ("group_size", "window_size"):
            if getattr(args, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got "
                                 f"{getattr(args, name)}")
        model_dir = Path(args.model).expanduser()
        if not model_dir.is_dir():
            raise FileNotFoundError(f"--model {str(model_dir)!r} is not a directory")
        text = _read_prompt(args)

        from cca_jax.loading import from_pretrained, load_tokenizer, read_config

        tokenizer = load_tokenizer(args.tokenizer or model_dir)
        vocab_size = read_config(model_dir).vocab_size
        if len(tokenizer) > vocab_size:
            raise ValueError(
                f"the tokenizer ({args.tokenizer or model_dir}) has {len(tokenizer)} tokens "
                f"but the model's vocabulary has {vocab_size}: ids {vocab_size} and above "
                "cannot be embedded; use the tokenizer that belongs to this model "
                "(--tokenizer DIR)")
        if args.chat:
            prompt_ids = tokenizer.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True,
                return_dict=False)
            if isinstance(prompt_ids, dict) or hasattr(prompt_ids, "keys"):
                prompt_ids = prompt_ids["input_ids"]
        else:
            prompt_ids = tokenizer(text)["input_ids"]
        prompt_ids = np.asarray(prompt_ids, np.int32).reshape(1, -1)
        if prompt_ids.shape[1] == 0:
            raise ValueError("the prompt is empty after tokenisation")
        check_token_ids(prompt_ids, vocab_size, "the tokenised prompt")
        needed = prompt_ids.shape[1] + max(args.max_new_tokens - 1, 0)
        if args.max_length is not None and prompt_ids.shape[1] > args.max_length:
            raise ValueError(f"the prompt ({prompt_ids.shape[1]} tokens) is longer than the "
                             f"cache (--max-length {args.max_length})")
        if args.max_length is not None and needed > args.max_length:
            raise ValueError(f"the prompt ({prompt_ids.shape[1]} tokens) plus "
                             f"{args.max_new_tokens} new tokens need a cache of {needed} "
                             f"positions, but --max-length is {args.max_length}")

        dtype = args.dtype
        if dtype == "auto":
            dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
        stored = read_config(model_dir)
        layers = args.full_attention_layers
        layers = stored.full_attention_layers if layers is None else check_layer_indices(
            layers, stored.num_hidden_layers, "--full-attention-layers")
        print(f"loading {model_dir} ({dtype}, attention={args.attention}"
              + (f", g={args.group_size}, w={args.window_size}" if args.attention == "cca"
                 else "")
              + (f", full attention in layers {describe_layers(layers)}"
                 if args.attention == "cca" and layers else "") + ") ...", file=err, flush=True)
        cca = CCAConfig(group_size=args.group_size, window_size=args.window_size)
        model = from_pretrained(model_dir, attention=args.attention, cca=cca, dtype=dtype,
                                full_attention_layers=layers)
        eos = set() if args.ignore_eos else _eos_ids(tokenizer, model.config)
        session = CachedGeneration(model, prompt_ids, args.max_new_tokens,
                                   temperature=args.temperature, top_p=args.top_p,
                                   seed=args.seed, max_length=args.max_length,
                                   eos_token_ids=sorted(eos))
    except (ValueError, TypeError, FileNotFoundError, NotADirectoryError, OSError) as error:
        return command_line.usage_error(error)

    stats = session.stats
    if args.max_new_tokens:
        print(f"prompt: {stats.prompt_tokens} tokens; cache for {session.spec.max_length} "
              f"positions; compiling prefill and decoding ...", file=err, flush=True)
        session.compile()
        print(f"compiled in {stats.compile_s:.1f} s; generating ({jax.default_backend()}, "
              f"decode attention: {session.implementation})", file=err, flush=True)
    else:
        print(f"prompt: {stats.prompt_tokens} tokens; --max-new-tokens 0: nothing to "
              "generate", file=err, flush=True)
    print("-" * 72, file=err, flush=True)
    stream = _TextStream(tokenizer, sys.stdout)
    stopped = ""
    for tokens in session:
        token = int(tokens[0])
        if token in eos:
            stopped = " (stopped at end-of-sequence)"
            break
        stream.add(token)
    stream.finish()
    print("-" * 72, file=err)
    print("\n".join(closing_report(stats, session.spec.max_length, stopped)), file=err,
          flush=True)
    return 0


if __name__ == "__main__":      # python -m cca_jax.generate.cli (same as cca_jax.generate)
    sys.exit(main())
