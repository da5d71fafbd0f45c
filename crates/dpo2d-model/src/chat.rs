//! Chat templates rendered the way Hugging Face transformers renders them
//! (Jinja with `trim_blocks` and `lstrip_blocks`, `raise_exception`, Python
//! string methods such as `.strip()` via minijinja-contrib's pycompat).

use anyhow::{bail, Context, Result};
use minijinja::{Environment, ErrorKind};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use std::path::Path;

/// One chat message (`{"role": ..., "content": ...}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Message {
    pub role: String,
    pub content: String,
}

impl Message {
    pub fn new(role: impl Into<String>, content: impl Into<String>) -> Self {
        Self { role: role.into(), content: content.into() }
    }
    pub fn user(content: impl Into<String>) -> Self {
        Self::new("user", content)
    }
    pub fn assistant(content: impl Into<String>) -> Self {
        Self::new("assistant", content)
    }
    pub fn system(content: impl Into<String>) -> Self {
        Self::new("system", content)
    }
}

/// A compiled chat template plus the special tokens it may reference.
pub struct ChatTemplate {
    source: String,
    bos_token: String,
    eos_token: String,
    env: Environment<'static>,
}

impl std::fmt::Debug for ChatTemplate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChatTemplate").field("source", &self.source).finish()
    }
}

impl Clone for ChatTemplate {
    fn clone(&self) -> Self {
        Self::new(&self.source, Some(&self.bos_token), Some(&self.eos_token)).expect("template compiled before")
    }
}

fn raise_exception(msg: String) -> std::result::Result<String, minijinja::Error> {
    Err(minijinja::Error::new(ErrorKind::InvalidOperation, msg))
}

/// `tojson` as transformers defines it: Python's `json.dumps` (`", "` and
/// `": "` separators, key order kept, no HTML escaping, non-ASCII kept).
fn tojson(v: minijinja::Value, indent: Option<usize>) -> std::result::Result<minijinja::Value, minijinja::Error> {
    let err = |e: serde_json::Error| minijinja::Error::new(ErrorKind::InvalidOperation, format!("tojson: {e}"));
    let mut buf = vec![];
    match indent {
        Some(n) => {
            let ind = vec![b' '; n];
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, serde_json::ser::PrettyFormatter::with_indent(&ind));
            v.serialize(&mut ser).map_err(err)?;
        }
        None => {
            let mut ser = serde_json::Serializer::with_formatter(&mut buf, PyFormatter);
            v.serialize(&mut ser).map_err(err)?;
        }
    }
    Ok(minijinja::Value::from_safe_string(String::from_utf8(buf).unwrap_or_default()))
}

struct PyFormatter;

impl serde_json::ser::Formatter for PyFormatter {
    fn begin_array_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_key<W: ?Sized + std::io::Write>(&mut self, w: &mut W, first: bool) -> std::io::Result<()> {
        if first {
            Ok(())
        } else {
            w.write_all(b", ")
        }
    }
    fn begin_object_value<W: ?Sized + std::io::Write>(&mut self, w: &mut W) -> std::io::Result<()> {
        w.write_all(b": ")
    }
}

impl ChatTemplate {
    /// Compile a template; `bos`/`eos` are exposed as `bos_token`/`eos_token`.
    pub fn new(source: &str, bos: Option<&str>, eos: Option<&str>) -> Result<Self> {
        let mut env = Environment::new();
        env.set_trim_blocks(true);
        env.set_lstrip_blocks(true);
        env.set_unknown_method_callback(minijinja_contrib::pycompat::unknown_method_callback);
        minijinja_contrib::add_to_environment(&mut env);
        env.add_function("raise_exception", raise_exception);
        // `strftime_now` is left undefined on purpose: templates that use it
        // (Llama 3.x) test `is defined` and fall back to a fixed date, which
        // keeps rendered prompts reproducible.
        env.add_filter("tojson", tojson);
        env.add_template_owned("chat", source.to_string()).map_err(|e| anyhow::anyhow!("invalid chat template: {e:#}"))?;
        Ok(Self { source: source.to_string(), bos_token: bos.unwrap_or("").to_string(), eos_token: eos.unwrap_or("").to_string(), env })
    }

