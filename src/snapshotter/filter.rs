//! containerd's filter syntax (its `filters` package, as of 1.6), as List requests carry
//! it, and the snapshot fields it can look at.
//!
//! A filter is a list of selectors joined by `,`, all of which must match (AND); a
//! request's several filters are ORed, and no filters, or an empty one, match everything.
//! A selector is a field path, alone (the field is present) or followed by an operator
//! and a value:
//!
//! - field path: fields joined by `.`; a field is a run of `A-Z a-z 0-9 _ -` or a
//!   `"`-quoted string, so `labels."containerd.io/gc.root"` names that label.
//! - operators: `==`, `!=`, `~=` (the value is a regular expression, found anywhere in
//!   the field). Any other run of `=`, `!`, `~` is refused.
//! - value: a `"`-quoted string, or an unquoted run of characters that are neither
//!   whitespace, control characters nor `,` (it may not begin with `.`, `=`, `!`, `~`,
//!   `"`, `/` or `|`). After `~=` the value may also be quoted by `/.../` or `|...|`.
//!   Unquoted values take no escapes: `name~=[abc]\+` is the regex `[abc]\+`.
//! - quoted strings use Go's escapes: `\a \b \f \n \r \t \v \\`, the quote character
//!   itself (`\"`, `\/`, `\|`), `\NNN` (octal, at most 255), `\xHH` (a byte), `\uHHHH`
//!   and `\UHHHHHHHH`. Any other escape, a raw newline or NUL, or no closing quote is an
//!   error. So `""` is the empty string.
//! - whitespace may stand before a field, an operator or a value, but not between a
//!   field and the `.` after it, nor after a value or a selector (as in containerd, whose
//!   parser looks at the next raw character there).
//!
//! Matching follows containerd's snapshot adaptor: `name`, `parent` and `kind` are always
//! present (an unparented snapshot's `parent` is present and empty), only the first
//! element of their path counts; `labels.<key...>` is present when the label is set
//! (the rest of the path joined by `.` is the key); other fields are never present. `==`
//! needs the field present and equal; `!=` and `~=` compare an absent field as `""`.
//! So `parent!=""` selects the snapshots with a parent, `parent==""` those without, and
//! `labels.a==""` only those carrying the label `a` with an empty value.
//!
//! Differences from containerd, on purpose: a `~=` value that is not a valid regular
//! expression is refused here (containerd 1.6 logs it and matches nothing), and the
//! dialect is the `regex` crate's (RE2's syntax, but `\d`, `\w`, `\s` are Unicode-aware);
//! a quoted string whose `\x`/octal escapes do not decode to UTF-8, or a `\u` escape of
//! a surrogate, is refused (containerd accepts it; it can equal no protobuf string); an
//! unquoted value may hold non-graphic characters other than controls, such as U+200B,
//! where containerd stops the value (and so fails the parse).

use std::collections::BTreeMap;
use std::fmt::Display;

use super::{Snap, SnapError};

/// Longest filter accepted, in bytes.
const MAX_FILTER_BYTES: usize = 4096;

/// A snapshot field a selector looks at, resolved from its path.
#[derive(Debug, PartialEq)]
enum Field {
    Name,
    Parent,
    Kind,
    /// The label with this key.
    Label(String),
    /// A field snapshots do not have: never present.
    Unknown,
}

impl Field {
    fn from_path(path: &[String]) -> Field {
        match path.first().map(String::as_str) {
            Some("name") => Field::Name,
            Some("parent") => Field::Parent,
            Some("kind") => Field::Kind,
            Some("labels") => Field::Label(path[1..].join(".")),
            _ => Field::Unknown,
        }
    }
}

/// The comparison of one selector.
#[derive(Debug)]
enum Op {
    /// The field is present (it may be empty).
    Present,
    Eq(String),
    Ne(String),
    Re(regex::Regex),
}

/// One selector: a field and a comparison.
#[derive(Debug)]
struct Selector {
    field: Field,
    op: Op,
}

