#!/usr/bin/env bash
# Install the system packages the integration tests drive (Debian/Ubuntu):
#   postfix, redis-server, opendkim, opendkim-tools, chromium + chromium-driver (the
#   dashboard's browser test), dovecot (IMAPSieve learning test)
#
# Idempotent and non-interactive. Installs only what is missing and runs
# `apt-get update` only when something is missing. Never starts or enables
# the system postfix / redis services: the tests run private instances on
# loopback (see src/mxguard/testing/postfix.py).
#
# Usage: scripts/install-test-deps.sh        (as root, or with sudo available)
set -euo pipefail

PACKAGES=(postfix redis-server opendkim opendkim-tools chromium chromium-driver
          dovecot-core dovecot-imapd dovecot-sieve)

log() { echo "install-test-deps: $*"; }
die() { echo "install-test-deps: ERROR: $*" >&2; exit 1; }

if [ "$(id -u)" -eq 0 ]; then
    SUDO=()
elif command -v sudo >/dev/null 2>&1; then
    SUDO=(sudo -n)
else
    die "must run as root (or with passwordless sudo) to install: ${PACKAGES[*]}"
fi

command -v dpkg-query >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 \
    || die "dpkg/apt-get not found: this script supports Debian/Ubuntu only"

is_installed() {
    [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null || true)" = "install ok installed" ]
}

missing=()
for pkg in "${PACKAGES[@]}"; do
    if is_installed "$pkg"; then
        log "$pkg: already installed ($(dpkg-query -W -f='${Version}' "$pkg"))"
    else
        missing+=("$pkg")
    fi
done

stop_system_services() {
    # If a package's postinst started a system daemon anyway, stop it: the
    # tests run private instances and must own their ports. Errors ignored.
    if command -v postfix >/dev/null 2>&1 && [ -f /etc/postfix/main.cf ]; then
        "${SUDO[@]}" postfix stop >/dev/null 2>&1 || true
    fi
    for svc in postfix redis-server opendkim dovecot; do
        "${SUDO[@]}" service "$svc" stop >/dev/null 2>&1 || true
    done
}

if [ "${#missing[@]}" -eq 0 ]; then
    log "nothing to install"
    exit 0
fi

log "missing: ${missing[*]}"
export DEBIAN_FRONTEND=noninteractive

# Postfix: do not create a system configuration (no /etc/postfix/main.cf),
# so the package cannot start a system instance.
log "preseeding debconf: postfix/main_mailer_type = No configuration"
echo "postfix postfix/main_mailer_type select No configuration" \
    | "${SUDO[@]}" debconf-set-selections \
    || die "debconf-set-selections failed"

# Keep invoke-rc.d from starting services during the install (the standard
# Debian policy-rc.d mechanism). Only a policy file we create is removed.
POLICY=/usr/sbin/policy-rc.d
created_policy=0
if [ ! -e "$POLICY" ]; then
    log "installing temporary $POLICY (exit 101: do not start services)"
    printf '#!/bin/sh\nexit 101\n' | "${SUDO[@]}" tee "$POLICY" >/dev/null
    "${SUDO[@]}" chmod 755 "$POLICY"
    created_policy=1
fi
cleanup() {
    if [ "$created_policy" -eq 1 ]; then
        "${SUDO[@]}" rm -f "$POLICY" || true
    fi
}
trap cleanup EXIT

log "apt-get update"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get update -q \
    || die "apt-get update failed"

log "apt-get install ${missing[*]}"
"${SUDO[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -q \
    --no-install-recommends \
    -o Dpkg::Options::=--force-confdef -o Dpkg::Options::=--force-confold \
    "${missing[@]}" \
    || die "apt-get install ${missing[*]} failed"

stop_system_services

for pkg in "${missing[@]}"; do
    is_installed "$pkg" || die "$pkg still not installed after apt-get install"
    log "$pkg: installed ($(dpkg-query -W -f='${Version}' "$pkg"))"
done
log "done"
