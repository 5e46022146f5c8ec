"""CCAConfig: validated once, the paper's defaults written once, embedded in LlamaConfig and
CacheSpec, with group_size= / window_size= / attention_implementation= still accepted."""
from __future__ import annotations

import json

import pytest
from flax import nnx

from cca_jax import CCAAttention, LlamaConfig, LlamaForCausalLM
from cca_jax.cache import CacheSpec
from cca_jax.config import DEFAULT_CCA, CCAConfig


def test_defaults_are_the_papers():
    assert (DEFAULT_CCA.group_size, DEFAULT_CCA.window_size) == (16, 1024)
    assert LlamaConfig().cca == DEFAULT_CCA == CCAConfig()


@pytest.mark.parametrize("kwargs, error, match", [
    (dict(group_size=0), ValueError, "group_size must be >= 1, got 0"),
    (dict(window_size=-3), ValueError, "window_size must be >= 1, got -3"),
    (dict(group_size=2.5), TypeError, "group_size must be an int >= 1"),
    (dict(window_size=True), TypeError, "window_size must be an int >= 1"),
    (dict(implementation="cuda"), ValueError, "implementation must be one of 'auto'"),
])
def test_bad_values_name_the_argument(kwargs, error, match):
    with pytest.raises(error, match=match):
        CCAConfig(**kwargs)


def test_keywords_map_into_the_config_and_read_back():
    config = LlamaConfig(attention="cca", group_size=4, window_size=8,
                         attention_implementation="xla")
    assert config.cca == CCAConfig(4, 8, "xla")
    assert (config.group_size, config.window_size, config.attention_implementation) == (
        4, 8, "xla")
    assert config.replace(window_size=32).cca == CCAConfig(4, 32, "xla")
    with pytest.raises(ValueError, match="attention_implementation must be one of"):
        LlamaConfig(attention_implementation="cuda")
    with pytest.raises(ValueError, match="window_size must be >= 1"):
        config.replace(window_size=0)
    layer = CCAAttention(32, 4, cca=config.cca, window_size=16, rngs=nnx.Rngs(0))
    assert layer.cca == CCAConfig(4, 16, "xla") and layer.window_size == 16
    model = LlamaForCausalLM(config, rngs=nnx.Rngs(0))
    assert model.layers[0].self_attn.cca is config.cca
    spec = CacheSpec.for_model(config, batch_size=1, max_length=64)
    assert spec.cca == config.cca and (spec.group_size, spec.window_size) == (4, 8)
    assert CacheSpec(attention="cca", batch_size=1, max_length=64, num_layers=2, num_heads=4,
                     num_kv_heads=4, head_dim=16, group_size=4, window_size=8).cca == \
        CCAConfig(4, 8)


def test_json_round_trip_and_files_written_before_the_config_existed():
    config = LlamaConfig(attention="cca", group_size=4, window_size=8)
    data = json.loads(config.to_json())
    assert data["cca"] == {"group_size": 4, "window_size": 8, "implementation": "auto"}
    assert LlamaConfig.from_dict(data) == config
    old = {k: v for k, v in data.items() if k != "cca"}
    old.update(group_size=4, window_size=8, attention_implementation="auto")
    assert LlamaConfig.from_dict(old) == config
