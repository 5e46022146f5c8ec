"""The copy task's documents at lengths no single held-out file reaches: runs of consecutive
files of one held-out package, renamed as one document (`train.eval_tasks.copy_documents`)."""
from __future__ import annotations

import numpy as np
import pytest

from train import eval_tasks as T
from train.sources import SourceFile
from tests.train.test_evaluate import build_tokenizer

MODULE = '''
def helper_{i}(value, count):
    total = value
    for step in range(count):
        total = total + step * value
    return helper_shared(total, value)


class Holder{i}:
    def __init__(self, payload):
        self.payload = payload

    def read(self):
        return helper_{i}(self.payload, 3)
'''


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture
def package(tmp_path, monkeypatch):
    """A held-out package `pkg` of 9 small modules (one long one) and a training file."""
    root = tmp_path / "pkg"
    root.mkdir()
    files = []
    for i in range(8):
        path = root / f"mod{i}.py"
        path.write_text(MODULE.format(i=i))
        files.append(SourceFile(str(path), "code", "stdlib:pkg", "heldout"))
    long_path = root / "zlong.py"
    long_path.write_text("".join(MODULE.format(i=100 + i) for i in range(6)))
    files.append(SourceFile(str(long_path), "code", "stdlib:pkg", "heldout"))
    train_path = tmp_path / "train_only.py"
    train_path.write_text(MODULE.format(i=999) * 8)
    files.append(SourceFile(str(train_path), "code", "stdlib:other", "train"))
    monkeypatch.setattr(T, "code_files", lambda: files)
    return root, long_path


def test_single_files_first_then_runs_of_one_package(tokenizer, package):
    root, long_path = package
    single = T.copy_document(tokenizer, "x", long_path.read_text(), np.random.default_rng(0))
    one_module = len(T.copy_document(tokenizer, "y", MODULE.format(i=0),
                                     np.random.default_rng(0)).ids)
    min_tokens = 2 * one_module + 1           # no small module reaches it alone
    assert len(single.ids) >= min_tokens
    docs = T.copy_documents(tokenizer, min_tokens, count=10, seed=0)
    assert docs[0].name == "zlong.py"          # the one long-enough file comes first
    runs = docs[1:]
    assert len(runs) >= 2, [d.name for d in docs]
    assert all(len(d.ids) >= min_tokens for d in docs)
    assert all(d.name.startswith("stdlib:pkg run ") for d in runs)
    # Consecutive files, each in one run, never the training file or the long file again.
    assert runs[0].name.startswith("stdlib:pkg run 1: mod0.py .. ")
    counts = [int(d.name.rsplit("(", 1)[1].split()[0]) for d in runs]
    assert all(c >= 2 for c in counts) and sum(counts) <= 8
    assert not any("zlong" in d.name or "train_only" in d.name for d in runs)
    # One renaming per run: an identifier shared across the run's files is a copy target
    # whose previous occurrence lies in an earlier file of the run.
    assert all((d.copy_distance > one_module // 2).any() for d in runs)
    # Deterministic; fewer wanted, fewer given (single files first).
    again = T.copy_documents(tokenizer, min_tokens, count=10, seed=0)
    assert [d.name for d in again] == [d.name for d in docs]
    assert all(np.array_equal(a.ids, b.ids) for a, b in zip(again, docs))
    assert [d.name for d in T.copy_documents(tokenizer, min_tokens, 1, 0)] == ["zlong.py"]


def test_runs_only_for_the_default_heldout_set(tokenizer, package):
    root, _ = package
    files = sorted(root.glob("mod*.py"))
    one_module = len(T.copy_document(tokenizer, "y", MODULE.format(i=0),
                                     np.random.default_rng(0)).ids)
    assert T.copy_documents(tokenizer, 2 * one_module + 1, 10, 0, files=files) == []
