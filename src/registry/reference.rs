//! Image references with Docker's normalization (`busybox` is
//! `docker.io/library/busybox:latest`).

use std::fmt;

use super::RegistryError;

/// The registry that names without a host part belong to.
pub const DOCKER_HUB: &str = "docker.io";
/// Longest repository name distribution accepts.
const MAX_REPOSITORY_BYTES: usize = 255;
/// Longest tag the distribution specification allows.
const MAX_TAG_BYTES: usize = 128;

/// A parsed, normalized image reference: `registry/repository[:tag][@digest]`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ImageRef {
    /// Registry host, with its port if it has one: `docker.io`, `127.0.0.1:5000`.
    pub registry: String,
    /// Repository path inside the registry: `library/busybox`.
    pub repository: String,
    /// Tag, if the reference names one. A reference with neither tag nor digest is
    /// given the tag `latest` by [`ImageRef::parse`].
    pub tag: Option<String>,
    /// Content digest (`sha256:<64 hex>`), if the reference pins one.
    pub digest: Option<String>,
}

impl ImageRef {
    /// Parses `s` the way `docker pull` and `ctr` do: the first path component is a
    /// registry host if it contains `.` or `:`, is `localhost`, or has upper-case
    /// letters; otherwise the registry is `docker.io`, where a one-component name gets
    /// the `library/` prefix. `index.docker.io` is written `docker.io`. A reference with
    /// neither tag nor digest gets the tag `latest`.
    pub fn parse(s: &str) -> Result<ImageRef, RegistryError> {
        let bad = |rule: &'static str| RegistryError::InvalidReference {
            input: s.to_string(),
            rule,
        };
        if s.is_empty() {
            return Err(bad("empty"));
        }
        let (name_tag, digest) = match s.split_once('@') {
            Some((n, d)) => {
                check_digest(d).map_err(|_| bad("digest must be sha256:<64 lowercase hex>"))?;
                (n, Some(d.to_string()))
            }
            None => (s, None),
        };
        // A ':' after the last '/' starts the tag; one before it is a registry port.
        let last_slash = name_tag.rfind('/').map_or(0, |i| i + 1);
        let (name, tag) = match name_tag[last_slash..].find(':') {
            Some(i) => (
                &name_tag[..last_slash + i],
                Some(&name_tag[last_slash + i + 1..]),
            ),
            None => (name_tag, None),
        };
        let (registry, repository) = match name.split_once('/') {
            Some((first, rest))
                if first.contains(['.', ':'])
                    || first == "localhost"
                    || first.chars().any(|c| c.is_ascii_uppercase()) =>
            {
                (first.to_string(), rest.to_string())
            }
            _ => (DOCKER_HUB.to_string(), name.to_string()),
        };
        let registry = if registry == "index.docker.io" {
            DOCKER_HUB.to_string()
        } else {
            registry
        };
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("library/{repository}")
        } else {
            repository
        };
        check_registry(&registry).map_err(bad)?;
        check_repository(&repository).map_err(bad)?;
        if let Some(t) = tag {
            check_tag(t).map_err(bad)?;
        }
        let tag = match (tag, &digest) {
            (Some(t), _) => Some(t.to_string()),
            (None, None) => Some("latest".to_string()),
            (None, Some(_)) => None,
        };
        Ok(ImageRef {
            registry,
            repository,
            tag,
            digest,
        })
    }

    /// The same repository pinned to `digest`, without a tag. The digest is checked by
    /// the operation that uses it.
    pub fn with_digest(&self, digest: &str) -> ImageRef {
        ImageRef {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest.to_string()),
        }
    }

    /// The same repository with tag `tag` and no digest.
    pub fn with_tag(&self, tag: &str) -> ImageRef {
        ImageRef {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: Some(tag.to_string()),
            digest: None,
        }
    }

    /// What a manifest request names: the digest if there is one, else the tag
    /// (`latest` if neither).
    pub fn reference(&self) -> &str {
        self.digest
            .as_deref()
            .or(self.tag.as_deref())
            .unwrap_or("latest")
    }
}

impl fmt::Display for ImageRef {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(t) = &self.tag {
            write!(f, ":{t}")?;
        }
        if let Some(d) = &self.digest {
            write!(f, "@{d}")?;
        }
        Ok(())
    }
}

impl std::str::FromStr for ImageRef {
    type Err = RegistryError;

    fn from_str(s: &str) -> Result<ImageRef, RegistryError> {
        ImageRef::parse(s)
    }
}

/// Checks that `d` is `sha256:` followed by 64 lower-case hex digits, the only digest
/// algorithm this client verifies.
pub fn check_digest(d: &str) -> Result<(), RegistryError> {
    let ok = d.strip_prefix("sha256:").is_some_and(|hex| {
        hex.len() == 64 && hex.bytes().all(|b| matches!(b, b'0'..=b'9' | b'a'..=b'f'))
    });
    if ok {
        Ok(())
    } else {
        Err(RegistryError::InvalidDigest {
            digest: d.to_string(),
        })
    }
}

fn check_registry(r: &str) -> Result<(), &'static str> {
    // host[:port], the host a DNS name, an IPv4 address or a bracketed IPv6 address.
    let (host, port) = if let Some(rest) = r.strip_prefix('[') {
        let (h, after) = rest.split_once(']').ok_or("unclosed '[' in registry")?;
        if h.is_empty() || !h.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            return Err("registry IPv6 address is malformed");
        }
        match after {
            "" => (h, None),
            p => (
                h,
                Some(p.strip_prefix(':').ok_or("junk after ']' in registry")?),
            ),
        }
    } else {
        match r.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (r, None),
        }
    };
    if host.is_empty() {
        return Err("registry host is empty");
    }
    if !r.starts_with('[')
        && !host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'-')
    {
        return Err("registry host may hold only letters, digits, '.' and '-'");
    }
    if let Some(p) = port {
        if p.is_empty() || p.len() > 5 || !p.bytes().all(|b| b.is_ascii_digit()) {
            return Err("registry port must be 1 to 5 digits");
        }
    }
    Ok(())
}

