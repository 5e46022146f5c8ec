"""Hugging Face LLaMA / Qwen2 <-> cca_jax: logits, round trips, input formats, bad input."""
from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from safetensors.numpy import load_file, save_file

from cca_jax.convert import cli
from cca_jax.loading import from_pretrained
from cca_jax import hf
from cca_jax.converted import is_converted_dir, load_converted

REPO = Path(__file__).resolve().parents[2]


def sample_ids(batch: int = 2, length: int = 160, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 128, (batch, length), dtype=np.int32)


def torch_logits(model, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.from_numpy(ids.astype(np.int64))).logits.float().numpy()


def our_logits(path, ids: np.ndarray, **options) -> np.ndarray:
    model = from_pretrained(path, dtype="float32", param_dtype="float32", **options)
    return np.asarray(model(jnp.asarray(ids)))


def max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


def edit_config(hf_dir: Path, **changes) -> dict:
    """Rewrite config.json with keys set (value None removes the key)."""
    path = Path(hf_dir) / "config.json"
    data = json.loads(path.read_text())
    for key, value in changes.items():
        if value is None:
            data.pop(key, None)
        else:
            data[key] = value
    path.write_text(json.dumps(data, indent=2))
    return data


def leftovers(parent: Path, name: str) -> list[str]:
    """The target and any temporary siblings atomic_directory might have left."""
    return sorted(p.name for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}."))


def assert_bit_identical(dir_a: Path, dir_b: Path) -> None:
    def tensors(directory):
        out = {}
        for file in sorted(directory.glob("*.safetensors")):
            out.update(load_file(file))
        return out

    a, b = tensors(dir_a), tensors(dir_b)
    assert sorted(a) == sorted(b)
    for name in a:
        assert a[name].dtype == b[name].dtype, name
        assert a[name].shape == b[name].shape, name
        assert a[name].tobytes() == b[name].tobytes(), name


# ----------------------------------------------------------------------------- logits


@pytest.mark.parametrize("rope", ["none", "linear", "llama3"])
@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
@pytest.mark.parametrize("kv_heads", [4, 2, 1], ids=["mha", "gqa2", "mqa"])
def test_llama_logits_match_pytorch(make_hf_model, kv_heads, tied, rope):
    path, model = make_hf_model(kv_heads=kv_heads, tied=tied, rope=rope,
                                seed=kv_heads * 10 + tied)
    ids = sample_ids()  # 2 x 160 = 320 positions
    expected = torch_logits(model, ids)
    assert np.std(expected) > 0.3  # weights large enough for the comparison to mean something
    assert max_diff(our_logits(path, ids, attention="full"), expected) < 1e-4


def test_llama_with_attention_bias_matches_pytorch(make_hf_model):
    path, model = make_hf_model(kv_heads=2, attention_bias=True, rope_theta=500.0)
    config = hf.llama_config_from_hf(hf.read_hf_config(path))
    assert config.attention_bias and config.attention_out_bias and config.rope_theta == 500.0
    ids = sample_ids()
    assert max_diff(our_logits(path, ids), torch_logits(model, ids)) < 1e-4


def test_qwen2_logits_match_pytorch(make_hf_model):
    path, model = make_hf_model(model_type="qwen2", kv_heads=2)
    config = hf.llama_config_from_hf(hf.read_hf_config(path))
    assert config.model_type == "qwen2"
    assert config.attention_bias and not config.attention_out_bias
    ids = sample_ids()
    assert max_diff(our_logits(path, ids), torch_logits(model, ids)) < 1e-4


@pytest.mark.parametrize("group_size, window_size", [(4, 160), (16, 1000), (1, 1)])
def test_cca_equals_full_when_it_sees_everything(make_hf_model, group_size, window_size):
    path, _ = make_hf_model(kv_heads=2, rope="llama3")
    ids = sample_ids()
    full = our_logits(path, ids, attention="full")
    cca = our_logits(path, ids, attention="cca", group_size=group_size,
                     window_size=window_size)
    assert max_diff(cca, full) < 1e-5


def test_from_pretrained_keeps_stored_dtype_by_default(make_hf_model):
    path, _ = make_hf_model(dtype="bfloat16", tied=True)
    model = from_pretrained(path)
    assert model.config.param_dtype == "bfloat16" and model.config.dtype == "float32"
    assert model.embed_tokens.embedding[...].dtype == jnp.bfloat16
    cast = from_pretrained(path, param_dtype=jnp.float32, dtype="bfloat16")
    assert cast.embed_tokens.embedding[...].dtype == jnp.float32
    assert cast.config.dtype == "bfloat16"


# ----------------------------------------------------------------------------- the CLI


@pytest.mark.parametrize("model_type, dtype, tied", [("llama", "float32", False),
                                                     ("llama", "bfloat16", True),
                                                     ("qwen2", "float32", True)])
