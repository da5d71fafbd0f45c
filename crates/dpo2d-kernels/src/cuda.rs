//! The CUDA twins of the fused CPU kernels: the same ops (same structs, same
//! semantics, checked against the same composed references), computed on
//! the GPU in f32 or bf16 with f32 arithmetic inside. The kernels are CUDA C
//! compiled once per process by NVRTC (no build-time toolkit beyond what
//! candle's CUDA backend needs) and loaded into candle's device.
//!
//! `DPO2D_CUDA_KERNELS=0` turns them off: the ops then take candle's kernels
//! and the composed backward, which is how the two are compared on a GPU.

use candle_core::backend::BackendStorage;
use candle_core::cuda_backend::cudarc::driver::{CudaSlice, DeviceRepr, LaunchConfig, PushKernelArg, ValidAsZeroBits};
use candle_core::cuda_backend::{CudaDType, WrapErr};
use candle_core::{bail, CudaDevice, CudaStorage, DType, Layout, Result, Shape, Tensor};
use std::sync::OnceLock;

const SOURCE: &str = r#"
typedef unsigned short bf16;
typedef unsigned long long u64;  // NVRTC has no <stddef.h>
#define NEG_INF __int_as_float(0xff800000)
__device__ __forceinline__ float ld(const float* p, u64 i) { return p[i]; }
__device__ __forceinline__ float ld(const bf16* p, u64 i) { return __uint_as_float(((unsigned)p[i]) << 16); }
__device__ __forceinline__ void st(float* p, u64 i, float v) { p[i] = v; }
__device__ __forceinline__ void st(bf16* p, u64 i, float v) {
    unsigned u = __float_as_uint(v);
    if ((u & 0x7fffffffu) > 0x7f800000u) { p[i] = (bf16)((u >> 16) | 0x40u); return; }
    u += 0x7fffu + ((u >> 16) & 1u);  // round to nearest even
    p[i] = (bf16)(u >> 16);
}
__device__ __forceinline__ float sigm(float x) { return 1.0f / (1.0f + expf(-x)); }

__device__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}
__device__ float warp_max(float v) {
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}
// Sum over the block (blockDim a multiple of 32, at most 1024); every thread gets it.
__device__ float block_sum(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0f;
        s = warp_sum(s);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}

// ---- SwiGLU: y = silu(gate) * up; grads: out[0:n] = dgate, out[n:2n] = dup.
template <typename T> __device__ void swiglu_fwd(const T* g, const T* u, T* y, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float a = ld(g, i);
        st(y, i, a * sigm(a) * ld(u, i));
    }
}
template <typename T> __device__ void swiglu_bwd(const T* g, const T* u, const T* go, T* out, u64 n) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        float a = ld(g, i), s = sigm(a), d = ld(go, i);
        st(out, i, d * ld(u, i) * s * (1.0f + a * (1.0f - s)));
        st(out, n + i, d * a * s);
    }
}

// ---- RMSNorm over rows of h: one block per row.
template <typename T> __device__ void rmsnorm_fwd(const T* x, const T* w, T* y, int h, float eps) {
    u64 row = (u64)blockIdx.x * h;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) { float v = ld(x, row + j); ss += v * v; }
    float r = rsqrtf(block_sum(ss) / h + eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x) st(y, row + j, ld(x, row + j) * r * ld(w, j));
}
// The residual add and the norm: out[row] = a + b (rounded to T), out[n + row] = its norm.
template <typename T> __device__ void add_rmsnorm_fwd(const T* a, const T* b, const T* w, T* out, u64 n, int h, float eps) {
    u64 row = (u64)blockIdx.x * h;
    float ss = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        st(out, row + j, ld(a, row + j) + ld(b, row + j));
        float v = ld(out, row + j);
        ss += v * v;
    }
    float r = rsqrtf(block_sum(ss) / h + eps);
    for (int j = threadIdx.x; j < h; j += blockDim.x) st(out, n + row + j, ld(out, row + j) * r * ld(w, j));
}
// dx = r g w - x r^3 mean(g w x)
template <typename T> __device__ void rmsnorm_dx(const T* x, const T* w, const T* go, T* dx, int h, float eps) {
    u64 row = (u64)blockIdx.x * h;
    float ss = 0.0f, dot = 0.0f;
    for (int j = threadIdx.x; j < h; j += blockDim.x) {
        float v = ld(x, row + j);
        ss += v * v;
        dot += ld(go, row + j) * ld(w, j) * v;
    }
    ss = block_sum(ss);
    dot = block_sum(dot) / h;
    float r = rsqrtf(ss / h + eps), c = r * r * r * dot;
    for (int j = threadIdx.x; j < h; j += blockDim.x)
        st(dx, row + j, r * ld(go, row + j) * ld(w, j) - ld(x, row + j) * c);
}
// dw = sum over rows of g x r: each block sums `per_block` rows in shared memory, then one atomic per column.
template <typename T> __device__ void rmsnorm_dw(const T* x, const T* go, float* dw, int rows, int h, float eps, int per_block) {
    extern __shared__ float acc[];
    for (int j = threadIdx.x; j < h; j += blockDim.x) acc[j] = 0.0f;
    int end = min(rows, (int)(blockIdx.x + 1) * per_block);
    for (int r0 = blockIdx.x * per_block; r0 < end; r0++) {
        u64 row = (u64)r0 * h;
        float ss = 0.0f;
        for (int j = threadIdx.x; j < h; j += blockDim.x) { float v = ld(x, row + j); ss += v * v; }
        float r = rsqrtf(block_sum(ss) / h + eps);
        for (int j = threadIdx.x; j < h; j += blockDim.x) acc[j] += ld(go, row + j) * ld(x, row + j) * r;
    }
    for (int j = threadIdx.x; j < h; j += blockDim.x) atomicAdd(dw + j, acc[j]);
}

