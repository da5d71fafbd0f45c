//! Matrix products for the fused graph nodes ([`super::attention`],
//! [`super::mlp`], [`super::block`]): on the CPU in f32/f64 straight through
//! the `gemm` crate, elsewhere (a GPU) through candle's products (cuBLAS).
//!
//! Why: candle's CPU matmul fills every result with zeros on the calling
//! thread (while the other threads wait) before gemm overwrites it, and a
//! sum of products costs a separate result and an add per term. Here the
//! result is written once, and the terms of a sum accumulate into one
//! buffer (gemm's `dst = dst + a b`).

use super::{tensor, with_float, Float};
use candle_core::{bail, Result, Storage, Tensor};

/// `a @ b`: `[.., m, k] @ [.., k, n]` with the same leading (batch) dims,
/// any strides.
pub(crate) fn matmul(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    matmul_sum(&[(a, b)])
}

/// `sum_i a_i @ b_i` for tensors of one dtype (any strides), every `a_i`
/// `[.., m, k_i]` and `b_i` `[.., k_i, n]` with the same leading (batch) dims.
pub(crate) fn matmul_sum(terms: &[(&Tensor, &Tensor)]) -> Result<Tensor> {
    let shape = Shape::of(terms)?;
    if !super::supports(terms[0].0) {
        return candle_sum(terms);
    }
    let mut out_dims = shape.batch_dims.clone();
    out_dims.extend([shape.m, shape.n]);
    with_float!(terms[0].0.dtype(), "matmul_sum", T => tensor(gemm_sum::<T>(terms, &shape)?, &out_dims))
}

/// The shape every term of a sum of products shares.
struct Shape {
    rank: usize,
    batch_dims: Vec<usize>,
    m: usize,
    n: usize,
}

impl Shape {
    /// The terms' common shape; an error unless every term fits it, in one
    /// dtype, on one device.
    fn of(terms: &[(&Tensor, &Tensor)]) -> Result<Shape> {
        let Some((a0, b0)) = terms.first() else { bail!("matmul_sum: no terms") };
        let rank = a0.rank();
        if rank < 2 {
            bail!("matmul_sum: operands need two dims at least, got {:?}", a0.dims());
        }
        let batch_dims = &a0.dims()[..rank - 2];
        let (m, n) = (a0.dims()[rank - 2], b0.dim(rank - 1)?);
        let dtype = a0.dtype();
        for (a, b) in terms {
            let fits = a.rank() == rank
                && b.rank() == rank
                && &a.dims()[..rank - 2] == batch_dims
                && &b.dims()[..rank - 2] == batch_dims
                && a.dims()[rank - 2] == m
                && b.dims()[rank - 1] == n
                && a.dims()[rank - 1] == b.dims()[rank - 2];
            let alike =
                a.dtype() == dtype && b.dtype() == dtype && a.device().same_device(a0.device()) && b.device().same_device(a0.device());
            if !fits || !alike {
                bail!("matmul_sum: {:?} @ {:?} does not fit {:?} x [{m}, {n}] {dtype:?} on one device", a.dims(), b.dims(), batch_dims);
            }
        }
        Ok(Shape { rank, batch_dims: batch_dims.to_vec(), m, n })
    }
}

/// The sum of products of CPU tensors through gemm, written into one buffer.
fn gemm_sum<T: Float>(terms: &[(&Tensor, &Tensor)], shape: &Shape) -> Result<Vec<T>> {
    let Shape { rank, ref batch_dims, m, n } = *shape;
    let batches: usize = batch_dims.iter().product();
    let threads = candle_core::utils::get_num_threads();
    let parallelism = if threads > 1 { gemm::Parallelism::Rayon(threads) } else { gemm::Parallelism::None };
    let len = batches * m * n;
    let mut out: Vec<T> = Vec::with_capacity(len);
    let mut written = false;
    for (a, b) in terms {
        let k = a.dims()[rank - 1];
        if k == 0 || len == 0 {
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
        let reach = |off: usize, s: &[usize], dims: &[usize]| off + dims.iter().zip(s).map(|(&d, &st)| (d - 1) * st).sum::<usize>();
        if reach(a_l.start_offset(), a_s, a.dims()) >= a_data.len() || reach(b_l.start_offset(), b_s, b.dims()) >= b_data.len() {
            bail!("matmul_sum: a layout reaches past its storage");
        }
        for batch in 0..batches {
            // Offsets of this batch entry in each operand, from its strides.
            let (mut a_off, mut b_off, mut rest) = (a_l.start_offset(), b_l.start_offset(), batch);
            for d in (0..rank - 2).rev() {
                let i = rest % batch_dims[d];
                rest /= batch_dims[d];
                a_off += i * a_s[d];
                b_off += i * b_s[d];
            }
            // SAFETY: `out` has room for batches x m x n elements; this entry
            // writes m x n of them from `batch * m * n` with row stride n.
            // The operands' offsets and strides come from candle's layouts of
            // storages checked above to hold every element read. Until the
            // first term has written `out`, gemm does not read it.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    out.as_mut_ptr().add(batch * m * n),
                    1,
                    n as isize,
                    written,
                    a_data.as_ptr().add(a_off),
                    a_s[rank - 1] as isize,
                    a_s[rank - 2] as isize,
                    b_data.as_ptr().add(b_off),
                    b_s[rank - 1] as isize,
                    b_s[rank - 2] as isize,
                    T::one(),
                    T::one(),
                    false,
                    false,
                    false,
                    parallelism,
                );
            }
        }
        written = true;
    }
    if !written {
        out.resize(len, T::zero());
    }
    // SAFETY: every element was written by a product (or by the resize).
    unsafe { out.set_len(len) };
    Ok(out)
}

