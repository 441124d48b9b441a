"""Pictures and reports: kept-patch overlays, usage heatmaps, cost histograms, accuracy-vs-cost, markdown report.

Matplotlib runs on the Agg backend (files only). Gather the numbers with ``collect`` / ``budget_curve``, draw with the
``plot_*`` functions (each saves a PNG and returns its path; the ``*_figure`` functions return the figure instead), and
tie them together with ``write_report``.
"""
from .collect import BudgetPoint, Collected, budget_curve, collect, run_with_decisions
from .cost import (accuracy_vs_gmacs_figure, gmacs_histogram_counts, gmacs_histogram_figure, plot_accuracy_vs_gmacs,
                   plot_gmacs_histogram)
from .inputs import FASHION_MNIST_CLASSES, data_config, load_images, unnormalize
from .patches import overlay, patch_overlay_figure, plot_patch_overlays
from .report import write_report
from .usage import plot_usage, usage_figure
