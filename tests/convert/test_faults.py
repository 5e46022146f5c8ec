"""Faults around conversion: truncated or corrupted weight files. Each must end with the
input intact, a clear `error:` naming the file, and no temporary folder left."""
from __future__ import annotations

from pathlib import Path

import pytest

from cca_jax import convert as cli
from cca_jax.loading import from_pretrained


def snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes()
            for p in sorted(directory.rglob("*")) if p.is_file()}


def hidden_temporaries(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(".") and (
        ".tmp-" in p.name or ".old-" in p.name))


def expect_error(capsys, argv, *needles) -> str:
    assert cli.main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


# ----------------------------------------------------------------------------- finding 7


def _truncate(path: Path, keep: int) -> None:
    data = path.read_bytes()
    path.write_bytes(data[:keep])


CORRUPTIONS = {
    "half": lambda path: _truncate(path, path.stat().st_size // 2),
    "header_only": lambda path: _truncate(path, 8 + int.from_bytes(path.read_bytes()[:8],
                                                                   "little")),
    "five_bytes": lambda path: _truncate(path, 5),
    "empty": lambda path: _truncate(path, 0),
    "garbage_header": lambda path: path.write_bytes(b"\xff" * 64 + path.read_bytes()[64:]),
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_truncated_or_corrupted_safetensors_is_named(make_hf_model, tmp_path, capsys,
                                                     corruption):
    source, _ = make_hf_model()
    weights = source / "model.safetensors"
    CORRUPTIONS[corruption](weights)
    damaged = snapshot(source)
    expect_error(capsys, [source, tmp_path / "cca"], str(weights), "truncated or corrupted")
    with pytest.raises(ValueError, match="model.safetensors.*truncated or corrupted"):
        from_pretrained(source)
    assert snapshot(source) == damaged
    assert not (tmp_path / "cca").exists() and hidden_temporaries(tmp_path) == []


@pytest.mark.parametrize("fmt", ["sharded", "bin"])
def test_truncated_shard_or_pytorch_file_is_named(make_hf_model, tmp_path, capsys, fmt):
    source, _ = make_hf_model(kv_heads=2, fmt=fmt)
    victim = (sorted(source.glob("model-*.safetensors"))[1] if fmt == "sharded"
              else source / "pytorch_model.bin")
    _truncate(victim, victim.stat().st_size // 2)
    expect_error(capsys, [source, tmp_path / "cca"], victim.name, "truncated or corrupted")
    assert not (tmp_path / "cca").exists() and hidden_temporaries(tmp_path) == []
