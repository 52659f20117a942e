"""Root conftest for TransformerLens' own test suite run against hooked_attn (copied in by tl_conformance.py).

It replaces TransformerLens' root ``tests/conftest.py``: ``import transformer_lens`` resolves to
hooked_attn's compatibility layer, seeds are fixed as TransformerLens' conftest fixes them, and the
session-wide model fixtures it defines load through the layer (they need the hub, which is offline).
"""

import os
import random

import numpy as np
import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import hooked_attn  # noqa: E402

hooked_attn.install_as_transformer_lens()


def pytest_configure(config: pytest.Config) -> None:
    random.seed(42)
    np.random.seed(42)
    torch.manual_seed(42)


@pytest.fixture(scope="session")
def gpt2_tokenizer():  # type: ignore[no-untyped-def]
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained("gpt2")


@pytest.fixture(scope="session")
def gpt2_hooked_processed():  # type: ignore[no-untyped-def]
    from transformer_lens import HookedTransformer

    return HookedTransformer.from_pretrained("gpt2", device="cpu")


@pytest.fixture
def temp_dir(tmp_path):  # type: ignore[no-untyped-def]
    return tmp_path
