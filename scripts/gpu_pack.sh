#!/usr/bin/env bash
# Prepares, on this (CPU) machine, what scripts/gpu_check.sh needs on a lent GPU machine, which reaches
# no registry, and prints the device-tool calls that carry it there. .gpu/ receives the stripped release
# binary, the Fashion-MNIST test images, and the hash-pinned onnxruntime-gpu wheel (~255 MB) cut into
# parts that fit one call's carry limit beside the working tree.
#   SWAV_ORT_GPU_WHEEL=FILE   use a wheel already downloaded (its sha256 is checked against the pin)
#   SWAV_BIN=FILE             carry this swav binary instead of building target/release/swav
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/log.sh
source "$root/scripts/lib/log.sh"
cd "$root"

readonly PACK=.gpu
readonly CARRY_LIMIT_MIB=64 MARGIN_MIB=4
idx=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

mib() { echo $((($1 + (1 << 20) - 1) >> 20)); }

# What travels on every call: tracked files plus untracked ones git does not ignore.
tree_bytes() {
    { git ls-files -z; git ls-files -z --others --exclude-standard; } |
        du --files0-from=- -cb 2>/dev/null | tail -n 1 | cut -f1
}

phase "set-up" scripts/setup
bin=${SWAV_BIN:-${CARGO_TARGET_DIR:-target}/release/swav}
[[ -n ${SWAV_BIN:-} ]] || phase "cargo build --release" cargo build --release --locked --bin swav
rm -rf "$PACK"
mkdir -p "$PACK"
wheel_args=(--gpu --download "$PACK")
[[ -n ${SWAV_ORT_GPU_WHEEL:-} ]] && wheel_args+=(--wheel "$SWAV_ORT_GPU_WHEEL")
phase "onnxruntime-gpu wheel" scripts/install-ort "${wheel_args[@]}"
strip -o "$PACK/swav" "$bin"
cp "$idx" "$PACK/"

tree=$(tree_bytes)
budget_mib=$((CARRY_LIMIT_MIB - MARGIN_MIB - $(mib "$tree")))
((budget_mib >= 16)) || die "the working tree ($(mib "$tree") MiB) leaves too little room to carry anything"
wheel=$(find "$PACK" -maxdepth 1 -name 'onnxruntime_gpu-*.whl' -print -quit)
split -b "${budget_mib}M" -d -a 2 "$wheel" "$wheel.part"
rm "$wheel"

# Fill each call up to the budget, smallest files with the parts they fit beside.
mapfile -t files < <(find "$PACK" -type f -printf '%s %p\n' | sort -n | cut -d' ' -f2)
calls=() current=() used=0
for f in "${files[@]}"; do
    size=$(mib "$(stat -c %s "$f")")
    if ((used + size > budget_mib && ${#current[@]} > 0)); then
        calls+=("${current[*]}")
        current=() used=0
    fi
    current+=("$f")
    used=$((used + size))
done
calls+=("${current[*]}")

ls -l "$PACK"
say "working tree $(mib "$tree") MiB, so each call carries at most $budget_mib MiB more; ${#calls[@]} calls"
cat <<'HOW'

Device-tool calls, one after the other. The machine keeps carried files only while it stays warm (about
30 s after each call), so make each call straight after the previous one; if it was given back meanwhile,
start again from the first call.
HOW
for i in "${!calls[@]}"; do
    read -r -a carry <<<"${calls[$i]}"
    list=$(printf '"%s", ' "${carry[@]}")
    if ((i + 1 < ${#calls[@]})); then
        printf '  run(command="ls -l %s", carry=[%s])\n' "$PACK" "${list%, }"
    else
        printf '  run(command="scripts/gpu_check.sh", timeout_s=480, carry=[%s])\n' "${list%, }"
    fi
done
