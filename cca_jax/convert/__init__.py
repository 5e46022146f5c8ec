"""`python -m cca_jax.convert`: Hugging Face LLaMA / Qwen2 directory <-> converted cca_jax dir.

    python -m cca_jax.convert HF_DIR OUT_DIR [--dtype auto|float32|bfloat16] [--check] [--overwrite]
    python -m cca_jax.convert --to-hf CCA_DIR HF_OUT_DIR [--overwrite]

The conversions and the `--check` comparison with transformers' PyTorch model are library
calls here (`hf_to_converted`, `converted_to_hf`, `check`); the command line is
`cca_jax/convert/cli.py`; the mapping is in `cca_jax.hf` and the directory format in
`cca_jax.converted`. Output directories are written atomically
(`cca_jax.io.atomic_directory`): an error, Ctrl-C or SIGTERM leaves no OUT_DIR and no
temporary behind and an existing OUT_DIR untouched; after a SIGKILL the next run removes the
hidden temporary the killed one left. Bad input (including an OUT_DIR that is or contains
the input, or an existing entry inside it, or that cannot be written) ends with
`error: ...` on stderr and exit code 1 before any weights are read.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

DTYPE_CHOICES = ("auto", "float32", "bfloat16")
DEFAULT_CHECK_TOLERANCE = 1e-4  # relative to max(1, max |logit|)


def _size(path: Path) -> str:
    total = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    for unit in ("B", "KB", "MB", "GB"):
        if total < 1024 or unit == "GB":
            return f"{total:.0f} {unit}" if unit == "B" else f"{total:.1f} {unit}"
        total /= 1024
    return ""


def _require_new_output(out_dir: Path, overwrite: bool, source: Path) -> None:
    """Before any work: refuse an OUT_DIR that is or contains the input, or an existing entry
    inside it (--overwrite would delete the input or part of it), an existing OUT_DIR without
    --overwrite, and a location that cannot be written. Symbolic links are followed for the
    comparison."""
    from cca_jax.io import check_writable, remove_stale_temporaries

    out_real, source_real = out_dir.expanduser().resolve(), source.expanduser().resolve()
    if out_real == source_real:
        raise ValueError(f"output directory {str(out_dir)!r} is the input directory; choose "
                         "another OUT_DIR")
    if source_real.is_relative_to(out_real):
        raise ValueError(f"output directory {str(out_dir)!r} contains the input directory "
                         f"{str(source)!r}; replacing it would delete the input: choose an "
                         "OUT_DIR outside the input")
    if out_real.is_relative_to(source_real) and os.path.lexists(out_dir):
        # A new folder inside the input only adds to it; an existing entry is part of it.
        raise ValueError(f"output directory {str(out_dir)!r} already exists inside the input "
                         f"directory {str(source)!r}; replacing it would delete part of the "
                         "input: choose a new OUT_DIR or one outside the input")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"output directory {str(out_dir)!r} already exists; pass "
                              "--overwrite to replace it")
    remove_stale_temporaries(out_dir)   # what a killed earlier run left (cca_jax/io.py)
    check_writable(out_dir)


def hf_to_converted(hf_dir: Path, out_dir: Path, *, dtype: str = "auto",
                    overwrite: bool = False) -> Path:
    """Convert an HF directory into our format, printing progress. Returns OUT_DIR."""
    from cca_jax import hf
    from cca_jax.converted import save_converted

    start = time.perf_counter()
    print(f"reading config {hf_dir / 'config.json'}", flush=True)
    config = hf.llama_config_from_hf(hf.read_hf_config(hf_dir))
    _require_new_output(out_dir, overwrite, hf_dir)
    files = hf.weight_files(hf_dir)
    print(f"reading weights: {', '.join(f.name for f in files)} "
          f"({sum(f.stat().st_size for f in files) / 2**20:.1f} MB)", flush=True)
    state_dict = hf.load_hf_state_dict(hf_dir)
    stored = hf.stored_dtype(state_dict.values())
    param_dtype = stored if dtype == "auto" else dtype
    config = config.replace(param_dtype=param_dtype)
    print(f"converting {len(state_dict)} tensors: {config.model_type}, "
          f"{config.num_hidden_layers} layers, hidden {config.hidden_size}, heads "
          f"{config.num_attention_heads}/{config.kv_heads} (q/kv), vocab {config.vocab_size}, "
          f"tied embeddings {config.tie_word_embeddings}, dtype {stored} -> {param_dtype}",
          flush=True)
    params = hf.hf_to_params(state_dict, config, keep_dtype=(dtype == "auto"))
    del state_dict
    print(f"writing {out_dir}", flush=True)
    final = save_converted(out_dir, params, config, tokenizer_src=hf_dir, overwrite=overwrite)
    print(f"done: {final} ({_size(final)}) in {time.perf_counter() - start:.1f} s", flush=True)
    return final


def converted_to_hf(cca_dir: Path, out_dir: Path, *, overwrite: bool = False) -> Path:
    """Write a converted directory back as a Hugging Face directory. Returns OUT_DIR."""
    from cca_jax.converted import load_converted
    from cca_jax.hf import write_hf_dir

    start = time.perf_counter()
    print(f"reading {cca_dir}", flush=True)
    _require_new_output(out_dir, overwrite, cca_dir)
    config, params = load_converted(cca_dir)
    print(f"converting {config.model_type}, {config.num_hidden_layers} layers, "
          f"{config.param_dtype} parameters", flush=True)
    print(f"writing {out_dir}", flush=True)
    final = write_hf_dir(out_dir, params, config, tokenizer_src=cca_dir, overwrite=overwrite)
    print(f"done: {final} ({_size(final)}) in {time.perf_counter() - start:.1f} s", flush=True)
    return final


# The PyTorch comparison behind --check (also used by `python -m convert.qwen25_coder --check`).

CHECK_TEXT = ("Core context aware attention keeps a few pooled core tokens for the distant past "
              "and a window of raw tokens for the recent past. The capital of France is Paris, "
              "and the quick brown fox jumps over the lazy dog while the model reads on.")


def sample_input_ids(vocab_size: int, tokenizer=None, *, batch: int = 2,
                     length: int = 64) -> tuple[np.ndarray, str]:
    """A fixed [batch, length] int32 sample: tokenised text in row 0 when a tokenizer is
    given (repeated to fill the row), deterministic random ids elsewhere."""
    ids = np.random.default_rng(0).integers(0, vocab_size, (batch, length), dtype=np.int64)
    source = "deterministic random ids"
    if tokenizer is not None:
        text_ids = np.asarray(tokenizer(CHECK_TEXT)["input_ids"], dtype=np.int64)
        if text_ids.size and text_ids.max() < vocab_size:
            ids[0] = np.resize(text_ids, length)
            source = "row 0 tokenised text, other rows deterministic random ids"
    return ids.astype(np.int32), source


def compare_with_transformers(hf_dir: str | os.PathLike, converted_dir: str | os.PathLike,
                              *, batch: int = 2, length: int = 64) -> dict:
    """Run transformers' PyTorch model from `hf_dir` (float32, eager attention) and ours from
    `converted_dir` (float32, full attention) on the same sample; report the logit gap."""
    import jax
    import jax.numpy as jnp
    import torch
    from flax import nnx
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    from cca_jax.loading import from_pretrained, load_tokenizer

    try:
        tokenizer = load_tokenizer(hf_dir)
    except Exception:  # no usable tokenizer: random ids are just as good a check
        tokenizer = None
    # The exact float32 path: the reference attention, and full-precision matrix products
    # (XLA's default on a GPU is TF32, which alone moves logits by ~1e-2).
    ours = from_pretrained(converted_dir, attention="full", dtype="float32",
                           param_dtype="float32", implementation="reference")
    ids, source = sample_input_ids(ours.config.vocab_size, tokenizer, batch=batch,
                                   length=length)
    forward = nnx.jit(lambda model, tokens: model(tokens))  # one compile beats eager ops
    with jax.default_matmul_precision("highest"):
        our_logits = np.asarray(forward(ours, jnp.asarray(ids)))
    del ours
    bar_was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        reference = AutoModelForCausalLM.from_pretrained(
            str(hf_dir), dtype=torch.float32, attn_implementation="eager",
            local_files_only=True)
    finally:
        if bar_was_enabled:
            hf_logging.enable_progress_bar()
    reference.eval()
    with torch.no_grad():
        their_logits = reference(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()
    return {"max_abs_diff": float(np.max(np.abs(our_logits - their_logits))),
            "max_abs_logit": float(np.max(np.abs(their_logits))),
            "batch": batch, "length": length, "source": source}


def check(hf_dir: Path, converted_dir: Path, tolerance: float) -> dict:
    """Print the max |logit difference| between transformers and us. Returns
    `compare_with_transformers`' result plus `relative` (the max difference over
    max(1, max |logit|)) and `ok` (relative <= tolerance)."""
    print("check: running transformers (float32, eager attention) and cca_jax (float32, "
          "full attention) on the same tokens ...", flush=True)
    start = time.perf_counter()
    result = compare_with_transformers(hf_dir, converted_dir)
    print(f"check: max |logit difference| = {result['max_abs_diff']:.3e} over "
          f"{result['batch']} x {result['length']} tokens ({result['source']}); "
          f"max |logit| = {result['max_abs_logit']:.2f}; "
          f"{time.perf_counter() - start:.1f} s", flush=True)
    allowed = tolerance * max(1.0, result["max_abs_logit"])
    ok = result["max_abs_diff"] <= allowed
    print(f"check: {'ok' if ok else 'FAILED'} (allowed {allowed:.3e} = {tolerance:g} x "
          "max(1, max |logit|))", flush=True)
    return {**result, "relative": result["max_abs_diff"] / max(1.0, result["max_abs_logit"]),
            "ok": ok}
