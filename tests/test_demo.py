"""``adavit demo`` end to end on a tiny backbone and small subsets: the report, its pictures, and the numbers."""
import json
import os
import re

import numpy as np
import pytest
import torch

import adavit
from adavit.cli.main import main
from _train_helpers import fmnist_dir, run_cli, tiny_backbone, write_config  # noqa: F401  (fixtures)

FIGURES = ('patches.png', 'usage.png', 'gmacs_by_class.png', 'accuracy_vs_gmacs.png')
EVAL_IMAGES = 120
THRESHOLDS = (0.3, 0.5, 0.7)


def demo_args(backbone: str, output: str, data_dir: str, *extra: str) -> list:
    """A demo small enough for a test: a few steps on 128 images, 120 test images, batch sizes 1 and 8."""
    return ['demo', '--backbone', backbone, '--output', output, '--data-dir', data_dir, '--subset', '128',
            '--eval-subset', str(EVAL_IMAGES), '--curve-subset', str(EVAL_IMAGES), '--batch-sizes', '1,8',
            '--thresholds', ','.join(str(t) for t in THRESHOLDS), '--warmup', '0', '--repeats', '1', '--threads', '1',
            '--set', 'data.workers=0', '--set', 'train.batch_size=32', '--no-progress',
            # 0.5, not the released 0.6: a barely trained patch gate then keeps some patches and drops others.
            '--set', 'model.patch_threshold=0.5', *extra]


@pytest.fixture(scope='module')
def random_plus(tmp_path_factory, fmnist_dir, tiny_backbone):  # noqa: F811
    """A tiny Random+ checkpoint: fine-tuned from the backbone under random decisions."""
    root = tmp_path_factory.mktemp('random_plus')
    config = write_config(str(root / 'random_plus.yaml'), fmnist_dir,
                          model={'gates': ['patch', 'head', 'block'], 'policy': 'random',
                                 'random_keep': [0.5, 0.5, 0.5]},
                          init=f'{tiny_backbone}/best.pt', train={'epochs': 1}, data={'subset': 64})
    result = run_cli(['train', '--config', config, '--output', str(root / 'run')])
    assert result.returncode == 0, result.stderr
    return str(root / 'run' / 'last.pt')


@pytest.fixture(scope='module')
def demo(tmp_path_factory, fmnist_dir, tiny_backbone, random_plus):  # noqa: F811
    """One demo run with Random+ present and no shipped AdaViT; returns (output folder, summary)."""
    out = str(tmp_path_factory.mktemp('demo') / 'demo')
    missing = os.path.join(out, 'no_such_adavit.pt')
    code = main(demo_args(f'{tiny_backbone}/best.pt', out, fmnist_dir, '--random-plus', random_plus,
                          '--shipped', missing))
    assert code == 0
    with open(os.path.join(out, 'summary.json')) as f:
        return out, json.load(f)


def test_report_references_every_figure(demo):
    out, _ = demo
    with open(os.path.join(out, 'report.md')) as f:
        report = f.read()
    linked = re.findall(r'!\[[^\]]*\]\(([^)]+)\)', report)
    assert sorted(linked) == sorted(FIGURES)
    for caption in ('Kept patches per layer', 'Head usage and MSA/FFN usage', 'GMACs per test image, by class',
                    'Accuracy vs GMACs'):
        assert caption in report
    # The results table names every model the demo had, and says why the shipped AdaViT is missing.
    for row in ('| dense backbone |', '| AdaViT (fine-tuned by the demo) |', '| Random (backbone',
                '| Random+ (fine-tuned'):
        assert row in report
    assert 'shipped AdaViT: skipped' in report and 'AdaViT (shipped) |' not in report
    assert 'torch threads' in report and torch.__version__ in report and 'adavit train --config' in report


def test_figures_are_real_pictures(demo):
    import matplotlib.image as mpimg
    out, _ = demo
    for name in FIGURES:
        path = os.path.join(out, name)
        assert os.path.getsize(path) > 5000, name
        pixels = mpimg.imread(path)
        assert pixels.ndim == 3 and min(pixels.shape[:2]) > 100, name
        assert float(pixels[..., :3].std()) > 0.05, f'{name} is (almost) blank'


