//! Kubernetes `$(VAR)` expansion, as the kubelet applies it to `command`, `args` and env values.
//!
//! This mirrors `k8s.io/kubernetes/third_party/forked/golang/expansion`:
//! - `$(NAME)` is replaced by the value of `NAME` when it is defined, and left as is otherwise;
//! - `$$` is an escaped `$`, so `$$(NAME)` yields the literal `$(NAME)`;
//! - an unterminated `$(` and a `$` followed by anything else are copied unchanged.

/// Expands `$(NAME)` references in `input` with `lookup`. Undefined names stay as `$(NAME)`.
pub fn expand(input: &str, lookup: impl Fn(&str) -> Option<String>) -> String {
    let mut out = String::with_capacity(input.len());
    let mut rest = input;
    while let Some(pos) = rest.find('$') {
        out.push_str(&rest[..pos]);
        let after = &rest[pos + 1..];
        let mut chars = after.chars();
        match chars.next() {
            // A trailing `$` is copied as is.
            None => {
                out.push('$');
                rest = after;
            }
            // `$$` is an escaped `$`.
            Some('$') => {
                out.push('$');
                rest = &after[1..];
            }
            Some('(') => match after.find(')') {
                Some(close) => {
                    let name = &after[1..close];
                    match lookup(name) {
                        Some(value) => out.push_str(&value),
                        None => {
                            out.push_str("$(");
                            out.push_str(name);
                            out.push(')');
                        }
                    }
                    rest = &after[close + 1..];
                }
                // Unterminated reference: copy `$(` and go on after it.
                None => {
                    out.push_str("$(");
                    rest = &after[1..];
                }
            },
            Some(c) => {
                out.push('$');
                out.push(c);
                rest = &after[c.len_utf8()..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// Expands against an ordered list of `(name, value)` pairs; the last definition of a name wins.
pub fn expand_with(input: &str, env: &[(String, String)]) -> String {
    expand(input, |name| {
        env.iter().rev().find(|(k, _)| k == name).map(|(_, v)| v.clone())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env() -> Vec<(String, String)> {
        vec![
            ("VAR_A".into(), "A".into()),
            ("VAR_B".into(), "B".into()),
            ("EMPTY".into(), String::new()),
            ("VAR_A".into(), "A2".into()),
        ]
    }

    #[test]
    fn expands_defined_and_keeps_undefined() {
        let e = env();
        assert_eq!(expand_with("$(VAR_B)", &e), "B");
        assert_eq!(expand_with("x-$(VAR_B)-y", &e), "x-B-y");
        assert_eq!(expand_with("$(VAR_A)", &e), "A2", "the last definition wins");
        assert_eq!(expand_with("$(EMPTY)z", &e), "z");
        assert_eq!(expand_with("$(NOPE)", &e), "$(NOPE)");
        assert_eq!(expand_with("$(VAR_B)$(VAR_B)", &e), "BB");
    }

    #[test]
    fn escapes_and_malformed_references() {
        let e = env();
        assert_eq!(expand_with("$$(VAR_B)", &e), "$(VAR_B)");
        assert_eq!(expand_with("$$$(VAR_B)", &e), "$B");
        assert_eq!(expand_with("$$", &e), "$");
        assert_eq!(expand_with("$", &e), "$");
        assert_eq!(expand_with("a$", &e), "a$");
        assert_eq!(expand_with("$(VAR_B", &e), "$(VAR_B");
        assert_eq!(expand_with("$VAR_B", &e), "$VAR_B");
        assert_eq!(expand_with("${VAR_B}", &e), "${VAR_B}");
        assert_eq!(expand_with("$é$(VAR_B)", &e), "$éB");
        assert_eq!(expand_with("$()", &e), "$()");
        assert_eq!(expand_with("no refs", &e), "no refs");
    }
}
