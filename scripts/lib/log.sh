# shellcheck shell=bash
# Logging shared by the scripts/ entry points, so every phase reads the same in CI logs.

say() { printf '==> %s\n' "$*" >&2; }
warn() { printf 'warning: %s\n' "$*" >&2; }
die() {
    printf 'error: %s\n' "$*" >&2
    exit 1
}

# Under set -e a failing command ends the script silently: name it. (A failed phase says so itself,
# so its `return` is not reported again.)
_on_error() {
    local status=$1 line=$2 command=$3 file=$4
    [[ $command == return* ]] || printf 'error: %s line %s: "%s" failed (exit %s)\n' "$file" "$line" "$command" "$status" >&2
}
set -o errtrace
trap '_on_error $? $LINENO "$BASH_COMMAND" "${BASH_SOURCE[0]}"' ERR

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
    trap - ERR
    (
        trap '_on_error $? $LINENO "$BASH_COMMAND" "${BASH_SOURCE[0]}"' ERR
        set -e
        "$@"
    )
    status=$?
    trap '_on_error $? $LINENO "$BASH_COMMAND" "${BASH_SOURCE[0]}"' ERR
    set -e
    ((status == 0)) || outcome="FAILED (exit $status)"
    say "$name: $outcome in $(($(date +%s) - start)) s"
    return "$status"
}
