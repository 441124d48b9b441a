"""``adavit predict`` and ``adavit visualize`` on real Fashion-MNIST images saved as PNG files."""
import json
import os
import re

import numpy as np
import pytest
import torch
from PIL import Image

from _viz_helpers import fmnist, normalise, save_checkpoint, save_pngs, tiny_model

from adavit.cli.main import main
from adavit.visualize import FASHION_MNIST_CLASSES

macs_module = pytest.importorskip('adavit.cost.macs')


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp('predict')
    images, labels = fmnist(3)
    model = tiny_model()
    ckpt = save_checkpoint(model, str(root / 'model.pt'))
    paths = save_pngs(images, str(root))
    return model, ckpt, paths, images, root


def _run(capsys, argv):
    code = main(argv)
    out, err = capsys.readouterr()
    return code, out, err


def test_predict_text_output(capsys, setup):
    model, ckpt, paths, images, _ = setup
    code, out, err = _run(capsys, ['predict', *paths, '--checkpoint', ckpt])
    assert code == 0, err
    blocks = out.strip().split('\n\n')
    assert len(blocks) == len(paths)
    with torch.no_grad():
        x = normalise(images)
        probs = model(x).softmax(-1)
        _, dec = model(x, return_decisions=True)
        cost = macs_module.macs(model, x) / 1e9
    dense = macs_module.dense_macs(model) / 1e9
    for b, (block, path) in enumerate(zip(blocks, paths)):
        lines = block.splitlines()
        assert lines[0] == path
        top = [re.fullmatch(r'\s+(\d)\. (.+?)\s+([0-9.]+)', line) for line in lines[1:6]]
        assert all(top), lines[1:6]
        names = [m.group(2) for m in top]
        p = np.array([float(m.group(3)) for m in top])
        assert [int(m.group(1)) for m in top] == [1, 2, 3, 4, 5]
        assert all(n in FASHION_MNIST_CLASSES for n in names)  # names from the checkpoint's Fashion-MNIST config
        expected_p, expected_i = probs[b].topk(5)
        assert names == [FASHION_MNIST_CLASSES[i] for i in expected_i.tolist()]
        np.testing.assert_allclose(p, expected_p.numpy(), atol=6e-5)  # printed with 4 decimals
        assert np.all(np.diff(p) <= 0)
        gm = re.search(r'cost: ([0-9.e+-]+) GMACs \(([0-9.]+)% of the dense ([0-9.e+-]+)\)', block)
        assert float(gm.group(1)) == pytest.approx(cost[b].item(), rel=1e-5)
        assert float(gm.group(3)) == pytest.approx(dense, rel=1e-5)
        kept = re.search(r'patches kept per layer \(of 49\): ([\d ]+) \(mean', block).group(1).split()
        assert [int(k) for k in kept] == dec.patch[b, :, 1:].sum(-1).int().tolist()
        heads = re.search(r'heads kept per layer \(of 2\): ([\d ]+)', block).group(1).split()
        assert [int(h) for h in heads] == dec.head[b].sum(-1).int().tolist()
        runs = re.search(r'MSA run: (\d)/3 layers, FFN run: (\d)/3 layers', block)
        assert (int(runs.group(1)), int(runs.group(2))) == tuple(dec.block[b].sum(0).int().tolist())


def test_predict_json_all_classes_sum_to_one(capsys, setup):
    _, ckpt, paths, _, _ = setup
    code, out, err = _run(capsys, ['predict', paths[0], '--checkpoint', ckpt, '--json', '--topk', '10',
                                   '--classes', ','.join(f'c{k}' for k in range(10))])
    assert code == 0, err
    result = json.loads(out)
    assert len(result) == 1 and result[0]['image'] == paths[0]
    probs = [t['prob'] for t in result[0]['top']]
    assert len(probs) == 10 and sum(probs) == pytest.approx(1.0, abs=1e-5)
    assert {t['class'] for t in result[0]['top']} == {f'c{k}' for k in range(10)}
    assert 0 < result[0]['gmacs'] and len(result[0]['patches_kept']) == 3


@pytest.mark.parametrize('kind', ['missing', 'not-an-image'])
def test_predict_bad_image_is_one_line_error(capsys, setup, kind):
    _, ckpt, paths, _, root = setup
    bad = str(root / 'missing.png')
    if kind == 'not-an-image':
        bad = str(root / 'text.png')
        with open(bad, 'w') as f:
            f.write('not an image\n')
    code, out, err = _run(capsys, ['predict', paths[0], bad, '--checkpoint', ckpt])
    assert code == 2 and out == ''
    assert len(err.strip().splitlines()) == 1 and 'Traceback' not in err
    assert err.startswith('adavit predict: error:') and bad in err


def test_predict_wrong_class_count(capsys, setup):
    _, ckpt, paths, _, _ = setup
    code, _, err = _run(capsys, ['predict', paths[0], '--checkpoint', ckpt, '--classes', 'a,b'])
    assert code == 2 and '2 names but the model has 10 classes' in err and len(err.strip().splitlines()) == 1


def test_predict_missing_checkpoint(capsys, setup):
    _, _, paths, _, root = setup
    code, _, err = _run(capsys, ['predict', paths[0], '--checkpoint', str(root / 'nope.pt')])
    assert code == 2 and len(err.strip().splitlines()) == 1 and 'nope.pt' in err


def test_visualize_cli_writes_pictures(capsys, setup, tmp_path):
    _, ckpt, paths, _, _ = setup
    code, out, err = _run(capsys, ['visualize', '--checkpoint', ckpt, '--images', *paths, '--output', str(tmp_path)])
    assert code == 0, err
    for name in ('patches.png', 'usage.png'):
        path = tmp_path / name
        assert f'wrote {path}' in out and os.path.getsize(path) > 1000
    from adavit.visualize.patches import DPI, figure_size
    with Image.open(tmp_path / 'patches.png') as png:
        w_in, h_in = figure_size(3, 3, (28, 28))
        assert png.size == (round(w_in * DPI), round(h_in * DPI))


def test_visualize_cli_bad_image(capsys, setup, tmp_path):
    _, ckpt, _, _, _ = setup
    code, _, err = _run(capsys, ['visualize', '--checkpoint', ckpt, '--images', str(tmp_path / 'x.jpg'),
                                 '--output', str(tmp_path)])
    assert code == 2 and len(err.strip().splitlines()) == 1 and 'x.jpg' in err
    assert not (tmp_path / 'patches.png').exists()
