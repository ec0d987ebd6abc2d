#!/bin/bash
# Install or upgrade edgeagent on Debian 12 / Raspberry Pi OS (arm64, armhf, amd64), or remove it.
# Run as root from a checkout; safe to run again (upgrades the package, keeps your configuration).
# docs/deploy.md walks through it. Options: see usage() below or --help.
set -euo pipefail

usage() {
    cat <<'EOF'
usage: deploy/install.sh [--root DIR] [--source PATH] [--camera-lan ADDRESS] [--no-start]
                         [--lot-topic TOPIC] [--hub HOST[:PORT] [--hub-user NAME]
                          [--hub-password-file FILE] [--hub-ca FILE]]
       deploy/install.sh --uninstall [--root DIR] [--purge [--force]]

  --source PATH        the checkout or a wheel (.whl) to install (default: this checkout)
  --camera-lan ADDRESS this box's static address on the camera LAN: the lane broker listens
                       there for the cameras (kept from the last run when not given)
  --no-start           install and enable, but do not (re)start the service
  --lot-topic TOPIC    share sessions with the lot's other boxes (SPEC §11): writes [lot] topic
                       into the config and lets the agent's broker account write TOPIC/#
  --hub HOST[:PORT]    bridge TOPIC/# to the lot's hub broker (port 8883, TLS); not on the hub's
                       own box. Kept from the last run when not given, like the options below
  --hub-user NAME      this box's account on the hub (default: serial_prefix from the config)
  --hub-password-file FILE  that account's password (first line), copied to
                       /etc/edgeagent/hub.password (root:root 0600); never give it on the command line
  --hub-ca FILE        the CA certificate the hub's TLS certificate is verified against
  --root DIR           install into the staging tree DIR instead of /: no apt-get, useradd,
                       systemctl or broker reload; accounts go to DIR/etc/passwd and DIR/etc/group
  --uninstall          remove the program, the unit and the broker drop-in; keeps
                       /etc/edgeagent and the journal in /var/lib/edgeagent
  --purge              with --uninstall: also remove /etc/edgeagent, /var/lib/edgeagent, the
                       broker's edgeagent password and ACL files, the edgeagent account
                       and the edgeagent-read group
  --force              with --purge: even when the journal still holds undelivered entries
EOF
}

say() { echo "install.sh: $*"; }
die() { echo "install.sh: $*" >&2; exit 1; }

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
CHECKOUT="$(dirname "$HERE")"

ROOT=""
SOURCE=""
CAMERA_LAN=""
LOT_TOPIC=""
HUB=""
HUB_USER=""
HUB_PASSWORD_FILE=""
HUB_CA=""
START=yes
ACTION=install
PURGE=no
FORCE=no
while [ $# -gt 0 ]; do
    case "$1" in
        --root) [ $# -ge 2 ] || die "--root needs a directory"; ROOT="$2"; shift 2 ;;
        --source) [ $# -ge 2 ] || die "--source needs a path"; SOURCE="$2"; shift 2 ;;
        --camera-lan) [ $# -ge 2 ] || die "--camera-lan needs an address"; CAMERA_LAN="$2"; shift 2 ;;
        --lot-topic) [ $# -ge 2 ] || die "--lot-topic needs a topic"; LOT_TOPIC="$2"; shift 2 ;;
        --hub) [ $# -ge 2 ] || die "--hub needs HOST[:PORT]"; HUB="$2"; shift 2 ;;
        --hub-user) [ $# -ge 2 ] || die "--hub-user needs a name"; HUB_USER="$2"; shift 2 ;;
        --hub-password-file) [ $# -ge 2 ] || die "--hub-password-file needs a file"; HUB_PASSWORD_FILE="$2"; shift 2 ;;
        --hub-password) die "--hub-password is not an option: a password on the command line is visible in ps; use --hub-password-file" ;;
        --hub-ca) [ $# -ge 2 ] || die "--hub-ca needs a file"; HUB_CA="$2"; shift 2 ;;
        --no-start) START=no; shift ;;
        --uninstall) ACTION=uninstall; shift ;;
        --purge) PURGE=yes; shift ;;
        --force) FORCE=yes; shift ;;
        -h|--help) usage; exit 0 ;;
        *) usage >&2; die "unknown argument: $1" ;;
    esac
done
if [ -n "$ROOT" ]; then
    mkdir -p "$ROOT"
    ROOT="$(cd "$ROOT" && pwd)"
    [ "$ROOT" != / ] || ROOT=""
fi
[ "$PURGE" = no ] || [ "$ACTION" = uninstall ] || die "--purge goes with --uninstall"
[ -n "$ROOT" ] || [ "$(id -u)" = 0 ] || die "run as root (or with --root DIR for a staging tree)"

