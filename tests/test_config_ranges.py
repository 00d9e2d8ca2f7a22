"""Every numeric config key has a valid range (config.RANGES), checked when the config is loaded:
a value just outside it is one ConfigError that names the key, the value, the range and where the
value came from; a value at a bound the range includes is accepted. The cases are generated from
the table itself, so a new key or a changed range is tested without editing this file."""
from __future__ import annotations

import logging
import math
import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, List, Tuple

import pytest
import yaml
from conftest import ASSETS, MICRO_YAML, REPO, run_main
from yacs.config import CfgNode

import config
import main
from config import NO_RANGE, RANGES, ConfigError, Range, get_default_config, load_config, scale_lr

SHIPPED_YAMLS = sorted((REPO / 'configs').rglob('*.yaml')) + sorted((ASSETS / 'official_cfgs').glob('*.yaml'))
# a valid value to start from for the keys whose default is None
START = {'MODEL.SWIN.QK_SCALE': 0.125, 'AUG.CUTMIX_MINMAX': (0.2, 0.8)}
STEP = 0.001  # "just outside" for real-valued ranges, written without an exponent (argparse takes '-0.001')


def default_of(key: str) -> Any:
    return config._value_of(get_default_config(), key)


def start_of(key: str) -> Any:
    value = default_of(key)
    return START[key] if value is None else value


def _item_cases(valid: Range) -> List[Tuple[Any, bool, bool]]:
    """(item, accepted, near) at each finite bound: the bound itself and a step beyond it (an
    excluded bound and a step inside it). `near` marks the extra float cases one ulp off the bound,
    which only the in-process tests use (their repr has an exponent that argparse takes for a flag)."""
    lo, lo_in, hi, hi_in = valid.bounds
    cases = []
    for bound, included, outward in ((lo, lo_in, -1), (hi, hi_in, +1)):
        if math.isinf(bound):
            continue
        if valid.integer:
            at = int(bound) if not valid.odd or int(bound) % 2 else int(bound) - outward
            cases += [(at, True, False), (at + outward, False, False)]
            continue
        beyond = math.nextafter(bound, outward * math.inf)
        within = math.nextafter(bound, -outward * math.inf)
        if included:
            cases += [(bound, True, False), (round(bound + outward * STEP, 6), False, False), (beyond, False, True)]
        else:
            cases += [(bound, False, False), (round(bound - outward * STEP, 6), True, False), (within, True, True)]
    if valid.odd:
        cases.append((int(lo) + 1 if int(lo) % 2 else int(lo), False, False))  # the even number next to the bound
    return cases


def cases_for(key: str) -> List[Tuple[Any, bool, bool]]:
    """(value, accepted, near) for `key`: its items at and around the range's bounds, placed into a
    valid value of the key's form, plus the form's own refusals (order, length, None, bools)."""
    valid, start = RANGES[key], start_of(key)
    items = _item_cases(valid)
    cases: List[Tuple[Any, bool, bool]] = []
    if valid.form == 'value':
        cases += items
        cases.append((True, False, False) if default_of(key) is None else (start, True, False))
    elif valid.form == 'list':
        cases += [(list(start[:-1]) + [item], ok, near) for item, ok, near in items]
        cases.append(([], False, False))
        if valid.integer:  # a float item in a list of integers
            cases.append((list(start[:-1]) + [float(start[-1])], False, False))
    elif valid.form == 'pair':
        pair = type(start)
        lo = valid.bounds[0]
        for item, ok, near in items:
            # an item at the low bound goes first, one at the high bound second
            at_low = (not math.isinf(lo)) and abs(item - lo) <= 2 * STEP
            cases.append((pair((item, start[1]) if at_low else (start[0], item)), ok, near))
        cases += [(pair((start[1], start[0])), not valid.order, False), (pair((start[0],)), False, False),
                  (pair((start[0], start[1], start[1])), False, False), (pair((start[0], True)), False, False)]
        if valid.order:
            cases.append((pair((start[0], start[0])), valid.order == '<=', False))
    else:  # digits: the last digit at and beyond each bound
        stem = str(start)[:-1]
        cases += [(int(stem + str(int(digit))), ok, False) for digit, ok, _ in items if 0 <= digit <= 9]
        cases += [(0, False, False), (-int(start), False, False)]
    cases.append((None, valid.none_ok, False))
    unique = {}
    for case in cases:
        unique.setdefault(repr(case[0]), case)
    return list(unique.values())


def opts_text(value: Any) -> str:
    """`value` as an --opts word that yacs reads back as exactly `value`."""
    return repr(value)


