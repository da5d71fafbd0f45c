//! Bad inputs to the model commands: each must fail with a clear message
//! naming the file and the problem, a non-zero exit status and no panic.

use std::path::Path;
use std::process::Command;

/// Run `dpo2d args...`, expect failure; return stderr.
fn fails(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_dpo2d")).args(args).output().unwrap();
    let err = String::from_utf8_lossy(&out.stderr).to_string();
    assert!(!out.status.success(), "expected failure for {args:?}; stderr: {err}");
    assert!(!err.contains("panicked"), "panic for {args:?}: {err}");
    assert!(err.contains("error:"), "{err}");
    err
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A minimal valid-looking HF directory whose weights the test then breaks.
fn write_dir(dir: &Path, config: &str) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config).unwrap();
    // A one-character byte-level tokenizer is enough to get past tokenizer loading.
    let tok = r#"{"version":"1.0","truncation":null,"padding":null,"added_tokens":[],"normalizer":null,
      "pre_tokenizer":{"type":"ByteLevel","add_prefix_space":false,"trim_offsets":true,"use_regex":true},
      "post_processor":null,"decoder":{"type":"ByteLevel","add_prefix_space":true,"trim_offsets":true,"use_regex":true},
      "model":{"type":"BPE","dropout":null,"unk_token":null,"continuing_subword_prefix":null,"end_of_word_suffix":null,
      "fuse_unk":false,"byte_fallback":false,"vocab":{"a":0,"b":1},"merges":[]}}"#;
    std::fs::write(dir.join("tokenizer.json"), tok).unwrap();
}

const CONFIG: &str = r#"{"architectures":["LlamaForCausalLM"],"vocab_size":8,"hidden_size":8,"intermediate_size":16,
  "num_hidden_layers":1,"num_attention_heads":2,"num_key_value_heads":1,"rms_norm_eps":1e-5,"tie_word_embeddings":true}"#;

/// Safetensors bytes for the given (name, shape) f32 tensors (zeros).
fn safetensors(tensors: &[(&str, Vec<usize>)]) -> Vec<u8> {
    let mut header = serde_json::Map::new();
    let mut off = 0usize;
    for (n, shape) in tensors {
        let bytes = shape.iter().product::<usize>() * 4;
        header.insert(n.to_string(), serde_json::json!({"dtype": "F32", "shape": shape, "data_offsets": [off, off + bytes]}));
        off += bytes;
    }
    let h = serde_json::to_string(&serde_json::Value::Object(header)).unwrap();
    let mut out = (h.len() as u64).to_le_bytes().to_vec();
    out.extend(h.as_bytes());
    out.extend(vec![0u8; off]);
    out
}

fn full_weights(q_rows: usize) -> Vec<(&'static str, Vec<usize>)> {
    vec![
        ("model.embed_tokens.weight", vec![8, 8]),
        ("model.norm.weight", vec![8]),
        ("model.layers.0.self_attn.q_proj.weight", vec![q_rows, 8]),
        ("model.layers.0.self_attn.k_proj.weight", vec![4, 8]),
        ("model.layers.0.self_attn.v_proj.weight", vec![4, 8]),
        ("model.layers.0.self_attn.o_proj.weight", vec![8, 8]),
        ("model.layers.0.mlp.gate_proj.weight", vec![16, 8]),
        ("model.layers.0.mlp.up_proj.weight", vec![16, 8]),
        ("model.layers.0.mlp.down_proj.weight", vec![8, 16]),
        ("model.layers.0.input_layernorm.weight", vec![8]),
        ("model.layers.0.post_attention_layernorm.weight", vec![8]),
    ]
}

#[test]
fn missing_model() {
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("no-such-model");
    let e = fails(&["generate", "--model", s(&m), "--prompt", "hi"]);
    assert!(e.contains("no-such-model") && e.contains("does not exist"), "{e}");
    let e = fails(&["logprobs", "--model", s(&m), "--prompt", "hi", "--response", "x"]);
    assert!(e.contains("no-such-model"), "{e}");
    let e = fails(&["model", "convert", s(&t.path().join("absent.gguf")), s(&t.path().join("out"))]);
    assert!(e.contains("absent.gguf") && e.contains("does not exist"), "{e}");
}

/// Free-text values may start with `-`: they reach the model loader instead
/// of being taken for an unknown option.
#[test]
fn free_text_values_may_start_with_a_dash() {
    let t = tempfile::tempdir().unwrap();
    let m = t.path().join("no-such-model");
    for args in [
        vec!["generate", "--model", s(&m), "--prompt", "- x"],
        vec!["generate", "--model", s(&m), "--system", "-be brief", "--prompt", "-x"],
        vec!["logprobs", "--model", s(&m), "--prompt", "- a", "--response", "- b"],
        vec!["logprobs", "--model", s(&m), "--system", "-s", "--prompt", "a", "--response", "-1"],
    ] {
        let e = fails(&args);
        assert!(e.contains("no-such-model") && e.contains("does not exist"), "{args:?}: {e}");
    }
}

