"""One local Ray instance for all integration tests (starting Ray costs seconds on 2 cores)."""

import pytest


@pytest.fixture(scope="session")
def ray_local():
    import ray
    from ray.data import DataContext

    # address="local" always starts a fresh instance, never joins a leftover head;
    # 4 logical CPUs on 2 cores leave headroom so Ray Data tasks never starve (ray-notes.md).
    # pocl_test_node: a custom resource the placement tests ask for (docs/cluster.md)
    ray.init(address="local", num_cpus=4, resources={"pocl_test_node": 2},
             include_dashboard=False, log_to_driver=False)  # fmt: skip
    DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()
