"""buildfarm(1) and one page per command and subcommand, generated from the click tree (usage,
help, options with their defaults and environment variables), the --json shapes of
json_schemas.SCHEMAS and the declared lists of what the commands do (metrics.METRICS,
machine_test.CHECKS). A few sections of prose that no declaration holds live here.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import click

from buildfarm import __version__
from buildfarm.docs import roff
from buildfarm.docs.json_schemas import SCHEMAS, describe

SOURCE = "buildfarm/cli/ and the lists it documents"
EXIT_STATUS = (
    ("0", "Success."),
    ("1", "An error: one line on standard error says what went wrong (never a traceback)."),
    ("2", "A usage error: an unknown command or option, or a bad option value."),
    ("141", "The reader of the output went away (e.g. `| head`): the command ended quietly, "
            "as one SIGPIPE ends."),
)
EXIT_OVERRIDES: dict[tuple[str, ...], tuple[tuple[str, str], ...]] = {
    ("machines", "test"): (
        ("0", "Every machine tested passed every check."),
        ("1", "A machine failed a check (the output says which and what to fix), or another "
              "error."),
        ("2", "A usage error."),
    ),
    ("builds", "cancel"): (
        ("0", "Every build named was canceled."),
        ("1", "Some could not be (unknown, ambiguous, or already ended): one line names each; "
              "the others were canceled."),
        ("2", "A usage error."),
    ),
}
COMPLETION = (
    "buildfarm completes commands, options and their choices in bash, zsh and fish, with "
    "click's shell completion. Add one line to the shell's start-up file:",
)
COMPLETION_LINES = (
    "# ~/.bashrc",
    'eval "$(_BUILDFARM_COMPLETE=bash_source buildfarm)"',
    "# ~/.zshrc",
    'eval "$(_BUILDFARM_COMPLETE=zsh_source buildfarm)"',
    "# fish: write the script once",
    "_BUILDFARM_COMPLETE=fish_source buildfarm > ~/.config/fish/completions/buildfarm.fish",
)
OUTPUT = (
    "On a terminal, lists are aligned tables, in colour unless the environment variable "
    "NO_COLOR is set to a non-empty value. Elsewhere (a pipe, a file) they are tab-separated "
    "lines under a header line, for grep, cut and awk, never in colour; buildfarm run then "
    "writes one line per event instead of its live view.",
    "Every command that lists or shows something takes --json and prints JSON instead (UTF-8, "
    "keys sorted); its page describes the JSON under JSON OUTPUT. Every key described is always "
    "present; a value that does not apply is null.",
    "Text that builds and machines wrote (logs, reasons, error messages) is shown without "
    "escape sequences or any control character but newline and tab; the JSON and the stored "
    "logs keep it as it was written.",
    "Wherever a command takes a build's UUID, the first 8 or more of its characters do too, "
    "if no other build's UUID starts with them.",
)
FILES = (
    ("STATE_DIR/buildfarm.db", "The SQLite datastore (unless --db names another)."),
    ("STATE_DIR/logs/", "Build logs, gzip-compressed, one per attempt."),
    ("STATE_DIR/outputs/", "The output store: verified nars of built outputs, their signed "
     "narinfos and logs, as buildfarm publish serves them."),
    ("STATE_DIR/signing-key.secret", "The coordinator's signing key (mode 0600); see "
     "buildfarm key."),
    ("~/.config/buildfarm/inventory.yaml", "The machines: see buildfarm-inventory(5)."),
    ("~/.config/buildfarm/hooks.d/", "Hook scripts: see buildfarm-hooks(7)."),
)
MORE_ENVIRONMENT = (
    ("XDG_STATE_HOME", "Where the default state directory is: $XDG_STATE_HOME/buildfarm, "
     "else ~/.local/state/buildfarm."),
    ("XDG_CONFIG_HOME", "Where the default inventory and hooks directory are: "
     "$XDG_CONFIG_HOME/buildfarm, else ~/.config/buildfarm."),
    ("NO_COLOR", "When set to a non-empty value, no colour is used, even on a terminal."),
    ("BUILDFARM_TRACE_HOOKS", "When 1, buildfarm run logs every hook run; see "
     "buildfarm-hooks(7)."),
)


@dataclass(frozen=True, slots=True)
class Page:
    name: str  # e.g. buildfarm-builds-list
    section: int
    text: str

    @property
    def file_name(self) -> str:
        return f"{self.name}.{self.section}"


def walk(command: click.Command, ctx: click.Context, path: tuple[str, ...] = ()
         ) -> Iterator[tuple[tuple[str, ...], click.Command, click.Context]]:
    """Every command under `command` (itself first), with its path of names and a context."""
    yield path, command, ctx
    if isinstance(command, click.Group):
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                yield from walk(sub, click.Context(sub, info_name=name, parent=ctx), (*path, name))


def page_name(path: tuple[str, ...]) -> str:
    return "-".join(("buildfarm", *path))


def has_json(command: click.Command) -> bool:
    return any(p.name == "as_json" for p in command.params)


def _help_paragraphs(command: click.Command) -> list[str]:
    text = command.help or ""
    return [" ".join(block.split()) for block in text.split("\n\n") if block.strip()]


def _short(command: click.Command) -> str:
    """The first sentence of the help, as `buildfarm --help` lists the command."""
    return command.get_short_help_str(limit=400).rstrip(".")


def _options(command: click.Command, ctx: click.Context) -> list[str]:
    lines: list[str] = []
    help_option = command.get_help_option(ctx)
    for param in command.get_params(ctx):
        if not isinstance(param, click.Option) or param.hidden or param is help_option:
            continue
        record = param.get_help_record(ctx)
        if record is None:
            continue
        term, help_text = record
        help_text = " ".join(help_text.split())
        envvar = param.envvar if isinstance(param.envvar, str) else None
        if envvar and envvar not in help_text:
            help_text += f" Environment: {envvar}."
        lines += roff.tagged(term, help_text, code=True)
    return lines


def _synopsis(path: tuple[str, ...], command: click.Command, ctx: click.Context) -> list[str]:
    pieces = " ".join(command.collect_usage_pieces(ctx))
    words = " ".join(path)
    globals_ = " [\\fIGLOBAL OPTIONS\\fR]" if path else ""
    subject = f" \\fB{roff.text(words)}\\fR" if path else ""
    return [".SH SYNOPSIS", f"\\fBbuildfarm\\fR{globals_}{subject} {roff.text(pieces)}"]


def _command_list(root: click.Command, ctx: click.Context, under: tuple[str, ...]) -> list[str]:
    lines: list[str] = []
    for path, command, _ in walk(root, ctx, under):
        if path == under:
            continue
        summary = _short(command)
        lines += roff.tagged(f"buildfarm {' '.join(path)}",
                             f"{summary}. See {page_name(path)}(1).", code=True)
    return lines


def _json_section(key: str) -> list[str]:
    schema = SCHEMAS[key]
    lines = [".SH JSON OUTPUT", roff.text(
        f"With --json, buildfarm {key} prints {schema.summary[0].lower()}{schema.summary[1:]}")]
    rows = describe(schema.shape)
    if rows:
        lines += roff.paragraphs("The keys (KEY[].NAME is the key NAME of each item of the "
                                 "list KEY):")
    for dotted, kind, meaning in rows:
        lines += roff.tagged(dotted, f"({kind}) {meaning}")
    return lines


def _exit_status(path: tuple[str, ...]) -> list[str]:
    lines = [".SH EXIT STATUS"]
    for code, meaning in EXIT_OVERRIDES.get(path, EXIT_STATUS):
        lines += roff.tagged(code, meaning)
    return lines


def _extra_sections(path: tuple[str, ...]) -> list[str]:
    """Sections about what a command does beyond its options, from the declared lists."""
    if path == ("run",):
        return _run_sections()
    if path == ("machines",):
        from buildfarm.machines.status import STATES

        lines = roff.section("STATES", "The STATE column of the table:")
        for state, meaning in STATES.items():
            lines += roff.tagged(state, meaning)
        return lines
    if path == ("machines", "test"):
        from buildfarm.machines.checks import CHECKS, CHECKS_FOR

        order = "; ".join(f"{store} machines: {', '.join(names)}"
                          for store, names in CHECKS_FOR.items())
        lines = roff.section(
            "CHECKS", f"The checks run in this order ({order}); a machine's first failed check "
            "ends its test, and the item pushed is deleted from the machine afterwards.")
        for name, meaning in CHECKS.items():
            lines += roff.tagged(name, meaning, code=True)
        return lines
    return []


def _run_sections() -> list[str]:
    from buildfarm.coordinator.metrics import METRICS, PATH

    lines = roff.section(
        "OUTPUT",
        "On a terminal, run shows a live view: the machines (state, slots, load, last error), "
        "the builds running and their step, the queue by system, and recent events; in colour "
        "unless NO_COLOR is set. Elsewhere, or with --no-ui, it writes one line per event, e.g. "
        "`build UUID succeeded (on MACHINE)`.", code=True)
    lines += roff.section(
        "SIGNALS",
        "SIGINT and SIGTERM stop the allocation of builds; the builds running get --grace "
        "seconds to finish, then are stopped on their machines and queued again. A second "
        "SIGINT stops them at once.",
        "SIGHUP reloads the inventory (see INVENTORY RELOAD).")
    lines += roff.section(
        "INVENTORY RELOAD",
        "On SIGHUP, and whenever the inventory file changes (its modification time or size; "
        "checked at every turn of the main loop), run reads the inventory again, without a "
        "restart. Machines added start taking builds at once. Machines removed (or disabled) "
        "finish the builds they run and take no more; when the last has ended the log says "
        "`machine NAME retired` and its connection is closed. Machines changed take their new "
        "settings; "
        "when how to reach them changed (host, port, user, keys, known hosts, transport, "
        "sessions, timeouts) they get a new connection, and the old one is closed once the "
        "builds using it end.",
        "A file that does not load (a YAML or field error) changes nothing: the old inventory "
        "stays in use, and the log says `inventory not reloaded, keeping the old one:` and why. "
        "Replace the file in one step (write a new one and rename it over the old, as most "
        "editors do), so run never reads it half written.",
        code=True)
    lines += roff.section(
        "METRICS",
        f"With --metrics ADDRESS:PORT, run serves Prometheus metrics at "
        f"http://ADDRESS:PORT{PATH} (text exposition format, from the official client library) "
        "for as long as it runs; the URL is logged at start. Counters count from the start of "
        "this run. Scraping reads the coordinator between two of its steps and never slows the "
        "builds; build counts come from the datastore at most every few seconds.")
    for spec in METRICS:
        labels = f"; labels: {', '.join(spec.labels)}" if spec.labels else ""
        lines += roff.tagged(spec.name, f"({spec.kind}{labels}) {spec.help}")
    return lines


def command_page(path: tuple[str, ...], command: click.Command, ctx: click.Context,
                 everything: tuple[tuple[str, ...], ...] = ()) -> Page:
    """The page of one command; buildfarm(1) (the empty path) also lists `everything`."""
    name = page_name(path)
    out = roff.header(name, 1, __version__, SOURCE)
    out += [".SH NAME", f"{roff.text(name)} \\- {roff.text(_short(command))}"]
    out += _synopsis(path, command, ctx)
    out += roff.section("DESCRIPTION", *_help_paragraphs(command), code=True)
    if path:
        out += roff.paragraphs("The global options (--db, --inventory, --hooks-dir, "
                               "--state-dir) come before the command: see buildfarm(1).")
    options = _options(command, ctx)
    if options:
        out += [".SH OPTIONS", *options]
    if not path:
        out += main_page_sections(command, ctx)
    elif isinstance(command, click.Group):
        out += [".SH COMMANDS", *_command_list(command, ctx, path)]
    key = " ".join(path)
    if key in SCHEMAS and has_json(command):
        out += _json_section(key)
    out += _extra_sections(path)
    out += _exit_status(path)
    if not path:
        related = [(page_name(p), 1) for p in everything if p]
        related += [("buildfarm-inventory", 5), ("buildfarm-hooks", 7), ("buildfarm-web", 7)]
    else:
        related = [("buildfarm", 1)]
        if len(path) > 1:
            related.append((page_name(path[:-1]), 1))
        if path[0] in ("run", "machines"):
            related.append(("buildfarm-inventory", 5))
        if path[0] in ("run", "hooks", "submit"):
            related.append(("buildfarm-hooks", 7))
        if path[0] == "web":
            related.append(("buildfarm-web", 7))
    return Page(name, 1, "\n".join(out + roff.see_also(related)) + "\n")


def main_page_sections(root: click.Command, ctx: click.Context) -> list[str]:
    """What only buildfarm(1) has: every command, environment, files, output, completion."""
    out = [".SH COMMANDS", *_command_list(root, ctx, ())]
    out += [".SH ENVIRONMENT"]
    for param in root.params:
        if isinstance(param, click.Option) and isinstance(param.envvar, str):
            out += roff.tagged(param.envvar, f"The default of {param.opts[0]}.")
    for variable, meaning in MORE_ENVIRONMENT:
        out += roff.tagged(variable, meaning)
    out += [".SH FILES"]
    for path, meaning in FILES:
        out += roff.tagged(path, meaning)
    out += roff.section("OUTPUT", *OUTPUT)
    out += roff.section("SHELL COMPLETION", *COMPLETION) + roff.example(*COMPLETION_LINES)
    out += roff.paragraphs(
        "Writing the script to a file once (e.g. `_BUILDFARM_COMPLETE=bash_source buildfarm > "
        "~/.buildfarm-complete.bash`) and sourcing that file makes shells start faster.")
    return out


def pages(root: click.Command) -> list[Page]:
    """buildfarm(1) first, then a page per command, depth first in the order of --help."""
    found = list(walk(root, click.Context(root, info_name="buildfarm", **root.context_settings)))
    everything = tuple(path for path, _, _ in found)
    return [command_page(path, command, ctx, everything) for path, command, ctx in found]
