"""`submit --derivation-substitute-urls`: a .drv closure the coordinator's store lacks, fetched
from the farm's own `buildfarm publish` of another state directory (narinfo signed by that
farm's key, nar checked), imported into the coordinator's (private) Nix store, then recorded;
refused, with nothing imported or recorded, when no trusted key signed it or a nar was
altered."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import zstandard
from farm import chain, token
from test_publish import publishing

from buildfarm.datastore import open_datastore
from buildfarm.outputs.store import OutputStore, Publisher


def cli(state: Path, *args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "BUILDFARM_STATE_DIR": str(state),
           "BUILDFARM_INVENTORY": str(state.parent / "no-inventory.yaml")}
    env.pop("BUILDFARM_DB", None)
    done = subprocess.run([sys.executable, "-m", "buildfarm", *args], env=env,
                          capture_output=True, text=True, timeout=300)
    if check:
        assert done.returncode == 0, (args, done.stdout, done.stderr)
    return done


def nix_store(*args: str) -> str:
    return subprocess.run(["nix-store", *args], capture_output=True, text=True, check=True,
                          timeout=300).stdout


@pytest.fixture
def served(tmp_path: Path, private_nix: Path) -> Iterator[tuple[list[str], bytes, Path, str]]:
    """A two-level chain's .drv closure in the output store of another farm (state `other`),
    served by its `buildfarm publish`, then deleted from the local store."""
    leaf, top = chain(2, token())
    closure = nix_store("--query", "--requisites", top).split()
    contents = Path(top).read_bytes()
    other = tmp_path / "other"
    cli(other, "key", "generate", "--name", "other-farm")
    bundle = tmp_path / "closure.export"
    with bundle.open("wb") as out:
        subprocess.run(["nix-store", "--export", *closure], stdout=out, check=True, timeout=300)
    reported = {}
    for path in closure:
        nar_hash = nix_store("--query", "--hash", path).strip()
        reported[path] = (nar_hash, int(nix_store("--query", "--size", path)))
    store = OutputStore(str(other / "outputs"), Publisher.load(str(other)))
    records = store.import_bundle(str(bundle), closure, reported, "")
    with open_datastore(f"sqlite://{other / 'buildfarm.db'}"):
        from buildfarm.datastore.attempts import record_outputs

        record_outputs(records, 0.0)
    subprocess.run(["nix-store", "--delete", top, leaf], capture_output=True, check=True,
                   timeout=300)
    assert not any(os.path.exists(p) for p in (top, leaf))
    with publishing(other) as (_, url):
        yield [leaf, top], contents, other, url


def test_a_drv_closure_is_fetched_from_a_signed_substitute(
    served: tuple[list[str], bytes, Path, str], tmp_path: Path
) -> None:
    (leaf, top), contents, other, url = served
    state = tmp_path / "state"
    keys = tmp_path / "trusted-keys"
    keys.write_text("# nobody's\nsomeone-else:" + "A" * 43 + "=\n")
    fetch = ("submit", "--derivation-substitute-urls", url, "--trusted-keys", str(keys), top)
    done = cli(state, *fetch, check=False)
    assert done.returncode == 1 and len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "no signature by a trusted key (trusted: someone-else)" in done.stderr
    assert not os.path.exists(top) and not (state / "buildfarm.db").exists()

    # The other farm's key trusted: a nar altered on the server is refused.
    other_key = cli(other, "key", "show", "--format", "nix").stdout.strip()
    keys.write_text(other_key + "\n")
    narinfo = next((other / "outputs").glob(f"{os.path.basename(top)[:32]}.narinfo"))
    files = [other / "outputs" / line.split(": ", 1)[1]
             for line in narinfo.read_text().splitlines() if line.startswith("URL: ")]
    originals = {f: f.read_bytes() for f in files}
    (nar_file,) = (other / "outputs" / "nar").glob(os.path.basename(top)[:32] + "-*")
    nar = nar_file.read_bytes()
    altered = nar.replace(b"level1", b"levelX")
    assert altered != nar
    for file in files:  # every copy served: the same length, other bytes
        file.write_bytes(gzip.compress(altered) if "/gzip/" in str(file)
                         else zstandard.ZstdCompressor().compress(altered))
    done = cli(state, *fetch, check=False)
    assert done.returncode == 1 and "the nar's hash or size is not the narinfo's" in done.stderr
    assert not os.path.exists(top) and not os.path.exists(leaf)  # all or nothing

    for file, data in originals.items():
        file.write_bytes(data)
    done = cli(state, *fetch, "--json")
    assert "fetched 2 store item(s) from substitute servers" in done.stderr
    assert Path(top).read_bytes() == contents and os.path.exists(leaf)
    (submitted,) = json.loads(done.stdout)
    info = json.loads(cli(state, "builds", "show", submitted["uuid"], "--json").stdout)
    assert info["derivation"] == top and [i["derivation"] for i in info["inputs"]] == [leaf]