# Where things go (on the target; every write below is under $ROOT).
OPT=/opt/edgeagent
VENV=$OPT/venv
ETC=/etc/edgeagent
CONFIG=$ETC/edgeagent.toml
MQTT_PASSWORD=$ETC/mqtt.password
SIMULATE_PASSWORD=$ETC/simulate.password
STATE=/var/lib/edgeagent
# Who may run `edgeagent status` / `events` (issue 12): they read the config, the journal and the
# heartbeat, nothing else. Add operators to this group, not to the service's own group `edgeagent`.
READERS=edgeagent-read
UNIT=/etc/systemd/system/edgeagent.service
WANTS=/etc/systemd/system/multi-user.target.wants/edgeagent.service
BROKER_DROPIN=/etc/systemd/system/mosquitto.service.d/edgeagent.conf
BROKER_CONF=/etc/mosquitto/conf.d/edgeagent.conf
BROKER_MAIN=/etc/mosquitto/mosquitto.conf
BROKER_PASSWD=/etc/mosquitto/edgeagent.passwd
BROKER_ACL=/etc/mosquitto/edgeagent.acl
LOT_BRIDGE=/etc/mosquitto/conf.d/bridge-lot.conf
LOT_HUB_CA=/etc/mosquitto/certs/lot-hub-ca.crt
HUB_PASSWORD=$ETC/hub.password
BIN_LINK=/usr/local/bin/edgeagent
CAMERA_USER_TOOL=/usr/local/sbin/edgeagent-camera-user
PRISTINE=$OPT/share/installed   # what we last installed of files you may edit (to spot your edits)
PYTHON="${PYTHON:-/usr/bin/python3}"

r() { printf '%s%s' "$ROOT" "$1"; }

systemd_running() { [ -z "$ROOT" ] && [ -d /run/systemd/system ]; }

# -- accounts ---------------------------------------------------------------------------------------

# A free system id (999 down to 100) in a staging tree's passwd and group.
staging_free_id() {
    local id
    for ((id = 999; id >= 100; id--)); do
        if ! awk -F: -v id="$id" '$3 == id { found = 1 } END { exit !found }' "$(r /etc/passwd)" "$(r /etc/group)"; then
            echo "$id"
            return
        fi
    done
    die "no free system id in $(r /etc/passwd)"
}

staging_account() {  # NAME HOME DESCRIPTION
    local name="$1" id
    touch "$(r /etc/passwd)" "$(r /etc/group)"
    if ! grep -q "^$name:" "$(r /etc/group)"; then
        id="$(staging_free_id)"
        echo "$name:x:$id:" >> "$(r /etc/group)"
    fi
    if ! grep -q "^$name:" "$(r /etc/passwd)"; then
        id="$(awk -F: -v n="$name" '$1 == n { print $3 }' "$(r /etc/group)")"
        echo "$name:x:$id:$id:$3:$2:/usr/sbin/nologin" >> "$(r /etc/passwd)"
    fi
}

# staging_readers: the readers' group in a staging tree, with the service's user as its member.
staging_readers() {
    local id
    if ! grep -q "^$READERS:" "$(r /etc/group)"; then
        id="$(staging_free_id)"
        echo "$READERS:x:$id:edgeagent" >> "$(r /etc/group)"
    fi
}

ensure_accounts() {
    if [ -n "$ROOT" ]; then
        mkdir -p "$(r /etc)"
        staging_account edgeagent "$STATE" "edgeagent parking-gate agent"
        staging_readers
        # The mosquitto package creates this account on a real box.
        staging_account mosquitto /var/lib/mosquitto "mosquitto package (staging stand-in)"
        return
    fi
    if ! getent group edgeagent >/dev/null; then
        groupadd --system edgeagent
    fi
    if ! getent passwd edgeagent >/dev/null; then
        useradd --system --gid edgeagent --home-dir "$STATE" --no-create-home \
            --shell /usr/sbin/nologin --comment "edgeagent parking-gate agent" edgeagent
        say "created the system user edgeagent"
    fi
    if ! getent group "$READERS" >/dev/null; then
        groupadd --system "$READERS"
        say "created the group $READERS: add operators who run edgeagent status/events to it (usermod -aG $READERS pi)"
    fi
    # The unit runs the service with it (Group=); a member, so that an agent started by hand
    # (sudo -u edgeagent edgeagent run) reads its config too.
    if ! id -nG edgeagent | tr ' ' '\n' | grep -qx "$READERS"; then
        usermod -aG "$READERS" edgeagent
    fi
}

uid_of() {
    if [ "$1" = root ]; then echo 0; return; fi
    if [ -n "$ROOT" ]; then awk -F: -v n="$1" '$1 == n { print $3 }' "$(r /etc/passwd)"; else id -u "$1"; fi
}
gid_of() {
    if [ "$1" = root ]; then echo 0; return; fi
    if [ -n "$ROOT" ]; then awk -F: -v n="$1" '$1 == n { print $3 }' "$(r /etc/group)"; else getent group "$1" | cut -d: -f3; fi
}

# set_owner PATH USER GROUP MODE (numeric ids, so a staging tree gets its own accounts' ids). chown
# first: it may clear set-id bits that the mode asks for.
set_owner() {
    if [ "$(id -u)" = 0 ]; then
        chown -h "$(uid_of "$2"):$(gid_of "$3")" "$1"
    fi
    chmod "$4" "$1"
}

# -- files ------------------------------------------------------------------------------------------

