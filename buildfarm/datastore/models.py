"""Peewee models of the current schema (the tables themselves come from migrations.py)."""

from __future__ import annotations

import base64
import contextlib
from typing import Any

import peewee as pw

database_proxy: Any = pw.DatabaseProxy()

# Build states and attempt results: the words of the README ("Build states") and of the man
# pages; the CLI, the pages and the hooks show them as they are.
QUEUED, RUNNING, SUCCEEDED = "queued", "running", "succeeded"
FAILED, CANCELED = "failed", "canceled"
BUILD_STATES = (QUEUED, RUNNING, SUCCEEDED, FAILED, CANCELED)
FINAL_STATES = (SUCCEEDED, FAILED, CANCELED)
SUCCESS, FAILURE, SETUP_FAILURE, INTERRUPTED = "success", "failure", "setup-failure", "interrupted"
ATTEMPT_RESULTS = (SUCCESS, FAILURE, SETUP_FAILURE, INTERRUPTED)
# Setup failures: inputs the machine lacks; outputs already on it while another machine may
# lack them (the build moves there). Datastores of older versions also hold
# could-not-delete-outputs, of a step (delete-outputs) attempts no longer take.
MISSING_INPUTS, OUTPUTS_PRESENT = "missing-inputs", "outputs-present"
# A rebuild over outputs the machine already holds (guix build --check, nix-store --check).
IDENTICAL, DIFFERS = "identical", "differs"


class SignatureField(pw.TextField):
    """A signature's bytes in a TEXT column, read back exactly: as they are when they are UTF-8
    text without NUL (as every signature was stored before, and almost every one is), else
    `base64:` and their base64. libgcrypt prints the rare atom of raw bytes 0xA1-0xFF in a
    Guix signature as it is; PostgreSQL's text holds neither invalid UTF-8 nor NUL."""

    PREFIX = "base64:"

    def db_value(self, value: bytes | None) -> str | None:
        if value is None:
            return None
        with contextlib.suppress(UnicodeDecodeError):
            text = bytes(value).decode("utf-8")
            if "\0" not in text and not text.startswith(self.PREFIX):
                return text
        return self.PREFIX + base64.b64encode(value).decode("ascii")

    def python_value(self, value: str | None) -> bytes | None:
        if value is None:
            return None
        if value.startswith(self.PREFIX):
            return base64.b64decode(value[len(self.PREFIX):])
        return value.encode("utf-8")


class BaseModel(pw.Model):
    id = pw.AutoField()

    class Meta:
        database = database_proxy
        legacy_table_names = False


class Derivation(BaseModel):
    outputs: Any  # backrefs, made by the foreign keys below
    inputs: Any
    builds: Any
    path = pw.TextField(unique=True)
    system = pw.TextField()
    required_features = pw.TextField(default="")
    contents = pw.BlobField()
    created_at = pw.FloatField()


class DerivationOutput(BaseModel):
    derivation = pw.ForeignKeyField(Derivation, backref="outputs", on_delete="CASCADE")
    name = pw.TextField()
    path = pw.TextField(index=True)
    hash_algo = pw.TextField(default="")
    hash = pw.TextField(default="")


class DerivationInput(BaseModel):
    derivation = pw.ForeignKeyField(Derivation, backref="inputs", on_delete="CASCADE")
    input_path = pw.TextField(index=True)
    outputs = pw.TextField()  # space-separated output names


class Build(BaseModel):
    tags: Any
    attempts: Any
    caused: Any
    derivation_id: int
    cause_id: int | None
    uuid = pw.TextField(unique=True)
    derivation = pw.ForeignKeyField(Derivation, backref="builds")
    system = pw.TextField()
    required_features = pw.TextField(default="")
    state = pw.TextField()
    priority = pw.IntegerField(default=0)
    created_at = pw.FloatField()
    defer_until = pw.FloatField(null=True)
    retry_after = pw.FloatField(null=True)
    started_at = pw.FloatField(null=True)
    ended_at = pw.FloatField(null=True)
    reason = pw.TextField(null=True)
    # The failed build at the bottom of the chain that made this one dependency-failed.
    cause = pw.ForeignKeyField("self", null=True, backref="caused")
    fruitless_attempts = pw.IntegerField(default=0)
    retries = pw.IntegerField(null=True)  # builder failures tried again; None: the farm's
    builder_failures = pw.IntegerField(default=0)
    machine_tags = pw.TextField(default="")  # sorted KEY=VALUE words a machine must carry


class BuildTag(BaseModel):
    build_id: int
    build = pw.ForeignKeyField(Build, backref="tags", on_delete="CASCADE")
    key = pw.TextField()
    value = pw.TextField()


class Attempt(BaseModel):
    build_id: int
    build = pw.ForeignKeyField(Build, backref="attempts", on_delete="CASCADE")
    machine = pw.TextField()
    started_at = pw.FloatField()
    ended_at = pw.FloatField(null=True)
    result = pw.TextField(null=True)
    step = pw.TextField(default="")
    exit_status = pw.IntegerField(null=True)
    detail = pw.TextField(null=True)
    log_path = pw.TextField(null=True)
    check_result = pw.TextField(null=True)  # IDENTICAL or DIFFERS after a rebuild with --check


class AttemptStep(BaseModel):
    attempt = pw.ForeignKeyField(Attempt, backref="steps", on_delete="CASCADE")
    name = pw.TextField()
    started_at = pw.FloatField()
    ended_at = pw.FloatField(null=True)
    detail = pw.TextField(null=True)


class SetupFailure(BaseModel):
    attempt = pw.ForeignKeyField(Attempt, backref="setup_failures", on_delete="CASCADE")
    kind = pw.TextField()


class MissingInput(BaseModel):
    setup_failure = pw.ForeignKeyField(SetupFailure, backref="missing", on_delete="CASCADE")
    path = pw.TextField()


class AttemptInput(BaseModel):
    """Where an input output of an attempt came from: `source` is "machine" (it was there),
    "pushed" (by the coordinator) or the substitute server it was downloaded from."""

    attempt = pw.ForeignKeyField(Attempt, backref="input_sources", on_delete="CASCADE")
    path = pw.TextField()
    source = pw.TextField()


class MachineState(BaseModel):
    id = None  # type: ignore[assignment]  # keyed by name
    name = pw.TextField(primary_key=True)
    failures = pw.IntegerField(default=0)
    backoff_until = pw.FloatField(null=True)
    last_error = pw.TextField(null=True)
    updated_at = pw.FloatField()
    report = pw.TextField(null=True)  # JSON: what run last knew of it (waiting.py)
    reported_at = pw.FloatField(null=True)


class Event(BaseModel):
    name = pw.TextField()
    build = pw.ForeignKeyField(Build, null=True, backref="events", on_delete="CASCADE")
    payload = pw.TextField()
    created_at = pw.FloatField()
    delivered_at = pw.FloatField(null=True)


class StoredOutput(BaseModel):
    path = pw.TextField(unique=True)
    deriver = pw.TextField(default="")
    nar_hash = pw.TextField()
    nar_size = pw.BigIntegerField()
    refs = pw.TextField(default="")  # space-separated full store paths
    signature = SignatureField(null=True)  # the machine's, as it wrote it
    file = pw.TextField()
    created_at = pw.FloatField()
    last_used_at = pw.FloatField()


ALL_MODELS = (
    Derivation, DerivationOutput, DerivationInput, Build, BuildTag, Attempt, AttemptStep,
    SetupFailure, MissingInput, AttemptInput, MachineState, Event, StoredOutput,
)
