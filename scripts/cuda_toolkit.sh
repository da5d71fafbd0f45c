# Source this to build dpo2d with `--features cuda` on a machine whose OS has no
# CUDA toolkit (it needs no GPU): CUDA 13.0's compiler and libraries come from
# NVIDIA's pip wheels, and a stub libcuda.so stands in for the driver library at
# link time (the real one is loaded when dpo2d runs on a GPU machine).
#
#   cargo fetch && source scripts/cuda_toolkit.sh [DIR]   # DIR default: .cuda-toolkit
#   cargo build --release --features cuda --target-dir target-cuda
#
# CUDA 13.0 suits the 580-series drivers of current H100/H200 machines;
# CUDA_COMPUTE_CAP (default 90: Hopper) is the GPU generation candle's kernels
# are compiled for.
dir=${1:-.cuda-toolkit}
if [ ! -x "$dir/venv/bin/python" ]; then
    python3 -m venv "$dir/venv" &&
    "$dir/venv/bin/pip" install -q "nvidia-cuda-nvcc==13.0.*" "nvidia-cuda-runtime==13.0.*" "nvidia-cuda-nvrtc==13.0.*" \
        "nvidia-cublas==13.0.*" "nvidia-curand==10.4.0.*" "nvidia-cuda-cccl==13.0.*" "nvidia-cuda-crt==13.0.*" \
        "nvidia-nvvm==13.0.*" || return 1
fi
cuda=$(cd "$(ls -d "$dir"/venv/lib/python3*/site-packages/nvidia/cu13)" && pwd)
# The wheels ship versioned libraries only; the linker wants the plain names.
for lib in libcudart libcublas libcublasLt libcurand libnvrtc; do
    [ -e "$cuda/lib/$lib.so" ] || ln -sf "$(cd "$cuda/lib" && ls $lib.so.* | head -n 1)" "$cuda/lib/$lib.so"
done
# A libcuda.so.1 defining every driver function cudarc links against, each empty.
stubs=$(mkdir -p "$dir/stubs" && cd "$dir/stubs" && pwd)
if [ ! -e "$stubs/libcuda.so" ]; then
    sys=$(ls -d "${CARGO_HOME:-$HOME/.cargo}"/registry/src/*/cudarc-*/src/driver/sys/mod.rs 2>/dev/null | tail -n 1)
    [ -n "$sys" ] || { echo "cudarc's sources are missing: run 'cargo fetch' first" >&2; return 1; }
    grep -oE "fn (cu[A-Z][A-Za-z0-9_]*)\(" "$sys" | sed -E 's/fn (.*)\(/void \1(void) {}/' | sort -u > "$stubs/libcuda_stub.c"
    cc -shared -fPIC -Wl,-soname,libcuda.so.1 -o "$stubs/libcuda.so" "$stubs/libcuda_stub.c" || return 1
fi
export CUDA_ROOT=$cuda CUDA_PATH=$cuda CUDA_HOME=$cuda PATH=$cuda/bin:$PATH
export CUDA_COMPUTE_CAP=${CUDA_COMPUTE_CAP:-90}
export LIBRARY_PATH=$cuda/lib:$stubs${LIBRARY_PATH:+:$LIBRARY_PATH}
echo "CUDA $(nvcc --version | grep -o 'release [0-9.]*') from pip wheels in $dir"
