"""`python -m convert.demo` on a tiny random model with SmolLM2's tokenizer (the real run
takes minutes): every slow step says what it is doing before it starts."""
from __future__ import annotations

from flax import nnx

from cca_jax import LlamaConfig, LlamaForCausalLM
from convert import demo
from cca_jax.converted import save_converted


def test_demo_announces_each_completion_before_it_runs(smollm2_hf_dir, tmp_path, capsys):
    models = tmp_path / "models"
    (models / "smollm2-135m-instruct-hf").mkdir(parents=True)   # present: not materialised
    config = LlamaConfig(vocab_size=49152, num_hidden_layers=1, tie_word_embeddings=True)
    params = nnx.to_pure_dict(nnx.state(LlamaForCausalLM(config, rngs=nnx.Rngs(0)), nnx.Param))
    save_converted(models / "smollm2-135m-instruct", params, config,
                   tokenizer_src=smollm2_hf_dir)
    assert demo.main(["--models-dir", str(models), "--max-new-tokens", "3", "--prompt",
                      "The capital of France is", "--window-size", "4",
                      "--group-size", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for kind in ("full", "cca"):
        waiting = lines.index(f"  {kind:>4}: generating 3 tokens ...")
        assert lines[waiting + 1].startswith(f"  {kind:>4} ("), lines
    assert "tokens identical:" in lines[-1]
