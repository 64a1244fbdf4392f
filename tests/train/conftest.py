import pathlib
import sys

# tiny_lm.py (the test model) lives next to these tests.
sys.path.insert(0, str(pathlib.Path(__file__).parent))
