"""The plumbing every bench script shares: how models are named on the command line, the shared flags,
one table printer and one fresh-process peak-memory probe. Timing itself is utils/benchmark.py's.

Models are named one way everywhere, with ``--models``: a registered variant (``models.list_models()``)
or a config file. Scripts that compare FLatten with softmax take pairs instead: ``FLATTEN:BASELINE``
(two such names) or a family (``swin``: its smallest FLatten variant and its smallest softmax baseline).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Dict, Iterable, Iterator, Mapping, NamedTuple, Optional, Sequence, Tuple

import torch

from config import ConfigError, load_config
from models import create_model, list_families, list_models
from models.build import resolve
from models.registry import UnknownModelError, unknown_name, variant_spec
from utils.benchmark import exact_cpu_memory_accounting, peak_memory_mb

REPO = Path(__file__).resolve().parents[1]
DTYPES = ('fp32', 'bf16', 'fp16')
SIDES = ('flatten', 'baseline')

# ---------------------------------------------------------------------------------------------
# Naming models: --models
# ---------------------------------------------------------------------------------------------


class ModelSpec(NamedTuple):
    """One model named on the command line: ``create_model(variant, **kwargs)``."""
    text: str  # as given: a registered variant or a config file
    variant: str  # the registered variant it builds
    kwargs: Dict[str, Any]  # constructor overrides (a config's keys that differ from the variant's)
    name: str  # a config's MODEL.NAME, else the variant
    label: str  # for tables: the variant's display name (FLatten-Swin-T), or a config's MODEL.NAME

    def build(self, **overrides) -> torch.nn.Module:
        """The model, with `overrides` on top of the spec's constructor arguments (``img_size=448``)."""
        return create_model(self.variant, **{**self.kwargs, **overrides})


class ModelPair(NamedTuple):
    """A FLatten model and the softmax baseline it is compared with."""
    name: str  # as given: a family or 'FLATTEN:BASELINE'
    flatten: ModelSpec
    baseline: ModelSpec

    @property
    def label(self) -> str:
        return f'{self.flatten.label} vs {self.baseline.label}'

    def sides(self) -> Dict[str, ModelSpec]:
        return dict(zip(SIDES, (self.flatten, self.baseline), strict=True))


def model_spec(text: str) -> ModelSpec:
    """The :class:`ModelSpec` of a registered variant or a config file. Raises argparse.ArgumentTypeError
    naming `text` (with the registered names closest to it) when it is neither, or the config is bad."""
    if text in list_models():
        return ModelSpec(text, text, {}, text, variant_spec(text).label)
    if not os.path.isfile(text):
        raise argparse.ArgumentTypeError(f'{unknown_name("model", text, list_models())} (or give a config file)')
    try:
        cfg = load_config(text)
        variant, kwargs = resolve(cfg)
    except (ConfigError, ValueError, UnknownModelError) as err:
        raise argparse.ArgumentTypeError(f'config {text}: {err}') from None
    return ModelSpec(text, variant, kwargs, cfg.MODEL.NAME, cfg.MODEL.NAME)


def input_size(model: torch.nn.Module) -> int:
    """The side of the square images `model` was built for (its ``pretrained_cfg``'s input size)."""
    return model.pretrained_cfg['input_size'][-1]


def family_pairs() -> Dict[str, Tuple[str, str, str, str]]:
    """Family -> (FLatten label, FLatten variant, baseline label, baseline variant): the family's smallest
    FLatten variant and smallest softmax baseline, the pair a family name stands for."""
    pairs = {}
    for family, names in list_families().items():
        flatten = next(n for n in names if n.startswith('flatten_'))
        baseline = next(n for n in names if n.startswith('softmax_'))
        pairs[family] = (variant_spec(flatten).label, flatten, variant_spec(baseline).label, baseline)
    return pairs


def model_pair(text: str) -> ModelPair:
    """The :class:`ModelPair` of a family name or of ``FLATTEN:BASELINE`` (each a variant or a config file)."""
    families = family_pairs()
    if text in families:
        _, flatten, _, baseline = families[text]
        names = [flatten, baseline]
    elif text.count(':') == 1:
        names = text.split(':')
    else:
        raise argparse.ArgumentTypeError(f'{text!r} is neither a family ({", ".join(families)}) nor a pair '
                                         'FLATTEN:BASELINE of variants or config files')
    return ModelPair(text, *(model_spec(name) for name in names))


def _checked(resolve_text: Callable[[str], Any]) -> Callable[[str], str]:
    """An argparse type that checks a name with `resolve_text` and keeps the text (results stay JSON)."""
    def check(text: str) -> str:
        resolve_text(text)
        return text
    check.__name__ = resolve_text.__name__
    return check


