"""Matplotlib set up for files only (the Agg backend), and saving figures at a predictable pixel size."""
import os
from typing import Union

import matplotlib

matplotlib.use('Agg')  # files only: no display is needed or wanted (servers, CI)
import matplotlib.pyplot as plt  # noqa: E402

DPI = 100

__all__ = ['DPI', 'plt', 'save_figure']


def save_figure(fig: 'plt.Figure', path: Union[str, os.PathLike]) -> str:
    """Save at the figure's own size and DPI (no tight bbox, so the pixel size is predictable) and close it.

    Returns:
        The path written, as a string.
    """
    path = os.fspath(path)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=fig.dpi)
    plt.close(fig)
    return path
