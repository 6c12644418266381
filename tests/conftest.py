import os
import sys

TESTS = os.path.dirname(os.path.abspath(__file__))
if TESTS not in sys.path:  # tests/waiting.py (shared helpers) imports by name from every test directory
    sys.path.insert(0, TESTS)
