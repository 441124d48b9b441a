"""Cost pictures: how the per-image cost spreads over classes, and accuracy against cost along the budget knob."""
import os
from typing import Mapping, Optional, Sequence, Tuple, Union

import numpy as np

from .figures import DPI, plt, save_figure


def gmacs_histogram_counts(
        gmacs: np.ndarray,
        labels: np.ndarray,
        num_classes: int,
        bins: Union[int, np.ndarray] = 30,
) -> Tuple[np.ndarray, np.ndarray]:
    """Per-class histogram counts of per-image GMACs over shared bin edges.

    Args:
        gmacs: (n,) per-image GMACs.
        labels: (n,) class indices in ``[0, num_classes)``.
        num_classes: Number of classes (rows of the result).
        bins: Number of bins, or the edges.

    Returns:
        (counts (num_classes, n_bins), edges (n_bins + 1,)); every image falls in exactly one bin, so the counts sum
        to n.
    """
    gmacs = np.asarray(gmacs, dtype=np.float64).reshape(-1)
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    if isinstance(bins, int):
        lo, hi = (float(gmacs.min()), float(gmacs.max())) if gmacs.size else (0.0, 1.0)
        if hi - lo < 1e-12:  # every image cost the same: one visible bin around it, not a zero-width range
            lo, hi = lo - 0.5 * max(abs(lo), 1e-6) * 0.01, hi + 0.5 * max(abs(hi), 1e-6) * 0.01
        edges = np.linspace(lo, hi, bins + 1)
    else:
        edges = np.asarray(bins, dtype=np.float64)
    counts = np.stack([np.histogram(gmacs[labels == k], bins=edges)[0] for k in range(num_classes)])
    return counts, edges


def gmacs_histogram_figure(
        gmacs: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
        bins: Union[int, np.ndarray] = 30,
        dense_gmacs: Optional[float] = None,
) -> 'plt.Figure':
    """Stacked histogram of per-image GMACs, one colour per class (the paper's "which classes are cheap").

    Args:
        gmacs: (n,) per-image GMACs.
        labels: (n,) class indices (use true labels, or predictions for unlabelled data).
        class_names: One name per class; its length sets the number of classes.
        bins: Number of bins or edges.
        dense_gmacs: If given, a vertical line at the dense backbone's cost.

    Returns:
        The figure; its bars (``ax.patches``) stack per class in class order, heights are the counts.
    """
    counts, edges = gmacs_histogram_counts(gmacs, labels, len(class_names), bins)
    fig, ax = plt.subplots(figsize=(8.0, 4.5), dpi=DPI)
    widths = np.diff(edges)
    bottom = np.zeros(counts.shape[1])
    cmap = plt.get_cmap('tab10' if len(class_names) <= 10 else 'tab20')
    mean_all = float(np.mean(gmacs)) if len(gmacs) else float('nan')
    for k, name in enumerate(class_names):
        if counts[k].sum() == 0:
            continue  # no legend entry for classes absent from the data
        ax.bar(edges[:-1], counts[k], width=widths, bottom=bottom, align='edge', color=cmap(k % cmap.N),
               label=f'{name} ({np.mean(np.asarray(gmacs)[np.asarray(labels) == k]):.3g})', linewidth=0)
        bottom += counts[k]
    if dense_gmacs is not None:
        ax.axvline(dense_gmacs, color='black', linestyle='--', linewidth=1, label=f'dense ({dense_gmacs:.3g})')
    ax.axvline(mean_all, color='red', linestyle=':', linewidth=1, label=f'mean ({mean_all:.3g})')
    ax.set_xlabel('GMACs per image')
    ax.set_ylabel('images')
    ax.set_title(f'Per-image cost by class ({len(gmacs)} images; legend: class mean GMACs)', fontsize=10)
    ax.legend(fontsize=7, loc='upper left', bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    fig.tight_layout()
    return fig


def plot_gmacs_histogram(gmacs: np.ndarray, labels: np.ndarray, class_names: Sequence[str],
                         path: Union[str, os.PathLike], bins: Union[int, np.ndarray] = 30,
                         dense_gmacs: Optional[float] = None) -> str:
    """Save ``gmacs_histogram_figure`` as PNG; returns the path."""
    return save_figure(gmacs_histogram_figure(gmacs, labels, class_names, bins, dense_gmacs), path)


def accuracy_vs_gmacs_figure(
        curve: Sequence[Tuple[float, float]],
        points: Optional[Mapping[str, Tuple[float, float]]] = None,
        curve_label: str = 'AdaViT (threshold sweep)',
        curve_annotations: Optional[Sequence[str]] = None,
) -> 'plt.Figure':
    """Top-1 against mean GMACs: a curve (e.g. from ``collect.budget_curve``) and labelled single points.

    Args:
        curve: (gmacs, top1) points, drawn sorted by cost as one line with markers.
        points: Label -> (gmacs, top1), e.g. ``{"Random": ..., "Random+": ..., "dense backbone": ...}``.
        curve_label: Legend entry of the curve.
        curve_annotations: Optional text at each curve point (same order as ``curve``), e.g. the thresholds.

    Returns:
        The figure; ``ax.lines[0]`` is the curve (data sorted by GMACs), then one line per point in the given order.
    """
    fig, ax = plt.subplots(figsize=(6.5, 4.5), dpi=DPI)
    if curve:
        order = np.argsort([c[0] for c in curve], kind='stable')
        xs = [float(curve[i][0]) for i in order]
        ys = [float(curve[i][1]) for i in order]
        ax.plot(xs, ys, marker='o', color='tab:blue', label=curve_label)
        if curve_annotations is not None:
            for i in order:
                ax.annotate(curve_annotations[i], (curve[i][0], curve[i][1]), textcoords='offset points',
                            xytext=(4, -10), fontsize=6, color='tab:blue')
    markers = ['s', '^', 'D', 'v', 'P', 'X', '*']
    colors = ['tab:orange', 'tab:green', 'tab:red', 'tab:purple', 'tab:brown', 'tab:gray', 'tab:olive']
    for j, (label, (g, t)) in enumerate((points or {}).items()):
        ax.plot([float(g)], [float(t)], linestyle='none', marker=markers[j % len(markers)], markersize=8,
                color=colors[j % len(colors)], label=f'{label} ({float(t):.1f}%, {float(g):.3g} GMACs)')
    ax.set_xlabel('GMACs per image (mean)')
    ax.set_ylabel('top-1 (%)')
    ax.set_title('Accuracy vs cost', fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc='best')
    fig.tight_layout()
    return fig


def plot_accuracy_vs_gmacs(curve: Sequence[Tuple[float, float]], path: Union[str, os.PathLike],
                           points: Optional[Mapping[str, Tuple[float, float]]] = None,
                           curve_label: str = 'AdaViT (threshold sweep)',
                           curve_annotations: Optional[Sequence[str]] = None) -> str:
    """Save ``accuracy_vs_gmacs_figure`` as PNG; returns the path."""
    return save_figure(accuracy_vs_gmacs_figure(curve, points, curve_label, curve_annotations), path)