// ---- Attention's masked softmax, softmax(scale * x + mask), over rows of tk: one warp per row.
template <typename T> __device__ void softmax_fwd(const T* x, const T* mask, T* y, u64 rows, int tk, int tq, u64 per_batch, int mask_batches, float scale) {
    u64 row = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    u64 b = mask_batches == 1 ? 0 : row / per_batch;
    const T* m = mask + (b * tq + row % tq) * tk;
    const T* xr = x + row * tk;
    float mx = NEG_INF;
    for (int j = lane; j < tk; j += 32) mx = fmaxf(mx, scale * ld(xr, j) + ld(m, j));
    mx = warp_max(mx);
    if (mx == NEG_INF) {  // every key masked: zeros, not NaN
        for (int j = lane; j < tk; j += 32) st(y, row * tk + j, 0.0f);
        return;
    }
    float s = 0.0f;
    for (int j = lane; j < tk; j += 32) s += expf(scale * ld(xr, j) + ld(m, j) - mx);
    float inv = 1.0f / warp_sum(s);
    for (int j = lane; j < tk; j += 32) st(y, row * tk + j, expf(scale * ld(xr, j) + ld(m, j) - mx) * inv);
}
template <typename T> __device__ void softmax_bwd(const T* y, const T* go, T* dx, u64 rows, int tk, float scale) {
    u64 row = ((u64)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    int lane = threadIdx.x & 31;
    if (row >= rows) return;
    u64 o = row * tk;
    float dot = 0.0f;
    for (int j = lane; j < tk; j += 32) dot += ld(y, o + j) * ld(go, o + j);
    dot = warp_sum(dot);
    for (int j = lane; j < tk; j += 32) st(dx, o + j, scale * ld(y, o + j) * (ld(go, o + j) - dot));
}

// ---- Label log-probs over a chunk of logits [rows, v]: one block per row for the
// logsumexp (the sum of exponentials in f64) and the label's logit; the logits'
// gradient g * (onehot(label) - exp(logit - lse)) element-wise.
__device__ float block_max(float v) {
    __shared__ float part[32];
    __shared__ float total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, o));
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        float s = lane < (int)(blockDim.x >> 5) ? part[lane] : NEG_INF;
        for (int o = 16; o > 0; o >>= 1) s = fmaxf(s, __shfl_xor_sync(0xffffffffu, s, o));
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}
__device__ double block_sum_d(double v) {
    __shared__ double part[32];
    __shared__ double total;
    int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    __syncthreads();
    if (lane == 0) part[warp] = v;
    __syncthreads();
    if (warp == 0) {
        double s = lane < (int)(blockDim.x >> 5) ? part[lane] : 0.0;
        for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
        if (lane == 0) total = s;
    }
    __syncthreads();
    return total;
}
// out[0:rows] = logit[label] - lse, out[rows:2 rows] = lse
template <typename T> __device__ void label_pick(const T* logits, const unsigned* labels, float* out, u64 rows, u64 v) {
    u64 row = blockIdx.x;
    const T* l = logits + row * v;
    float mx = NEG_INF;
    for (u64 j = threadIdx.x; j < v; j += blockDim.x) mx = fmaxf(mx, ld(l, j));
    mx = block_max(mx);
    double s = 0.0;
    for (u64 j = threadIdx.x; j < v; j += blockDim.x) s += (double)expf(ld(l, j) - mx);
    s = block_sum_d(s);
    if (threadIdx.x == 0) {
        float lse = mx + (float)log(s);
        out[row] = ld(l, labels[row]) - lse;
        out[rows + row] = lse;
    }
}
// lse_g[0:rows] = lse, lse_g[rows:2 rows] = g
template <typename T> __device__ void logit_grads(const T* logits, const unsigned* labels, const float* lse_g, T* out, u64 rows, u64 v) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < rows * v; i += (u64)gridDim.x * blockDim.x) {
        u64 row = i / v;
        float g = lse_g[rows + row];
        float d = -g * expf(ld(logits, i) - lse_g[row]);
        if (i - row * v == labels[row]) d += g;
        st(out, i, d);
    }
}

