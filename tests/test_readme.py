"""README.md's Python examples run as written: every ```python block is executed on its own
(a fresh namespace, a fresh temporary working directory), so none may lean on a name or a
file that an earlier block or an earlier command made.

Blocks that use SmolLM2 materialise it into `smollm2-hf` themselves when it is missing; the
test links the directory the other tests share there first, so the suite does not pay for
a second materialisation (test_smollm2.py covers `materialize_smollm2` itself).
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.S | re.M)
SHARED_MODEL = "smollm2-hf"


def python_blocks() -> list[str]:
    return BLOCK.findall(README.read_text())


def test_readme_has_its_python_examples():
    blocks = python_blocks()
    assert len(blocks) == 5, [b.splitlines()[0] for b in blocks]
    assert sum(SHARED_MODEL in block for block in blocks) == 2


@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_python_block_runs_as_written(index, tmp_path, monkeypatch, request):
    block = python_blocks()[index]
    monkeypatch.chdir(tmp_path)
    if SHARED_MODEL in block:
        (tmp_path / SHARED_MODEL).symlink_to(request.getfixturevalue("smollm2_hf_dir"),
                                             target_is_directory=True)
    namespace = {"__name__": f"README.md python block {index + 1}"}
    exec(compile(block, namespace["__name__"], "exec"), namespace)
