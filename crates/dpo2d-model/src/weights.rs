//! Loading Hugging Face safetensors checkpoints (single file or sharded) with
//! checks whose errors name the file and the tensor at fault.

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Storage, Tensor, WithDType};
use safetensors::tensor::{SafeTensors, TensorInfo};
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

/// A set of named tensors plus where each came from, so that a missing or
/// mis-shaped tensor can be reported against its file.
pub struct WeightSet {
    tensors: HashMap<String, Tensor>,
    origin: HashMap<String, PathBuf>,
    source: String,
}

impl WeightSet {
    /// Wrap an in-memory tensor map (e.g. dequantized GGUF tensors);
    /// `source` names it in error messages.
    pub fn from_map(tensors: HashMap<String, Tensor>, source: impl Into<String>) -> Self {
        Self { tensors, origin: HashMap::new(), source: source.into() }
    }

    /// Load `model.safetensors`, or `model.safetensors.index.json` and its
    /// shards, from a model directory. Tensors keep their stored dtype.
    pub fn load_dir(dir: &Path, device: &Device) -> Result<Self> {
        let files = weight_files(dir)?;
        let mut set = Self { tensors: HashMap::new(), origin: HashMap::new(), source: dir.display().to_string() };
        for f in files {
            let map = load_safetensors(&f, device)?;
            for (k, v) in map {
                set.origin.insert(k.clone(), f.clone());
                set.tensors.insert(k, v);
            }
        }
        Ok(set)
    }

    /// Load one safetensors file.
    pub fn load_file(path: &Path, device: &Device) -> Result<Self> {
        let map = load_safetensors(path, device)?;
        let origin = map.keys().map(|k| (k.clone(), path.to_path_buf())).collect();
        Ok(Self { tensors: map, origin, source: path.display().to_string() })
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }

    pub fn names(&self) -> BTreeSet<String> {
        self.tensors.keys().cloned().collect()
    }

    /// Where a tensor lives, for messages.
    fn where_is(&self, name: &str) -> String {
        match self.origin.get(name) {
            Some(p) => p.display().to_string(),
            None => self.source.clone(),
        }
    }

    /// Fetch a tensor and check its shape.
    pub fn get(&self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.tensors.get(name).with_context(|| format!("tensor `{name}` is missing from {}", self.source))?;
        if t.dims() != shape {
            bail!("tensor `{name}` in {} has shape {:?}, expected {:?}", self.where_is(name), t.dims(), shape);
        }
        Ok(t.clone())
    }

    /// [`Self::get`], handing the tensor over: a model that copies each
    /// weight into a parameter then holds one tensor twice at a time, not
    /// the whole model.
    pub fn take(&mut self, name: &str, shape: &[usize]) -> Result<Tensor> {
        let t = self.get(name, shape)?;
        self.tensors.remove(name);
        Ok(t)
    }

