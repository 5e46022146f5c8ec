"""Long-context quality of a model with CCA or full attention: `run(EvaluateJob(...))`, and
on the command line `python -m train.evaluate` (`train/evaluate/cli.py`).

Four measurements, each at every `--lengths` context length:

- ppl: perplexity on held-out documents (the plays `train.finetune` holds out, and KJV books;
  see `train.eval_tasks`). Each document contributes `--ppl-windows` windows that END at the
  same token for every length, and the loss is reported on the last `--ppl-tail` tokens of
  each window: the same tokens scored with more and more context, so long-range use shows as
  a perplexity that falls with length. The whole-window perplexity is reported too.
- passkey: a random 5-digit key hidden at `--depths` (percent) of repetitive filler text.
- mdqa: synthetic multi-document QA, k documents of held-out prose each holding
  "The code of NAME is NUMBER." facts; the question asks for one fact of the document at
  the given depth.
- copy: held-out standard-library code with every identifier renamed to a made-up word;
  top-1 accuracy on the later tokens of renamed identifiers (copyable only from an earlier
  occurrence in the context), overall and for copies from more than `--copy-far` tokens back.

passkey and mdqa are scored by ranking: the log-likelihood of the true value and of
`--candidates - 1` distractors (passkey: other random keys; mdqa: the values of the prompt's
other facts), teacher-forced after one pass over the prompt (`model_candidate_fn`); the
accuracy is the true value ranked strictly first, with a 95% Wilson interval. The greedy
answer's exact match is kept as a second column (up to its first wrong token the teacher-
forced argmaxes are the greedy tokens; `--answer-mode generate` decodes with the cache
instead). g, w and a hybrid model's full-attention layers come from the model directory (a
train.finetune export records them) unless given.

Every example's record, and every perplexity and copy window's sums, are written to
`results.json`, so two models evaluated alike can be compared pairwise
(`train.experiments`). `run` writes `results.json` and PNG plots into `--out` and returns the
results; the command line also prints them as a table (`format_table`).

    python -m train.evaluate --model PATH --lengths 1024 2048 4096 8192
        [--attention cca|full] [--group-size G --window-size W] [--full-attention-layers I,J]
        [--tasks ppl passkey mdqa copy] [--rope-theta T | --rope-scaling linear:2] [--examples N] [--out DIR] [--seed S]
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from cca_jax.config import DEFAULT_CCA, CCAConfig, check_layer_indices, describe_layers
from cca_jax.io import atomic_write_text
from train import eval_tasks as tasks_lib
from train.eval_tasks import TASKS, TaskExample
from train.plots import length_axis, save_figure

NllFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
TokenFn = Callable[[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]
DEFAULT_TAIL = 256
RESULTS_FILE = "results.json"
PLOT_FILES = ("accuracy_vs_length.png", "accuracy_by_depth.png", "perplexity_vs_length.png")


class UsageError(ValueError):
    """A bad argument or input, found before the model is loaded."""


# ---------------------------------------------------------------------------------------
# The model as functions: per-token loss, and answers.


def _pad_rows(ids: np.ndarray, rows: int) -> np.ndarray:
    """`ids` with its first row repeated up to `rows` rows (one compiled shape per width)."""
    if ids.shape[0] >= rows:
        return ids
    return np.concatenate([ids, np.repeat(ids[:1], rows - ids.shape[0], axis=0)])


def _pad_columns(ids: np.ndarray, width: int) -> np.ndarray:
    """`ids` right-padded with zeros to `width` columns. Attention is causal, so the padding
    never changes a real position's output: every length shares one compiled program."""
    if ids.shape[1] > width:
        raise ValueError(f"a sequence of {ids.shape[1]} tokens exceeds the compiled width {width}")
    return np.pad(ids, ((0, 0), (0, width - ids.shape[1])))


