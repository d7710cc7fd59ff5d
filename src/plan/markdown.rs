//! Markdown that text from untrusted places cannot steer. A plan and a status report quote
//! values written in a pull request and answers read from guests; on a forge, raw `<img>`,
//! links, `@mentions` or a stray `|` in that text would render as the author chose (a
//! tracking pixel, a phishing link, a broken table). Everything quoted goes through [`text`]
//! (literal text, safe in a table cell) or [`code`] (a code span, safe in a table cell).

/// `s` as literal inline markdown text on one line: the characters that start markup inline
/// (emphasis, code, links, images, HTML, entities, tables, strikethrough, math) are
/// backslash-escaped, `@` cannot start a mention, and newlines become `<br>` (the only HTML
/// this module writes). Dots, slashes and dashes stay as they are, so addresses and paths
/// read plainly in the raw file.
pub fn text(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + s.len() / 8);
    let mut previous: Option<char> = None;
    for c in s.chars() {
        let after_word = previous.is_some_and(|p| p.is_alphanumeric());
        previous = Some(c);
        match c {
            '\n' => out.push_str("<br>"),
            '\r' => {}
            // GitHub links `@name` even after a backslash; an entity is shown as `@` and never
            // links. An `@` inside a word (an e-mail address) starts no mention: kept readable.
            '@' if !after_word => out.push_str("&#64;"),
            '\\' | '`' | '*' | '_' | '[' | ']' | '<' | '>' | '!' | '|' | '~' | '&' | '#' | '$' => {
                out.push('\\');
                out.push(c);
            }
            c if c.is_control() => out.push(' '),
            c => out.push(c),
        }
    }
    out
}

/// `s` as a code span on one line, usable inside a table cell: the fence is longer than any
/// run of backticks in `s`, and `|` is escaped (GitHub splits cells on it even in code).
pub fn code(s: &str) -> String {
    let s: String = s.chars().map(|c| if c.is_control() { ' ' } else { c }).collect();
    let mut longest = 0;
    let mut run = 0;
    for c in s.chars() {
        run = if c == '`' { run + 1 } else { 0 };
        longest = longest.max(run);
    }
    let fence = "`".repeat(longest + 1);
    let pad = if s.starts_with('`') || s.ends_with('`') {
        " "
    } else {
        ""
    };
    format!("{fence}{pad}{}{pad}{fence}", s.replace('|', "\\|"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn html_links_mentions_and_table_breaks_stay_literal() {
        let hostile = "<img src=https://evil.example/p.png> [click](https://evil.example) @admin | x\n# h";
        let t = text(hostile);
        for markup in ["<img", "](", "| x"] {
            let unescaped = t.match_indices(markup).any(|(i, _)| !t[..i].ends_with('\\'));
            assert!(!unescaped, "{markup} unescaped in {t}");
        }
        assert!(!t.contains("@admin"), "{t}");
        assert!(t.contains("<br>\\# h"), "{t}");
        assert_eq!(text("plain words 42"), "plain words 42");
        assert_eq!(text("alice@example.com"), "alice@example.com");
    }

    #[test]
    fn a_code_span_is_never_closed_by_its_content() {
        assert_eq!(code("a"), "`a`");
        assert_eq!(code("x`y"), "``x`y``");
        assert_eq!(code("`x"), "`` `x ``");
        assert_eq!(code("a|b\nc"), "`a\\|b c`");
    }
}
