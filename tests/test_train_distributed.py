"""Two-process DDP training with torchrun (gloo, CPU): both ranks end with the same weights, the loss falls, and a run
stopped mid-epoch and resumed on two processes ends where the uninterrupted one does (per-rank RNG states restored)."""
import json
import os
import sys

from _train_helpers import fmnist_dir, run_group, weight_hashes, write_config  # noqa: F401  (fixture)


def torchrun(*args: str):
    # --standalone: a local rendezvous on a free port, so parallel test runs do not collide.
    cmd = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node', '2',
           '-m', 'adavit', 'train', *args]
    result = run_group(cmd, timeout=240, ADAVIT_DEBUG_WEIGHTS_HASH='1')
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    hashes = weight_hashes(result.stdout)
    assert sorted(hashes) == [0, 1], result.stdout
    return hashes


def test_torchrun_two_processes_agree_learn_and_resume(tmp_path, fmnist_dir):  # noqa: F811
    config = write_config(str(tmp_path / 'ddp.yaml'), fmnist_dir, loss={'budgets': [0.7, 0.7, 0.9]},
                          train={'epochs': 3, 'lr': 3e-3, 'deterministic': True, 'mixup': 0.5})
    output = tmp_path / 'run'
    hashes = torchrun('--config', config, '--output', str(output))
    assert hashes[0] == hashes[1]

    metrics = json.loads((output / 'metrics.json').read_text())
    steps_per_epoch = 256 // 2 // 32
    assert metrics['world_size'] == 2 and metrics['step'] == 3 * steps_per_epoch
    history = metrics['history']
    assert history[-1]['task'] < history[0]['task']
    assert history[-1]['train_loss'] < history[0]['train_loss']
    # Rank 0 alone writes: one log, one config, the checkpoints.
    assert sorted(p for p in os.listdir(output) if p != 'tb') == \
        ['best.pt', 'config.yaml', 'last.pt', 'log.csv', 'metrics.json']

    split = str(tmp_path / 'split')
    torchrun('--config', config, '--output', split, '--max-steps', str(steps_per_epoch + 2))
    resumed = torchrun('--resume', split)
    assert resumed == hashes
