"""The web API, declared once: the routes are made from ENDPOINTS, /api lists them, and the man
page buildfarm-web(7) can be generated from them (like buildfarm-hooks(7) from hooks.EVENTS).
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class Endpoint:
    """One URL: what it returns, and its query parameters (name -> meaning)."""

    name: str  # the handler's name in app.py
    method: str
    path: str
    description: str
    parameters: tuple[tuple[str, str], ...] = ()
    content_type: str = "application/json"


_LIST_PARAMETERS = (
    ("state", "Only builds in this state: queued, running, succeeded, failed or canceled."),
    ("system", "Only builds for this system, e.g. x86_64-linux."),
    ("tag", "KEY=VALUE: only builds with this tag (repeat for several; all must match)."),
    ("name", "Only builds whose derivation file name contains this text (any case)."),
    ("after", "A build's UUID: the page of the builds listed after it (older)."),
    ("before", "A build's UUID: the page of the builds listed before it (newer)."),
    ("limit", "Builds per page, 1 to 500 (default 50)."),
)

ENDPOINTS: tuple[Endpoint, ...] = (
    Endpoint(
        "overview", "GET", "/api/overview",
        "The overview: queued builds per system (queued, and ready: no input build pending), "
        "machines (state, systems, slots busy and free, last error), running attempts (build, "
        "machine, step and since when), the attempts that ended last, and per_hour: for each "
        "of the last 24 hours, the builds that ended in it by the state they ended in "
        "(succeeded, failed, canceled; each build once, from the event that ended it) and, "
        "counted apart, the attempts that ended in it (attempts, of which setup_failures and "
        "interrupted: after those the build went back to the queue).",
    ),
    Endpoint(
        "builds", "GET", "/api/builds",
        "Builds, newest first, one page at a time: builds (uuid, derivation, name, system, "
        "state, priority, tags, created_at, ended_at, reason), older and newer (the UUIDs to "
        "pass as after and before for the next and previous pages, or null), and searched and "
        "searched_to: set when the name or system filter stopped after reading a window of "
        "builds without filling the page; older then continues the search.",
        _LIST_PARAMETERS,
    ),
    Endpoint(
        "build", "GET", "/api/builds/{uuid}",
        "One build: derivation, outputs, inputs and dependants (each with the UUID and state "
        "of its newest build), tags, times, other builds of the same derivation, cause (the "
        "failed build at the bottom of the chain, for a dependency-failed build), reproducible "
        "(what a rebuild with --check found, or null), flaky (it succeeded after its builder "
        "failed) and builder_failures, machine_tags (those a machine must carry), waiting (for "
        "a queued build, the one reason it is not running: reason, summary, until, the input "
        "builds or machines it waits for; as in builds show --json), and attempts (machine, "
        "result, times, steps with durations, setup failure and missing inputs, check: "
        "identical or differs after a rebuild with --check).",
    ),
    Endpoint(
        "log", "GET", "/api/builds/{uuid}/log",
        "The build log of the newest attempt that has one, as plain text without escape "
        "sequences (so far, while it runs); 404 with the reason when there is none. Also at "
        "/builds/{uuid}/log.",
        content_type="text/plain",
    ),
    Endpoint(
        "log_stream", "GET", "/api/builds/{uuid}/log/stream",
        "The log as server-sent events while the build runs: chunk events whose data is a "
        "JSON string of text and whose id is the offset in the log after it, then one end "
        "event. Resumes after the offset in Last-Event-ID (or the offset parameter). Also at "
        "/builds/{uuid}/log/stream.",
        (("offset", "Start after this many bytes of the log."),),
        content_type="text/event-stream",
    ),
    Endpoint(
        "machines", "GET", "/api/machines",
        "Every machine of the inventory (and any other that has running attempts or a "
        "recorded state): name, state (idle, building, busy, offline, backing-off, disabled, "
        "retired), systems, features, tags, slots, busy, free, failures, last_error.",
    ),
    Endpoint(
        "machine", "GET", "/api/machines/{name}",
        "One machine: as in /api/machines, plus its newest attempts, its attempts by result "
        "(results), finished (the builds it finished: attempts that succeeded or failed), "
        "success_rate (succeeded ÷ finished; setup failures and interruptions are not held "
        "against it) and recent_success_rate over the last recent_window (up to 100) builds it "
        "finished.",
    ),
    Endpoint(
        "events", "GET", "/events",
        "Build events as server-sent events, the same events and JSON objects the hooks get "
        "(see buildfarm-hooks(7)), except that log is the log's URL path on this server "
        "(/builds/UUID/log), not a file of the coordinator: the SSE event name is the "
        "event's name, its id the event's number, its data the JSON object. A client starts "
        "with the events after it connected; with Last-Event-ID: N (which browsers send "
        "when they reconnect) or ?last_event_id=N it gets every event after N, in order, "
        "first; 0 replays them all.",
        (("last_event_id", "As the Last-Event-ID header."),),
        content_type="text/event-stream",
    ),
    Endpoint("api", "GET", "/api", "This list, as JSON."),
)

PAGES: tuple[tuple[str, str], ...] = (
    ("/", "/api/overview"),
    ("/builds", "/api/builds"),
    ("/builds/{uuid}", "/api/builds/{uuid}"),
    ("/machines", "/api/machines"),
    ("/machines/{name}", "/api/machines/{name}"),
)

# Sections of buildfarm-web(7) besides the list of endpoints: (title, paragraphs).
SECTIONS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("DESCRIPTION", (
        "buildfarm web serves read-only pages about the farm of one datastore: an overview "
        "(queue, machines, running builds, recent results, builds per hour), the builds "
        "with filters, each build and each machine. Every page is plain HTML that works "
        "without JavaScript; a small script adds live updates. Each page has a JSON twin "
        "under /api, and /events streams the build events the hooks get.",
        "It only reads the datastore, and may run beside buildfarm run, on the same machine "
        "or on any machine that reaches the datastore (for the logs, the coordinator's state "
        "directory). It listens on 127.0.0.1:8081 unless --listen says otherwise; it has no "
        "authentication of its own: to show it beyond the machine, put it behind a reverse "
        "proxy that has.",
    )),
    ("PAGES", (
        "/ (overview), /builds (filters: state, system, tag, name; pages), /builds/UUID, "
        "/builds/UUID/log, /machines, /machines/NAME, /api (the list below). In every URL, "
        "UUID may be the first 8 or more characters of a build's UUID, if no other build's "
        "starts with them.",
        "Logs, reasons and machines' messages are shown without escape sequences (colours, "
        "titles) or any other control character but newline and tab, in the pages, the log "
        "and its stream; the JSON keeps them as written.",
    )),
    ("PAGINATION", (
        "Builds are listed newest first. A page names no number but a build: after=UUID gives "
        "the builds listed after that one, before=UUID those before it, so the URL of a page "
        "keeps showing the same builds while new ones arrive. The filters on state and tag "
        "are served by indexes; the derivation name and system filters are checked build by "
        "build, at most 20,000 builds per request: a page that is not full after that many "
        "says how far it searched (searched, searched_to) and its older link continues.",
    )),
    ("THE EVENT STREAM", (
        "GET /events answers text/event-stream. Each event is sent as id: N, event: NAME and "
        "data: JSON, where N is the event's number in the datastore (BUILDFARM_EVENT_ID of the "
        "hooks), NAME one of the events of buildfarm-hooks(7) and JSON the object a hook reads "
        "on its standard input, its log the URL path /builds/UUID/log instead of a file "
        "path. Events come in the order they were recorded, each once. A "
        "client that reconnects with Last-Event-ID: N (browsers' EventSource does so by "
        "itself) gets every event after N first, then the new ones; without it, only events "
        "recorded after it connected. Comment lines keep a quiet stream open.",
    )),
    ("SECURITY", (
        "The pages never show the datastore URL, keys, or how machines are reached (host, "
        "user, port, identity, known_hosts): in a machine's last error and an attempt's "
        "detail, each is shown as (hidden). Every string from builds, tags, machines and logs "
        "is escaped; every response forbids inline scripts and styles "
        "(Content-Security-Policy), so even a string that slipped through could not run.",
    )),
)
