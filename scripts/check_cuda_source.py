#!/usr/bin/env python3
"""Compiles dpo2d's CUDA kernels as the binary does at run time (NVRTC), then
assembles the PTX for a GPU generation with ptxas, on a machine without a GPU.

The kernels are CUDA C inside `crates/dpo2d-kernels/src/cuda.rs`, compiled
by NVRTC the first time a process uses them: a typo there would only show on a
GPU machine. This catches it before, and prints each kernel's registers and
spills (`ptxas -v`).

    source scripts/cuda_toolkit.sh && python3 scripts/check_cuda_source.py [--arch 90]
"""

from __future__ import annotations

import argparse
import ctypes
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RUST = ROOT / "crates/dpo2d-kernels/src/cuda.rs"


def kernel_source() -> str:
    m = re.search(r'const SOURCE: &str = r#"(.*?)"#;', RUST.read_text(), re.S)
    if not m:
        sys.exit(f"no `const SOURCE` in {RUST}")
    return m.group(1)


def launched() -> list[str]:
    """The kernel names the Rust side launches (`named::<T>("x")` is x_f32 and x_bf16)."""
    rust = RUST.read_text()
    names = re.findall(r'launch!\(\w+, "(\w+)"', rust)
    for base in re.findall(r'named::<T>\("(\w+)"\)', rust):
        names += [f"{base}_f32", f"{base}_bf16"]
    return names


def nvrtc() -> ctypes.CDLL:
    cuda = os.environ.get("CUDA_HOME")
    names = [os.path.join(cuda, "lib", "libnvrtc.so")] if cuda else []
    for name in names + ["libnvrtc.so.13", "libnvrtc.so"]:
        try:
            lib = ctypes.CDLL(name)
        except OSError:
            continue
        # NVRTC opens its builtins library by name at compile time: load it
        # first from beside libnvrtc, where no library path may point.
        for b in sorted(Path(name).parent.glob("libnvrtc-builtins.so.*")):
            ctypes.CDLL(str(b), mode=ctypes.RTLD_GLOBAL)
        return lib
    sys.exit("libnvrtc not found: `source scripts/cuda_toolkit.sh` first")


def compile_ptx(src: str, arch: str) -> str:
    lib = nvrtc()
    prog = ctypes.c_void_p()
    if lib.nvrtcCreateProgram(ctypes.byref(prog), src.encode(), b"dpo2d_kernels.cu", 0, None, None) != 0:
        sys.exit("nvrtcCreateProgram failed")
    opts = [f"--gpu-architecture=compute_{arch}".encode()]
    rc = lib.nvrtcCompileProgram(prog, len(opts), (ctypes.c_char_p * len(opts))(*opts))
    size = ctypes.c_size_t()
    lib.nvrtcGetProgramLogSize(prog, ctypes.byref(size))
    log = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetProgramLog(prog, log)
    text = log.value.decode(errors="replace").strip()
    if text:
        print(text)
    if rc != 0:
        sys.exit(f"NVRTC failed (code {rc})")
    lib.nvrtcGetPTXSize(prog, ctypes.byref(size))
    ptx = ctypes.create_string_buffer(size.value)
    lib.nvrtcGetPTX(prog, ptx)
    return ptx.value.decode()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default=os.environ.get("CUDA_COMPUTE_CAP", "90"))
    a = p.parse_args()
    ptx = compile_ptx(kernel_source(), a.arch)
    kernels = re.findall(r"\.visible \.entry (\w+)\(", ptx)
    print(f"NVRTC: {len(kernels)} kernels compiled for compute_{a.arch}")
    missing = sorted(set(launched()) - set(kernels))
    if missing:
        sys.exit(f"launched from Rust but not in the kernel source: {', '.join(missing)}")
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "k.ptx"
        path.write_text(ptx)
        r = subprocess.run(["ptxas", f"-arch=sm_{a.arch}", "-v", str(path), "-o", str(Path(tmp) / "k.cubin")],
                           capture_output=True, text=True)
    if r.returncode != 0:
        sys.exit(f"ptxas failed:\n{r.stderr}")
    name = None
    spills = []
    for line in r.stderr.splitlines():
        if m := re.search(r"Compiling entry function '(\w+)'", line):
            name = m.group(1)
        elif m := re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", line):
            if int(m.group(1)) or int(m.group(2)):
                spills.append(f"{name}: {m.group(0)}")
        elif m := re.search(r"Used (\d+) registers", line):
            print(f"  {name}: {m.group(1)} registers")
    for s in spills:
        print(f"  spills in {s}")
    print(f"ptxas sm_{a.arch}: ok")


if __name__ == "__main__":
    main()
