"""Pre-emption and elastic restarts: SIGTERM / SIGUSR1 stop a run with a checkpoint at the update all
ranks agree on; the same command then resumes bit-identically. torchrun restarting a group after a
SIGKILLed worker, and a 2-agent (2-"node") run on localhost, end with the weights of an
uninterrupted 2-process run."""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import List, Optional

import pytest
import torch
from conftest import MICRO_YAML, REPO, make_image_folder
from test_resume import RANDOM_EVERYTHING, _tensors

from utils.preemption import EXIT_PREEMPTED

# 2 epochs of 8 updates; a checkpoint every 2 updates (the elastic restart resumes from one of
# them); a collective that waits for a dead rank fails after 2 minutes instead of 30.
OPTS = RANDOM_EVERYTHING + ['TRAIN.EPOCHS', '2', 'DIST_TIMEOUT', '2']
TORCHRUN = [sys.executable, '-m', 'torch.distributed.run']


def _env(**extra: str) -> dict:
    return dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1', **extra)


def _main_args(cfg: Path, data: Path, output: Path, batch_size: int) -> List[str]:
    return [str(REPO / 'main.py'), '--cfg', str(cfg), '--data-path', str(data), '--output', str(output),
            '--device', 'cpu', '--opts'] + OPTS + ['DATA.BATCH_SIZE', str(batch_size)]


def _start(command: List[str], log: Path, env: Optional[dict] = None) -> subprocess.Popen:
    with open(log, 'w') as out:
        return subprocess.Popen(command, cwd=REPO, env=env or _env(), stdout=out, stderr=subprocess.STDOUT)


def _wait_for(process: subprocess.Popen, log: Path, pattern: str, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while pattern not in log.read_text():
        if process.poll() is not None:
            raise AssertionError(f'ended (code {process.returncode}) before {pattern!r}:\n{log.read_text()[-3000:]}')
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f'no {pattern!r} after {timeout}s:\n{log.read_text()[-3000:]}')
        time.sleep(0.01)


def _signal_until_exit(process: subprocess.Popen, pid: int, signum: int, timeout: float = 60) -> float:
    """Send `signum` to `pid` every 50 ms until `process` ends (so that later signals arrive while
    the stop checkpoint is written); returns the seconds from the first signal to the end."""
    start = time.time()
    while process.poll() is None:
        try:
            os.kill(pid, signum)
        except ProcessLookupError:
            pass
        if time.time() - start > timeout:
            process.kill()
            raise AssertionError(f'still running {timeout}s after {signal.Signals(signum).name}')
        time.sleep(0.05)
    return time.time() - start


def _finish(command: List[str], log: Path, env: Optional[dict] = None, timeout: float = 600) -> str:
    process = _start(command, log, env)
    try:
        process.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f'{command} did not finish in {timeout}s:\n{log.read_text()[-3000:]}') from None
    text = log.read_text()
    assert process.returncode == 0, text[-3000:]
    return text


def _assert_same_run(reference: Path, actual: Path) -> None:
    """Every tensor of the final checkpoints (weights, optimizer, EMA, each rank's RNG) is equal."""
    expected = torch.load(reference / 'micro' / 'default' / 'ckpt_epoch_1.pth', weights_only=True)
    got = torch.load(actual / 'micro' / 'default' / 'ckpt_epoch_1.pth', weights_only=True)
    assert (got['epoch'], got['step']) == (expected['epoch'], expected['step']) == (2, 0)
    assert got['max_accuracy'] == expected['max_accuracy']
    assert len(got['rng']) == len(expected['rng'])
    expected_tensors, got_tensors = _tensors(expected), _tensors(got)
    assert expected_tensors.keys() == got_tensors.keys()
    different = [k for k in expected_tensors if not torch.equal(expected_tensors[k], got_tensors[k])]
    assert not different, different[:10]


def _rank_pid(run_dir: Path, rank: int) -> int:
    """The pid the newest start of `rank` logged (``rank 1/2 (pid 1234) on cpu``)."""
    pids = re.findall(rf'rank {rank}/\d+ \(pid (\d+)\)', (run_dir / f'log_rank{rank}.txt').read_text())
    return int(pids[-1])


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(('127.0.0.1', 0))
        return sock.getsockname()[1]


@pytest.fixture(scope='module')
def workdir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp('preemption')
    make_image_folder(root / 'data', classes=4, train_per_class=16, val_per_class=4)
    (root / 'micro.yaml').write_text(MICRO_YAML)
    return root


@pytest.fixture(scope='module')
def two_process_reference(workdir: Path) -> Path:
    """An uninterrupted 2-process gloo run (batch 4 per rank: 8 updates per epoch)."""
    output = workdir / 'reference2'
    _finish(TORCHRUN + ['--standalone', '--nproc_per_node=2'] + _main_args(workdir / 'micro.yaml', workdir / 'data',
                                                                            output, 4), workdir / 'reference2.log')
    return output


