"""Kept-patch overlays: the paper's figure of which patches each layer keeps, rows = images, columns = layers.

A dropped patch is shown faded towards grey, ``(1 - fade) * pixel + fade * grey``; a kept patch is shown unchanged.
"""
import os
from typing import Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import InputError
from .figures import DPI, plt, save_figure

GREY = 0.5
FADE = 0.75
CELL_INCHES = 1.2
TITLE_INCHES = 0.3


def patch_grid(model: nn.Module) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """((rows, cols) of the patch grid, (patch height, patch width)) of the model's patch embedding."""
    pe = model.patch_embed
    return (int(pe.grid_size[0]), int(pe.grid_size[1])), (int(pe.patch_size[0]), int(pe.patch_size[1]))


def overlay(image: np.ndarray, keep: np.ndarray, patch_size: Tuple[int, int], fade: float = FADE,
            grey: float = GREY) -> np.ndarray:
    """One image with its dropped patches faded to grey.

    Args:
        image: (H, W, C) or (H, W) in [0, 1].
        keep: (gh, gw) or flat (gh * gw,) keep flags in {0, 1}, row-major over the patch grid (as the tokens are).
        patch_size: (ph, pw) in pixels; ``gh * ph`` must equal H (likewise W).
        fade: How far a dropped patch goes towards ``grey`` (0: unchanged, 1: flat grey).
        grey: The grey level.

    Returns:
        (H, W, C) float array: kept pixels equal the input, dropped ones ``(1 - fade) * pixel + fade * grey``.
    """
    img = np.asarray(image, dtype=np.float64)
    if img.ndim == 2:
        img = img[..., None]
    ph, pw = patch_size
    H, W = img.shape[:2]
    if H % ph or W % pw:
        raise InputError(f'image {H}x{W} is not a whole number of {ph}x{pw} patches')
    gh, gw = H // ph, W // pw
    keep = np.asarray(keep, dtype=np.float64)
    if keep.size != gh * gw:
        raise InputError(f'{keep.size} patch decisions for a {gh}x{gw} patch grid')
    # Nearest-neighbour upsampling of the patch flags to pixels: each patch covers a ph x pw block.
    mask = np.kron(keep.reshape(gh, gw), np.ones((ph, pw)))[..., None]  # (H, W, 1)
    return mask * img + (1.0 - mask) * ((1.0 - fade) * img + fade * grey)


def figure_size(num_images: int, num_layers: int, image_hw: Tuple[int, int]) -> Tuple[float, float]:
    """(width, height) in inches of the overlay figure: one ``CELL_INCHES``-wide cell per column, plus titles.

    Columns are the input image followed by one per layer; cell height keeps the image's aspect ratio.
    """
    h, w = image_hw
    return (num_layers + 1) * CELL_INCHES, num_images * CELL_INCHES * h / w + TITLE_INCHES


def patch_overlay_figure(
        images: np.ndarray,
        patch_decisions: Union[np.ndarray, torch.Tensor],
        patch_size: Tuple[int, int],
        num_prefix_tokens: int = 1,
        titles: Optional[Sequence[str]] = None,
        fade: float = FADE,
) -> plt.Figure:
    """The overlay grid: rows = images, column 0 = the image, column l + 1 = what layer l keeps.

    Args:
        images: (B, H, W, C) in [0, 1] (un-normalised, e.g. by ``inputs.unnormalize``).
        patch_decisions: ``Decisions.patch``, (B, depth, num_prefix_tokens + num_patches).
        patch_size: (ph, pw) in pixels.
        num_prefix_tokens: Leading tokens (class token) that are not image patches.
        titles: Optional per-image row labels (e.g. "true / predicted").
        fade: See ``overlay``.

    Returns:
        The figure (``figure_size`` inches at ``DPI``); the caller saves or closes it.
    """
    dec = patch_decisions.detach().cpu().numpy() if isinstance(patch_decisions, torch.Tensor) \
        else np.asarray(patch_decisions)
    dec = dec[:, :, num_prefix_tokens:]
    images = np.asarray(images)
    B, depth = dec.shape[:2]
    if images.shape[0] != B:
        raise InputError(f'{images.shape[0]} images but decisions for {B}')
    H, W = images.shape[1:3]
    fig, axes = plt.subplots(B, depth + 1, figsize=figure_size(B, depth, (H, W)), dpi=DPI, squeeze=False)
    top = 1.0 - TITLE_INCHES / fig.get_size_inches()[1]
    fig.subplots_adjust(left=0.0, right=1.0, bottom=0.0, top=top, wspace=0.04, hspace=0.04)
    num_patches = dec.shape[-1]
    grey_cmap = images.shape[-1] == 1
    for i in range(B):
        columns = [images[i].astype(np.float64)]
        columns += [overlay(images[i], dec[i, layer], patch_size, fade) for layer in range(depth)]
        for c, shown in enumerate(columns):
            ax = axes[i, c]
            if grey_cmap:
                ax.imshow(shown[..., 0], cmap='gray', vmin=0.0, vmax=1.0, interpolation='nearest')
            else:
                ax.imshow(np.clip(shown, 0.0, 1.0), interpolation='nearest')
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title('input' if c == 0 else f'layer {c - 1}', fontsize=8)
            if c > 0:
                kept = int(round(dec[i, c - 1].sum()))
                ax.text(0.02, 0.02, f'{kept}/{num_patches}', transform=ax.transAxes, fontsize=6, color='yellow',
                        va='bottom', ha='left', bbox=dict(facecolor='black', alpha=0.5, pad=1, linewidth=0))
        if titles is not None:
            axes[i, 0].text(0.02, 0.98, titles[i], transform=axes[i, 0].transAxes, fontsize=6, color='yellow',
                            va='top', ha='left', bbox=dict(facecolor='black', alpha=0.5, pad=1, linewidth=0))
    return fig


@torch.no_grad()
def plot_patch_overlays(
        model: nn.Module,
        images: torch.Tensor,
        path: Union[str, os.PathLike],
        titles: Optional[Sequence[str]] = None,
        class_names: Optional[Sequence[str]] = None,
        labels: Optional[Sequence[int]] = None,
        mean: Optional[Sequence[float]] = None,
        std: Optional[Sequence[float]] = None,
) -> str:
    """Run ``model`` (eval) on normalised ``images`` and save the kept-patch overlay grid to ``path`` (PNG).

    Rows are titled with the prediction (and the label, when given) unless ``titles`` are passed. ``mean``/``std``
    undo the normalisation; default: the model's data config (``inputs.data_config``).

    Returns:
        The path written.
    """
    from .collect import run_with_decisions
    from .inputs import data_config, unnormalize

    was_training = model.training
    model.eval()
    try:
        device = next(model.parameters()).device
        logits, dec = run_with_decisions(model, images.to(device))
    finally:
        model.train(was_training)
    if mean is None or std is None:
        cfg = data_config(model)
        mean, std = cfg['mean'], cfg['std']
    shown = unnormalize(images, mean, std)
    if titles is None:
        preds = logits.argmax(-1).tolist()

        def name(k: int) -> str:
            return class_names[k] if class_names is not None and k < len(class_names) else str(k)

        titles = [(f'{name(int(labels[i]))} -> ' if labels is not None else '') + name(p) for i, p in enumerate(preds)]
    _, patch_size = patch_grid(model)
    fig = patch_overlay_figure(shown, dec.patch, patch_size, int(getattr(model, 'num_prefix_tokens', 1)), titles)
    return save_figure(fig, path)

