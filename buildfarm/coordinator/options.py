"""What `run` is asked to do (its command-line options), apart from the service that does it,
as uvicorn keeps its Config apart from its Server."""

from __future__ import annotations

from dataclasses import dataclass

from buildfarm.datastore.attempts import Retry
from buildfarm.formats.compression import DEFAULT_COMPRESSIONS, Compression
from buildfarm.logs import DEFAULT_MAX_LOG_BYTES

LOAD_PROBE_EVERY = 20.0  # default seconds between two reads of a machine's load
DEFAULT_RETRY = Retry()


@dataclass(frozen=True, slots=True)
class RunOptions:
    exit_when_idle: bool = False
    hook_timeout: float = 60.0
    hook_workers: int = 4
    hook_parallelism: int = 2  # scripts of one event running at once
    hook_env: tuple[str, ...] = ()  # more of the coordinator's variables hooks get
    grace: float = 30.0  # seconds running builds get to finish on SIGINT/SIGTERM
    tick: float = 1.0
    max_log_bytes: int = DEFAULT_MAX_LOG_BYTES
    compressions: tuple[Compression, ...] = DEFAULT_COMPRESSIONS  # of published nars
    load_interval: float = LOAD_PROBE_EVERY  # seconds between two reads of each machine's load
    retry: Retry = DEFAULT_RETRY  # after attempts that made no progress
