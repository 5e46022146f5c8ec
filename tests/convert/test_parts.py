"""python -m convert.parts: split into checksummed parts, join back bit for bit, and refuse
missing, short or corrupted parts (naming them) without writing anything."""
import json

import numpy as np
import pytest

from convert import parts


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(10_000))
    return path


def test_split_and_join_round_trip(data, tmp_path, capsys):
    assert parts.main(["split", str(data), str(tmp_path / "p"), "--part-size", "4K"]) == 0
    manifest = json.loads((tmp_path / "p" / parts.MANIFEST).read_text())
    assert [p["bytes"] for p in manifest["parts"]] == [4096, 4096, 1808]
    assert parts.main(["check", str(tmp_path / "p")]) == 0
    assert parts.main(["join", str(tmp_path / "p"), str(tmp_path / "out.gguf")]) == 0
    assert (tmp_path / "out.gguf").read_bytes() == data.read_bytes()
    # Two parts, as a model travels to the GPU machine.
    parts.split(data, tmp_path / "two", part_size=5000)
    assert len(list((tmp_path / "two").glob("part-*"))) == 2
    parts.join(tmp_path / "two", tmp_path / "two.gguf")
    assert (tmp_path / "two.gguf").read_bytes() == data.read_bytes()
    capsys.readouterr()


@pytest.mark.parametrize("damage, message", [
    (lambda d: (d / "part-001").unlink(), "part-001 is missing"),
    (lambda d: (d / "part-002").write_bytes(b"short"), "part-002 has 5 bytes, not 1808"),
    (lambda d: (d / "part-000").write_bytes(b"\0" * 4096), "part-000 is corrupted"),
    (lambda d: (d / parts.MANIFEST).write_text("{"), "is not valid JSON"),
    (lambda d: (d / parts.MANIFEST).unlink(), "no parts.json"),
])
def test_damaged_parts_are_named_and_nothing_is_written(data, tmp_path, capsys, damage,
                                                        message):
    parts.split(data, tmp_path / "p", part_size=4096)
    damage(tmp_path / "p")
    assert parts.main(["join", str(tmp_path / "p"), str(tmp_path / "out.gguf")]) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "out.gguf").exists()
    assert not list(tmp_path.glob(".out*"))          # no temporary file left either


def test_bad_arguments(data, tmp_path, capsys):
    assert parts.main(["split", str(tmp_path / "none"), str(tmp_path / "p")]) == 2
    assert "is not a file" in capsys.readouterr().err
    assert parts.main(["split", str(data), str(tmp_path / "p"), "--part-size", "lots"]) == 2
    assert "--part-size must be a size" in capsys.readouterr().err
    parts.split(data, tmp_path / "p", part_size=4096)
    assert parts.main(["split", str(data), str(tmp_path / "p")]) == 2
    assert "already holds parts" in capsys.readouterr().err
    (tmp_path / "exists").write_bytes(b"x")
    assert parts.main(["join", str(tmp_path / "p"), str(tmp_path / "exists")]) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert parts.parse_size("44M") == 44 << 20 and parts.parse_size("1000") == 1000