# put PATH USER GROUP MODE < content: write PATH only when its content changes.
put() {
    local dest tmp
    dest="$(r "$1")"
    mkdir -p "$(dirname "$dest")"
    tmp="$(mktemp "$dest.XXXXXX")"
    cat > "$tmp"
    if [ -f "$dest" ] && cmp -s "$tmp" "$dest"; then
        rm -f "$tmp"
    else
        mv "$tmp" "$dest"
        CHANGED+=("$1")
    fi
    set_owner "$dest" "$2" "$3" "$4"
}

# put_config PATH USER GROUP MODE < content: like put, but a file you edited since the last install
# is kept, and the new version goes next to it as PATH.dist (mosquitto ignores conf.d/*.dist).
put_config() {
    local dest pristine new
    dest="$(r "$1")"
    pristine="$(r "$PRISTINE$1")"
    new="$(mktemp)"
    cat > "$new"
    if [ -f "$dest" ] && ! cmp -s "$dest" "$new" && { [ ! -f "$pristine" ] || ! cmp -s "$dest" "$pristine"; }; then
        put "$1.dist" "$2" "$3" "$4" < "$new"
        say "kept your edited $1; this version's is $1.dist (compare: diff $1 $1.dist)"
    else
        put "$1" "$2" "$3" "$4" < "$new"
        rm -f "$dest.dist"
    fi
    put "$PRISTINE$1" root root 0644 < "$new"
    rm -f "$new"
}

directory() {  # PATH USER GROUP MODE
    mkdir -p "$(r "$1")"
    set_owner "$(r "$1")" "$2" "$3" "$4"
}

# -- install ----------------------------------------------------------------------------------------

# /var/lib/edgeagent: edgeagent:edgeagent-read 2750, as the unit's StateDirectoryMode= and Group= make
# it at every start (systemd chowns a StateDirectory to User:Group, recursively when the directory's
# group differs, so the group has to be the unit's Group=). Set-group-id: files made by anyone else
# (root's `edgeagent retry`, an agent started by hand) get the readers' group too. A journal from
# before issue 12 is edgeagent:edgeagent: handed to the readers' group once.
state_dir_for_readers() {
    directory "$STATE" edgeagent "$READERS" 2750
    if [ "$(id -u)" = 0 ]; then
        chown -R --from=":$(gid_of edgeagent)" ":$(gid_of "$READERS")" "$(r "$STATE")"
    fi
}

ensure_packages() {
    local missing=()
    "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    [ -x /usr/sbin/mosquitto ] || missing+=(mosquitto)
    command -v mosquitto_sub >/dev/null || missing+=(mosquitto-clients)
    if [ ${#missing[@]} -eq 0 ]; then
        return
    fi
    if [ -n "$ROOT" ]; then
        say "--root: not run: apt-get install -y ${missing[*]}"
        if ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
            die "--root still needs $PYTHON with venv on this machine to build the staging venv"
        fi
        command -v mosquitto_passwd >/dev/null \
            || die "--root still needs mosquitto_passwd on this machine (apt-get install mosquitto)"
        return
    fi
    say "installing ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get update -q
    DEBIAN_FRONTEND=noninteractive apt-get install -y -q "${missing[@]}"
}

LOCKFILE="$HERE/requirements.lock"
PIP_LOG=""

# pip_install ARGS...: pip install into the venv, its output kept for pip_failure.
pip_install() {
    [ -n "$PIP_LOG" ] || PIP_LOG="$(mktemp)"
    "$(r "$VENV")/bin/pip" install --disable-pip-version-check -q "$@" > "$PIP_LOG" 2>&1
}

# Why the last pip_install failed: index (no package index reachable, or it lacks a locked file),
# hash (a download is not the locked file), build (a package without a wheel here did not compile), other.
pip_failure() {
    if grep -q 'DO NOT MATCH THE HASHES' "$PIP_LOG"; then echo hash
    elif grep -Eq 'Failed (building wheel|to build)|error: command .*(gcc|cc|x86_64-linux-gnu-gcc|arm-linux-gnueabihf-gcc)|Python.h: No such file|ffi.h: No such file' "$PIP_LOG"; then echo build
    elif grep -Eq 'No matching distribution|Could not find a version|NewConnectionError|Network is unreachable|Temporary failure in name resolution|Max retries exceeded|ProxyError|SSLError|timed out' "$PIP_LOG"; then echo index
    else echo other
    fi
}

pip_failed_build() { grep -Eo 'Failed (building wheel for|to build) [A-Za-z0-9_.-]+' "$PIP_LOG" | head -1 | awk '{print $NF}'; }

pip_failure_text() {
    local detail
    detail="$(grep -E '^(ERROR|error):|Error' "$PIP_LOG" | grep -v '^ERROR: Exception' | tail -3)"
    [ -n "$detail" ] || detail="$(tail -5 "$PIP_LOG")"
    case "$(pip_failure)" in
        index) printf 'pip install failed: no package index gave it what deploy/requirements.lock pins%s.\n%s\n%s' \
                   "${PIP_NO_INDEX:+ (PIP_NO_INDEX is set)}" "$detail" \
                   "Check the box's network and proxy (pip config list), or copy the wheels over: pip download --require-hashes -r deploy/requirements.lock -d DIR on a connected machine, then PIP_NO_INDEX=1 PIP_FIND_LINKS=DIR $0" ;;
        hash) printf 'pip install failed: a download does not match the hash in deploy/requirements.lock (a proxy or mirror serving other files?)\n%s' "$detail" ;;
        *) printf 'pip install failed:\n%s' "$detail" ;;
    esac
    printf '\n(all of pip'"'"'s output: %s)' "$PIP_LOG"
}

