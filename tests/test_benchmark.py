"""The speed benchmark's bookkeeping (not its timings): MACs, ratios and the JSON it writes."""
import argparse
import collections
import importlib.util
import json
import os
import platform
import re

import pytest
import timm
import torch

from adavit import AdaViT
from adavit.cli import benchmark as benchmark_cli
from adavit.cli.benchmark import build_model, validation_images
from adavit.cli.main import main
from adavit.cost import benchmark as speed
from adavit.cost.benchmark import (ACCELERATOR_WARMUP_CALLS, balanced_orders, cpu_name, format_rows,
                                   interleaved_medians, interleaved_times, measure_speed, missing_device,
                                   pin_allocator, warmup_rounds)
from adavit.cost.macs import decision_macs, dense_macs
from adavit.gates.budget import eval_keep_rates
from adavit.training.checkpoint import load_model


def load_benchmark_script(name: str):
    """``benchmarks/<name>.py`` as a module (the scripts are not part of the package)."""
    spec = importlib.util.spec_from_file_location(
        name, os.path.join(os.path.dirname(__file__), '..', 'benchmarks', f'{name}.py'))
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


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
        # the baseline is timm's faster attention path in the rounds that chose it, and names which one it is
        assert r.dense_attention == min(('fused', 'matmul'),
                                        key={'fused': r.dense_fused_ms, 'matmul': r.dense_matmul_ms}.__getitem__)
        assert r.efficiency == pytest.approx(r.speedup / r.mac_ratio)
        assert r.sparse_images_per_s == pytest.approx(1e3 * r.batch_size / r.sparse_ms)
        assert r.allocator == 'glibc pinned'  # this machine's C library is glibc
        # the median's efficiency lies between those of the best and the worst round
        assert r.rounds == 2 and r.efficiency_low <= r.efficiency * (1 + 1e-9)
        assert r.efficiency <= r.efficiency_high * (1 + 1e-9)
        assert r.efficiency_ci_low <= r.efficiency * (1 + 1e-9) and r.efficiency <= r.efficiency_ci_high * (1 + 1e-9)
        assert [len(r.dense_rounds_ms), len(r.sparse_rounds_ms), len(r.masked_rounds_ms)] == [2, 2, 2]
        assert r.sparse_ms == pytest.approx(sum(r.sparse_rounds_ms) / 2)  # the median of two rounds
    table = format_rows(rows).splitlines()
    assert len(table) == 3 and 'efficiency' in table[0] and '95% CI' in table[0] and 'by round' in table[0]
    assert f' {rows[0].efficiency_ci_low:.2f}-{rows[0].efficiency_ci_high:.2f} ' in table[1]
    assert table[1].endswith(f'{rows[0].efficiency_low:.2f}-{rows[0].efficiency_high:.2f}')


def test_measure_speed_pairs_dense_and_sparse_round_by_round(monkeypatch):
    """The per-round efficiency divides each round's dense time by the same round's sparse time: a slow spell that
    slows both in one round leaves that round's ratio alone."""
    rounds = {'fused': [2.5], 'matmul': [5.0],  # the race of timm's attention paths, half as many rounds
              'dense': [2.0, 4.0, 3.0], 'sparse': [1.0, 1.0, 2.0], 'masked': [6.0] * 3}
    calls = []

    def interleaved_times(runs, count, warmup, repeats, interleave):
        calls.append((sorted(runs), repeats))
        return {name: rounds[name] for name in runs}

    monkeypatch.setattr(speed, 'interleaved_times', interleaved_times)
    model = AdaViT(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=4, num_classes=5,
                   policy='random', random_keep=(0.5, 0.5, 0.8))
    row, = measure_speed(model, batch_sizes=(2,), threads=1, warmup=0, repeats=3, images_per_round=2)
    assert calls == [(['fused', 'matmul'], 1), (['dense', 'masked', 'sparse'], 3)]
    assert row.dense_attention == 'fused' and row.dense_fused_ms == pytest.approx(2.5e3)
    assert row.dense_matmul_ms == pytest.approx(5e3)
    assert row.dense_ms == pytest.approx(3e3) and row.sparse_ms == pytest.approx(1e3)
    assert row.efficiency == pytest.approx(3.0 / row.mac_ratio)
    # rounds: 2/1, 4/1, 3/2
    assert row.efficiency_low == pytest.approx(1.5 / row.mac_ratio)
    assert row.efficiency_high == pytest.approx(4.0 / row.mac_ratio)
    assert row.rounds == 3
    assert row.dense_rounds_ms == pytest.approx([2e3, 4e3, 3e3]) and row.masked_rounds_ms == pytest.approx([6e3] * 3)
    assert (row.efficiency_ci_low, row.efficiency_ci_high) == speed.efficiency_interval([2, 4, 3], [1, 1, 2],
                                                                                         row.mac_ratio)


