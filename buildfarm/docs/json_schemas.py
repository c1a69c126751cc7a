"""What each command prints with --json: one declaration, rendered into the man pages and
checked against the real output by the tests (tests/test_render.py), so neither can drift.

A shape is a small description of a JSON value: a string, an integer, an object with named
fields, a list of shapes, or a map (an object whose keys are data). Every key of a declared
object is always present; a nullable value may be null.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["SCHEMAS", "Field", "Schema", "Shape", "describe", "type_words", "validate"]

_SCALARS = ("string", "integer", "number", "boolean")


@dataclass(frozen=True, slots=True)
class Shape:
    """kind is one of string, integer, number, boolean, object, list, map."""

    kind: str
    fields: tuple[Field, ...] = ()  # object: its keys, in the order documented
    item: Shape | None = None  # list: each item; map: each value
    nullable: bool = False


@dataclass(frozen=True, slots=True)
class Field:
    name: str
    shape: Shape
    meaning: str


@dataclass(frozen=True, slots=True)
class Schema:
    """The --json output of one command: what it is, and its shape."""

    summary: str
    shape: Shape


def string(nullable: bool = False) -> Shape:
    return Shape("string", nullable=nullable)


def integer(nullable: bool = False) -> Shape:
    return Shape("integer", nullable=nullable)


def number(nullable: bool = False) -> Shape:
    return Shape("number", nullable=nullable)


def boolean(nullable: bool = False) -> Shape:
    return Shape("boolean", nullable=nullable)


def obj(*fields: Field, nullable: bool = False) -> Shape:
    return Shape("object", fields=fields, nullable=nullable)


def list_of(item: Shape) -> Shape:
    return Shape("list", item=item)


def map_of(item: Shape) -> Shape:
    return Shape("map", item=item)


F = Field
TIME = "ISO 8601 UTC time"

_STEP = obj(
    F("name", string(), "push-derivations, substitute-inputs, push-inputs, dry-run, build, "
      "export-outputs, fetch-outputs or verify-outputs (delete-outputs in attempts of older "
      "versions)."),
    F("started_at", string(), f"When it started ({TIME})."),
    F("ended_at", string(True), "When it ended (null while it runs)."),
    F("detail", string(True), "Why it was skipped, or other detail."),
)
_ATTEMPT = obj(
    F("machine", string(), "The machine's name in the inventory."),
    F("started_at", string(), f"When the build was allocated to the machine ({TIME})."),
    F("ended_at", string(True), "When the attempt ended (null while it runs)."),
    F("result", string(True), "success, failure, setup-failure or interrupted (null while it "
      "runs)."),
    F("step", string(), "The step it reached last."),
    F("exit_status", integer(True), "0 when it succeeded; when its builder failed, the "
      "builder's exit status (from the store's \"builder for ... failed with exit code N\"), "
      "not the build command's (nix-store exits 100 for any failed build); else null."),
    F("detail", string(True), "Why it failed or was interrupted."),
    F("setup_failure", string(True), "missing-inputs, or outputs-present (its outputs were on "
      "the machine while another lacked them: the build moved there); "
      "could-not-delete-outputs in attempts of older versions."),
    F("missing_inputs", list_of(string()), "Store paths the machine lacked (for "
      "outputs-present: the outputs it held)."),
    F("input_sources", list_of(obj(
        F("path", string(), "An input output of the build."),
        F("source", string(), "machine (it was there), pushed (by the coordinator), or the "
          "substitute server it was downloaded from."),
    )), "Where each input output came from."),
    F("log", string(True), "The gzip-compressed build log on the coordinator."),
    F("check", string(True), "identical or differs: the build ran again over the outputs the "
      "machine held (guix build --check, nix-store --check) and compared; null otherwise."),
    F("steps", list_of(_STEP), "Each step, in order."),
)
_BUILD_ROW = obj(
    F("uuid", string(), "The build's UUID."),
    F("derivation", string(), "The .drv store path."),
    F("system", string(), "The system type, e.g. x86_64-linux."),
    F("state", string(), "queued, running, succeeded, failed or canceled."),
    F("priority", integer(), "Higher runs first."),
    F("tags", map_of(string()), "Tag key -> value."),
    F("created_at", string(), f"When it was submitted ({TIME})."),
    F("ended_at", string(True), "When it reached its final state."),
    F("reason", string(True), "Why it failed or was canceled."),
)
_REMOVAL = obj(
    F("path", string(), "The output's store path."),
    F("size", integer(), "Bytes it took in the output store."),
    F("last_used_at", number(), "When it was last stored, pushed or served (seconds since the "
      "epoch)."),
    F("reason", string(), "age or size."),
)

_WAITING = obj(
    F("reason", string(), "deferred, waiting-for-inputs, backed-off, waiting-for-hooks, "
      "same-derivation-running, no-machine, machines-unavailable, no-coordinator or "
      "starts-next."),
    F("summary", string(), "The reason in one line, with what it waits for."),
    F("until", string(True), f"When it may start ({TIME}): deferred or backed off until "
      "then, or the soonest an unavailable machine is back; null otherwise."),
    F("inputs", list_of(obj(
        F("build", string(), "The input build's UUID."),
        F("derivation", string(), "Its .drv store path."),
        F("state", string(), "queued or running."),
    )), "waiting-for-inputs: the input builds it waits for (at most 20)."),
    F("machines", list_of(obj(
        F("name", string(), "The machine's name."),
        F("status", string(), "busy, down, connecting, paused, overloaded, retiring or "
          "stopped."),
        F("until", string(True), "When it is back, if known."),
        F("error", string(True), "Its last error."),
    )), "machines-unavailable: each machine that could take it, as buildfarm run last "
        "recorded it."),
nullable=True)
_CHOSEN = obj(
    F("uuid", string(), "The build's UUID."),
    F("derivation", string(), "The .drv store path."),
    F("state", string(), "queued, running, or (once canceled) canceled."),
    F("priority", integer(), "Its priority (after the change)."),
)


def _filtered(what: str) -> Schema:
    return Schema("One object (with filters; without, the command takes no --json).", obj(
        F("dry_run", boolean(), "Whether this was a dry run (nothing changed)."),
        F("changed", list_of(_CHOSEN), f"The builds {what} (or, with --dry-run, that would "
          "be), oldest first."),
        F("spared", list_of(_CHOSEN), "With --ignore-if-required-by-another: the builds "
          "chosen but left alone, because a queued or running build not chosen needs them."),
        F("raised", integer(), "builds priority: queued or running builds they need whose "
          "priority was raised to it (0 for builds cancel)."),
    ))


SCHEMAS: dict[str, Schema] = {
    "queue": Schema("A list of groups of queued builds, largest first.", list_of(obj(
        F("reason", string(), "Why they are not running (see builds show's waiting.reason; "
          "the waiting-for-hooks and same-derivation-running builds count as starts-next "
          "here)."),
        F("system", string(), "Their system."),
        F("count", integer(), "How many."),
        F("oldest", string(), f"When the oldest was submitted ({TIME})."),
        F("detail", string(), "The machines unavailable, or what no machine serves."),
    ))),
    "builds cancel": _filtered("canceled"),
    "builds priority": _filtered("given the priority"),
    "submit": Schema("A list with one object per DRV, in the order given.", list_of(obj(
        F("uuid", string(), "The build's UUID."),
        F("derivation", string(), "The .drv store path."),
        F("created", boolean(), "false when --ignore-if-built, --ignore-if-queued or "
          "--ignore-if-failed found an existing build, whose UUID is given."),
        F("state", string(True), "The new build's state: queued, or failed when it is "
          "dependency-failed at once (an input's latest build failed); null for a build "
          "reused."),
    ))),
    "builds list": Schema("A list of builds, newest first.", list_of(_BUILD_ROW)),
    "builds show": Schema("One object.", obj(
        F("uuid", string(), "The build's UUID."),
        F("derivation", string(), "The .drv store path."),
        F("system", string(), "The system type."),
        F("required_features", list_of(string()), "The derivation's requiredSystemFeatures."),
        F("machine_tags", map_of(string()), "Tags a machine must carry to take it (submit "
          "--machine-tag): key -> value."),
        F("state", string(), "queued, running, succeeded, failed or canceled."),
        F("reason", string(True), "Why it failed or was canceled."),
        F("cause", obj(
            F("build", string(), "Its UUID."),
            F("derivation", string(), "Its .drv store path."),
        nullable=True), "For a dependency-failed build: the failed build at the bottom of the "
          "chain (the root cause); null otherwise."),
        F("reproducible", boolean(True), "true when a rebuild with --check gave outputs "
          "identical to those the machine held, false when they differed, null when no "
          "rebuild compared them."),
        F("retries", integer(True), "How many times a builder failure is tried again (submit "
          "--retries); null: the inventory's build_retries."),
        F("builder_failures", integer(), "How many times its builder failed (each attempt is "
          "kept in attempts)."),
        F("flaky", boolean(), "true when it succeeded after its builder had failed."),
        F("priority", integer(), "Higher runs first."),
        F("tags", map_of(string()), "Tag key -> value."),
        F("outputs", map_of(string()), "Output name -> store path."),
        F("inputs", list_of(obj(
            F("derivation", string(), "The input's .drv store path."),
            F("outputs", list_of(string()), "The output names used."),
            F("build", string(True), "The UUID of the input's latest build, if any."),
            F("state", string(True), "That build's state."),
        )), "The input derivations."),
        F("created_at", string(), f"When it was submitted ({TIME})."),
        F("defer_until", string(True), "Not started before this time."),
        F("started_at", string(True), "When its first attempt started."),
        F("ended_at", string(True), "When it reached its final state."),
        F("waiting", _WAITING, "For a queued build: the one reason it is not running now "
          "(null otherwise)."),
        F("attempts", list_of(_ATTEMPT), "Each attempt, oldest first."),
    )),
    "hooks list": Schema("One object.", obj(
        F("hooks_dir", string(), "The hooks directory."),
        F("events", list_of(obj(
            F("event", string(), "The event's name."),
            F("scripts", list_of(string()), "The scripts that fire, in the order they run."),
            F("when", string(), "When the event fires."),
        )), "Every event, in the order of buildfarm-hooks(7)."),
    )),
    "db status": Schema("One object.", obj(
        F("url", string(), "The datastore URL, without a password."),
        F("engine", string(), "sqlite or postgresql."),
        F("schema_version", integer(), "The schema version of the datastore (0: empty)."),
        F("latest_version", integer(), "The schema version this buildfarm writes."),
    )),
    "key show": Schema("One object.", obj(
        F("name", string(), "The key's Nix name."),
        F("guix", string(), "The public key as the s-expression guix archive --authorize "
          "reads."),
        F("nix", string(), "NAME:BASE64, for Nix's trusted-public-keys."),
    )),
    "outputs gc": Schema("One object.", obj(
        F("removed", list_of(_REMOVAL), "Outputs removed (or, with --dry-run, that would be)."),
        F("orphans", list_of(string()), "Files no datastore record accounts for, removed."),
        F("freed", integer(), "Bytes freed."),
        F("kept", integer(), "Outputs kept."),
        F("kept_bytes", integer(), "Bytes the kept outputs take."),
        F("protected", integer(), "Outputs kept because queued or running builds need them."),
        F("dry_run", boolean(), "Whether this was a dry run."),
    )),
    "machines": Schema("A list with one object per inventory machine, in inventory order.",
                       list_of(obj(
        F("name", string(), "The machine's name."),
        F("host", string(True), "Its host (null for transport: local)."),
        F("port", integer(True), "Its SSH port (null for transport: local)."),
        F("transport", string(), "ssh or local."),
        F("store", string(), "guix or nix, as the inventory says."),
        F("enabled", boolean(), "false: the machine gets no builds and is not probed."),
        F("systems", list_of(string()), "The systems it builds for."),
        F("features", list_of(string()), "The features it offers."),
        F("tags", map_of(string()), "Its inventory tags (submit --machine-tag): key -> value."),
        F("reachable", boolean(True), "Whether the probe could log in (null: not probed)."),
        F("error", string(True), "Why it is unreachable, or what the probe found wrong."),
        F("probe_seconds", number(True), "How long the probe took."),
        F("store_version", string(True), "The store's version (guix --version, nix-store "
          "--version)."),
        F("store_dir", string(True), "The store directory found on the machine."),
        F("cores", integer(True), "Online processors (nproc)."),
        F("load", number(True), "The 1-minute load average."),
        F("free_disk", integer(True), "Bytes available in the store's file system."),
        F("clock_skew", number(True), "Seconds the machine's clock is ahead of the "
          "coordinator's (negative: behind), to within the round trip."),
        F("slots", integer(), "max_builds: builds it may run at once."),
        F("running", integer(), "Builds the coordinator runs there now (from the datastore)."),
        F("running_builds", list_of(string()), "Their UUIDs."),
        F("failures", integer(), "Connection failures in a row, as the coordinator recorded "
          "them."),
        F("backoff_until", string(True), "Until when the coordinator leaves the machine alone "
          "after failures (null: it is not backed off)."),
        F("last_error", string(True), "The coordinator's last connection error."),
        F("updated_at", string(True), "When the coordinator last recorded the machine's "
          "state."),
    ))),
    "machines test": Schema("A list with one object per machine tested.", list_of(obj(
        F("name", string(), "The machine's name."),
        F("ok", boolean(), "Whether it passed every check."),
        F("checks", list_of(obj(
            F("name", string(), "login, store, push or pull."),
            F("ok", boolean(), "Whether it passed."),
            F("detail", string(), "What was found."),
            F("fix", string(True), "What to do about a failure."),
        )), "The checks run, in order, up to the first that failed."),
    ))),
}


# --- rendering for the man pages ------------------------------------------------------------


def type_words(shape: Shape) -> str:
    """e.g. "string or null", "list of objects", "object: string -> integer"."""
    if shape.kind in _SCALARS:
        words = shape.kind
    elif shape.kind == "object":
        words = "object"
    elif shape.kind == "list":
        assert shape.item is not None
        inner = type_words(shape.item)
        words = f"list of {inner}s" if shape.item.kind in (*_SCALARS, "object") else (
            f"list of ({inner})")
    else:
        assert shape.item is not None
        words = f"object: string -> {type_words(shape.item)}"
    return f"{words} or null" if shape.nullable else words


def describe(shape: Shape, prefix: str = "") -> list[tuple[str, str, str]]:
    """(dotted key, type words, meaning) of every field, depth first. The items of a list
    nested in an object are written KEY[].FIELD; those of the top-level list just FIELD."""
    if shape.kind in ("list", "map") and shape.item is not None:
        return describe(shape.item, f"{prefix}[]" if prefix else "")
    rows: list[tuple[str, str, str]] = []
    for field in shape.fields:
        key = f"{prefix}.{field.name}" if prefix else field.name
        rows.append((key, type_words(field.shape), field.meaning))
        rows.extend(describe(field.shape, key))
    return rows


# --- checking a real output -----------------------------------------------------------------


def validate(value: Any, shape: Shape, where: str = "$") -> list[str]:
    """Every way `value` differs from `shape` (an empty list when it conforms)."""
    if value is None:
        return [] if shape.nullable else [f"{where}: null, expected {type_words(shape)}"]
    kind = shape.kind
    checks = {
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
        "object": isinstance(value, Mapping),
        "map": isinstance(value, Mapping),
        "list": isinstance(value, list),
    }
    if not checks[kind]:
        return [f"{where}: {type(value).__name__}, expected {type_words(shape)}"]
    problems: list[str] = []
    if kind == "object":
        declared = {f.name: f for f in shape.fields}
        for key in value:
            if key not in declared:
                problems.append(f"{where}: undeclared key {key!r}")
        for name, field in declared.items():
            if name not in value:
                problems.append(f"{where}: missing key {name!r}")
            else:
                problems += validate(value[name], field.shape, f"{where}.{name}")
    elif kind in ("list", "map"):
        assert shape.item is not None
        items = enumerate(value) if kind == "list" else value.items()
        for key, item in items:
            problems += validate(item, shape.item, f"{where}[{key!r}]")
    return problems
