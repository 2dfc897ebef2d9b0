"""Key derivation: pinned vectors, canonical JSON, bounded paths, refusals."""
import datetime
import decimal
import hashlib
import string

import pytest
from hypothesis import given, settings, strategies as st

from celery_mutex_bootstep.exceptions import MutexKeyError
from celery_mutex_bootstep.keys import CanonicalJSONError, canonical_json, key_digest

# Pinned: changing any of these splits every deployed mutex between old and
# new workers. The payload column is the exact text hashed.
VECTORS = [
    ('tasks.charge', (), '["tasks.charge",[]]',
     'f894c836bd9382e4d16d4e45332a8f8e00421e4541a1f414d654c363f62fb60a'),
    ('tasks.charge', (7,), '["tasks.charge",[7]]',
     '47a8f010bd5cf0f136b1bf5d6328130055d0fc6a2e977ac86adef2416f8d21c8'),
    ('tasks.charge', ('acct/42',), '["tasks.charge",["acct/42"]]',
     'e2007caffc5465221bef94f1ac4400ba59b9588deab3d84f1c114ec343b30fe4'),
    ('billing', ('\u00fcn\u00ef/\u00e7\u00f8d\u00e9', 1.5, None, True),
     '["billing",["\\u00fcn\\u00ef/\\u00e7\\u00f8d\\u00e9",1.5,null,true]]',
     'c715c926c16b27a6aeffb66749931cc31843fa789a61c33b5b14f99bb8f8d2a5'),
    ('tasks.sync', ({'b': [1, 2.0], 'a': 'x'},), '["tasks.sync",[{"a":"x","b":[1,2]}]]',
     '0d048a5e014e78e80f38876b3927a23f005c6c91dcb7d9ef623974f67b768d60'),
]


@pytest.mark.parametrize('name,values,payload,digest', VECTORS)
def test_pinned_vectors(name, values, payload, digest):
    assert hashlib.sha256(payload.encode()).hexdigest() == digest
    assert key_digest(name, values) == digest


def test_megabyte_value_gives_bounded_key():
    digest = key_digest('tasks.big', ('x' * 1_000_000,))
    assert digest == 'd53d5ee11bf02794aee309f736204ed25808bec54b28c636b88aa4b9b9af7ce1'


def test_canonical_forms():
    assert canonical_json({'b': 1, 'a': [True, None]}) == '{"a":[true,null],"b":1}'
    assert canonical_json(1.0) == canonical_json(1) == '1'
    assert canonical_json(-0.0) == '0'
    assert canonical_json(0.1) == '0.1'
    assert canonical_json(1e20) == '1e+20'
    assert canonical_json((1, 2)) == canonical_json([1, 2]) == '[1,2]'
    assert canonical_json('\u00e9\n"') == '"\\u00e9\\n\\""'


def test_order_of_values_matters_names_do_not():
    assert key_digest('t', (1, 2)) != key_digest('t', (2, 1))
    assert key_digest('t', (1,)) != key_digest('u', (1,))
    # The same name with the same values is the same mutex, whatever task asks.
    assert key_digest('shared', ('a',), task='x', params=('p',)) == \
        key_digest('shared', ('a',), task='y', params=('q',))


def test_no_ambiguity_between_name_and_values():
    assert key_digest('a', ('b',)) != key_digest('a","b', ())


@pytest.mark.parametrize('value,reason', [
    (b'bytes', 'bytes is not a JSON type'),
    ({1, 2}, 'set is not a JSON type'),
    (float('nan'), 'nan is not a JSON number'),
    (float('inf'), 'inf is not a JSON number'),
    (datetime.date(2020, 1, 1), 'date is not a JSON type'),
    (decimal.Decimal('1.5'), 'Decimal is not a JSON type'),
    ({1: 'a'}, 'object key 1 is not a string'),
    ([1, {'x': object()}], "object is not a JSON type at [1]['x']"),
])
def test_refused_values_name_task_and_parameter(value, reason):
    with pytest.raises(MutexKeyError) as info:
        key_digest('tasks.charge', ('ok', value), task='tasks.charge',
                   params=('account', 'when'))
    text = str(info.value)
    assert "'tasks.charge'" in text and "'when'" in text and reason in text


def test_deep_nesting_is_refused_not_crashing():
    value = []
    for _ in range(100_000):
        value = [value]
    with pytest.raises(CanonicalJSONError):
        canonical_json(value)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)

HEX = set(string.hexdigits.lower())


@settings(max_examples=300, deadline=None)
@given(st.text(min_size=1, max_size=40), st.lists(json_values, max_size=4))
def test_fuzz_any_json_value_gives_a_valid_bounded_node(name, values):
    digest = key_digest(name, values)
    assert len(digest) == 64 and set(digest) <= HEX
    # Equal values (a deep copy through JSON-ish rebuilding) give equal keys.
    assert key_digest(name, [_copy(v) for v in values]) == digest


def _copy(v):
    if isinstance(v, list):
        return tuple(_copy(x) for x in v)  # tuples and lists are the same array
    if isinstance(v, dict):
        return {k: _copy(x) for k, x in reversed(list(v.items()))}
    return v


@settings(max_examples=200, deadline=None)
@given(st.lists(st.one_of(json_values, st.binary(min_size=1), st.sets(st.integers(), min_size=1),
                          st.datetimes(), st.complex_numbers()), max_size=3))
def test_fuzz_anything_else_is_refused_with_a_named_error(values):
    try:
        digest = key_digest('t', values, task='t', params=('a', 'b', 'c'))
    except MutexKeyError as exc:
        assert "task 't'" in str(exc)
    else:
        assert len(digest) == 64
