"""Pictures and report: the overlays show exactly the decisions, the heatmaps exactly their means, the histogram
every image once, and the report every figure and number it was given."""
import os

import numpy as np
import pytest
import torch
from PIL import Image

from _viz_helpers import MEAN, STD, fmnist, normalise, tiny_model

from adavit.visualize import (FASHION_MNIST_CLASSES, accuracy_vs_gmacs_figure, budget_curve, collect, data_config,
                              gmacs_histogram_counts, gmacs_histogram_figure, overlay, patch_overlay_figure,
                              plot_accuracy_vs_gmacs, plot_gmacs_histogram, plot_patch_overlays, plot_usage,
                              unnormalize, usage_figure, write_report)
from adavit.visualize.patches import DPI, FADE, GREY, TITLE_INCHES, figure_size

macs_module = pytest.importorskip('adavit.cost.macs')


@pytest.fixture(scope='module')
def data():
    images, labels = fmnist(48)
    return images, labels, normalise(images), torch.from_numpy(labels)


@pytest.fixture(scope='module')
def model():
    return tiny_model()


@pytest.fixture(scope='module')
def loader(data):
    _, _, x, y = data
    return [(x[i:i + 16], y[i:i + 16]) for i in range(0, x.shape[0], 16)]


# ---------------------------------------------------------------------------------------------------------------------
# Overlays


def test_overlay_keeps_kept_patches_and_greys_dropped_ones(data):
    img = data[0][0].astype(np.float64) / 255.0  # a real 28x28 image, 7x7 patches of 4x4
    keep = np.ones((7, 7))
    keep[3, 2] = keep[0, 0] = keep[6, 6] = 0
    out = overlay(img, keep, (4, 4))
    assert out.shape == (28, 28, 1)
    mask = np.kron(keep, np.ones((4, 4))).astype(bool)
    np.testing.assert_array_equal(out[..., 0][mask], img[mask])  # kept pixels are untouched
    region = (slice(12, 16), slice(8, 12))  # patch (row 3, col 2)
    orig, shown = img[region], out[..., 0][region]
    np.testing.assert_allclose(shown, (1 - FADE) * orig + FADE * GREY)
    # In the expected way: pulled towards grey (the mean moves towards it, contrast shrinks by 1 - FADE).
    assert abs(shown.mean() - GREY) <= (1 - FADE) * abs(orig.mean() - GREY) + 1e-12
    np.testing.assert_allclose(shown.std(), (1 - FADE) * orig.std())
    assert orig.std() > 0.05  # the chosen patch has content, so the test is not vacuous


def test_overlay_rgb_imagenet_grid():
    rng = np.random.default_rng(0)
    img = rng.random((224, 224, 3))
    keep = rng.random(196) > 0.5  # flat, row-major, as the 14x14 tokens are
    out = overlay(img, keep, (16, 16))
    assert out.shape == (224, 224, 3)
    r, c = divmod(int(np.argmin(keep)), 14)  # a dropped patch
    block = (slice(16 * r, 16 * r + 16), slice(16 * c, 16 * c + 16))
    np.testing.assert_allclose(out[block], (1 - FADE) * img[block] + FADE * GREY)
    r, c = divmod(int(np.argmax(keep)), 14)  # a kept one
    block = (slice(16 * r, 16 * r + 16), slice(16 * c, 16 * c + 16))
    np.testing.assert_array_equal(out[block], img[block])


def test_overlay_rejects_mismatched_grid():
    from adavit.errors import AdaViTError

    with pytest.raises(AdaViTError, match='7x7 patch grid'):
        overlay(np.zeros((28, 28)), np.ones(48), (4, 4))


def test_unnormalize_recovers_the_image(data, model):
    images, _, x, _ = data
    cfg = data_config(model)
    assert cfg['input_size'] == (1, 28, 28) and cfg['mean'] == (MEAN,) and cfg['std'] == (STD,)
    np.testing.assert_allclose(unnormalize(x[:4], cfg['mean'], cfg['std'])[..., 0], images[:4] / 255.0, atol=1e-6)


def test_data_config_without_pretrained_cfg_fits_the_model():
    """A model built directly has no pretrained_cfg: timm would say 3x224x224 ImageNet; the model takes 1x28x28."""
    from adavit import AdaViT

    model = AdaViT(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=10)
    cfg = data_config(model)
    assert cfg['input_size'] == (1, 28, 28) and len(cfg['mean']) == 1 and len(cfg['std']) == 1
    assert cfg['crop_pct'] == 1.0


