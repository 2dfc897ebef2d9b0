"""``celery mutex``'s pure parts: exit statuses, judging with ``-d``, the shared
options, output. The command itself runs against real ZooKeeper, brokers and
workers in integration/test_command.py."""
import json
import time

import click
from click.testing import CliRunner

from celery_mutex_bootstep.command.exits import (OK, PROBLEM, UNAVAILABLE, USAGE, list_status,
                                                 release_status, status_status)
from celery_mutex_bootstep.command.leases import HELD, STALE, UNCLAIMED, LeaseNode
from celery_mutex_bootstep.command.options import mutex_options
from celery_mutex_bootstep.command.output import emit_json, workers_line
from celery_mutex_bootstep.command.workers import Workers, judge
from celery_mutex_bootstep.text import cut, duration, table

SESSION = 0x1234


def lease(worker='w1@h', session_id=SESSION, age=5.0, timeout=3600):
    now = time.time()
    return LeaseNode(path='/ns/' + 'a' * 64, name='a' * 64, digest='a' * 64, slot=None,
                     data={'worker': worker, 'host': 'h', 'pid': 7, 'task_id': 't1',
                           'acquired_at': now - age, 'timeout': timeout},
                     token=1, session_id=session_id, created=now - age)


def reply(session_id, paths=()):
    return {'session_id': session_id, 'leases': [{'path': p, 'task_id': 't1'} for p in paths]}


def test_exit_statuses():
    assert (OK, PROBLEM, USAGE, UNAVAILABLE) == (0, 1, 2, 69)
    assert list_status(0, None) == OK
    assert list_status(2, None) == PROBLEM
    # The broker away: the view is partial, whatever it shows.
    assert list_status(0, 'broker down') == UNAVAILABLE == list_status(3, 'broker down')
    assert release_status([True, True], 0, None) == OK
    assert release_status([True, False], 0, None) == PROBLEM
    assert release_status([True], 1, None) == PROBLEM  # a match left alone
    assert release_status([False], 0, 'broker down') == UNAVAILABLE
    assert release_status([True], 0, 'broker down') == OK  # a node deleted without it
    assert status_status(True, 3, 3, None) == OK
    assert status_status(True, 3, 2, None) == PROBLEM
    assert status_status(False, 3, 0, None) == UNAVAILABLE
    assert status_status(True, 3, 3, 'broker down') == UNAVAILABLE


def test_a_holder_not_asked_is_not_judged_stale():
    now = time.time()
    mine, theirs = lease('w1@h'), lease('w2@h', session_id=0x99)
    workers = Workers(replies={'w1@h': reply(SESSION, [mine.path])}, asked=['w1@h'])
    judge(mine, workers, now)
    judge(theirs, workers, now)
    assert (mine.status, mine.claimed_by) == (HELD, 'w1@h')
    assert theirs.status == UNCLAIMED and 'w2@h was not asked (-d)' in theirs.reason
    # Asked and answering without it: stale, -d or not.
    gone = lease('w1@h', session_id=0x77)
    judge(gone, workers, now)
    assert gone.status == STALE and 'w1@h answered without it' in gone.reason
    # Owned by the session of a worker asked: stale though its data names another.
    odd = lease('w2@h')
    judge(odd, Workers(replies={'w1@h': reply(SESSION)}, asked=['w1@h']), now)
    assert odd.status == STALE and 'session of w1@h' in odd.reason
    # The broker away: that is the reason given, not -d.
    away = lease('w2@h')
    judge(away, Workers(error='could not ask the workers', asked=['w1@h']), now)
    assert away.status == UNCLAIMED and 'could not ask the workers' in away.reason


def test_workers_line_names_who_was_asked_and_did_not_answer():
    workers = Workers(replies={'w1@h': {}}, asked=['w1@h', 'w3@h'], timeout=2.0)
    assert workers_line(workers) == 'Workers answering: w1@h (not answering: w3@h).'
    assert workers_line(workers, names=False) == (
        'Workers: 1 answered within 2s (not answering: w3@h):')
    assert workers_line(Workers(replies={'w1@h': {}})) == 'Workers answering: w1@h.'


def run(args):
    seen = {}

    @click.command()
    @mutex_options
    def cmd(opts):
        seen['opts'] = opts

    result = CliRunner().invoke(cmd, args)
    return result, seen.get('opts')


def test_shared_options_as_celery_inspect_spells_them():
    result, opts = run([])
    assert result.exit_code == 0, result.output
    assert (opts.timeout, opts.zk_timeout, opts.destination, opts.as_json) == (1.0, 5.0, None,
                                                                             False)
    result, opts = run(['-j', '-d', 'w1@h,w2@h', '-t', '3', '--zk-timeout', '2'])
    assert result.exit_code == 0, result.output
    assert (opts.as_json, opts.destination, opts.timeout, opts.zk_timeout) == (
        True, ['w1@h', 'w2@h'], 3.0, 2.0)
    result, opts = run(['--json', '--destination', 'w1@h', '--timeout', '0.5'])
    assert (opts.as_json, opts.destination, opts.timeout) == (True, ['w1@h'], 0.5)
    result, _ = run(['--timeout', 'soon'])
    assert result.exit_code == USAGE and "'--timeout'" in result.output


def test_json_is_one_line(capsys):
    emit_json({'b': [1, {'c': 'x\ny'}], 'a': None})
    out = capsys.readouterr().out
    assert out.count('\n') == 1 and json.loads(out) == {'a': None, 'b': [1, {'c': 'x\ny'}]}


def test_text_helpers():
    assert [duration(None), duration(4.25), duration(187), duration(7500)] == [
        '-', '4.2s', '3m07s', '2h05m']
    assert cut('abcdef', 6) == 'abcdef' and cut('abcdefg', 6) == 'abc...'
    assert table(('A', 'BB'), [['x', ''], ['yyy', 'z']]).splitlines() == [
        'A    BB', 'x', 'yyy  z']
