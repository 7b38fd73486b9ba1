//! Text that crosses a boundary (a NACK reason on the wire, a condition message in the API)
//! bounded in size, with what was cut said rather than lost silently.
//!
//! Unbounded, a reason of megabytes (a validation error listing every rule of a huge group, an
//! agent's error quoting its input) made the status write that carried it fail — the API server
//! refuses a condition message over 32 KiB — and the writer retried it for ever.

/// The most bytes of a NACK reason: the agent cuts its own, the operator cuts what it receives
/// (it does not trust an agent to have done so).
pub const MAX_NACK_REASON: usize = 4 * 1024;

/// The most bytes of a Kubernetes condition message (the API server's limit, `maxLength` 32768).
pub const MAX_CONDITION_MESSAGE: usize = 32 * 1024;

/// `text` when it fits in `max` bytes; otherwise as much of its start as fits (cut at a
/// character boundary) followed by ` … (N more bytes)`, the whole at most `max` bytes.
pub fn bounded(text: &str, max: usize) -> String {
    if text.len() <= max {
        return text.to_string();
    }
    // The marker's length is at most that of the largest count it can say. A bound too small
    // for it gets the start of the text alone.
    let longest = marker(text.len()).len();
    let room = max.checked_sub(longest).unwrap_or(max);
    let mut cut = room.min(text.len());
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    let mut out = String::with_capacity(max);
    out.push_str(&text[..cut]);
    if max >= longest {
        out.push_str(&marker(text.len() - cut));
    }
    out
}

fn marker(cut: usize) -> String {
    format!(" … ({cut} more bytes)")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_text_is_kept_whole() {
        assert_eq!(bounded("refused: bad port", 64), "refused: bad port");
        assert_eq!(bounded("", 0), "");
    }

    #[test]
    fn long_text_is_cut_to_the_bound_and_says_how_much_went() {
        let text = "x".repeat(100_000);
        let out = bounded(&text, MAX_NACK_REASON);
        assert!(out.len() <= MAX_NACK_REASON, "{}", out.len());
        let kept = out.find(" … (").expect("the marker");
        assert_eq!(
            out[kept..],
            format!(" … ({} more bytes)", 100_000 - kept),
            "the count is of what was cut"
        );
        assert!(
            kept > MAX_NACK_REASON - 32,
            "as much as fits is kept: {kept}"
        );
    }

    #[test]
    fn a_cut_never_splits_a_character() {
        let text = "é€😀".repeat(50);
        for max in 0..80 {
            let out = bounded(&text, max);
            assert!(out.len() <= max, "{max}: {}", out.len());
            assert!(text.starts_with(out.split(" … (").next().unwrap_or_default()));
            if max >= 30 {
                assert!(out.ends_with("more bytes)"), "{out}");
            }
        }
    }
}
