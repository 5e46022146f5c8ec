"""The one table of model shapes the benchmarks run: `LlamaConfig` architecture fields by name.

`SHAPES` are real models' layouts (random weights are enough to time them); `TINY_SHAPE` is a
model small enough for a CPU smoke run (`--shape tiny`, `--smoke`).
"""
from __future__ import annotations

SHAPES = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536,
                         num_hidden_layers=30, num_attention_heads=9, num_key_value_heads=3,
                         head_dim=64, tie_word_embeddings=True, rope_theta=100000.0,
                         max_position_embeddings=8192, rms_norm_eps=1e-5),
    "llama-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                     num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                     head_dim=64, tie_word_embeddings=True, rope_theta=500000.0,
                     max_position_embeddings=131072, rms_norm_eps=1e-5),
    # LLaMA2-7B's layout (max_position_embeddings raised so that long prompts use plain RoPE).
    "llama2-7b": dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                      head_dim=128, tie_word_embeddings=False, rope_theta=10000.0,
                      max_position_embeddings=262144, rms_norm_eps=1e-5),
}

# Small enough for a CPU (the serving benchmark's --smoke, the decode benchmark's tiny run).
TINY_SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  tie_word_embeddings=True, max_position_embeddings=8192)