/// A parsed filter: all its selectors must match. No selectors match everything.
#[derive(Debug)]
pub struct Filter {
    selectors: Vec<Selector>,
}

/// The fields of a snapshot a filter can look at.
pub struct Fields<'a> {
    /// Key.
    pub name: &'a str,
    /// Parent key; empty for none.
    pub parent: &'a str,
    /// Kind name.
    pub kind: &'a str,
    /// Labels.
    pub labels: &'a BTreeMap<String, String>,
}

/// Which operator a selector has, before its value is read.
#[derive(Clone, Copy, PartialEq)]
enum OpKind {
    Eq,
    Ne,
    Re,
}

fn is_field_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '_' | '-')
}

fn is_quote(c: char) -> bool {
    matches!(c, '"' | '/' | '|')
}

fn is_value_char(c: char) -> bool {
    c != ',' && !c.is_whitespace() && !c.is_control()
}

/// A recursive-descent parser over one filter; `pos` is a byte offset into it.
struct Parser<'a> {
    filter: &'a str,
    pos: usize,
}

impl Parser<'_> {
    fn peek(&self) -> Option<char> {
        self.filter[self.pos..].chars().next()
    }

    fn bump(&mut self) -> Option<char> {
        let c = self.peek()?;
        self.pos += c.len_utf8();
        Some(c)
    }

    fn skip_space(&mut self) {
        while self.peek().is_some_and(char::is_whitespace) {
            self.bump();
        }
    }

    /// An InvalidArgument naming the filter and where in it the rule was broken.
    fn err(&self, at: usize, why: impl Display) -> SnapError {
        let filter = self.filter;
        if at >= filter.len() {
            SnapError::InvalidArgument(format!("filter {filter:?}: {why} at its end"))
        } else {
            SnapError::InvalidArgument(format!("filter {filter:?}: {why} at byte {at}"))
        }
    }

    fn selectors(&mut self) -> Result<Vec<Selector>, SnapError> {
        let mut out = vec![self.selector()?];
        loop {
            match self.peek() {
                None => return Ok(out),
                Some(',') => {
                    self.bump();
                    out.push(self.selector()?);
                }
                Some(c) => {
                    return Err(self.err(self.pos, format_args!("unexpected {c:?}")));
                }
            }
        }
    }

    fn selector(&mut self) -> Result<Selector, SnapError> {
        let path = self.field_path()?;
        let field = Field::from_path(&path);
        if matches!(self.peek(), None | Some(',')) {
            return Ok(Selector {
                field,
                op: Op::Present,
            });
        }
        let kind = self.operator()?;
        let at = self.pos;
        let value = self.value(kind)?;
        let op = match kind {
            OpKind::Eq => Op::Eq(value),
            OpKind::Ne => Op::Ne(value),
            OpKind::Re => Op::Re(
                regex::Regex::new(&value)
                    .map_err(|e| self.err(at, format_args!("not a regular expression ({e})")))?,
            ),
        };
        Ok(Selector { field, op })
    }

    fn field_path(&mut self) -> Result<Vec<String>, SnapError> {
        let mut path = vec![self.field()?];
        while self.peek() == Some('.') {
            self.bump();
            path.push(self.field()?);
        }
        Ok(path)
    }

    fn field(&mut self) -> Result<String, SnapError> {
        self.skip_space();
        let start = self.pos;
        match self.peek() {
            Some(q) if is_quote(q) => {
                let s = self.quoted(q)?;
                if q != '"' {
                    return Err(self.err(
                        start,
                        "a field is quoted only by \"...\" (/.../ and |...| quote a regular expression)",
                    ));
                }
                Ok(s)
            }
            Some(c) if is_field_char(c) => {
                while self.peek().is_some_and(is_field_char) {
                    self.bump();
                }
                Ok(self.filter[start..self.pos].to_string())
            }
            _ => Err(self.err(start, "expected a field name or a quoted string")),
        }
    }

    fn operator(&mut self) -> Result<OpKind, SnapError> {
        self.skip_space();
        let start = self.pos;
        while matches!(self.peek(), Some('=' | '!' | '~')) {
            self.bump();
        }
        match &self.filter[start..self.pos] {
            "==" => Ok(OpKind::Eq),
            "!=" => Ok(OpKind::Ne),
            "~=" => Ok(OpKind::Re),
            "" => Err(self.err(
                start,
                format_args!(
                    "expected an operator (==, != or ~=), found {}",
                    self.peek()
                        .map_or_else(|| "nothing".to_string(), |c| format!("{c:?}"))
                ),
            )),
            other => Err(self.err(
                start,
                format_args!("unsupported operator {other:?} (==, != or ~=)"),
            )),
        }
    }

    fn value(&mut self, kind: OpKind) -> Result<String, SnapError> {
        self.skip_space();
        let start = self.pos;
        match self.peek() {
            Some(q) if is_quote(q) => {
                let s = self.quoted(q)?;
                if q != '"' && kind != OpKind::Re {
                    return Err(self.err(
                        start,
                        "/.../ and |...| quote only a regular expression (after ~=)",
                    ));
                }
                Ok(s)
            }
            Some(c) if is_value_char(c) && !matches!(c, '.' | '=' | '!' | '~') => {
                while self.peek().is_some_and(is_value_char) {
                    self.bump();
                }
                Ok(self.filter[start..self.pos].to_string())
            }
            _ => Err(self.err(start, "expected a value or a quoted string")),
        }
    }

    /// Reads a string quoted by `q` (at `self.pos`) and decodes its escapes.
    fn quoted(&mut self, q: char) -> Result<String, SnapError> {
        let start = self.pos;
        self.bump();
        // Bytes, not chars: `\x` and octal escapes give single bytes, which only
        // together may form UTF-8.
        let mut out = Vec::new();
        loop {
            let at = self.pos;
            match self.bump() {
                None | Some('\n') => {
                    return Err(self.err(start, "quoted string not terminated"));
                }
                Some('\0') => return Err(self.err(at, "NUL in a quoted string")),
                Some('\\') => self.escape(q, at, &mut out)?,
                Some(c) if c == q => break,
                Some(c) => out.extend_from_slice(c.encode_utf8(&mut [0; 4]).as_bytes()),
            }
        }
        String::from_utf8(out).map_err(|_| self.err(start, "quoted string is not UTF-8"))
    }

    /// Decodes the escape whose backslash is at `at`, in a string quoted by `q`.
    fn escape(&mut self, q: char, at: usize, out: &mut Vec<u8>) -> Result<(), SnapError> {
        let Some(c) = self.bump() else {
            return Err(self.err(at, "quoted string not terminated"));
        };
        let byte = match c {
            'a' => 0x07,
            'b' => 0x08,
            'f' => 0x0c,
            'n' => b'\n',
            'r' => b'\r',
            't' => b'\t',
            'v' => 0x0b,
            '\\' => b'\\',
            // Quote characters are ASCII.
            c if c == q => c as u8,
            '0'..='7' => {
                let v = (c as u32 - '0' as u32) * 64 + self.digits(8, 2, at)?;
                u8::try_from(v).map_err(|_| self.err(at, "octal escape above \\377"))?
            }
            'x' => self.digits(16, 2, at)? as u8,
            'u' | 'U' => {
                let n = if c == 'u' { 4 } else { 8 };
                let v = self.digits(16, n, at)?;
                let ch = char::from_u32(v)
                    .ok_or_else(|| self.err(at, "escape is not a Unicode scalar value"))?;
                out.extend_from_slice(ch.encode_utf8(&mut [0; 4]).as_bytes());
                return Ok(());
            }
            c => return Err(self.err(at, format_args!("unknown escape \\{c}"))),
        };
        out.push(byte);
        Ok(())
    }

    /// Reads exactly `n` digits in `radix` for the escape at `at`.
    fn digits(&mut self, radix: u32, n: usize, at: usize) -> Result<u32, SnapError> {
        let mut v = 0u32;
        for _ in 0..n {
            let d = self
                .peek()
                .and_then(|c| c.to_digit(radix))
                .ok_or_else(|| self.err(at, "escape has too few digits"))?;
            self.bump();
            // At most 8 hex digits: fits.
            v = v * radix + d;
        }
        Ok(v)
    }
}

