//! A unified diff for `--dry-run`.

use similar::TextDiff;

/// `diff -u`-style text, empty when `old == new`.
pub fn unified(path: &str, old: &str, new: &str) -> String {
    if old == new {
        return String::new();
    }
    TextDiff::from_lines(old, new)
        .unified_diff()
        .context_radius(3)
        .header(path, &format!("{path} (new)"))
        .to_string()
}
