//! Progress bars: one style, set up in one place.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar of `len` steps drawn with the indicatif `template`.
pub fn bar(len: u64, template: &str) -> ProgressBar {
    let pb = ProgressBar::new(len);
    pb.set_style(ProgressStyle::with_template(template).unwrap_or_else(|_| ProgressStyle::default_bar()));
    pb
}

/// [`bar`] when `show`, else a hidden one (so callers count the same either way).
pub fn bar_if(show: bool, len: u64, template: &str) -> ProgressBar {
    if show {
        bar(len, template)
    } else {
        ProgressBar::hidden()
    }
}
