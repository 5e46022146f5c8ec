"""Calling the model op by op (no jit, as README's examples do) compiles each program once:
the blocked attention's `lax.map` used to be traced and compiled anew on every call, for
every layer (an eager SmolLM2 forward took 20 s instead of 0.5 s)."""
import logging

import jax
import numpy as np
from flax import nnx

from cca_jax import LlamaConfig, LlamaForCausalLM


def test_second_eager_call_compiles_nothing(caplog):
    ids = np.arange(40, dtype=np.int32).reshape(2, 20)
    for attention in ("cca", "full"):
        model = LlamaForCausalLM(LlamaConfig(attention=attention, group_size=4, window_size=8,
                                             attention_implementation="xla",
                                             num_hidden_layers=3), rngs=nnx.Rngs(0))
        first = np.asarray(model(ids))
        with jax.log_compiles(True), caplog.at_level(logging.WARNING):
            caplog.clear()
            second = np.asarray(model(ids))
        compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
        assert compiled == [], (attention, compiled)
        np.testing.assert_array_equal(first, second)