def test_patch_overlay_figure_shows_the_decisions(data, model):
    images, labels, x, _ = data
    with torch.no_grad():
        _, dec = model(x[:3], return_decisions=True)
    kept = dec.patch[:, :, 1:]
    assert 0 < kept.mean() < 1  # both kept and dropped patches appear
    shown = images[:3, :, :, None] / 255.0
    fig = patch_overlay_figure(shown, dec.patch, (4, 4))
    axes = np.array(fig.axes).reshape(3, 4)
    for i in range(3):
        np.testing.assert_allclose(axes[i, 0].images[0].get_array(), shown[i, ..., 0])
        for layer in range(3):
            expected = overlay(shown[i], kept[i, layer].numpy(), (4, 4))[..., 0]
            np.testing.assert_allclose(axes[i, layer + 1].images[0].get_array(), expected)
            assert axes[i, layer + 1].texts[0].get_text() == f'{int(kept[i, layer].sum())}/49'
    import matplotlib.pyplot as plt
    plt.close(fig)


def test_plot_patch_overlays_png(tmp_path, data, model):
    _, labels, x, _ = data
    path = plot_patch_overlays(model, x[:4], tmp_path / 'patches.png', class_names=FASHION_MNIST_CLASSES,
                               labels=labels[:4].tolist())
    assert os.path.getsize(path) > 1000
    with Image.open(path) as png:
        w_in, h_in = figure_size(4, 3, (28, 28))
        assert png.size == (round(w_in * DPI), round(h_in * DPI))
        # Square cells: 4 columns (input + 3 layers) by 4 rows, plus the title strip.
        assert png.size[0] == pytest.approx(png.size[1] - TITLE_INCHES * DPI, abs=1)
        arr = np.asarray(png.convert('L'), dtype=np.float64)
    assert arr.std() > 10  # a picture, not a blank canvas


def test_plot_patch_overlays_rgb_model(tmp_path):
    from adavit import AdaViT

    model = AdaViT(img_size=32, patch_size=8, in_chans=3, embed_dim=32, depth=2, num_heads=2, num_classes=5,
                   patch_threshold=0.5).eval()
    path = plot_patch_overlays(model, torch.randn(2, 3, 32, 32), tmp_path / 'rgb.png')
    with Image.open(path) as png:
        w_in, h_in = figure_size(2, 2, (32, 32))
        assert png.size == (round(w_in * DPI), round(h_in * DPI))


# ---------------------------------------------------------------------------------------------------------------------
# Collect, usage, cost


def test_collect_matches_the_decisions_and_costs(data, model, loader):
    _, labels, x, _ = data
    res = collect(model, loader)
    with torch.no_grad():
        logits, dec = model(x, return_decisions=True)
        cost = macs_module.macs(model, x)
    assert res.num_images == 48
    np.testing.assert_array_equal(res.labels, labels)
    np.testing.assert_array_equal(res.preds, logits.argmax(-1).numpy())
    np.testing.assert_allclose(res.gmacs, cost.numpy() / 1e9, rtol=1e-12)
    np.testing.assert_allclose(res.patch_keep, dec.patch[:, :, 1:].mean((0, 2)).numpy(), atol=1e-6)
    np.testing.assert_allclose(res.head_keep, dec.head.mean(0).numpy(), atol=1e-6)
    np.testing.assert_allclose(res.block_keep, dec.block.mean(0).numpy(), atol=1e-6)
    np.testing.assert_array_equal(res.patches_kept, dec.patch[:, :, 1:].sum(-1).numpy())
    assert res.top1 == pytest.approx(100.0 * (logits.argmax(-1) == torch.from_numpy(labels)).float().mean().item())
    assert list(res.head_gated) == [False, True, True]


def test_collect_max_batches_and_restores_mode(model, loader):
    model.train()
    try:
        res = collect(model, loader, max_batches=2)
        assert res.num_images == 32 and model.training
    finally:
        model.eval()


def test_usage_heatmaps_show_the_means(tmp_path, model, loader):
    res = collect(model, loader)
    fig = usage_figure(res.head_keep, res.block_keep, res.patch_keep, res.head_gated, res.block_gated,
                       res.patch_gated)
    np.testing.assert_allclose(fig.axes[0].images[0].get_array(), res.head_keep)
    np.testing.assert_allclose(fig.axes[1].images[0].get_array(), res.block_keep)
    np.testing.assert_allclose([b.get_width() for b in fig.axes[2].patches], res.patch_keep)
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ['0 (fixed)', '1', '2']
    import matplotlib.pyplot as plt
    plt.close(fig)
    path = plot_usage(res, tmp_path / 'usage.png')
    with Image.open(path) as png:
        assert png.size[0] > 2 * png.size[1] and os.path.getsize(path) > 1000


