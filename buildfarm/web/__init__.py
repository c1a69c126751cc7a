"""`buildfarm web`: a read-only web front end and build-event stream over the datastore.

app.py (aiohttp application, handlers, serve), queries.py and listing.py (bounded datastore
reads), pages.py and html.py (server-rendered HTML, escaped by construction), events.py (the
server-sent event stream), logview.py (log tails and live logs), assets.py (CSS and the small
script), api.py (the declared API, for /api and the man page), conceal.py (machines' errors
without how machines are reached).
"""

from __future__ import annotations

from .api import ENDPOINTS, PAGES, SECTIONS, Endpoint

__all__ = ["ENDPOINTS", "PAGES", "SECTIONS", "Endpoint"]
