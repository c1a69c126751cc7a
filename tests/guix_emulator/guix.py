"""A test double of GNU Guix's `guix` command, doing the work with a real Nix store.

Guix cannot be installed where the tests run, yet the coordinator's guix backend must be tested
by running its exact command lines over real SSH.  This program answers them the way Guix
(1.4-era, Millak/guix sources) does: same stdout, stderr lines and exit status, each message
citing its source.  [B] guix/scripts/build.scm, [A] guix/scripts/archive.scm, [GC]
guix/scripts/gc.scm, [UI] guix/ui.scm, [SC] guix/scripts.scm, [ST] guix/status.scm, [S]
guix/store.scm, [D] guix/derivations.scm, [SER] guix/serialization.scm, [AU]
guix/scripts/authenticate.scm, [PKI] guix/pki.scm, [GG] guile-gcrypt's gcrypt/pk-crypto.scm,
[37] Guile's srfi-37.scm, and the daemon's nix/libstore/ [BC] build.cc, [LS] local-store.cc,
[GCC] gc.cc, [SA] store-api.cc, [PL] pathlocks.cc, nix/libutil/ [AR] archive.cc, [SZ]
serialise.cc; [SU] guix/scripts/substitute.scm, [SS] guix/substitutes.scm, [NI]
guix/narinfo.scm.  Line-level citations are to wahjava/guix 3652bbe6 where not said.  The builds,
queries, deletions and the final step of an import are done by `nix-store` on the host's store
(NIX_STORE_DIR, default /nix/store); the formats (derivation.py, serialization.py) and the
cryptography (gcrypt.py on libgcrypt, pki.py) are the emulator's own, never buildfarm's.

Emulated: `guix build` (substitutes over HTTP, --check, --fallback, --no-offload and offloading
as the client sees it), `guix archive --export/--import/--missing/--authorize/--generate-key`,
`guix gc` (collecting garbage, --delete/--references/--requisites/--referrers/--derivers),
`guix hash` ([H] guix/scripts/hash.scm), `guix --version`; a daemon that is down, the
garbage collector's lock, and Guix's messages in German and French (i18n.py).

Emulator details, which real Guix does not have:
- Build logs are Nix's: "View build log at" names $GUIX_LOG_DIRECTORY or $NIX_LOG_DIR/drvs/..
  (default /nix/var/log/nix).  No colours (Guix colours only a terminal), no "hint:" lines.
- The daemon's informational lines (e.g. "[0.00 MiB] deleting '...'") are not reproduced; only
  its error-level lines are.  `gc --derivers` lists the registered deriver when it is valid.
- The daemon is up while its socket path exists (store.py); its own --substitute-urls is
  GUIX_EMULATOR_DAEMON_SUBSTITUTE_URLS (substitute.py); machines.scm is read, not loaded.
- Real Guix commands and options this program does not emulate, and inputs on which Guix would
  crash with a backtrace (an unreadable .drv file), exit with status 2 and a "guix-emulator:"
  line, so a test can never mistake them for Guix behaviour.

Where things are: the daemon's conditions in store.py, whose functions are the only store
queries; substitutes in substitute.py, used by build.py's `build_plan` (Guix's substitution
oracle); collection in gc.py, whose unemulated actions are listed in GC_OPTIONS; options in
options.py's BUILD_OPTIONS; translations in i18n.py (G_ and N_ at each message).
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Callable, Sequence

if __name__ == "__main__":  # run as a script: import the package, not its sibling modules
    sys.path[0] = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from guix_emulator.archive import cmd_archive
from guix_emulator.build import cmd_build
from guix_emulator.gc import cmd_gc
from guix_emulator.hash import cmd_hash
from guix_emulator.i18n import G_
from guix_emulator.options import Leave, NotEmulated, say, show_version

TRY = "Try `guix --help' for more information.\n"  # [UI] show-guix-usage
COMMANDS: dict[str, Callable[[Sequence[str]], int]] = {
    "build": cmd_build, "archive": cmd_archive, "gc": cmd_gc, "hash": cmd_hash}
GUIX_COMMANDS = frozenset({  # guix/scripts/*.scm: real commands this program does not emulate
    "authenticate", "challenge", "container", "copy", "deploy", "describe", "discover",
    "download", "edit", "environment", "git", "graph", "help", "home", "import",
    "install", "lint", "locate", "offload", "pack", "package", "perform-download", "processes",
    "publish", "pull", "refresh", "remove", "repl", "search", "shell", "show", "size", "style",
    "substitute", "system", "time-machine", "upgrade", "weather"})


def main(argv: Sequence[str]) -> int:
    """[UI] run-guix and run-guix-command."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGHUP, lambda *_: sys.exit(129))
    args = list(argv[1:])
    if not args:
        say("guix: missing command name\n" + TRY)
        return 1
    first = args[0]
    if first in ("-h", "--help"):
        sys.stdout.write("Usage: guix OPTION | COMMAND ARGS...\nRun COMMAND with ARGS, if "
                         "given.\n")
        return 0
    if first in ("-V", "--version"):
        return show_version("guix")
    if first.startswith("-"):
        say(f"guix: unrecognized option '{first}'\n" + TRY)
        return 1
    command = COMMANDS.get(first)
    try:
        if command is None:
            if first in GUIX_COMMANDS:
                raise NotEmulated(f"command 'guix {first}' is not emulated")
            say(f"guix: {first}: command not found\n" + TRY)
            return 1
        return command(args[1:])
    except Leave as error:
        say(f"guix {first}: {G_('error: ')}{error}\n")
        return 1
    except NotEmulated as error:
        say(f"guix-emulator: {error}\n")
        return 2
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