def test_histogram_counts_every_image_once(tmp_path):
    rng = np.random.default_rng(0)
    gmacs = rng.uniform(0.5, 1.5, 200)
    labels = rng.integers(0, 10, 200)
    counts, edges = gmacs_histogram_counts(gmacs, labels, 10, bins=20)
    assert counts.shape == (10, 20) and edges.shape == (21,)
    assert counts.sum() == 200
    np.testing.assert_array_equal(counts.sum(1), np.bincount(labels, minlength=10))
    fig = gmacs_histogram_figure(gmacs, labels, FASHION_MNIST_CLASSES, bins=20, dense_gmacs=2.0)
    heights = [p.get_height() for p in fig.axes[0].patches]
    assert sum(heights) == 200
    legend = [t.get_text() for t in fig.axes[0].get_legend().get_texts()]
    assert any(t.startswith('Ankle boot (') for t in legend) and any(t.startswith('dense (2') for t in legend)
    import matplotlib.pyplot as plt
    plt.close(fig)
    path = plot_gmacs_histogram(gmacs, labels, FASHION_MNIST_CLASSES, tmp_path / 'hist.png')
    with Image.open(path) as png:
        assert png.size == (800, 450)


def test_histogram_of_identical_costs():
    counts, edges = gmacs_histogram_counts(np.full(7, 0.25), np.zeros(7, dtype=int), 2, bins=5)
    assert counts.sum() == 7 and edges[0] < 0.25 < edges[-1]


def test_accuracy_vs_gmacs(tmp_path):
    curve = [(2.0, 80.0), (1.0, 70.0), (1.5, 76.0)]
    points = {'Random': (1.2, 40.0), 'Random+': (1.2, 60.0), 'dense backbone': (3.0, 82.0)}
    fig = accuracy_vs_gmacs_figure(curve, points)
    ax = fig.axes[0]
    np.testing.assert_allclose(ax.lines[0].get_xdata(), [1.0, 1.5, 2.0])
    np.testing.assert_allclose(ax.lines[0].get_ydata(), [70.0, 76.0, 80.0])
    for line, (g, t) in zip(ax.lines[1:], points.values()):
        assert (line.get_xdata()[0], line.get_ydata()[0]) == (g, t)
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[1].startswith('Random (40.0%') and legend[3].startswith('dense backbone (82.0%')
    import matplotlib.pyplot as plt
    plt.close(fig)
    path = plot_accuracy_vs_gmacs(curve, tmp_path / 'acc.png', points)
    with Image.open(path) as png:
        assert png.size == (650, 450)


def test_budget_curve_sweeps_and_restores(model, loader):
    before = (model.patch_threshold, model.head_threshold, model.block_threshold)
    points = budget_curve(model, loader, thresholds=[0.0, {'patch': 0.7}, 1.0], max_batches=1)
    assert (model.patch_threshold, model.head_threshold, model.block_threshold) == before
    dense = macs_module.dense_macs(model) / 1e9
    # Threshold 0: sigmoid > 0 always, everything runs (plus the decision networks); 1: nothing does.
    assert points[0].gmacs >= dense
    assert points[2].gmacs < points[1].gmacs < points[0].gmacs
    assert points[1].thresholds == {'patch': 0.7, 'head': before[1], 'block': before[2]}
    with torch.no_grad():
        x, y = loader[0]
        model.set_thresholds(0.0, 0.0, 0.0)
        try:
            top1 = 100.0 * (model(x).argmax(-1) == y).float().mean().item()
        finally:
            model.set_thresholds(*before)
    assert points[0].top1 == pytest.approx(top1)


# ---------------------------------------------------------------------------------------------------------------------
# Report


def test_report_embeds_figures_and_numbers(tmp_path):
    figs = tmp_path / 'figs'
    figs.mkdir()
    figures = {}
    for name in ('patches', 'usage', 'cost'):
        p = figs / f'{name}.png'
        Image.new('RGB', (10, 10)).save(p)
        figures[f'{name} figure'] = p
    summary = {
        'top-1 (%)': 81.1, 'GMACs': 0.0123, 'images': 10000, 'dataset': 'fashion-mnist',
        'results': {'AdaViT': {'top-1': 77.3, 'GMACs': 2.3}, 'DeiT-S': {'top-1': 79.8, 'GMACs': 4.6}},
        'curve': [{'threshold': 0.5, 'GMACs': 1.25, 'top-1': 76.5}],
    }
    path = write_report(tmp_path / 'out', summary, figures, title='Demo')
    text = open(path, encoding='utf-8').read()
    assert path == os.path.join(tmp_path / 'out', 'report.md') and text.startswith('# Demo')
    for caption, p in figures.items():
        rel = os.path.relpath(p, tmp_path / 'out').replace(os.sep, '/')
        assert f'![{caption}]({rel})' in text
        assert os.path.isfile(os.path.join(tmp_path / 'out', rel))
    for needle in ('| top-1 (%) | 81.1 |', '| GMACs | 0.0123 |', '| images | 10000 |', '| dataset | fashion-mnist |',
                   '| AdaViT | 77.3 | 2.3 |', '| DeiT-S | 79.8 | 4.6 |', '| 0.5 | 1.25 | 76.5 |'):
        assert needle in text, needle