def expected_repr(key: str, value: Any) -> str:
    """How the message prints `value` once yacs has merged it (a list for a tuple key becomes a tuple)."""
    default = default_of(key)
    if isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        value = type(default)(value)
    return repr(value)


ALL_CASES = [(key, value, ok, near) for key in RANGES for value, ok, near in cases_for(key)]


def _case_id(case) -> str:
    key, value, ok, _ = case
    return f'{key}={value!r}:{"ok" if ok else "refused"}'


@pytest.mark.parametrize('key, value, accepted, near', ALL_CASES, ids=[_case_id(c) for c in ALL_CASES])
def test_opts_value_at_and_beyond_each_bound(key, value, accepted, near):
    valid = RANGES[key]
    assert valid.accepts(value) is accepted
    if accepted:
        cfg = load_config(None, [key, opts_text(value)])
        assert config._value_of(cfg, key) == (tuple(value) if isinstance(default_of(key), tuple) else value)
        return
    with pytest.raises(ConfigError) as info:
        load_config(None, [key, opts_text(value)])
    message = str(info.value)
    assert message.startswith(f'{key}={expected_repr(key, value)} (from --opts) is out of range: '
                              f'expected {valid.describe()} ({valid.why})'), message
    assert message.count('out of range') == 1


@pytest.mark.parametrize('key, value', [
    ('TRAIN.EPOCHS', '-1'), ('TRAIN.EPOCHS', '0'), ('DATA.IMG_SIZE', '0'), ('DATA.BATCH_SIZE', '0'),
    ('MODEL.DROP_PATH_RATE', '1.0'), ('MODEL.DROP_PATH_RATE', '1.5'), ('MODEL.DROP_RATE', '-0.1'),
    ('MODEL.LABEL_SMOOTHING', '1.0'), ('TRAIN.EMA.DECAY', '1.0001'), ('TRAIN.EMA.DECAY', '-0.5'),
    ('MODEL.LA.FOCUSING_FACTOR', '0'), ('MODEL.LA.KERNEL_SIZE', '4'), ('MODEL.LA.PVT_LA_SR_RATIOS', '1011'),
    ('TRAIN.BASE_LR', '0.0'), ('TRAIN.WEIGHT_DECAY', '-0.05'), ('TRAIN.OPTIMIZER.BETAS', '(0.9, 1.0)'),
    ('AUG.MIXUP_PROB', '1.5'), ('AUG.REPROB', '-0.25'), ('AUG.SCALE', '(0.9, 0.5)'),
    ('AUG.CUTMIX_MINMAX', '(0.8, 0.2)'), ('MODEL.SWIN.DEPTHS', '[2, 0, 6, 2]'), ('MODEL.SWIN.QK_SCALE', '-1.0'),
    ('TRAIN.CLIP_GRAD', '-1.0'), ('DATA.REPEATED_AUG_COUNT', '0'), ('PRINT_FREQ', '0'), ('SEED', '-1'),
])
def test_nonsense_a_new_user_might_type_is_refused(key, value):
    """Written out by hand, not generated from the table, so that loosening a range fails here."""
    with pytest.raises(ConfigError, match=f'^{re.escape(key)}=.* is out of range: expected '):
        load_config(str(REPO / 'configs' / 'flatten_swin_t.yaml'), [key, value])


@pytest.mark.parametrize('key, value', [
    ('TRAIN.EPOCHS', '1'), ('MODEL.DROP_PATH_RATE', '0.0'), ('TRAIN.EMA.DECAY', '1.0'), ('TRAIN.EMA.DECAY', '0.0'),
    ('MODEL.LA.FOCUSING_FACTOR', '1'), ('MODEL.LA.KERNEL_SIZE', '1'), ('MODEL.LA.PVT_LA_SR_RATIOS', '9999'),
    ('AUG.SCALE', '(1.0, 1.0)'), ('TRAIN.CLIP_GRAD', 'None'), ('TRAIN.CLIP_GRAD', '0.0'),
    ('MODEL.SWIN.QK_SCALE', '1'), ('AUG.CUTMIX_MINMAX', '[0.0, 1.0]'), ('TRAIN.WARMUP_LR', '0.0'),
])
def test_edge_values_a_user_might_mean_are_accepted(key, value):
    load_config(str(REPO / 'configs' / 'flatten_swin_t.yaml'), [key, value])


