"""Usage pictures: how often each layer keeps each head, its MSA and FFN sub-blocks, and its patches.

The values are the plain means of the decisions over a dataset (``collect.Collected``). Ungated units (block 0's
heads and sub-blocks, by default) always run and read 1; their rows are labelled "fixed".
"""
import os
from typing import Optional, Sequence, Union

import numpy as np

from .figures import DPI, plt, save_figure


def _layer_labels(depth: int, gated: Optional[Sequence[bool]]) -> list:
    return [f'{layer}' + ('' if gated is None or gated[layer] else ' (fixed)') for layer in range(depth)]


def _heatmap(ax: 'plt.Axes', data: np.ndarray, xlabels: Sequence[str], ylabels: Sequence[str], title: str) -> None:
    im = ax.imshow(data, cmap='viridis', vmin=0.0, vmax=1.0, aspect='auto', interpolation='nearest')
    ax.set_xticks(range(len(xlabels)), labels=xlabels, fontsize=7)
    ax.set_yticks(range(len(ylabels)), labels=ylabels, fontsize=7)
    ax.set_ylabel('layer')
    ax.set_title(title, fontsize=9)
    if data.size <= 400:  # numbers stay legible only in small maps
        for (r, c), v in np.ndenumerate(data):
            ax.text(c, r, f'{v:.2f}', ha='center', va='center', fontsize=6, color='white' if v < 0.6 else 'black')
    ax.figure.colorbar(im, ax=ax, fraction=0.046, pad=0.04)


def usage_figure(
        head_keep: np.ndarray,
        block_keep: np.ndarray,
        patch_keep: np.ndarray,
        head_gated: Optional[Sequence[bool]] = None,
        block_gated: Optional[Sequence[bool]] = None,
        patch_gated: Optional[Sequence[bool]] = None,
) -> 'plt.Figure':
    """Three panels: head usage (layers x heads), [MSA, FFN] usage (layers x 2), patch keep-rate per layer (bars).

    Args:
        head_keep: (depth, heads) mean keep per head.
        block_keep: (depth, 2) mean keep of MSA and FFN.
        patch_keep: (depth,) mean fraction of image patches kept.
        head_gated: Per layer, whether heads are decided there (else labelled "fixed").
        block_gated: Same for the sub-blocks.
        patch_gated: Same for patches.

    Returns:
        The figure; axes 0 and 1 hold the heatmaps (``axes[k].images[0].get_array()`` is the data shown), axes 2 the
        bars; colorbars come after.
    """
    head_keep, block_keep, patch_keep = (np.asarray(a, dtype=np.float64) for a in (head_keep, block_keep, patch_keep))
    depth, heads = head_keep.shape
    height = max(2.5, 0.35 * depth + 1.2)
    fig = plt.figure(figsize=(4.0 + 0.45 * heads + 3.0 + 3.5, height), dpi=DPI)
    grid = fig.add_gridspec(1, 3, width_ratios=[max(heads, 2), 2, 3])
    ax_h, ax_b, ax_p = (fig.add_subplot(grid[0, k]) for k in range(3))
    _heatmap(ax_h, head_keep, [str(h) for h in range(heads)], _layer_labels(depth, head_gated), 'heads kept')
    ax_h.set_xlabel('head')
    _heatmap(ax_b, block_keep, ['MSA', 'FFN'], _layer_labels(depth, block_gated), 'sub-blocks run')
    ax_p.barh(range(depth), patch_keep, color='tab:blue')
    ax_p.set_yticks(range(depth), labels=_layer_labels(depth, patch_gated), fontsize=7)
    ax_p.set_xlim(0.0, 1.15)  # room for the value labels right of full bars
    ax_p.invert_yaxis()  # layer 0 on top, as in the heatmaps
    ax_p.set_xlabel('fraction of patches kept')
    ax_p.set_title('patches kept', fontsize=9)
    for layer, v in enumerate(patch_keep):
        ax_p.text(v + 0.01, layer, f'{v:.2f}', va='center', fontsize=6)
    fig.tight_layout()
    return fig


def plot_usage(collected: 'object', path: Union[str, os.PathLike]) -> str:
    """Save the usage figure of a ``collect.Collected`` (or anything with the same keep/gated attributes) as PNG.

    Returns:
        The path written.
    """
    c = collected
    fig = usage_figure(c.head_keep, c.block_keep, c.patch_keep, c.head_gated, c.block_gated, c.patch_gated)
    return save_figure(fig, path)
