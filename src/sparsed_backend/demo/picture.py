"""The demo's picture: which key blocks each query block kept, per head (``sparsed demo --out``)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["draw_blocks"]


def draw_blocks(state, layer: int, heads: list[int], path: Path, title: str, marks: tuple[int, int]) -> Path | None:
    """Draw one layer's kept block table (black: kept) for ``heads`` of the batch's first row to ``path``.

    Args:
        state: a SparseDState after its switch step (``state.layers[layer].table``: (B, H, nQ, nKV)).
        marks: (query block, key block) circled in red (the answer's block and the record's).

    Returns:
        ``path``, or None when matplotlib is not installed (said on stdout).
    """
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no picture (pip install -e '.[demo]' from a clone)")
        return None
    table = state.layers[layer].table[0].float().cpu()  # (H, nQ, nKV)
    answer_block, record_block = marks
    fig, axes = plt.subplots(1, len(heads), figsize=(3.2 * len(heads), 3.6), squeeze=False)
    for ax, h in zip(axes[0], heads, strict=True):
        ax.imshow(table[h], cmap="Greys", vmin=0, vmax=1, interpolation="nearest")
        ax.scatter([record_block], [answer_block], marker="o", s=40, facecolors="none", edgecolors="red")
        ax.set_title(f"layer {layer} head {h}: {table[h].mean():.0%} kept", fontsize=9)
        ax.set_xlabel("key block")
        ax.set_ylabel("query block")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