    /// Fetch a tensor if present (shape-checked).
    pub fn get_opt(&self, name: &str, shape: &[usize]) -> Result<Option<Tensor>> {
        if self.contains(name) {
            self.get(name, shape).map(Some)
        } else {
            Ok(None)
        }
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    pub fn into_map(self) -> HashMap<String, Tensor> {
        self.tensors
    }
}

/// The safetensors files of a model directory, checked to exist.
pub fn weight_files(dir: &Path) -> Result<Vec<PathBuf>> {
    if !dir.is_dir() {
        bail!("model directory {} does not exist", dir.display());
    }
    let single = dir.join("model.safetensors");
    if single.is_file() {
        return Ok(vec![single]);
    }
    let index = dir.join("model.safetensors.index.json");
    if index.is_file() {
        let text = std::fs::read_to_string(&index).with_context(|| format!("cannot read {}", index.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text).with_context(|| format!("{}: not valid JSON", index.display()))?;
        let wm =
            v.get("weight_map").and_then(|w| w.as_object()).with_context(|| format!("{}: missing `weight_map` object", index.display()))?;
        let mut shards = BTreeSet::new();
        for (name, file) in wm {
            let f = file.as_str().with_context(|| format!("{}: shard for `{name}` must be a file name", index.display()))?;
            shards.insert(f.to_string());
        }
        let mut out = vec![];
        for s in shards {
            let p = dir.join(&s);
            if !p.is_file() {
                bail!("shard {} listed in {} does not exist", p.display(), index.display());
            }
            out.push(p);
        }
        return Ok(out);
    }
    bail!("no weights in {}: expected model.safetensors or model.safetensors.index.json", dir.display())
}

/// Runs `$body` with `$T` bound to the Rust type of `$dtype`, for the dtypes
/// that saving and loading move as plain values (bytes as they are in memory
/// on a little-endian machine); evaluates `$other` for the rest.
macro_rules! with_stored_type {
    ($dtype:expr, $T:ident => $body:expr, other => $other:expr) => {
        $crate::weights::with_stored_type!(@match $dtype, $T, $body, $other,
            [F32: f32, F64: f64, BF16: half::bf16, F16: half::f16, U32: u32, I64: i64, U8: u8])
    };
    (@match $dtype:expr, $T:ident, $body:expr, $other:expr, [$($d:ident: $ty:ty),*]) => {
        match $dtype {
            $(candle_core::DType::$d => {
                type $T = $ty;
                $body
            })*
            _ => $other,
        }
    };
}
pub(crate) use with_stored_type;

/// One safetensors file, opened: its validated header and where the tensor
/// data starts.
struct SafetensorsFile {
    file: std::fs::File,
    data_start: u64,
    tensors: Vec<(String, TensorInfo)>,
}

/// Open one safetensors file. The header is validated against the file
/// length here, so a truncated file fails on opening, without reading the
/// tensor data.
fn open(path: &Path) -> Result<SafetensorsFile> {
    if !path.is_file() {
        bail!("weights file {} does not exist", path.display());
    }
    let file = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    // The header check needs the whole file as one slice (it compares the
    // offsets with the length); a map gives that while reading only the
    // header's pages.
    // SAFETY: the file is only read; modifying it while loading is the caller's
    // problem, as with any memory-mapped checkpoint loader.
    let map = unsafe { memmap2::Mmap::map(&file) }.with_context(|| format!("cannot map {}", path.display()))?;
    let (header_len, metadata) = SafeTensors::read_metadata(&map)
        .map_err(|e| anyhow::anyhow!("{} is not a valid safetensors file (truncated or corrupt?): {e}", path.display()))?;
    let tensors = metadata.tensors().into_iter().map(|(name, info)| (name, info.clone())).collect();
    Ok(SafetensorsFile { file, data_start: 8 + header_len as u64, tensors })
}

/// Whether `path` is a complete, readable safetensors file (its header
/// parses and its data is all there), without loading it.
pub fn check_file(path: &Path) -> Result<()> {
    open(path).map(drop)
}

/// Read every tensor of one safetensors file onto `device`, in its stored
/// dtype, refusing NaN and infinite values.
///
/// Each tensor is read from the file straight into its own buffer. Copying
/// tensors out of a map of the whole file instead made every page of the
/// file count towards the process's resident memory until the last tensor
/// was copied: twice the model's size at the peak on the CPU, and the whole
/// checkpoint in host memory while loading onto a GPU. On the CPU the
/// tensors are read in parallel; onto another device one at a time, so the
/// host holds one tensor's bytes at most.
pub fn load_safetensors(path: &Path, device: &Device) -> Result<HashMap<String, Tensor>> {
    use rayon::prelude::*;
    let st = open(path)?;
    let read = |(name, info): &(String, TensorInfo)| -> Result<(String, Tensor)> {
        let t = st.read(name, info, device).with_context(|| format!("{}", path.display()))?;
        Ok((name.clone(), t))
    };
    if device.is_cpu() {
        st.tensors.par_iter().map(read).collect()
    } else {
        st.tensors.iter().map(read).collect()
    }
}

impl SafetensorsFile {
    /// One tensor, read at its offset into a buffer of its element type.
    fn read(&self, name: &str, info: &TensorInfo, device: &Device) -> Result<Tensor> {
        let dtype = DType::try_from(info.dtype)
            .map_err(|_| anyhow::anyhow!("tensor `{name}` has dtype {:?}, which dpo2d cannot load", info.dtype))?;
        let offset = self.data_start + info.data_offsets.0 as u64;
        let shape = info.shape.as_slice();
        with_stored_type!(dtype, T => self.read_as::<T>(name, dtype, offset, shape, device), other => {
            // Rarer types go through a byte buffer and candle's conversion.
            let mut bytes = vec![0u8; info.data_offsets.1 - info.data_offsets.0];
            self.read_bytes(name, &mut bytes, offset)?;
            Ok(Tensor::from_raw_buffer(&bytes, dtype, shape, device)?)
        })
    }

    fn read_as<T: WithDType + bytemuck::Pod>(
        &self,
        name: &str,
        dtype: DType,
        offset: u64,
        shape: &[usize],
        device: &Device,
    ) -> Result<Tensor> {
        let mut values = vec![T::zeroed(); shape.iter().product()];
        let bytes: &mut [u8] = bytemuck::cast_slice_mut(&mut values);
        self.read_bytes(name, bytes, offset)?;
        // Checked on the stored bytes, before any device copy.
        let bad = count_non_finite(dtype, bytes);
        if bad > 0 {
            bail!("{}", non_finite_message(name, bad));
        }
        if cfg!(target_endian = "big") {
            bytes.chunks_exact_mut(std::mem::size_of::<T>()).for_each(<[u8]>::reverse);
        }
        Ok(Tensor::from_vec(values, shape, device)?)
    }

    fn read_bytes(&self, name: &str, bytes: &mut [u8], offset: u64) -> Result<()> {
        use std::os::unix::fs::FileExt;
        self.file.read_exact_at(bytes, offset).with_context(|| format!("cannot read tensor `{name}`"))
    }
}

/// How many NaN or infinite values `bytes` (little-endian values of `dtype`)
/// hold, read in place in one pass on every core (a 7B checkpoint is 15 GB
/// to read). Integer types hold none.
pub(crate) fn count_non_finite(dtype: DType, bytes: &[u8]) -> usize {
    /// Values whose exponent bits are all set are NaN or infinite.
    fn count<const N: usize>(bytes: &[u8], exponent: u64) -> usize {
        use rayon::prelude::*;
        let bits = |c: &[u8]| {
            let mut b = [0u8; 8];
            b[..N].copy_from_slice(c);
            u64::from_le_bytes(b)
        };
        let whole = bytes.len() / N * N;
        bytes[..whole].par_chunks(N << 16).map(|part| part.chunks_exact(N).filter(|c| bits(c) & exponent == exponent).count()).sum()
    }
    match dtype {
        DType::F32 => count::<4>(bytes, 0x7f80_0000),
        DType::F64 => count::<8>(bytes, 0x7ff0_0000_0000_0000),
        DType::F16 => count::<2>(bytes, 0x7c00),
        DType::BF16 => count::<2>(bytes, 0x7f80),
        _ => 0,
    }
}

/// NaN and infinite values in an f32 tensor held on the CPU.
pub(crate) fn count_non_finite_f32(t: &Tensor) -> Result<usize> {
    {
        let (storage, layout) = t.storage_and_layout();
        if let (Storage::Cpu(cpu), Some((start, end))) = (&*storage, layout.contiguous_offsets()) {
            return Ok(cpu.as_slice::<f32>()?[start..end].iter().filter(|x| !x.is_finite()).count());
        }
    }
    Ok(t.flatten_all()?.to_vec1::<f32>()?.iter().filter(|x| !x.is_finite()).count())
}

/// The error text for a tensor with `n` non-finite values.
pub(crate) fn non_finite_message(name: &str, n: usize) -> String {
    format!("{name}: {n} non-finite value(s) (NaN/inf); the weights are corrupt or were saved from a diverged run")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn load_check_and_errors() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let a = Tensor::zeros((2, 3), DType::F32, &dev).unwrap();
        let mut m = HashMap::new();
        m.insert("a".to_string(), a);
        let file = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&m, &file).unwrap();
        let w = WeightSet::load_dir(dir.path(), &dev).unwrap();
        assert_eq!(w.get("a", &[2, 3]).unwrap().dims(), &[2, 3]);
        let e = format!("{:#}", w.get("a", &[3, 2]).unwrap_err());
        assert!(e.contains("model.safetensors") && e.contains("`a`") && e.contains("[3, 2]"), "{e}");
        let e = format!("{:#}", w.get("b", &[1]).unwrap_err());
        assert!(e.contains("`b`") && e.contains("missing"), "{e}");
        // Truncate the file.
        let bytes = std::fs::read(&file).unwrap();
        std::fs::write(&file, &bytes[..bytes.len() - 5]).unwrap();
        let e = format!("{:#}", WeightSet::load_dir(dir.path(), &dev).err().unwrap());
        assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
        // No weights at all.
        std::fs::remove_file(&file).unwrap();
        let e = format!("{:#}", WeightSet::load_dir(dir.path(), &dev).err().unwrap());
        assert!(e.contains("model.safetensors"), "{e}");
    }

