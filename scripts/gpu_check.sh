#!/usr/bin/env bash
# The GPU check, run on a lent GPU machine through the device tool (scripts/gpu_pack.sh prepares it and
# prints the calls). It joins the carried onnxruntime-gpu wheel, checks its pinned hash and unpacks it,
# finds CUDA 13 and cuDNN among the machine's Python packages, then scripts/gpu_check.py runs `swav serve --device cuda` and `--device cpu` on the
# default model, checks that the embeddings agree (cosine >= 0.999) and prints images/s at batch 1/32/256.
# Results: $OUT/gpu_check.{log,json} (var/gpu-check/ without $OUT).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
# shellcheck source=lib/log.sh
source "$root/scripts/lib/log.sh"
cd "$root"

pack=.gpu
lib_dir=$root/.ort-gpu
model=${SWAV_MODEL:-models/fashion-mnist}
out=${OUT:-$root/var/gpu-check}
bin=${SWAV_BIN:-$pack/swav}
[[ -x $bin ]] || bin=${CARGO_TARGET_DIR:-target}/release/swav
[[ -x $bin ]] || die "no swav binary: carry .gpu/swav (scripts/gpu_pack.sh) or build target/release/swav"
mkdir -p "$out"
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT

install_gpu_library() {
    local parts=("$pack"/onnxruntime_gpu-*.whl.part*)
    if [[ ! -e ${parts[0]} ]]; then
        say "no carried wheel parts in $pack: scripts/install-ort --gpu (needs PyPI, unless already installed)"
        scripts/install-ort --gpu
        return
    fi
    local wheel
    wheel=$tmp/$(basename "${parts[0]%.part*}")
    say "joining ${#parts[@]} carried parts into $wheel"
    ls -l "${parts[@]}"
    cat "${parts[@]}" >"$wheel"
    # Checks the joined wheel against the pinned sha256, unpacks it, and loads the library. A part
    # lost when the machine went back between carrying calls shows here as a hash mismatch.
    scripts/install-ort --gpu --wheel "$wheel"
}

# CUDA 13 and cuDNN 9 as the machine's PyTorch has them: the nvidia-* wheels' lib folders.
cuda_library_path() {
    python3 - <<'PY'
import glob, os
try:
    import nvidia
except ImportError:
    raise SystemExit(0)
dirs = sorted({d for p in nvidia.__path__ for d in glob.glob(os.path.join(p, "*", "lib"))})
print(":".join(dirs))
PY
}

install_gpu_library
cuda_path=$(cuda_library_path)
export LD_LIBRARY_PATH=$cuda_path${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
say "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
nvidia-smi -L || warn "nvidia-smi failed"
if ldd "$lib_dir/libonnxruntime_providers_cuda.so" | grep 'not found'; then
    warn "the CUDA provider misses the libraries above: swav serve --device cuda will fail"
fi

PYTHONUNBUFFERED=1 python3 scripts/gpu_check.py --bin "$bin" --model "$model" \
    --ort-lib "$lib_dir/libonnxruntime.so" --images "$pack/t10k-images-idx3-ubyte.gz" \
    --json "$out/gpu_check.json" 2>&1 | tee "$out/gpu_check.log"