@pytest.mark.slow
def test_sigterm_and_sigusr1_stop_within_seconds_and_resume_bit_identically(workdir):
    cfg, data = workdir / 'micro.yaml', workdir / 'data'
    reference = workdir / 'reference1'
    _finish([sys.executable] + _main_args(cfg, data, reference, 8), workdir / 'reference1.log')

    output = workdir / 'stopped1'
    command = [sys.executable] + _main_args(cfg, data, output, 8)
    for attempt, (signum, when) in enumerate(((signal.SIGTERM, 'Train: [0/2][3/8]'),
                                              (signal.SIGUSR1, 'Train: [1/2][2/8]'))):
        log = workdir / f'stopped1_{attempt}.log'
        process = _start(command, log)
        _wait_for(process, log, when)
        seconds = _signal_until_exit(process, process.pid, signum)
        text = log.read_text()
        assert process.returncode == EXIT_PREEMPTED, text[-3000:]
        assert seconds < 10, f'{seconds:.1f} s from the signal to the exit'
        match = re.search(rf'stopped by {signum.name} \(.*\) after update (\d+) of 8 of epoch (\d)', text)
        assert match, text[-3000:]
        assert 'Traceback' not in text
        # the newest checkpoint is the stop checkpoint, complete although signals kept arriving
        name = f'ckpt_epoch_{match.group(2)}_step_{match.group(1)}.pth'
        assert torch.load(output / 'micro' / 'default' / name, weights_only=True)['step'] == int(match.group(1))
    final = _finish(command, workdir / 'stopped1_final.log')
    assert 'resuming from' in final
    _assert_same_run(reference, output)


@pytest.mark.slow
def test_two_gloo_ranks_agree_on_the_stopping_update_and_resume_bit_identically(workdir, two_process_reference):
    output = workdir / 'stopped2'
    run_dir = output / 'micro' / 'default'
    command = TORCHRUN + ['--standalone', '--nproc_per_node=2'] + _main_args(workdir / 'micro.yaml', workdir / 'data',
                                                                              output, 4)
    # 1. only rank 1 gets SIGTERM (a signal reaches ranks at different times): both stop at its update
    log = workdir / 'stopped2_rank1.log'
    process = _start(command, log)
    _wait_for(process, log, 'Train: [0/2][3/8]')
    seconds = _signal_until_exit(process, _rank_pid(run_dir, 1), signal.SIGTERM)
    assert seconds < 10, f'{seconds:.1f} s from the signal to the exit'
    rank0 = re.findall(r'stopped by a stop signal received by another rank after update (\d+) of 8 of epoch 0',
                       (run_dir / 'log_rank0.txt').read_text())
    rank1 = re.findall(r'stopped by SIGTERM \(.*\) after update (\d+) of 8 of epoch 0',
                       (run_dir / 'log_rank1.txt').read_text())
    assert rank0 and (rank0 == rank1), (rank0, rank1)
    assert (run_dir / f'ckpt_epoch_0_step_{rank0[0]}.pth').exists()

    # 2. one SIGUSR1 to the torchrun agent, as SLURM's --signal sends it: the agent forwards it to
    #    its workers' process groups (the DataLoader workers ignore it), and waits for them
    log = workdir / 'stopped2_agent.log'
    agent = TORCHRUN + ['--standalone', '--nproc_per_node=2', '--signals-to-handle=SIGTERM,SIGINT,SIGHUP,SIGUSR1'] \
        + command[len(TORCHRUN) + 2:]
    process = _start(agent, log)
    _wait_for(process, log, 'Train: [1/2][2/8]')
    start = time.time()
    process.send_signal(signal.SIGUSR1)
    process.wait(timeout=60)
    assert time.time() - start < 10, f'{time.time() - start:.1f} s from the signal to the exit'
    assert process.returncode != 0
    assert re.search(r'stopped by SIGUSR1 \(.*\) after update \d of 8 of epoch 1', log.read_text()), \
        log.read_text()[-3000:]

    final = _finish(command, workdir / 'stopped2_final.log')
    assert 'resuming from' in final
    _assert_same_run(two_process_reference, output)


@pytest.mark.slow
def test_torchrun_restarts_the_group_after_a_killed_worker_and_ends_like_an_uninterrupted_run(
        workdir, two_process_reference):
    output = workdir / 'elastic'
    run_dir = output / 'micro' / 'default'
    command = TORCHRUN + ['--standalone', '--nproc_per_node=2', '--max-restarts=1'] + _main_args(
        workdir / 'micro.yaml', workdir / 'data', output, 4)
    log = workdir / 'elastic.log'
    # a fresh rendezvous store per attempt: torchrun's shared one keeps the killed group's addresses
    process = _start(command, log, _env(TORCH_DISABLE_SHARE_RDZV_TCP_STORE='1'))
    _wait_for(process, log, 'Train: [1/2][4/8]')  # epoch 1, after the checkpoint at update 4
    os.kill(_rank_pid(run_dir, 1), signal.SIGKILL)
    process.wait(timeout=600)
    text = log.read_text()
    assert process.returncode == 0, text[-3000:]
    assert text.count('start training') == 2 and 'resuming from' in text  # a second group continued
    assert 'may read stale peer addresses' not in text
    _assert_same_run(two_process_reference, output)


@pytest.mark.slow
def test_two_agents_on_localhost_equal_one_node_with_two_processes(workdir, two_process_reference):
    output = workdir / 'two_nodes'
    endpoint = f'127.0.0.1:{_free_port()}'
    agents = []
    for node in range(2):
        command = TORCHRUN + ['--nnodes=2', '--nproc_per_node=1', f'--node-rank={node}', '--rdzv-backend=c10d',
                              f'--rdzv-endpoint={endpoint}', '--rdzv-id=preemption-test'] + _main_args(
            workdir / 'micro.yaml', workdir / 'data', output, 4)
        log = workdir / f'node{node}.log'
        agents.append((_start(command, log), log))
    for process, log in agents:
        process.wait(timeout=600)
        assert process.returncode == 0, log.read_text()[-3000:]
    _assert_same_run(two_process_reference, output)
