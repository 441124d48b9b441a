"""A checkpoint is never half-written: killing the process in the middle of a save leaves the previous last.pt whole."""
import os
import signal
import subprocess
import sys
import time

import torch

from _train_helpers import REPO, env, fmnist_dir, write_config  # noqa: F401  (fixture)
from adavit.training.checkpoint import load_model, read_checkpoint, save_atomic

# Runs `adavit train` with the checkpoint writer patched: the second write puts half a file on disk, signals the
# test, and hangs there until it is killed.
HANGING_WRITER = r'''
import os, sys, time
import adavit.training.checkpoint as ck
real_serialise, calls = ck._serialise, []
def hanging_serialise(obj, f):
    calls.append(f.name)
    if len(calls) == 2:
        f.write(b'PK\x03\x04' + b'\0' * 4096)  # the start of a zip, like a torch.save cut short
        f.flush()
        open(os.environ['HANG_MARKER'], 'w').close()
        time.sleep(600)
    real_serialise(obj, f)
ck._serialise = hanging_serialise
from adavit.cli.main import main
sys.exit(main(sys.argv[1:]))
'''


def test_kill_during_save_keeps_previous_checkpoint(tmp_path, fmnist_dir):  # noqa: F811
    config = write_config(str(tmp_path / 'c.yaml'), fmnist_dir, model={'gates': []}, data={'subset': 128})
    output, marker = tmp_path / 'run', tmp_path / 'hanging'
    proc = subprocess.Popen([sys.executable, '-c', HANGING_WRITER, 'train', '--config', config, '--output',
                             str(output), '--save-every', '1'], cwd=REPO, env=env(HANG_MARKER=str(marker)),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 180
        while not marker.exists():
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            assert time.time() < deadline, 'the second checkpoint write never started'
            time.sleep(0.1)
    finally:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()

    checkpoint = read_checkpoint(str(output / 'last.pt'))  # the step-1 save, whole
    assert checkpoint['step'] == 1
    assert load_model(str(output / 'last.pt')).training is False
    leftovers = [name for name in os.listdir(output) if '.tmp.' in name]
    assert len(leftovers) == 1  # the half-written temporary file, never under the checkpoint's name


def test_save_atomic_replaces_whole_file(tmp_path):
    path = str(tmp_path / 'x.pt')
    save_atomic({'a': torch.zeros(3)}, path)
    save_atomic({'a': torch.ones(3)}, path)
    assert torch.equal(torch.load(path, weights_only=True)['a'], torch.ones(3))
    assert os.listdir(tmp_path) == ['x.pt']
