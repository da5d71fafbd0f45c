# Sourced by the GPU scripts: put a CUDA 13 runtime (cuBLAS, cuRAND, NVRTC) on the
# library path for a dpo2d built with `--features cuda`, where the system has
# none there: the toolkit's, else the one PyTorch's pip wheels carry.
for d in "${CUDA_HOME:-/usr/local/cuda}/lib64" \
         $(python3 -c 'import nvidia, os; print(" ".join(os.path.join(p, "cu13", "lib") for p in nvidia.__path__))' 2>/dev/null); do
    if [ -e "$d/libcublas.so.13" ]; then
        export LD_LIBRARY_PATH="$d${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
        break
    fi
done