install_package() {
    local venv src build
    venv="$(r "$VENV")"
    src="${SOURCE:-$CHECKOUT}"
    [ -e "$src" ] || die "--source $src: not found"
    case "$src" in
        *.whl|*/) ;;
        *) [ -d "$src" ] || die "--source $src: give a checkout directory or a .whl file" ;;
    esac
    if [ ! -x "$venv/bin/python" ] || ! "$venv/bin/python" -c 'import sys' 2>/dev/null; then
        # Missing, or broken by a Python upgrade: (re)create it. The journal is elsewhere.
        rm -rf "$venv"
        "$PYTHON" -m venv "$venv"
    fi
    build=""
    if [ -d "$src" ]; then
        # Build from a clean copy: an in-tree build leaves build/ behind, and setuptools would
        # package stale modules from it on the next run. A fixed place, because pip records it.
        [ -f "$src/pyproject.toml" ] || die "--source $src: no pyproject.toml (a checkout or a .whl, please)"
        build="$(r "$OPT/build")"
        rm -rf "$build"
        mkdir -p "$build"
        cp "$src/pyproject.toml" "$build/"
        [ ! -f "$src/README.md" ] || cp "$src/README.md" "$build/"
        cp -r "$src/edgeagent" "$build/"
        find "$build" -name __pycache__ -prune -exec rm -rf {} +
        src="$build"
    fi
    # SOURCE_DATE_EPOCH makes pip write hash-checked .pyc files instead of ones stamped with the
    # install time, so reinstalling the same version leaves identical files.
    export SOURCE_DATE_EPOCH=315532800
    # The dependencies exactly as deploy/requirements.lock pins them, every file checked against its
    # hash: every box of a lot runs the same versions, whatever PyPI serves that day.
    if ! pip_install --require-hashes -r "$LOCKFILE"; then
        # Wheels exist for amd64/arm64; on armhf cffi has none on PyPI (Raspberry Pi OS's piwheels has,
        # but its files are not the locked ones), so pip builds it: that needs a compiler. Only a
        # failed *build* is worth one; anything else (no index, a hash mismatch) is said as it is.
        if [ "$(pip_failure)" != build ] || [ -n "$ROOT" ]; then die "$(pip_failure_text)"; fi
        say "pip could not build $(pip_failed_build) here (no wheel for $(dpkg --print-architecture 2>/dev/null || uname -m)):"
        say "installing a compiler and headers (build-essential python3-dev libffi-dev libssl-dev, ~390 MB)"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q build-essential python3-dev libffi-dev libssl-dev
        pip_install --require-hashes -r "$LOCKFILE" || die "$(pip_failure_text)"
    fi
    # edgeagent itself: built from the checkout with the locked setuptools, nothing else fetched. A
    # wheel of the version already installed counts as "already satisfied": replace it anyway.
    pip_install --no-deps --no-build-isolation --force-reinstall "$src" || die "$(pip_failure_text)"
    [ -z "$build" ] || rm -rf "$build"
    rm -f "$PIP_LOG"
    say "installed $("$venv/bin/edgeagent" --version) in $VENV"
}

# The example config with the agent's broker credentials filled in, for a first install. The
# password reaches the service through LoadCredential= (issue 12): the file itself is root's only.
first_config() {
    # shellcheck disable=SC2016  # $CREDENTIALS_DIRECTORY is for the agent to expand, not this shell
    sed -e 's|^username = ""|username = "edgeagent"|' \
        -e 's|^password_file = ""[[:space:]]*|password_file = "$CREDENTIALS_DIRECTORY/mqtt.password"  |' \
        "$HERE/edgeagent.toml.example"
}

# broker_account USER SECRET_FILE: the account's password in SECRET_FILE (root:root 0600, made when
# missing) and its hash in the broker's file. The password goes to mosquitto_passwd on stdin, never
# as an argument, where every user of the box could read it in ps (issue 12).
broker_account() {
    local user="$1" secret="$2" password create=() fresh=no
    if [ -f "$(r "$secret")" ]; then
        password="$(head -n 1 "$(r "$secret")")"
    else
        password="$(random_password)"
        fresh=yes
        printf '%s\n' "$password" | put "$secret" root root 0600
    fi
    if [ ! -f "$(r "$BROKER_PASSWD")" ] || ! grep -q "^$user:" "$(r "$BROKER_PASSWD")" || [ "$fresh" = yes ]; then
        [ -f "$(r "$BROKER_PASSWD")" ] || create=(-c)
        printf '%s\n%s\n' "$password" "$password" | mosquitto_passwd "${create[@]}" "$(r "$BROKER_PASSWD")" "$user" >/dev/null
        CHANGED+=("$BROKER_PASSWD")
    fi
    set_owner "$(r "$secret")" root root 0600
}

