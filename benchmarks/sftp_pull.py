"""How fast buildfarm.ssh.remote pulls a file, next to the best an SSH exec channel does.

Usage: python benchmarks/sftp_pull.py INVENTORY MACHINE [--size-mb 200] [--rounds 3]
           [--max-requests N] [--block-size BYTES]

On the machine it writes a random file of --size-mb, then, over one connection, times
Remote.fetch (SFTP, parallel requests) and `cat FILE` streamed over an exec channel into a local
file, and reports MB/s for each, their ratio, the coordinator's CPU seconds per GB for each, and
the median cost of Remote.run(["true"]).
Timings live here, never in the tests.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time

from buildfarm.errors import BuildfarmError
from buildfarm.inventory import load
from buildfarm.ssh import sftp as sftp_module
from buildfarm.ssh.remote import Remote


async def _bench(remote: Remote, size_mb: int, rounds: int) -> None:
    await remote.connect()
    latencies = []
    for _ in range(200):
        began = time.perf_counter()
        await remote.run(["true"])
        latencies.append(time.perf_counter() - began)
    print(f"run(['true']) median: {statistics.median(latencies) * 1000:.2f} ms")

    source = await remote.mktemp()
    size = size_mb * 1024 * 1024
    await remote.run(
        ["dd", "if=/dev/urandom", f"of={source}", "bs=1M", f"count={size_mb}"], check=True
    )
    fetch_rates, cat_rates, fetch_cpu, cat_cpu = [], [], [], []
    try:
        with tempfile.TemporaryDirectory() as scratch:
            target = os.path.join(scratch, "pulled")
            for _ in range(rounds):
                if os.path.exists(target):
                    os.unlink(target)
                began, cpu = time.perf_counter(), time.process_time()
                got = await remote.fetch(source, target)
                fetch_rates.append(got / (time.perf_counter() - began) / 1e6)
                fetch_cpu.append((time.process_time() - cpu) / size * 1e9)

                with open(target, "wb") as out:
                    began, cpu = time.perf_counter(), time.process_time()
                    result = await remote.run_streaming(["cat", source], on_stdout=out.write)
                    cat_rates.append(size / (time.perf_counter() - began) / 1e6)
                    cat_cpu.append((time.process_time() - cpu) / size * 1e9)
                if not result.ok or os.path.getsize(target) != size:
                    raise SystemExit(f"cat failed: {result.stderr!r}")
    finally:
        await remote.remove(source)
        await remote.close()
    fetch, cat = statistics.median(fetch_rates), statistics.median(cat_rates)
    print(f"fetch (SFTP) {size_mb} MB: {fetch:.0f} MB/s  (rounds: "
          + ", ".join(f"{r:.0f}" for r in fetch_rates) + ")")
    print(f"cat over exec {size_mb} MB: {cat:.0f} MB/s  (rounds: "
          + ", ".join(f"{r:.0f}" for r in cat_rates) + ")")
    print(f"fetch / cat: {fetch / cat:.2f}")
    # Both are bound by this process's CPU on loopback; CPU per byte is steadier than MB/s
    # when other work shares the machine.
    fcpu, ccpu = statistics.median(fetch_cpu), statistics.median(cat_cpu)
    print(f"coordinator CPU: fetch {fcpu:.2f} s/GB, cat {ccpu:.2f} s/GB"
          f" (cat / fetch: {ccpu / fcpu:.2f})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("inventory")
    parser.add_argument("machine")
    parser.add_argument("--size-mb", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-requests", type=int, default=sftp_module.MAX_REQUESTS,
                        help="SFTP reads in flight (for tuning)")
    parser.add_argument("--block-size", type=int, default=sftp_module.BLOCK_SIZE,
                        help="bytes per SFTP read (for tuning)")
    args = parser.parse_args()
    sftp_module.MAX_REQUESTS = args.max_requests
    sftp_module.BLOCK_SIZE = args.block_size
    try:
        machine = load(args.inventory).machine(args.machine)
        asyncio.run(_bench(Remote(machine), args.size_mb, args.rounds))
    except (BuildfarmError, KeyError) as error:
        sys.exit(f"sftp_pull: {error}")


if __name__ == "__main__":
    main()