impl Filter {
    /// Parses one filter string; the empty string matches everything.
    pub fn parse(filter: &str) -> Result<Filter, SnapError> {
        if filter.len() > MAX_FILTER_BYTES {
            return Err(SnapError::InvalidArgument(format!(
                "filter of {} bytes: at most {MAX_FILTER_BYTES} are allowed",
                filter.len()
            )));
        }
        if filter.is_empty() {
            return Ok(Filter {
                selectors: Vec::new(),
            });
        }
        let mut p = Parser { filter, pos: 0 };
        let selectors = p.selectors()?;
        Ok(Filter { selectors })
    }

    /// True when every selector matches.
    pub fn matches(&self, f: &Fields<'_>) -> bool {
        self.selectors.iter().all(|s| {
            let value: Option<&str> = match &s.field {
                Field::Name => Some(f.name),
                Field::Parent => Some(f.parent),
                Field::Kind => Some(f.kind),
                Field::Label(key) => f.labels.get(key).map(String::as_str),
                Field::Unknown => None,
            };
            match &s.op {
                Op::Present => value.is_some(),
                Op::Eq(want) => value == Some(want.as_str()),
                Op::Ne(want) => value.unwrap_or("") != want,
                Op::Re(re) => re.is_match(value.unwrap_or("")),
            }
        })
    }
}

