"""The speed benchmark's bookkeeping (not its timings): MACs, ratios and the JSON it writes."""
import json

import pytest
import torch

from adavit import AdaViT
from adavit.cli.main import main
from adavit.cost.benchmark import format_rows, measure_speed
from adavit.cost.macs import dense_macs


def test_measure_speed_reports_consistent_ratios():
    model = AdaViT(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=4, num_classes=5,
                   policy='random', random_keep=(0.5, 0.5, 0.8))
    rows = measure_speed(model, batch_sizes=(1, 4), threads=1, warmup=0, repeats=2, images_per_round=4)
    assert [r.batch_size for r in rows] == [1, 4]
    for r in rows:
        assert r.dense_gmacs == pytest.approx(dense_macs(model) / 1e9)
        assert r.mac_ratio == pytest.approx(r.dense_gmacs / r.adaptive_gmacs)
        assert 1.3 < r.mac_ratio < 6  # about half the patches and heads dropped
        assert r.speedup == pytest.approx(r.dense_ms / r.sparse_ms)
        assert r.efficiency == pytest.approx(r.speedup / r.mac_ratio)
        assert r.sparse_images_per_s == pytest.approx(1e3 * r.batch_size / r.sparse_ms)
    table = format_rows(rows).splitlines()
    assert len(table) == 3 and 'efficiency' in table[0]


def test_benchmark_cli_keep_all_costs_exactly_the_dense_model(tmp_path, capsys):
    out = tmp_path / 'speed.json'
    torch.set_num_threads(1)
    assert main(['benchmark', '--model', 'adavit_deit_tiny_patch16_224', '--policy', 'keep-all', '--batch-sizes', '1',
                 '--warmup', '0', '--repeats', '1', '--images-per-round', '1', '--threads', '1',
                 '--json', str(out)]) == 0
    result = json.loads(out.read_text())
    row = result['rows'][0]
    assert result['keep'] == [1.0, 1.0, 1.0]
    assert row['mac_ratio'] == 1.0 and row['adaptive_gmacs'] == row['dense_gmacs']
    assert row['dense_gmacs'] == pytest.approx(1.2537, abs=1e-4)
    assert 'efficiency' in capsys.readouterr().out


def test_benchmark_cli_rejects_unknown_model(capsys):
    assert main(['benchmark', '--model', 'vit_nonexistent', '--json', '']) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and 'unknown model' in err
