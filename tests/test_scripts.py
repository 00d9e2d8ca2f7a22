"""Every runnable script in tools/, bench/ and experiments/ starts both as ``python tools/x.py`` and
``python -m tools.x`` (``experiments/<name>/run.py``: ``python -m experiments.<name>.run``).

A script is runnable when it has an ``if __name__ == '__main__':`` block. Each one is started with
``--help`` two ways: as a file from another working directory (so only the script's own sys.path
set-up can make the repository importable), and as a module from the repository root. A file run
from the repository root needs no third process: Python puts the script's folder, never the working
directory, on sys.path, so it imports exactly as from elsewhere. All runs go in parallel (each one
imports torch and timm, a few seconds).
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Dict, List, Tuple

import pytest
from conftest import REPO

MAIN_BLOCK = re.compile(r"""^if __name__ == ['"]__main__['"]:""", re.MULTILINE)
FORMS = ('file from another directory', 'module from the repository root')


# where the scripts are: one file per tool or bench, one folder per experiment
SCRIPT_GLOBS = ('tools/*.py', 'bench/*.py', 'experiments/*/*.py')


def runnable_scripts() -> List[str]:
    """'tools/x.py'-style paths of the scripts with a __main__ block, sorted."""
    scripts = []
    for pattern in SCRIPT_GLOBS:
        for path in sorted(REPO.glob(pattern)):
            if MAIN_BLOCK.search(path.read_text()):
                scripts.append(path.relative_to(REPO).as_posix())
    return scripts


SCRIPTS = runnable_scripts()
CASES = [(script, form) for script in SCRIPTS for form in FORMS]


def _command(script: str, form: str, elsewhere: Path) -> Tuple[List[str], Path]:
    if form == 'file from another directory':
        return [sys.executable, str(REPO / script), '--help'], elsewhere
    return [sys.executable, '-m', script[:-len('.py')].replace('/', '.'), '--help'], REPO


def _run(script: str, form: str, elsewhere: Path) -> subprocess.CompletedProcess:
    command, cwd = _command(script, form, elsewhere)
    # no PYTHONPATH: the repository must become importable through the script itself (or the cwd for -m)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    env['OMP_NUM_THREADS'] = '1'
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope='module')
def results(tmp_path_factory) -> Dict[Tuple[str, str], subprocess.CompletedProcess]:
    elsewhere = tmp_path_factory.mktemp('elsewhere')
    with ThreadPoolExecutor(max_workers=max(2, os.cpu_count() or 1)) as pool:
        futures = {case: pool.submit(_run, *case, elsewhere) for case in CASES}
        return {case: future.result() for case, future in futures.items()}


def test_the_runnable_scripts_are_found():
    assert 'tools/attention_rank.py' in SCRIPTS and 'bench/models.py' in SCRIPTS, SCRIPTS
    assert {'experiments/ablation_fmnist/run.py', 'experiments/detection_demo/run.py'} <= set(SCRIPTS), SCRIPTS
    assert 'tools/common.py' not in SCRIPTS and 'bench/common.py' not in SCRIPTS  # helper modules, not scripts


@pytest.mark.parametrize('script, form', CASES, ids=[f'{s}: {f}' for s, f in CASES])
def test_script_help(results, script, form):
    result = results[(script, form)]
    assert result.returncode == 0, f'{script} as a {form}: exit {result.returncode}\n{result.stderr[-2000:]}'
    assert result.stdout.startswith('usage: '), f'{script} as a {form}: no usage line\n{result.stdout[:500]}'
