#!/usr/bin/env python3
"""Unpack ONNX Runtime's shared libraries from a PyPI wheel, and check that one loads.

Standard library only: it runs before any virtual environment exists (and in Docker build stages).

    ortlib.py extract WHEEL DEST   copy onnxruntime/capi/lib*.so* into DEST, link DEST/libonnxruntime.so
    ortlib.py extract-nvidia DEST WHEEL...   copy the nvidia-* wheels' nvidia/*/lib/*.so* into DEST
    ortlib.py check LIB VERSION    dlopen LIB, ask it for its version, fail unless it is VERSION
"""

from __future__ import annotations

import ctypes
import os
import shutil
import sys
import zipfile
from pathlib import Path, PurePosixPath

CAPI = PurePosixPath("onnxruntime/capi")
# The TensorRT provider needs TensorRT, which swav does not ship; leaving it out saves ~1 GB unpacked.
SKIPPED = ("libonnxruntime_providers_tensorrt.so",)


def extract(wheel: Path, dest: Path) -> list[Path]:
    """Copies the wheel's native libraries into dest and returns them; the main one gets a plain name."""
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    with zipfile.ZipFile(wheel) as zf:
        for info in zf.infolist():
            member = PurePosixPath(info.filename)
            if member.parent != CAPI or not member.name.startswith("lib") or ".so" not in member.name:
                continue
            if member.name in SKIPPED:
                continue
            written.append(_write(zf, info, dest / member.name))
    mains = [p for p in written if p.name.startswith("libonnxruntime.so.")]
    if len(mains) != 1:
        raise SystemExit(f"error: {wheel}: expected one onnxruntime/capi/libonnxruntime.so.<version>, found {mains}")
    link = dest / "libonnxruntime.so"
    if link.is_symlink() or link.exists():
        link.unlink()
    link.symlink_to(mains[0].name)
    return written


def _write(zf: zipfile.ZipFile, info: zipfile.ZipInfo, target: Path) -> Path:
    tmp = target.with_name(target.name + ".part")
    with zf.open(info) as src, open(tmp, "wb") as out:
        shutil.copyfileobj(src, out, 1 << 20)
    tmp.chmod(0o755)
    tmp.replace(target)
    return target


def extract_nvidia(wheels: list[Path], dest: Path) -> list[Path]:
    """Copies the shared libraries of NVIDIA's CUDA wheels (nvidia/<part>/lib/) into one directory,
    where the loader finds them beside ONNX Runtime's CUDA provider."""
    dest.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for wheel in wheels:
        found = 0
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                member = PurePosixPath(info.filename)
                if member.parts[0] != "nvidia" or member.parent.name != "lib" or ".so" not in member.name:
                    continue
                written.append(_write(zf, info, dest / member.name))
                found += 1
        if not found:
            raise SystemExit(f"error: {wheel}: no nvidia/*/lib/*.so* in this wheel")
    return written


class _OrtApiBase(ctypes.Structure):
    _fields_ = [
        ("GetApi", ctypes.CFUNCTYPE(ctypes.c_void_p, ctypes.c_uint32)),
        ("GetVersionString", ctypes.CFUNCTYPE(ctypes.c_char_p)),
    ]


def library_version(lib: Path) -> str:
    """The version string that the library itself reports (OrtGetApiBase()->GetVersionString())."""
    handle = ctypes.CDLL(str(lib))
    get_base = handle.OrtGetApiBase
    get_base.restype = ctypes.POINTER(_OrtApiBase)
    return get_base().contents.GetVersionString().decode()


def check(lib: Path, expected: str) -> str:
    if not lib.exists():
        raise SystemExit(f"error: {lib}: no such file")
    try:
        version = library_version(lib)
    except (OSError, AttributeError) as err:
        raise SystemExit(f"error: {lib}: cannot be loaded as ONNX Runtime: {err}") from err
    if version != expected:
        raise SystemExit(f"error: {lib}: ONNX Runtime {version}, expected {expected}")
    return version


def main(argv: list[str]) -> int:
    if len(argv) == 3 and argv[0] == "extract":
        for path in extract(Path(argv[1]), Path(argv[2])):
            print(f"{path} ({os.path.getsize(path) // (1 << 20)} MiB)")
        return 0
    if len(argv) >= 3 and argv[0] == "extract-nvidia":
        written = extract_nvidia([Path(w) for w in argv[2:]], Path(argv[1]))
        total = sum(os.path.getsize(p) for p in written)
        print(f"{len(written)} libraries ({total // (1 << 20)} MiB) in {argv[1]}")
        return 0
    if len(argv) == 3 and argv[0] == "check":
        print(f"{argv[1]}: ONNX Runtime {check(Path(argv[1]), argv[2])}")
        return 0
    print(__doc__, file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
