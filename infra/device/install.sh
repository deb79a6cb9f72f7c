#!/usr/bin/env bash
# Install edgeship on a device as services (docs/device.md#as-a-service), as root:
#
#   infra/device/install.sh --repo-url https://ota.example.com --root root.json --target tflite-int8 [--channel stable]
#
# 1. a system user without a login shell (`edgeship`; --user), owning only the state directory;
# 2. a venv (/opt/edgeship/venv; --prefix) of the system's Python (/usr/bin/python3; --python) with
#    `edgeship[device,litert]` (--package: another spec, a wheel, a checkout "DIR[device,litert]"), at the versions
#    of --constraints FILE when given (a lock; its hashes are ignored: they are of one machine's files);
# 3. the state directory (/var/lib/edgeship; --state-dir), mode 0750, provisioned with `edgeship-device provision`
#    (the repository, the trusted root it keeps a copy of, the channel, the target, --device-id or a generated id);
# 4. the systemd units next to this script, with those paths and that user, into /etc/systemd/system (--unit-dir),
#    then `systemctl daemon-reload` and `enable --now` of serve and the update timer (the agent: --with-agent)
#    where systemd runs, unless --no-start. /etc/edgeship/device.env (--config-dir) holds the services' settings,
#    kept when it exists (see the units).
#
# Run it again to upgrade: the user, the state and device.env are kept. tests/test_device_service.py runs it.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
user=edgeship prefix=/opt/edgeship state=/var/lib/edgeship units=/etc/systemd/system config=/etc/edgeship
package="edgeship[device,litert]"
python=/usr/bin/python3 constraints="" start=1 agent=0 provision=()
usage() { sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit "${1:-2}"; }
while [ $# -gt 0 ]; do
  case $1 in
    --user) user=$2; shift ;;
    --prefix) prefix=$2; shift ;;
    --state-dir) state=$2; shift ;;
    --unit-dir) units=$2; shift ;;
    --config-dir) config=$2; shift ;;
    --package) package=$2; shift ;;
    --python) python=$2; shift ;;
    --constraints) constraints=$2; shift ;;
    --no-start) start=0 ;;
    --with-agent) agent=1 ;;
    --repo-url|--root|--target|--channel|--device-id) provision+=("$1" "$2"); shift ;;
    -h|--help) usage 0 ;;
    *) echo "install.sh: unknown option $1" >&2; usage ;;
  esac
  shift
done
fail() { echo "install.sh: $*" >&2; exit 2; }
[ "$(id -u)" = 0 ] || fail "run it as root (it creates a system user and installs systemd units)"
[ ${#provision[@]} -gt 0 ] || [ -f "$state/device.json" ] \
  || fail "give --repo-url URL --root root.json --target TARGET: the device's state directory must be provisioned"
[ -x "$python" ] || fail "$python is missing: apt-get install python3 python3-venv (3.11 or later), or give --python"
"$python" -c 'import sys, venv; sys.exit(sys.version_info < (3, 11))' \
  || fail "$python is older than 3.11 or lacks venv (apt-get install python3-venv); give --python"

if ! getent passwd "$user" >/dev/null; then
  nologin=$(command -v nologin || echo /usr/sbin/nologin)
  useradd --system --user-group --home-dir "$state" --no-create-home --shell "$nologin" "$user"
fi

[ -x "$prefix/venv/bin/python" ] || "$python" -m venv "$prefix/venv"
runuser -u "$user" -- "$prefix/venv/bin/python" -c pass 2>/dev/null \
  || fail "user $user cannot run $prefix/venv/bin/python (is $python, or a directory above it, private?): give a" \
          "system-wide --python, or a --prefix that user can read"
pins=()
if [ -n "$constraints" ]; then
  sed 's/ --hash=[^ ]*//g' "$constraints" >"$prefix/constraints.txt"
  pins=(-c "$prefix/constraints.txt")
fi
"$prefix/venv/bin/python" -m pip install -q --upgrade "pip>=25"
"$prefix/venv/bin/python" -m pip install -q --upgrade "${pins[@]}" "$package"
"$prefix/venv/bin/edgeship-device" --version

install -d -m 0750 -o "$user" -g "$user" "$state"
if [ ${#provision[@]} -gt 0 ]; then
  # as the service user, so everything it writes is its own
  runuser -u "$user" -- "$prefix/venv/bin/edgeship-device" provision --state-dir "$state" "${provision[@]}"
fi

install -d -m 0755 "$units" "$config"
# systemd creates a state directory under /var/lib itself (StateDirectory=); one elsewhere is only made writable.
case $state in
  /var/lib/*) state_lines=(-e "s|^StateDirectory=edgeship|StateDirectory=${state#/var/lib/}|") ;;
  *) state_lines=(-e "s|^StateDirectory=edgeship|ReadWritePaths=$state|" -e "/^StateDirectoryMode=/d") ;;
esac
for unit in "$here"/edgeship-*.service "$here"/edgeship-*.timer; do
  sed -e "s|/opt/edgeship/venv|$prefix/venv|g" -e "s|/var/lib/edgeship|$state|g" -e "s|/etc/edgeship|$config|g" \
      -e "s|^User=edgeship|User=$user|" -e "s|^Group=edgeship|Group=$user|" "${state_lines[@]}" \
      "$unit" >"$units/$(basename "$unit")"
done
[ -f "$config/device.env" ] || cat >"$config/device.env" <<'ENV'
# edgeship's services read this (systemd EnvironmentFile); restart them after a change.
# EDGESHIP_AGENT_TOKEN=...        # the agent's bearer token (required beyond loopback)
# EDGESHIP_AGENT_ARGS=--host 0.0.0.0 --port 8765 --tls-cert /etc/edgeship/agent.pem --tls-key /etc/edgeship/agent.key
# EDGESHIP_SERVE_ARGS=--broker mqtt.example.com:8883 --tls --fleet lab --device-class pi4
# EDGESHIP_UPDATE_ARGS=--app-confirms
ENV
chmod 0640 "$config/device.env" && chgrp "$user" "$config/device.env"

if [ "$start" = 1 ] && [ -d /run/systemd/system ]; then
  systemctl daemon-reload
  systemctl enable --now edgeship-serve.service edgeship-update.timer
  [ "$agent" = 0 ] || systemctl enable --now edgeship-agent.service
fi
echo "installed: $prefix/venv, state $state (user $user), units in $units"
