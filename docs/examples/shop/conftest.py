# Lets the tests import the example module from this folder without installing it.
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