# The broker drop-in with the camera-LAN listener: from --camera-lan, else as installed now. The
# listener's own settings ("#keyword" lines up to the end marker) are switched on with it: under
# per_listener_settings they would otherwise bind to the agent's listener above them.
broker_conf() {
    local address="$CAMERA_LAN"
    if [ -z "$address" ]; then
        address="$(awk '/^# camera-lan listener/ { getline; if ($1 == "listener") print $3; exit }' \
            "$(r "$BROKER_CONF")" 2>/dev/null || true)"
    fi
    awk -v address="$address" '
        /^# camera-lan listener/ { block = 1; print; next }
        /^# end of camera-lan listener/ { block = 0 }
        block && address != "" && /^#[a-z]/ { line = substr($0, 2); sub(/CAMERA_LAN_ADDRESS/, address, line); print line; next }
        { print }' "$HERE/mosquitto/edgeagent.conf"
}

random_password() { head -c 18 /dev/urandom | base64 | tr -d '+/='; }

install_broker_files() {
    if [ -n "$CAMERA_LAN" ]; then
        [[ "$CAMERA_LAN" =~ ^[0-9A-Fa-f:.]+$ ]] || die "--camera-lan $CAMERA_LAN: give an IP address of this box"
        case "$CAMERA_LAN" in
            0.0.0.0|::|127.0.0.1|::1) die "--camera-lan $CAMERA_LAN: give this box's own address on the camera LAN" ;;
        esac
    fi
    broker_conf | put_config "$BROKER_CONF" root root 0644
    if [ ! -f "$(r "$BROKER_ACL")" ]; then
        put "$BROKER_ACL" root mosquitto 0640 < "$HERE/mosquitto/acl.example"
    fi
    set_owner "$(r "$BROKER_ACL")" root mosquitto 0640
    # The agent's broker account, and `edgeagent simulate`'s (issue 12: the agent's account no longer
    # writes camera topics): passwords in /etc/edgeagent, root:root 0600, hashes in the broker's file.
    broker_account edgeagent "$MQTT_PASSWORD"
    broker_account edgeagent-simulate "$SIMULATE_PASSWORD"
    set_owner "$(r "$BROKER_PASSWD")" root mosquitto 0640
    if [ -f "$(r "$BROKER_MAIN")" ] && ! grep -Eq '^include_dir[[:space:]]+/etc/mosquitto/conf.d/?[[:space:]]*$' "$(r "$BROKER_MAIN")"; then
        say "WARNING: $BROKER_MAIN has no 'include_dir /etc/mosquitto/conf.d' line, so the broker ignores"
        say "         $BROKER_CONF (persistence, queue limits, camera credentials). Debian's stock file has it."
    fi
}

# -- one lot, several boxes (SPEC §11) --------------------------------------------------------------

LOT_ACL_START="# >>> lot (install.sh --lot-topic)"
LOT_ACL_END="# <<< lot"

check_lot_options() {
    if [ -n "$LOT_TOPIC" ] && ! [[ "$LOT_TOPIC" =~ ^[A-Za-z0-9._-]+(/[A-Za-z0-9._-]+)*$ ]]; then
        die "--lot-topic $LOT_TOPIC: give a topic name of levels of A-Z a-z 0-9 . _ - separated by /, e.g. lots/WXPARK001/sessions (no wildcards, no leading or trailing /)"
    fi
    if [ -n "$HUB" ]; then
        [[ "$HUB" =~ ^[A-Za-z0-9.-]+(:[0-9]{1,5})?$ ]] || die "--hub $HUB: give HOST or HOST:PORT (the hub's name on its TLS certificate)"
        [[ "$HUB" == *:* ]] || HUB="$HUB:8883"
    fi
    if [ -n "$HUB_USER" ] && ! [[ "$HUB_USER" =~ ^[A-Za-z0-9._-]{1,64}$ ]]; then
        die "--hub-user $HUB_USER: use 1-64 of A-Z a-z 0-9 . _ -"
    fi
    if [ -z "$HUB" ] && { [ -n "$HUB_USER" ] || [ -n "$HUB_PASSWORD_FILE" ] || [ -n "$HUB_CA" ]; }; then
        [ -f "$(r "$LOT_BRIDGE")" ] || die "--hub-user, --hub-password-file and --hub-ca go with --hub HOST[:PORT]"
    fi
    local file
    for file in "$HUB_PASSWORD_FILE" "$HUB_CA"; do
        [ -z "$file" ] || [ -f "$file" ] || die "$file: not found"
    done
}