    #[test]
    fn non_finite_weights_are_refused_naming_the_tensor() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let name = "model.layers.0.mlp.up_proj.weight";
        let mut v = vec![0.5f32; 12];
        (v[1], v[5], v[11]) = (f32::NAN, f32::INFINITY, f32::NEG_INFINITY);
        for dtype in [DType::F32, DType::BF16, DType::F16, DType::F64] {
            let mut m = HashMap::new();
            m.insert(name.to_string(), Tensor::from_vec(v.clone(), (3, 4), &dev).unwrap().to_dtype(dtype).unwrap());
            m.insert("ok".to_string(), Tensor::ones(4, dtype, &dev).unwrap());
            candle_core::safetensors::save(&m, dir.path().join("model.safetensors")).unwrap();
            let e = format!("{:#}", WeightSet::load_dir(dir.path(), &dev).err().unwrap());
            assert!(e.contains("model.safetensors") && e.contains(&format!("{name}: 3 non-finite value(s) (NaN/inf)")), "{dtype:?}: {e}");
        }
        // Largest finite values and integers pass.
        let mut m = HashMap::new();
        m.insert("big".to_string(), Tensor::new(&[f32::MAX, f32::MIN, -0.0], &dev).unwrap());
        m.insert("ids".to_string(), Tensor::new(&[u32::MAX, 0x7f80_0000], &dev).unwrap());
        candle_core::safetensors::save(&m, dir.path().join("model.safetensors")).unwrap();
        assert_eq!(WeightSet::load_dir(dir.path(), &dev).unwrap().names().len(), 2);
        let t = Tensor::new(&[1f32, f32::NAN, 2.0, f32::INFINITY], &dev).unwrap();
        assert_eq!(count_non_finite_f32(&t).unwrap(), 2);
        assert_eq!(count_non_finite_f32(&t.narrow(0, 2, 2).unwrap()).unwrap(), 1);
        // Counted in parallel parts: values on the parts' edges count once.
        let mut big = vec![1f32; 300_001];
        for i in [0, 65_535, 65_536, 131_072, 300_000] {
            big[i] = f32::NAN;
        }
        let bytes: Vec<u8> = big.iter().flat_map(|v| v.to_le_bytes()).collect();
        assert_eq!(count_non_finite(DType::F32, &bytes), 5);
        assert_eq!(count_non_finite(DType::F32, &bytes[..bytes.len() - 2]), 4);
    }

    #[test]
    fn every_dtype_reads_back_at_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        let base = Tensor::arange(-7f32, 10., &dev).unwrap();
        let mut m = HashMap::new();
        for dtype in [DType::F32, DType::F64, DType::BF16, DType::F16, DType::U8, DType::U32, DType::I64, DType::I32, DType::I16] {
            // Odd lengths put every later tensor at an offset unaligned for wider types.
            let t = if matches!(dtype, DType::U8 | DType::U32) { base.abs().unwrap() } else { base.clone() };
            m.insert(format!("{dtype:?}"), t.narrow(0, 0, 17 - m.len()).unwrap().to_dtype(dtype).unwrap());
        }
        m.insert("empty".to_string(), Tensor::zeros((0, 3), DType::F32, &dev).unwrap());
        let file = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&m, &file).unwrap();
        let back = load_safetensors(&file, &dev).unwrap();
        assert_eq!(back.len(), m.len());
        for (name, want) in &m {
            let got = &back[name];
            assert_eq!((got.dtype(), got.dims()), (want.dtype(), want.dims()), "{name}");
            let (g, w) = (got.flatten_all().unwrap(), want.flatten_all().unwrap());
            let (g, w) =
                (g.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap(), w.to_dtype(DType::F64).unwrap().to_vec1::<f64>().unwrap());
            assert_eq!(g, w, "{name}");
        }
    }

    #[test]
    fn sharded_index() {
        let dir = tempfile::tempdir().unwrap();
        let dev = Device::Cpu;
        for (i, name) in ["x", "y"].iter().enumerate() {
            let mut m = HashMap::new();
            m.insert(name.to_string(), Tensor::ones(3, DType::F32, &dev).unwrap());
            candle_core::safetensors::save(&m, dir.path().join(format!("model-0000{}-of-00002.safetensors", i + 1))).unwrap();
        }
        let idx = r#"{"metadata":{},"weight_map":{"x":"model-00001-of-00002.safetensors","y":"model-00002-of-00002.safetensors"}}"#;
        std::fs::write(dir.path().join("model.safetensors.index.json"), idx).unwrap();
        let w = WeightSet::load_dir(dir.path(), &dev).unwrap();
        assert!(w.contains("x") && w.contains("y"));
        std::fs::remove_file(dir.path().join("model-00002-of-00002.safetensors")).unwrap();
        let e = format!("{:#}", WeightSet::load_dir(dir.path(), &dev).err().unwrap());
        assert!(e.contains("model-00002-of-00002.safetensors") && e.contains("does not exist"), "{e}");
    }
}