fn check_repository(repo: &str) -> Result<(), &'static str> {
    if repo.is_empty() {
        return Err("repository is empty");
    }
    if repo.len() > MAX_REPOSITORY_BYTES {
        return Err("repository is longer than 255 bytes");
    }
    for component in repo.split('/') {
        if !valid_component(component) {
            return Err(
                "repository components must be lower-case letters and digits, \
                        joined by '.', '_', '__' or dashes",
            );
        }
    }
    Ok(())
}

/// `[a-z0-9]+(?:(?:[._]|__|[-]+)[a-z0-9]+)*`
fn valid_component(c: &str) -> bool {
    let b = c.as_bytes();
    let alnum = |x: u8| x.is_ascii_lowercase() || x.is_ascii_digit();
    if b.is_empty() || !alnum(b[0]) || !alnum(b[b.len() - 1]) {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        if alnum(b[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < b.len() && !alnum(b[i]) {
            i += 1;
        }
        let sep = &c[start..i];
        let ok = sep == "." || sep == "_" || sep == "__" || sep.bytes().all(|x| x == b'-');
        if !ok {
            return false;
        }
    }
    true
}

/// `[\w][\w.-]{0,127}`
fn check_tag(t: &str) -> Result<(), &'static str> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let b = t.as_bytes();
    if b.is_empty() || b.len() > MAX_TAG_BYTES {
        return Err("tag must be 1 to 128 characters");
    }
    if !word(b[0]) || !b.iter().all(|&x| word(x) || x == b'.' || x == b'-') {
        return Err("tag must start with a letter, digit or '_' and hold only those, '.' and '-'");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn parse_table() {
        let cases: &[(&str, &str, &str, Option<&str>, bool)] = &[
            (
                "busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                false,
            ),
            (
                "busybox:1.36",
                "docker.io",
                "library/busybox",
                Some("1.36"),
                false,
            ),
            ("user/img", "docker.io", "user/img", Some("latest"), false),
            (
                "docker.io/busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                false,
            ),
            (
                "index.docker.io/busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                false,
            ),
            ("quay.io/a/b/c:v1", "quay.io", "a/b/c", Some("v1"), false),
            ("localhost/img", "localhost", "img", Some("latest"), false),
            (
                "localhost:5000/img:t",
                "localhost:5000",
                "img",
                Some("t"),
                false,
            ),
            (
                "127.0.0.1:5000/a/b",
                "127.0.0.1:5000",
                "a/b",
                Some("latest"),
                false,
            ),
            ("[::1]:5000/a", "[::1]:5000", "a", Some("latest"), false),
            ("Registry/a", "Registry", "a", Some("latest"), false),
            (
                "a_b/c-d__e.f",
                "docker.io",
                "a_b/c-d__e.f",
                Some("latest"),
                false,
            ),
            ("127.0.0.1:5000/a@DIGEST", "127.0.0.1:5000", "a", None, true),
            (
                "127.0.0.1:5000/a:t@DIGEST",
                "127.0.0.1:5000",
                "a",
                Some("t"),
                true,
            ),
            ("busybox@DIGEST", "docker.io", "library/busybox", None, true),
        ];
        for &(input, registry, repository, tag, has_digest) in cases {
            let input = input.replace("DIGEST", D);
            let r = ImageRef::parse(&input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!(r.registry, registry, "{input}");
            assert_eq!(r.repository, repository, "{input}");
            assert_eq!(r.tag.as_deref(), tag, "{input}");
            assert_eq!(r.digest.as_deref(), has_digest.then_some(D), "{input}");
            // Display round-trips through parse.
            assert_eq!(ImageRef::parse(&r.to_string()).unwrap(), r, "{input}");
        }
        assert_eq!(
            ImageRef::parse("busybox").unwrap().to_string(),
            "docker.io/library/busybox:latest"
        );
    }

    #[test]
    fn parse_refuses() {
        for bad in [
            "",
            "UPPER",
            "a//b",
            "a/b/",
            "/a",
            "a:",
            "a:-tag",
            "a@sha256:abc",
            "a@md5:0123",
            "host:port/a",
            "127.0.0.1:5000/",
            "a b",
            "a/-b",
            "a/b_-c",
        ] {
            let e = ImageRef::parse(bad).expect_err(bad);
            assert!(
                matches!(e, RegistryError::InvalidReference { .. }),
                "{bad}: {e}"
            );
            assert!(e.to_string().contains(&format!("{bad:?}")), "{e}");
        }
        let long = format!("a:{}", "t".repeat(129));
        assert!(ImageRef::parse(&long).is_err());
    }

    #[test]
    fn with_digest_and_reference() {
        let r = ImageRef::parse("127.0.0.1:5000/a:t").unwrap();
        assert_eq!(r.reference(), "t");
        let p = r.with_digest(D);
        assert_eq!(p.reference(), D);
        assert_eq!(p.to_string(), format!("127.0.0.1:5000/a@{D}"));
        assert_eq!(p.with_tag("x").to_string(), "127.0.0.1:5000/a:x");
        assert!(check_digest(D).is_ok());
        assert!(check_digest(&D.to_uppercase()).is_err());
    }
}
