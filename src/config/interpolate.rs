//! `${VAR}` / `${VAR:-default}` interpolation of config text from the environment.
//!
//! Done on the raw text before YAML parsing so that any value (not only strings) can
//! come from the environment, and so that errors can point at the exact line.

use super::ConfigError;
use std::path::Path;

/// Replaces every `${VAR}` and `${VAR:-default}` in `text`. `$$` escapes a literal `$`.
/// `lookup` is the environment (a parameter so tests need not mutate the process env).
pub fn interpolate(
    text: &str,
    file: &Path,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> Result<String, ConfigError> {
    let mut out = String::with_capacity(text.len());
    for (line_idx, line) in text.split_inclusive('\n').enumerate() {
        let err = |message: String| ConfigError::Invalid {
            file: file.to_path_buf(),
            location: format!("line {}", line_idx + 1),
            message,
        };
        let mut rest = line;
        while let Some(pos) = rest.find('$') {
            out.push_str(&rest[..pos]);
            let after = &rest[pos + 1..];
            if let Some(stripped) = after.strip_prefix('$') {
                out.push('$');
                rest = stripped;
                continue;
            }
            let Some(body_and_more) = after.strip_prefix('{') else {
                out.push('$');
                rest = after;
                continue;
            };
            let end = body_and_more
                .find('}')
                .ok_or_else(|| err("unterminated `${` (missing `}`)".into()))?;
            let body = &body_and_more[..end];
            let (name, default) = match body.split_once(":-") {
                Some((n, d)) => (n, Some(d)),
                None => (body, None),
            };
            if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                return Err(err(format!("invalid variable name in `${{{body}}}`")));
            }
            let value = match (lookup(name), default) {
                (Some(v), Some(d)) if v.is_empty() => d.to_string(),
                (Some(v), _) => v,
                (None, Some(d)) => d.to_string(),
                (None, None) => {
                    return Err(err(format!(
                        "environment variable `{name}` is not set and `${{{name}}}` has no default \
                         (write `${{{name}:-default}}` to give one)"
                    )))
                }
            };
            out.push_str(&value);
            rest = &body_and_more[end + 1..];
        }
        out.push_str(rest);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(name: &str) -> Option<String> {
        match name {
            "SET" => Some("value".into()),
            "EMPTY" => Some(String::new()),
            _ => None,
        }
    }

    fn run(text: &str) -> Result<String, ConfigError> {
        interpolate(text, Path::new("p.yaml"), &env)
    }

    #[test]
    fn replaces_set_unset_and_defaulted_variables() {
        assert_eq!(
            run("a: ${SET}\nb: ${UNSET:-d}\n").unwrap(),
            "a: value\nb: d\n"
        );
        assert_eq!(run("a: ${EMPTY:-fallback}").unwrap(), "a: fallback");
        assert_eq!(run("a: ${EMPTY}").unwrap(), "a: ");
        assert_eq!(run("cost: $$5 and $x").unwrap(), "cost: $5 and $x");
        assert_eq!(
            run("u: ${UNSET:-postgres://h:5/db}").unwrap(),
            "u: postgres://h:5/db"
        );
    }

    #[test]
    fn missing_variable_without_default_names_the_line() {
        let e = run("a: 1\nb: ${NOPE}\n").unwrap_err().to_string();
        assert!(
            e.contains("p.yaml") && e.contains("line 2") && e.contains("NOPE"),
            "{e}"
        );
    }
}
