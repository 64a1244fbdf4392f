import pathlib

import pytest

GOLDEN = pathlib.Path(__file__).parent / "golden"
FIXTURES = pathlib.Path(__file__).parent / "fixtures"


@pytest.fixture
def golden_dir():
    return GOLDEN