# ---------------------------------------------------------------------------------------------
# The shared flags
# ---------------------------------------------------------------------------------------------

# the optional shared flags: argparse keywords, help, and what a default of None means
_OPTIONAL = {
    'dtypes': (dict(nargs='+', choices=DTYPES), 'fp32, or bf16/fp16 autocast', 'see --micro'),
    'repeats': (dict(type=int), 'timed repeats per case, the median is reported', 'see --micro'),
    'warmup': (dict(type=int), 'untimed calls per case before the timed ones', ''),
    'threads': (dict(type=int), 'torch intra-op threads', "torch's"),
}


def shared_arguments(models: Sequence[str], *, pairs: bool = False, device: bool = False,
                     json_default: Optional[str] = None, memory_probe: bool = False,
                     **defaults: Any) -> argparse.ArgumentParser:
    """The parent parser of a bench script, to pass as ``ArgumentParser(parents=[...])``.

    Every script takes ``--models`` (default `models`; with `pairs`, pairs: see the module docstring) and
    ``--json PATH`` (default `json_default`). `defaults` names the optional shared flags the script takes
    and their defaults (``None``: the script fills it in after parsing): ``dtypes``, ``repeats``,
    ``warmup``, ``threads``; `device` adds ``--device``, `memory_probe` the hidden ``--probe SPEC`` that
    :func:`probe_in_fresh_processes` starts the script with. Check the values with :func:`check_minimums`.
    """
    parent = argparse.ArgumentParser(add_help=False)
    shared = parent.add_argument_group('shared bench options')
    if pairs:
        shared.add_argument('--models', nargs='+', type=_checked(model_pair), default=list(models),
                            metavar='PAIR', help='FLatten-vs-softmax pairs: FLATTEN:BASELINE (registered variants '
                            f'or config files) or a family ({", ".join(family_pairs())}); default: {" ".join(models)}')
    else:
        shared.add_argument('--models', nargs='+', type=_checked(model_spec), default=list(models), metavar='MODEL',
                            help=f'registered variants or config files (default: {" ".join(models)})')
    for name, default in defaults.items():
        if name not in _OPTIONAL:
            raise TypeError(f'{name!r} is not a shared flag; they are {", ".join(_OPTIONAL)}')
        keywords, text, when_none = _OPTIONAL[name]
        if default is None:
            shown = when_none
        elif isinstance(default, list):
            shown = ' '.join(default)
        else:
            shown = default
        shared.add_argument(f'--{name}', default=default, help=f'{text} (default: {shown})', **keywords)
    if device:
        shared.add_argument('--device', default=None, help="'cpu' or 'cuda' (default: cuda when available)")
    shared.add_argument('--json', default=json_default, metavar='PATH',
                        help=f'write the results here (default: {json_default or "none"})')
    if memory_probe:
        shared.add_argument('--probe', default=None, help=argparse.SUPPRESS)
    return parent


def check_minimums(parser: argparse.ArgumentParser, args: argparse.Namespace, **minimums: int) -> None:
    """Exit through ``parser.error`` naming the flag when one of `minimums` (``repeats=3``) is not met.
    ``--threads`` is checked too, wherever it is taken (at least 1)."""
    if getattr(args, 'threads', None) is not None:
        minimums.setdefault('threads', 1)
    for name, minimum in minimums.items():
        if getattr(args, name) < minimum:
            parser.error(f'--{name.replace("_", "-")} must be at least {minimum}')


def check_one_config(parser: argparse.ArgumentParser, args: argparse.Namespace, why: str) -> None:
    """Exit through ``parser.error`` unless ``--models`` is one config file: the script reads more than the
    model from it (`why`)."""
    if (len(args.models) != 1) or (not os.path.isfile(args.models[0])):
        parser.error(f'--models takes one config file here: {why}')


def pick_device(name: Optional[str]) -> torch.device:
    """``--device``: the named device, else cuda when available, else cpu."""
    return torch.device(name or ('cuda' if torch.cuda.is_available() else 'cpu'))


