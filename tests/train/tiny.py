"""A tiny random LLaMA (converted cca_jax directory with a word-level tokenizer) and a small
synthetic corpus, written to disk for the fine-tuning CLI tests. No hub, no torch."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

WORDS = ("the king queen fool ghost sword crown night day love death speaks sleeps rides "
         "into castle forest storm sea and with of a my thy doth hath not now").split()
SPECIALS = ("<unk>", "</s>")
VOCAB_SIZE = 64  # >= len(SPECIALS) + len(WORDS); a multiple of 8 so every mesh splits it


def write_tokenizer(out: Path, extra_words: tuple[str, ...] = ()) -> int:
    """Word-level tokenizer files in `out` (`extra_words` after the usual ones, e.g. to make
    it larger than the model's vocabulary); returns the EOS id."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + tuple(WORDS) + tuple(extra_words))}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, unk_token="<unk>",
                                   eos_token="</s>")
    fast.save_pretrained(str(out))
    return vocab["</s>"]


def make_tiny_model(out: Path, seed: int = 0) -> Path:
    """A converted model directory: 2 layers, hidden 64, 4 query / 2 key-value heads."""
    from flax import nnx

    from cca_jax import LlamaConfig, LlamaForCausalLM
    from cca_jax.converted import save_converted

    out = Path(out)
    tok_dir = out.parent / (out.name + "-tokenizer")
    tok_dir.mkdir(parents=True, exist_ok=True)
    eos = write_tokenizer(tok_dir)
    config = LlamaConfig(vocab_size=VOCAB_SIZE, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         head_dim=16, max_position_embeddings=256, eos_token_id=eos,
                         bos_token_id=None, rms_norm_eps=1e-5)
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(seed))
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))
    save_converted(out, params, config, tokenizer_src=tok_dir)
    return out


def make_corpus(out: Path, documents: int = 12, words_per_doc: int = 300, seed: int = 0,
                suffix: str = ".txt") -> list[Path]:
    """Documents of a repetitive little language (so a few updates visibly lower the loss)."""
    rng = np.random.default_rng(seed)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    phrase_rng = np.random.default_rng(1234)  # one language for every corpus
    phrases = [" ".join(phrase_rng.choice(WORDS, size=5)) for _ in range(6)]
    files = []
    for d in range(documents):
        text = " ".join(phrases[i] for i in rng.integers(0, len(phrases), words_per_doc // 5))
        path = out / f"doc{d:02d}{suffix}"
        if suffix == ".jsonl":
            path.write_text(json.dumps({"text": text}) + "\n")
        else:
            path.write_text(text + "\n")
        files.append(path)
    return files