/// A finite-looking checkpoint with NaN in one tensor is refused, naming it.
#[test]
fn non_finite_weights_are_refused() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("m");
    write_dir(&d, CONFIG);
    let weights = full_weights(8);
    let mut bytes = safetensors(&weights);
    // Poison the last value of up_proj, found through its data_offsets.
    let header_len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&bytes[8..8 + header_len]).unwrap();
    let end = header["model.layers.0.mlp.up_proj.weight"]["data_offsets"][1].as_u64().unwrap() as usize;
    bytes[8 + header_len + end - 4..8 + header_len + end].copy_from_slice(&f32::NAN.to_le_bytes());
    std::fs::write(d.join("model.safetensors"), bytes).unwrap();
    let e = fails(&["generate", "--model", s(&d), "--prompt", "a"]);
    assert!(e.contains("model.safetensors") && e.contains("model.layers.0.mlp.up_proj.weight: 1 non-finite value(s)"), "{e}");
}

#[test]
fn missing_weights_file() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("m");
    write_dir(&d, CONFIG);
    let e = fails(&["generate", "--model", s(&d), "--prompt", "a"]);
    assert!(e.contains("model.safetensors") && e.contains(s(&d)), "{e}");
}

#[test]
fn unknown_architecture_and_missing_field() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("m");
    write_dir(&d, &CONFIG.replace("LlamaForCausalLM", "MambaForCausalLM"));
    let e = fails(&["generate", "--model", s(&d), "--prompt", "a"]);
    assert!(e.contains("config.json") && e.contains("MambaForCausalLM"), "{e}");
    write_dir(&d, &CONFIG.replace(r#""hidden_size":8,"#, ""));
    let e = fails(&["logprobs", "--model", s(&d), "--prompt", "a", "--response", "b"]);
    assert!(e.contains("config.json") && e.contains("hidden_size"), "{e}");
    std::fs::write(d.join("config.json"), "{not json").unwrap();
    let e = fails(&["generate", "--model", s(&d), "--prompt", "a"]);
    assert!(e.contains("config.json") && e.contains("JSON"), "{e}");
}

#[test]
fn wrong_tensor_shape() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("m");
    write_dir(&d, CONFIG);
    std::fs::write(d.join("model.safetensors"), safetensors(&full_weights(6))).unwrap();
    let e = fails(&["generate", "--model", s(&d), "--prompt", "a"]);
    assert!(e.contains("q_proj") && e.contains("[6, 8]") && e.contains("model.safetensors"), "{e}");
}

#[test]
fn truncated_and_corrupt_safetensors() {
    let t = tempfile::tempdir().unwrap();
    let d = t.path().join("m");
    write_dir(&d, CONFIG);
    let good = safetensors(&full_weights(8));
    std::fs::write(d.join("model.safetensors"), &good[..good.len() - 40]).unwrap();
    let e = fails(&["generate", "--model", s(&d), "--prompt", "a"]);
    assert!(e.contains("model.safetensors") && e.contains("truncated"), "{e}");
    std::fs::write(d.join("model.safetensors"), b"\xff\xff\xff\xff\xff\xff\xff\x7fgarbage").unwrap();
    let e = fails(&["generate", "--model", s(&d), "--prompt", "a"]);
    assert!(e.contains("model.safetensors"), "{e}");
}

/// Little-endian GGUF v3 writer for a header with string metadata only.
fn gguf_header(arch: &str, n_tensors: u64) -> Vec<u8> {
    let mut b = b"GGUF".to_vec();
    b.extend(3u32.to_le_bytes());
    b.extend(n_tensors.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    let key = "general.architecture";
    b.extend((key.len() as u64).to_le_bytes());
    b.extend(key.as_bytes());
    b.extend(8u32.to_le_bytes()); // string
    b.extend((arch.len() as u64).to_le_bytes());
    b.extend(arch.as_bytes());
    b
}

#[test]
fn truncated_corrupt_and_foreign_gguf() {
    let t = tempfile::tempdir().unwrap();
    let g = t.path().join("bad.gguf");
    // Header promises 5 tensors that are not there.
    std::fs::write(&g, gguf_header("llama", 5)).unwrap();
    let e = fails(&["model", "convert", s(&g), s(&t.path().join("out"))]);
    assert!(e.contains("bad.gguf") && e.contains("not a valid GGUF"), "{e}");
    let e = fails(&["generate", "--model", s(&g), "--prompt", "a"]);
    assert!(e.contains("bad.gguf"), "{e}");
    // Not GGUF at all.
    std::fs::write(&g, b"PK\x03\x04 this is a zip, not gguf").unwrap();
    let e = fails(&["model", "convert", s(&g), s(&t.path().join("out"))]);
    assert!(e.contains("bad.gguf") && e.contains("not a valid GGUF"), "{e}");
    // A well-formed GGUF of an unsupported architecture.
    std::fs::write(&g, gguf_header("mamba", 0)).unwrap();
    let e = fails(&["model", "convert", s(&g), s(&t.path().join("out"))]);
    assert!(e.contains("bad.gguf") && e.contains("unsupported GGUF architecture `mamba`"), "{e}");
    assert!(!t.path().join("out").exists());
}

#[test]
fn bad_generate_options_and_inputs() {
    let t = tempfile::tempdir().unwrap();
    let e = fails(&["generate", "--model", "x", "--prompt", "a", "--top-p", "1.5"]);
    assert!(e.contains("top_p"), "{e}");
    let e = fails(&["model", "fetch", "gpt-17"]);
    assert!(e.contains("unknown model `gpt-17`"), "{e}");
    let input = t.path().join("p.jsonl");
    std::fs::write(&input, "{\"prompt\": \"ok\"}\n{\"question\": 1}\n").unwrap();
    let e = fails(&["generate", "--model", "x", "--input", s(&input)]);
    assert!(e.contains("p.jsonl:2") && e.contains("prompt"), "{e}");
}
