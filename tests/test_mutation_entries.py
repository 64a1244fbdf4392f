"""tools/mutation_check.py stays runnable: each mutation's old text occurs exactly once in its file.

A refactor or reformat that moves the guarded code makes the entry stale; this names it at once
instead of when someone next runs the (slow) mutation check.
"""

import importlib.util
import pathlib
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
_spec = importlib.util.spec_from_file_location("mutation_check", ROOT / "tools" / "mutation_check.py")
mutation_check = importlib.util.module_from_spec(_spec)
sys.modules.setdefault("mutation_check", mutation_check)  # dataclasses look their module up
_spec.loader.exec_module(mutation_check)


@pytest.mark.parametrize("mutation", mutation_check.MUTATIONS, ids=lambda m: m.id)
def test_mutation_applies_once(mutation):
    text = (ROOT / mutation.path).read_text()
    assert text.count(mutation.old) == 1, (
        f"{mutation.id}: its old text occurs {text.count(mutation.old)} times in {mutation.path}"
    )
    for test in mutation.tests:
        assert (ROOT / test.split("::")[0]).exists(), f"{mutation.id}: no test file for {test}"