@contextlib.contextmanager
def torch_threads(threads: Optional[int]) -> Iterator[None]:
    """Run with `threads` torch intra-op threads (None: leave them), restored on exit: the scripts'
    main() also runs inside the test process."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def error_text(err: BaseException) -> str:
    return f'{type(err).__name__}: {err}'


# ---------------------------------------------------------------------------------------------
# Tables
# ---------------------------------------------------------------------------------------------

class Column(NamedTuple):
    key: str  # the rows' key
    title: str
    fmt: str = '{}'  # for numbers; any other format than '{}' right-aligns the column


def _cell(row: Mapping[str, Any], column: Column) -> str:
    value = row.get(column.key)
    if value is None:
        return '-'
    text = value if isinstance(value, str) else column.fmt.format(value)
    return text.replace('|', '/')  # a cell never splits the row


def format_table(rows: Iterable[Mapping[str, Any]], columns: Sequence[Sequence[str]]) -> str:
    """An aligned markdown table, a line per row and a cell per column (a :class:`Column` or its tuple).

    A number goes through its column's format; a string stands as it is (so 'error' or 'skipped' can
    fill a numeric column); a missing key prints '-'.
    """
    columns = [Column(*c) for c in columns]
    lines = [[c.title for c in columns]] + [[_cell(row, c) for c in columns] for row in rows]
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    right = [c.fmt != '{}' for c in columns]

    def join(cells: Sequence[str]) -> str:
        padded = (cell.rjust(w) if r else cell.ljust(w) for cell, w, r in zip(cells, widths, right, strict=True))
        return '| ' + ' | '.join(padded) + ' |'
    rule = '|' + '|'.join('-' * (w + 1) + ':' if r else '-' * (w + 2) for w, r in zip(widths, right, strict=True)) + '|'
    return '\n'.join([join(lines[0]), rule] + [join(line) for line in lines[1:]])


def describe_machine(machine: dict) -> str:
    """'<GPU or CPU>, N cores, torch X, T threads' from utils.benchmark.machine_info()."""
    where = machine['cpu'] if machine['device'] == 'cpu' else machine.get('gpu')
    return f"{where}, {machine['cpu_count']} cores, torch {machine['torch']}, {machine['torch_threads']} threads"


# ---------------------------------------------------------------------------------------------
# Peak memory: a fresh process per spec
# ---------------------------------------------------------------------------------------------

StepFactory = Callable[[str], Callable[[], object]]


def probe_in_fresh_processes(module: str, specs: Mapping[str, dict], at_once: int = 1) -> Dict[str, Dict[str, dict]]:
    """Peak memory of every case of every spec, each spec in a process of its own:
    ``python -m module --probe SPEC`` (its main answers with :func:`answer_probe`), `at_once` at a time.

    A spec is a JSON-able dict with at least ``device`` and ``cases`` (names the script's probe knows).
    Returns ``{spec key: {case: {'mb': MiB} or {'error': text}}}``; a process that fails gives each of
    its cases its exit status and last line of stderr. Processes side by side change each other's
    speed, not their peaks.
    """
    # in this working directory, so that config files named relative to it are found
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), os.environ.get('PYTHONPATH')])))

    def run(key: str) -> Dict[str, dict]:
        spec = specs[key]
        result = subprocess.run([sys.executable, '-m', module, '--probe', json.dumps(spec)], env=env,
                                capture_output=True, text=True)
        if result.returncode == 0:
            return json.loads(result.stdout.strip().splitlines()[-1])
        sys.stderr.write(f'memory probe {key} of {module} failed:\n{result.stderr[-3000:]}\n')
        last = (result.stderr.strip().splitlines() or ['(no output)'])[-1]
        return {case: {'error': f'memory probe exited with status {result.returncode}: {last}'}
                for case in spec['cases']}

    with ThreadPoolExecutor(max_workers=at_once) as pool:
        return dict(zip(specs, pool.map(run, specs), strict=True))


def answer_probe(spec_text: str, steps: Callable[[dict, torch.device], StepFactory]) -> int:
    """The probe process's side of ``--probe SPEC``: print ``{case: {'mb': MiB} or {'error': text}}`` as
    one JSON line and return the exit status (0).

    ``steps(spec, device)`` builds what the cases share (the model) and returns a factory of one step per
    case name; each step is called once (caches, optimizer state and compiled graphs then exist) and its
    next call measured with utils.benchmark.peak_memory_mb, the allocator set up for exact accounting first.
    """
    spec = json.loads(spec_text)
    device = torch.device(spec['device'])
    if spec.get('threads'):
        torch.set_num_threads(spec['threads'])
    exact_cpu_memory_accounting()
    step_for = steps(spec, device)
    peaks = {}
    for case in spec['cases']:
        try:
            step = step_for(case)
            step()
            peaks[case] = {'mb': peak_memory_mb(step, device)}
        except Exception as err:  # noqa: BLE001 - reported in the results, the other cases go on
            peaks[case] = {'error': error_text(err)}
        finally:
            step = None  # the next case starts without this one's buffers
    print(json.dumps(peaks))
    return 0