def test_cli_round_trip_is_bit_identical(make_hf_model, tmp_path, capsys, model_type, dtype,
                                         tied):
    src, model = make_hf_model(model_type=model_type, dtype=dtype, tied=tied, kv_heads=2,
                               rope="linear" if model_type == "llama" else "none")
    cca, back = tmp_path / "cca", tmp_path / "back"
    assert cli.main([str(src), str(cca)]) == 0
    out = capsys.readouterr().out
    assert "reading weights" in out and f"done: {cca}" in out
    assert is_converted_dir(cca)
    config, params = load_converted(cca)
    assert config.param_dtype == dtype and config.model_type == model_type
    assert params["embed_tokens"]["embedding"].dtype == np.dtype(hf.NUMPY_DTYPES[dtype])
    assert (cca / "generation_config.json").is_file()

    assert cli.main(["--to-hf", str(cca), str(back)]) == 0
    assert_bit_identical(src, back)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(back, local_files_only=True)
    assert type(reloaded).__name__ == type(model).__name__
    assert reloaded.config.tie_word_embeddings == tied
    original = transformers.AutoModelForCausalLM.from_pretrained(src, local_files_only=True)
    reloaded_state, original_state = reloaded.state_dict(), original.state_dict()
    assert sorted(reloaded_state) == sorted(original_state)
    for name, tensor in original_state.items():
        assert torch.equal(reloaded_state[name], tensor), name
    ids = sample_ids(length=48)
    assert max_diff(torch_logits(reloaded.float().eval(), ids),
                    torch_logits(original.float().eval(), ids)) == 0.0


def assert_matches_torch_directly_and_converted(path, model, tmp_path):
    """Our logits match PyTorch's when loading the HF dir directly and after the CLI converts it."""
    ids = sample_ids()
    expected = torch_logits(model, ids)
    assert max_diff(our_logits(path, ids), expected) < 1e-4
    cca = tmp_path / "cca"
    assert cli.main([str(path), str(cca)]) == 0
    assert max_diff(our_logits(cca, ids), expected) < 1e-4


@pytest.mark.parametrize("fmt", ["sharded", "bin"])
def test_sharded_safetensors_and_pytorch_bin_inputs(make_hf_model, tmp_path, fmt):
    path, model = make_hf_model(kv_heads=2, tied=(fmt == "bin"), fmt=fmt)
    assert (path / "model.safetensors").exists() is False
    assert_matches_torch_directly_and_converted(path, model, tmp_path)


def test_transformers4_style_config(make_hf_model, tmp_path):
    path, model = make_hf_model(kv_heads=2, rope="linear", rope_theta=2000.0)
    edit_config(path, rope_parameters=None, dtype=None, rope_theta=2000.0,
                rope_scaling={"type": "linear", "factor": 2.0}, torch_dtype="float32",
                transformers_version="4.44.0")
    config = hf.llama_config_from_hf(hf.read_hf_config(path))
    assert config.rope_theta == 2000.0
    assert dict(config.rope_scaling) == {"rope_type": "linear", "factor": 2.0}
    assert_matches_torch_directly_and_converted(path, model, tmp_path)


def test_check_prints_small_logit_difference(make_hf_model, tmp_path, capsys):
    path, _ = make_hf_model(kv_heads=2, tied=True, rope="llama3")
    assert cli.main([str(path), str(tmp_path / "cca"), "--check"]) == 0
    out = capsys.readouterr().out
    match = re.search(r"max \|logit difference\| = ([0-9.eE+-]+)", out)
    assert match, out
    assert float(match.group(1)) < 1e-4
    assert "check: ok" in out


def test_overwrite_replaces_existing_output(make_hf_model, tmp_path):
    path, _ = make_hf_model()
    out = tmp_path / "cca"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    assert cli.main([str(path), str(out), "--overwrite"]) == 0
    assert is_converted_dir(out) and not (out / "stale.txt").exists()
    assert leftovers(tmp_path, "cca") == ["cca"]


def test_importing_cca_jax_does_not_import_convert():
    code = ("import sys, cca_jax; bad = [m for m in sys.modules if m == 'convert' or "
            "m.startswith('convert.')]; assert not bad, bad; assert cca_jax.from_pretrained")
    subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True)


# ----------------------------------------------------------------------------- bad input


def run_cli_expecting_error(capsys, argv, *needles) -> str:
    assert cli.main([str(a) for a in argv]) == 1
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    assert captured.err.startswith("error: "), captured.err
    for needle in needles:
        assert needle in captured.err, (needle, captured.err)
    return captured.err


def test_unknown_model_type(make_hf_model, tmp_path, capsys):
    path, _ = make_hf_model()
    edit_config(path, model_type="gpt_neox")
    with pytest.raises(ValueError, match=r"gpt_neox.*llama, qwen2"):
        hf.llama_config_from_hf(hf.read_hf_config(path))
    with pytest.raises(ValueError, match="gpt_neox"):
        from_pretrained(path)
    run_cli_expecting_error(capsys, [path, tmp_path / "cca"], "gpt_neox", "llama")
    assert leftovers(tmp_path, "cca") == []


