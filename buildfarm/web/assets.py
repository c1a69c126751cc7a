"""The stylesheet and the script, served from /static/ (kept here, not as data files, so an
installed buildfarm always has them).

The pages work without the script; it only adds live updates: parts of a page marked data-live
are fetched again when /events reports something (and every few seconds, for steps and elapsed
times), counters marked data-since tick, and a running build's log grows from its stream.
"""

from __future__ import annotations

import hashlib

STYLE = """\
:root { --fg: #1d232a; --muted: #5b6672; --line: #d8dee4; --bg: #ffffff; --panel: #f6f8fa;
  --ok: #1a7f37; --bad: #cf222e; --run: #0969da; --wait: #9a6700; --off: #6e7781; }
* { box-sizing: border-box; }
body { margin: 0; font: 14px/1.45 system-ui, -apple-system, "Segoe UI", sans-serif;
  color: var(--fg); background: var(--bg); }
header { display: flex; gap: 2rem; align-items: baseline; padding: .6rem 1.2rem;
  border-bottom: 1px solid var(--line); background: var(--panel); }
header .brand { font-weight: 700; font-size: 1.1rem; color: var(--fg); text-decoration: none; }
header nav a { margin-right: 1rem; color: var(--muted); text-decoration: none; }
header nav a[aria-current=page] { color: var(--fg); font-weight: 600; }
main { padding: 1rem 1.2rem 3rem; max-width: 1400px; }
h1 { font-size: 1.35rem; margin: .2rem 0 .8rem; word-break: break-all; }
h1.path { font-size: 1.35rem; }
h2 { font-size: 1.05rem; margin: 1.6rem 0 .5rem; }
a { color: var(--run); }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .3rem .6rem .3rem 0; border-bottom: 1px solid var(--line);
  vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: .85rem; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.path { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: .85rem;
  word-break: break-all; }
.muted { color: var(--muted); }
.grid { display: grid; grid-template-columns: repeat(auto-fit, minmax(420px, 1fr));
  gap: 0 2.5rem; }
.state { display: inline-block; padding: 0 .45rem; border-radius: 1rem; font-size: .8rem;
  font-weight: 600; color: #fff; background: var(--off); white-space: nowrap; }
.state-succeeded, .state-success, .state-idle { background: var(--ok); }
.state-failed, .state-failure, .state-offline { background: var(--bad); }
.state-running, .state-busy, .state-building { background: var(--run); }
.state-queued, .state-setup-failure, .state-backing-off { background: var(--wait); }
.state-canceled, .state-interrupted, .state-disabled, .state-retired { background: var(--off); }
.slots { display: inline-flex; gap: 2px; vertical-align: middle; }
.slot { width: .7rem; height: .7rem; border-radius: 2px; background: var(--line); }
.slot.busy { background: var(--run); }
dl.fields { display: grid; grid-template-columns: max-content 1fr; gap: .25rem 1rem;
  margin: 0; }
dl.fields dt { color: var(--muted); }
dl.fields dd { margin: 0; word-break: break-all; }
form.filters { display: flex; flex-wrap: wrap; gap: .6rem; align-items: end;
  margin-bottom: 1rem; padding: .6rem; background: var(--panel); border-radius: 6px; }
form.filters label { display: flex; flex-direction: column; font-size: .8rem;
  color: var(--muted); }
form.filters input, form.filters select { font: inherit; padding: .25rem .4rem; }
.pager { display: flex; gap: 1.2rem; margin: .8rem 0; }
.tag { display: inline-block; margin: 0 .3rem .1rem 0; padding: 0 .35rem; border-radius: 3px;
  background: var(--panel); border: 1px solid var(--line); font-size: .8rem;
  text-decoration: none; color: var(--fg); word-break: break-all; }
pre.log { background: #0d1117; color: #e6edf3; padding: .8rem; border-radius: 6px;
  max-height: 36rem; overflow: auto; font-size: .8rem; white-space: pre-wrap;
  word-break: break-all; }
svg.chart { width: 100%; max-width: 720px; height: auto; display: block; }
svg.chart .ok { fill: var(--ok); }
svg.chart .bad { fill: var(--bad); }
svg.chart .axis { stroke: var(--line); }
svg.chart text { font-size: 7px; fill: var(--muted); }
.notice { padding: .5rem .8rem; background: #fff8c5; border: 1px solid #d4a72c;
  border-radius: 6px; margin: .6rem 0; }
.live { font-size: .8rem; color: var(--muted); }
"""