def test_efficiency_interval_resamples_paired_rounds():
    # Two rounds: a resample takes round 0 twice (1/4), one of each (1/2) or round 1 twice (1/4); the median of two is
    # their mean, so the efficiency is 2, 3 or 4, and the 95% interval spans 2 to 4.
    low, high = speed.efficiency_interval([2.0, 4.0], [1.0, 1.0], mac_ratio=1.0)
    assert (low, high) == pytest.approx((2.0, 4.0))
    # Dense and sparse of a round go together: rounds slowed alike leave no doubt about the ratio.
    assert speed.efficiency_interval([2.0, 4.0, 3.0], [1.0, 2.0, 1.5], mac_ratio=2.0) == pytest.approx((1.0, 1.0))
    assert speed.efficiency_interval([3.0], [1.0], mac_ratio=1.5) == pytest.approx((2.0, 2.0))  # one round: a point
    # seeded: the same interval again; wider at a higher level
    rounds = ([5.0, 6.1, 5.4, 7.9, 5.2], [3.1, 3.0, 3.6, 4.0, 2.9])
    assert speed.efficiency_interval(*rounds, 1.9) == speed.efficiency_interval(*rounds, 1.9)
    narrow, wide = speed.efficiency_interval(*rounds, 1.9, level=0.5), speed.efficiency_interval(*rounds, 1.9)
    assert wide[0] <= narrow[0] < narrow[1] <= wide[1]


def test_interleaved_medians_take_turns_on_every_input_and_rotate_who_goes_first():
    calls = []
    durations = {'a': [1.0, 9.0, 2.0, 2.0, 3.0, 3.0], 'b': [4.0] * 6}  # seconds per call, in call order

    def run(name):
        def call(i):
            calls.append((name, i))
            return durations[name][sum(1 for n, _ in calls if n == name) - 1]
        return call

    med = interleaved_medians({'a': run('a'), 'b': run('b')}, count=2, warmup=1, repeats=2)
    # round 0 (warm-up): input 0 a then b, input 1 b then a; round 1 starts with b; round 2 with a again
    assert calls == [('a', 0), ('b', 0), ('b', 1), ('a', 1),
                     ('b', 0), ('a', 0), ('a', 1), ('b', 1),
                     ('a', 0), ('b', 0), ('b', 1), ('a', 1)]
    # per-input means of the timed rounds: a (2+2)/2 and (3+3)/2, median 2.5; b always 4
    assert med == {'a': pytest.approx(2.5), 'b': pytest.approx(4.0)}
    calls.clear()
    assert interleaved_times({'a': run('a'), 'b': run('b')}, count=2, warmup=1, repeats=2) == {
        'a': [2.0, 3.0], 'b': [4.0, 4.0]}


def test_interleaved_turns_run_every_input_in_a_row_after_an_untimed_call_and_rotate_turns():
    """interleave="turn": per round each run takes one turn, an untimed call on the round's last input and then every
    input in order; the turns' order changes from round to round as ``balanced_orders`` says."""
    calls = []
    durations = {'a': [7.0, 1.0, 3.0] * 3, 'b': [7.0, 4.0, 4.0] * 3}  # per call in call order, the untimed ones first

    def run(name):
        def call(i):
            calls.append((name, i))
            return durations[name][sum(1 for n, _ in calls if n == name) - 1]
        return call

    times = interleaved_times({'a': run('a'), 'b': run('b')}, count=2, warmup=1, repeats=2, interleave='turn')
    assert calls == [('a', 1), ('a', 0), ('a', 1), ('b', 1), ('b', 0), ('b', 1),  # round 0 (warm-up): a's turn first
                     ('b', 1), ('b', 0), ('b', 1), ('a', 1), ('a', 0), ('a', 1),  # round 1: b's
                     ('a', 1), ('a', 0), ('a', 1), ('b', 1), ('b', 0), ('b', 1)]
    # the untimed calls (7 s) count nowhere: a (1+3)/2 each round, b 4
    assert times == {'a': [2.0, 2.0], 'b': [4.0, 4.0]}
    calls.clear()
    orders = []
    runs = {name: (lambda name: lambda i: (orders.append(name) if i == 0 else None) or 1.0)(name) for name in 'abcd'}
    interleaved_times(runs, count=3, warmup=0, repeats=4, interleave='turn')
    assert [''.join(orders[k:k + 4]) for k in range(0, 16, 4)] == [''.join('abcd'[j] for j in order)
                                                                    for order in balanced_orders(4)]
    with pytest.raises(ValueError, match='interleave must be one of'):
        interleaved_times(runs, count=1, warmup=0, repeats=1, interleave='round')


