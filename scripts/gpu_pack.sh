#!/usr/bin/env bash
# Prepares, on this (CPU) machine, what scripts/gpu_check.sh needs on a lent GPU machine, which reaches
# no registry: .gpu/ holds the stripped release binary, the Fashion-MNIST test images, and
# onnxruntime-gpu's libraries (from the hash-pinned wheel) as xz-compressed parts small enough to carry.
# It ends by printing the device-tool calls that carry the parts and run the check.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/log.sh
source "$root/scripts/lib/log.sh"
cd "$root"

pack=.gpu
part_size=${SWAV_GPU_PART_MIB:-44}
idx=/usr/share/datasets/fashion-mnist/t10k-images-idx3-ubyte.gz

phase "set-up" scripts/setup
phase "cargo build --release" cargo build --release --locked --bin swav
phase "onnxruntime-gpu libraries" scripts/install-ort --gpu

rm -rf "$pack"
mkdir -p "$pack"
strip -o "$pack/swav" "${CARGO_TARGET_DIR:-target}/release/swav"
cp "$idx" "$pack/"
# Checksums of the unpacked libraries, taken here from the hash-checked wheel, are checked there.
(cd .ort-gpu && find . -maxdepth 1 -type f -name 'lib*' -printf '%P\n' | sort | xargs sha256sum) >"$pack/SHA256SUMS"
say "compressing .ort-gpu (xz, a few minutes on 2 cores)"
tar -C .ort-gpu -cf - . | xz -T0 -6 | split -b "${part_size}M" -d -a 2 - "$pack/ort-gpu.tar.xz.part"

mapfile -t parts < <(find "$pack" -name 'ort-gpu.tar.xz.part*' | sort)
ls -l "$pack"
last=${parts[-1]}
cat <<PLAN

Carry plan for the device tool (each call must come within the machine's warm period of the last;
the tree itself travels every time, about $(du -sh --exclude=target --exclude=.venv --exclude=.ort\* --exclude=$pack --exclude=.git . | cut -f1)):
PLAN
for part in "${parts[@]::${#parts[@]}-1}"; do
    printf '  run(command="ls -l .gpu", carry=["%s"])\n' "$part"
done
printf '  run(command="scripts/gpu_check.sh", timeout_s=420,\n      carry=["%s", "%s/swav", "%s/SHA256SUMS", "%s/%s"])\n' \
    "$last" "$pack" "$pack" "$pack" "$(basename "$idx")"