// ---- Sum of squares (gradient clipping) over many blocks, in f64, added into *out.
template <typename T> __device__ void sum_squares(const T* x, u64 n, double* out) {
    double s = 0.0;
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x) {
        double v = ld(x, i);
        s += v * v;
    }
    s = block_sum_d(s);
    if (threadIdx.x == 0) atomicAdd(out, s);
}

// ---- AdamW over every parameter in one launch. slots[6k..6k+6] for parameter k:
// f32 weights p, moments mv [2n], gradient g, bf16 parameter out (0: none), n, g is bf16.
// chunks[b] = k << 40 | first element of block b's chunk.
extern "C" __global__ void adamw_all(const u64* slots, const u64* chunks, u64 chunk, float b1, float b2, float c1, float c2,
                                     float scale, float decay, float step_size, float inv_bc2_sqrt, float eps) {
    u64 c = chunks[blockIdx.x];
    const u64* s = slots + 6 * (c >> 40);
    float* p = (float*)s[0];
    float* mv = (float*)s[1];
    bf16* out = (bf16*)s[3];
    u64 n = s[4], start = c & 0xffffffffffull, end = start + chunk < n ? start + chunk : n;
    for (u64 i = start + threadIdx.x; i < end; i += blockDim.x) {
        float x = (s[5] ? ld((const bf16*)s[2], i) : ld((const float*)s[2], i)) * scale;
        float m = b1 * mv[i] + c1 * x, v = b2 * mv[n + i] + c2 * x * x;
        mv[i] = m;
        mv[n + i] = v;
        float q = p[i] * decay - step_size * m / (sqrtf(v) * inv_bc2_sqrt + eps);
        p[i] = q;
        if (out) st(out, i, q);
    }
}

// ---- Dropout: splitmix64 over the counter start + (j + 1) * GOLDEN, draw j's low half
// for element 2j and its high half for element 2j + 1 (as kernels/dropout.rs on the CPU);
// an element is dropped when its half is below thresh.
__device__ __forceinline__ bool dropped(u64 i, u64 start, u64 thresh) {
    u64 z = start + 0x9e3779b97f4a7c15ull * (i / 2 + 1);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    z ^= z >> 31;
    return ((i & 1) ? (z >> 32) : (z & 0xffffffffull)) < thresh;
}
template <typename T> __device__ void dropout_mask(T* out, u64 n, u64 start, u64 thresh, float keep) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        st(out, i, dropped(i, start, thresh) ? 0.0f : keep);
}
// y = x * mask, the mask never stored (keep arrives rounded as a stored mask holds it).
template <typename T> __device__ void dropout_apply(const T* x, T* y, u64 n, u64 start, u64 thresh, float keep) {
    for (u64 i = blockIdx.x * (u64)blockDim.x + threadIdx.x; i < n; i += (u64)gridDim.x * blockDim.x)
        st(y, i, ld(x, i) * (dropped(i, start, thresh) ? 0.0f : keep));
}