/// True when `filters` is empty or any of them matches.
pub fn any_matches(filters: &[Filter], f: &Fields<'_>) -> bool {
    filters.is_empty() || filters.iter().any(|x| x.matches(f))
}

/// The snapshots, keyed by name, that `filters` select (List's rule); a filter that does
/// not parse is an InvalidArgument, even when there are no snapshots.
pub fn select(
    filters: &[String],
    snaps: Vec<(String, Snap)>,
) -> Result<Vec<(String, Snap)>, SnapError> {
    let parsed = filters
        .iter()
        .map(|f| Filter::parse(f))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(snaps
        .into_iter()
        .filter(|(name, s)| {
            any_matches(
                &parsed,
                &Fields {
                    name,
                    parent: &s.parent,
                    kind: s.kind.as_str(),
                    labels: &s.labels,
                },
            )
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshotter::meta::Meta;
    use crate::snapshotter::Kind;

    const GC_ROOT: &str = "containerd.io/gc.root";

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    /// The snapshots of containerd's snapshotter test suite's walk check, in a real
    /// metadata database: `a-np` and `a-np-wl` have no parent; `p` and `p-wl` are
    /// committed bases; `a`/`v` (on `p`) and `a-wl`/`v-wl` (on `p-wl`) are an active and
    /// a view each. All carry the gc.root label `check-walk`; the `-wl` ones also `l`.
    fn walk_corpus() -> (tempfile::TempDir, Meta) {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(&dir.path().join("s.redb")).unwrap();
        let root = |more: &[(&str, &str)]| {
            let mut l = labels(more);
            l.insert(GC_ROOT.to_string(), "check-walk".to_string());
            l
        };
        m.create(Kind::Active, "a-np", "", root(&[])).unwrap();
        m.create(Kind::Active, "p-tmp", "", root(&[])).unwrap();
        m.commit("p-tmp", "p", root(&[]), "01", 0, 0).unwrap();
        m.create(Kind::Active, "a", "p", root(&[])).unwrap();
        m.create(Kind::View, "v", "p", root(&[])).unwrap();
        m.create(Kind::Active, "p-wl-tmp", "", root(&[])).unwrap();
        m.commit("p-wl-tmp", "p-wl", root(&[("l", "1")]), "02", 0, 0)
            .unwrap();
        m.create(Kind::Active, "a-wl", "p-wl", root(&[("l", "2")]))
            .unwrap();
        m.create(Kind::View, "v-wl", "p-wl", root(&[("l", "3")]))
            .unwrap();
        m.create(Kind::Active, "a-np-wl", "", root(&[("l", "2")]))
            .unwrap();
        (dir, m)
    }

    /// The names List returns for `filters`, sorted.
    fn listed(m: &Meta, filters: &[&str]) -> Vec<String> {
        let filters: Vec<String> = filters.iter().map(|f| f.to_string()).collect();
        let mut names: Vec<String> = select(&filters, m.list().unwrap())
            .unwrap()
            .into_iter()
            .map(|(name, _)| name)
            .collect();
        names.sort();
        names
    }

    #[test]
    fn issue_12_quoted_empty_parent_lists_only_children() {
        let (_d, m) = walk_corpus();
        assert_eq!(
            listed(
                &m,
                &[r#"parent!="",labels."containerd.io/gc.root"==check-walk"#]
            ),
            ["a", "a-wl", "v", "v-wl"]
        );
    }

    #[test]
    fn walk_filters_of_containerds_test_suite() {
        let (_d, m) = walk_corpus();
        let root = r#"labels."containerd.io/gc.root"==check-walk"#;
        let cases: [(Vec<String>, &[&str]); 10] = [
            (
                vec![root.into()],
                &["a", "a-np", "a-np-wl", "a-wl", "p", "p-wl", "v", "v-wl"],
            ),
            (
                vec![format!("kind==active,{root}")],
                &["a", "a-np", "a-np-wl", "a-wl"],
            ),
            (vec![format!("kind==view,{root}")], &["v", "v-wl"]),
            (vec![format!("kind==committed,{root}")], &["p", "p-wl"]),
            (
                vec!["name==p".into(), "name==a-np-wl".into()],
                &["a-np-wl", "p"],
            ),
            (vec!["name==a-wl,labels.l".into()], &["a-wl"]),
            (vec!["parent==p".into()], &["a", "v"]),
            (
                vec![format!(r#"parent!="",{root}"#)],
                &["a", "a-wl", "v", "v-wl"],
            ),
            (
                vec!["labels.l".into()],
                &["a-np-wl", "a-wl", "p-wl", "v-wl"],
            ),
            (vec!["labels.l==2".into()], &["a-np-wl", "a-wl"]),
        ];
        for (filters, want) in cases {
            let f: Vec<&str> = filters.iter().map(String::as_str).collect();
            assert_eq!(listed(&m, &f), want, "{filters:?}");
        }
    }

    /// A snapshot for the grammar tests.
    struct Item {
        name: &'static str,
        parent: &'static str,
        kind: &'static str,
        labels: BTreeMap<String, String>,
    }

    /// `base` and `bare` have no parent; `empty` is a label set to "" on `base` and `view`.
    fn corpus() -> Vec<Item> {
        vec![
            Item {
                name: "base",
                parent: "",
                kind: "committed",
                labels: labels(&[(GC_ROOT, "x"), ("a.b/c", "v"), ("empty", "")]),
            },
            Item {
                name: "top",
                parent: "base",
                kind: "committed",
                labels: labels(&[(GC_ROOT, "x"), ("l", "1")]),
            },
            Item {
                name: "ctr",
                parent: "top",
                kind: "active",
                labels: labels(&[("l", "2"), ("q\"k", "a\\b")]),
            },
            Item {
                name: "bare",
                parent: "",
                kind: "active",
                labels: labels(&[("x.y", "z")]),
            },
            Item {
                name: "view",
                parent: "top",
                kind: "view",
                labels: labels(&[("empty", ""), ("note", "a, b c")]),
            },
        ]
    }

    /// The names of the corpus that `filters` (ORed) select, in corpus order.
    fn pick(filters: &[&str]) -> Vec<&'static str> {
        let parsed: Vec<Filter> = filters
            .iter()
            .map(|f| Filter::parse(f).unwrap_or_else(|e| panic!("{f}: {e}")))
            .collect();
        corpus()
            .iter()
            .filter(|i| {
                let fields = Fields {
                    name: i.name,
                    parent: i.parent,
                    kind: i.kind,
                    labels: &i.labels,
                };
                any_matches(&parsed, &fields)
            })
            .map(|i| i.name)
            .collect()
    }

    const ALL: [&str; 5] = ["base", "top", "ctr", "bare", "view"];

    /// The InvalidArgument message for a filter that must not parse.
    fn parse_err(filter: &str) -> String {
        match Filter::parse(filter) {
            Err(SnapError::InvalidArgument(m)) => m,
            other => panic!("{filter:?} gave {other:?}"),
        }
    }

    /// The value of `name==<literal>` (or `name~=<literal>`), decoded.
    fn decoded(op: &str, literal: &str) -> String {
        let filter = format!("name{op}{literal}");
        let f = Filter::parse(&filter).unwrap_or_else(|e| panic!("{filter}: {e}"));
        match &f.selectors[0].op {
            Op::Eq(v) | Op::Ne(v) => v.clone(),
            Op::Re(re) => re.as_str().to_string(),
            Op::Present => panic!("{filter}: no value"),
        }
    }

    #[test]
    fn quoted_empty_string_is_the_empty_string() {
        assert_eq!(pick(&[r#"parent!="""#]), ["top", "ctr", "view"]);
        assert_eq!(pick(&["parent==\"\""]), ["base", "bare"]);
        assert_eq!(pick(&[r#"parent==" ""#]), [] as [&str; 0]);
        assert_eq!(decoded("==", r#""""#), "");
        // Without quotes there is no value at all.
        assert!(parse_err("parent!=").contains("expected a value"));
        assert!(parse_err("parent==").contains("expected a value"));
        assert!(parse_err("parent==,kind==view").contains("expected a value"));
    }

    #[test]
    fn absent_and_empty_fields_differ() {
        // name, parent and kind are always present, even an empty parent.
        assert_eq!(pick(&["parent"]), ALL);
        assert_eq!(pick(&["name,kind"]), ALL);
        // A label set to "" is present; == needs the field present.
        assert_eq!(pick(&["labels.empty"]), ["base", "view"]);
        assert_eq!(pick(&["labels.empty==\"\""]), ["base", "view"]);
        assert_eq!(pick(&[r#"labels.empty!="""#]), [] as [&str; 0]);
        // != and ~= compare an absent field as "".
        assert_eq!(pick(&["labels.empty!=x"]), ALL);
        assert_eq!(pick(&["labels.l!=1"]), ["base", "ctr", "bare", "view"]);
        assert_eq!(pick(&["labels.empty~=^$"]), ALL);
        assert_eq!(pick(&["labels.l~=^$"]), ["base", "bare", "view"]);
        // Fields snapshots do not have are never present.
        assert_eq!(pick(&["size"]), [] as [&str; 0]);
        assert_eq!(pick(&["size==\"\""]), [] as [&str; 0]);
        assert_eq!(pick(&["size!=1"]), ALL);
        assert_eq!(pick(&["labels"]), [] as [&str; 0]);
        // As in containerd's adaptor, only the first element names a plain field.
        assert_eq!(pick(&["name.x==base"]), ["base"]);
    }

    #[test]
    fn field_paths_and_quoted_label_keys() {
        assert_eq!(pick(&[r#"labels."a.b/c"==v"#]), ["base"]);
        assert_eq!(
            pick(&[r#"labels."containerd.io/gc.root""#]),
            ["base", "top"]
        );
        assert_eq!(pick(&[r#""labels"."l"==1"#]), ["top"]);
        assert_eq!(pick(&[r#"labels."q\"k"=="a\\b""#]), ["ctr"]);
        // Unquoted dots join the rest of the path into one key.
        assert_eq!(pick(&["labels.x.y==z"]), ["bare"]);
        assert_eq!(pick(&["labels.Under_score-1"]), [] as [&str; 0]);
        // `/` opens a regex quote, which a field may not use.
        assert!(parse_err("labels.a.b/c==v").contains("expected an operator"));
        assert!(parse_err("labels.containerd.io/gc.root").contains("found '/'"));
        assert!(parse_err("labels.|l|==1").contains("quoted only by"));
        assert!(parse_err("labels./l/").contains("quoted only by"));
        // Single quotes are not quotes.
        assert!(parse_err("labels.'l'").contains("expected a field name"));
        assert!(parse_err("labels.").contains("expected a field name"));
        assert!(parse_err(".name").contains("expected a field name"));
        assert!(parse_err("labels..l").contains("expected a field name"));
    }

    #[test]
    fn quoted_values_decode_go_escapes() {
        let ok = [
            (r#""a b,c""#, "a b,c"),
            (r#""a\"b""#, "a\"b"),
            (r#""a\\b""#, "a\\b"),
            (r#""\a\b\f\n\r\t\v""#, "\x07\x08\x0c\n\r\t\x0b"),
            (r#""\x41\101\000""#, "AA\0"),
            (r#""\xc3\xa9\303\251""#, "éé"),
            (r#""\u00e9\U0001F600""#, "é\u{1F600}"),
            (r#""牛""#, "牛"),
            // Other quote characters need no escape inside "...".
            (r#""a/b|c'd""#, "a/b|c'd"),
        ];
        for (literal, want) in ok {
            assert_eq!(decoded("==", literal), want, "{literal}");
        }
        assert_eq!(pick(&[r#"labels.note=="a, b c""#]), ["view"]);
        // Unquoted values are taken as written: no escapes, quotes kept.
        assert_eq!(decoded("==", r"a\nb"), r"a\nb");
        assert_eq!(decoded("==", "'x'"), "'x'");
        assert_eq!(decoded("==", r#"a"b"#), r#"a"b"#);
        assert_eq!(decoded("==", "a=b.c/d|e~!"), "a=b.c/d|e~!");
        let bad = [
            (r#""\'""#, "unknown escape"),
            (r#""\/""#, "unknown escape"),
            (r#""\g""#, "unknown escape"),
            (r#""\x4""#, "too few digits"),
            (r#""\u12""#, "too few digits"),
            (r#""\400""#, "above \\377"),
            (r#""\xff""#, "not UTF-8"),
            (r#""\ud800""#, "Unicode scalar"),
            (r#""\U00110000""#, "Unicode scalar"),
            (r#""abc"#, "not terminated"),
            (r#""\"#, "not terminated"),
            ("\"a\nb\"", "not terminated"),
            ("\"a\0b\"", "NUL"),
        ];
        for (literal, why) in bad {
            let m = parse_err(&format!("name=={literal}"));
            assert!(m.contains(why), "{literal}: {m}");
        }
    }

    #[test]
    fn regex_values_and_their_quotes() {
        // A regex matches anywhere in the field.
        assert_eq!(pick(&["name~=as"]), ["base"]);
        assert_eq!(pick(&["name~=^b"]), ["base", "bare"]);
        assert_eq!(pick(&["name~=/^(base|top)$/"]), ["base", "top"]);
        assert_eq!(pick(&["name~=|^v|"]), ["view"]);
        assert_eq!(pick(&[r#"name~="^c""#]), ["ctr"]);
        // A comma inside quotes is part of the regex; unquoted, it ends the value.
        assert_eq!(pick(&["name~=/t{1,2}/"]), ["top", "ctr"]);
        assert!(parse_err("name~=t{1,2}").contains("not a regular expression"));
        // Each quote escapes itself; backslashes must be doubled for the regex.
        assert_eq!(decoded("~=", r"/a\/b/"), "a/b");
        assert_eq!(decoded("~=", r"|a\|b|"), "a|b");
        assert_eq!(decoded("~=", r"/a|b/"), "a|b");
        assert_eq!(decoded("~=", r#"/x"y/"#), "x\"y");
        assert_eq!(decoded("~=", r"/\\d+/"), r"\d+");
        assert!(parse_err(r"name~=/\d/").contains("unknown escape"));
        // Unquoted, the backslash stays.
        assert_eq!(decoded("~=", r"[abc]\+"), r"[abc]\+");
        // /.../ and |...| quote only regexes.
        assert!(parse_err("name==/base/").contains("only a regular expression"));
        assert!(parse_err("name!=|base|").contains("only a regular expression"));
        assert!(parse_err("name~=/base").contains("not terminated"));
        assert!(parse_err("name~=(").contains("not a regular expression"));
    }

    #[test]
    fn comma_is_and_and_several_filters_are_or() {
        assert_eq!(pick(&["kind==committed,labels.l==1"]), ["top"]);
        assert_eq!(pick(&["kind==committed,labels.l==2"]), [] as [&str; 0]);
        assert_eq!(
            pick(&["kind==active", "kind==view"]),
            ["ctr", "bare", "view"]
        );
        assert_eq!(
            pick(&["name==base", "name==ctr,labels.l==2"]),
            ["base", "ctr"]
        );
        // No filters, or an empty one, select everything.
        assert_eq!(pick(&[]), ALL);
        assert_eq!(pick(&[""]), ALL);
        assert_eq!(pick(&["name==nope", ""]), ALL);
        // One bad filter fails the whole request.
        let (_d, m) = walk_corpus();
        let filters = ["name==p".to_string(), "name==".to_string()];
        assert!(matches!(
            select(&filters, m.list().unwrap()),
            Err(SnapError::InvalidArgument(_))
        ));
    }

    #[test]
    fn whitespace_between_tokens() {
        // Allowed before a field, an operator and a value.
        assert_eq!(pick(&[" name==base"]), ["base"]);
        assert_eq!(pick(&["name == base"]), ["base"]);
        assert_eq!(pick(&["name ==\tbase, kind==committed"]), ["base"]);
        assert_eq!(pick(&["labels. l==1"]), ["top"]);
        // Inside quotes it is part of the value.
        assert_eq!(pick(&[r#"name==" base""#]), [] as [&str; 0]);
        // Not after a value or a selector, nor before a `.`.
        assert!(parse_err("name==base ").contains("unexpected ' '"));
        assert!(parse_err("name==base ,kind==committed").contains("unexpected ' '"));
        assert!(parse_err("name==\"base\" ").contains("unexpected ' '"));
        assert!(parse_err("labels.l ").contains("expected an operator"));
        assert!(parse_err("labels .l==1").contains("expected an operator"));
        assert!(parse_err("   ").contains("expected a field name"));
        assert!(parse_err("name== ").contains("expected a value"));
    }

    #[test]
    fn errors_name_the_filter() {
        let cases = [
            ("name==\"base", "quoted string not terminated at byte 6"),
            ("name=base", "unsupported operator \"=\""),
            ("name===base", "unsupported operator \"===\""),
            ("name~base", "unsupported operator \"~\""),
            ("name!base", "unsupported operator \"!\""),
            ("name<base", "expected an operator"),
            (
                "name==base,",
                "expected a field name or a quoted string at its end",
            ),
            (
                ",name==base",
                "expected a field name or a quoted string at byte 0",
            ),
            ("name==base,,kind==view", "expected a field name"),
            ("==base", "expected a field name"),
            ("name==.base", "expected a value"),
            ("name===", "unsupported operator"),
            ("name==\"base\"x", "unexpected 'x'"),
            ("name\0", "expected an operator"),
        ];
        for (filter, why) in cases {
            let m = parse_err(filter);
            assert!(m.contains(&format!("filter {filter:?}")), "{m}");
            assert!(m.contains(why), "{filter:?}: {m}");
        }
        let long = format!("name=={}", "x".repeat(MAX_FILTER_BYTES));
        assert!(parse_err(&long).contains("at most 4096"));
    }
}
