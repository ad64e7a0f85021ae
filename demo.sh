#!/usr/bin/env bash
# rstash demo: install rstash into a virtual environment, start a demo server on
# loopback with the shipped example configuration (config/rstash-recv.toml) and
# a "demo" box added to it, send a file into that box and show the receipt.
#
# RSTASH_DEMO_PORT: the loopback port of the demo server (default 17370).
#
# Run as root, the server runs as the unprivileged user "rstash-demo" (rstash-recv
# refuses to serve as root); run as anyone else, it runs as you. Nothing outside
# the demo's work directory and virtual environment is changed (as root: the
# demo user is created if missing, and python3-venv is installed if missing).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
port=${RSTASH_DEMO_PORT:-17370}
uid=$(id -u)

if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
    echo "demo.sh: port $port on 127.0.0.1 is busy; run: RSTASH_DEMO_PORT=<a free port> $0" >&2
    exit 1
fi

if [ "$uid" -eq 0 ]; then
    python=/usr/bin/python3
    base=/var/tmp/rstash-demo
    if ! "$python" -c 'import ensurepip, venv' 2>/dev/null; then
        apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q python3-venv
    fi
    id rstash-demo >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin rstash-demo
    svc_user=rstash-demo
else
    python=$(command -v python3)
    base=${TMPDIR:-/tmp}/rstash-demo-$(id -un)
    svc_user=$(id -un)
fi

venv=$base/venv
echo "==> installing rstash into $venv"
mkdir -p "$base"
chmod 755 "$base"
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
"$venv/bin/pip" install -q --disable-pip-version-check "$here"
export MANPATH="$venv/share/man:${MANPATH:-}"

work=$(mktemp -d "$base/run.XXXXXX")
chmod 755 "$work"
mkdir -p "$work/srv/demo" "$work/state" "$work/keys" "$work/send"
recv=$venv/bin/rstash-recv
send=$venv/bin/rstash-send

echo "==> making the demo box's key"
"$recv" --gen-key "$work/keys/demo.key" --comment "demo box"
cp "$work/keys/demo.key" "$work/send/demo.key"
chmod 600 "$work/send/demo.key"

# The shipped example, with its paths moved into the work directory.
sed -e "s|/srv/rstash|$work/srv|g" \
    -e "s|/etc/rstash/keys|$work/keys|g" \
    -e "s|/var/lib/rstash|$work/state|g" \
    -e "s|^log = .*|log = \"$work/recv.log\"|" \
    -e "s|^include = .*|include = []|" \
    "$here/config/rstash-recv.toml" > "$work/rstash-recv.toml"
# The shipped example defines no box: the demo adds its own.
cat >> "$work/rstash-recv.toml" <<BOX

[box.demo]
path = "$work/srv/demo"
keys = ["$work/keys/demo.key"]
pipe_mode = true
BOX

if [ "$uid" -eq 0 ]; then
    chown rstash-demo: "$work/srv/demo" "$work/state"
    chgrp rstash-demo "$work/keys/demo.key"
    chmod 640 "$work/keys/demo.key"
    touch "$work/recv.log" && chown rstash-demo: "$work/recv.log"
    run_svc=(setpriv --reuid=rstash-demo --regid=rstash-demo --clear-groups --)
else
    run_svc=()
fi
chmod 700 "$work/state"

echo "==> checking the configuration"
"${run_svc[@]}" "$recv" -c "$work/rstash-recv.toml" --check-config --user "$svc_user" >/dev/null || {
    "${run_svc[@]}" "$recv" -c "$work/rstash-recv.toml" --check-config --user "$svc_user"; exit 1; }

echo "==> starting rstash-recv --listen 127.0.0.1:$port as $svc_user"
"${run_svc[@]}" "$recv" -c "$work/rstash-recv.toml" --listen "127.0.0.1:$port" 2>"$work/server.stderr" &
server=$!
trap 'kill $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT
for _ in $(seq 100); do
    grep -q "outcome=listening" "$work/recv.log" 2>/dev/null && break
    kill -0 "$server" 2>/dev/null || {
        cat "$work/server.stderr" >&2
        echo "demo.sh: rstash-recv did not start on port $port; if it is busy, run: RSTASH_DEMO_PORT=<a free port> $0" >&2
        exit 1
    }
    sleep 0.1
done

echo "==> rstash-send --json rstash://127.0.0.1:$port/demo README.md"
"$send" -k "$work/send/demo.key" --json "rstash://127.0.0.1:$port/demo" "$here/README.md"

echo "==> the box now holds"
ls -l "$work/srv/demo"
echo "==> the server's log"
cat "$work/recv.log"
echo
echo "Demo files are in $work; man pages: MANPATH=$venv/share/man man rstash-send"
