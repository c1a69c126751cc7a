# A throwaway PostgreSQL server for scripts/test and benchmarks/run: sourced by both (bash),
# and again by the /bin/sh that is the first process of their PID namespace (so: POSIX sh).
#
#   pg_server_prepare DIR   outside the namespace, as root: find Debian's server programs, make
#                           a cluster in DIR (initdb as the user postgres: the server refuses
#                           root); exports BF_PG_BIN and BF_PG. Exits 2 (the caller's `say`
#                           names the problem) when there is no server or initdb fails.
#   pg_server_url DIR [DB]  the URL of database DB (default postgres) on that server.
#   pg_server_start         inside the namespace: start the server of BF_PG_BIN and BF_PG (a
#                           no-op when BF_PG_BIN is empty); returns 4, the log printed, if it
#                           does not start. Killed with the namespace whatever happens.
#   pg_server_stop          inside the namespace: stop it (fast shutdown), if started.
#
# The cluster is throwaway data: no durability (fsync, synchronous_commit and full_page_writes
# off), no TCP (listen_addresses is empty: only the Unix socket in DIR/socket), trust
# authentication, and enough connections for the tests' concurrency.

pg_server_prepare() {  # pg_server_prepare DIR
    BF_PG=$1
    BF_PG_BIN=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1 || true)
    if [ -z "$BF_PG_BIN" ] || [ ! -x "$BF_PG_BIN/pg_ctl" ]; then
        say "no PostgreSQL server programs under /usr/lib/postgresql (apt-get install postgresql)"
        exit 2
    fi
    export BF_PG BF_PG_BIN
    mkdir -m 700 "$BF_PG"
    chown postgres: "$BF_PG"
    runuser -u postgres -- mkdir -m 700 "$BF_PG/socket"
    if ! runuser -u postgres -- "$BF_PG_BIN/initdb" -D "$BF_PG/data" -U postgres --auth=trust \
        -E UTF8 --locale=C --no-sync >"$BF_PG/initdb.log" 2>&1; then
        cat "$BF_PG/initdb.log" >&2
        say "initdb failed"
        exit 2
    fi
    cat >>"$BF_PG/data/postgresql.conf" <<EOF
listen_addresses = ''
unix_socket_directories = '$BF_PG/socket'
max_connections = 200
fsync = off
synchronous_commit = off
full_page_writes = off
EOF
}

pg_server_url() {  # pg_server_url DIR [DATABASE]
    printf 'postgresql://postgres@/%s?host=%s/socket\n' "${2:-postgres}" "$1"
}

pg_server_start() {
    [ -n "${BF_PG_BIN:-}" ] || return 0
    runuser -u postgres -- "$BF_PG_BIN/pg_ctl" -D "$BF_PG/data" -l "$BF_PG/server.log" \
        -w -t 120 start >/dev/null || { cat "$BF_PG/server.log" >&2; return 4; }
}

pg_server_stop() {
    [ -n "${BF_PG_BIN:-}" ] || return 0
    runuser -u postgres -- "$BF_PG_BIN/pg_ctl" -D "$BF_PG/data" -m fast -w stop >/dev/null 2>&1
}
