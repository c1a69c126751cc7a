"""Submitting builds: read derivations (and the input derivations that can be read), record them."""

from __future__ import annotations

import hashlib
import os
import re
import time
import uuid as uuidlib
from collections.abc import Callable, Collection, Iterable, Sequence
from datetime import datetime

from buildfarm.datastore.submissions import ReadDerivation, SubmitOptions, Submitted
from buildfarm.errors import BuildfarmError, UsageError
from buildfarm.formats import derivation as drvmod
from buildfarm.inventory_fields import TAG_KEY_RE, TAG_VALUE_RE

# The records a submission makes are the datastore's types; they are offered here too.
__all__ = [
    "ReadDerivation", "SubmitOptions", "Submitted", "check_text", "derivation_store_path",
    "parse_machine_tag", "parse_tag", "parse_time", "parse_uuid", "read_closure",
    "read_derivation", "submit", "text_store_path",
]

MAX_TAG_VALUE = 1024
LATEST_TIME = 253402300799.0  # 9999-12-31T23:59:59Z, the last moment datetime can name
# Not text a user means: control characters (C0, DEL, C1, Unicode's line and paragraph
# separators) and the lone surrogates that stand for bytes that are not UTF-8 in arguments.
_NOT_TEXT = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


def check_text(text: str, what: str, limit: int = MAX_TAG_VALUE) -> str:
    """`text` when it is one line of UTF-8 text of at most `limit` characters without control
    characters; else UsageError naming `what` (an option) and the first bad character."""
    bad = _NOT_TEXT.search(text)
    if bad is not None:
        found = ("a byte that is not UTF-8" if "\ud800" <= bad[0] <= "\udfff"
                 else f"the control character {bad[0]!r}")
        raise UsageError(f"{what}: {found} at character {bad.start() + 1}; "
                         "use one line of UTF-8 text")
    if len(text) > limit:
        raise UsageError(f"{what}: {len(text)} characters; use at most {limit}")
    return text


def parse_tag(text: str) -> tuple[str, str]:
    """KEY=VALUE, with a key made for filtering and a value of printable text."""
    key, sep, value = text.partition("=")
    if not sep or not TAG_KEY_RE.fullmatch(key):
        raise UsageError(
            f"bad tag {text!r}: use KEY=VALUE, KEY of letters, digits and _.:/- "
            "(starting with a letter, digit or _)"
        )
    return key, check_text(value, f"bad tag {key!r}")


def parse_machine_tag(text: str) -> tuple[str, str]:
    """KEY=VALUE as a machine carries it in the inventory: a tag key and one word."""
    key, value = parse_tag(text)
    if not TAG_VALUE_RE.fullmatch(value):
        raise UsageError(f"bad machine tag {text[:60]!r}: the value is one word of printable "
                         "ASCII (1 to 128 characters), as in the inventory's tags")
    return key, value


def parse_time(text: str) -> float:
    """An ISO-8601 date or date-time from 1970 to 9999; without a zone it is local time."""
    try:
        moment = datetime.fromisoformat(text.strip()).timestamp()
    except (ValueError, OverflowError, OSError):  # year 0 in local time, a platform's limits
        moment = -1.0
    if not 0 <= moment <= LATEST_TIME:
        raise UsageError(
            f"bad date {text[:40]!r}: use ISO 8601 from 1970 to 9999, e.g. 2026-12-01 or "
            "2026-12-01T18:30:00+01:00"
        )
    return moment


def parse_uuid(text: str) -> str:
    try:
        return str(uuidlib.UUID(text.strip()))
    except ValueError:
        raise UsageError(f"{text!r} is not a UUID") from None


def text_store_path(store_dir: str, name: str, contents: bytes, references: Iterable[str]) -> str:
    """The store path of a text file such as a .drv (Nix's makeTextPath, which Guix shares)."""
    from buildfarm.formats.nar import nix_base32_encode

    kind = ":".join(["text", *sorted(references)])
    digest = hashlib.sha256(contents).hexdigest()
    inner = f"{kind}:sha256:{digest}:{store_dir}:{name}".encode()
    full = hashlib.sha256(inner).digest()
    folded = bytearray(20)
    for i, byte in enumerate(full):
        folded[i % 20] ^= byte
    return f"{store_dir}/{nix_base32_encode(bytes(folded))}-{name}"


def derivation_store_path(file: str, drv: drvmod.Derivation, contents: bytes) -> str:
    """The store path a .drv file stands for, wherever the file itself lies."""
    base = os.path.basename(file)
    candidate = f"{drv.store_dir}/{base}"
    if base.endswith(".drv") and drvmod.is_store_path(candidate):
        return candidate
    name = drv.env_dict.get("name", "")
    if not name:
        raise UsageError(f"{file}: the derivation has no 'name' and the file is not a store path")
    path = text_store_path(drv.store_dir, f"{name}.drv", contents, drv.references)
    if not drvmod.is_store_path(path):
        raise UsageError(
            f"{file}: the derivation's name {name!r} makes no valid store path (letters, digits "
            "and +-._?= only) and the file is not a store path"
        )
    return path


def read_derivation(file: str) -> ReadDerivation:
    try:
        contents = drvmod.read_bytes(file)
    except IsADirectoryError:
        raise BuildfarmError(f"{file}: is a directory, not a derivation") from None
    except OSError as e:
        raise BuildfarmError(f"{file}: {e.strerror}") from None
    drv = drvmod.parse(contents, source=file)
    return ReadDerivation(derivation_store_path(file, drv, contents), drv, contents)


def read_closure(files: Sequence[str]) -> tuple[list[ReadDerivation], list[ReadDerivation]]:
    """The derivations named, then every input derivation found on disk (in the store, or next
    to the file that names it); a missing input is fine, a malformed one is an error."""
    targets = [read_derivation(f) for f in files]
    seen = {t.path for t in targets}
    inputs: list[ReadDerivation] = []
    todo = [(t, os.path.dirname(os.path.abspath(f))) for t, f in zip(targets, files, strict=True)]
    while todo:
        item, directory = todo.pop()
        for input_path, _outputs in item.drv.input_drvs:
            if input_path in seen:
                continue
            seen.add(input_path)
            for candidate in (input_path, os.path.join(directory, os.path.basename(input_path))):
                if os.path.isfile(candidate):
                    found = read_derivation(candidate)
                    inputs.append(found)
                    todo.append((found, os.path.dirname(candidate)))
                    break
    return targets, inputs


def submit(
    files: Sequence[str], options: SubmitOptions, connect: Callable[[], object] | None = None,
    store_dirs: Collection[str] | None = None,
) -> list[Submitted]:
    """Read every file first, then record everything in one transaction: all or nothing.
    `connect` opens the datastore once all of it is known good, so that a rejected submission
    creates none. With `store_dirs` (those of the inventory's machines), a derivation of
    another store is refused: no machine could ever build it."""
    from buildfarm.datastore import submissions

    if options.uuid is not None and len(files) != 1:
        raise UsageError("--uuid needs exactly one derivation")
    if not files:
        raise UsageError("no derivation given")
    targets, inputs = read_closure(files)
    if store_dirs is not None:
        for target, file in zip(targets, files, strict=True):
            if target.drv.store_dir not in store_dirs:
                served = ", ".join(sorted(store_dirs)) or "none"
                raise UsageError(
                    f"{file}: no machine of the inventory serves its store, "
                    f"{target.drv.store_dir} (theirs: {served})"
                )
    if connect is not None:
        connect()
    return submissions.record_submission(targets, inputs, options, now=time.time())
