//! POSIX shell quoting: turning argv into the one command line an SSH server hands to the
//! remote user's shell (`$SHELL -c LINE`).
//!
//! Every argument becomes exactly one word, whatever it contains: words made only of
//! characters no POSIX shell treats specially are left bare (so logs stay readable),
//! anything else is single-quoted, with each `'` written as `'\''`. Inside single quotes
//! nothing is special (`$`, backticks, `\`, newlines, `;`, globs), which is what makes the
//! quoting total. A NUL byte cannot be part of a command line at all: callers must refuse
//! such arguments (see [`has_nul`]).

/// True for characters that never need quoting in any POSIX shell word.
fn is_safe(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '/' | ',' | ':' | '@' | '+')
}

/// One argument as a single shell word.
pub fn quote(arg: &str) -> String {
    // Not in the safe set: `~` (a leading one expands to a home directory) and `=` (zsh
    // expands a leading `=cmd` to a path).
    if !arg.is_empty() && arg.chars().all(is_safe) {
        return arg.to_string();
    }
    let mut out = String::with_capacity(arg.len() + 2);
    out.push('\'');
    for c in arg.chars() {
        if c == '\'' {
            out.push_str("'\\''");
        } else {
            out.push(c);
        }
    }
    out.push('\'');
    out
}

/// argv as one command line: each argument [`quote`]d, joined by single spaces.
pub fn command_line(argv: &[String]) -> String {
    argv.iter().map(|a| quote(a)).collect::<Vec<_>>().join(" ")
}

/// True when some argument holds a NUL byte, which no command line can carry.
pub fn has_nul(argv: &[String]) -> bool {
    argv.iter().any(|a| a.contains('\0'))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    const HOSTILE: &[&str] = &[
        "; rm -rf /",
        "$(id)",
        "`id`",
        "${HOME}",
        "$HOME",
        "a\nb",
        "\n",
        "'",
        "''",
        "'\\''",
        "\"",
        "\"'\"'",
        "it's",
        "",
        " ",
        "  leading and trailing  ",
        "\t",
        "*",
        "?",
        "[a-z]",
        "~",
        "~root",
        "-n",
        "--",
        "-e",
        "a|b",
        "a&b",
        "a>b",
        "<b",
        "#comment",
        "\\",
        "\\n",
        "!",
        "!!",
        "grüße",
        "日本語",
        "emoji 🦀",
        "\x7f\x01\x1b[31m",
        "x=$(cat /etc/passwd)",
        "lxc.mount.entry: /dev/kmsg dev/kmsg none bind,rw,optional,create=file",
        "safe-word_1.2/3:4,5@6+7",
        "=ls",
        "%1",
    ];

    /// The words a real `/bin/sh` makes of `line` (a command line's arguments): each is
    /// printed NUL-terminated by `for a in LINE` and split back. Unquoted words would be
    /// split and globbed here, which is what the quoting must prevent.
    fn sh_argv(line: &str) -> Vec<String> {
        let script = format!("for a in {line}; do printf '%s\\0' \"$a\"; done");
        let out = Command::new("/bin/sh")
            .arg("-c")
            .arg(&script)
            .output()
            .expect("run /bin/sh");
        assert!(out.status.success(), "sh failed for {line:?}: {:?}", out);
        let stdout = String::from_utf8(out.stdout).expect("utf-8 back from sh");
        let mut parts: Vec<String> = stdout.split('\0').map(str::to_string).collect();
        assert_eq!(parts.pop().as_deref(), Some(""), "output ends with NUL");
        parts
    }

    #[test]
    fn each_hostile_value_is_one_literal_argument() {
        for value in HOSTILE {
            // printf %s "$1": the first positional parameter, byte for byte.
            let line = format!("printf %s {}", quote(value));
            let out = Command::new("/bin/sh")
                .arg("-c")
                .arg(&line)
                .output()
                .expect("run /bin/sh");
            assert!(out.status.success(), "{value:?}: {out:?}");
            assert!(out.stderr.is_empty(), "{value:?}: {out:?}");
            assert_eq!(String::from_utf8(out.stdout).unwrap(), *value, "line: {line}");
        }
    }

    #[test]
    fn command_line_keeps_argument_boundaries() {
        let argv: Vec<String> = HOSTILE.iter().map(|s| s.to_string()).collect();
        assert_eq!(sh_argv(&command_line(&argv)), argv);
        // one at a time too (and combined with a neighbour)
        for value in HOSTILE {
            let argv = vec![value.to_string(), "next".to_string()];
            assert_eq!(sh_argv(&command_line(&argv)), argv);
        }
    }

    #[test]
    fn positional_parameters_arrive_literally() {
        // The shape write_file_if_unchanged uses: sh -c SCRIPT sh ARG1 ARG2, all quoted.
        for value in HOSTILE {
            let argv: Vec<String> = ["sh", "-c", "printf '%s|%s' \"$1\" \"$2\"", "sh", value, "second"]
                .iter()
                .map(|s| s.to_string())
                .collect();
            let out = Command::new("/bin/sh")
                .arg("-c")
                .arg(command_line(&argv))
                .output()
                .expect("run /bin/sh");
            assert_eq!(String::from_utf8(out.stdout).unwrap(), format!("{value}|second"));
        }
    }

    #[test]
    fn safe_words_stay_bare_and_others_are_quoted() {
        assert_eq!(quote("pct"), "pct");
        assert_eq!(quote("--features"), "--features");
        assert_eq!(
            quote("/etc/pve/nodes/pve1/lxc/100.conf"),
            "/etc/pve/nodes/pve1/lxc/100.conf"
        );
        assert_eq!(quote(""), "''");
        assert_eq!(quote("a b"), "'a b'");
        assert_eq!(quote("it's"), "'it'\\''s'");
        assert_eq!(quote("~"), "'~'");
        assert_eq!(
            command_line(&["cat".into(), "--".into(), "/tmp/a b".into()]),
            "cat -- '/tmp/a b'"
        );
        assert_eq!(command_line(&[]), "");
    }

    #[test]
    fn nul_is_detected() {
        assert!(has_nul(&["a\0b".to_string()]));
        assert!(!has_nul(&["ab".to_string()]));
    }
}
