"""experiments/ablation_fmnist/run.py end to end on a sliver of the real Fashion-MNIST: every rung trains (the
micro Swin; the DeiT family shares the code path), and the report (markdown + JSON) has the table and
the verdict."""
from __future__ import annotations

import json
import re

import pytest

from experiments.ablation_fmnist import run as ablation_fmnist


@pytest.mark.slow
def test_ablation_script_writes_the_table(tmp_path, fashion_mnist_dir, capsys):
    assert ablation_fmnist.main(['--families', 'swin', '--seeds', '0', '--train-subset', '256', '--val-subset', '1000',
                                 '--epochs', '1', '--data-path', fashion_mnist_dir,
                                 '--report', str(tmp_path / 'ablation.md'), '--json', str(tmp_path / 'ablation.json'),
                                 '--work-dir', str(tmp_path / 'work')]) == 0
    payload = json.loads((tmp_path / 'ablation.json').read_text())
    assert len(payload['runs']) == len(ablation_fmnist.RUNGS)
    assert all(run['count'] == 1000 and 0 < run['acc1'] <= 100 for run in payload['runs'])
    report = (tmp_path / 'ablation.md').read_text()
    table_rows = [line.strip('|').split('|') for line in report.splitlines() if line.startswith('|')]
    for rung in ablation_fmnist.RUNGS:
        assert rung in [cells[0].strip() for cells in table_rows]
    assert len(re.findall(r'\d+\.\d+ ± \d+\.\d+', report)) == len(ablation_fmnist.RUNGS)
    assert 'on 1,000 of the 10,000 Fashion-MNIST test images' in report and '--val-subset 1000' in report
    assert "Does the paper's ordering hold" in report and ('holds' in report or 'does **not** hold' in report)
    # the report can be re-written from the JSON alone, identically
    again = tmp_path / 'again.md'
    assert ablation_fmnist.main(['--from-json', str(tmp_path / 'ablation.json'), '--report', str(again)]) == 0
    assert again.read_text() == report
    table = payload['table']['swin']['softmax']
    assert len(table['runs']) == 1 and table['std'] == 0.0