def test_ranges_read_as_words():
    assert Range('[1, inf)', '', integer=True).describe() == 'an integer >= 1'
    assert Range('[1, inf)', '', integer=True, odd=True).describe() == 'an odd integer >= 1'
    assert Range('[0, 1)', '').describe() == 'a number in [0, 1)'
    assert Range('(0, inf)', '', none_ok=True).describe() == 'None or a number > 0'
    assert Range('(0, 1]', '', form='pair', order='<=').describe() == \
        'a pair (min, max) of numbers in (0, 1] with min <= max'
    assert Range('[0, 1)', '', form='pair').describe() == 'a pair (first, second) of numbers in [0, 1)'
    assert Range('[1, inf)', '', integer=True, form='list').describe() == 'a non-empty list of integers >= 1'
    assert Range('[1, 9]', '', integer=True, form='digits').describe() == \
        'a positive integer whose decimal digits are each in [1, 9]'


def _write_yaml(path: Path, key: str, value: Any) -> str:
    tree: dict = {}
    node = tree
    *parents, leaf = key.split('.')
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = list(value) if isinstance(value, tuple) else value
    path.write_text(yaml.safe_dump(tree))
    return str(path)


@pytest.mark.parametrize('key', list(RANGES))
def test_yaml_value_out_of_range_names_the_file(tmp_path, key):
    value = next(value for value, ok, near in cases_for(key) if (not ok) and (not near) and value is not None)
    path = _write_yaml(tmp_path / 'bad.yaml', key, value)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    as_read = list(value) if isinstance(value, tuple) else value  # yaml has lists, not tuples
    assert message.startswith(f'{key}={expected_repr(key, as_read)} (from config {path}) is out of range: '
                              f'expected {RANGES[key].describe()}'), message


@pytest.fixture
def keep_logger():
    """main.main points the project logger at this test's captured stdout; put it back afterwards."""
    logger = logging.getLogger('flatten')
    handlers, level, propagate = list(logger.handlers), logger.level, logger.propagate
    yield
    logger.handlers[:] = handlers
    logger.setLevel(level)
    logger.propagate = propagate


