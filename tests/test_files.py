"""Files written whole: the previous file survives a write that fails, and no temporary file is left behind."""
import json
import os

import pytest

from adavit.files import write_atomic, write_json


def test_write_json_makes_the_folder_and_replaces_the_file_whole(tmp_path):
    path = tmp_path / 'new' / 'folder' / 'result.json'
    write_json(str(path), {'rows': [1, 2]})
    write_json(str(path), {'rows': [3]})
    assert json.loads(path.read_text()) == {'rows': [3]}
    assert sorted(p.name for p in path.parent.iterdir()) == ['result.json']  # no temporary file left behind


def test_a_write_that_fails_leaves_the_previous_file_as_it_was(tmp_path):
    path = tmp_path / 'log.csv'
    write_atomic(str(path), lambda f: f.write('epoch,loss\n1,0.5\n'), newline='')

    def half_then_fail(f):
        f.write('epoch,loss\n1,0.5\n2,')
        raise KeyboardInterrupt  # a kill in the middle of the write

    with pytest.raises(KeyboardInterrupt):
        write_atomic(str(path), half_then_fail)
    assert path.read_text() == 'epoch,loss\n1,0.5\n'
    assert sorted(p.name for p in tmp_path.iterdir()) == ['log.csv']


def test_a_durable_binary_write_syncs_the_file_and_the_rename(tmp_path, monkeypatch):
    synced = []
    real_fsync = os.fsync
    monkeypatch.setattr(os, 'fsync', lambda fd: synced.append(fd) or real_fsync(fd))
    path = tmp_path / 'model.pt'
    write_atomic(str(path), lambda f: f.write(b'\x00\x01'), binary=True, durable=True)
    assert path.read_bytes() == b'\x00\x01' and len(synced) == 2  # the file's bytes, then the folder's entry
    write_atomic(str(path), lambda f: f.write(b'\x02'), binary=True)
    assert path.read_bytes() == b'\x02' and len(synced) == 2  # not durable: no sync
