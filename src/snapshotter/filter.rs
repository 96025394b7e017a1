//! containerd's filter syntax, as List requests carry it: selectors joined by `,` (AND);
//! the request's several filters are ORed. A selector is a field path, optionally
//! followed by `==`, `!=` or `~=` (regular expression) and a value. Field paths for
//! snapshots: `name`, `parent`, `kind`, `labels.<key>` (the key may be quoted, as in
//! `labels."containerd.io/gc.root"`). Values may be quoted with `"`.

use std::collections::BTreeMap;

use super::SnapError;

/// Longest filter accepted, in bytes.
const MAX_FILTER_BYTES: usize = 4096;

/// The comparison of one selector.
#[derive(Debug)]
enum Op {
    /// The field is present (non-empty).
    Present,
    Eq(String),
    Ne(String),
    Re(regex::Regex),
}

/// One selector: a field path and a comparison.
#[derive(Debug)]
struct Selector {
    path: Vec<String>,
    op: Op,
}

/// A parsed filter: all its selectors must match.
#[derive(Debug)]
pub struct Filter {
    selectors: Vec<Selector>,
}

/// The fields of a snapshot a filter can look at.
pub struct Fields<'a> {
    /// Key.
    pub name: &'a str,
    /// Parent key.
    pub parent: &'a str,
    /// Kind name.
    pub kind: &'a str,
    /// Labels.
    pub labels: &'a BTreeMap<String, String>,
}

fn bad(filter: &str, why: &str) -> SnapError {
    SnapError::InvalidArgument(format!("filter {filter:?}: {why}"))
}

/// Reads a quoted string starting at `chars[*i] == '"'`; handles `\"` and `\\`.
fn quoted(filter: &str, chars: &[char], i: &mut usize) -> Result<String, SnapError> {
    let mut out = String::new();
    *i += 1;
    while *i < chars.len() {
        match chars[*i] {
            '"' => {
                *i += 1;
                return Ok(out);
            }
            '\\' if *i + 1 < chars.len() => {
                out.push(chars[*i + 1]);
                *i += 2;
            }
            c => {
                out.push(c);
                *i += 1;
            }
        }
    }
    Err(bad(filter, "unterminated quoted string"))
}

impl Filter {
    /// Parses one filter string.
    pub fn parse(filter: &str) -> Result<Filter, SnapError> {
        if filter.len() > MAX_FILTER_BYTES {
            return Err(bad(filter, "longer than 4096 bytes"));
        }
        let chars: Vec<char> = filter.chars().collect();
        let mut i = 0usize;
        let mut selectors = Vec::new();
        let skip_ws = |i: &mut usize| {
            while *i < chars.len() && chars[*i].is_whitespace() {
                *i += 1;
            }
        };
        loop {
            skip_ws(&mut i);
            // Field path.
            let mut path = Vec::new();
            loop {
                if i < chars.len() && chars[i] == '"' {
                    path.push(quoted(filter, &chars, &mut i)?);
                } else {
                    let start = i;
                    while i < chars.len()
                        && (chars[i].is_alphanumeric() || matches!(chars[i], '_' | '-' | '/'))
                    {
                        i += 1;
                    }
                    if start == i {
                        return Err(bad(filter, "expected a field name"));
                    }
                    path.push(chars[start..i].iter().collect());
                }
                if i < chars.len() && chars[i] == '.' {
                    i += 1;
                    continue;
                }
                break;
            }
            skip_ws(&mut i);
            let op_text: String = chars[i..chars.len().min(i + 2)].iter().collect();
            let op = if matches!(op_text.as_str(), "==" | "!=" | "~=") {
                i += 2;
                skip_ws(&mut i);
                let value = if i < chars.len() && chars[i] == '"' {
                    quoted(filter, &chars, &mut i)?
                } else {
                    let start = i;
                    while i < chars.len() && chars[i] != ',' {
                        i += 1;
                    }
                    chars[start..i]
                        .iter()
                        .collect::<String>()
                        .trim()
                        .to_string()
                };
                match op_text.as_str() {
                    "==" => Op::Eq(value),
                    "!=" => Op::Ne(value),
                    _ => Op::Re(
                        regex::Regex::new(&value)
                            .map_err(|e| bad(filter, &format!("bad regular expression: {e}")))?,
                    ),
                }
            } else {
                Op::Present
            };
            selectors.push(Selector { path, op });
            skip_ws(&mut i);
            if i == chars.len() {
                break;
            }
            if chars[i] != ',' {
                return Err(bad(filter, &format!("unexpected {:?}", chars[i])));
            }
            i += 1;
        }
        Ok(Filter { selectors })
    }

    /// True when every selector matches.
    pub fn matches(&self, f: &Fields<'_>) -> bool {
        self.selectors.iter().all(|s| {
            let value: Option<&str> = match s.path.first().map(String::as_str) {
                Some("name") if s.path.len() == 1 => Some(f.name),
                Some("parent") if s.path.len() == 1 => Some(f.parent),
                Some("kind") if s.path.len() == 1 => Some(f.kind),
                Some("labels") if s.path.len() >= 2 => {
                    f.labels.get(&s.path[1..].join(".")).map(String::as_str)
                }
                _ => None,
            };
            let value = value.filter(|v| !v.is_empty());
            match &s.op {
                Op::Present => value.is_some(),
                // `parent==""` (containerd's remote-snapshot lookup for a base layer)
                // matches an absent parent.
                Op::Eq(want) => value.unwrap_or("") == want,
                Op::Ne(want) => value != Some(want.as_str()),
                Op::Re(re) => value.is_some_and(|v| re.is_match(v)),
            }
        })
    }
}

/// True when `filters` is empty or any of them matches.
pub fn any_matches(filters: &[Filter], f: &Fields<'_>) -> bool {
    filters.is_empty() || filters.iter().any(|x| x.matches(f))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn containerd_filters_match() {
        let mut labels = BTreeMap::new();
        labels.insert("containerd.io/gc.root".to_string(), "x".to_string());
        labels.insert("a".to_string(), "b c".to_string());
        let f = Fields {
            name: "default/1/sha256:ab",
            parent: "",
            kind: "committed",
            labels: &labels,
        };
        let yes = [
            "kind==committed",
            "kind==committed,name==default/1/sha256:ab",
            "labels.\"containerd.io/gc.root\"",
            "labels.\"containerd.io/gc.root\"==x",
            "labels.a==\"b c\"",
            "parent!=foo",
            "name~=^default/",
            "parent==\"\"",
        ];
        for y in yes {
            assert!(Filter::parse(y).unwrap().matches(&f), "{y}");
        }
        let no = [
            "kind==active",
            "parent",
            "labels.zz",
            "kind==committed,labels.a==b",
        ];
        for n in no {
            assert!(!Filter::parse(n).unwrap().matches(&f), "{n}");
        }
        for broken in ["", "kind==\"x", "==x", "name~=("] {
            assert!(Filter::parse(broken).is_err(), "{broken}");
        }
    }
}