extern "C" __global__ void swiglu_fwd_f32(const float* g, const float* u, float* y, u64 n) { swiglu_fwd(g, u, y, n); }
extern "C" __global__ void swiglu_fwd_bf16(const bf16* g, const bf16* u, bf16* y, u64 n) { swiglu_fwd(g, u, y, n); }
extern "C" __global__ void swiglu_bwd_f32(const float* g, const float* u, const float* go, float* o, u64 n) { swiglu_bwd(g, u, go, o, n); }
extern "C" __global__ void swiglu_bwd_bf16(const bf16* g, const bf16* u, const bf16* go, bf16* o, u64 n) { swiglu_bwd(g, u, go, o, n); }
extern "C" __global__ void rmsnorm_fwd_f32(const float* x, const float* w, float* y, int h, float eps) { rmsnorm_fwd(x, w, y, h, eps); }
extern "C" __global__ void rmsnorm_fwd_bf16(const bf16* x, const bf16* w, bf16* y, int h, float eps) { rmsnorm_fwd(x, w, y, h, eps); }
extern "C" __global__ void add_rmsnorm_fwd_f32(const float* a, const float* b, const float* w, float* o, u64 n, int h, float eps) { add_rmsnorm_fwd(a, b, w, o, n, h, eps); }
extern "C" __global__ void add_rmsnorm_fwd_bf16(const bf16* a, const bf16* b, const bf16* w, bf16* o, u64 n, int h, float eps) { add_rmsnorm_fwd(a, b, w, o, n, h, eps); }
extern "C" __global__ void rmsnorm_dx_f32(const float* x, const float* w, const float* g, float* dx, int h, float eps) { rmsnorm_dx(x, w, g, dx, h, eps); }
extern "C" __global__ void rmsnorm_dx_bf16(const bf16* x, const bf16* w, const bf16* g, bf16* dx, int h, float eps) { rmsnorm_dx(x, w, g, dx, h, eps); }
extern "C" __global__ void rmsnorm_dw_f32(const float* x, const float* g, float* dw, int rows, int h, float eps, int pb) { rmsnorm_dw(x, g, dw, rows, h, eps, pb); }
extern "C" __global__ void rmsnorm_dw_bf16(const bf16* x, const bf16* g, float* dw, int rows, int h, float eps, int pb) { rmsnorm_dw(x, g, dw, rows, h, eps, pb); }
extern "C" __global__ void softmax_fwd_f32(const float* x, const float* m, float* y, u64 rows, int tk, int tq, u64 pb, int mb, float sc) { softmax_fwd(x, m, y, rows, tk, tq, pb, mb, sc); }
extern "C" __global__ void softmax_fwd_bf16(const bf16* x, const bf16* m, bf16* y, u64 rows, int tk, int tq, u64 pb, int mb, float sc) { softmax_fwd(x, m, y, rows, tk, tq, pb, mb, sc); }
extern "C" __global__ void softmax_bwd_f32(const float* y, const float* g, float* dx, u64 rows, int tk, float sc) { softmax_bwd(y, g, dx, rows, tk, sc); }
extern "C" __global__ void softmax_bwd_bf16(const bf16* y, const bf16* g, bf16* dx, u64 rows, int tk, float sc) { softmax_bwd(y, g, dx, rows, tk, sc); }
extern "C" __global__ void label_pick_f32(const float* l, const unsigned* lab, float* o, u64 rows, u64 v) { label_pick(l, lab, o, rows, v); }
extern "C" __global__ void label_pick_bf16(const bf16* l, const unsigned* lab, float* o, u64 rows, u64 v) { label_pick(l, lab, o, rows, v); }
extern "C" __global__ void logit_grads_f32(const float* l, const unsigned* lab, const float* lg, float* o, u64 rows, u64 v) { logit_grads(l, lab, lg, o, rows, v); }
extern "C" __global__ void logit_grads_bf16(const bf16* l, const unsigned* lab, const float* lg, bf16* o, u64 rows, u64 v) { logit_grads(l, lab, lg, o, rows, v); }
extern "C" __global__ void sum_squares_f32(const float* x, u64 n, double* out) { sum_squares(x, n, out); }
extern "C" __global__ void sum_squares_bf16(const bf16* x, u64 n, double* out) { sum_squares(x, n, out); }
extern "C" __global__ void dropout_mask_f32(float* o, u64 n, u64 s, u64 t, float k) { dropout_mask(o, n, s, t, k); }
extern "C" __global__ void dropout_mask_bf16(bf16* o, u64 n, u64 s, u64 t, float k) { dropout_mask(o, n, s, t, k); }
extern "C" __global__ void dropout_apply_f32(const float* x, float* y, u64 n, u64 s, u64 t, float k) { dropout_apply(x, y, n, s, t, k); }
extern "C" __global__ void dropout_apply_bf16(const bf16* x, bf16* y, u64 n, u64 s, u64 t, float k) { dropout_apply(x, y, n, s, t, k); }
"#;

/// Whether the CUDA kernels serve this tensor (a GPU tensor in f32 or bf16,
/// kernels not turned off).
pub fn supports(t: &Tensor) -> bool {
    t.device().is_cuda() && matches!(t.dtype(), DType::F32 | DType::BF16) && enabled()
}

fn enabled() -> bool {
    static ON: OnceLock<bool> = OnceLock::new();
    *ON.get_or_init(|| std::env::var("DPO2D_CUDA_KERNELS").map(|v| v != "0").unwrap_or(true))
}

/// The kernels' PTX, compiled on first use.
fn ptx() -> Result<&'static str> {
    static PTX: OnceLock<std::result::Result<String, String>> = OnceLock::new();
    let r = PTX.get_or_init(|| {
        candle_core::cuda_backend::cudarc::nvrtc::compile_ptx(SOURCE)
            .map(|p| p.to_src())
            .map_err(|e| format!("compiling dpo2d's CUDA kernels: {e}"))
    });
    match r {
        Ok(p) => Ok(p.as_str()),
        Err(e) => bail!("{e}"),
    }
}

/// The module the kernels load as in candle's device.
const MODULE: &str = "dpo2d_kernels";