    /// The template read from a model directory: `chat_template.jinja`, else
    /// `tokenizer_config.json`'s `chat_template` (a string, or a list of
    /// `{name, template}` where `default` is taken). `None` when absent.
    pub fn from_dir(dir: &Path, bos: Option<&str>, eos: Option<&str>) -> Result<Option<Self>> {
        let jinja = dir.join("chat_template.jinja");
        if jinja.is_file() {
            let s = std::fs::read_to_string(&jinja).with_context(|| format!("cannot read {}", jinja.display()))?;
            return Self::new(&s, bos, eos).with_context(|| jinja.display().to_string()).map(Some);
        }
        let tc = dir.join("tokenizer_config.json");
        if !tc.is_file() {
            return Ok(None);
        }
        let v = crate::tokenizer::read_json(&tc)?;
        let src = match v.get("chat_template") {
            None | Some(Value::Null) => return Ok(None),
            Some(Value::String(s)) => s.clone(),
            Some(Value::Array(list)) => {
                let pick = list.iter().find(|t| t.get("name").and_then(|n| n.as_str()) == Some("default")).or_else(|| list.first());
                match pick.and_then(|t| t.get("template")).and_then(|t| t.as_str()) {
                    Some(s) => s.to_string(),
                    None => bail!("{}: `chat_template` list has no usable template", tc.display()),
                }
            }
            Some(_) => bail!("{}: `chat_template` must be a string or a list", tc.display()),
        };
        Self::new(&src, bos, eos).with_context(|| tc.display().to_string()).map(Some)
    }

    pub fn source(&self) -> &str {
        &self.source
    }

    /// Render a conversation. With `add_generation_prompt`, the text ends
    /// where the assistant's answer begins.
    pub fn render(&self, messages: &[Message], add_generation_prompt: bool) -> Result<String> {
        let tmpl = self.env.get_template("chat").map_err(|e| anyhow::anyhow!("chat template: {e:#}"))?;
        let ctx = minijinja::context! {
            messages => messages,
            add_generation_prompt => add_generation_prompt,
            bos_token => &self.bos_token,
            eos_token => &self.eos_token,
        };
        tmpl.render(ctx).map_err(|e| anyhow::anyhow!("cannot render chat template: {e:#}"))
    }

    /// The text that follows an assistant message's content (its end of
    /// turn, e.g. `"<|im_end|>\n"`), found by rendering a probe conversation.
    /// A response is tokenized as `render(prompt, true)` + response + this.
    pub fn assistant_suffix(&self) -> Result<String> {
        const PROBE: &str = "\u{1}dpo2d-probe-answer\u{1}";
        let text = self.render(&[Message::user("probe question"), Message::assistant(PROBE)], false)?;
        let at = text.rfind(PROBE).context("chat template does not reproduce the assistant message text")?;
        Ok(text[at + PROBE.len()..].to_string())
    }

    /// The text the template adds for `add_generation_prompt` (e.g.
    /// `"<|im_start|>assistant\n"`).
    pub fn generation_prefix(&self) -> Result<String> {
        let msgs = [Message::user("probe question")];
        let with = self.render(&msgs, true)?;
        let without = self.render(&msgs, false)?;
        Ok(with.strip_prefix(&without).map(str::to_string).unwrap_or_default())
    }
}

/// ChatML, used when a model ships no template.
pub const CHATML_TEMPLATE: &str = "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

#[cfg(test)]
mod tests {
    use super::*;

    const SMOL: &str = "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}";

    #[test]
    fn renders_smollm_template_like_transformers() {
        let t = ChatTemplate::new(SMOL, Some("<|im_start|>"), Some("<|im_end|>")).unwrap();
        let s = t.render(&[Message::user("Hi?")], true).unwrap();
        assert_eq!(
            s,
            "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\n"
        );
        let s = t.render(&[Message::system("S"), Message::user("U")], false).unwrap();
        assert_eq!(s, "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n");
        assert_eq!(t.assistant_suffix().unwrap(), "<|im_end|>\n");
        assert_eq!(t.generation_prefix().unwrap(), "<|im_start|>assistant\n");
    }

    #[test]
    fn trim_blocks_pycompat_and_raise_exception() {
        // A Llama-3 / Qwen style template with block tags on their own lines
        // and Python string methods.
        let src = "{{ bos_token }}\n{% for m in messages %}\n{% if m.role not in ['user', 'assistant'] %}{{ raise_exception('bad role ' + m.role) }}{% endif %}\n  {% if m.role == 'user' %}\n[U]{{ m.content.strip() }}\n  {% else %}\n[A]{{ m['content'] | trim }}{{ eos_token }}\n  {% endif %}\n{% endfor %}\n{% if add_generation_prompt %}[A]{% endif %}";
        let t = ChatTemplate::new(src, Some("<s>"), Some("</s>")).unwrap();
        let s = t.render(&[Message::user("  q  "), Message::assistant(" a ")], true).unwrap();
        assert_eq!(s, "<s>\n[U]q\n[A]a</s>\n[A]");
        let e = format!("{:#}", t.render(&[Message::system("x")], false).unwrap_err());
        assert!(e.contains("bad role system"), "{e}");
        assert_eq!(t.assistant_suffix().unwrap(), "</s>\n");
    }