def test_summary_numbers(demo):
    out, summary = demo
    models = summary['models']
    assert set(models) == {'dense', 'adavit', 'random', 'random_plus'}
    assert any('shipped AdaViT: skipped' in note for note in summary['notes'])
    for key, row in models.items():
        assert 0.0 <= row['top1'] <= 1.0, key
        assert row['gmacs'] > 0, key
        for batch in ('1', '8'):
            assert row['images_per_s'][batch] > 0, (key, batch)
    assert summary['settings']['test_images'] == EVAL_IMAGES
    model = adavit.load_model(models['adavit']['checkpoint'])
    dense_gmacs = adavit.dense_macs(model) / 1e9
    assert models['dense']['gmacs'] == pytest.approx(dense_gmacs, rel=1e-9)
    assert models['adavit']['dense_gmacs'] == pytest.approx(dense_gmacs, rel=1e-9)
    # The dense row's throughput is the dense ViT timed beside the AdaViT.
    assert models['dense']['images_per_s'] == models['adavit']['dense_images_per_s']
    assert summary['fine_tune']['step'] == 4  # 128 images in batches of 32, one epoch
    assert os.path.isfile(os.path.join(out, 'adavit', 'last.pt'))


def test_random_baseline_runs_at_the_adavit_cost(demo):
    _, summary = demo
    ada, rnd = summary['models']['adavit'], summary['models']['random']
    assert 0.0 < ada['gated_keep']['patch'] < 1.0  # a non-trivial rate, so the comparison below means something
    for kind in ('head', 'block'):  # drawn at the AdaViT's rates
        assert rnd['random_keep'][kind] == ada['gated_keep'][kind]
        assert abs(rnd['gated_keep'][kind] - ada['gated_keep'][kind]) < 0.1, kind
    assert rnd['gmacs'] == pytest.approx(ada['gmacs'], rel=0.05)  # patches at the rate of the AdaViT's cost
    assert abs(rnd['gated_keep']['patch'] - rnd['random_keep']['patch']) < 0.1
    assert rnd['checkpoint'] is None  # no training: the backbone's weights


def test_budget_curve_goes_through_the_model(demo):
    """The sweep runs on the evaluation images here, so its point at the model's own threshold is the model's."""
    _, summary = demo
    curve = summary['budget_curve']
    assert [p['thresholds']['patch'] for p in curve] == list(THRESHOLDS)
    assert all(0.0 <= p['top1'] <= 1.0 for p in curve)
    own = curve[THRESHOLDS.index(0.5)]
    assert own['gmacs'] == pytest.approx(summary['models']['adavit']['gmacs'], rel=1e-6)
    assert own['top1'] == pytest.approx(summary['models']['adavit']['top1'], abs=1e-9)
    assert sum(summary['gmacs_by_class'].values()) > 0


def test_random_plus_is_evaluated(demo, random_plus):
    _, summary = demo
    row = summary['models']['random_plus']
    assert row['checkpoint'] == random_plus
    keep = row['keep_mean']
    assert 0.3 < keep['patch'] < 0.7  # drawn at 0.5


def test_rerun_overwrites(tmp_path, fmnist_dir, tiny_backbone):  # noqa: F811
    """A second demo into the same folder starts the fine-tuning afresh instead of refusing or resuming."""
    out = str(tmp_path / 'demo')
    args = demo_args(f'{tiny_backbone}/best.pt', out, fmnist_dir, '--random-plus', str(tmp_path / 'none.pt'),
                     '--shipped', str(tmp_path / 'none.pt'))
    args[args.index('--eval-subset') + 1] = args[args.index('--curve-subset') + 1] = '40'
    assert main(args + ['--max-steps', '1']) == 0
    assert main(args + ['--max-steps', '2']) == 0
    with open(os.path.join(out, 'summary.json')) as f:
        summary = json.load(f)
    assert summary['fine_tune']['step'] == 2
    assert set(summary['models']) == {'dense', 'adavit', 'random'}
    assert len(summary['notes']) == 2