/// Mutated safetensors files: loading fails with a message naming the file,
/// never a panic. Set `PROPTEST_CASES` for more cases.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzz::{config, edits, mutate};
    use proptest::prelude::*;
    use std::sync::OnceLock;

    /// A small file with tensors of several dtypes, and its header length.
    fn seed() -> &'static (Vec<u8>, usize) {
        static SEED: OnceLock<(Vec<u8>, usize)> = OnceLock::new();
        SEED.get_or_init(|| {
            let dev = Device::Cpu;
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("seed.safetensors");
            let a = Tensor::arange(0f32, 24., &dev).unwrap().reshape((4, 6)).unwrap();
            let m: HashMap<String, Tensor> = [
                ("model.embed_tokens.weight".to_string(), a.clone()),
                ("model.norm.weight".to_string(), a.to_dtype(DType::BF16).unwrap()),
                ("lm_head.weight".to_string(), a.to_dtype(DType::F16).unwrap().narrow(0, 0, 2).unwrap()),
                ("ids".to_string(), Tensor::new(&[1u32, 2, 3], &dev).unwrap()),
            ]
            .into_iter()
            .collect();
            candle_core::safetensors::save(&m, &p).unwrap();
            let bytes = std::fs::read(&p).unwrap();
            let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
            (bytes, header)
        })
    }

    proptest! {
        #![proptest_config(config(2000))]

        #[test]
        fn mutated_safetensors_load_or_fail_cleanly(e in edits(6)) {
            let (bytes, header) = seed();
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("model.safetensors");
            std::fs::write(&p, mutate(bytes.clone(), *header, &e)).unwrap();
            if let Err(err) = WeightSet::load_file(&p, &Device::Cpu) {
                let msg = format!("{err:#}");
                prop_assert!(msg.contains("model.safetensors"), "{msg}");
            }
        }
    }
}