    #[test]
    fn tojson_matches_python_json_dumps() {
        let t = ChatTemplate::new("{{ messages[0] | tojson }}", None, None).unwrap();
        let s = t.render(&[Message::user("<b>é")], false).unwrap();
        assert_eq!(s, r#"{"role": "user", "content": "<b>é"}"#);
    }

    #[test]
    fn reads_template_from_dir() {
        let dir = tempfile::tempdir().unwrap();
        assert!(ChatTemplate::from_dir(dir.path(), None, None).unwrap().is_none());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            serde_json::json!({"chat_template": [{"name": "tool_use", "template": "T"}, {"name": "default", "template": "D{{ messages|length }}"}]})
                .to_string(),
        )
        .unwrap();
        let t = ChatTemplate::from_dir(dir.path(), None, None).unwrap().unwrap();
        assert_eq!(t.render(&[Message::user("x")], false).unwrap(), "D1");
        std::fs::write(dir.path().join("chat_template.jinja"), "J").unwrap();
        let t = ChatTemplate::from_dir(dir.path(), None, None).unwrap().unwrap();
        assert_eq!(t.source(), "J");
        std::fs::write(dir.path().join("chat_template.jinja"), "{% if %}").unwrap();
        let e = format!("{:#}", ChatTemplate::from_dir(dir.path(), None, None).unwrap_err());
        assert!(e.contains("chat_template.jinja"), "{e}");
    }
}

/// Random templates and messages: compiling and rendering return errors,
/// never panic. Set `PROPTEST_CASES` for more cases.
#[cfg(test)]
mod fuzz {
    use super::*;
    use crate::fuzz::config;
    use proptest::prelude::*;

    /// Template fragments real chat templates use, plus broken ones.
    const PIECES: &[&str] = &[
        "{% for message in messages %}",
        "{% endfor %}",
        "{% if add_generation_prompt %}",
        "{% if loop.first and messages[0]['role'] != 'system' %}",
        "{% else %}",
        "{% endif %}",
        "{{ message['content'] }}",
        "{{ message.content.strip() }}",
        "{{ message['role'] | upper }}",
        "{{ messages[0] | tojson }}",
        "{{ messages | tojson(indent=2) }}",
        "{{ messages[7].content }}",
        "{{ raise_exception('bad role') }}",
        "{{ bos_token }}",
        "{{ eos_token }}",
        "{% set ns = namespace(x=0) %}",
        "{{ loop.index / 0 }}",
        "{{ messages | length }}",
        "{{ message.content.split('\\n')[1] }}",
        "{{ strftime_now('%Y') }}",
        "<|im_start|>",
        "\n  ",
        "{{",
        "}}",
        "{%",
        "%}",
        "{#",
        "{{ message['content'] + 1 }}",
        "{{ x.y.z }}",
    ];

    fn template() -> impl Strategy<Value = String> {
        prop_oneof![
            3 => prop::collection::vec(prop::sample::select(PIECES), 0..14).prop_map(|v| v.concat()),
            1 => ".{0,80}",
        ]
    }

    fn messages() -> impl Strategy<Value = Vec<Message>> {
        let role = prop::sample::select(vec!["system", "user", "assistant", "tool", ""]);
        let content = prop_oneof![".{0,40}", Just("{{ bos_token }}".to_string()), Just("\u{1}".to_string())];
        prop::collection::vec((role, content).prop_map(|(r, c)| Message::new(r, c)), 0..5)
    }

    proptest! {
        #![proptest_config(config(3000))]

        #[test]
        fn random_templates_render_or_fail_cleanly(src in template(), msgs in messages(), gen in any::<bool>()) {
            let Ok(t) = ChatTemplate::new(&src, Some("<s>"), Some("</s>")) else { return Ok(()) };
            if let Err(e) = t.render(&msgs, gen) {
                let msg = format!("{e:#}");
                prop_assert!(!msg.is_empty());
            }
            let _ = t.assistant_suffix();
            let _ = t.generation_prefix();
        }

        #[test]
        fn real_template_renders_any_messages(msgs in messages()) {
            let t = ChatTemplate::new(CHATML_TEMPLATE, None, None).unwrap();
            let s = t.render(&msgs, true).unwrap();
            for m in &msgs {
                prop_assert!(s.contains(&m.content));
            }
        }
    }
}
