//! Narrative safety: FHIR's `htmlChecks()` and the txt-1/txt-2 rules forbid active content in `Narrative.div`.

/// Tags that may carry or load active content.
const BANNED_TAGS: &[&[u8]] = &[
    b"script",
    b"iframe",
    b"frame",
    b"frameset",
    b"object",
    b"embed",
    b"form",
    b"input",
    b"applet",
    b"base",
    b"link",
    b"meta",
    b"style",
    b"button",
    b"textarea",
    b"select",
];

fn starts_with_ci(hay: &[u8], needle: &[u8]) -> bool {
    hay.len() >= needle.len() && hay[..needle.len()].eq_ignore_ascii_case(needle)
}

/// True when the XHTML is a `div` with some content and no scripts, event-handler attributes, forms,
/// frames or `javascript:` URLs: what FHIR allows in a narrative. One pass, no allocation.
pub fn is_safe_narrative(xhtml: &str) -> bool {
    let b = xhtml.as_bytes();
    let start = b
        .iter()
        .position(|c| !c.is_ascii_whitespace())
        .unwrap_or(b.len());
    if !starts_with_ci(&b[start..], b"<div") {
        return false;
    }
    let mut in_tag = false;
    let mut quote: Option<u8> = None;
    let mut i = start;
    while i < b.len() {
        let c = b[i];
        if let Some(q) = quote {
            if c == q {
                quote = None;
            } else if (c == b'j' || c == b'J') && starts_with_ci(&b[i..], b"javascript:") {
                return false;
            }
            i += 1;
            continue;
        }
        match c {
            b'<' => {
                in_tag = true;
                let name_start = if b.get(i + 1) == Some(&b'/') {
                    i + 2
                } else {
                    i + 1
                };
                let name_end = b[name_start..]
                    .iter()
                    .position(|c| !c.is_ascii_alphanumeric())
                    .map(|p| name_start + p)
                    .unwrap_or(b.len());
                let name = &b[name_start..name_end];
                if BANNED_TAGS.iter().any(|t| name.eq_ignore_ascii_case(t)) {
                    return false;
                }
                i = name_end;
                continue;
            }
            b'>' => in_tag = false,
            b'"' | b'\'' if in_tag => quote = Some(c),
            b' ' | b'\t' | b'\n' | b'\r' if in_tag => {
                // An attribute named on… (onclick, onload) is an event handler.
                let rest = &b[i + 1..];
                if starts_with_ci(rest, b"on") {
                    let n = rest.iter().take_while(|c| c.is_ascii_alphabetic()).count();
                    let after = rest[n..].iter().find(|c| !c.is_ascii_whitespace());
                    if n > 2 && after == Some(&b'=') {
                        return false;
                    }
                }
            }
            _ => {}
        }
        i += 1;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_active_content() {
        assert!(is_safe_narrative(
            "<div xmlns=\"http://www.w3.org/1999/xhtml\"><p>ok</p></div>"
        ));
        assert!(is_safe_narrative(
            "<div><p class=\"online\">on=1 only in text</p></div>"
        ));
        assert!(!is_safe_narrative("<div><script>x</script></div>"));
        assert!(!is_safe_narrative("<div><SCRIPT>x</SCRIPT></div>"));
        assert!(!is_safe_narrative("<div><p onclick=\"x()\">a</p></div>"));
        assert!(!is_safe_narrative("<div><p ONLOAD = 'x()'>a</p></div>"));
        assert!(!is_safe_narrative(
            "<div><a href=\"javascript:x\">a</a></div>"
        ));
        assert!(!is_safe_narrative(
            "<div><a href='JavaScript:x'>a</a></div>"
        ));
        assert!(!is_safe_narrative("<div><iframe src=\"x\"/></div>"));
        assert!(!is_safe_narrative("<p>no div</p>"));
        assert!(!is_safe_narrative(""));
    }
}