/// The sum of products through candle's matmul (cuBLAS on a GPU): for
/// devices and dtypes that gemm does not serve here.
fn candle_sum(terms: &[(&Tensor, &Tensor)]) -> Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    for (a, b) in terms {
        // A backend that cannot take an operand's strides gets a contiguous copy.
        let p = match a.matmul(b) {
            Ok(p) => p,
            Err(_) => a.contiguous()?.matmul(&b.contiguous()?)?,
        };
        sum = Some(match sum {
            Some(s) => (s + p)?,
            None => p,
        });
    }
    match sum {
        Some(s) => Ok(s),
        None => bail!("matmul_sum: no terms"),
    }
}

#[cfg(test)]
mod tests {
    use super::{candle_sum, matmul, matmul_sum};
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
    fn batched_views_match_candle() {
        for dt in [DType::F32, DType::F64] {
            let tol = if dt == DType::F32 { 1e-4 } else { 1e-12 };
            let q = det(&[2, 3, 11, 4], 1, dt);
            let k = det(&[2, 3, 9, 4], 2, dt);
            let kt = k.t().unwrap(); // [2, 3, 4, 9], a transposed view
            assert!(max_abs_diff(&matmul(&q, &kt).unwrap(), &q.matmul(&kt).unwrap()) < tol);
            let p = det(&[2, 3, 4, 11], 3, dt).t().unwrap(); // [2, 3, 11, 4]
            let both = (q.matmul(&kt).unwrap() + p.matmul(&kt).unwrap()).unwrap();
            assert!(max_abs_diff(&matmul_sum(&[(&q, &kt), (&p, &kt)]).unwrap(), &both) < tol);
        }
        assert!(matmul(&det(&[2, 3, 4], 1, DType::F32), &det(&[3, 4, 5], 2, DType::F32)).is_err());
    }

    /// The path other devices take (candle's products), held to gemm's on
    /// the same views; bf16 (which gemm does not serve here) takes it on the CPU.
    #[test]
    fn candle_path_matches_gemm_path() {
        let tol = 1e-4;
        let q = det(&[2, 3, 11, 4], 1, DType::F32);
        let kt = det(&[2, 3, 9, 4], 2, DType::F32).t().unwrap();
        let p = det(&[2, 3, 4, 11], 3, DType::F32).t().unwrap();
        let want = matmul_sum(&[(&q, &kt), (&p, &kt)]).unwrap();
        assert!(max_abs_diff(&candle_sum(&[(&q, &kt), (&p, &kt)]).unwrap(), &want) < tol);
        let bf = |t: &candle_core::Tensor| t.to_dtype(DType::BF16).unwrap();
        let got = matmul_sum(&[(&bf(&q), &bf(&kt)), (&bf(&p), &bf(&kt))]).unwrap();
        assert_eq!(got.dtype(), DType::BF16);
        assert!(max_abs_diff(&got.to_dtype(DType::F32).unwrap(), &want) < 5e-2);
    }

    #[test]
    fn empty_inner_dimension_gives_zeros_and_bad_shapes_are_errors() {
        let (a, b) = (det(&[3, 0], 1, DType::F32), det(&[0, 2], 2, DType::F32));
        assert_eq!(matmul(&a, &b).unwrap().sum_all().unwrap().to_scalar::<f32>().unwrap(), 0.0);
        assert!(matmul(&det(&[3, 4], 1, DType::F32), &det(&[5, 2], 2, DType::F32)).is_err());
        assert!(matmul(&det(&[3, 4], 1, DType::F32), &det(&[4, 2], 2, DType::F64)).is_err());
    }
}
