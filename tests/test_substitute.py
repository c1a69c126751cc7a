"""The real client: a test-bed host fetches outputs the farm built from `buildfarm publish` with
Nix's own substituter, signatures checked, and refuses a tampered narinfo; `nix log` finds the
logs of the builds that succeeded and of those that failed.

Host A builds through `buildfarm run`; host B, whose store lacks the outputs, runs
`nix-store -r PATH --option substituters URL --option trusted-public-keys KEY` (require-sigs on;
the hosts' nix.conf says `substituters =`, so the options are passed on the command line).
"""

from __future__ import annotations

import gzip
import json
import os
import selectors
import shlex
import signal
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from testbed import (
    Host,
    Testbed,
    current_system,
    instantiate,
    inventory_yaml,
    nix_expr_trivial,
)

from buildfarm.formats import narinfo as ni
from buildfarm.formats.signing import SigningKey

TIMEOUT = 180


class Farm:
    """A coordinator's state directory driven through the real command line."""

    def __init__(self, directory: Path) -> None:
        self.state = directory / "state"
        self.inventory = directory / "inventory.yaml"
        self.env = {
            **os.environ,
            "BUILDFARM_STATE_DIR": str(self.state),
            "BUILDFARM_INVENTORY": str(self.inventory),
            "BUILDFARM_HOOKS_DIR": str(directory / "no-hooks"),
        }
        self.env.pop("BUILDFARM_DB", None)

    def cli(self, *args: str) -> str:
        done = subprocess.run([sys.executable, "-m", "buildfarm", *args], env=self.env,
                              capture_output=True, text=True, timeout=TIMEOUT)
        assert done.returncode == 0, (args, done.stdout, done.stderr)
        return done.stdout

    def output_of(self, build: str) -> str:
        import json

        info = json.loads(self.cli("builds", "show", build, "--json"))
        assert info["state"] == "succeeded", info
        return str(info["outputs"]["out"])


