//! A linear layer with a LoRA adapter, `y = W x + b + B (s A dropout(x))`,
//! as one graph node with its own backward.
//!
//! Why: composed, the adapter adds a dropout node, two products, a scaling
//! and an add, and candle's graph keeps their inputs for backward: the
//! dropped-out input and, per adapted layer, three `[tokens x out]`
//! tensors (the base output, the adapter's output before and after the
//! scaling) that no gradient needs. Here the node keeps `s h = s A
//! dropout(x)` (`[tokens x r]`) and the dropout's stream position; backward
//! draws the dropout mask again. On the CPU the base product and the
//! adapter's accumulate into one buffer ([`super::gemm::matmul_sum`]).
//!
//! Backward, with `g` the output's gradient and `xd = dropout(x)`:
//! `dB = g^T (s h)`, `dh = s g B`, `dA = dh^T xd`,
//! `dx = g W + dropout(dh A)` (the same mask).

use super::gemm::{matmul, matmul_sum};
use crate::ops::{precomputed3, tracked};
use candle_core::{bail, Result, Tensor};

/// The adapter's part: `A` `[r, in]`, `B` `[out, r]`, the scaling `s`, and
/// the dropout (probability and the stream's position; `p = 0`: none).
pub struct Adapter<'a> {
    pub a: &'a Tensor,
    pub b: &'a Tensor,
    pub scale: f64,
    pub dropout: Option<(f64, u64)>,
}

/// `x`: `[.., in]`; `w`: the frozen `[out, in]` weight; `bias`: `[out]`
/// (frozen). Returns `[.., out]`.
pub fn lora_linear(x: &Tensor, w: &Tensor, bias: Option<&Tensor>, ad: Adapter) -> Result<Tensor> {
    let dims = x.dims().to_vec();
    let inp = *dims.last().unwrap_or(&0);
    let rows = x.elem_count() / inp.max(1);
    let (out_f, w_in) = w.dims2()?;
    let (r, a_in) = ad.a.dims2()?;
    if w_in != inp || a_in != inp || ad.b.dims() != [out_f, r] {
        bail!("lora linear: x {dims:?}, W {:?}, A {:?}, B {:?} do not fit", w.dims(), ad.a.dims(), ad.b.dims());
    }
    let (w, a, b) = (w.detach(), ad.a.detach(), ad.b.detach());
    let x2 = x.detach().reshape((rows, inp))?;
    // dropout(t) with the adapter's mask, outside autograd (the same mask every call).
    let dropout = ad.dropout.filter(|(p, _)| *p > 0.0);
    let dropped = move |t: &Tensor| match dropout {
        Some((p, start)) => super::dropout::dropout(&t.detach(), start, p),
        None => Ok(t.clone()),
    };
    let xd = dropped(&x2)?;
    let hs = (matmul(&xd, &a.t()?)? * ad.scale)?;
    // As large as the input, and backward draws it again: freed now.
    drop(xd);
    let mut y = matmul_sum(&[(&x2, &w.t()?), (&hs, &b.t()?)])?;
    if let Some(bias) = bias {
        y = y.broadcast_add(&bias.detach())?;
    }
    let mut od = dims.clone();
    *od.last_mut().expect("x has a last dim") = out_f;
    let y = y.reshape(od)?;
    if !(tracked(x) || tracked(ad.a) || tracked(ad.b)) {
        return Ok(y);
    }
    let scale = ad.scale;
    let bwd = move |args: &[&Tensor], g: &Tensor| -> Result<Vec<Option<Tensor>>> {
        let (x, a_var, b_var) = (args[0], args[1], args[2]);
        let g2 = g.reshape((rows, out_f))?;
        let dh = (matmul(&g2, &b)? * scale)?;
        let x2 = x.detach().reshape((rows, inp))?;
        let da = tracked(a_var).then(|| matmul(&dh.t()?, &dropped(&x2)?)).transpose()?;
        let db = tracked(b_var).then(|| matmul(&g2.t()?, &hs)).transpose()?;
        let dx = tracked(x)
            .then(|| -> Result<Tensor> {
                let dx = match dropout {
                    None => matmul_sum(&[(&g2, &w), (&dh, &a)])?,
                    Some(_) => (matmul(&g2, &w)? + dropped(&matmul(&dh, &a)?)?)?,
                };
                dx.reshape(x.dims())
            })
            .transpose()?;
        Ok(vec![dx, da, db])
    };
    precomputed3("dpo2d-lora-linear", x, ad.a, ad.b, y, Box::new(bwd))
}

