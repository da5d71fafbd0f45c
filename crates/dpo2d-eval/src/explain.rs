//! Where a trained policy puts its preference, token by token (the paper's
//! Fig. 6): every response token coloured by its implicit reward
//! `beta * (log pi(token) - log pi_ref(token))`, green where the policy
//! raised the token's probability and red where it lowered it, with the
//! segment boundaries and their five scores. As a self-contained HTML page
//! (no network) and as a PNG.

use anyhow::{bail, Context, Result};
use dpo2d_data::{segment_response, Response, SegmentOptions, ASPECTS};
use dpo2d_model::chat::Message;
use dpo2d_model::logprobs::sequence_logprobs;
use dpo2d_model::source::LoadedModel;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::fmt::Write as _;
use std::path::Path;

/// One response token: its piece of the text and its reward.
#[derive(Debug, Clone, serde::Serialize)]
pub struct TokenReward {
    /// The text this token covers (with the whitespace before it), so the
    /// pieces of a response concatenate to the response.
    pub text: String,
    pub policy_logp: f32,
    pub ref_logp: f32,
    /// `beta * (policy_logp - ref_logp)`.
    pub reward: f32,
    /// Index into the side's segments.
    pub segment: usize,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct SegmentView {
    /// 0..4 per aspect when the data scores the segment.
    pub scores: Option<[u8; 5]>,
    /// Sum of the segment's token rewards.
    pub reward: f32,
}

/// One response of the example: "chosen", "rejected" or "response".
#[derive(Debug, Clone, serde::Serialize)]
pub struct Side {
    pub label: String,
    pub tokens: Vec<TokenReward>,
    pub segments: Vec<SegmentView>,
}

impl Side {
    pub fn text(&self) -> String {
        self.tokens.iter().map(|t| t.text.as_str()).collect()
    }

    pub fn reward(&self) -> f32 {
        self.tokens.iter().map(|t| t.reward).sum()
    }
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Explained {
    pub prompt: String,
    pub beta: f64,
    pub policy: String,
    pub reference: String,
    pub sides: Vec<Side>,
}

/// Token rewards of each response after `prompt`, under `policy` against
/// `reference` (which must share its tokenizer). Plain responses are split
/// into sentence segments here (unscored).
pub fn explain(
    policy: &LoadedModel,
    reference: &LoadedModel,
    prompt: &[Message],
    responses: &[(&str, &Response)],
    beta: f64,
) -> Result<Vec<Side>> {
    let text = policy.text();
    let prompt_ids = text.prompt_ids(prompt)?;
    if reference.text().prompt_ids(prompt)? != prompt_ids {
        bail!("the policy and the reference tokenize the prompt differently: they must share a tokenizer");
    }
    let mut sides = vec![];
    for (label, r) in responses {
        let r = match r {
            Response::Plain(t) => segment_response(t, &SegmentOptions::default()),
            seg => (*seg).clone(),
        };
        let segs = r.segments().context("a segmented response")?;
        let body = r.text();
        if body.is_empty() {
            bail!("the {label} response is empty");
        }
        let enc = policy
            .tokenizer
            .inner
            .encode(body.as_str(), false)
            .map_err(|e| anyhow::anyhow!("cannot tokenize the {label} response: {e}"))?;
        let (ids, offsets) = (enc.get_ids().to_vec(), enc.get_offsets().to_vec());
        let pieces = pieces(&body, &offsets);
        let mut bounds = vec![];
        let mut at = 0;
        for s in segs {
            at += s.text.len();
            bounds.push(at);
        }
        let full: Vec<u32> = prompt_ids.iter().chain(&ids).copied().collect();
        let lp = sequence_logprobs(&policy.model, &full)?;
        let lr = sequence_logprobs(&reference.model, &full)?;
        let start = prompt_ids.len();
        let mut tokens = vec![];
        for (i, piece) in pieces.into_iter().enumerate() {
            let first = offsets[i].0;
            let segment = bounds.iter().position(|&b| first < b).unwrap_or(bounds.len() - 1);
            let (p, q) = (lp[start + i], lr[start + i]);
            tokens.push(TokenReward { text: piece, policy_logp: p, ref_logp: q, reward: (beta * (p - q) as f64) as f32, segment });
        }
        let segments = segs
            .iter()
            .enumerate()
            .map(|(k, s)| SegmentView {
                scores: s.scores.map(|x| x.to_array()),
                reward: tokens.iter().filter(|t| t.segment == k).map(|t| t.reward).sum(),
            })
            .collect();
        sides.push(Side { label: label.to_string(), tokens, segments });
    }
    Ok(sides)
}

/// The text of each token: from the end of the previous token to the end
/// of this one (so the whitespace between tokens stays with the next one),
/// the last running to the end of the text. Tokens that share a character
/// (byte fallback) get it once, on the first of them.
fn pieces(text: &str, offsets: &[(usize, usize)]) -> Vec<String> {
    let mut out = Vec::with_capacity(offsets.len());
    let mut prev = 0;
    for (i, &(_, end)) in offsets.iter().enumerate() {
        let mut end = if i + 1 == offsets.len() { text.len() } else { end.clamp(prev, text.len()) };
        while !text.is_char_boundary(end) {
            end += 1;
        }
        out.push(text[prev..end].to_string());
        prev = end;
    }
    out
}

const ASPECT_SHORT: [&str; 5] = ["H", "C", "S", "Co", "Cl"];

fn escape(s: &str) -> String {
    let mut o = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => o.push_str("&amp;"),
            '<' => o.push_str("&lt;"),
            '>' => o.push_str("&gt;"),
            '"' => o.push_str("&quot;"),
            '\'' => o.push_str("&#39;"),
            c => o.push(c),
        }
    }
    o
}

