#!/usr/bin/env bash
# Routy quick start: everything on this machine, nothing installed (but missing packages).
#
# Builds the relays, makes a private CA and certificates, starts a throwaway PostgreSQL
# on a free loopback port, puts relay-inner next to it and relay-outer in front of it,
# queries the database through the tunnel, shows the change stream (CDC) of table `demo`
# arriving through the tunnel in a target database (`cloud`, standing in for a cloud
# PostgreSQL), as JSON lines (`relay-outer cdc tail`) and as Server-Sent Events from the
# consumer endpoint (with curl, when installed), lists the sinks (`relay-outer cdc sinks`),
# and checks both relays' admin
# endpoints (/readyz). Then it waits for Ctrl-C and removes everything it made.
#
# Environment:
#   ROUTY_QUICKSTART_DIR   work directory to use (must be empty or not exist);
#                          default: a new temporary directory
#   ROUTY_KEEP=1           keep the work directory (configs, certificates, logs) at the end
#   ROUTY_QUICKSTART_ONCE=1  run the query through the tunnel, check /readyz on both
#                          relays, clean up and exit 0 (no waiting for Ctrl-C; used by
#                          tests and CI)
#   ROUTY_QUICKSTART_PROFILE=dev  build and run the debug binaries instead of release ones
#                          (CI: `tests/run` has built them already)
#   ROUTY_PG_BIN_DIR       PostgreSQL bin directory; default: the highest
#                          /usr/lib/postgresql/*/bin
#   RUST_LOG               log filter for both relays (default: info)
#
# Run as root, PostgreSQL runs as the `postgres` user (via runuser); otherwise as you.
# Missing packages (PostgreSQL, util-linux) are installed when run as root with apt-get, or
# named with the command that installs them (tests/install-deps --quickstart).

# The functions called from the EXIT trap look unreachable to shellcheck.
# shellcheck disable=SC2317
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
ONCE=${ROUTY_QUICKSTART_ONCE:-0}
KEEP=${ROUTY_KEEP:-0}

say() { printf '==> %s\n' "$*"; }
die() {
    printf 'quickstart: %s\n' "$*" >&2
    exit 1
}

# --- state that cleanup() looks at -------------------------------------------------------
WORK=""
WORK_CREATED=0
PGDATA_DIR=""
OUTER_PID=""
INNER_PID=""
CLEANED=0
STOP_FAILED=0

is_root() { [ "$(id -u)" -eq 0 ]; }