def test_missing_weight_tensor(make_hf_model, tmp_path, capsys):
    path, _ = make_hf_model()
    file = path / "model.safetensors"
    tensors = load_file(file)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, file, metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        from_pretrained(path)
    run_cli_expecting_error(capsys, [path, tmp_path / "cca"], "missing",
                            "model.layers.1.mlp.up_proj.weight")
    assert leftovers(tmp_path, "cca") == []


def test_unexpected_and_misshapen_tensors(make_hf_model, tmp_path):
    path, _ = make_hf_model()
    config = hf.llama_config_from_hf(hf.read_hf_config(path))
    state = hf.load_hf_state_dict(path)
    extra = dict(state, **{"model.layers.0.self_attn.rotary_emb.inv_freq": np.ones(8),
                           "model.layers.0.mystery.weight": np.ones(3, np.float32)})
    with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.0\.mystery\.weight"):
        hf.hf_to_params(extra, config)
    bad = dict(state)
    bad["model.layers.0.self_attn.k_proj.weight"] = np.ones((3, 64), np.float32)
    with pytest.raises(ValueError, match=r"model\.layers\.0\.self_attn\.k_proj\.weight.*\(3, 64\)"):
        hf.hf_to_params(bad, config)
    # a converted directory whose config no longer fits its parameters
    cca = tmp_path / "cca"
    assert cli.main([str(path), str(cca)]) == 0
    stored = json.loads((cca / "cca_config.json").read_text())
    (cca / "cca_config.json").write_text(json.dumps(dict(stored, intermediate_size=80)))
    with pytest.raises(ValueError, match=r"layers\.0\.mlp\.down_proj\.kernel.*\(96, 64\)"):
        from_pretrained(cca)


def test_nonexistent_or_not_a_directory(tmp_path, capsys):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match="nowhere.*does not exist"):
        hf.read_hf_config(missing)
    with pytest.raises(FileNotFoundError, match="nowhere"):
        from_pretrained(missing)
    run_cli_expecting_error(capsys, [missing, tmp_path / "cca"], "nowhere", "does not exist")
    a_file = tmp_path / "weights.txt"
    a_file.write_text("not a model")
    with pytest.raises(NotADirectoryError, match="weights.txt"):
        hf.read_hf_config(a_file)
    run_cli_expecting_error(capsys, [a_file, tmp_path / "cca"], "weights.txt",
                            "not a directory")
    assert leftovers(tmp_path, "cca") == []


def test_no_config_json_or_no_weights(make_hf_model, tmp_path, capsys):
    path, _ = make_hf_model()
    (path / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        hf.read_hf_config(path)
    run_cli_expecting_error(capsys, [path, tmp_path / "cca"], "config.json", str(path))
    assert leftovers(tmp_path, "cca") == []

    other, _ = make_hf_model(name="other")
    (other / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="no weights"):
        hf.load_hf_state_dict(other)
    run_cli_expecting_error(capsys, [other, tmp_path / "cca"], "no weights", "model.safetensors")
    assert leftovers(tmp_path, "cca") == []


def test_existing_output_without_overwrite(make_hf_model, tmp_path, capsys, monkeypatch):
    path, _ = make_hf_model()
    out = tmp_path / "cca"
    out.mkdir()
    (out / "keep.txt").write_text("mine")

    def must_not_read(*_args, **_kwargs):
        raise AssertionError("weights were read although OUT_DIR exists")

    monkeypatch.setattr(hf, "load_hf_state_dict", must_not_read)
    run_cli_expecting_error(capsys, [path, out], "already exists", "--overwrite")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]
    assert leftovers(tmp_path, "cca") == ["cca"]
    monkeypatch.undo()

    cca = tmp_path / "converted"
    assert cli.main([str(path), str(cca)]) == 0
    run_cli_expecting_error(capsys, ["--to-hf", cca, out], "already exists")
    assert sorted(p.name for p in out.iterdir()) == ["keep.txt"]


def test_unsupported_features_are_named():
    base = {"model_type": "llama", "vocab_size": 8, "hidden_size": 16, "intermediate_size": 8,
            "num_hidden_layers": 1, "num_attention_heads": 2}
    with pytest.raises(ValueError, match="yarn"):
        hf.llama_config_from_hf(dict(base, rope_parameters={"rope_type": "yarn",
                                                             "factor": 4.0}))
    with pytest.raises(ValueError, match="hidden_size"):
        hf.llama_config_from_hf({k: v for k, v in base.items() if k != "hidden_size"})
    with pytest.raises(ValueError, match="sliding"):
        hf.llama_config_from_hf(dict(base, model_type="qwen2", use_sliding_window=True))
    with pytest.raises(ValueError, match="hidden_act"):
        hf.llama_config_from_hf(dict(base, hidden_act="gelu"))