/// The colour of a reward: green up, red down, white at zero; `scale` is the largest |reward|.
fn colour(reward: f32, scale: f32) -> (u8, u8, u8, f32) {
    let a = (reward.abs() / scale.max(1e-12)).clamp(0.0, 1.0).powf(0.7);
    if reward >= 0.0 {
        (44, 160, 44, a)
    } else {
        (214, 39, 40, a)
    }
}

fn scale_of(e: &Explained) -> f32 {
    e.sides.iter().flat_map(|s| s.tokens.iter().map(|t| t.reward.abs())).fold(0.0, f32::max)
}

/// A self-contained page: prompt, then each response with its tokens
/// coloured, segment by segment, each segment followed by its scores.
pub fn html(e: &Explained) -> String {
    let scale = scale_of(e);
    let mut h = String::new();
    h.push_str("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\"><title>dpo2d explain</title><style>\n");
    h.push_str(
        "body{font:15px/1.5 system-ui,-apple-system,'Segoe UI',sans-serif;max-width:980px;margin:2em auto;padding:0 1em;color:#222}\n\
         h1{font-size:1.3em}h2{font-size:1.1em;margin-top:1.6em}.meta{color:#555;font-size:.9em}\n\
         .prompt{background:#f4f4f4;padding:.6em .8em;border-radius:6px;white-space:pre-wrap}\n\
         .seg{border-left:4px solid #888;margin:.5em 0;padding:.2em .6em;white-space:pre-wrap;font-family:ui-monospace,Menlo,Consolas,monospace;font-size:14px}\n\
         .tok{border-radius:3px}.tok:hover{outline:1px solid #333}\n\
         .scores{display:block;font-family:system-ui,sans-serif;font-size:12px;color:#444;margin-top:.3em;white-space:normal}\n\
         .sc{display:inline-block;min-width:2.6em;text-align:center;border-radius:3px;margin-right:.3em;padding:0 .2em}\n\
         .legend{display:flex;align-items:center;gap:.5em;font-size:.85em;color:#444}.bar{width:240px;height:12px;background:linear-gradient(90deg,rgba(214,39,40,1),#fff,rgba(44,160,44,1));border:1px solid #ccc}\n",
    );
    h.push_str("</style></head><body>\n");
    let _ = writeln!(h, "<h1>Implicit reward per token</h1>");
    let _ = writeln!(
        h,
        "<p class=\"meta\">reward = {} &times; (log &pi;(token) &minus; log &pi;<sub>ref</sub>(token)); policy <code>{}</code>, reference <code>{}</code>. Hover a token for its numbers.</p>",
        e.beta,
        escape(&e.policy),
        escape(&e.reference)
    );
    let _ = writeln!(h, "<div class=\"legend\"><span>{:+.3}</span><div class=\"bar\"></div><span>{:+.3}</span></div>", -scale, scale);
    let _ = writeln!(h, "<h2>Prompt</h2><div class=\"prompt\">{}</div>", escape(&e.prompt));
    for side in &e.sides {
        let _ = writeln!(
            h,
            "<h2>{} <span class=\"meta\">(sum of rewards {:+.3}, {} tokens, {} segments)</span></h2>",
            escape(&side.label),
            side.reward(),
            side.tokens.len(),
            side.segments.len()
        );
        for (k, seg) in side.segments.iter().enumerate() {
            h.push_str("<div class=\"seg\">");
            for t in side.tokens.iter().filter(|t| t.segment == k) {
                let (r, g, b, a) = colour(t.reward, scale);
                let tip = format!("log π = {:.3}, log π_ref = {:.3}, reward = {:+.4}", t.policy_logp, t.ref_logp, t.reward);
                let _ = write!(
                    h,
                    "<span class=\"tok\" style=\"background:rgba({r},{g},{b},{a:.3})\" title=\"{}\">{}</span>",
                    escape(&tip),
                    escape(&t.text)
                );
            }
            h.push_str("<span class=\"scores\">");
            if let Some(sc) = seg.scores {
                for (i, v) in sc.iter().enumerate() {
                    let hue = (*v as f32) * 30.0; // 0 red .. 120 green
                    let _ = write!(
                        h,
                        "<span class=\"sc\" style=\"background:hsl({hue},70%,85%)\" title=\"{} {v}/4\">{} {v}</span>",
                        ASPECTS[i], ASPECT_SHORT[i]
                    );
                }
            }
            let _ = writeln!(h, "segment reward {:+.3}</span></div>", seg.reward);
        }
    }
    h.push_str(
        "<p class=\"meta\">Scores: H helpfulness, C correctness, S safety, Co completeness, Cl clarity (0-4).</p>\n</body></html>\n",
    );
    h
}