@pytest.fixture
def publishing(tmp_path: Path, testbed: Testbed, private_nix: Path,
               hosts: list[Host]) -> Iterator[tuple[Farm, dict[str, str], str]]:
    """Three outputs built on host A (a two-level chain and a lone one), then published."""
    builder = hosts[0]
    farm = Farm(tmp_path)
    farm.inventory.write_text(inventory_yaml([builder], "nix"))
    tag = uuid.uuid4().hex[:10]
    leaf = nix_expr_trivial(f"leaf-{tag}", f"echo leaf {tag} > $out")
    drvs = {
        "leaf": instantiate(leaf),
        "top": instantiate(nix_expr_trivial(
            f"top-{tag}", 'read x < $dep; echo "top on $x from $dep" > $out',  # refers to $dep
            attrs={"dep": leaf})),
        "lone": instantiate(nix_expr_trivial(
            f"lone-{tag}", f"echo building lone {tag}; echo lone {tag} > $out")),
    }
    builds = dict(zip(drvs, farm.cli("submit", *drvs.values()).split(), strict=True))
    broken = instantiate(nix_expr_trivial(f"broken-{tag}", f"echo about to fail {tag}; exit 3"))
    (broken_build,) = farm.cli("submit", broken).split()
    # zstd only, at a level of the operator's choosing (Nix decompresses it natively).
    farm.cli("run", "--no-ui", "--exit-when-idle", "--compression", "zstd:19")
    outputs = {name: farm.output_of(build) for name, build in builds.items()}
    outputs["lone.drv"] = drvs["lone"]
    outputs["broken.drv"] = broken
    outputs["broken.build"] = broken_build

    process = subprocess.Popen(
        [sys.executable, "-m", "buildfarm", "publish", "--listen", "127.0.0.1:0"],
        env=farm.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    try:
        assert process.stdout is not None
        with selectors.DefaultSelector() as selector:
            selector.register(process.stdout, selectors.EVENT_READ)
            assert selector.select(timeout=60), "buildfarm publish printed nothing"
        line = process.stdout.readline()
        assert " at http://127.0.0.1:" in line, line
        yield farm, outputs, line.rsplit(" at ", 1)[1].strip().rstrip("/")
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
        _, err = process.communicate(timeout=30)
        assert "Traceback" not in err, err


def substitute(host: Host, path: str, url: str, key: str) -> subprocess.CompletedProcess[bytes]:
    """Nix's own substituter on `host`, nothing built there, no narinfo cache carried over."""
    options = {
        "substituters": url,
        "trusted-public-keys": key,
        "require-sigs": "true",
        "max-jobs": "0",
        "narinfo-cache-negative-ttl": "0",
        "narinfo-cache-positive-ttl": "0",
    }
    argv = ["nix-store", "-r", path]
    for name, value in options.items():
        argv += ["--option", name, value]
    command = f'XDG_CACHE_HOME="$(mktemp -d)" {shlex.join(argv)}'
    return host.run(command, check=False, timeout=TIMEOUT)


def narinfo_file(farm: Farm, url: str, path: str) -> Path:
    """The narinfo on disk, after asking the server for it (it may publish it on request)."""
    with urllib.request.urlopen(f"{url}/{ni.hash_part(path)}.narinfo", timeout=60) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == ni.CONTENT_TYPE
    return farm.state / "outputs" / f"{ni.hash_part(path)}.narinfo"


def test_nix_fetches_from_the_farm_and_refuses_tampering(
    publishing: tuple[Farm, dict[str, str], str], hosts: list[Host],
) -> None:
    farm, outputs, url = publishing
    fetcher = hosts[1]
    key = farm.cli("key", "show", "--format", "nix").strip()
    for name in ("top", "leaf", "lone"):
        assert not fetcher.local_path(outputs[name]).exists()

    # The top of the chain: Nix fetches it and its reference, checking both signatures.
    for name in ("top", "leaf"):
        published = ni.parse(narinfo_file(farm, url, outputs[name]).read_text()).files
        assert [(f.compression, f.url.split("/")[1]) for f in published] == [("zstd", "zstd")]
    done = substitute(fetcher, outputs["top"], url, key)
    assert done.returncode == 0, done.stderr.decode()
    assert fetcher.local_path(outputs["top"]).read_text().startswith("top on leaf ")
    assert fetcher.local_path(outputs["leaf"]).read_text().startswith("leaf ")
    assert f"copying path '{outputs['top']}' from '{url}'" in done.stderr.decode()

    # A narinfo whose signed fields were changed (here NarSize) is refused: nothing fetched.
    lone = outputs["lone"]
    narinfo = narinfo_file(farm, url, lone)
    original = narinfo.read_text()
    info = ni.parse(original)
    assert (info.deriver, info.system) == (outputs["lone.drv"], current_system())
    # The build log, as `guix build --log-file` and `nix log` ask for it.
    drv_name = os.path.basename(outputs["lone.drv"])
    with urllib.request.urlopen(f"{url}/log/{drv_name}", timeout=60) as response:
        assert response.headers["Content-Encoding"] == "gzip"
        assert b"building lone " in gzip.decompress(response.read())
    narinfo.write_text(original.replace(f"NarSize: {info.nar_size}\n",
                                        f"NarSize: {info.nar_size + 8}\n"))
    done = substitute(fetcher, lone, url, key)
    assert done.returncode != 0
    # Nix 2.8: "the substitute for … is not signed by any of the keys in 'trusted-public-keys'"
    refused = "signed by any of the keys in 'trusted-public-keys'"
    assert refused in done.stderr.decode(), done.stderr.decode()
    assert not fetcher.local_path(lone).exists()

    # So is one signed by a key the client does not trust.
    narinfo.write_text(original)
    stranger = SigningKey.generate().nix_public(key.split(":", 1)[0])
    done = substitute(fetcher, lone, url, stranger)
    assert done.returncode != 0 and not fetcher.local_path(lone).exists()
    assert refused in done.stderr.decode(), done.stderr.decode()

    # The untouched narinfo with the farm's key: fetched (the refusals were the signature's).
    done = substitute(fetcher, lone, url, key)
    assert done.returncode == 0, done.stderr.decode()
    assert fetcher.local_path(lone).read_text().startswith("lone ")


def test_nix_log_finds_the_logs_of_successes_and_failures(
    publishing: tuple[Farm, dict[str, str], str],
) -> None:
    """`nix log DRV` with the farm as substituter (Nix asks log/<drv basename>, as `guix build
    --log-file` does), here where the derivations were instantiated but never built."""
    farm, outputs, url = publishing
    info = json.loads(farm.cli("builds", "show", outputs["broken.build"], "--json"))
    assert info["state"] == "failed"
    # The builder's exit status, not nix-store's (100 for any failed build).
    assert info["attempts"][-1]["exit_status"] == 3
    assert info["reason"] == f"builder for {outputs['broken.drv']} failed with exit code 3"
    logs = {}
    for drv, wanted in ((outputs["lone.drv"], b"building lone "),
                        (outputs["broken.drv"], b"about to fail ")):
        done = subprocess.run(
            ["nix", "log", drv, "--option", "substituters", url],
            capture_output=True, timeout=TIMEOUT, check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert wanted in done.stdout, done.stdout
        assert f"from '{url}'" in done.stderr.decode()
        logs[drv] = done.stdout
    # Nix's error message comes in colour: the published log keeps the bytes as they came;
    # `buildfarm log` shows them plain.
    assert b"\x1b[" in logs[outputs["broken.drv"]]
    shown = farm.cli("log", outputs["broken.build"])
    assert "\x1b" not in shown
    assert f"error: builder for '{outputs['broken.drv']}' failed with exit code 3" in shown
