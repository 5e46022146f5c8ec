"""cca_jax.io.atomic_file / atomic_write_text: a file is replaced whole or not at all."""
from __future__ import annotations

import pytest

from cca_jax.io import atomic_file, atomic_write_text


def test_atomic_write_replaces_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "results.json"
    atomic_write_text(path, "first\n")
    atomic_write_text(path, "second\n")
    assert path.read_text() == "second\n"
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_interrupted_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "plot.png"
    path.write_bytes(b"old")
    with pytest.raises(RuntimeError, match="interrupted"):
        with atomic_file(path) as tmp:
            assert tmp.suffix == ".png" and tmp.parent == tmp_path   # writers infer the format
            tmp.write_bytes(b"half")
            raise RuntimeError("interrupted")
    assert path.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]
