"""Pool the timed rounds of several ``adavit benchmark`` runs into one efficiency, with a 95% interval.

On a shared host one run's own interval is wide (0.06-0.54 on the Intel host in its fifteenth session), and whole runs
an hour apart differ by more than a threshold such as 0.85 lies from their figures. This pools every timed round of
runs of one setting (model, decisions, keep-rates, inputs, batch size, threads, device, dtype, processor, and so the
MAC ratio): the pooled efficiency is the median dense time over the median sparse time over the MAC ratio, as
``adavit benchmark`` computes it for one run, and its interval comes from a two-level bootstrap: the runs resampled,
then each drawn run's rounds, since the rounds of one run share the host's state of that hour (a bootstrap of the
rounds alone would take them as independent, and give too narrow an interval). Runs written before the benchmark kept
its rounds (``dense_rounds_ms``, fifteenth Intel session) are refused. Writes JSON.

    python benchmarks/pool_runs.py docs/measured/intel_xeon_s15_gates_b1_run*.json --batch-size 1
"""
import argparse
import json
import os
import sys
from typing import Any, Dict, List, Sequence, Tuple

import numpy as np

from adavit.files import write_json

# What must agree between pooled runs: the run's settings, then its row's.
SETTING_KEYS = ('model', 'decisions', 'keep', 'inputs')
ROW_KEYS = ('threads', 'device', 'dtype')


def load_runs(paths: Sequence[str], batch_size: int) -> List[Dict[str, Any]]:
    """Each file's row at ``batch_size``, with the file's setting; a one-line ``SystemExit`` where a file is missing,
    lacks that batch size or the rounds, or was run in another setting than the first."""
    runs = []
    for path in paths:
        try:
            with open(path) as f:
                result = json.load(f)
        except (OSError, ValueError) as error:
            raise SystemExit(f'pool_runs: cannot read {path} ({error}): give JSON files that adavit benchmark wrote')
        rows = [r for r in result.get('rows', []) if r.get('batch_size') == batch_size]
        if not rows:
            raise SystemExit(f'pool_runs: {path} has no row at batch size {batch_size}: pick one of its --batch-sizes')
        row = rows[0]
        if not row.get('dense_rounds_ms'):
            raise SystemExit(f'pool_runs: {path} keeps no timed rounds (written before dense_rounds_ms existed): '
                             f'rerun adavit benchmark')
        setting = {key: result.get(key) for key in SETTING_KEYS}
        setting.update({key: row[key] for key in ROW_KEYS}, cpu=result.get('machine', {}).get('cpu'),
                       mac_ratio=round(row['mac_ratio'], 6))
        if runs and setting != runs[0]['setting']:
            differ = sorted(k for k in setting if setting[k] != runs[0]['setting'][k])
            raise SystemExit(f'pool_runs: {path} differs from {runs[0]["path"]} in {", ".join(differ)}: pool runs of '
                             f'one setting only')
        runs.append({'path': path, 'setting': setting, 'row': row})
    return runs


def pooled_efficiency(
        rounds: Sequence[Tuple[Sequence[float], Sequence[float]]],
        mac_ratio: float,
        level: float = 0.95,
        resamples: int = 4000,
        seed: int = 0,
) -> Tuple[float, float, float]:
    """The efficiency of every run's rounds together, and a two-level bootstrap interval of it.

    Args:
        rounds: Per run, its rounds' dense and sparse times (paired, round by round).
        mac_ratio: Dense MACs over adaptive MACs, the same for every run.
        level: Coverage of the interval.
        resamples: Bootstrap resamples: runs drawn with replacement, then each drawn run's rounds.
        seed: Seed of the resampling.

    Returns:
        (efficiency, low, high).
    """
    runs = [(np.asarray(d, dtype=np.float64), np.asarray(s, dtype=np.float64)) for d, s in rounds]
    dense, sparse = np.concatenate([d for d, _ in runs]), np.concatenate([s for _, s in runs])
    efficiency = float(np.median(dense) / np.median(sparse) / mac_ratio)
    rng = np.random.default_rng(seed)
    samples = np.empty(resamples)
    for i in range(resamples):
        drawn = [runs[j] for j in rng.integers(0, len(runs), size=len(runs))]
        picks = [rng.integers(0, len(d), size=len(d)) for d, _ in drawn]
        samples[i] = np.median(np.concatenate([d[p] for (d, _), p in zip(drawn, picks)])) / \
            np.median(np.concatenate([s[p] for (_, s), p in zip(drawn, picks)])) / mac_ratio
    low, high = np.quantile(samples, [(1 - level) / 2, (1 + level) / 2])
    return efficiency, float(low), float(high)


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('runs', nargs='+', help='JSON files written by adavit benchmark (--json)')
    parser.add_argument('--batch-size', type=int, required=True)
    parser.add_argument('--json', default=os.path.join(os.path.dirname(__file__), 'results', 'pool_runs.json'))
    return parser.parse_args(argv)


def main(argv: List[str]) -> Dict[str, object]:
    args = parse_args(argv)
    runs = load_runs(args.runs, args.batch_size)
    mac_ratio = runs[0]['row']['mac_ratio']
    efficiency, low, high = pooled_efficiency(
        [(r['row']['dense_rounds_ms'], r['row']['sparse_rounds_ms']) for r in runs], mac_ratio)
    print(f'# {runs[0]["setting"]}')
    print(f'{"run":<60} {"rounds":>6} {"efficiency":>10} {"95% CI":>10}')
    for r in runs:
        row = r['row']
        interval = f'{row["efficiency_ci_low"]:.2f}-{row["efficiency_ci_high"]:.2f}'
        print(f'{r["path"]:<60} {len(row["dense_rounds_ms"]):>6} {row["efficiency"]:>10.3f} {interval:>10}')
    total = sum(len(r['row']['dense_rounds_ms']) for r in runs)
    print(f'{f"pooled, {len(runs)} runs":<60} {total:>6} {efficiency:>10.3f} {f"{low:.2f}-{high:.2f}":>10}')
    result = {'benchmark': 'pool_runs', 'batch_size': args.batch_size, 'setting': runs[0]['setting'],
              'runs': [{'path': r['path'], 'rounds': len(r['row']['dense_rounds_ms']),
                        'efficiency': r['row']['efficiency']} for r in runs],
              'rounds': total, 'efficiency': efficiency, 'efficiency_ci_low': low, 'efficiency_ci_high': high}
    write_json(args.json, result)
    print(f'wrote {args.json}')
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