def test_shipped_adavit_gets_its_own_patch_map(tmp_path, fmnist_dir, tiny_backbone, random_plus):  # noqa: F811
    """With a shipped AdaViT for the same input, the report adds its kept-patch map on the same test images."""
    out = str(tmp_path / 'demo')
    args = demo_args(f'{tiny_backbone}/best.pt', out, fmnist_dir, '--random-plus', str(tmp_path / 'none.pt'),
                     '--shipped', random_plus, '--max-steps', '1')
    args[args.index('--eval-subset') + 1] = args[args.index('--curve-subset') + 1] = '40'
    assert main(args) == 0
    with open(os.path.join(out, 'summary.json')) as f:
        summary = json.load(f)
    assert summary['models']['adavit_shipped']['checkpoint'] == random_plus
    assert summary['figures'][next(c for c in summary['figures'] if 'shipped AdaViT' in c)] == 'patches_shipped.png'
    with open(os.path.join(out, 'report.md')) as f:
        assert '](patches_shipped.png)' in f.read()
    assert os.path.getsize(os.path.join(out, 'patches_shipped.png')) > 5000


def test_missing_backbone_is_one_line(tmp_path, capsys):
    out = tmp_path / 'demo'
    code = main(['demo', '--backbone', str(tmp_path / 'missing.pt'), '--output', str(out)])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert len(err.splitlines()) == 1
    assert 'adavit train --config configs/fashion_mnist_backbone.yaml' in err and 'missing.pt' in err
    assert not out.exists()


def test_load_model_carries_its_preprocessing(tiny_backbone):  # noqa: F811
    """timm's resolve_data_config on a loaded checkpoint gives what it was trained with, not ImageNet's."""
    from timm.data import resolve_data_config
    model = adavit.load_model(f'{tiny_backbone}/best.pt')
    cfg = resolve_data_config({}, model=model)
    assert cfg['input_size'] == (1, 28, 28)
    np.testing.assert_allclose(cfg['mean'], (0.2860,))
    np.testing.assert_allclose(cfg['std'], (0.3530,))
    assert cfg['crop_pct'] == 1.0 and cfg['interpolation'] == 'bilinear'
    assert model.default_cfg is model.pretrained_cfg
    assert model.pretrained_cfg['label_names'][0] == 'T-shirt/top'


def test_load_model_uses_the_checkpoint_data_section(tmp_path):
    """Mean and std set in the run's data config reach the model (e.g. an ImageFolder run with its own statistics)."""
    from timm.data import resolve_data_config
    from adavit import AdaViT
    from adavit.visualize import data_config as visualize_data_config
    from adavit.data.datasets import data_config

    kwargs = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=16, depth=1, num_heads=2, num_classes=4)
    model = AdaViT(**kwargs)
    path = str(tmp_path / 'ckpt.pt')
    data = {'name': str(tmp_path), 'mean': [0.1, 0.2, 0.3], 'std': [0.4, 0.5, 0.6], 'interpolation': 'bicubic',
            'crop_pct': 0.9}
    torch.save({'model': model.state_dict(), 'config': {'model': dict(arch='adavit', **kwargs), 'data': data}}, path)
    loaded = adavit.load_model(path)
    cfg = resolve_data_config({}, model=loaded)
    assert cfg['input_size'] == (3, 32, 32) and cfg['interpolation'] == 'bicubic' and cfg['crop_pct'] == 0.9
    np.testing.assert_allclose(cfg['mean'], data['mean'])
    np.testing.assert_allclose(cfg['std'], data['std'])
    # One data config serves training and the pictures.
    assert visualize_data_config is data_config
    assert visualize_data_config(loaded) == data_config(loaded, data)


def test_measure_speed_times_the_given_images():
    """With real images, the MACs quoted (and the decisions timed) are those images', cycled over the inputs."""
    from adavit import AdaViT
    from adavit.cost.benchmark import measure_speed

    torch.manual_seed(0)
    model = AdaViT(img_size=28, patch_size=7, in_chans=1, embed_dim=16, depth=2, num_heads=2, num_classes=10,
                   patch_threshold=0.5).eval()
    images = torch.randn(16, 1, 28, 28) * torch.linspace(0.1, 3.0, 16).view(16, 1, 1, 1)
    with torch.no_grad():
        expected = adavit.macs(model, images).double().mean().item() / 1e9  # 8 inputs of 2 cover all 16 images
    (row,) = measure_speed(model, batch_sizes=(2,), warmup=0, repeats=1, images=images)
    assert row.adaptive_gmacs == pytest.approx(expected, rel=1e-6)
    (noise,) = measure_speed(model, batch_sizes=(2,), warmup=0, repeats=1)
    assert noise.adaptive_gmacs != pytest.approx(expected, rel=1e-6)
