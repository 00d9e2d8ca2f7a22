"""bench/loader.py at micro size on real Fashion-MNIST JPEGs: both loaders load every image of a pass,
the table's rates agree with the JSON, the seeding is timed on its own, and bad options are refused."""
from __future__ import annotations

import json
import os

import pytest
from conftest import FASHION_MNIST_DIR

from bench import loader


def test_micro_run_writes_rows_for_every_worker_count(tmp_path, capsys):
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip('Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)')
    out = tmp_path / 'loader.json'
    folder = tmp_path / 'jpegs'
    assert loader.main(['--micro', '--workers', '0', '1', '--folder', str(folder), '--json', str(out)]) == 0
    payload = json.loads(out.read_text())
    assert [row['workers'] for row in payload['loaders']] == [0, 1]
    assert len(list((folder / 'train').rglob('*.jpg'))) == 24 and len(list((folder / 'val').glob('class_*'))) == 10
    for row in payload['loaders']:
        assert row['images'] == 24 and row['img_size'] == 224  # 6 batches of 4, the recipe's crop
        for side in ('ours', 'plain'):
            assert row[f'{side}_img_s'] > 0 and len(row['runs'][side]) == 1
            assert row[f'{side}_img_s'] == pytest.approx(24 / row['runs'][side][0])
        assert row['overhead'] == pytest.approx(row['runs']['ours'][0] / row['runs']['plain'][0] - 1)
    seeding = payload['seeding']
    assert 0 < seeding['ms_per_image']['worker'] < seeding['ms_per_image']['plain_sample']
    assert 0 < seeding['share']['worker'] < 1
    table = capsys.readouterr().out
    assert '| workers | ours img/s | plain img/s |' in table and 'in a worker' in table


@pytest.mark.parametrize('argv, message', [
    (['--images', '10', '--batch', '8'], 'fewer than two batches'),
    (['--workers', '-1'], '--workers must be 0 or more'),
    (['--repeats', '0'], '--repeats must be at least 1'),
])
def test_bad_options_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit):
        loader.parse_args(argv)
    assert message in capsys.readouterr().err