/// The element types the kernels take, with their names' suffix.
trait Elem: CudaDType + DeviceRepr + ValidAsZeroBits + Copy + 'static {
    const SUFFIX: &'static str;
}
impl Elem for f32 {
    const SUFFIX: &'static str = "f32";
}
impl Elem for half::bf16 {
    const SUFFIX: &'static str = "bf16";
}

/// Calls `$body` with `$T` bound to the storage's element type.
macro_rules! with_elem {
    ($dt:expr, $what:expr, $T:ident => $body:expr) => {
        match $dt {
            DType::F32 => {
                type $T = f32;
                $body
            }
            DType::BF16 => {
                type $T = half::bf16;
                $body
            }
            d => bail!("{}: no CUDA kernel for {d:?}", $what),
        }
    };
}

/// The contiguous elements of a storage as a device view.
fn view<'a, T: Elem>(s: &'a CudaStorage, l: &Layout, what: &str) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, T>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(T::as_cuda_slice(s)?.slice(a..b)),
        None => bail!("{what}: input is not contiguous"),
    }
}

/// A kernel's name for the element type `T` (`swiglu_fwd` -> `swiglu_fwd_bf16`).
fn named<T: Elem>(base: &str) -> String {
    format!("{base}_{}", T::SUFFIX)
}

/// Launches the compiled kernel `$name` on `$dev` with `$cfg` and the
/// arguments in the order of its parameters in [`SOURCE`].
macro_rules! launch {
    ($dev:expr, $name:expr, $cfg:expr; $($arg:expr),+) => {{
        let f = $dev.get_or_load_custom_func($name, MODULE, ptx()?)?;
        let mut b = f.builder();
        $(b.arg($arg);)+
        // SAFETY: the arguments match the kernel's parameters, and every buffer
        // holds the elements that the launch's threads read or write.
        unsafe { b.launch($cfg) }.w()?;
    }};
}

/// One block of `threads` per row.
fn per_row(rows: usize, threads: u32) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows as u32, 1, 1), block_dim: (threads, 1, 1), shared_mem_bytes: 0 }
}

