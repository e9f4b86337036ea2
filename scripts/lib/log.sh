# shellcheck shell=bash
# Logging shared by the scripts/ entry points, so every phase reads the same in CI logs.

say() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Runs "$@" as a named phase, prints how long it took and returns its status.
# "$@" runs in a subshell with errexit on, so a shell function given here stops at its first failing
# command, as it would outside. (Calling phase itself on the left of || or inside `if` turns errexit
# off for everything below it: do that only with external commands.)
phase() {
    local name=$1 start status outcome="done"
    shift
    start=$(date +%s)
    say "$name"
    set +e
    (
        set -e
        "$@"
    )
    status=$?
    set -e
    ((status == 0)) || outcome="FAILED (exit $status)"
    say "$name: $outcome in $(($(date +%s) - start)) s"
    return "$status"
}