SCRIPT = """\
'use strict';
// Progressive enhancement only: every page is complete without this script.
(function () {
  function pad(n) { return n < 10 ? '0' + n : '' + n; }
  function duration(seconds) {
    seconds = Math.max(0, Math.floor(seconds));
    var h = Math.floor(seconds / 3600), m = Math.floor(seconds / 60) % 60, s = seconds % 60;
    return h ? h + 'h' + pad(m) + 'm' : m ? m + 'm' + pad(s) + 's' : s + 's';
  }
  function tick() {
    var now = Date.now() / 1000;
    document.querySelectorAll('[data-since]').forEach(function (el) {
      el.textContent = duration(now - parseFloat(el.getAttribute('data-since')));
    });
  }

  // Parts of the page marked data-live are fetched again and swapped in.
  var pending = null, fetching = false;
  function refresh() {
    pending = null;
    if (fetching) { schedule(400); return; }
    fetching = true;
    fetch(location.href, { headers: { 'Accept': 'text/html' }, cache: 'no-store' })
      .then(function (r) { return r.ok ? r.text() : Promise.reject(r.status); })
      .then(function (text) {
        var fresh = new DOMParser().parseFromString(text, 'text/html');
        // A live part is replaced by its new version, which may no longer be live (a log
        // section that now follows its stream).
        document.querySelectorAll('[data-live][id]').forEach(function (old) {
          var el = fresh.getElementById(old.id);
          if (el) { old.replaceWith(document.importNode(el, true)); }
        });
        followLogs();
        tick();
        document.documentElement.setAttribute('data-refreshed', String(Date.now()));
      })
      .catch(function () {})
      .then(function () { fetching = false; });
  }
  function schedule(delay) {
    if (pending === null) { pending = setTimeout(refresh, delay); }
  }

  function followEvents(main) {
    if (!window.EventSource) { return; }
    var source = new EventSource('/events');
    var names = ['build-submitted', 'build-started', 'build-success', 'build-failure',
                 'build-missing-inputs', 'build-canceled'];
    names.forEach(function (name) {
      source.addEventListener(name, function () { schedule(250); });
    });
    var every = parseFloat(main.getAttribute('data-refresh')) || 5;
    setInterval(function () { if (!document.hidden) { schedule(0); } }, every * 1000);
  }

  // A running build's log: the page has the tail so far, the stream sends what follows.
  function followLogs() {
    document.querySelectorAll('pre[data-log-stream]:not([data-following])').forEach(followLog);
  }
  function followLog(pre) {
    if (!window.EventSource) { return; }
    pre.setAttribute('data-following', 'true');
    var url = pre.getAttribute('data-log-stream') + '?offset=' +
      encodeURIComponent(pre.getAttribute('data-offset') || '0');
    var source = new EventSource(url);
    source.addEventListener('chunk', function (e) {
      var atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 24;
      pre.appendChild(document.createTextNode(JSON.parse(e.data)));
      pre.setAttribute('data-offset', e.lastEventId);
      if (atBottom) { pre.scrollTop = pre.scrollHeight; }
    });
    source.addEventListener('end', function () {
      source.close();
      pre.setAttribute('data-ended', 'true');
    });
  }

  document.addEventListener('DOMContentLoaded', function () {
    var main = document.getElementById('main');
    tick();
    setInterval(tick, 1000);
    if (main && main.hasAttribute('data-refresh')) { followEvents(main); }
    followLogs();
    document.querySelectorAll('pre.log').forEach(function (pre) {
      pre.scrollTop = pre.scrollHeight;
    });
  });
})();
"""


def etag(text: str) -> str:
    return '"' + hashlib.sha256(text.encode()).hexdigest()[:16] + '"'


ASSETS: dict[str, tuple[str, str]] = {
    "style.css": ("text/css", STYLE),
    "app.js": ("text/javascript", SCRIPT),
}
