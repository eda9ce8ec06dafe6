"""Fixtures shared by the core tests: built-in task records and a tokenizer trained on them."""

import pytest

from pocl_ray import tasks
from pocl_ray.data import load_records
from pocl_ray.models import train_tokenizer


@pytest.fixture(scope="session")
def task_records(tmp_path_factory):
    """300 built-in task records, read back through the real loader."""
    path = tasks.write_jsonl(
        tasks.generate(300, seed=0), tmp_path_factory.mktemp("data") / "tasks.jsonl"
    )
    return load_records(path).records


@pytest.fixture(scope="session")
def task_tok(task_records):
    return train_tokenizer([r.prompt + r.references[0] for r in task_records], vocab_size=512)
