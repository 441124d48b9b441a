"""``adavit eval`` reports what a direct computation on the same checkpoint and images gives."""
import json

import numpy as np
import pytest
import torch
from torch.utils.data import Subset

from _train_helpers import fmnist_dir, run_cli, tiny_backbone, write_config  # noqa: F401  (fixtures)
from adavit.cost.macs import dense_macs, macs
from adavit.data.datasets import FashionMNIST, build_transform
from adavit.training.checkpoint import load_model, read_checkpoint


@pytest.fixture(scope='module')
def tiny_adavit(tmp_path_factory, fmnist_dir, tiny_backbone):  # noqa: F811
    """AdaViT fine-tuned for one epoch from the tiny backbone (which the checkpoint records)."""
    root = tmp_path_factory.mktemp('adavit')
    config = write_config(str(root / 'ada.yaml'), fmnist_dir, init=f'{tiny_backbone}/best.pt',
                          train={'epochs': 1}, loss={'budgets': [0.7, 0.7, 0.8]})
    result = run_cli(['train', '--config', config, '--output', str(root / 'run')])
    assert result.returncode == 0, result.stderr
    return str(root / 'run' / 'best.pt')


def direct(checkpoint, data_dir, n):
    """top-1, top-5, per-image MACs and per-layer keep-rates, computed by hand."""
    model = load_model(checkpoint)
    config = read_checkpoint(checkpoint)['config']
    transform = build_transform(model, config['data'], training=False)
    data = Subset(FashionMNIST(data_dir, 'val', transform), range(n))
    images = torch.stack([data[i][0] for i in range(n)])
    labels = torch.tensor([data[i][1] for i in range(n)])
    with torch.no_grad():
        logits, decisions = model(images, return_decisions=True)
    top5 = logits.topk(5, dim=1).indices
    cost = macs(model, images, decisions).double() / 1e9
    return {
        'top1': 100.0 * (top5[:, 0] == labels).double().mean().item(),
        'top5': 100.0 * (top5 == labels[:, None]).any(dim=1).double().mean().item(),
        'gmacs': cost.numpy(),
        'dense_gmacs': dense_macs(model) / 1e9,
        'patch': decisions.patch[:, :, 1:].mean(dim=(0, 2)).tolist(),
        'head': decisions.head.mean(dim=(0, 2)).tolist(),
        'msa': decisions.block[:, :, 0].mean(dim=0).tolist(),
        'ffn': decisions.block[:, :, 1].mean(dim=0).tolist(),
    }


def test_eval_matches_direct_computation(tmp_path, fmnist_dir, tiny_adavit, tiny_backbone):  # noqa: F811
    out = tmp_path / 'eval.json'
    # Batches of 64 over 150 images: the last batch is partial, so per-image bookkeeping is exercised.
    result = run_cli(['eval', '--checkpoint', tiny_adavit, '--data-dir', fmnist_dir, '--subset', '150',
                      '--batch-size', '64', '--compare-dense', '--json', str(out), '--no-progress'])
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    ref = direct(tiny_adavit, fmnist_dir, 150)
    assert report['count'] == 150
    assert report['top1'] == pytest.approx(ref['top1'], abs=1e-9)
    assert report['top5'] == pytest.approx(ref['top5'], abs=1e-9)
    assert report['gmacs_mean'] == pytest.approx(ref['gmacs'].mean(), rel=1e-9)
    assert report['gmacs_p50'] == pytest.approx(np.percentile(ref['gmacs'], 50), rel=1e-9)
    assert report['gmacs_p95'] == pytest.approx(np.percentile(ref['gmacs'], 95), rel=1e-9)
    assert report['dense_gmacs'] == pytest.approx(ref['dense_gmacs'])
    for kind in ('patch', 'head', 'msa', 'ffn'):
        assert report['keep'][kind] == pytest.approx(ref[kind], abs=1e-6), kind
    assert report['gmacs_mean'] < report['dense_gmacs']

    dense = direct(f'{tiny_backbone}/best.pt', fmnist_dir, 150)
    assert report['dense_checkpoint'].endswith('best.pt')
    assert report['dense_top1'] == pytest.approx(dense['top1'], abs=1e-9)
    assert report['dense_gmacs_mean'] == pytest.approx(dense['gmacs'].mean(), rel=1e-9)


def test_eval_dense_checkpoint(tmp_path, fmnist_dir, tiny_backbone):  # noqa: F811
    out = tmp_path / 'dense.json'
    result = run_cli(['eval', '--checkpoint', f'{tiny_backbone}/last.pt', '--data-dir', fmnist_dir, '--subset', '100',
                      '--compare-dense', '--json', str(out), '--no-progress'])
    assert result.returncode == 0, result.stderr
    report = json.loads(out.read_text())
    ref = direct(f'{tiny_backbone}/last.pt', fmnist_dir, 100)
    assert report['top1'] == pytest.approx(ref['top1'], abs=1e-9)
    assert report['gmacs_mean'] == pytest.approx(report['dense_gmacs'])
    assert report['dense_top1'] == report['top1']
    assert all(v == 1.0 for kind in report['keep'].values() for v in kind)


def test_policy_frozen_fine_tuning_trains_only_the_backbone(tmp_path, fmnist_dir, tiny_adavit):  # noqa: F811
    """``model.train_decisions=eval``: training applies the served decisions; the decision networks stay as trained."""
    export = str(tmp_path / 'adapted.pt')
    config = write_config(str(tmp_path / 'adapt.yaml'), fmnist_dir, init=tiny_adavit, model={'train_decisions': 'eval'},
                          train={'epochs': 2, 'export': export, 'export_from': 'last'})
    result = run_cli(['train', '--config', config, '--output', str(tmp_path / 'run')])
    assert result.returncode == 0, result.stderr
    before = read_checkpoint(tiny_adavit)['model']
    after = read_checkpoint(str(tmp_path / 'run' / 'last.pt'))['model']
    gates = [k for k in before if any(g in k for g in ('.patch_gate.', '.head_gate.', '.block_gate.'))]
    assert len(gates) == 8  # weight and bias: patch gates in both blocks, head and block gates in block 1 only
    for key in gates:
        assert torch.equal(before[key], after[key]), key
    assert not torch.equal(before['blocks.0.mlp.fc1.weight'], after['blocks.0.mlp.fc1.weight'])
    assert read_checkpoint(str(tmp_path / 'run' / 'last.pt'))['config']['model']['train_decisions'] == 'eval'
    # export_from=last: the exported weights are the last epoch's, whichever epoch validated best
    exported = read_checkpoint(export)['model']
    assert all(torch.equal(exported[k], after[k]) for k in after)


def test_unknown_export_from_fails_before_training(tmp_path, fmnist_dir):  # noqa: F811
    config = write_config(str(tmp_path / 'c.yaml'), fmnist_dir, train={'export_from': 'final'})
    result = run_cli(['train', '--config', config, '--output', str(tmp_path / 'run')])
    assert result.returncode != 0
    assert "train.export_from must be 'best' or 'last'" in result.stderr and 'Traceback' not in result.stderr
