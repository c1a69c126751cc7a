"""The datastore: SQLite settings, numbered migrations, writers that queue instead of failing.

Tests with the `database` fixture run on every engine; test_postgresql.py has PostgreSQL's own."""

from __future__ import annotations

import random
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from engines import ScratchDatabase

from buildfarm.datastore import migrations, open_datastore
from buildfarm.errors import DatastoreError

DATA = Path(__file__).parent / "data"


@pytest.mark.sqlite_only
def test_sqlite_pragmas(tmp_path: Path) -> None:
    with open_datastore(f"sqlite://{tmp_path / 'a.db'}") as store:
        pragma = lambda name: store.db.execute_sql(f"PRAGMA {name}").fetchone()[0]  # noqa: E731
        assert pragma("journal_mode") == "wal"
        assert pragma("foreign_keys") == 1
        assert pragma("busy_timeout") >= 10_000
        assert migrations.applied_version(store.db) == migrations.LATEST


def test_migrations_are_numbered_in_order() -> None:
    numbers = [number for number, _, _ in migrations.MIGRATIONS]
    assert numbers == list(range(1, len(numbers) + 1))
    assert len(numbers) >= 2


def test_an_older_database_opens_in_a_newer_version(database: ScratchDatabase) -> None:
    url = database.url
    with open_datastore(url, upto=1) as old:
        assert migrations.applied_version(old.db) == 1
        assert "attempt_step" not in old.db.get_tables()
        p = old.db.param
        old.db.execute_sql(
            "INSERT INTO derivation (path, system, contents, created_at) "
            f"VALUES ('/gnu/store/aaaa-x.drv', 'x86_64-linux', {p}, 1.0)",
            (b"\x00",),
        )
        old.db.execute_sql(
            "INSERT INTO build (uuid, derivation_id, system, state, priority, created_at) "
            "VALUES ('11111111-1111-1111-1111-111111111111', 1, 'x86_64-linux', 'queued', 3, 2.0)"
        )
    with open_datastore(url) as new:
        assert migrations.applied_version(new.db) == migrations.LATEST
        from buildfarm.datastore import builds

        info = builds.show_build("11111111-1111-1111-1111-111111111111")
        assert info["derivation"] == "/gnu/store/aaaa-x.drv"
        assert info["priority"] == 3
        assert info["started_at"] is None  # a column added by migration 2
        assert "attempt_step" in new.db.get_tables()
    # Opening again applies nothing more.
    with open_datastore(url) as again:
        assert migrations.migrate(again.db) == []


def test_a_newer_schema_is_refused(database: ScratchDatabase) -> None:
    url = database.url
    with open_datastore(url) as store:
        store.db.execute_sql(
            "INSERT INTO schema_migration (version, description, applied_at) VALUES (999, 'x', 0)"
        )
    with pytest.raises(DatastoreError, match="newer than this buildfarm understands"):
        open_datastore(url)


@pytest.mark.sqlite_only  # files; test_postgresql.py has a missing database and a dead server
def test_unopenable_database_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(DatastoreError, match="cannot create"):
        open_datastore(f"sqlite://{blocker / 'sub' / 'x.db'}")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"this is not a database" * 100)
    with pytest.raises(DatastoreError, match="cannot open datastore"):
        open_datastore(f"sqlite://{junk}")


def test_concurrent_submitters_never_see_a_locked_database(database: ScratchDatabase) -> None:
    """Four processes submit at once, each in many small transactions: all land, none fails."""
    script = textwrap.dedent(
        f"""
        import sys
        from buildfarm.datastore import open_datastore
        from buildfarm.submission import SubmitOptions, submit
        open_datastore({database.url!r})
        for i in range(40):
            submit([{str(DATA / "nix" / "76w21n1f03fs5kw8fnffphx7qrqffw6r-hello.drv")!r}],
                   SubmitOptions(tags=(("worker", sys.argv[1]),)))
        """
    )
    workers = [
        subprocess.Popen([sys.executable, "-c", script, str(n)], stderr=subprocess.PIPE)
        for n in range(4)
    ]
    for worker in workers:
        _, err = worker.communicate(timeout=120)
        assert worker.returncode == 0, err.decode()
    count = database.scalar("SELECT COUNT(*) FROM build")
    events = database.scalar("SELECT COUNT(*) FROM event")
    derivations = database.scalar("SELECT COUNT(*) FROM derivation")
    assert (count, events, derivations) == (160, 160, 1)


def test_a_stored_outputs_signature_reads_back_byte_for_byte(database: ScratchDatabase) -> None:
    """The signature column is TEXT; a machine's signature is bytes (libgcrypt's raw atoms are
    not UTF-8, a hostile machine may send NUL): every one reads back as it was written, and a
    signature stored as text before reads back as its UTF-8 bytes."""
    from buildfarm.datastore.models import StoredOutput

    rng = random.Random(5)
    signatures = [
        b"(signature (s \"\xc0\xf0\xeai\"))\n", b"\x00", b"", "(sig é)".encode(),
        b"base64:AAAA", b"base64:", b"\xff" * 300,
        *(rng.randbytes(rng.randrange(200)) for _ in range(200)),
    ]
    with open_datastore(database.url):
        for n, signature in enumerate(signatures):
            StoredOutput.create(path=f"/gnu/store/{n:032}-x", nar_hash="sha256:x", nar_size=1,
                                signature=signature, file="nar/x", created_at=0.0,
                                last_used_at=0.0)
        database.execute(
            "INSERT INTO stored_output (path, nar_hash, nar_size, signature, file, created_at, "
            "last_used_at) VALUES ('/gnu/store/old-x', 'sha256:x', 1, ?, 'nar/x', 0, 0)",
            "(signature (r \u00e9))\n")
        read = {row.path: row.signature for row in StoredOutput.select()}
    assert [read[f"/gnu/store/{n:032}-x"] for n in range(len(signatures))] == signatures
    assert read["/gnu/store/old-x"] == "(signature (r \u00e9))\n".encode()
    texts = [text for (text,) in database.rows("SELECT signature FROM stored_output")]
    assert "(signature (s \"" not in "".join(texts)  # stored as base64: not UTF-8
    assert "(sig é)" in texts  # UTF-8 text stays readable text
