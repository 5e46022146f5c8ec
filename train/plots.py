"""What the evaluation's and the comparison's PNG plots share: a length axis and writing a
figure atomically."""
from __future__ import annotations

from pathlib import Path

from cca_jax.io import atomic_file


def length_axis(ax, lengths) -> None:
    """Log-scaled x axis labelled with exactly the measured lengths."""
    ax.set_xscale("log")
    ax.set_xticks(lengths, [str(L) for L in lengths])
    ax.minorticks_off()
    if len(lengths) == 1:
        ax.set_xlim(lengths[0] / 1.5, lengths[0] * 1.5)


def save_figure(fig, path: Path) -> Path:
    """Lay out, write atomically as PNG and close `fig`."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return path