def model_token_fn(model, *, chunk_size: int = 1024, batch_size: int = 1,
                   width: int | None = None) -> TokenFn:
    """`fn(ids [B, L], targets [B, L]) -> (nll float64 [B, L], correct bool [B, L])`:
    -log p(targets[b, i] | ids[b, :i+1]) and whether it is the argmax (top-1).

    The vocabulary projection runs over `chunk_size` positions at a time, so no
    [B, L, vocab] array is ever materialised. Batches are padded to `batch_size` rows and,
    when `width` is given, to `width` columns (one compilation for every length).
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from train.loss import token_losses

    graphdef, state = nnx.split(model)

    @jax.jit
    def scores(state, ids, targets):
        m = nnx.merge(graphdef, state)
        return token_losses(m, m.hidden_states(ids), targets, chunk_size)

    def call(ids, targets):
        ids, targets = np.asarray(ids, np.int32), np.asarray(targets, np.int32)
        if ids.shape != targets.shape or ids.ndim != 2:
            raise ValueError(f"ids and targets must both be [batch, length], got {ids.shape} "
                             f"and {targets.shape}")
        B, L = ids.shape
        if width is not None:
            ids, targets = _pad_columns(ids, width), _pad_columns(targets, width)
        nll, top1 = scores(state, jnp.asarray(_pad_rows(ids, batch_size)),
                           jnp.asarray(_pad_rows(targets, batch_size)))
        return np.asarray(nll, np.float64)[:B, :L], np.asarray(top1)[:B, :L]

    return call


def model_nll_fn(model, **options) -> NllFn:
    """`nll(ids [B, L], targets [B, L]) -> float64 [B, L]` (see `model_token_fn`)."""
    token_fn = model_token_fn(model, **options)
    return lambda ids, targets: token_fn(ids, targets)[0]


def greedy_prefix(argmax_tokens: Sequence[int], answer_ids: Sequence[int]) -> list[int]:
    """Greedy tokens known from teacher forcing: the argmaxes up to the first wrong one."""
    out = []
    for predicted, expected in zip(argmax_tokens, answer_ids):
        out.append(int(predicted))
        if int(predicted) != int(expected):
            break
    return out


def model_candidate_fn(model, tokenizer, *, prompt_width: int, answer_width: int,
                       candidates: int, batch_size: int = 1,
                       decode_implementation: str = "auto") -> tasks_lib.AnswerFn:
    """An answer function backed by the model: for each example, the log-likelihood of each
    candidate (teacher forcing) and the greedy answer.

    The prompt runs through the model once (`cca_jax.cache.prefill`, CCA's compressed cache
    or a full one); the cache is copied once per candidate and each candidate's tokens are
    fed through `decode_step`, so K candidates cost one prompt and K short continuations.
    The greedy prediction is read off the true answer's row: up to its first wrong token the
    argmaxes are exactly greedy decoding's tokens (`greedy_prefix`). Prompts are padded to
    `prompt_width` columns and batches to `batch_size` rows: one compilation in all.
    """
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cca_jax import cache as cache_lib

    config = model.config
    K, A = int(candidates), int(answer_width)
    spec = cache_lib.CacheSpec.for_model(config, batch_size, prompt_width + A)
    tiled = dataclasses.replace(spec, batch_size=batch_size * K)
    implementation = cache_lib.resolve_decode_implementation(decode_implementation,
                                                             config.head_size)
    graphdef, state = nnx.split(model)

    @jax.jit
    def score(state, ids, lengths, answers, mask):
        """ids [B, P], lengths [B]; answers, mask [B, K, A] -> (log-likelihoods [B, K],
        argmax tokens along the first candidate [B, A])."""
        m = nnx.merge(graphdef, state)
        last_logits, cache = cache_lib.prefill(m, spec, ids, lengths)
        first = jax.nn.log_softmax(last_logits.astype(jnp.float32), axis=-1)
        total = jnp.take_along_axis(first, answers[:, :, 0], axis=1) * mask[:, :, 0]
        cache = jax.tree.map(lambda x: jnp.repeat(x, K, axis=0), cache).replace(spec=tiled)
        flat = answers.reshape(batch_size * K, A)

        def step(cache, t):
            logits, cache = cache_lib.decode_step(m, cache, flat[:, t],
                                                  implementation=implementation)
            logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
            picked = jnp.take_along_axis(logp, flat[:, t + 1][:, None], axis=1)[:, 0]
            return cache, (picked, jnp.argmax(logits, axis=-1))

        _, (picked, argmax) = jax.lax.scan(step, cache, jnp.arange(A - 1))
        picked = picked.T.reshape(batch_size, K, A - 1)
        total = total + (picked * mask[:, :, 1:]).sum(-1)
        along_first = argmax.T.reshape(batch_size, K, A - 1)[:, 0]
        greedy = jnp.concatenate([jnp.argmax(last_logits, axis=-1)[:, None], along_first],
                                 axis=1)
        return total, greedy

    def decode(tokens) -> str:
        return tokenizer.decode([int(t) for t in tokens], skip_special_tokens=True)

    def answer(batch: Sequence[TaskExample]) -> list[tasks_lib.Answer]:
        B = len(batch)
        if B > batch_size:
            raise ValueError(f"a batch of {B} examples exceeds batch_size {batch_size}")
        ids = np.zeros((batch_size, prompt_width), np.int32)
        lengths = np.ones((batch_size,), np.int32)
        answers = np.zeros((batch_size, K, A), np.int32)
        mask = np.zeros((batch_size, K, A), np.float32)
        for b, e in enumerate(batch):
            if len(e.prompt_ids) > prompt_width:
                raise ValueError(f"a prompt of {len(e.prompt_ids)} tokens exceeds the compiled "
                                 f"width {prompt_width}")
            if len(e.candidate_ids) > K or max(map(len, e.candidate_ids)) > A:
                raise ValueError(f"{len(e.candidate_ids)} candidates of up to "
                                 f"{max(map(len, e.candidate_ids))} tokens exceed the compiled "
                                 f"{K} x {A}")
            ids[b, :len(e.prompt_ids)] = e.prompt_ids
            lengths[b] = len(e.prompt_ids)
            for k, tokens in enumerate(e.candidate_ids):
                answers[b, k, :len(tokens)] = tokens
                mask[b, k, :len(tokens)] = 1
        totals, greedy = score(state, jnp.asarray(ids), jnp.asarray(lengths),
                               jnp.asarray(answers), jnp.asarray(mask))
        totals, greedy = np.asarray(totals, np.float64), np.asarray(greedy)
        return [tasks_lib.Answer(
            prediction=decode(greedy_prefix(greedy[b], e.answer_ids)),
            candidate_scores=tuple(float(x) for x in totals[b, :len(e.candidate_ids)]))
            for b, e in enumerate(batch)]

    return answer


def generated_predictions(model, tokenizer, examples: Sequence[TaskExample], *,
                          extra_new_tokens: int = 2) -> list[str]:
    """Greedy continuations by cached decoding (`cca_jax.generate.generate`), as text: what
    `--answer-mode generate` records as the prediction."""
    from cca_jax.generate import generate

    out = []
    for e in examples:
        row = generate(model, e.prompt_ids[None], len(e.answer_ids) + extra_new_tokens)[0]
        out.append(tokenizer.decode([int(t) for t in row[len(e.prompt_ids):]],
                                    skip_special_tokens=True))
    return out


# ---------------------------------------------------------------------------------------
# Perplexity.


def window_ends(num_tokens: int, max_length: int, count: int) -> list[int]:
    """Ends (exclusive) of the input windows in a document of `num_tokens` tokens.

    A window of length L is tokens [end - L, end) predicting [end - L + 1, end + 1), so every
    end lies in [max_length, num_tokens - 1]: the same ends serve every length up to
    `max_length`. `count` ends are spread evenly; none when the document is too short.
    """
    if num_tokens - 1 < max_length:
        return []
    ends = np.linspace(max_length, num_tokens - 1, num=count).round().astype(int)
    return sorted(set(int(e) for e in ends))


def _ppl(nll_sum: float, count: int) -> float:
    return float(math.exp(nll_sum / count)) if count else float("nan")


def perplexity_by_length(nll_fn: NllFn, documents: Sequence[tuple[str, str, np.ndarray]],
                         lengths: Sequence[int], *, windows_per_doc: int, tail: int,
                         batch_size: int = 1, progress: bool = False) -> dict:
    """Perplexity on the last `tail` tokens of each window (and on whole windows) per length.

    documents: (name, source, int token array). Documents shorter than max(lengths) + 1
    tokens are skipped (listed under "skipped"), so every length scores the same tokens.
    Each length also lists every window's summed tail NLL (`window_tail_nll`, in the order
    of `documents[*].window_ends`): two models evaluated alike pair up window by window.
    """
    max_length = max(lengths)
    if not 1 <= tail <= min(lengths):
        raise ValueError(f"tail must be in [1, {min(lengths)}] (the smallest length), got {tail}")
    windows, used, skipped = [], [], []
    for name, source, tokens in documents:
        ends = window_ends(len(tokens), max_length, windows_per_doc)
        if not ends:
            skipped.append({"name": name, "source": source, "tokens": int(len(tokens))})
            continue
        used.append({"name": name, "source": source, "tokens": int(len(tokens)),
                     "window_ends": ends})
        windows.extend((source, np.asarray(tokens), end) for end in ends)
    if not windows:
        raise ValueError(f"no held-out document has the {max_length + 1} tokens the longest "
                         f"length needs (longest: {max((len(t) for *_, t in documents), default=0)}"
                         " tokens); lower --lengths or add --ppl-files")
    result = {"tail_tokens": int(tail), "windows_per_document": int(windows_per_doc),
              "documents": used, "skipped": skipped, "by_length": {}}
    for L in lengths:
        sums: dict[str, list[float]] = {}
        per_window = []
        bar = _bar(len(windows), f"ppl L={L}", "win", progress)
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            ids = np.stack([t[e - L:e] for _, t, e in batch]).astype(np.int32)
            targets = np.stack([t[e - L + 1:e + 1] for _, t, e in batch]).astype(np.int32)
            nll = nll_fn(ids, targets)
            for (source, _, _), row in zip(batch, nll):
                per_window.append(float(row[-tail:].sum()))
                for key in (source, "all"):
                    s = sums.setdefault(key, [0.0, 0, 0.0, 0, 0])
                    s[0] += float(row[-tail:].sum())
                    s[1] += tail
                    s[2] += float(row.sum())
                    s[3] += L
                    s[4] += 1
            bar.update(len(batch))
        bar.close()

        def summary(s):
            return {"ppl_tail": _ppl(s[0], s[1]), "ppl_all": _ppl(s[2], s[3]),
                    "tokens_tail": s[1], "tokens_all": s[3], "windows": s[4]}

        entry = summary(sums["all"])
        entry["by_source"] = {k: summary(v) for k, v in sums.items() if k != "all"}
        entry["window_tail_nll"] = per_window
        result["by_length"][str(L)] = entry
    return result


def copy_by_length(token_fn: TokenFn, documents: Sequence[tasks_lib.CopyDocument],
                   lengths: Sequence[int], *, windows_per_doc: int, tail: int, far: int,
                   batch_size: int = 1, progress: bool = False) -> dict:
    """Copying renamed identifiers: top-1 accuracy and NLL on the copying targets (see
    `train.eval_tasks.CopyDocument`) among the last `tail` tokens of each window, per length.

    "far" targets are those whose previous occurrence lies more than `far` tokens back and
    still inside the window: the copies that need more than a raw window of `far` tokens.
    Per window (same order at every length and for every model): targets and hits, all and
    far, for paired comparisons.
    """
    max_length = max(lengths)
    if not 1 <= tail <= min(lengths):
        raise ValueError(f"copy tail must be in [1, {min(lengths)}], got {tail}")
    windows, used = [], []
    for doc in documents:
        ends = window_ends(len(doc.ids), max_length, windows_per_doc)
        if ends:
            used.append({"name": doc.name, "tokens": int(len(doc.ids)), "window_ends": ends,
                         "identifiers": doc.identifiers})
            windows.extend((doc, end) for end in ends)
    if not windows:
        raise ValueError(f"copy: no renamed document has the {max_length + 1} tokens the "
                         "longest length needs")
    result = {"tail_tokens": int(tail), "far_tokens": int(far), "documents": used,
              "by_length": {}}
    for L in lengths:
        rows = []
        bar = _bar(len(windows), f"copy L={L}", "win", progress)
        for start in range(0, len(windows), batch_size):
            batch = windows[start:start + batch_size]
            ids = np.stack([d.ids[e - L:e] for d, e in batch])
            targets = np.stack([d.ids[e - L + 1:e + 1] for d, e in batch])
            nll, top1 = token_fn(ids, targets)
            for (doc, end), row_nll, row_top1 in zip(batch, nll, top1):
                # Target i of the window is token end - L + 1 + i; its context holds the
                # window's first i + 1 tokens, so a previous occurrence `distance` back is
                # inside the window when distance <= i.
                distance = doc.copy_distance[end - L + 1:end + 1]
                position = np.arange(L)
                in_tail = position >= L - tail
                target = in_tail & (distance > 0)
                far_target = target & (distance > far) & (distance <= position)
                rows.append({"targets": int(target.sum()), "hits": int(row_top1[target].sum()),
                             "nll": float(row_nll[target].sum()),
                             "far_targets": int(far_target.sum()),
                             "far_hits": int(row_top1[far_target].sum()),
                             "far_nll": float(row_nll[far_target].sum())})
            bar.update(len(batch))
        bar.close()
        total = {key: sum(r[key] for r in rows) for key in rows[0]}
        entry = {"targets": total["targets"], "far_targets": total["far_targets"],
                 "accuracy": 100 * total["hits"] / total["targets"] if total["targets"]
                 else None,
                 "nll": total["nll"] / total["targets"] if total["targets"] else None,
                 "far_accuracy": 100 * total["far_hits"] / total["far_targets"]
                 if total["far_targets"] else None,
                 "far_nll": total["far_nll"] / total["far_targets"] if total["far_targets"]
                 else None,
                 "windows": rows}
        result["by_length"][str(L)] = entry
    return result


# ---------------------------------------------------------------------------------------
# Model loading.


def with_rope(model, rope_theta: float | None = None, rope_scaling=None):
    """The model with another RoPE base and/or scaling ("none" removes it), same weights."""
    from flax import nnx

    from cca_jax.llama import LlamaForCausalLM
    from cca_jax.loading import load_params_into

    changes = {}
    if rope_theta is not None:
        changes["rope_theta"] = float(rope_theta)
    if rope_scaling is not None:
        changes["rope_scaling"] = None if rope_scaling == "none" else rope_scaling
    if not changes:
        return model
    config = model.config.replace(**changes)
    fresh = nnx.eval_shape(lambda: LlamaForCausalLM(config, rngs=nnx.Rngs(0)))
    return load_params_into(fresh, nnx.to_pure_dict(nnx.state(model, nnx.Param)))


# ---------------------------------------------------------------------------------------
# Report: table, JSON, plots.


def _bar(total: int, desc: str, unit: str, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit=unit, file=sys.stderr, disable=not enabled,
                dynamic_ncols=True, leave=False)


def _fmt(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def _with_interval(task: dict, length: int) -> str:
    value = task["by_length"].get(str(length))
    interval = task.get("interval_by_length", {}).get(str(length))
    if value is None or not interval:
        return _fmt(value, 1)
    return f"{value:.1f} [{interval[0]:.0f}-{interval[1]:.0f}]"


def format_table(results: dict) -> str:
    """The summary table (one row per length) and one depth x length table per task."""
    lengths = results["lengths"]
    ppl = results.get("perplexity")
    copy = results.get("copy")
    header = ["length"]
    if ppl:
        header += [f"ppl last {ppl['tail_tokens']}", "ppl window"]
    answer_tasks = [t for t in ("passkey", "mdqa") if t in results]
    for t in answer_tasks:
        header += [f"{t} ranked first % [95% CI]", f"{t} exact %"]
    if copy:
        header += ["copy top-1 %", f"copy >{copy['far_tokens']} back top-1 %"]
    rows = []
    for L in lengths:
        row = [str(L)]
        if ppl:
            entry = ppl["by_length"][str(L)]
            row += [_fmt(entry["ppl_tail"]), _fmt(entry["ppl_all"])]
        for t in answer_tasks:
            row += [_with_interval(results[t], L),
                    _fmt(results[t]["exact_match"]["by_length"].get(str(L)), 1)]
        if copy:
            entry = copy["by_length"][str(L)]
            row += [_fmt(entry["accuracy"], 1),
                    f"{_fmt(entry['far_accuracy'], 1)} (n={entry['far_targets']})"]
        rows.append(row)
    lines = [f"{results['label']}"]
    lines += _grid(header, rows)
    if ppl and len({d["source"] for d in ppl["documents"]}) > 1:
        sources = sorted({d["source"] for d in ppl["documents"]})
        lines += ["", f"perplexity on the last {ppl['tail_tokens']} tokens, by source"]
        lines += _grid(["length"] + sources,
                       [[str(L)] + [_fmt(ppl["by_length"][str(L)]["by_source"][s]["ppl_tail"])
                                    for s in sources] for L in lengths])
    for task in answer_tasks:
        cells = results[task]["by_length_depth"]
        depths = results["depths"]
        lines += ["", f"{task}: true value ranked first among "
                      f"{'/'.join(map(str, results[task].get('candidates', [])))} "
                      "candidates (%), by depth"]
        lines += _grid(["depth"] + [str(L) for L in lengths],
                       [[f"{tasks_lib.depth_key(d)}%"] + [
                           _fmt(cells.get(str(L), {}).get(tasks_lib.depth_key(d)), 1)
                           for L in lengths] for d in depths])
    return "\n".join(lines)


def _grid(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(r[i]) for r in [header] + rows) for i in range(len(header))]
    line = lambda r: "  ".join(c.rjust(w) for c, w in zip(r, widths))  # noqa: E731
    return [line(header), "  ".join("-" * w for w in widths)] + [line(r) for r in rows]


def write_plots(results: dict, out: Path) -> list[Path]:
    """PNG plots in `out`: accuracy vs length, accuracy by depth and length, perplexity."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    lengths = results["lengths"]
    answer_tasks = [t for t in ("passkey", "mdqa") if t in results]
    label = results["label"]
    if answer_tasks:
        fig, ax = plt.subplots(figsize=(6, 4))
        for task in answer_tasks:
            ax.plot(lengths, [results[task]["by_length"][str(L)] for L in lengths], marker="o",
                    label=f"{task} (ranked first)")
        copy = results.get("copy")
        if copy:
            for key, name in (("accuracy", "copy top-1"),
                              ("far_accuracy", f"copy >{copy['far_tokens']} back")):
                ax.plot(lengths, [math.nan if copy["by_length"][str(L)][key] is None
                                  else copy["by_length"][str(L)][key] for L in lengths],
                        marker="s", linestyle=":", label=name)
        ax.set(xlabel="context length (tokens)", ylabel="accuracy (%)",
               ylim=(-3, 103), title=f"accuracy vs length\n{label}")
        length_axis(ax, lengths)
        ax.legend()
        ax.grid(alpha=0.3)
        written.append(save_figure(fig, out / PLOT_FILES[0]))

        fig, axes = plt.subplots(1, len(answer_tasks), figsize=(4 + 1.2 * len(lengths)
                                                                * len(answer_tasks), 4),
                                 squeeze=False)
        depths = results["depths"]
        for ax, task in zip(axes[0], answer_tasks):
            cells = results[task]["by_length_depth"]
            grid = np.array([[cells[str(L)][tasks_lib.depth_key(d)] for L in lengths]
                             for d in depths])
            ax.imshow(grid, vmin=0, vmax=100, cmap="RdYlGn", aspect="auto")
            ax.set_xticks(range(len(lengths)), [str(L) for L in lengths])
            ax.set_yticks(range(len(depths)), [f"{tasks_lib.depth_key(d)}%" for d in depths])
            ax.set(xlabel="context length (tokens)", ylabel="depth", title=task)
            for i in range(len(depths)):
                for j in range(len(lengths)):
                    ax.text(j, i, f"{grid[i, j]:.0f}", ha="center", va="center", fontsize=8)
        fig.suptitle(f"accuracy (%) by depth and length\n{label}", fontsize=9)
        written.append(save_figure(fig, out / PLOT_FILES[1]))
    ppl = results.get("perplexity")
    if ppl:
        fig, ax = plt.subplots(figsize=(6, 4))
        by_length = ppl["by_length"]
        ax.plot(lengths, [by_length[str(L)]["ppl_tail"] for L in lengths], marker="o",
                label=f"all, last {ppl['tail_tokens']} tokens")
        ax.plot(lengths, [by_length[str(L)]["ppl_all"] for L in lengths], marker="o",
                linestyle="--", label="all, whole window")
        for source in sorted({d["source"] for d in ppl["documents"]}):
            ax.plot(lengths, [by_length[str(L)]["by_source"][source]["ppl_tail"]
                              for L in lengths], marker=".", alpha=0.6,
                    label=f"{source}, last {ppl['tail_tokens']}")
        ax.set(xlabel="context length (tokens)", ylabel="perplexity",
               title=f"held-out perplexity vs length\n{label}")
        length_axis(ax, lengths)
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        written.append(save_figure(fig, out / PLOT_FILES[2]))
    return written


