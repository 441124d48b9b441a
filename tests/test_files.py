"""Files written whole: the previous file survives a write that fails, and no temporary file is left behind."""
import json

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
