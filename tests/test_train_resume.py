"""A run stopped after k optimizer steps and resumed ends with the same weights, bit for bit, as one that never stopped.

The stop falls inside an epoch, so the resume must skip the consumed batches, restore every RNG stream (Gumbel
noise, mixup) and the optimizer, schedule and EMA states exactly.
"""
import torch

from _train_helpers import fmnist_dir, run_cli, tiny_backbone, weight_hashes, write_config  # noqa: F401  (fixtures)
from adavit.training.checkpoint import read_checkpoint


def test_stop_and_resume_is_bit_exact(tmp_path, fmnist_dir, tiny_backbone):  # noqa: F811
    # 128 images in batches of 32: 4 steps per epoch; the interrupted run stops at step 3, inside the first epoch.
    config = write_config(str(tmp_path / 'ada.yaml'), fmnist_dir, init=f'{tiny_backbone}/best.pt',
                          data={'subset': 128, 'val_subset': 50},
                          train={'epochs': 2, 'deterministic': True, 'mixup': 0.5, 'ema': True, 'ema_decay': 0.9},
                          loss={'distill_weight': 0.5})
    straight = run_cli(['train', '--config', config, '--output', str(tmp_path / 'straight')],
                       ADAVIT_DEBUG_WEIGHTS_HASH='1')
    assert straight.returncode == 0, straight.stderr
    first = run_cli(['train', '--config', config, '--output', str(tmp_path / 'split'), '--max-steps', '3'],
                    ADAVIT_DEBUG_WEIGHTS_HASH='1')
    assert first.returncode == 0, first.stderr
    stopped = read_checkpoint(str(tmp_path / 'split' / 'last.pt'))
    assert (stopped['step'], stopped['epoch'], stopped['batch_in_epoch']) == (3, 0, 3)
    second = run_cli(['train', '--resume', str(tmp_path / 'split')], ADAVIT_DEBUG_WEIGHTS_HASH='1')
    assert second.returncode == 0, second.stderr

    hashes = weight_hashes(straight.stdout)[0], weight_hashes(second.stdout)[0]
    assert hashes[0] == hashes[1]
    a = read_checkpoint(str(tmp_path / 'straight' / 'last.pt'))
    b = read_checkpoint(str(tmp_path / 'split' / 'last.pt'))
    assert a['step'] == b['step'] == 8
    for key in ('model', 'model_ema'):
        for name, tensor in a[key].items():
            assert torch.equal(tensor, b[key][name]), f'{key}.{name}'
    for index, state in a['optimizer']['state'].items():
        assert torch.equal(state['exp_avg'], b['optimizer']['state'][index]['exp_avg'])
    assert a['history'][-1]['val_top1'] == b['history'][-1]['val_top1']
