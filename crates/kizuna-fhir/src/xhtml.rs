//! Narrative safety: FHIR's `htmlChecks()` and the txt-1/txt-2 rules forbid active content in `Narrative.div`.

/// True when the XHTML has no scripts, no event-handler attributes, no forms or frames and no
/// `javascript:` links: what FHIR allows in a narrative.
pub fn is_safe_narrative(xhtml: &str) -> bool {
    let lower = xhtml.to_lowercase();
    const BANNED_TAGS: &[&str] = &[
        "<script", "<iframe", "<frame", "<object", "<embed", "<form", "<input", "<applet", "<base",
        "<link", "<meta", "<style",
    ];
    if BANNED_TAGS.iter().any(|t| lower.contains(t)) {
        return false;
    }
    if lower.contains("javascript:") {
        return false;
    }
    // Event handlers: an attribute starting with "on" inside a tag.
    let mut in_tag = false;
    let bytes = lower.as_bytes();
    for i in 0..bytes.len() {
        match bytes[i] {
            b'<' => in_tag = true,
            b'>' => in_tag = false,
            b' ' | b'\t' | b'\n' if in_tag => {
                let rest = &lower[i + 1..];
                if rest.starts_with("on") {
                    let name: String = rest
                        .chars()
                        .take_while(|c| c.is_ascii_alphabetic())
                        .collect();
                    if name.len() > 2 && rest[name.len()..].trim_start().starts_with('=') {
                        return false;
                    }
                }
            }
            _ => {}
        }
    }
    lower.trim_start().starts_with("<div")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_active_content() {
        assert!(is_safe_narrative(
            "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>ok</p></div>"
        ));
        assert!(!is_safe_narrative("<div><script>x</script></div>"));
        assert!(!is_safe_narrative("<div><p onclick=\"x()\">a</p></div>"));
        assert!(!is_safe_narrative(
            "<div><a href=\"javascript:x\">a</a></div>"
        ));
        assert!(!is_safe_narrative("<p>no div</p>"));
    }
}
