//! Write access to the elements of many tensors at once, for kernels that
//! update many tensors in one pass (AdamW over every parameter).
//!
//! candle's in-place ops lend one tensor's storage mutably at a time. Here
//! each tensor's in-place op lends its storage and, while it holds it, runs
//! the next tensor's: at the innermost one every storage is locked for
//! writing and `body` gets all their addresses. Nothing else can touch the
//! storages meanwhile, so writing through the addresses (disjoint tensors,
//! checked) is as safe as writing through the `&mut` they come from.

use candle_core::backend::BackendStorage;
use candle_core::{bail, CpuStorage, DType, InplaceOp1, Layout, Result, Tensor};
use std::cell::RefCell;

/// The contiguous elements of one locked tensor: a host address on the CPU
/// (exposed provenance of the `&mut` it came from), a device address on a
/// GPU.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Dst {
    pub addr: usize,
    pub len: usize,
    pub dtype: DType,
}

/// Calls `body` with the addresses of every tensor in `ts` (in order), all
/// locked for writing. The tensors must be contiguous, on one device, and
/// distinct.
pub(crate) fn with_all_mut(ts: &[&Tensor], body: &dyn Fn(&[Dst]) -> Result<()>) -> Result<()> {
    // Two tensors on one storage would lock it twice (a deadlock): compare
    // the storages' addresses, each read-locked for a moment.
    let mut storages: Vec<usize> = ts.iter().map(|t| std::ptr::from_ref(&*t.storage_and_layout().0).addr()).collect();
    storages.sort_unstable();
    if storages.windows(2).any(|w| w[0] == w[1]) {
        bail!("lock_all: two of the tensors share a storage");
    }
    if ts.iter().any(|t| !t.device().same_device(ts[0].device())) {
        bail!("lock_all: the tensors are on different devices");
    }
    let Some((first, rest)) = ts.split_first() else { return body(&[]) };
    let dsts = RefCell::new(Vec::with_capacity(ts.len()));
    first.inplace_op1(&Nest { rest, dsts: &dsts, body })
}

/// One level of the nesting: holds its tensor, locks the next.
struct Nest<'a> {
    rest: &'a [&'a Tensor],
    dsts: &'a RefCell<Vec<Dst>>,
    body: &'a dyn Fn(&[Dst]) -> Result<()>,
}

impl Nest<'_> {
    fn next(&self, d: Dst) -> Result<()> {
        self.dsts.borrow_mut().push(d);
        match self.rest.split_first() {
            Some((t, rest)) => t.inplace_op1(&Nest { rest, dsts: self.dsts, body: self.body }),
            None => (self.body)(&self.dsts.borrow()),
        }
    }
}

fn range(l: &Layout) -> Result<(usize, usize)> {
    match l.contiguous_offsets() {
        Some(r) => Ok(r),
        None => bail!("lock_all: a tensor is not contiguous"),
    }
}

impl InplaceOp1 for Nest<'_> {
    fn name(&self) -> &'static str {
        "dpo2d-lock-all"
    }

    fn cpu_fwd(&self, s: &mut CpuStorage, l: &Layout) -> Result<()> {
        let (a, b) = range(l)?;
        let addr = match s {
            CpuStorage::F32(v) => v[a..b].as_mut_ptr().expose_provenance(),
            CpuStorage::BF16(v) => v[a..b].as_mut_ptr().expose_provenance(),
            CpuStorage::F64(v) => v[a..b].as_mut_ptr().expose_provenance(),
            _ => bail!("lock_all: no kernel writes {:?}", s.dtype()),
        };
        self.next(Dst { addr, len: b - a, dtype: s.dtype() })
    }

    #[cfg(feature = "cuda")]
    fn cuda_fwd(&self, s: &mut candle_core::CudaStorage, l: &Layout) -> Result<()> {
        let (a, b) = range(l)?;
        let dtype = s.dtype();
        let addr = super::cuda::device_addr_mut(s)? as usize + a * dtype.size_in_bytes();
        self.next(Dst { addr, len: b - a, dtype })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn writes_reach_every_tensor() -> Result<()> {
        // Deep enough for every parameter of a large model, on a test
        // thread's stack.
        let ts: Vec<Tensor> = (0..3000).map(|i| Tensor::zeros(i % 5 + 1, DType::F32, &Device::Cpu)).collect::<Result<_>>()?;
        let refs: Vec<&Tensor> = ts.iter().collect();
        with_all_mut(&refs, &|dsts| {
            for (i, d) in dsts.iter().enumerate() {
                // SAFETY: each address is a locked tensor's `len` f32 elements.
                let s = unsafe { std::slice::from_raw_parts_mut(std::ptr::with_exposed_provenance_mut::<f32>(d.addr), d.len) };
                s.fill(i as f32);
            }
            Ok(())
        })?;
        for (i, t) in ts.iter().enumerate() {
            assert_eq!(t.to_vec1::<f32>()?, vec![i as f32; i % 5 + 1]);
        }
        Ok(())
    }

    #[test]
    fn refuses_a_storage_twice_and_strided_tensors() -> Result<()> {
        let a = Tensor::zeros(3, DType::F32, &Device::Cpu)?;
        assert!(with_all_mut(&[&a, &a], &|_| Ok(())).is_err());
        assert!(with_all_mut(&[&a, &a.reshape((1, 3))?], &|_| Ok(())).is_err());
        let m = Tensor::zeros((2, 3), DType::F32, &Device::Cpu)?.t()?;
        assert!(with_all_mut(&[&m], &|_| Ok(())).is_err());
        Ok(())
    }
}
