//! 2-D matrix products straight through the `gemm` crate, for the fused
//! graph nodes ([`super::mlp`], [`super::block`]).
//!
//! Why: candle's matmul fills every result with zeros on the calling thread
//! (while the other threads wait) before gemm overwrites it, and a sum of
//! products costs a separate result and an add per term. Here the result is
//! written once, and the terms of a sum accumulate into one buffer (gemm's
//! `dst = dst + a b`).

use super::{tensor, with_float};
use candle_core::{bail, Result, Storage, Tensor};

/// `a @ b` for 2-D f32/f64 CPU tensors (any strides).
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_sum(&[(a, b)])
}

/// `sum_i a_i @ b_i` for 2-D f32/f64 CPU tensors (any strides) of one dtype,
/// every `a_i` `[m, k_i]` and `b_i` `[k_i, n]`.
pub(crate) fn matmul_sum(terms: &[(&Tensor, &Tensor)]) -> Result<Tensor> {
    let Some((a0, b0)) = terms.first() else { bail!("matmul_sum: no terms") };
    let (m, n) = (a0.dim(0)?, b0.dim(1)?);
    let dtype = a0.dtype();
    for (a, b) in terms {
        let ((am, ak), (bk, bn)) = (a.dims2()?, b.dims2()?);
        if am != m || bn != n || ak != bk || a.dtype() != dtype || b.dtype() != dtype || !a.device().is_cpu() || !b.device().is_cpu() {
            bail!("matmul_sum: {:?} @ {:?} does not fit [{m}, {n}] {dtype:?} on the CPU", a.dims(), b.dims());
        }
    }
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    with_float!(dtype, "matmul_sum", T => {
        let mut out: Vec<T> = Vec::with_capacity(m * n);
        let mut written = false;
        for (a, b) in terms {
            let k = a.dim(1)?;
            if k == 0 || m * n == 0 {
                continue;
            }
            let (a_st, a_l) = a.storage_and_layout();
            let (b_st, b_l) = b.storage_and_layout();
            let (Storage::Cpu(a_cs), Storage::Cpu(b_cs)) = (&*a_st, &*b_st) else {
                bail!("matmul_sum: tensors not on the CPU");
            };
            let (a_data, b_data) = (a_cs.as_slice::<T>()?, b_cs.as_slice::<T>()?);
            let (a_s, b_s) = (a_l.stride(), b_l.stride());
            // The furthest element each operand's layout reaches must lie in its storage.
            let reach = |off: usize, s: &[usize], rows: usize, cols: usize| off + (rows - 1) * s[0] + (cols - 1) * s[1];
            if reach(a_l.start_offset(), a_s, m, k) >= a_data.len() || reach(b_l.start_offset(), b_s, k, n) >= b_data.len() {
                bail!("matmul_sum: a layout reaches past its storage");
            }
            // SAFETY: `out` has room for m x n elements written with row stride n;
            // the operands' pointers, offsets and strides come from candle's
            // layouts of storages checked above to hold every element read.
            // Until the first product has written `out`, gemm does not read it.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr(),
                    1,
                    n as isize,
                    written,
                    a_data.as_ptr().add(a_l.start_offset()),
                    a_s[1] as isize,
                    a_s[0] as isize,
                    b_data.as_ptr().add(b_l.start_offset()),
                    b_s[1] as isize,
                    b_s[0] as isize,
                    T::one(),
                    T::one(),
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
            written = true;
        }
        if !written {
            out.resize(m * n, T::zero());
        }
        // SAFETY: every element was written by a product (or by the resize).
        unsafe { out.set_len(m * n) };
        tensor(out, &[m, n])
    })
}

#[cfg(test)]
mod tests {
    use super::{matmul, matmul_sum};
    use crate::test_support::{det, max_abs_diff};
    use candle_core::DType;

    #[test]
    fn matches_candle_with_any_strides() {
        for dt in [DType::F32, DType::F64] {
            let a = det(&[37, 19], 1, dt);
            let b = det(&[19, 23], 2, dt);
            let at = det(&[19, 37], 3, dt).t().unwrap(); // a transposed view
            let bt = det(&[23, 19], 4, dt).t().unwrap();
            let tol = if dt == DType::F32 { 1e-4 } else { 1e-12 };
            assert!(max_abs_diff(&matmul(&a, &b).unwrap(), &a.matmul(&b).unwrap()) < tol);
            assert!(max_abs_diff(&matmul(&at, &bt).unwrap(), &at.matmul(&bt).unwrap()) < tol);
            let narrow = det(&[37, 40], 5, dt).narrow(1, 7, 19).unwrap(); // rows of a wider buffer
            assert!(max_abs_diff(&matmul(&narrow, &b).unwrap(), &narrow.matmul(&b).unwrap()) < tol);
            let c = det(&[37, 5], 6, dt);
            let d = det(&[5, 23], 7, dt);
            let sum = (a.matmul(&b).unwrap() + at.matmul(&bt).unwrap() + c.matmul(&d).unwrap()).unwrap();
            assert!(max_abs_diff(&matmul_sum(&[(&a, &b), (&at, &bt), (&c, &d)]).unwrap(), &sum) < tol);
        }
    }

    #[test]
    fn empty_inner_dimension_gives_zeros_and_bad_shapes_are_errors() {
        let (a, b) = (det(&[3, 0], 1, DType::F32), det(&[0, 2], 2, DType::F32));
        assert_eq!(matmul(&a, &b).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert!(matmul(&det(&[3, 4], 1, DType::F32), &det(&[5, 2], 2, DType::F32)).is_err());
        assert!(matmul(&det(&[3, 4], 1, DType::F32), &det(&[4, 2], 2, DType::F64)).is_err());
    }
}
