"""Test setup (the repository root's modules, Triton through its CPU interpreter) and helpers the test
modules share."""
import inspect
import os
import sys
from pathlib import Path

import numpy as np
import pytest

# Triton picks the interpreter when a kernel is defined, so this must precede every import of kernels.py.
os.environ.setdefault("TRITON_INTERPRET", "1")
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import data  # noqa: E402  (after sys.path points at the repository)
import model  # noqa: E402,F401  (before any test imports transformers' modeling: model.import_beside_our_kernels)


def questions(n, seed=0, sizes=((224, 224), (168, 280), (280, 140))):
    """Real questions with images of several sizes and prompts of several lengths."""
    eps = data.generate_episodes("pick_up_cup", 2, seed) + data.generate_episodes("push_button", 1, seed)
    qs = data.build_samples(eps, kinds=("waypoint", "state", "movement"), seed=seed)
    rng = np.random.default_rng(seed)
    picked = [qs[i] for i in rng.choice(len(qs), n, replace=False)]
    for i, s in enumerate(picked):
        s.image = s.load_image().resize(sizes[i % len(sizes)])
        s.prompt = s.prompt[: len(s.prompt) - 40 * i]            # different lengths: left padding
    return picked


def hf_kwargs(ref, batch):
    kw = dict(input_ids=batch.input_ids, attention_mask=batch.attention_mask, pixel_values=batch.pixel_values,
              image_grid_thw=batch.image_grid_thw)
    if "mm_token_type_ids" in inspect.signature(ref.forward).parameters:
        kw["mm_token_type_ids"] = (batch.input_ids == ref.config.image_token_id).int()
    return kw


@pytest.fixture
def torch_kernels(monkeypatch):
    """Training runs take kernels.py's chunked-PyTorch path: test_kernels.py holds it and the Triton
    kernels (interpreted there) to float64, and the interpreter would make these runs several times slower."""
    import kernels
    monkeypatch.setattr(kernels, "INTERPRET", False)