@pytest.fixture(scope='module')
def micro_yaml(tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp('cfg') / 'micro.yaml'
    path.write_text(MICRO_YAML)
    return str(path)


@pytest.mark.parametrize('key', list(RANGES))
def test_cli_refuses_out_of_range_value(key, micro_yaml, tmp_path, capsys, keep_logger):
    """main.main, in-process: exit code 2, one ``ERROR ConfigError: ...`` line, nothing written."""
    value = next(value for value, ok, near in cases_for(key) if (not ok) and (not near))
    out = tmp_path / 'out'
    code = main.main(['--cfg', micro_yaml, '--output', str(out), '--opts', key, opts_text(value)])
    text = capsys.readouterr()
    errors = [line for line in (text.out + text.err).splitlines() if 'ERROR' in line]
    assert code == 2
    assert len(errors) == 1, errors
    assert (f'ERROR ConfigError: {key}={expected_repr(key, value)} (from --opts) is out of range: '
            f'expected {RANGES[key].describe()}') in errors[0]
    assert not out.exists()


def test_real_runs_exit_2_without_traceback(micro_yaml, tmp_path):
    """Two out-of-range values a new user might type, run as a user would (in parallel: each run
    spends its time importing torch)."""
    runs = {
        ('TRAIN.EPOCHS', '-1'): 'TRAIN.EPOCHS=-1 (from --opts) is out of range: expected an integer >= 1',
        ('MODEL.LA.FOCUSING_FACTOR', '0.5'): ("wrong value type for 'MODEL.LA.FOCUSING_FACTOR'", '(3 vs. 0.5)',
                                              'expected an integer >= 1'),
    }
    args = [['--cfg', micro_yaml, '--output', tmp_path / 'out', '--opts', key, value] for key, value in runs]
    with ThreadPoolExecutor(max_workers=2) as pool:
        results = list(pool.map(lambda a: run_main(a, timeout=120, fresh_process=True), args))
    for result, expected in zip(results, runs.values(), strict=True):
        text = result.stdout + result.stderr
        assert result.returncode == 2, text[-2000:]
        assert 'Traceback' not in text
        for part in (expected,) if isinstance(expected, str) else expected:
            assert part in text, text[-2000:]
    assert not (tmp_path / 'out').exists()


def _numeric_keys(node: CfgNode, prefix: str = '') -> List[str]:
    """Leaves that are or may be numbers: int/float (bools are not), lists/tuples of them, and None
    (yacs lets a None default take any type), plus the open (new_allowed) sub-configs."""
    keys = []
    for name, value in node.items():
        full = f'{prefix}{name}'
        if isinstance(value, CfgNode):
            keys += [full] if value.is_new_allowed() else _numeric_keys(value, full + '.')
        elif value is None:
            keys.append(full)
        elif isinstance(value, (list, tuple)):
            if value and all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
                keys.append(full)
        elif isinstance(value, (int, float)) and not isinstance(value, bool):
            keys.append(full)
    return keys


def test_every_numeric_key_has_a_range_or_is_exempt():
    numeric = set(_numeric_keys(get_default_config()))
    assert numeric - set(RANGES) - set(NO_RANGE) == set(), 'give these keys a Range in config.RANGES'
    assert not set(RANGES) & set(NO_RANGE)
    assert set(RANGES) | set(NO_RANGE) <= numeric, 'RANGES / NO_RANGE name keys that are not numeric defaults'


def test_the_defaults_are_in_range():
    for key, valid in RANGES.items():
        assert valid.accepts(default_of(key)), key
    config._validate(get_default_config())


@pytest.mark.parametrize('path', SHIPPED_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_shipped_yaml_loads(path):
    cfg = load_config(str(path))
    scale_lr(cfg, world_size=8)
    assert config.config_from_yaml_text(config.config_to_yaml(cfg)) == cfg


@pytest.mark.parametrize('text, shown', [('.inf', 'inf'), ('.nan', 'nan'), ('-.inf', '-inf')])
def test_non_finite_numbers_are_refused(tmp_path, text, shown):
    path = tmp_path / 'x.yaml'
    path.write_text(f'TRAIN:\n  BASE_LR: {text}\n')
    with pytest.raises(ConfigError, match=rf'TRAIN\.BASE_LR={shown} \(from config .*x\.yaml\) is out of range'):
        load_config(str(path))
    with pytest.raises(ConfigError, match=r'TRAIN\.WEIGHT_DECAY=inf \(from --opts\)'):
        load_config(None, ['TRAIN.WEIGHT_DECAY', '1e400'])


def test_where_the_value_came_from(tmp_path):
    (tmp_path / 'base.yaml').write_text('TRAIN:\n  EPOCHS: 0\n  WARMUP_EPOCHS: -2\n')
    child = tmp_path / 'child.yaml'
    child.write_text("BASE: ['base.yaml']\nTRAIN:\n  WARMUP_EPOCHS: -1\n")
    with pytest.raises(ConfigError) as info:
        load_config(str(child))
    message = str(info.value)
    assert message.startswith('2 config values are not valid: ')
    assert f'TRAIN.EPOCHS=0 (from config {tmp_path / "base.yaml"})' in message
    assert f'TRAIN.WARMUP_EPOCHS=-1 (from config {child})' in message
    with pytest.raises(ConfigError, match=r'^TRAIN\.EPOCHS=-3 \(from --opts\)'):
        load_config(str(child), ['TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.EPOCHS', '-3'])
    assert load_config(str(child), ['TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.EPOCHS', '1']).TRAIN.EPOCHS == 1


def test_wrong_type_names_the_range():
    expected = r"wrong value type for 'TRAIN\.CLIP_GRAD'.*; expected None or a number >= 0$"
    with pytest.raises(ConfigError, match=expected):
        load_config(None, ['TRAIN.CLIP_GRAD', '1'])


def test_stored_configs_are_not_range_checked():
    """A checkpoint's config is the record of a run that happened: it stays readable even if a range
    is tightened later (here: a value no range admits)."""
    cfg = get_default_config()
    cfg.TRAIN.EPOCHS = 0
    assert config.config_from_yaml_text(config.config_to_yaml(cfg)).TRAIN.EPOCHS == 0


def test_scale_lr_keeps_the_rates_in_range():
    cfg = load_config(None, ['TRAIN.BASE_LR', '1e-3', 'DATA.BATCH_SIZE', '1'])
    assert scale_lr(cfg, world_size=1).TRAIN.BASE_LR == pytest.approx(1e-3 / 512)
    with pytest.raises(ConfigError, match=r'TRAIN\.BASE_LR=inf \(from linear LR scaling by 2\)'):
        scale_lr(load_config(None, ['TRAIN.BASE_LR', '1e308', 'DATA.BATCH_SIZE', '1024']), world_size=1)


def test_malformed_ranges_fail_at_definition():
    for bad in ('0, 1', '[0, inf]', '[-inf, 0)', '[a, 1)'):
        with pytest.raises(ValueError, match='interval'):
            Range(bad, 'why')
    with pytest.raises(ValueError, match='integer bounds'):
        Range('(0, inf)', 'why', integer=True)


def test_docs_table_is_generated_from_the_ranges():
    documented = (REPO / 'docs' / 'config.md').read_text()
    assert documented == config.ranges_markdown(), 'regenerate it: python -m config > docs/config.md'