# Runs a PostgreSQL program as `postgres` when we are root (exactly like tests/src/pg.rs).
as_pg() {
    if is_root; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

tail_log() {
    local f=$1
    if [ -f "$f" ]; then
        printf -- '----- last lines of %s -----\n' "$f" >&2
        tail -n 40 "$f" >&2 || true
        printf -- '----- end of %s -----\n' "$f" >&2
    fi
}

# Sends SIGTERM to a relay, waits for it to finish (its shutdown_grace is 5s below), then
# SIGKILLs it if it is still there. Records a non-zero exit status.
stop_relay() {
    local name=$1 pid=$2 status=0
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null || true
        local _
        for _ in $(seq 1 150); do
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            printf 'quickstart: %s did not exit within 15 s of SIGTERM; killing it\n' "$name" >&2
            kill -KILL "$pid" 2>/dev/null || true
            STOP_FAILED=1
        fi
    fi
    wait "$pid" 2>/dev/null || status=$?
    if [ "$status" -ne 0 ]; then
        printf 'quickstart: %s exited with status %s\n' "$name" "$status" >&2
        tail_log "$WORK/$name.log"
        STOP_FAILED=1
    fi
}

cleanup() {
    local rc=$?
    [ "$CLEANED" -eq 1 ] && return
    CLEANED=1
    trap '' INT TERM
    stop_relay relay-inner "$INNER_PID"
    stop_relay relay-outer "$OUTER_PID"
    if [ -n "$PGDATA_DIR" ] && [ -f "$PGDATA_DIR/postmaster.pid" ]; then
        as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m immediate -w -t 60 stop >/dev/null 2>&1 ||
            printf 'quickstart: pg_ctl stop failed (data directory %s)\n' "$PGDATA_DIR" >&2
    fi
    if [ -n "$WORK" ] && [ -d "$WORK" ]; then
        if [ "$KEEP" = 1 ]; then
            say "kept $WORK (configs, certificates, logs, PostgreSQL data)"
        elif [ "$WORK_CREATED" -eq 1 ]; then
            rm -rf -- "$WORK"
        else
            # A directory the caller gave us: it was empty, so remove only what we put there.
            find "$WORK" -mindepth 1 -delete
        fi
    fi
    # In once mode a relay that does not exit cleanly on SIGTERM is a failure.
    if [ "$rc" -eq 0 ] && [ "$ONCE" = 1 ] && [ "$STOP_FAILED" -eq 1 ]; then
        rc=1
    fi
    exit "$rc"
}
trap cleanup EXIT
trap 'echo; say "stopping"; exit 0' INT TERM

# --- prerequisites -------------------------------------------------------------------------
command -v cargo >/dev/null || die "cargo not found (install Rust: https://rustup.rs)"
# PostgreSQL (unless ROUTY_PG_BIN_DIR names one) and util-linux: tests/install-deps installs
# what is missing when we are root, and otherwise stops us with one line naming it.
"$ROOT/tests/install-deps" --quickstart || exit 1
if is_root; then
    id postgres >/dev/null 2>&1 || die "no 'postgres' user (install the postgresql package)"
fi

if [ -n "${ROUTY_PG_BIN_DIR:-}" ]; then
    PGBIN=$ROUTY_PG_BIN_DIR
else
    # The highest version with a server (as tests/src/pg.rs picks it).
    PGBIN=$(find /usr/lib/postgresql -mindepth 3 -maxdepth 3 -path '*/bin/postgres' \
        2>/dev/null | sort -V | tail -n 1)
    PGBIN=${PGBIN%/postgres}
fi
if [ -z "$PGBIN" ] || [ ! -x "$PGBIN/postgres" ]; then
    die "no PostgreSQL found under /usr/lib/postgresql/*/bin (install postgresql or set ROUTY_PG_BIN_DIR)"
fi

# --- build ---------------------------------------------------------------------------------
PROFILE_DIR=release
PROFILE_ARGS=(--release)
if [ "${ROUTY_QUICKSTART_PROFILE:-release}" = dev ]; then
    PROFILE_DIR=debug
    PROFILE_ARGS=()
fi
say "building relay-outer and relay-inner (cargo build ${PROFILE_ARGS[*]} --bins)"
cd "$ROOT"
cargo build "${PROFILE_ARGS[@]}" --bins --quiet
TARGET=${CARGO_TARGET_DIR:-target}
case $TARGET in /*) ;; *) TARGET=$ROOT/$TARGET ;; esac
OUTER_BIN=$TARGET/$PROFILE_DIR/relay-outer
INNER_BIN=$TARGET/$PROFILE_DIR/relay-inner
if [ ! -x "$OUTER_BIN" ] || [ ! -x "$INNER_BIN" ]; then
    die "binaries not found in $TARGET/$PROFILE_DIR"
fi

# --- work directory ------------------------------------------------------------------------
if [ -n "${ROUTY_QUICKSTART_DIR:-}" ]; then
    if [ -e "$ROUTY_QUICKSTART_DIR" ]; then
        [ -d "$ROUTY_QUICKSTART_DIR" ] || die "$ROUTY_QUICKSTART_DIR is not a directory"
        [ -z "$(ls -A "$ROUTY_QUICKSTART_DIR")" ] || die "$ROUTY_QUICKSTART_DIR is not empty"
        WORK=$(cd "$ROUTY_QUICKSTART_DIR" && pwd)
    else
        mkdir -p "$ROUTY_QUICKSTART_DIR"
        WORK=$(cd "$ROUTY_QUICKSTART_DIR" && pwd)
        WORK_CREATED=1
    fi
else
    WORK=$(mktemp -d "${TMPDIR:-/tmp}/routy-quickstart.XXXXXX")
    WORK_CREATED=1
fi
# PostgreSQL (the postgres user, when we are root) must be able to reach $WORK/pg.
[ "$WORK_CREATED" -eq 0 ] || chmod 0711 "$WORK"
say "work directory: $WORK"

# --- free ports ----------------------------------------------------------------------------
# Five distinct loopback ports that were free just now: PostgreSQL, the tunnel, the
# listener, relay-outer's admin endpoint, relay-inner's admin endpoint.
free_ports() {
    local n=6
    if command -v python3 >/dev/null; then
        python3 -c '
import socket, sys
socks = []
for _ in range(int(sys.argv[1])):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    socks.append(s)
print(" ".join(str(s.getsockname()[1]) for s in socks))
' "$n"
        return
    fi
    # No python3: try random high ports until nothing answers on enough of them.
    local ports=() p
    while [ "${#ports[@]}" -lt "$n" ]; do
        p=$((20000 + RANDOM % 30000))
        case " ${ports[*]} " in *" $p "*) continue ;; esac
        if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
            ports+=("$p")
        fi
    done
    echo "${ports[*]}"
}
read -r PG_PORT TUNNEL_PORT LISTEN_PORT OUTER_ADMIN_PORT INNER_ADMIN_PORT CONSUMER_PORT < <(free_ports)

# --- certificates --------------------------------------------------------------------------
say "making a CA, relay-outer's certificate and the client certificate of tunnel site-a"
"$OUTER_BIN" certs init --dir "$WORK/pki" --server-name localhost --server-name 127.0.0.1 >/dev/null
"$OUTER_BIN" certs issue --dir "$WORK/pki" --tunnel site-a >/dev/null

# --- PostgreSQL ----------------------------------------------------------------------------
say "starting PostgreSQL ($PGBIN) on 127.0.0.1:$PG_PORT"
PGROOT=$WORK/pg
mkdir -p "$PGROOT/sock"
if is_root; then
    chown postgres:postgres "$PGROOT" "$PGROOT/sock"
fi
as_pg test -w "$PGROOT" ||
    die "PostgreSQL cannot write to $PGROOT (the postgres user needs to traverse every parent directory; pick another ROUTY_QUICKSTART_DIR)"
as_pg "$PGBIN/initdb" -D "$PGROOT/data" -A trust -U postgres -E UTF8 --locale=C --no-sync \
    >"$PGROOT/initdb.log" 2>&1 || {
    tail_log "$PGROOT/initdb.log"
    die "initdb failed"
}
PGDATA_DIR=$PGROOT/data
cat >>"$PGDATA_DIR/postgresql.conf" <<EOF

# routy quickstart
listen_addresses = '127.0.0.1'
port = $PG_PORT
unix_socket_directories = '$PGROOT/sock'
wal_level = logical            # for change data capture
max_wal_senders = 10
max_replication_slots = 10
fsync = off                    # a throwaway cluster
EOF
cat >"$PGDATA_DIR/pg_hba.conf" <<EOF
local all all trust
local replication all trust
host all all 127.0.0.1/32 trust
host replication all 127.0.0.1/32 trust
host all all ::1/128 trust
host replication all ::1/128 trust
EOF
# setsid: a Ctrl-C in this terminal is for this script, which stops the server itself.
if ! as_pg setsid -w "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$PGROOT/postgres.log" -w -t 120 start \
    >"$PGROOT/pg_ctl.log" 2>&1; then
    tail_log "$PGROOT/pg_ctl.log"
    tail_log "$PGROOT/postgres.log"
    die "PostgreSQL did not start"
fi

psql_at() { # port sql [psql options...]
    local port=$1 sql=$2
    shift 2
    PGCONNECT_TIMEOUT=5 "$PGBIN/psql" -X -q -v ON_ERROR_STOP=1 -h 127.0.0.1 -p "$port" \
        -U postgres -d postgres "$@" -c "$sql"
}

psql_at "$PG_PORT" "
CREATE TABLE demo (id int PRIMARY KEY, name text NOT NULL, created timestamptz NOT NULL DEFAULT now());
INSERT INTO demo (id, name) VALUES (1, 'alpha'), (2, 'bravo'), (3, 'charlie'), (4, 'delta'), (5, 'echo');
" >/dev/null
psql_at "$PG_PORT" "CREATE DATABASE cloud" >/dev/null

# --- relay configs -------------------------------------------------------------------------
# Relative paths in a config file are resolved against the directory of that file.
cat >"$WORK/relay-outer.yaml" <<EOF
# relay-outer for the quick start: tunnel port and listener on loopback only.
tunnel:
  listen: "127.0.0.1:$TUNNEL_PORT"
  tls: { cert: pki/outer.crt, key: pki/outer.key, client_ca: pki/ca.crt }
listeners:
  - name: demo-pg
    bind: "127.0.0.1:$LISTEN_PORT"
    tunnel: site-a          # the CN of relay-inner's client certificate (pki/site-a.crt)
    service: demo-pg        # a service listed in relay-inner.yaml
admin:
  listen: "127.0.0.1:$OUTER_ADMIN_PORT"   # /metrics /healthz /readyz /status
shutdown_grace: 5s
cdc:
  dir: cdc-store            # the change log received from relay-inner, per source
  retention: 24h
  sinks:
    - name: cloud
      source: site-a/demo   # tunnel/source
      postgres: { dsn: "host=127.0.0.1 port=$PG_PORT user=postgres dbname=cloud", create_tables: true }
  consumers:                # Server-Sent Events and JSON pages for microservices
    listen: "127.0.0.1:$CONSUMER_PORT"
    tokens: [{ name: demo, token_file: consumer.token, sources: [site-a/demo] }]
EOF
TOKEN=$(head -c 24 /dev/urandom | od -An -tx1 | tr -d ' \n')
printf '%s\n' "$TOKEN" >"$WORK/consumer.token"
chmod 600 "$WORK/consumer.token"
cat >"$WORK/relay-inner.yaml" <<EOF
# relay-inner for the quick start: dials relay-outer, exposes the throwaway PostgreSQL.
node: quickstart
outer:
  - { addr: "127.0.0.1:$TUNNEL_PORT", server_name: localhost }
tls: { cert: pki/site-a.crt, key: pki/site-a.key, ca: pki/ca.crt }
reconnect: { initial: 100ms, max: 2s }
services:
  demo-pg: { target: "127.0.0.1:$PG_PORT" }
admin:
  listen: "127.0.0.1:$INNER_ADMIN_PORT"   # /metrics /healthz /readyz /status
shutdown_grace: 5s
cdc:
  spool: { dir: spool, max_bytes: 1GiB }
  sources:
    - name: demo
      postgres:
        dsn: "host=127.0.0.1 port=$PG_PORT user=postgres dbname=postgres"
        tables: [public.demo]     # slot and publication routy_demo are created
      heartbeat: 10s
EOF

say "checking the configs"
"$OUTER_BIN" check-config --config "$WORK/relay-outer.yaml"
"$INNER_BIN" check-config --config "$WORK/relay-inner.yaml"

# --- relays --------------------------------------------------------------------------------
export RUST_LOG=${RUST_LOG:-info}
say "starting relay-outer (tunnel 127.0.0.1:$TUNNEL_PORT, listener 127.0.0.1:$LISTEN_PORT, admin 127.0.0.1:$OUTER_ADMIN_PORT)"
setsid "$OUTER_BIN" run --config "$WORK/relay-outer.yaml" </dev/null >"$WORK/relay-outer.log" 2>&1 &
OUTER_PID=$!
say "starting relay-inner (admin 127.0.0.1:$INNER_ADMIN_PORT)"
setsid "$INNER_BIN" run --config "$WORK/relay-inner.yaml" </dev/null >"$WORK/relay-inner.log" 2>&1 &
INNER_PID=$!

# Whether both relays still run; if one has exited, says so with its status and log.
relays_alive() {
    local name pid status
    for name in relay-outer relay-inner; do
        if [ "$name" = relay-outer ]; then pid=$OUTER_PID; else pid=$INNER_PID; fi
        if [ -n "$pid" ] && ! kill -0 "$pid" 2>/dev/null; then
            status=0
            wait "$pid" 2>/dev/null || status=$?
            printf 'quickstart: %s exited unexpectedly (status %s)\n' "$name" "$status" >&2
            tail_log "$WORK/$name.log"
            if [ "$name" = relay-outer ]; then OUTER_PID=""; else INNER_PID=""; fi
            return 1
        fi
    done
}

say "waiting for the tunnel (psql through the listener, up to 20 s)"
deadline=$((SECONDS + 20))
until psql_at "$LISTEN_PORT" "SELECT 1" -A -t >/dev/null 2>"$WORK/psql.err"; do
    relays_alive || exit 1
    if [ "$SECONDS" -ge "$deadline" ]; then
        printf 'quickstart: no answer through the listener 127.0.0.1:%s within 20 s; last psql error:\n' \
            "$LISTEN_PORT" >&2
        cat "$WORK/psql.err" >&2
        tail_log "$WORK/relay-outer.log"
        tail_log "$WORK/relay-inner.log"
        exit 1
    fi
    sleep 0.2
done
rm -f "$WORK/psql.err"

say "a query through the tunnel (client -> relay-outer :$LISTEN_PORT => relay-inner -> PostgreSQL :$PG_PORT):"
psql_at "$LISTEN_PORT" "SELECT inet_server_addr(), current_database(), count(*) FROM demo"

# The HTTP status of GET http://127.0.0.1:PORT/PATH, or 000 if there is no answer; with
# curl, or bash's /dev/tcp when curl is not installed.
http_status() { # port path
    local port=$1 path=$2
    if command -v curl >/dev/null; then
        curl -s -o /dev/null -m 5 -w '%{http_code}' "http://127.0.0.1:$port$path" || true
        return
    fi
    (
        exec 3<>"/dev/tcp/127.0.0.1/$port" || exit 0
        printf 'GET %s HTTP/1.0\r\nHost: 127.0.0.1:%s\r\n\r\n' "$path" "$port" >&3
        IFS=' ' read -r -t 5 _ code _ <&3 || exit 0
        printf '%s' "$code"
    ) 2>/dev/null | grep -E '^[0-9]{3}$' || echo 000
}

say "checking the admin endpoints (/readyz on both relays, up to 10 s)"
for admin in "relay-outer $OUTER_ADMIN_PORT" "relay-inner $INNER_ADMIN_PORT"; do
    read -r name port <<<"$admin"
    deadline=$((SECONDS + 10))
    until [ "$(http_status "$port" /readyz)" = 200 ]; do
        relays_alive || exit 1
        if [ "$SECONDS" -ge "$deadline" ]; then
            printf 'quickstart: %s: http://127.0.0.1:%s/readyz did not answer 200 within 10 s (last: %s)\n' \
                "$name" "$port" "$(http_status "$port" /readyz)" >&2
            tail_log "$WORK/$name.log"
            exit 1
        fi
        sleep 0.2
    done
    say "$name ready: http://127.0.0.1:$port/readyz answers 200"
done

say "change data capture: the initial copy of demo, then live changes, through the tunnel"
psql_at "$PG_PORT" "
INSERT INTO demo (id, name) VALUES (6, 'foxtrot'), (7, 'golf ✓');
UPDATE demo SET name = 'BRAVO' WHERE id = 2;
DELETE FROM demo WHERE id = 5;
" >/dev/null
deadline=$((SECONDS + 60))
want=$(psql_at "$PG_PORT" "SELECT md5(string_agg(d::text, ',' ORDER BY id)) FROM demo d" -A -t)
until [ "$(psql_at "$PG_PORT" "SELECT md5(string_agg(d::text, ',' ORDER BY id)) FROM demo d" -A -t -d cloud 2>/dev/null)" = "$want" ]; do
    relays_alive || exit 1
    if [ "$SECONDS" -ge "$deadline" ]; then
        printf 'quickstart: the target database did not catch up with the source within 60 s\n' >&2
        tail_log "$WORK/relay-inner.log"
        tail_log "$WORK/relay-outer.log"
        exit 1
    fi
    sleep 0.2
done
say "the target database 'cloud' now holds the same rows (applied by relay-outer's sink):"
psql_at "$PG_PORT" "SELECT * FROM demo ORDER BY id" -d cloud
say "the change stream as relay-outer stored it (relay-outer cdc tail --source site-a/demo):"
"$OUTER_BIN" cdc tail --config "$WORK/relay-outer.yaml" --source site-a/demo | tail -n 8
say "the sinks of the running relay-outer (relay-outer cdc sinks):"
"$OUTER_BIN" cdc sinks --config "$WORK/relay-outer.yaml"
if command -v curl >/dev/null; then
    say "the same stream as Server-Sent Events from the consumer endpoint (first events):"
    { curl -sN -m 3 -H "Authorization: Bearer $TOKEN" \
        "http://127.0.0.1:$CONSUMER_PORT/v1/sources/site-a/demo/events?from=1" || true; } |
        grep -m 6 '^data:' || true
else
    say "curl is not installed: skipping the Server-Sent Events example"
fi

if [ "$ONCE" = 1 ]; then
    say "ROUTY_QUICKSTART_ONCE=1: cleaning up"
    exit 0
fi

if [ "$KEEP" = 1 ]; then
    AT_END="the work directory is kept (ROUTY_KEEP=1)"
else
    AT_END="$WORK is removed (set ROUTY_KEEP=1 to keep it)"
fi
cat <<EOF

Routy is running.

  Connect through the tunnel:
    psql "host=127.0.0.1 port=$LISTEN_PORT user=postgres dbname=postgres"
  PostgreSQL itself listens on 127.0.0.1:$PG_PORT, relay-outer's tunnel port is 127.0.0.1:$TUNNEL_PORT.

  Change data capture: write to table demo (port $PG_PORT, database postgres) and watch
  it arrive in database cloud, or follow the stream:
    $OUTER_BIN cdc tail --config $WORK/relay-outer.yaml --source site-a/demo --follow
  or read it as a microservice would, as Server-Sent Events (resume with Last-Event-ID):
    curl -N -H "Authorization: Bearer $TOKEN" http://127.0.0.1:$CONSUMER_PORT/v1/sources/site-a/demo/events
  and see the sinks: $OUTER_BIN cdc sinks --config $WORK/relay-outer.yaml

  The console, a live page of tunnels, listeners, CDC sources and sinks (open it in a
  browser on this machine; the admin endpoints listen on loopback, so need no token):
    http://127.0.0.1:$OUTER_ADMIN_PORT/     relay-outer
    http://127.0.0.1:$INNER_ADMIN_PORT/     relay-inner

  Admin endpoints (/metrics /healthz /readyz /status):
    curl http://127.0.0.1:$OUTER_ADMIN_PORT/status     # relay-outer: sessions, listeners
    curl http://127.0.0.1:$INNER_ADMIN_PORT/status     # relay-inner: its relay-outer endpoints
    curl http://127.0.0.1:$OUTER_ADMIN_PORT/metrics    # Prometheus metrics

  Configs:       $WORK/relay-outer.yaml
                 $WORK/relay-inner.yaml
  Certificates:  $WORK/pki
  Logs:          $WORK/relay-outer.log
                 $WORK/relay-inner.log
                 $PGROOT/postgres.log

  To apply an edited config without a restart: kill -HUP $OUTER_PID (relay-outer)
  or kill -HUP $INNER_PID (relay-inner); the log says whether it was applied.

  To see what a client gets while the tunnel is down, stop relay-inner (kill $INNER_PID)
  and connect again: relay-outer's listener closes the connection at once.

Press Ctrl-C to stop the relays and PostgreSQL; then $AT_END.
EOF

# Keep going until Ctrl-C even if a relay exits (e.g. you stopped relay-inner to see what
# a client gets while the tunnel is down): say so once, leave the rest running.
while true; do
    relays_alive || printf 'quickstart: still running the rest; Ctrl-C stops everything\n' >&2
    sleep 1
done