#[cfg(test)]
mod tests {
    use super::{lora_linear, Adapter};
    use crate::ops::linear;
    use crate::test_support::{assert_close, det};
    use candle_core::{DType, Tensor, Var};

    /// The node against the composed layer (`linear(x, W, b) + s *
    /// linear(linear(dropout(x), A), B)`, the same mask): the output and the
    /// gradients of `x`, `A` and `B`, with and without dropout, with a bias,
    /// and with an input that takes no gradient.
    #[test]
    fn matches_composed_values_and_gradients() {
        for (p, bias, x_tracked, dt, tol) in [
            (0.0, false, true, DType::F64, 1e-12),
            (0.3, true, true, DType::F64, 1e-12),
            (0.3, false, false, DType::F64, 1e-12),
            (0.1, true, true, DType::F32, 1e-5),
        ] {
            let (rows, inp, out, r) = (vec![2, 7], 12, 9, 3);
            let x = Var::from_tensor(&det(&[rows.clone(), vec![inp]].concat(), 1, dt)).unwrap();
            let xt = if x_tracked { x.as_tensor().clone() } else { x.as_tensor().detach() };
            let w = det(&[out, inp], 2, dt);
            let b_bias = bias.then(|| det(&[out], 3, dt));
            let a = Var::from_tensor(&det(&[r, inp], 4, dt)).unwrap();
            let b = Var::from_tensor(&det(&[out, r], 5, dt)).unwrap();
            let (scale, start) = (2.5, 99u64);
            let proj = det(&[rows.clone(), vec![out]].concat(), 6, dt);

            let dropped = if p > 0.0 { crate::dropout::dropout(&xt, start, p).unwrap() } else { xt.clone() };
            let delta = (linear(&linear(&dropped, a.as_tensor(), None).unwrap(), b.as_tensor(), None).unwrap() * scale).unwrap();
            let composed = (linear(&xt, &w, b_bias.as_ref()).unwrap() + delta).unwrap();
            let want = (&composed * &proj).unwrap().sum_all().unwrap().backward().unwrap();

            let ad = Adapter { a: a.as_tensor(), b: b.as_tensor(), scale, dropout: Some((p, start)) };
            let fused = lora_linear(&xt, &w, b_bias.as_ref(), ad).unwrap();
            let got = (&fused * &proj).unwrap().sum_all().unwrap().backward().unwrap();

            let close =
                |g: &Tensor, w: &Tensor, what: &str| assert_close(g, w, tol, &format!("p {p} bias {bias} x tracked {x_tracked} {what}"));
            close(&fused, &composed, "value");
            for (v, what) in [(&a, "A"), (&b, "B")] {
                close(got.get(v.as_tensor()).unwrap(), want.get(v.as_tensor()).unwrap(), what);
            }
            match (got.get(x.as_tensor()), want.get(x.as_tensor())) {
                (Some(g), Some(w)) => close(g, w, "x"),
                (None, None) => assert!(!x_tracked),
                _ => panic!("x's gradient on one side only"),
            }
        }
    }

    #[test]
    fn rejects_mismatched_shapes() {
        let x = det(&[3, 4], 1, DType::F32);
        let (w, a, b) = (det(&[5, 4], 2, DType::F32), det(&[2, 3], 3, DType::F32), det(&[5, 2], 4, DType::F32));
        assert!(lora_linear(&x, &w, None, Adapter { a: &a, b: &b, scale: 1.0, dropout: None }).is_err());
    }
}
