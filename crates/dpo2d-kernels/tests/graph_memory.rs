//! What the fused graph nodes keep alive for backward, counted in bytes by
//! the allocator: a node holds its output once, and attention holds no
//! `heads x T x T` tensor. (Its own test binary: the counting allocator
//! sees every thread of the process.)

use candle_core::{DType, Device, Tensor, Var};
use dpo2d_kernels::lora::{lora_linear, Adapter};
use dpo2d_kernels::ops::attention;
use std::alloc::{GlobalAlloc, Layout, System};
use std::sync::atomic::{AtomicIsize, Ordering};

struct Counting;

static LIVE: AtomicIsize = AtomicIsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size() as isize, Ordering::SeqCst);
        System.alloc(layout)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size() as isize, Ordering::SeqCst);
        System.dealloc(ptr, layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size as isize - layout.size() as isize, Ordering::SeqCst);
        System.realloc(ptr, layout, new_size)
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

/// Bytes that stay allocated while the result of `f` is held: the least of
/// several runs after a warm-up, since the thread pool's workers and the
/// matrix products' per-thread caches allocate on first use, on whichever
/// thread a run lands.
fn held_by(f: impl Fn() -> Tensor) -> isize {
    drop(f());
    (0..8)
        .map(|_| {
            let before = LIVE.load(Ordering::SeqCst);
            let out = f();
            let held = LIVE.load(Ordering::SeqCst) - before;
            drop(out);
            held
        })
        .min()
        .expect("eight runs")
}

/// The values do not matter here, only what stays allocated.
fn ones(shape: &[usize]) -> Var {
    Var::ones(shape, DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn fused_nodes_hold_their_output_once_and_attention_no_scores() {
    // Attention: 4 heads over 256 tokens; the output is [1, 256, 4 * 16].
    let (nh, nkv, t, d) = (4, 2, 256, 16);
    let (q, k, v) = (ones(&[1, nh, t, d]), ones(&[1, nkv, t, d]), ones(&[1, nkv, t, d]));
    let causal: Vec<f32> = (0..t * t).map(|i| if i % t <= i / t { 0.0 } else { f32::NEG_INFINITY }).collect();
    let mask = Tensor::from_vec(causal, (1, 1, 1, t, t), &Device::Cpu).unwrap();
    let out_bytes = (t * nh * d * DType::F32.size_in_bytes()) as isize;
    let held = held_by(|| attention(q.as_tensor(), k.as_tensor(), v.as_tensor(), &mask, 0.25).unwrap());
    // Kept twice, or with the probabilities (16x the output here), this is far above.
    assert!(held < out_bytes * 3 / 2, "attention holds {held} bytes for a {out_bytes}-byte output");

    // A LoRA linear layer, 512 rows x 256 outputs, rank 4.
    let (rows, inp, out, r) = (512, 128, 256, 4);
    let x = ones(&[rows, inp]);
    let w = ones(&[out, inp]).as_tensor().detach();
    let (a, b) = (ones(&[r, inp]), ones(&[out, r]));
    let out_bytes = (rows * out * DType::F32.size_in_bytes()) as isize;
    let held = held_by(|| {
        let ad = Adapter { a: a.as_tensor(), b: b.as_tensor(), scale: 2.0, dropout: None };
        lora_linear(x.as_tensor(), &w, None, ad).unwrap()
    });
    assert!(held < out_bytes * 3 / 2, "lora linear holds {held} bytes for a {out_bytes}-byte output");
}
