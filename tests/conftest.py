"""Shared test settings: keep Ray on loopback and quiet (see shared/design/ray-notes.md)."""

import os

# Before anything imports Ray: a single-node Ray then binds its node address to 127.0.0.1,
# so tests only ever talk to loopback.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_TRAIN_ENABLE_V2_MIGRATION_WARNINGS", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
