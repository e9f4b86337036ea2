# shellcheck shell=bash
# Debian packages for the scripts/ entry points (needs lib/log.sh sourced first).

as_root() {
    if ((EUID == 0)); then
        "$@"
    elif command -v sudo >/dev/null; then
        sudo "$@"
    else
        die "need root to run: $*"
    fi
}

# Installs those of the named Debian packages that are not installed yet.
apt_install_missing() {
    local missing=() pkg
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q 'install ok installed' || missing+=("$pkg")
    done
    if ((${#missing[@]} == 0)); then
        say "Debian packages already installed ($*)"
        return
    fi
    command -v apt-get >/dev/null ||
        die "apt-get not found: install these packages by hand: ${missing[*]}"
    say "installing Debian packages: ${missing[*]}"
    as_root apt-get update -q
    as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends "${missing[@]}"
}
