"""Readers and writers of the universal format (docs/FORMAT.md). No framework imports here."""
from .files import read_latest, write_latest
from .reader import Checkpoint, resolve
from .writer import ShardWriter, commit, prepare_staging, staging_name

__all__ = ["Checkpoint", "ShardWriter", "commit", "prepare_staging", "read_latest", "resolve",
           "staging_name", "write_latest"]
