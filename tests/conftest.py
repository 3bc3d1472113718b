"""Test setup: run from the repository root's modules, Triton through its CPU interpreter."""
import os
import sys
from pathlib import Path

# Triton picks the interpreter when a kernel is defined, so this must precede every import of kernels.py.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