@pytest.mark.parametrize('n', [2, 3, 4, 5])
def test_balanced_orders_put_every_run_everywhere_and_after_every_other_equally_often(n):
    orders = balanced_orders(n)
    assert len(orders) == (2 * n if n % 2 else n) and all(sorted(order) == list(range(n)) for order in orders)
    places = collections.Counter((run, place) for order in orders for place, run in enumerate(order))
    follows = collections.Counter(pair for order in orders for pair in zip(order, order[1:]))
    assert set(places.values()) == {len(orders) // n} and len(places) == n * n
    assert set(follows.values()) == {len(orders) // n} and len(follows) == n * (n - 1)


def test_interleaved_medians_vary_who_each_run_follows():
    """With the benchmark's four runs, each follows each of the others once per four inputs (a rotation of one order
    would have each always follow the same one)."""
    calls = []
    runs = {name: (lambda name: lambda i: calls.append(name) or 1.0)(name) for name in 'abcd'}
    interleaved_medians(runs, count=4, warmup=0, repeats=1)
    within_inputs = [pair for k, pair in enumerate(zip(calls, calls[1:])) if k % 4 != 3]
    assert collections.Counter(within_inputs) == collections.Counter({(a, b): 1 for a in 'abcd' for b in 'abcd'
                                                                      if a != b})


@pytest.mark.parametrize('megabytes', [20, 80])  # a batch-256 Fashion-MNIST and a batch-64 DeiT-S FFN activation
def test_pinned_allocator_reuses_freed_activations_without_page_faults(megabytes):
    resource = pytest.importorskip('resource')
    assert pin_allocator() == 'glibc pinned'
    floats = megabytes << 18
    for _ in range(2):  # allocated, touched, freed
        torch.ones(floats)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        torch.ones(floats)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before
    # Unpinned, each of the ten faults in all its pages again (10 x 256 a MB); over 32 MB, glibc maps every block
    # afresh unless mmap is off. Pinned, at most the heap's first growth after earlier tests' allocations is left
    # (seen: 0 alone, 5,120 after other tests at 20 MB).
    assert faults < 2 * 256 * megabytes + 500


def test_benchmark_cli_keep_all_costs_exactly_the_dense_model(tmp_path, capsys):
    out = tmp_path / 'speed.json'
    torch.set_num_threads(1)
    assert main(['benchmark', '--model', 'adavit_deit_tiny_patch16_224', '--policy', 'keep-all', '--batch-sizes', '1',
                 '--warmup', '0', '--repeats', '1', '--images-per-round', '1', '--threads', '1',
                 '--json', str(out)]) == 0
    result = json.loads(out.read_text())
    row = result['rows'][0]
    assert result['keep'] == [1.0, 1.0, 1.0]
    assert result['settings'] == {'warmup_rounds': 0, 'timed_rounds': 1, 'images_per_round': 1, 'interleave': 'turn',
                                  'accelerator_warmup_calls': 5}
    assert row['interleave'] == 'turn'
    assert row['mac_ratio'] == 1.0 and row['adaptive_gmacs'] == row['dense_gmacs']
    assert row['dense_gmacs'] == pytest.approx(1.2537, abs=1e-4)
    printed = capsys.readouterr().out
    assert 'efficiency' in printed and 'the models take turns by turn' in printed
    # every figure names the processor it was measured on
    assert result['machine']['cpu'] == cpu_name() and f'# machine: {cpu_name()}, ' in printed
    machine = result['machine']
    assert machine['threads'] == 1 and machine['device'] == 'cpu' and machine['cuda'] is None
    assert machine['cores'] == os.cpu_count() and machine['timm'] == timm.__version__


def test_cpu_name_reads_the_model_name_and_falls_back_to_platform(tmp_path):
    cpuinfo = tmp_path / 'cpuinfo'
    cpuinfo.write_text('processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n'
                       'cache size\t: 512 KB\n\nprocessor\t: 1\nmodel name\t: AMD EPYC 7B13 64-Core Processor\n')
    assert cpu_name(str(cpuinfo)) == 'AMD EPYC 7B13 64-Core Processor'
    cpuinfo.write_text('processor\t: 0\nBogoMIPS\t: 50.00\n')  # no model name (some ARM kernels)
    assert cpu_name(str(cpuinfo)) == (platform.processor() or platform.machine())
    assert cpu_name(str(tmp_path / 'missing')) == (platform.processor() or platform.machine())


def test_benchmark_cli_gates_policy_times_per_image_decisions_of_the_decision_networks(tmp_path, capsys, monkeypatch):
    """--policy gates: the decision networks at their initial weights, thresholds set to --keep on noise images; each
    image gets its own decisions, and the run is the same in every process (seeded weights)."""
    monkeypatch.setattr(benchmark_cli, 'GATE_CALIBRATION_IMAGES', 6)
    out = tmp_path / 'speed.json'
    args = ['benchmark', '--model', 'adavit_deit_tiny_patch16_224', '--policy', 'gates', '--keep', '0.6,0.7,0.9',
            '--batch-sizes', '4', '--warmup', '0', '--repeats', '1', '--images-per-round', '4', '--threads', '1',
            '--json', str(out)]
    assert main(args) == 0
    result = json.loads(out.read_text())
    printed = capsys.readouterr().out
    assert result['decisions'] == 'gates' and result['keep'] == [0.6, 0.7, 0.9] and '# gates: thresholds set' in printed
    row = result['rows'][0]
    assert 1.3 < row['mac_ratio'] < 3.0  # about the cost the keep-rates give
    model = build_model(argparse.Namespace(checkpoint=None, model='adavit_deit_tiny_patch16_224', policy='gates',
                                           keep=[0.6, 0.7, 0.9]))
    assert {k: getattr(model, f'{k}_threshold') for k in ('patch', 'head', 'block')} == result['thresholds']
    with torch.inference_mode():
        _, decisions = model(torch.randn(8, 3, 224, 224, generator=torch.Generator().manual_seed(2)),
                             return_decisions=True)
    rates = eval_keep_rates(decisions)
    assert rates['patch'] == pytest.approx(0.6, abs=0.05) and rates['head'] == pytest.approx(0.7, abs=0.1)
    per_image = decision_macs(model, decisions)
    assert per_image.std() > 0.01 * per_image.mean()  # decisions differ from image to image


def test_benchmark_cli_rejects_unknown_model(capsys):
    assert main(['benchmark', '--model', 'vit_nonexistent', '--json', '']) == 2
    err = capsys.readouterr().err.strip()
    assert '\n' not in err and 'unknown model' in err


def test_benchmark_cli_times_a_checkpoint_on_its_own_validation_images(tmp_path, capsys):
    """Learned gates decide from content: a checkpoint is timed (and costed) on real test images, not noise."""
    checkpoint = os.path.join(os.path.dirname(__file__), '..', 'checkpoints', 'fashion_mnist_adavit.pt')
    out = tmp_path / 'speed.json'
    assert main(['benchmark', '--checkpoint', checkpoint, '--batch-sizes', '4', '--warmup', '0', '--repeats', '1',
                 '--images-per-round', '4', '--threads', '1', '--json', str(out)]) == 0
    result = json.loads(out.read_text())
    assert result['inputs'] == 'validation images' and '4 validation images' in capsys.readouterr().out
    model = load_model(checkpoint)
    images = validation_images(model, argparse.Namespace(data=None, data_dir=None, checkpoint=checkpoint), 4)
    assert images.shape == (4, 1, 28, 28)
    with torch.no_grad():
        _, decisions = model(images, return_decisions=True)
    expected = decision_macs(model, decisions).mean().item() / 1e9
    assert result['rows'][0]['adaptive_gmacs'] == pytest.approx(expected, rel=1e-6)


def test_ffn_chunks_benchmark_times_each_setting_and_restores_the_default(tmp_path):
    """benchmarks/ffn_chunks.py: one row per chunk setting, the efficiency against the dense twin, and the executor's
    own FFN_CHUNK_BYTES and executor back as they were."""
    from adavit.execution import sparse
    script = load_benchmark_script('ffn_chunks')
    default = dict(sparse.FFN_CHUNK_BYTES)
    out = tmp_path / 'chunks.json'
    result = script.main(['--model', 'adavit_deit_tiny_patch16_224', '--batch-size', '2', '--inputs', '2',
                          '--repeats', '1', '--warmup', '0', '--chunk-mib', '0,0.25', '--with-masked',
                          '--json', str(out)])
    assert sparse.FFN_CHUNK_BYTES == default
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r['setting'] for r in result['rows']] == ['one pass', '0.25 MiB']
    assert result['rows'][0]['speed_vs_one_pass'] == 1.0
    assert 1.5 < result['mac_ratio'] < 2.5  # keep 0.7/0.7/0.9 costs about half
    for r in result['rows']:
        assert r['efficiency'] == pytest.approx(result['dense_ms'] / r['ms'] / result['mac_ratio'])
        assert r['images_per_s'] == pytest.approx(2 / (r['ms'] / 1e3))


def test_padded_attention_benchmark_times_each_backend_with_same_and_new_decisions(tmp_path):
    """benchmarks/padded_attention.py: a row per (backend, decisions) on the accelerator plan, new decisions from seeds
    never used before, and the executor's backends and device plans back as they were."""
    from adavit.execution import sparse, sparse_accelerator
    script = load_benchmark_script('padded_attention')
    backends, grouped = sparse_accelerator.PADDED_ATTENTION_BACKENDS, sparse.HEAD_GROUPED_DEVICES
    packed = sparse_accelerator._runs_packed_attention
    first_fresh_seed = next(script._Contender._fresh_seeds)
    out = tmp_path / 'attention.json'
    result = script.main(['--model', 'adavit_deit_tiny_patch16_224', '--device', 'cpu', '--dtype', 'fp32',
                          '--batch-size', '2', '--inputs', '2', '--repeats', '1', '--warmup', '0',
                          '--backends', 'packed,math', '--json', str(out)])
    assert sparse_accelerator.PADDED_ATTENTION_BACKENDS is backends and sparse.HEAD_GROUPED_DEVICES is grouped
    assert sparse_accelerator._runs_packed_attention is packed
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r['backend'], r['decisions']) for r in result['rows']] == [
        ('packed', 'same per input'), ('packed', 'new every call'),
        ('math', 'same per input'), ('math', 'new every call')]
    assert all(r['ms'] > 0 and r['speedup'] > 0 for r in result['rows'])
    # Two contenders with new decisions, one round of two inputs: four seeds drawn, none of them seen before.
    assert next(script._Contender._fresh_seeds) == first_fresh_seed + 5


