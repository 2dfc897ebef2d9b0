"""The package parses as Python 3.9, the oldest version setup.py claims.

Only Python 3.11 runs on the project's machines, so this is the check behind the claim:
a grammar check at the minimum version (``ast.parse(feature_version=...)``), and every
module uses postponed annotations, so annotations such as ``X | None`` are never evaluated.
"""
import ast
import pathlib

import pytest

PACKAGE = pathlib.Path(__file__).resolve().parent.parent / 'celery_mutex_bootstep'
SOURCES = sorted(PACKAGE.rglob('*.py'))
MINIMUM = (3, 9)


def test_the_minimum_is_the_one_setup_py_claims():
    setup = (PACKAGE.parent / 'setup.py').read_text()
    assert f"python_requires='>={MINIMUM[0]}.{MINIMUM[1]}'" in setup


def _annotated(tree):
    for node in ast.walk(tree):
        if isinstance(node, ast.AnnAssign):
            return True
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            args = node.args.posonlyargs + node.args.args + node.args.kwonlyargs
            if node.returns is not None or any(a.annotation is not None for a in args):
                return True
    return False


@pytest.mark.parametrize('path', SOURCES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_module_parses_at_the_minimum_python(path):
    source = path.read_text()
    tree = ast.parse(source, filename=str(path), feature_version=MINIMUM)
    if _annotated(tree):
        assert 'from __future__ import annotations' in source, (
            f'{path.name}: annotations would be evaluated on Python {MINIMUM}')
