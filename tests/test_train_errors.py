"""Bad input ends in one clear line on stderr and exit code 2, before any file of an existing run is touched."""
import os
import shutil

import pytest

from _train_helpers import (fmnist_dir, folder_digests, run_cli, tiny_backbone,  # noqa: F401  (fixtures)
                            write_config)
from adavit.cli.main import main
from adavit.errors import ConfigError
from adavit.training.config import build_config, parse_override


@pytest.fixture()
def existing_run(tmp_path, tiny_backbone):  # noqa: F811
    """A copy of a finished run: every failing command below targets it with --overwrite."""
    run = tmp_path / 'existing'
    shutil.copytree(tiny_backbone, run)
    return str(run)


def _assert_clean_failure(code, err, existing_run, before, *needles):
    lines = err.strip().splitlines()
    assert code == 2, err
    assert len(lines) == 1, err
    assert 'Traceback' not in err
    for needle in needles:
        assert needle in lines[0], lines[0]
    assert folder_digests(existing_run) == before


def _main(capsys, argv):
    code = main(argv)
    return code, capsys.readouterr().err


def test_missing_dataset_folder(tmp_path, capsys, fmnist_dir, existing_run):  # noqa: F811
    config = write_config(str(tmp_path / 'c.yaml'), fmnist_dir)
    before = folder_digests(existing_run)
    base = ['train', '--config', config, '--output', existing_run, '--overwrite']
    code, err = _main(capsys, base + ['--data', str(tmp_path / 'no_such_folder')])
    _assert_clean_failure(code, err, existing_run, before, 'no_such_folder', 'does not exist')
    code, err = _main(capsys, base + ['--data-dir', str(tmp_path / 'no_fmnist_here')])  # download: false
    _assert_clean_failure(code, err, existing_run, before, 'apt-get install dataset-fashion-mnist', '--data-dir')


def test_image_folder_without_val(tmp_path, capsys, fmnist_dir, existing_run):  # noqa: F811
    from PIL import Image
    for name in ('a', 'b'):
        os.makedirs(tmp_path / 'images' / 'train' / name)
        Image.new('L', (28, 28)).save(tmp_path / 'images' / 'train' / name / 'x.png')
    config = write_config(str(tmp_path / 'c.yaml'), fmnist_dir)
    before = folder_digests(existing_run)
    code, err = _main(capsys, ['train', '--config', config, '--output', existing_run, '--overwrite',
                               '--data', str(tmp_path / 'images'), '--set', 'model.num_classes=2'])
    _assert_clean_failure(code, err, existing_run, before, 'val/')


@pytest.mark.parametrize('override, needle', [('model.num_classes=5', 'num_classes=10'),
                                              ('model.img_size=32', 'img_size=28')])
def test_init_checkpoint_for_another_model(tmp_path, capsys, fmnist_dir, existing_run, tiny_backbone,  # noqa: F811
                                           override, needle):
    config = write_config(str(tmp_path / 'c.yaml'), fmnist_dir)
    before = folder_digests(existing_run)
    code, err = _main(capsys, ['train', '--config', config, '--output', existing_run, '--overwrite',
                               '--init', f'{tiny_backbone}/best.pt', '--set', override])
    _assert_clean_failure(code, err, existing_run, before, needle)


def test_eval_on_data_with_other_classes(tmp_path, capsys, tiny_backbone):  # noqa: F811
    from PIL import Image
    for split in ('train', 'val'):
        for name in ('a', 'b', 'c'):
            os.makedirs(tmp_path / 'images' / split / name)
            Image.new('L', (28, 28)).save(tmp_path / 'images' / split / name / 'x.png')
    code, err = _main(capsys, ['eval', '--checkpoint', f'{tiny_backbone}/best.pt', '--data',
                               str(tmp_path / 'images'), '--no-progress'])
    assert code == 2 and len(err.strip().splitlines()) == 1 and '3 classes' in err and '10' in err, err


def test_missing_init(tmp_path, fmnist_dir, existing_run):  # noqa: F811
    # In a fresh process: the real exit code and the whole of stderr.
    config = write_config(str(tmp_path / 'c.yaml'), fmnist_dir)
    before = folder_digests(existing_run)
    result = run_cli(['train', '--config', config, '--output', existing_run, '--overwrite',
                      '--init', str(tmp_path / 'nowhere' / 'backbone.pt')])
    _assert_clean_failure(result.returncode, result.stderr, existing_run, before, 'backbone.pt', 'does not exist')


def test_unknown_config_key(tmp_path, capsys, fmnist_dir, existing_run):  # noqa: F811
    before = folder_digests(existing_run)
    config = write_config(str(tmp_path / 'c.yaml'), fmnist_dir)
    code, err = _main(capsys, ['train', '--config', config, '--output', existing_run, '--overwrite',
                               '--set', 'train.lrr=1e-3'])
    _assert_clean_failure(code, err, existing_run, before, 'train.lrr', 'did you mean lr')
    with open(config, 'a') as f:
        f.write('optimiser: adamw\n')
    code, err = _main(capsys, ['train', '--config', config, '--output', existing_run, '--overwrite'])
    _assert_clean_failure(code, err, existing_run, before, "'optimiser'")
    code, err = _main(capsys, ['eval', '--checkpoint', str(tmp_path / 'missing.pt')])
    assert code == 2 and 'missing.pt does not exist' in err


def test_existing_run_needs_resume_or_overwrite(tmp_path, capsys, fmnist_dir, existing_run):  # noqa: F811
    before = folder_digests(existing_run)
    config = write_config(str(tmp_path / 'c.yaml'), fmnist_dir)
    code, err = _main(capsys, ['train', '--config', config, '--output', existing_run])
    _assert_clean_failure(code, err, existing_run, before, '--resume', '--overwrite')


def test_config_overrides_and_model_keys():
    assert parse_override('train.lr=3e-4') == {'train': {'lr': 3e-4}}
    assert parse_override('loss.budgets=[0.6, 0.8, 0.9]') == {'loss': {'budgets': [0.6, 0.8, 0.9]}}
    config = build_config(None, [{'model': {'arch': 'adavit', 'embed_dim': 48, 'gates': []}}])
    assert config['model']['embed_dim'] == 48 and config['train']['lr'] == 1e-3
    with pytest.raises(ConfigError, match='model.embed_dims .*embed_dim'):
        build_config(None, [parse_override('model.embed_dims=48')])


def test_random_plus_must_not_export_over_the_learned_model(capsys):
    """The AdaViT config exports the stage-2 checkpoint; Random+ from it must name its own file."""
    config = os.path.join(os.path.dirname(__file__), '..', 'configs', 'fashion_mnist_adavit.yaml')
    shipped = os.path.join(os.path.dirname(__file__), '..', 'checkpoints', 'fashion_mnist_adavit_stage2.pt')
    with open(shipped, 'rb') as f:
        before = f.read()
    code, err = _main(capsys, ['train', '--config', config, '--policy', 'random', '--output', 'unused'])
    assert code == 2 and '\n' not in err.strip()
    assert 'fashion_mnist_adavit_stage2.pt' in err and '--set train.export=' in err
    with open(shipped, 'rb') as f:
        assert f.read() == before