/// The same picture as a PNG: tokens laid out in lines, one block per
/// segment with its scores at the left.
pub fn png(e: &Explained, path: &Path) -> Result<()> {
    draw(e, path).map_err(|err| anyhow::anyhow!("drawing {}: {err}", path.display()))
}

fn draw(e: &Explained, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    dpo2d_ui::charts::register_font();
    const W: i32 = 1200;
    const LEFT: i32 = 190;
    const LINE: i32 = 22;
    let font = ("sans-serif", 15).into_font();
    let width = |s: &str| font.box_size(s).map(|(w, _)| w as i32).unwrap_or(8 * s.len() as i32);
    // Lay out first, to know the height.
    struct Item {
        x: i32,
        y: i32,
        w: i32,
        text: String,
        reward: f32,
    }
    let mut items = vec![];
    let mut labels: Vec<(i32, String, bool)> = vec![]; // y, text, is heading
    let mut y = 50;
    for side in &e.sides {
        y += 10;
        labels.push((y, format!("{} (sum {:+.3})", side.label, side.reward()), true));
        y += LINE + 4;
        for (k, seg) in side.segments.iter().enumerate() {
            let sc = seg
                .scores
                .map(|s| s.iter().zip(ASPECT_SHORT).map(|(v, n)| format!("{n}{v}")).collect::<Vec<_>>().join(" "))
                .unwrap_or_default();
            labels.push((y, sc, false));
            let mut x = LEFT;
            for t in side.tokens.iter().filter(|t| t.segment == k) {
                for (li, part) in t.text.split('\n').enumerate() {
                    if li > 0 {
                        x = LEFT;
                        y += LINE;
                    }
                    let shown = part.replace('\t', "    ");
                    let w = width(&shown).max(if shown.is_empty() { 0 } else { 4 });
                    if x + w > W - 10 && x > LEFT {
                        x = LEFT;
                        y += LINE;
                    }
                    if !shown.is_empty() {
                        items.push(Item { x, y, w, text: shown, reward: t.reward });
                    }
                    x += w;
                }
            }
            y += LINE + 6;
        }
    }
    let height = (y + 20).max(120);
    let root = BitMapBackend::new(path, (W as u32, height as u32)).into_drawing_area();
    root.fill(&WHITE)?;
    let scale = scale_of(e);
    root.draw(&Text::new(
        format!("implicit reward per token: {} x (log pi - log pi_ref), scale +/-{:.3}", e.beta, scale),
        (10, 12),
        ("sans-serif", 17).into_font(),
    ))?;
    for it in &items {
        let (r, g, b, a) = colour(it.reward, scale);
        root.draw(&Rectangle::new([(it.x, it.y - 2), (it.x + it.w, it.y + LINE - 4)], RGBAColor(r, g, b, a as f64).filled()))?;
        root.draw(&Text::new(it.text.clone(), (it.x, it.y), font.clone().color(&BLACK)))?;
    }
    for (ly, text, heading) in labels {
        let style = if heading {
            ("sans-serif", 17).into_font().color(&BLACK)
        } else {
            ("sans-serif", 13).into_font().color(&RGBColor(80, 80, 80))
        };
        let x = if heading { 10 } else { LEFT - 12 };
        let pos = if heading { Pos::new(HPos::Left, VPos::Top) } else { Pos::new(HPos::Right, VPos::Top) };
        root.draw(&Text::new(text, (x, ly), style.pos(pos)))?;
        if !heading {
            root.draw(&PathElement::new(vec![(LEFT - 6, ly - 2), (LEFT - 6, ly + LINE - 6)], RGBColor(136, 136, 136).stroke_width(3)))?;
        }
    }
    root.present()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pieces_cover_the_text_once() {
        let text = "Hi there, you.";
        // Word-level offsets that skip the spaces.
        let p = pieces(text, &[(0, 2), (3, 8), (8, 9), (10, 13), (13, 14)]);
        assert_eq!(p, vec!["Hi", " there", ",", " you", "."]);
        assert_eq!(p.concat(), text);
        // Byte fallback: three tokens share one character.
        let p = pieces("é!", &[(0, 2), (0, 2), (0, 2), (2, 3)]);
        assert_eq!(p, vec!["é", "", "", "!"]);
    }

    #[test]
    fn html_escapes_and_colours_every_token() {
        let side = Side {
            label: "chosen".into(),
            tokens: vec![
                TokenReward { text: "<b>".into(), policy_logp: -1.0, ref_logp: -2.0, reward: 0.1, segment: 0 },
                TokenReward { text: " & ok".into(), policy_logp: -2.0, ref_logp: -1.0, reward: -0.1, segment: 1 },
            ],
            segments: vec![SegmentView { scores: Some([4, 4, 4, 2, 3]), reward: 0.1 }, SegmentView { scores: None, reward: -0.1 }],
        };
        let e = Explained { prompt: "why?".into(), beta: 0.1, policy: "p".into(), reference: "r".into(), sides: vec![side] };
        let h = html(&e);
        assert!(h.contains(">&lt;b&gt;</span>") && h.contains("> &amp; ok</span>"), "{h}");
        assert_eq!(h.matches("class=\"tok\"").count(), 2);
        assert!(h.contains("rgba(44,160,44,1.000)") && h.contains("rgba(214,39,40,1.000)"));
        assert!(h.contains("Co 2"));
        assert!(!h.contains("http"), "the page must not load anything");
        let dir = tempfile::tempdir().unwrap();
        png(&e, &dir.path().join("x.png")).unwrap();
        assert!(std::fs::metadata(dir.path().join("x.png")).unwrap().len() > 1000);
    }
}