def test_accelerators_warm_up_for_a_few_calls_whatever_the_rounds():
    cpu, cuda = torch.device('cpu'), torch.device('cuda')
    assert warmup_rounds(2, 1, cpu) == 2 and warmup_rounds(0, 1, cpu) == 0
    assert warmup_rounds(2, 1, cuda) == ACCELERATOR_WARMUP_CALLS == 5
    assert warmup_rounds(2, 2, cuda) == 3 and warmup_rounds(2, 32, cuda) == 2 and warmup_rounds(7, 1, cuda) == 7


def test_op_host_cost_benchmark_times_each_op_at_seen_new_and_rounded_row_counts(tmp_path):
    """benchmarks/op_host_cost.py: a row per (op, row count kind), positive microseconds, the JSON as printed."""
    script = load_benchmark_script('op_host_cost')
    out = tmp_path / 'ops.json'
    result = script.main(['--device', 'cpu', '--dtype', 'fp32', '--rows', '64', '--calls', '3', '--json', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    pairs = [(r['op'], r['rows']) for r in result['results']]
    assert pairs[:3] == [('F.linear', 'seen'), ('F.linear', 'new'), ('F.linear', 'rounded to 1024')]
    assert ('torch.addmm', 'new') in pairs and pairs[-3:] == [('index_select', 'new'), ('index_copy_', 'new'),
                                                             ('add_', 'new')]
    assert len(pairs) == 5 * 3 + 3 and all(r['host_us'] > 0 for r in result['results'])


def test_gemm_rows_benchmark_times_each_layer_at_each_row_count(tmp_path):
    """benchmarks/gemm_rows.py: a block's linears restricted to the kept heads, GMAC/s per row count, consistent with
    the times it reports."""
    script = load_benchmark_script('gemm_rows')
    # DeiT-S with 4 of 6 heads kept: qkv's outputs, proj's and fc1's inputs shrink, fc2 does not
    assert script.layer_shapes(384, 6, 4.0, 4) == {'qkv': (384, 768), 'proj': (256, 384), 'fc1': (256, 1536),
                                                   'fc2': (1536, 384)}
    out = tmp_path / 'gemm_rows.json'
    result = script.main(['--rows', '4,16', '--heads', '2', '--embed-dim', '24', '--num-heads', '6', '--threads', '1',
                          '--warmup', '0', '--repeats', '1', '--macs-per-call', '1e4', '--json', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r['layer'], r['in_features'], r['out_features']) for r in result['layers']] == [
        ('qkv', 24, 24), ('proj', 8, 24), ('fc1', 8, 96), ('fc2', 96, 24)]
    for r in result['layers']:
        for m in (4, 16):
            macs = m * r['in_features'] * r['out_features']
            assert r['gmacs_per_s'][str(m)] == pytest.approx(macs / (r['ms'][str(m)] / 1e3) / 1e9)
        assert r['vs_most_rows']['16'] == 1.0
    with pytest.raises(SystemExit, match='--heads must lie in 1..6'):
        script.main(['--heads', '7', '--json', str(out)])


def test_decision_cost_benchmark_times_the_networks_against_their_own_decisions_given(tmp_path):
    """benchmarks/decision_cost.py: per batch size, the model deciding for itself and the same model handed its own
    decisions; the MACs of the second leave out exactly the decision networks'."""
    script = load_benchmark_script('decision_cost')
    out = tmp_path / 'decisions.json'
    result = script.main(['--model', 'adavit_deit_tiny_patch16_224', '--batch-sizes', '1,2', '--images-per-round', '2',
                          '--warmup', '0', '--repeats', '2', '--json', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [(r['batch_size'], r['inputs']) for r in result['rows']] == [(1, 2), (2, 1)]
    model = timm.create_model('adavit_deit_tiny_patch16_224', policy='learned')
    dense_total = dense_macs(model)
    D, H, patches = model.embed_dim, model.blocks[0].attn.num_heads, model.patch_embed.num_patches
    network_macs = sum(D * patches * (blk.patch_gate is not None) + (D * H + 2 * D) * (blk.head_gate is not None)
                       for blk in model.blocks)
    assert network_macs > 0
    for r in result['rows']:
        assert r['decision_ms'] == pytest.approx(r['deciding_ms'] - r['given_ms'])
        assert r['decision_share'] == pytest.approx(r['decision_ms'] / r['deciding_ms'])
        assert len(r['decision_ms_by_round']) == 2
        assert dense_total / r['mac_ratio_deciding'] - dense_total / r['mac_ratio_given'] == \
            pytest.approx(network_macs, rel=1e-6)
        assert 1.5 < r['mac_ratio_deciding'] < 2.5  # the gates set to keep 0.7/0.7/0.9 cost about half
        for kind in ('deciding', 'given'):
            assert r[f'efficiency_{kind}'] == pytest.approx(r['dense_ms'] / r[f'{kind}_ms'] / r[f'mac_ratio_{kind}'])
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match='torch sees no CUDA device'):
            script.main(['--device', 'cuda', '--json', str(out)])


def test_interleave_benchmark_runs_the_whole_benchmark_each_way_alternately(tmp_path):
    """benchmarks/interleave.py: the benchmark's row per run, designs alternating, and each design's median efficiency
    over its own runs."""
    script = load_benchmark_script('interleave')
    out = tmp_path / 'interleave.json'
    result = script.main(['--model', 'adavit_deit_tiny_patch16_224', '--batch-size', '1', '--threads', '1',
                          '--images-per-round', '2', '--warmup', '0', '--rounds', '1', '--repeats', '2',
                          '--json', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert [r['interleave'] for r in result['runs']] == ['turn', 'input', 'turn', 'input']
    assert len({r['mac_ratio'] for r in result['runs']}) == 1  # the same decisions every run
    for design in ('turn', 'input'):
        effs = sorted(r['efficiency'] for r in result['runs'] if r['interleave'] == design)
        assert result['median_efficiency'][design] == pytest.approx((effs[0] + effs[1]) / 2)


def test_time_breakdown_counts_the_multiply_adds_flop_counter_sees_in_each_part():
    """benchmarks/time_breakdown.py: its parts add up to FlopCounterMode's matmul and attention counts, on the sparse
    executor (batch path and latency path) and on dense timm, whose linears it counts exactly."""
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode
    script = load_benchmark_script('time_breakdown')
    model = AdaViT(img_size=32, patch_size=4, embed_dim=48, depth=3, num_heads=4, num_classes=5,
                   policy='random', random_keep=(0.6, 0.6, 0.8)).eval()
    dense = model.dense_twin().eval()
    aten = torch.ops.aten
    for batch_size in (1, 3):
        x = torch.randn(batch_size, 3, 32, 32)
        with torch.inference_mode():
            model.reset_random_policy(0)
            model(x)  # makes the executor's weight copies, which weight_parts maps
            weights = script.weight_parts(model, dense)
            for net in (model, dense):
                timer, counter = script.PartTimer(weights), FlopCounterMode(display=False)
                for mode in (timer, counter):  # FlopCounterMode counts no CPU flash attention: both by matmuls
                    model.reset_random_policy(0)
                    with mode, sdpa_kernel(SDPBackend.MATH):
                        net(x)
                flops = counter.get_flop_counts()['Global']
                matmuls = sum(timer.macs[p] for p in ('qkv', 'proj', 'fc1', 'fc2', 'other matmuls'))
                assert matmuls == (flops.get(aten.mm, 0) + flops.get(aten.addmm, 0)) // 2
                attention = sum(v for k, v in flops.items() if k not in (aten.mm, aten.addmm, aten.convolution))
                assert timer.macs['attention'] == attention // 2
                assert timer.seconds['attention'] > 0 and timer.calls['norms'] > 0
                assert set(timer.seconds) <= set(script.PARTS)
        t, D = model.patch_embed.num_patches + 1, model.embed_dim
        for part, width in (('qkv', 3 * D), ('proj', D), ('fc1', 4 * D), ('fc2', D)):
            expected = batch_size * 3 * t * (4 * D if part == 'fc2' else D) * width
            assert timer.macs[part] == expected, part  # the last timer ran dense timm
        assert timer.macs['other matmuls'] == batch_size * D * 5  # the classifier head
        assert timer.calls['gathers'] == 0
    q, k, v = torch.randn(2, 3, 10, 8), torch.randn(2, 3, 12, 8), torch.randn(2, 3, 12, 8)
    timer = script.PartTimer({})
    with timer:
        torch.nn.functional.scaled_dot_product_attention(q, k, v)  # the CPU flash kernel
    assert timer.macs == {'attention': 2 * 2 * 3 * 10 * 12 * 8}


def test_time_breakdown_benchmark_splits_the_gap_into_parts(tmp_path):
    """benchmarks/time_breakdown.py: per part, each model's time per forward; the parts add up to the wall time, and
    the excess is what a part takes beyond its MAC-ratio share of the dense time."""
    script = load_benchmark_script('time_breakdown')
    out = tmp_path / 'breakdown.json'
    result = script.main(['--model', 'adavit_deit_tiny_patch16_224', '--batch-size', '2', '--images-per-round', '2',
                          '--warmup', '0', '--repeats', '1', '--threads', '1', '--json', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r['part']: r for r in result['rows']}
    assert list(rows) == list(script.PARTS)
    for model in ('dense', 'sparse'):  # the parts add up to the mean wall time
        assert sum(r[f'{model}_ms'] for r in rows.values()) == pytest.approx(result[f'{model}_ms_mean'])
    assert sum(r['excess_ms'] for r in rows.values()) == \
        pytest.approx(result['sparse_ms_mean'] - result['dense_ms_mean'] / result['mac_ratio'])
    for r in rows.values():
        if r['dense_gmacs']:
            at_dense_rate = r['dense_ms'] * r['sparse_gmacs'] / r['dense_gmacs']
            assert r['rate_loss_ms'] == pytest.approx(r['sparse_ms'] - at_dense_rate)
        else:
            assert r['rate_loss_ms'] is None
    assert rows['patch embedding']['dense_calls'] == rows['patch embedding']['sparse_calls'] == 1
    assert result['efficiency'] == pytest.approx(result['dense_ms'] / result['sparse_ms'] / result['mac_ratio'])
    assert 1.5 < result['mac_ratio'] < 2.5  # keep 0.7/0.7/0.9 costs about half
    assert rows['gathers']['dense_calls'] == 0 < rows['gathers']['sparse_calls']
    for part in ('qkv', 'proj', 'fc1', 'fc2'):
        assert 0 < rows[part]['sparse_gmacs'] < rows[part]['dense_gmacs']
        assert rows[part]['dense_gmac_per_s'] == pytest.approx(rows[part]['dense_gmacs'] / rows[part]['dense_ms'] * 1e3)


def test_device_agreement_compares_both_executors_case_by_case(tmp_path, monkeypatch):
    """benchmarks/device_agreement.py, here on the CPU: every head mode, patch policy, batch size and edge case, the
    decision networks' own decisions and DeiT-S, each with the same decisions in both executors and fp32 logits within
    the tests' tolerance; a case over the tolerance fails the run; bf16 is reported, not judged."""
    script = load_benchmark_script('device_agreement')
    out = tmp_path / 'agreement.json'
    result = script.main(['--batch-sizes', '1,5', '--deit-batch', '2', '--json', str(out)])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = result['rows']
    cases = {(r['case'], r['decisions'], r['batch_size']) for r in rows}
    assert len(rows) == len(cases) == 4 * 2 * (len(script.EDGES) + 1) + 1
    assert {r['decisions'] for r in rows} == {'random', 'mixed', 'all_skipped', 'no_patch', 'no_head', 'gates',
                                              'random 0.7/0.7/0.9'}
    assert result['failed'] == 0 and result['tolerance'] == script.FP32_TOLERANCE == 1e-4
    assert all(r['same_decisions'] and r['top1_agree'] == 1.0 and r['max_abs'] <= 1e-4 for r in rows)
    # with every sub-block skipped both executors run only the embedding, the final norm and the head: bit for bit
    assert all(r['max_abs'] == 0.0 for r in rows if r['decisions'] == 'all_skipped')
    assert any(r['max_abs'] > 0.0 for r in rows) and all(r['relative'] >= 0.0 for r in rows)

    monkeypatch.setattr(script, 'FP32_TOLERANCE', 0.0)  # any difference at all now fails its case
    strict = script.main(['--batch-sizes', '5', '--deit-batch', '0', '--json', str(out)])
    assert strict['failed'] == sum(r['max_abs'] > 0.0 for r in strict['rows']) > 0

    bf16 = script.main(['--batch-sizes', '5', '--deit-batch', '0', '--dtype', 'bf16', '--json', str(out)])
    assert bf16['failed'] == 0 and bf16['tolerance'] is None and len(bf16['rows']) == 4 * (len(script.EDGES) + 1)
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit, match='torch sees no CUDA device'):
            script.main(['--device', 'cuda', '--json', str(out)])


def test_missing_device_names_cuda_asked_for_without_one(monkeypatch, capsys):
    """One check, one message, for `adavit benchmark` and the scripts: CUDA without a CUDA device, and nothing else."""
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: False)
    expected = '--device cuda asked for, but torch sees no CUDA device: run on a GPU machine, or with --device cpu'
    assert missing_device('cuda') == missing_device('cuda:1') == expected
    assert missing_device('cpu') is None
    assert main(['benchmark', '--device', 'cuda']) == 2
    assert capsys.readouterr().err.strip().endswith(expected)
    for name in ('op_host_cost', 'padded_attention'):  # GPU scripts whose --device defaults to cuda
        with pytest.raises(SystemExit, match=re.escape(expected)):
            load_benchmark_script(name).main([])
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    assert missing_device('cuda') is None


def test_dense_attention_path_picks_the_faster_path_in_rounds_of_its_own(monkeypatch):
    """The baseline's path is chosen by a race of the two paths alone, whose times are then not the baseline's: the
    smaller of two medians from the same rounds would quote the noise that made it the smaller."""
    model = AdaViT(img_size=32, patch_size=4, embed_dim=48, depth=2, num_heads=4, num_classes=5)
    dense = model.dense_twin().eval()
    seen = []

    def interleaved_times(runs, count, warmup, repeats, interleave):
        seen.append((sorted(runs), count, warmup, repeats, interleave))
        for name, run in runs.items():  # each view sets every block's path before calling timm
            run(0)
            assert all(b.attn.fused_attn == (name == 'fused') for b in dense.blocks)
        return {'fused': [0.004, 0.002, 0.003], 'matmul': [0.001, 0.009, 0.002]}

    monkeypatch.setattr(speed, 'interleaved_times', interleaved_times)
    inputs = [torch.randn(1, 3, 32, 32) for _ in range(3)]
    with torch.inference_mode():
        path, ms = speed.dense_attention_path(dense, inputs, torch.device('cpu'), warmup=1, repeats=7,
                                              interleave='input')
    assert path == 'matmul' and ms == pytest.approx({'fused': 3.0, 'matmul': 2.0})  # medians, in milliseconds
    assert seen == [(['fused', 'matmul'], 3, 1, 3, 'input')]  # half the timed rounds, after the warm-up
    with torch.inference_mode():
        assert speed.dense_attention_path(dense, inputs, torch.device('cpu'), 0, 1)[0] == 'matmul'
    assert seen[-1][3] == 1  # one round at least


def _benchmark_json(path, dense, sparse, mac_ratio=1.0, decisions='gates', batch_size=1):
    """A file as ``adavit benchmark --json`` writes it, with only what ``pool_runs`` reads."""
    row = {'batch_size': batch_size, 'threads': 2, 'device': 'cpu', 'dtype': 'fp32', 'mac_ratio': mac_ratio,
           'efficiency': 0.0, 'efficiency_ci_low': 0.0, 'efficiency_ci_high': 0.0,
           'dense_rounds_ms': dense, 'sparse_rounds_ms': sparse}
    result = {'model': 'm', 'decisions': decisions, 'keep': [0.7, 0.7, 0.9], 'inputs': 'gaussian noise',
              'machine': {'cpu': 'x'}, 'rows': [row]}
    path.write_text(json.dumps(result))
    return str(path)


def test_pool_runs_pools_rounds_and_resamples_runs_then_rounds(tmp_path, capsys):
    script = load_benchmark_script('pool_runs')
    # Two runs at efficiency 1 and 2: the pooled medians give 1.5; a resample draws both runs (1/2), the first twice
    # (1/4, efficiency 1) or the second twice (1/4, efficiency 2), so the interval spans 1 to 2. Rounds alone, taken
    # as independent, would give a narrower one.
    assert script.pooled_efficiency([([1, 1, 1], [1, 1, 1]), ([2, 2, 2], [1, 1, 1])], 1.0) == \
        pytest.approx((1.5, 1.0, 2.0))
    # runs that agree leave no doubt, whatever their speed
    assert script.pooled_efficiency([([2, 2], [1, 1]), ([4, 4], [2, 2])], 2.0) == pytest.approx((1.0, 1.0, 1.0))
    paths = [_benchmark_json(tmp_path / f'run{i}.json', [10.0 * (i + 1)] * 3, [5.0, 5.0, 5.0], mac_ratio=2.0)
             for i in range(2)]
    result = script.main(paths + ['--batch-size', '1', '--json', str(tmp_path / 'pooled.json')])
    assert result['rounds'] == 6 and result['efficiency'] == pytest.approx(1.5)  # median 15 / 5 / 2
    assert (result['efficiency_ci_low'], result['efficiency_ci_high']) == pytest.approx((1.0, 2.0))
    assert json.loads((tmp_path / 'pooled.json').read_text())['efficiency'] == pytest.approx(1.5)
    assert 'pooled, 2 runs' in capsys.readouterr().out


def test_pool_runs_refuses_runs_it_cannot_pool_in_one_line(tmp_path):
    script = load_benchmark_script('pool_runs')
    gates = _benchmark_json(tmp_path / 'gates.json', [2.0], [1.0])
    for path, says in ((_benchmark_json(tmp_path / 'random.json', [2.0], [1.0], decisions='random'), 'in decisions'),
                       (_benchmark_json(tmp_path / 'old.json', [], []), 'keeps no timed rounds'),
                       (_benchmark_json(tmp_path / 'b64.json', [2.0], [1.0], batch_size=64), 'no row at batch size 1'),
                       (str(tmp_path / 'missing.json'), 'cannot read')):
        with pytest.raises(SystemExit, match=says) as error:
            script.load_runs([gates, path], batch_size=1)
        assert '\n' not in str(error.value)
