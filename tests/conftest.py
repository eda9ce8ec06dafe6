"""Shared test settings: keep Ray on loopback and quiet (see shared/design/ray-notes.md)."""

import os

import pytest

# Before anything imports Ray: a single-node Ray then binds its node address to 127.0.0.1,
# so tests only ever talk to loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session", autouse=True)
def one_thread():
    """Tiny models run faster on one thread (and far faster on a busy 2-core machine); Ray
    workers run torch on one thread too, so plain-loop references must match them."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