# The value of KEY, a TOML basic string, in [TABLE] of the installed config ("" for the top level).
config_string() {  # TABLE KEY
    awk -v table="$1" -v key="$2" '
        /^[[:space:]]*\[/ { section = $0; sub(/^[[:space:]]*\[/, "", section); sub(/\].*$/, "", section); next }
        section == table && $0 ~ "^[[:space:]]*" key "[[:space:]]*=[[:space:]]*\"" {
            sub(/^[^=]*=[[:space:]]*"/, ""); sub(/".*$/, ""); print; exit
        }' "$(r "$CONFIG")" 2>/dev/null || true
}

# The installed config with [lot] topic = TOPIC: the line replaced in its [lot] table (comments and
# everything else kept), the line added to a [lot] table without one, or the table appended.
config_with_lot_topic() {
    awk -v line="topic = \"$1\"" '
        /^[[:space:]]*\[/ {
            if (in_lot && !done) { print line; done = 1 }
            in_lot = ($0 ~ /^[[:space:]]*\[lot\][[:space:]]*(#.*)?$/)
            if (in_lot) seen = 1
        }
        in_lot && !done && /^[[:space:]]*topic[[:space:]]*=/ { print line; done = 1; next }
        { print }
        END { if (!seen) printf "\n[lot]\n%s\n", line; else if (!done) print line }' "$(r "$CONFIG")"
}

# The broker ACL with the agent's lot block for TOPIC (written anew), or without it for "".
acl_with_lot() {
    awk -v start="$LOT_ACL_START" -v end="$LOT_ACL_END" '
        $0 == start { skip = 1; next }
        $0 == end { skip = 0; next }
        !skip { print }' "$(r "$BROKER_ACL")"
    [ -n "$1" ] || return 0
    printf '%s\n' "$LOT_ACL_START" \
        "# The agent publishes its sessions' snapshots and its exit records under the lot topic (SPEC §11)." \
        "user edgeagent" "topic write $1/#" "$LOT_ACL_END"
}

# A setting of the installed bridge ("" when there is none): what the last run was given.
bridge_setting() { awk -v k="$1" '$1 == k { print $2; exit }' "$(r "$LOT_BRIDGE")" 2>/dev/null || true; }

# deploy/mosquitto/bridge-lot.conf with its placeholders filled in, on setting lines only (the comments
# keep explaining them). Bash substitution with a quoted replacement: no character of the password is
# special, as it would be to sed or awk.
render_bridge() {  # TOPIC HUB USER PASSWORD
    local line
    while IFS= read -r line; do
        if [[ "$line" != \#* ]]; then
            line="${line//LOT_TOPIC/"$1"}"
            line="${line//HUB_ADDRESS/"$2"}"
            line="${line//BOX_ID/"$3"}"
            line="${line//HUB_PASSWORD/"$4"}"
        fi
        printf '%s\n' "$line"
    done < "$HERE/mosquitto/bridge-lot.conf"
}

install_lot_files() {
    local topic="$LOT_TOPIC" hub="$HUB" user="$HUB_USER" password
    if [ -n "$topic" ]; then
        config_with_lot_topic "$topic" | put "$CONFIG" root "$READERS" 0640
    else
        topic="$(config_string lot topic)"
    fi
    # The agent's account may write the lot topic the config names (and nothing once it names none).
    if [ -n "$topic" ] || grep -qxF "$LOT_ACL_START" "$(r "$BROKER_ACL")"; then
        acl_with_lot "$topic" | put "$BROKER_ACL" root mosquitto 0640
    fi
    [ -n "$hub" ] || hub="$(bridge_setting address)"
    [ -n "$hub" ] || return 0  # no hub: this box is the lot's hub, or the whole lot
    [ -n "$topic" ] || die "--hub needs the lot topic: --lot-topic TOPIC (or [lot] topic in $CONFIG)"
    [ -n "$user" ] || user="$(bridge_setting remote_username)"
    [ -n "$user" ] || user="$(config_string "" serial_prefix)"
    [[ "$user" =~ ^[A-Za-z0-9._-]{1,64}$ ]] || die "--hub: no account name for this box on the hub: --hub-user NAME"
    if [ -n "$HUB_PASSWORD_FILE" ]; then
        head -n 1 "$HUB_PASSWORD_FILE" | put "$HUB_PASSWORD" root root 0600
    fi
    [ -s "$(r "$HUB_PASSWORD")" ] || die "--hub: no password for the hub account $user: --hub-password-file FILE"
    password="$(head -n 1 "$(r "$HUB_PASSWORD")")"
    [[ "$password" =~ ^[[:graph:]]{1,256}$ ]] || die "$HUB_PASSWORD: the password must be 1-256 printable characters without spaces"
    set_owner "$(r "$HUB_PASSWORD")" root root 0600
    if [ -n "$HUB_CA" ]; then
        grep -q -- "-----BEGIN CERTIFICATE-----" "$HUB_CA" || die "--hub-ca $HUB_CA: not a PEM certificate"
        directory "$(dirname "$LOT_HUB_CA")" root root 0755
        put "$LOT_HUB_CA" root root 0644 < "$HUB_CA"
    fi
    [ -f "$(r "$LOT_HUB_CA")" ] || die "--hub: the CA that signed the hub's certificate is needed: --hub-ca FILE"
    # It holds the hub password: readable by the broker's group only.
    render_bridge "$topic" "$hub" "$user" "$password" | put "$LOT_BRIDGE" root mosquitto 0640
    say "lot: $topic/# bridged to $hub as $user"
}

install_files() {
    directory "$OPT" root root 0755
    directory "$OPT/share" root root 0755
    # The readers' group (issue 12) reaches the config and the journal; the secrets in $ETC are
    # root:root 0600 (LoadCredential=), and files only the service may read are root:edgeagent 0640.
    directory "$ETC" root "$READERS" 0750
    state_dir_for_readers
    if [ ! -f "$(r "$CONFIG")" ]; then
        first_config | put "$CONFIG" root "$READERS" 0640
        say "wrote $CONFIG from the example: fill in [wechatpay], [parking] and the cameras"
    fi
    # Upgrade from before issue 12: the agent read mqtt.password directly (root:edgeagent 0640); now
    # the file is root's only and the unit hands the service a copy (LoadCredential=).
    if grep -qx "password_file = \"$MQTT_PASSWORD\".*" "$(r "$CONFIG")"; then
        sed -i "s|^password_file = \"$MQTT_PASSWORD\"|password_file = \"\$CREDENTIALS_DIRECTORY/mqtt.password\"|" "$(r "$CONFIG")"
        say "$CONFIG: password_file now reads the broker password through LoadCredential="
    fi
    set_owner "$(r "$CONFIG")" root "$READERS" 0640
    if [ -f "$(r "$ETC/apiclient_key.pem")" ]; then
        set_owner "$(r "$ETC/apiclient_key.pem")" root root 0600
    fi
    put "$UNIT" root root 0644 < "$CHECKOUT/systemd/edgeagent.service"
    put "$BROKER_DROPIN" root root 0644 < "$HERE/mosquitto/mosquitto-restart.conf"
    put "$CAMERA_USER_TOOL" root root 0755 < "$HERE/mosquitto/edgeagent-camera-user"
    # What the unit's Documentation= and docs/deploy.md point at, and the way back out.
    put "$OPT/README.md" root root 0644 < "$CHECKOUT/README.md"
    local doc name
    for doc in "$CHECKOUT"/docs/*.md; do
        name="$(basename "$doc")"
        put "$OPT/docs/$name" root root 0644 < "$doc"
    done
    directory "$OPT/docs" root root 0755
    put "$OPT/share/edgeagent.toml.example" root root 0644 < "$HERE/edgeagent.toml.example"
    put "$OPT/share/mosquitto/edgeagent.conf" root root 0644 < "$HERE/mosquitto/edgeagent.conf"
    put "$OPT/share/mosquitto/acl.example" root root 0644 < "$HERE/mosquitto/acl.example"
    put "$OPT/share/mosquitto/bridge-central.conf" root root 0644 < "$HERE/mosquitto/bridge-central.conf"
    local lot_file
    for lot_file in bridge-lot.conf hub-lot.conf lot-hub.acl.example; do
        put "$OPT/share/mosquitto/$lot_file" root root 0644 < "$HERE/mosquitto/$lot_file"
    done
    put "$OPT/share/install.sh" root root 0755 < "$HERE/install.sh"
    put "$OPT/share/uninstall.sh" root root 0755 < "$HERE/uninstall.sh"
    directory "$OPT/share/mosquitto" root root 0755
    directory "$PRISTINE" root root 0755
    mkdir -p "$(r "$(dirname "$BIN_LINK")")" "$(r "$(dirname "$WANTS")")"
    ln -sfn "$VENV/bin/edgeagent" "$(r "$BIN_LINK")"
    # What `systemctl enable edgeagent` does (WantedBy=multi-user.target), unless it cannot start.
    if [ -z "$(missing_credentials)" ]; then ln -sfn "$UNIT" "$(r "$WANTS")"; else rm -f "$(r "$WANTS")"; fi
}

# The files the unit's LoadCredential= lines name that are not there: without them systemd refuses to
# start the service (status=243/CREDENTIALS, "Failed to set up credentials: Protocol error").
missing_credentials() {
    local path
    sed -n 's|^LoadCredential=[^:]*:\(/.*[^[:space:]]\)[[:space:]]*$|\1|p' "$(r "$UNIT")" | while read -r path; do
        [ -e "$(r "$path")" ] || echo "$path"
    done
}

start_services() {
    if [ -n "$ROOT" ]; then
        say "--root: not run: systemctl daemon-reload; systemctl enable mosquitto; systemctl restart mosquitto edgeagent"
        return
    fi
    systemctl enable --quiet mosquitto.service
    local missing
    missing="$(missing_credentials)"
    if [ -n "$missing" ]; then
        # A unit that cannot start is not enabled (it would fail at every boot); a running one is left alone.
        systemctl disable --quiet edgeagent.service 2>/dev/null || true
        say "edgeagent is installed but NOT enabled: the unit needs $(echo "$missing" | paste -sd, | sed 's/,/, /g'), missing."
        say "put it there (root:root 0600), then: systemctl enable --now edgeagent   (docs/deploy.md, 'Commissioning a lane')"
    else
        systemctl enable --quiet edgeagent.service
    fi
    if ! systemd_running; then
        say "systemd is not running here (a container?): the service is ${missing:+NOT }enabled for the next boot, not started."
        say "to run the agent now: sudo -u edgeagent $VENV/bin/edgeagent run --config $CONFIG"
        return
    fi
    systemctl daemon-reload
    local broker_changed=no path
    for path in "${CHANGED[@]}"; do
        case "$path" in
            /etc/mosquitto/*|"$BROKER_DROPIN") broker_changed=yes ;;
        esac
    done
    if [ "$broker_changed" = yes ] || ! systemctl is-active --quiet mosquitto.service; then
        systemctl restart mosquitto.service
    fi
    if [ -n "$missing" ]; then
        :
    elif [ "$START" = no ]; then
        say "--no-start: edgeagent is enabled, not (re)started"
    elif CREDENTIALS_DIRECTORY="$ETC" "$VENV/bin/edgeagent" check --config "$CONFIG" >/dev/null 2>&1; then
        systemctl restart edgeagent.service
        say "edgeagent (re)started: edgeagent status"
    else
        say "edgeagent is enabled but not started: its configuration is not complete yet."
        say "fix what this prints, then: systemctl start edgeagent"
        CREDENTIALS_DIRECTORY="$ETC" "$VENV/bin/edgeagent" check --config "$CONFIG" || true
    fi
}

do_install() {
    CHANGED=()
    check_lot_options
    ensure_packages
    ensure_accounts
    install_files
    install_broker_files
    install_lot_files
    install_package
    start_services
    say "done${ROOT:+ (staged in $ROOT)}. Next: docs/deploy.md, 'Commissioning a lane'."
}

# -- uninstall --------------------------------------------------------------------------------------

# "pending dead" counts from the journal that the config names (read-only), or nothing.
journal_counts() {
    local state_dir journal
    state_dir="$("$PYTHON" -c 'import sys, tomllib
try:
    print(tomllib.load(open(sys.argv[1], "rb")).get("state_dir", "/var/lib/edgeagent"))
except OSError:
    print("/var/lib/edgeagent")' "$(r "$CONFIG")" 2>/dev/null || echo "$STATE")"
    journal="$(r "$state_dir")/journal.sqlite3"
    [ -f "$journal" ] || return 0
    "$PYTHON" - "$journal" <<'EOF'
import sqlite3, sys, urllib.parse
uri = "file:" + urllib.parse.quote(sys.argv[1]) + "?mode=ro"
db = sqlite3.connect(uri, uri=True)
counts = dict(db.execute("SELECT state, count(*) FROM events WHERE state IN ('pending', 'dead') GROUP BY state"))
print(counts.get("pending", 0), counts.get("dead", 0))
EOF
}

do_uninstall() {
    local counts pending=0 dead=0
    if systemd_running; then
        systemctl disable --now --quiet edgeagent.service 2>/dev/null || true
    elif [ -z "$ROOT" ]; then
        systemctl disable --quiet edgeagent.service 2>/dev/null || true
    fi
    counts="$(journal_counts || true)"
    if [ -n "$counts" ]; then
        read -r pending dead <<< "$counts"
    fi
    if [ "$PURGE" = yes ] && [ "$FORCE" = no ] && [ $((pending + dead)) -gt 0 ]; then
        die "the journal holds $pending pending and $dead dead entries that WeChat Pay never confirmed; deliver them first (edgeagent status, edgeagent retry --dead), or add --force to delete them with everything else"
    fi
    rm -f "$(r "$WANTS")" "$(r "$UNIT")" "$(r "$BROKER_DROPIN")" "$(r "$BROKER_CONF")" "$(r "$BROKER_CONF").dist" \
        "$(r "$LOT_BRIDGE")"
    rmdir "$(r "$(dirname "$BROKER_DROPIN")")" 2>/dev/null || true
    rm -f "$(r "$BIN_LINK")" "$(r "$CAMERA_USER_TOOL")"
    rm -rf "$(r "$OPT")"
    if [ "$PURGE" = yes ]; then
        rm -rf "$(r "$ETC")" "$(r "$STATE")"
        rm -f "$(r "$BROKER_PASSWD")" "$(r "$BROKER_ACL")" "$(r "$LOT_HUB_CA")"
        if [ -n "$ROOT" ]; then
            sed -i -e '/^edgeagent:/d' -e "/^$READERS:/d" "$(r /etc/passwd)" "$(r /etc/group)" 2>/dev/null || true
        else
            # userdel refuses while a process runs as edgeagent (an agent started by hand).
            if getent passwd edgeagent >/dev/null && ! userdel edgeagent; then
                say "kept the account edgeagent; remove it once nothing runs as it: userdel edgeagent"
            fi
            if getent group edgeagent >/dev/null && ! getent passwd edgeagent >/dev/null; then
                groupdel edgeagent || true
            fi
            if getent group "$READERS" >/dev/null; then
                groupdel "$READERS" || true
            fi
        fi
        say "removed edgeagent, its configuration, journal, broker credentials and account"
    else
        say "removed edgeagent; kept $ETC (configuration, keys) and $STATE (journal: $pending pending, $dead dead)"
        say "kept the broker's camera credentials in $BROKER_PASSWD and $BROKER_ACL"
        say "to delete those too: $0 --uninstall --purge"
    fi
    if systemd_running; then
        systemctl daemon-reload
        systemctl try-restart mosquitto.service
    elif [ -n "$ROOT" ]; then
        say "--root: not run: systemctl disable --now edgeagent; systemctl daemon-reload; systemctl try-restart mosquitto"
    fi
}

if [ "$ACTION" = install ]; then
    do_install
else
    do_uninstall
fi