# ---------------------------------------------------------------------------------------
# The job.

ATTENTIONS = ("cca", "full")
IMPLEMENTATIONS = ("auto", "xla", "pallas", "reference")
DTYPES = ("auto", "float32", "bfloat16")
ANSWER_MODES = ("forced", "generate")
DECODE_IMPLEMENTATIONS = ("auto", "jnp", "pallas")


@dataclasses.dataclass(frozen=True, kw_only=True)
class EvaluateJob:
    """One evaluation. Each field is the command-line flag of the same name (`ppl_tail` is
    --ppl-tail, `no_progress` is --no-progress); the command line takes its defaults from here.
    Checked when made (`UsageError` naming the flag): lengths are sorted and made unique, tasks
    made unique, and --ppl-tail / --copy-tail filled in from the smallest length when not given.
    attention, group_size, window_size and full_attention_layers left None come from the
    model directory."""

    # model
    model: str | os.PathLike
    tokenizer: str | os.PathLike | None = None
    attention: str | None = None
    group_size: int | None = None
    window_size: int | None = None
    full_attention_layers: tuple[int, ...] | None = None    # None: the model directory's
    attention_implementation: str = "auto"
    rope_theta: float | None = None
    rope_scaling: str | None = None
    dtype: str = "auto"
    # what to measure
    lengths: tuple[int, ...]
    tasks: tuple[str, ...] = TASKS
    depths: tuple[float, ...] = (0, 25, 50, 75, 100)
    examples: int = 20
    candidates: int = tasks_lib.DEFAULT_CANDIDATES
    seed: int = 0
    answer_mode: str = "forced"
    decode_implementation: str = "auto"
    batch_size: int = 4
    # perplexity
    ppl_sources: tuple[str, ...] = tasks_lib.PPL_SOURCES
    ppl_files: tuple[str, ...] = ()
    ppl_windows: int = 4
    ppl_tail: int | None = None
    # copying renamed code
    copy_docs: int = 8
    copy_windows: int = 4
    copy_tail: int | None = None
    copy_far: int = 1024
    # multi-document QA
    mdqa_doc_tokens: int = 200
    mdqa_facts: int = 2
    # output
    out: str | os.PathLike | None = None
    label: str | None = None
    no_progress: bool = False
    command: str = ""       # the command line, recorded in results.json

    def __post_init__(self):
        def normalise(name, value):
            object.__setattr__(self, name, value)

        normalise("lengths", tuple(sorted(set(self.lengths))))
        normalise("tasks", tuple(dict.fromkeys(self.tasks)))
        for name in ("depths", "ppl_sources"):
            normalise(name, tuple(getattr(self, name)))
        normalise("ppl_files", tuple(str(f) for f in self.ppl_files))
        _check_choices(self)
        if not self.lengths:
            raise UsageError("--lengths needs at least one length")
        bad = [L for L in self.lengths if L < 1]
        if bad:
            raise UsageError(f"--lengths must all be >= 1, got {', '.join(map(str, bad))}")
        bad = [d for d in self.depths if not 0 <= d <= 100]
        if bad:
            raise UsageError(f"--depths are percentages in [0, 100], got "
                             f"{', '.join(map(str, bad))}")
        if self.ppl_tail is None:
            normalise("ppl_tail", max(1, min(DEFAULT_TAIL, min(self.lengths) // 4)))
        if self.copy_tail is None:
            normalise("copy_tail", max(1, min(self.lengths) // 2))
        _check_values(self)


def _check_choices(job: EvaluateJob) -> None:
    for name, choices, value in (
            ("attention", ATTENTIONS + (None,), job.attention),
            ("attention_implementation", IMPLEMENTATIONS, job.attention_implementation),
            ("dtype", DTYPES, job.dtype),
            ("answer_mode", ANSWER_MODES, job.answer_mode),
            ("decode_implementation", DECODE_IMPLEMENTATIONS, job.decode_implementation)):
        if value not in choices:
            raise UsageError(f"--{name.replace('_', '-')} must be one of "
                             f"{', '.join(c for c in choices if c)}, got {value!r}")
    for name, choices in (("tasks", TASKS), ("ppl_sources", tasks_lib.PPL_SOURCES)):
        bad = [v for v in getattr(job, name) if v not in choices]
        if bad:
            raise UsageError(f"--{name.replace('_', '-')}: {', '.join(map(repr, bad))} not "
                             f"among {', '.join(choices)}")


def _positive(job: EvaluateJob, name: str) -> None:
    value = getattr(job, name)
    if value < 1:
        raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {value}")


def _check_values(job: EvaluateJob) -> None:
    """UsageError naming the flag; nothing is read."""
    from cca_jax.rope import parse_rope_scaling

    for name in ("examples", "batch_size", "ppl_windows", "ppl_tail", "mdqa_doc_tokens",
                 "mdqa_facts", "copy_docs", "copy_windows", "copy_tail", "copy_far"):
        _positive(job, name)
    for name in ("group_size", "window_size"):
        if getattr(job, name) is not None:
            _positive(job, name)
    if job.candidates < 2:
        raise UsageError(f"--candidates must be >= 2 (the answer and a distractor), got "
                         f"{job.candidates}")
    if "copy" in job.tasks and job.copy_tail > min(job.lengths):
        raise UsageError(f"--copy-tail {job.copy_tail} exceeds the smallest length "
                         f"{min(job.lengths)}; lower --copy-tail")
    if "ppl" in job.tasks:
        if job.ppl_tail > min(job.lengths):
            raise UsageError(f"--ppl-tail {job.ppl_tail} exceeds the smallest length "
                             f"{min(job.lengths)}; lower --ppl-tail")
        if not job.ppl_sources and not job.ppl_files:
            raise UsageError("ppl needs held-out text: give --ppl-sources and/or --ppl-files")
    if job.rope_theta is not None and not job.rope_theta > 0:
        raise UsageError(f"--rope-theta must be positive, got {job.rope_theta}")
    try:
        parse_rope_scaling(job.rope_scaling, "--rope-scaling")
    except ValueError as err:
        raise UsageError(str(err)) from None


@dataclasses.dataclass(frozen=True)
class EvaluateResult:
    """What `run` wrote: `results` (as in OUT/results.json) and the plots, in `out`."""

    out: Path
    results: dict
    plots: tuple[Path, ...]


def _default_label(job: EvaluateJob) -> str:
    name = Path(job.model).expanduser().resolve().name
    label = f"{name}-{job.attention}"
    if job.attention == "cca":
        label += f"-g{job.group_size}-w{job.window_size}"
        if job.full_attention_layers:
            label += "-full" + "_".join(map(str, job.full_attention_layers))
    if job.rope_theta is not None:
        label += f"-theta{job.rope_theta:g}"
    if job.rope_scaling is not None:
        label += "-rope-" + "".join(c if c.isalnum() else "_" for c in job.rope_scaling)
    return label


def stored_attention(model_dir: str | os.PathLike) -> tuple[str, int, int, str]:
    """(attention, g, w, where from) that a model directory was saved with: a converted
    directory's cca_config.json (e.g. a train.finetune export), else full attention with the
    library's defaults (a Hugging Face directory knows nothing of CCA)."""
    from cca_jax.converted import is_converted_dir, read_converted_config

    if is_converted_dir(model_dir):
        config = read_converted_config(model_dir)
        return config.attention, config.group_size, config.window_size, "the model directory"
    return ("full", DEFAULT_CCA.group_size, DEFAULT_CCA.window_size,
            "defaults (no cca_config.json)")


def resolve_attention(job: EvaluateJob) -> tuple[EvaluateJob, str]:
    """The job with attention, group size, window size and full-attention layers left unset
    taken from the model directory (the layers given checked against it), and a note saying
    where each came from."""
    from cca_jax.loading import read_config

    attention, g, w, origin = stored_attention(job.model)
    taken = {name: value for name, value in (("attention", attention), ("group_size", g),
                                             ("window_size", w))
             if getattr(job, name) is None}
    named = [name.replace("_", " ") for name in taken]
    stored = read_config(job.model)
    if job.full_attention_layers is None:
        taken["full_attention_layers"] = stored.full_attention_layers
        if stored.full_attention_layers:
            named.append("full-attention layers")
    else:
        try:
            taken["full_attention_layers"] = check_layer_indices(
                job.full_attention_layers, stored.num_hidden_layers, "--full-attention-layers")
        except (TypeError, ValueError) as err:
            raise UsageError(str(err)) from None
    note = f"{', '.join(named)} from {origin}" if named else "attention as given"
    return dataclasses.replace(job, **taken), note


@contextlib.contextmanager
def _as_usage_errors(*kinds: type[BaseException]):
    """Errors of these kinds (bad input found by the code inside) become UsageError."""
    try:
        yield
    except UsageError:
        raise
    except kinds as err:
        raise UsageError(str(err)) from err


def run(job: EvaluateJob) -> EvaluateResult:
    """Generate every example and read the held-out text, then load the model (bad input
    found on the way: UsageError, before any compute), score each task at each length, write
    the plots and then results.json (atomically: its presence means the evaluation is
    complete)."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    err = sys.stderr
    progress = not job.no_progress
    with _as_usage_errors(ValueError, FileNotFoundError, NotADirectoryError,
                          ModuleNotFoundError, OSError):
        model_path = Path(job.model).expanduser()
        if not model_path.exists():
            raise UsageError(f"--model: {str(model_path)!r} does not exist")
        if not model_path.is_dir():
            raise UsageError(f"--model: {str(model_path)!r} is not a directory")
        job, attention_note = resolve_attention(job)
        rope_scaling = None
        if job.rope_scaling is not None:
            from cca_jax.rope import parse_rope_scaling

            rope_scaling = parse_rope_scaling(job.rope_scaling, "--rope-scaling")
        depths = sorted(set(d / 100 for d in job.depths))
        label = job.label or _default_label(job)
        out = Path(job.out).expanduser() if job.out else Path("evals") / label
        if out.exists() and not out.is_dir():
            raise UsageError(f"--out: {str(out)!r} exists and is not a directory")

        from cca_jax.loading import load_tokenizer

        tokenizer = load_tokenizer(job.tokenizer or job.model)
        # Everything generated (and checked) before the model is loaded.
        examples: dict[str, list[TaskExample]] = {}
        notes = [attention_note]
        if "passkey" in job.tasks:
            examples["passkey"] = tasks_lib.make_examples(
                "passkey", tokenizer, job.lengths, depths, job.examples, job.seed,
                candidates=job.candidates)
        if "mdqa" in job.tasks:
            filler, filler_source = tasks_lib.mdqa_filler()
            notes.append(f"mdqa filler: {filler_source}")
            examples["mdqa"] = tasks_lib.make_examples(
                "mdqa", tokenizer, job.lengths, depths, job.examples, job.seed,
                filler=filler, doc_tokens=job.mdqa_doc_tokens,
                facts_per_doc=job.mdqa_facts, candidates=job.candidates)
        documents = []
        if "ppl" in job.tasks:
            for doc in tasks_lib.heldout_documents(job.ppl_sources, job.ppl_files):
                ids = np.asarray(tokenizer.encode(doc.text, add_special_tokens=False), np.int32)
                documents.append((doc.name, doc.source, ids))
            longest = max((len(t) for *_, t in documents), default=0)
            if longest < max(job.lengths) + 1:
                raise UsageError(f"ppl: the longest held-out document has {longest} tokens, "
                                 f"fewer than the {max(job.lengths) + 1} that --lengths "
                                 f"{max(job.lengths)} needs; lower --lengths or add "
                                 "--ppl-files")
        copy_docs = []
        if "copy" in job.tasks:
            copy_docs = tasks_lib.copy_documents(tokenizer, max(job.lengths) + 1,
                                                 job.copy_docs, job.seed)
            if not copy_docs:
                raise UsageError(f"copy: no held-out code file has the {max(job.lengths) + 1}"
                                 " tokens the longest length needs; lower --lengths")
            notes.append(f"copy: {len(copy_docs)} renamed held-out files ("
                         f"{', '.join(d.name for d in copy_docs)})")

    import jax

    from cca_jax.loading import from_pretrained

    dtype = job.dtype
    if dtype == "auto":
        dtype = "bfloat16" if jax.default_backend() == "gpu" else "float32"
    hybrid = job.attention == "cca" and bool(job.full_attention_layers)
    print(f"loading {job.model} ({dtype}, attention={job.attention}"
          + (f", g={job.group_size}, w={job.window_size}" if job.attention == "cca" else "")
          + (f", full attention in layers {describe_layers(job.full_attention_layers)}"
             if hybrid else "")
          + f") on {jax.default_backend()} ...", file=err, flush=True)
    with _as_usage_errors(ValueError, FileNotFoundError, NotADirectoryError, OSError):
        cca = CCAConfig(group_size=job.group_size, window_size=job.window_size,
                        implementation=job.attention_implementation)
        model = from_pretrained(job.model, attention=job.attention, cca=cca, dtype=dtype,
                                full_attention_layers=job.full_attention_layers)
        model = with_rope(model, job.rope_theta, rope_scaling)
    config = model.config
    if max(job.lengths) > config.max_position_embeddings:
        print(f"note: lengths up to {max(job.lengths)} exceed the model's context "
              f"({config.max_position_embeddings} positions); rope_theta={config.rope_theta:g}"
              f", rope_scaling={dict(config.rope_scaling) if config.rope_scaling else None}",
              file=err, flush=True)
    for note in notes:
        print(f"note: {note}", file=err, flush=True)

    results = {
        "label": label,
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "command": job.command or f"train.evaluate.run({job!r})",
        "model": str(job.model), "attention": job.attention,
        "group_size": job.group_size if job.attention == "cca" else None,
        "window_size": job.window_size if job.attention == "cca" else None,
        "full_attention_layers": list(job.full_attention_layers) if hybrid else [],
        "attention_from": attention_note,
        "rope_theta": config.rope_theta,
        "rope_scaling": dict(config.rope_scaling) if config.rope_scaling else None,
        "max_position_embeddings": config.max_position_embeddings,
        "dtype": dtype, "backend": jax.default_backend(), "seed": job.seed,
        "lengths": list(job.lengths), "depths": depths, "tasks": list(job.tasks),
        "answer_mode": job.answer_mode, "examples_per_cell": job.examples,
        "candidates": job.candidates,
        "seconds": {},
    }
    width = max(job.lengths)
    token_fn = None
    if "ppl" in job.tasks or "copy" in job.tasks:
        token_fn = model_token_fn(model, batch_size=job.batch_size, width=width)
    if "ppl" in job.tasks:
        start = time.perf_counter()
        print("scoring held-out text (the first batch compiles) ...", file=err, flush=True)
        results["perplexity"] = perplexity_by_length(
            lambda ids, targets: token_fn(ids, targets)[0], documents, job.lengths,
            windows_per_doc=job.ppl_windows, tail=job.ppl_tail,
            batch_size=job.batch_size, progress=progress)
        for doc in results["perplexity"]["skipped"]:
            print(f"note: ppl skips {doc['source']}/{doc['name']} ({doc['tokens']} tokens, "
                  f"shorter than {max(job.lengths) + 1})", file=err)
        results["seconds"]["ppl"] = round(time.perf_counter() - start, 1)
    if "copy" in job.tasks:
        start = time.perf_counter()
        results["copy"] = copy_by_length(token_fn, copy_docs, job.lengths,
                                         windows_per_doc=job.copy_windows,
                                         tail=job.copy_tail, far=job.copy_far,
                                         batch_size=job.batch_size, progress=progress)
        results["seconds"]["copy"] = round(time.perf_counter() - start, 1)
    if examples:
        every = [e for task_examples in examples.values() for e in task_examples]
        print("scoring candidates (the first batch compiles) ...", file=err, flush=True)
        answer_fn = model_candidate_fn(
            model, tokenizer, prompt_width=width, candidates=job.candidates,
            answer_width=max(len(t) for e in every for t in e.candidate_ids),
            batch_size=job.batch_size, decode_implementation=job.decode_implementation)
        if job.answer_mode == "generate":
            scored = answer_fn

            def answer_fn(batch):
                texts = generated_predictions(model, tokenizer, batch)
                return [dataclasses.replace(a, prediction=t)
                        for a, t in zip(scored(batch), texts)]
    for task, task_examples in examples.items():
        start = time.perf_counter()
        bar = _bar(len(task_examples), task, "ex", progress)
        records = tasks_lib.score_examples(task_examples, answer_fn,
                                           batch_size=job.batch_size, progress=bar.update)
        bar.close()
        summary = tasks_lib.summarize(records)
        summary["examples"] = records
        if task == "mdqa":
            summary["documents_per_length"] = {
                str(L): tasks_lib.mdqa_document_count(L, job.mdqa_doc_tokens)
                for L in job.lengths}
            summary["facts_per_document"] = job.mdqa_facts
        results[task] = summary
        results["seconds"][task] = round(time.perf_counter() - start, 1)

    out.mkdir(parents=True, exist_ok=True)
    plots = write_plots(results, out)
    # results.json last and atomically: its presence means the evaluation is complete
    # (train.experiments skips an evaluation that has one).
    atomic_write_text(out / RESULTS_FILE, json.dumps(results, indent=2) + "\n")
    return EvaluateResult(out, results, tuple(plots))

