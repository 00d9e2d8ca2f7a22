"""Every runnable script in tools/, bench/ and experiments/ starts both as ``python tools/x.py`` and
``python -m tools.x`` (``experiments/<name>/run.py``: ``python -m experiments.<name>.run``).

A script is runnable when it has an ``if __name__ == '__main__':`` block. Each one is started with
``--help`` two ways: as a file from another working directory (so only the script's own sys.path
set-up can make the repository importable), and as a module from the repository root. A file run
from the repository root needs no third process: Python puts the script's folder, never the working
directory, on sys.path, so it imports exactly as from elsewhere. One process runs them all in turn
(see DRIVER), so torch and timm are imported once.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
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


# One Python process starts every script in turn (torch and timm are imported once, not 26 times):
# before each script it restores the interpreter's own sys.path, forgets every module imported from
# the repository and moves to the script's working directory, so each script must again make the
# repository importable itself, exactly as in a process of its own. Prints one JSON object.
DRIVER = r"""
import contextlib, io, json, os, runpy, sys
repo, elsewhere, cases = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
base_path = [p for p in sys.path if p not in ('', repo, os.getcwd())]
results = {}
for script, form in cases:
    for name, module in list(sys.modules.items()):
        places = [getattr(module, '__file__', None)]
        path = getattr(module, '__path__', None)
        if isinstance(path, (list, tuple)) or type(path).__name__ == '_NamespacePath':
            places += list(path)
        if any(isinstance(p, str) and p.startswith(repo + os.sep) for p in places):
            del sys.modules[name]
    out, err, code = io.StringIO(), io.StringIO(), 0
    if form == 'module from the repository root':
        os.chdir(repo); sys.path[:] = [repo] + base_path
        sys.argv = [os.path.join(repo, script), '--help']
        run = lambda: runpy.run_module(script[:-3].replace('/', '.'), run_name='__main__', alter_sys=True)
    else:
        os.chdir(elsewhere); sys.path[:] = [os.path.dirname(os.path.join(repo, script))] + base_path
        sys.argv = [os.path.join(repo, script), '--help']
        run = lambda: runpy.run_path(os.path.join(repo, script), run_name='__main__')
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            run()
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    except BaseException as exc:
        code, _ = 1, err.write(f'{type(exc).__name__}: {exc}')
    results[script + '|' + form] = [code, out.getvalue(), err.getvalue()]
print(json.dumps(results))
"""


@pytest.fixture(scope='module')
def results(tmp_path_factory) -> Dict[Tuple[str, str], Tuple[int, str, str]]:
    elsewhere = tmp_path_factory.mktemp('elsewhere')
    # no PYTHONPATH: the repository must become importable through the script itself (or the cwd for -m)
    env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
    proc = subprocess.run([sys.executable, '-c', DRIVER, str(REPO), str(elsewhere), json.dumps(CASES)],
                          cwd=elsewhere, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    found = json.loads(proc.stdout.strip().splitlines()[-1])
    return {tuple(key.split('|')): tuple(value) for key, value in found.items()}


def test_the_runnable_scripts_are_found():
    assert 'tools/attention_rank.py' in SCRIPTS and 'bench/models.py' in SCRIPTS, SCRIPTS
    assert {'experiments/ablation_fmnist/run.py', 'experiments/detection_demo/run.py'} <= set(SCRIPTS), SCRIPTS
    assert 'tools/common.py' not in SCRIPTS and 'bench/common.py' not in SCRIPTS  # helper modules, not scripts


@pytest.mark.parametrize('script, form', CASES, ids=[f'{s}: {f}' for s, f in CASES])
def test_script_help(results, script, form):
    code, stdout, stderr = results[(script, form)]
    assert code == 0, f'{script} as a {form}: exit {code}\n{stderr[-2000:]}'
    assert stdout.startswith('usage: '), f'{script} as a {form}: no usage line\n{stdout[:500]}'
