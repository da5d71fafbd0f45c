//! Test tensors and closeness assertions: this crate's tests, the model's,
//! and (through the `test-support` feature) other crates' tests.

use candle_core::{DType, Device, Result, Tensor, Var};

/// Deterministic pseudo-random tensor with entries in [-1, 1) (no RNG
/// dependency, the same numbers on every machine; the kernel check's inputs).
pub fn det(shape: &[usize], seed: u64, dtype: DType) -> Tensor {
    crate::check::det(shape, seed).and_then(|t| t.to_dtype(dtype)).expect("float dtype")
}

/// Largest absolute elementwise difference of two tensors of one shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    let d = (a.to_dtype(DType::F64).and_then(|a| a - b.to_dtype(DType::F64)?)).and_then(|d| d.abs()?.max_all()?.to_scalar::<f64>());
    d.expect("tensors of one shape")
}

/// Asserts `got` is within `tol` of `want`, relative to `want`'s largest
/// magnitude (at least 1); `what` names the pair in the failure.
pub fn assert_close(got: &Tensor, want: &Tensor, tol: f64, what: &str) {
    let scale = want.abs().and_then(|t| t.max_all()?.to_dtype(DType::F64)?.to_scalar::<f64>()).expect("a float tensor").max(1.0);
    let d = max_abs_diff(got, want);
    assert!(d <= tol * scale, "{what}: max abs diff {d} (tolerance {tol} x {scale})");
}

/// Check d(sum(f(x) * proj))/dx from autograd against central finite
/// differences, for every input in `xs` (f64).
pub fn grad_check(xs: &[Tensor], f: &dyn Fn(&[Tensor]) -> Result<Tensor>, tol: f64) {
    let vars: Vec<Var> = xs.iter().map(|x| Var::from_tensor(x).unwrap()).collect();
    let ts: Vec<Tensor> = vars.iter().map(|v| v.as_tensor().clone()).collect();
    let y = f(&ts).unwrap();
    let proj = det(y.dims(), 99, DType::F64);
    let loss = (y * &proj).unwrap().sum_all().unwrap();
    let grads = loss.backward().unwrap();
    let eps = 1e-6;
    for (i, x) in xs.iter().enumerate() {
        let g = grads.get(vars[i].as_tensor()).expect("no gradient").flatten_all().unwrap().to_vec1::<f64>().unwrap();
        let base = x.flatten_all().unwrap().to_vec1::<f64>().unwrap();
        // Check a subset of coordinates to keep it quick.
        let step = (base.len() / 40).max(1);
        for j in (0..base.len()).step_by(step) {
            let eval = |d: f64| {
                let mut b = base.clone();
                b[j] += d;
                let mut ins: Vec<Tensor> = xs.to_vec();
                ins[i] = Tensor::from_vec(b, x.dims(), &Device::Cpu).unwrap();
                (f(&ins).unwrap() * &proj).unwrap().sum_all().unwrap().to_scalar::<f64>().unwrap()
            };
            let fd = (eval(eps) - eval(-eps)) / (2.0 * eps);
            assert!((fd - g[j]).abs() <= tol * (1.0 + fd.abs()), "input {i} coord {j}: autograd {} vs finite difference {fd}", g[j]);
        }
    }
}
