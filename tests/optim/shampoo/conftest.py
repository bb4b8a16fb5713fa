"""Makes the loop-simple reference importable as ``shampoo_reference`` (the
test directories are not packages)."""

import importlib.util
import pathlib
import sys

if "shampoo_reference" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("shampoo_reference", pathlib.Path(__file__).with_name("reference.py"))
    sys.modules["shampoo_reference"] = importlib.util.module_from_spec(_spec)
    _spec.loader.exec_module(sys.modules["shampoo_reference"])
