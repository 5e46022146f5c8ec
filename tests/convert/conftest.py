"""Tiny random Hugging Face models written to tmp_path (no hub, deterministic)."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
import transformers  # noqa: E402

transformers.utils.logging.disable_progress_bar()

VOCAB, HIDDEN, INTERMEDIATE, LAYERS, HEADS = 128, 64, 96, 2, 4

ROPE = {
    "none": None,
    "linear": {"rope_type": "linear", "factor": 2.0},
    # original length 64 puts some frequencies of head_dim 16 in each llama3 band
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
               "high_freq_factor": 4.0, "original_max_position_embeddings": 64},
}


def _randomise(model: torch.nn.Module, seed: int) -> None:
    """Weights of size O(1) effect (HF's 0.02 init makes every logit nearly equal)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            noise = torch.randn(param.shape, generator=generator, dtype=torch.float32)
            if name.endswith("norm.weight"):
                value = 1.0 + 0.2 * noise
            elif name.endswith(".bias"):
                value = 0.2 * noise
            elif "embed_tokens" in name:
                value = 0.5 * noise
            else:  # [out, in] matrices
                value = noise * param.shape[1] ** -0.5
            param.copy_(value.to(param.dtype))


def build_hf_model(out_dir: Path, *, model_type: str = "llama", kv_heads: int = HEADS,
                   tied: bool = False, rope: str = "none", dtype: str = "float32",
                   fmt: str = "safetensors", attention_bias: bool = False,
                   rope_theta: float = 10000.0, seed: int = 0):
    """Write a tiny random HF model to `out_dir`; return the float32/eager torch model.

    fmt: "safetensors", "sharded" (many small safetensors shards plus index) or "bin"
    (a `pytorch_model.bin` pickle next to config.json).
    """
    common = dict(vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=INTERMEDIATE,
                  num_hidden_layers=LAYERS, num_attention_heads=HEADS,
                  num_key_value_heads=kv_heads, tie_word_embeddings=tied,
                  max_position_embeddings=256, rms_norm_eps=1e-5,
                  attn_implementation="eager", bos_token_id=1, eos_token_id=2)
    rope_parameters = {"rope_theta": rope_theta, "rope_type": "default"}
    rope_parameters.update(ROPE[rope] or {})
    if model_type == "llama":
        config = transformers.LlamaConfig(attention_bias=attention_bias,
                                          rope_parameters=rope_parameters, **common)
        model_cls = transformers.LlamaForCausalLM
    elif model_type == "qwen2":
        config = transformers.Qwen2Config(use_sliding_window=False,
                                          rope_parameters=rope_parameters, **common)
        model_cls = transformers.Qwen2ForCausalLM
    else:
        raise ValueError(model_type)
    torch.manual_seed(seed)
    model = model_cls(config)
    _randomise(model, seed)
    model.eval()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    saved = model.to(torch_dtype)
    saved.config.dtype = torch_dtype
    out_dir = Path(out_dir)
    if fmt == "safetensors":
        saved.save_pretrained(out_dir)
    elif fmt == "sharded":
        saved.save_pretrained(out_dir, max_shard_size="20KB")
        assert (out_dir / "model.safetensors.index.json").is_file()
    elif fmt == "bin":
        out_dir.mkdir(parents=True)
        saved.config.save_pretrained(out_dir)
        torch.save(saved.state_dict(), out_dir / "pytorch_model.bin")
    else:
        raise ValueError(fmt)
    return model.to(torch.float32)


@pytest.fixture
def make_hf_model(tmp_path):
    """Factory: make_hf_model(name="hf", **build_hf_model options) -> (path, torch model)."""

    def factory(name: str = "hf", **options):
        path = tmp_path / name
        return path, build_hf_model(path, **options)

    return factory
