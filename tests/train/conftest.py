import pathlib
import sys

import pytest

# tiny_lm.py (the test model) lives next to these tests.
sys.path.insert(0, str(pathlib.Path(__file__).parent))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A TFDS data dir per test module: the corpus is prepared once per module."""
    return str(tmp_path_factory.mktemp("tfds"))