/// A grid-stride launch over `n` elements.
fn flat(n: usize) -> LaunchConfig {
    let blocks = n.div_ceil(256).clamp(1, 132 * 32) as u32;
    LaunchConfig { grid_dim: (blocks, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// Threads per block for a row of `h` (a multiple of 32, at most 1024).
fn row_threads(h: usize) -> u32 {
    (h.div_ceil(32) * 32).clamp(32, 1024) as u32
}

fn wrap<T: Elem>(s: CudaSlice<T>, dev: &CudaDevice) -> CudaStorage {
    T::wrap_cuda_slice(s, dev.clone())
}

// ------------------------------------------------------------ SwiGLU

pub(super) fn swiglu_fwd(gs: &CudaStorage, gl: &Layout, us: &CudaStorage, ul: &Layout) -> Result<(CudaStorage, Shape)> {
    let dev = gs.device();
    let n = gl.shape().elem_count();
    let y = with_elem!(gs.dtype(), "swiglu", T => {
        let (g, u) = (view::<T>(gs, gl, "swiglu")?, view::<T>(us, ul, "swiglu")?);
        let y = unsafe { dev.alloc::<T>(n)? };
        launch!(dev, &named::<T>("swiglu_fwd"), flat(n); &g, &u, &y, &n);
        wrap(y, dev)
    });
    Ok((y, gl.shape().clone()))
}

/// SwiGLU's input gradients `[2, ..]`: dgate, then dup ([`super::swiglu`]).
pub(super) fn swiglu_grads(
    gs: &CudaStorage,
    gl: &Layout,
    us: &CudaStorage,
    ul: &Layout,
    os: &CudaStorage,
    ol: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let what = "swiglu backward";
    let dev = gs.device();
    let n = gl.shape().elem_count();
    let out = with_elem!(gs.dtype(), what, T => {
        let (g, u, go) = (view::<T>(gs, gl, what)?, view::<T>(us, ul, what)?, view::<T>(os, ol, what)?);
        let out = unsafe { dev.alloc::<T>(2 * n)? };
        launch!(dev, &named::<T>("swiglu_bwd"), flat(n); &g, &u, &go, &out, &n);
        wrap(out, dev)
    });
    Ok((out, super::pair_shape(gl.dims())))
}

// ------------------------------------------------------------ RMSNorm

pub(super) fn rms_norm_fwd(xs: &CudaStorage, xl: &Layout, ws: &CudaStorage, wl: &Layout, eps: f64) -> Result<(CudaStorage, Shape)> {
    let dev = xs.device();
    let n = xl.shape().elem_count();
    let h = wl.shape().elem_count();
    let y = with_elem!(xs.dtype(), "rms norm", T => {
        let (x, w) = (view::<T>(xs, xl, "rms norm")?, view::<T>(ws, wl, "rms norm")?);
        let y = unsafe { dev.alloc::<T>(n)? };
        let (hi, e) = (h as i32, eps as f32);
        launch!(dev, &named::<T>("rmsnorm_fwd"), per_row(n / h.max(1), row_threads(h)); &x, &w, &y, &hi, &e);
        wrap(y, dev)
    });
    Ok((y, xl.shape().clone()))
}

/// `[2, ..]`: `a + b`, then its norm ([`super::rms_norm::AddRmsNorm`]).
pub(super) fn add_rms_norm_fwd(
    as_: &CudaStorage,
    al: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let what = "residual add and rms norm";
    let dev = as_.device();
    let n = al.shape().elem_count();
    let h = wl.shape().elem_count();
    if bl.dims() != al.dims() || al.dims().last() != Some(&h) {
        bail!("{what}: shapes {:?}, {:?} and weight {:?} do not fit", al.dims(), bl.dims(), wl.dims());
    }
    let out = with_elem!(as_.dtype(), what, T => {
        let (a, b, w) = (view::<T>(as_, al, what)?, view::<T>(bs, bl, what)?, view::<T>(ws, wl, what)?);
        let out = unsafe { dev.alloc::<T>(2 * n)? };
        let (hi, e) = (h as i32, eps as f32);
        launch!(dev, &named::<T>("add_rmsnorm_fwd"), per_row(n / h.max(1), row_threads(h)); &a, &b, &w, &out, &n, &hi, &e);
        wrap(out, dev)
    });
    Ok((out, super::pair_shape(al.dims())))
}

/// RMSNorm's `dx` from x, w and the incoming gradient ([`super::rms_norm`]).
pub(super) fn rms_norm_dx(
    xs: &CudaStorage,
    xl: &Layout,
    ws: &CudaStorage,
    wl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
    eps: f64,
) -> Result<(CudaStorage, Shape)> {
    let what = "rms norm backward";
    let dev = xs.device();
    let n = xl.shape().elem_count();
    let h = wl.shape().elem_count();
    let dx = with_elem!(xs.dtype(), what, T => {
        let (x, w, g) = (view::<T>(xs, xl, what)?, view::<T>(ws, wl, what)?, view::<T>(gs, gl, what)?);
        let dx = unsafe { dev.alloc::<T>(n)? };
        let (hi, e) = (h as i32, eps as f32);
        launch!(dev, &named::<T>("rmsnorm_dx"), per_row(n / h.max(1), row_threads(h)); &x, &w, &g, &dx, &hi, &e);
        wrap(dx, dev)
    });
    Ok((dx, xl.shape().clone()))
}

/// RMSNorm's `dw` in f32 from x and the incoming gradient (`h` from x's last dim).
pub(super) fn rms_norm_dw(xs: &CudaStorage, xl: &Layout, gs: &CudaStorage, gl: &Layout, eps: f64) -> Result<(CudaStorage, Shape)> {
    let what = "rms norm weight gradient";
    let dev = xs.device();
    let h = *xl.dims().last().unwrap_or(&1);
    let rows = xl.shape().elem_count() / h.max(1);
    if h * 4 > 48 * 1024 {
        bail!("{what}: hidden size {h} too large for one block's shared memory");
    }
    let per_block = rows.div_ceil(132 * 4).max(1);
    let dw = with_elem!(xs.dtype(), what, T => {
        let (x, g) = (view::<T>(xs, xl, what)?, view::<T>(gs, gl, what)?);
        let dw = dev.alloc_zeros::<f32>(h)?;
        let (ri, hi, e, pb) = (rows as i32, h as i32, eps as f32, per_block as i32);
        let cfg = LaunchConfig {
            grid_dim: (rows.div_ceil(per_block).max(1) as u32, 1, 1),
            block_dim: (row_threads(h).min(256), 1, 1),
            shared_mem_bytes: (h * 4) as u32,
        };
        launch!(dev, &named::<T>("rmsnorm_dw"), cfg; &x, &g, &dw, &ri, &hi, &e, &pb);
        wrap(dw, dev)
    });
    Ok((dw, Shape::from(h)))
}

// ------------------------------------------------------------ masked softmax

/// The masked softmax's forward, `softmax(scale * x + mask)`; the geometry
/// as the CPU kernel reads it.
pub(super) fn softmax_fwd(
    xs: &CudaStorage,
    xl: &Layout,
    mask: &Tensor,
    geo: (usize, usize, usize, usize),
    scale: f64,
) -> Result<(CudaStorage, Shape)> {
    let (tq, tk, per_batch, mask_batches) = geo;
    let dev = xs.device();
    let n = xl.shape().elem_count();
    let rows = n / tk.max(1);
    let (ms, ml) = mask.storage_and_layout();
    let candle_core::Storage::Cuda(ms) = &*ms else { bail!("masked softmax: the mask is not on the GPU") };
    let y = with_elem!(xs.dtype(), "masked softmax", T => {
        let (x, m) = (view::<T>(xs, xl, "masked softmax")?, view::<T>(ms, ml, "masked softmax")?);
        let y = unsafe { dev.alloc::<T>(n)? };
        let (tki, tqi, mbi, sc) = (tk as i32, tq as i32, mask_batches as i32, scale as f32);
        launch!(dev, &named::<T>("softmax_fwd"), warp_rows(rows); &x, &m, &y, &rows, &tki, &tqi, &per_batch, &mbi, &sc);
        wrap(y, dev)
    });
    Ok((y, xl.shape().clone()))
}

/// One warp per row, 8 rows per block.
fn warp_rows(rows: usize) -> LaunchConfig {
    LaunchConfig { grid_dim: (rows.div_ceil(8).max(1) as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 }
}

/// The masked softmax's input gradient `scale * y * (g - sum(g * y))` from
/// its result `y` and the incoming gradient `g` (rows of the last dim).
pub(super) fn softmax_bwd(ys: &CudaStorage, yl: &Layout, gs: &CudaStorage, gl: &Layout, scale: f64) -> Result<(CudaStorage, Shape)> {
    let what = "masked softmax backward";
    let dev = ys.device();
    let n = yl.shape().elem_count();
    let tk = *yl.dims().last().unwrap_or(&1);
    let rows = n / tk.max(1);
    let dx = with_elem!(ys.dtype(), what, T => {
        let (y, g) = (view::<T>(ys, yl, what)?, view::<T>(gs, gl, what)?);
        let dx = unsafe { dev.alloc::<T>(n)? };
        let (tki, sc) = (tk as i32, scale as f32);
        launch!(dev, &named::<T>("softmax_bwd"), warp_rows(rows); &y, &g, &dx, &rows, &tki, &sc);
        wrap(dx, dev)
    });
    Ok((dx, yl.shape().clone()))
}

// ------------------------------------------------------------ dropout masks

/// A dropout mask of `n` elements on `dev` ([`super::dropout`] says which).
pub(super) fn dropout_mask(dev: &CudaDevice, dtype: DType, n: usize, start: u64, thresh: u64, keep: f64) -> Result<CudaStorage> {
    Ok(with_elem!(dtype, "dropout mask", T => {
        let out = unsafe { dev.alloc::<T>(n.max(1))? };
        let k = keep as f32;
        launch!(dev, &named::<T>("dropout_mask"), flat(n); &out, &n, &start, &thresh, &k);
        wrap(out, dev)
    }))
}

/// `x` times the dropout mask of the stream at `start`, the mask never stored.
pub(super) fn dropout_apply(xs: &CudaStorage, xl: &Layout, start: u64, thresh: u64, keep: f64) -> Result<CudaStorage> {
    let dev = xs.device();
    let n = xl.shape().elem_count();
    Ok(with_elem!(xs.dtype(), "dropout", T => {
        let x = view::<T>(xs, xl, "dropout")?;
        let y = unsafe { dev.alloc::<T>(n.max(1))? };
        // The kept value as a stored mask of this dtype holds it.
        let k = candle_core::WithDType::to_f64(<T as candle_core::WithDType>::from_f64(keep)) as f32;
        launch!(dev, &named::<T>("dropout_apply"), flat(n); &x, &y, &n, &start, &thresh, &k);
        wrap(y, dev)
    }))
}

// ------------------------------------------------------------ label log-probs

fn labels_view<'a>(s: &'a CudaStorage, l: &Layout) -> Result<candle_core::cuda_backend::cudarc::driver::CudaView<'a, u32>> {
    match l.contiguous_offsets() {
        Some((a, b)) => Ok(u32::as_cuda_slice(s)?.slice(a..b)),
        None => bail!("label log-probs: labels not contiguous"),
    }
}

/// Per row of logits `[R, V]`: `[2, R]` f32, `logit[label] - logsumexp`
/// then the logsumexp ([`super::logprobs`]).
pub(super) fn label_pick(ls: &CudaStorage, ll: &Layout, bs: &CudaStorage, bl: &Layout) -> Result<(CudaStorage, Shape)> {
    let what = "label log-probs";
    let dev = ls.device();
    let (rows, v) = ll.shape().dims2()?;
    let labels = labels_view(bs, bl)?;
    let out = with_elem!(ls.dtype(), what, T => {
        let l = view::<T>(ls, ll, what)?;
        let out = unsafe { dev.alloc::<f32>(2 * rows)? };
        launch!(dev, &named::<T>("label_pick"), per_row(rows.max(1), 1024); &l, &labels, &out, &rows, &v);
        wrap(out, dev)
    });
    Ok((out, Shape::from((2, rows))))
}

/// The logits' gradient from the labels and `[2, R]` f32 (logsumexp, then
/// the incoming gradient), in the logits' dtype.
pub(super) fn logit_grads(
    ls: &CudaStorage,
    ll: &Layout,
    bs: &CudaStorage,
    bl: &Layout,
    gs: &CudaStorage,
    gl: &Layout,
) -> Result<(CudaStorage, Shape)> {
    let what = "label log-probs backward";
    let dev = ls.device();
    let (rows, v) = ll.shape().dims2()?;
    let labels = labels_view(bs, bl)?;
    let lse_g = view::<f32>(gs, gl, what)?;
    let out = with_elem!(ls.dtype(), what, T => {
        let l = view::<T>(ls, ll, what)?;
        let out = unsafe { dev.alloc::<T>(rows * v)? };
        launch!(dev, &named::<T>("logit_grads"), flat(rows * v); &l, &labels, &lse_g, &out, &rows, &v);
        wrap(out, dev)
    });
    Ok((out, ll.shape().clone()))
}

// ------------------------------------------------------------ sum of squares

/// The sum of the squares of a tensor's elements in f64, `[1]` on the
/// device, over many blocks (candle's `sum_all` reduces in a single block).
pub(super) fn sum_squares(xs: &CudaStorage, xl: &Layout) -> Result<(CudaStorage, Shape)> {
    let what = "sum of squares";
    let dev = xs.device();
    let n = xl.shape().elem_count();
    let out = dev.alloc_zeros::<f64>(1)?;
    with_elem!(xs.dtype(), what, T => {
        let x = view::<T>(xs, xl, what)?;
        launch!(dev, &named::<T>("sum_squares"), flat(n); &x, &n, &out);
    });
    Ok((f64::wrap_cuda_slice(out, dev.clone()), Shape::from(1)))
}

// ------------------------------------------------------------ AdamW

/// The device address of a storage's first element (for [`super::lock_all`]).
pub(super) fn device_addr_mut(s: &mut CudaStorage) -> Result<u64> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtrMut;
    let stream = s.device().cuda_stream();
    Ok(match s.dtype() {
        DType::F32 => f32::as_cuda_slice_mut(s)?.device_ptr_mut(&stream).0,
        DType::BF16 => half::bf16::as_cuda_slice_mut(s)?.device_ptr_mut(&stream).0,
        d => bail!("adamw: no kernel writes {d:?}"),
    })
}

/// The device address of a contiguous GPU tensor's elements, for reading.
pub(super) fn device_addr(t: &Tensor) -> Result<usize> {
    use candle_core::cuda_backend::cudarc::driver::DevicePtr;
    let (st, l) = t.storage_and_layout();
    let candle_core::Storage::Cuda(s) = &*st else { bail!("adamw: a gradient is not on the GPU") };
    let Some((a, _)) = l.contiguous_offsets() else { bail!("adamw: a gradient is not contiguous") };
    let stream = s.device().cuda_stream();
    let base = match s.dtype() {
        DType::F32 => f32::as_cuda_slice(s)?.device_ptr(&stream).0,
        DType::BF16 => half::bf16::as_cuda_slice(s)?.device_ptr(&stream).0,
        d => bail!("adamw: no kernel reads {d:?} gradients"),
    };
    Ok(base as usize + a * t.dtype().size_in_bytes())
}

/// AdamW over every slot in one launch: a block per chunk of `chunk` elements.
pub(super) fn adamw_all(
    dev: &CudaDevice,
    flats: &[super::adamw::Flat],
    chunks: &[(usize, usize)],
    chunk: usize,
    k: super::adamw::Consts,
) -> Result<()> {
    if chunks.is_empty() {
        return Ok(());
    }
    if flats.len() >= 1 << 24 || flats.iter().any(|f| f.n >= 1 << 40) {
        bail!("adamw: too many parameters, or one too large, for one launch");
    }
    let table: Vec<u64> =
        flats.iter().flat_map(|f| [f.p as u64, f.mv as u64, f.g as u64, f.out as u64, f.n as u64, f.grad_bf16 as u64]).collect();
    let starts: Vec<u64> = chunks.iter().map(|&(k, start)| (k as u64) << 40 | start as u64).collect();
    let (table, starts) = (dev.clone_htod(&table)?, dev.clone_htod(&starts)?);
    let cfg = LaunchConfig { grid_dim: (chunks.len() as u32, 1, 1), block_dim: (256, 1, 1), shared_mem_bytes: 0 };
    let chunk = chunk as u64;
    launch!(dev, "adamw_all", cfg; &table, &starts, &chunk, &k.b1, &k.b2, &k.c1, &k.c2, &k.scale, &k.decay, &k.step_size, &k.inv_bc2_sqrt, &k.eps);
    Ok(())
}
