//! containerd's registry host configuration: `<hosts_dir>/<host>/hosts.toml`.
//!
//! The directory of a registry is the first that exists of `host_port_` (for a
//! registry with a port), `host:port` (or `host`), and `_default`. Its `hosts.toml`
//! lists mirrors as `[host."<url>"]` tables, tried in file order, and ends with the
//! `server` (the registry itself when absent; `https://registry-1.docker.io` for
//! `docker.io`). Top-level `ca`, `skip_verify`, `capabilities` and `dial_timeout` apply
//! to the server. A table without `capabilities` has all three (pull, resolve, push),
//! as in containerd. Relative `ca` paths are relative to the directory. A directory
//! without `hosts.toml` is read the way docker reads `certs.d`: its `*.crt` files are
//! CAs of the server.
//!
//! Not supported, and refused with an error naming the file: host URLs with a path
//! other than `/v2` (with or without `override_path`), `client` certificates,
//! `header` and `proxy`. containerd logs a broken `hosts.toml` and carries on with the
//! certificates of the directory; we refuse it, so that a typo does not quietly send
//! traffic to another host.

use std::path::{Path, PathBuf};
use std::time::Duration;

use super::RegistryError;

/// What a host may be used for.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Caps(u8);

impl Caps {
    /// Fetch blobs, and manifests by digest.
    pub const PULL: Caps = Caps(1);
    /// Turn a tag into a digest (and list referrers): a trusted operation.
    pub const RESOLVE: Caps = Caps(2);
    /// Upload.
    pub const PUSH: Caps = Caps(4);
    /// All three.
    pub const ALL: Caps = Caps(7);

    /// True if every capability of `other` is in `self`.
    pub fn has(self, other: Caps) -> bool {
        self.0 & other.0 == other.0
    }

    /// The name used in `hosts.toml` (for a single capability).
    pub fn name(self) -> &'static str {
        match self {
            Caps::PULL => "pull",
            Caps::RESOLVE => "resolve",
            Caps::PUSH => "push",
            _ => "pull+resolve+push",
        }
    }
}

/// One place a registry's content can be reached.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HostConfig {
    /// `http` or `https`.
    pub plain_http: bool,
    /// `host[:port]`.
    pub host: String,
    /// What this host may be used for.
    pub caps: Caps,
    /// Extra trusted CA files (PEM), absolute.
    pub ca: Vec<PathBuf>,
    /// Accept any certificate.
    pub skip_verify: bool,
    /// Connect timeout of this host, overriding the client's.
    pub dial_timeout: Option<Duration>,
    /// False for the server (the registry itself, or what `server` names), true for
    /// the `[host]` tables: requests to a mirror carry `?ns=<registry>`.
    pub mirror: bool,
}

impl HostConfig {
    /// `https://host` or `http://host`.
    pub fn url(&self) -> String {
        format!(
            "{}://{}",
            if self.plain_http { "http" } else { "https" },
            self.host
        )
    }
}

/// The hosts of `registry`, mirrors first and the server last, from `hosts_dir`.
/// `plain_http` makes the implicit server (no `server` key) plain HTTP, like
/// `ctr --plain-http`.
pub fn hosts_for(
    hosts_dir: &Path,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<HostConfig>, RegistryError> {
    for dir in host_dirs(hosts_dir, registry) {
        match std::fs::metadata(&dir) {
            Ok(m) if m.is_dir() => {}
            Ok(_) => continue,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(RegistryError::Config {
                    what: dir.display().to_string(),
                    reason: format!("cannot stat: {e}"),
                })
            }
        }
        let file = dir.join("hosts.toml");
        return match std::fs::read_to_string(&file) {
            Ok(text) => parse_hosts_toml(&dir, &text, registry, plain_http).map_err(|reason| {
                RegistryError::Config {
                    what: file.display().to_string(),
                    reason,
                }
            }),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                Ok(vec![cert_dir_server(&dir, registry, plain_http)?])
            }
            Err(e) => Err(RegistryError::Config {
                what: file.display().to_string(),
                reason: format!("cannot read: {e}"),
            }),
        };
    }
    Ok(vec![default_server(registry, plain_http)])
}

/// Candidate directories, in containerd's order.
fn host_dirs(root: &Path, registry: &str) -> Vec<PathBuf> {
    let mut out = Vec::with_capacity(3);
    if let Some((h, p)) = registry.rsplit_once(':') {
        if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) {
            out.push(root.join(format!("{h}_{p}_")));
        }
    }
    out.push(root.join(registry));
    out.push(root.join("_default"));
    out
}

/// The registry itself, as reached with no configuration.
fn default_server(registry: &str, plain_http: bool) -> HostConfig {
    let (host, plain) = if registry == super::DOCKER_HUB {
        ("registry-1.docker.io".to_string(), false)
    } else {
        (registry.to_string(), plain_http)
    };
    HostConfig {
        plain_http: plain,
        host,
        caps: Caps::ALL,
        ca: Vec::new(),
        skip_verify: false,
        dial_timeout: None,
        mirror: false,
    }
}

/// A directory in docker's `certs.d` layout: `*.crt` are CAs; client certificates
/// (`*.cert`, `*.key`) are not supported.
fn cert_dir_server(
    dir: &Path,
    registry: &str,
    plain_http: bool,
) -> Result<HostConfig, RegistryError> {
    let mut server = default_server(registry, plain_http);
    let cfg_err = |reason: String| RegistryError::Config {
        what: dir.display().to_string(),
        reason,
    };
    let entries = std::fs::read_dir(dir).map_err(|e| cfg_err(format!("cannot list: {e}")))?;
    let mut names = Vec::new();
    for e in entries {
        let e = e.map_err(|e| cfg_err(format!("cannot list: {e}")))?;
        names.push(e.path());
    }
    names.sort();
    for p in names {
        match p.extension().and_then(|e| e.to_str()) {
            Some("crt") => server.ca.push(p),
            Some("cert") | Some("key") => {
                return Err(cfg_err(format!(
                    "{}: client certificates are not supported",
                    p.display()
                )))
            }
            _ => {}
        }
    }
    Ok(server)
}

/// Parses the text of `<dir>/hosts.toml` for `registry`.
pub fn parse_hosts_toml(
    dir: &Path,
    text: &str,
    registry: &str,
    plain_http: bool,
) -> Result<Vec<HostConfig>, String> {
    // toml's `preserve_order` feature keeps the `[host."..."]` tables in file order.
    let doc: toml::Table = toml::from_str(text).map_err(|e| format!("not TOML: {e}"))?;
    let mut out = Vec::new();
    if let Some(hosts) = doc.get("host") {
        let hosts = hosts
            .as_table()
            .ok_or("`host` must be a table of [host.\"<url>\"] tables")?;
        for (url, table) in hosts {
            let table = table
                .as_table()
                .ok_or_else(|| format!("host {url:?} must be a table"))?;
            let h = parse_entry(dir, url, table, true, plain_http)
                .map_err(|e| format!("host {url:?}: {e}"))?;
            out.push(h);
        }
    }
    let server = match doc.get("server") {
        Some(s) => {
            let url = s.as_str().ok_or("`server` must be a string")?;
            parse_entry(dir, url, &doc, false, plain_http).map_err(|e| format!("server: {e}"))?
        }
        None => {
            // containerd fills in the registry itself and gives it every capability,
            // keeping the file's top-level TLS settings.
            let mut s = parse_entry(dir, "", &doc, false, plain_http)
                .map_err(|e| format!("top level: {e}"))?;
            let d = default_server(registry, plain_http);
            s.host = d.host;
            s.plain_http = d.plain_http;
            s.caps = Caps::ALL;
            s
        }
    };
    out.push(server);
    Ok(out)
}

/// One `[host."<url>"]` table, or the top level for the server (`url` empty when the
/// file has no `server`).
fn parse_entry(
    dir: &Path,
    url: &str,
    t: &toml::Table,
    mirror: bool,
    plain_http: bool,
) -> Result<HostConfig, String> {
    for unsupported in ["client", "header", "proxy"] {
        if t.contains_key(unsupported) {
            return Err(format!("`{unsupported}` is not supported by dedupd"));
        }
    }
    let override_path = match t.get("override_path") {
        None => false,
        Some(v) => v.as_bool().ok_or("`override_path` must be true or false")?,
    };
    let (plain, host) = if url.is_empty() {
        (plain_http, String::new())
    } else {
        let (scheme, rest) = match url.split_once("://") {
            Some((s, r)) => (s.to_ascii_lowercase(), r),
            None => ("https".to_string(), url),
        };
        let plain = match scheme.as_str() {
            "http" => true,
            "https" => false,
            other => return Err(format!("scheme {other:?}: only http and https")),
        };
        let (host, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        if host.is_empty() {
            return Err("no host in URL".to_string());
        }
        let path = path.trim_end_matches('/');
        // containerd appends /v2 to a path without it unless override_path is set;
        // oci-client always addresses <host>/v2/, so only that API root works here.
        if !(path.is_empty() && !override_path || path == "/v2") {
            return Err(format!(
                "API root {:?}{}: only <host>/v2 is supported",
                if path.is_empty() { "/" } else { path },
                if override_path {
                    " with override_path"
                } else {
                    ""
                }
            ));
        }
        (plain, host.to_string())
    };
    let caps = match t.get("capabilities") {
        None => Caps::ALL,
        Some(v) => {
            let list = v.as_array().ok_or("`capabilities` must be a list")?;
            let mut caps = Caps(0);
            for c in list {
                let name = c.as_str().ok_or("`capabilities` must be strings")?;
                caps.0 |= match name.to_ascii_lowercase().as_str() {
                    "pull" => Caps::PULL.0,
                    "resolve" => Caps::RESOLVE.0,
                    "push" => Caps::PUSH.0,
                    other => return Err(format!("unknown capability {other:?}")),
                };
            }
            caps
        }
    };
    let abs = |p: &str| {
        let p = Path::new(p);
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            dir.join(p)
        }
    };
    let ca = match t.get("ca") {
        None => Vec::new(),
        Some(toml::Value::String(s)) => vec![abs(s)],
        Some(toml::Value::Array(a)) => a
            .iter()
            .map(|v| {
                v.as_str()
                    .map(abs)
                    .ok_or("`ca` must be a path or a list of paths")
            })
            .collect::<Result<_, _>>()?,
        Some(_) => return Err("`ca` must be a path or a list of paths".to_string()),
    };
    let skip_verify = match t.get("skip_verify") {
        None => false,
        Some(v) => v.as_bool().ok_or("`skip_verify` must be true or false")?,
    };
    let dial_timeout = match t.get("dial_timeout") {
        None => None,
        Some(v) => Some(parse_duration(
            v.as_str()
                .ok_or("`dial_timeout` must be a string like \"1s\"")?,
        )?),
    };
    Ok(HostConfig {
        plain_http: plain,
        host,
        caps,
        ca,
        skip_verify,
        dial_timeout,
        mirror,
    })
}

/// Go-style durations as containerd writes them: `500ms`, `2s`, `1m`, `1m30s`.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("duration {s:?}: expected e.g. \"500ms\", \"2s\", \"1m30s\"");
    let mut total = Duration::ZERO;
    let mut rest = s.trim();
    if rest.is_empty() {
        return Err(bad());
    }
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit() && c != '.')
            .ok_or_else(bad)?;
        let value: f64 = rest[..digits].parse().map_err(|_| bad())?;
        let unit_end = rest[digits..]
            .find(|c: char| c.is_ascii_digit())
            .map_or(rest.len(), |i| digits + i);
        let unit = match &rest[digits..unit_end] {
            "ms" => 0.001,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            _ => return Err(bad()),
        };
        total += Duration::from_secs_f64(value * unit);
        rest = &rest[unit_end..];
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str, registry: &str) -> Result<Vec<HostConfig>, String> {
        parse_hosts_toml(Path::new("/etc/certs.d/r"), text, registry, false)
    }

    #[test]
    fn mirrors_in_file_order_then_server() {
        // Names sort differently from their file order, to catch a sorted map.
        let hosts = parse(
            r#"
server = "https://registry.example:5000"
ca = "server-ca.pem"
capabilities = ["pull", "resolve", "push"]

[host."https://zz-mirror.example"]
  capabilities = ["pull"]
  ca = ["/abs/ca1.pem", "rel/ca2.pem"]
  dial_timeout = "1s500ms"
  [host."https://zz-mirror.example".header_ignored_subtable_is_not_a_host]

[host."http://aa-mirror.example:8080/v2"]
  capabilities = ["pull", "resolve"]
  skip_verify = true

[host."mm-mirror.example"]
"#,
            "registry.example:5000",
        );
        // The stray sub-table above is a value of the first host, not a host.
        let hosts = hosts.unwrap();
        let names: Vec<(String, bool)> = hosts.iter().map(|h| (h.url(), h.mirror)).collect();
        assert_eq!(
            names,
            [
                ("https://zz-mirror.example".to_string(), true),
                ("http://aa-mirror.example:8080".to_string(), true),
                ("https://mm-mirror.example".to_string(), true),
                ("https://registry.example:5000".to_string(), false),
            ]
        );
        assert_eq!(hosts[0].caps, Caps::PULL);
        assert_eq!(
            hosts[0].ca,
            [
                PathBuf::from("/abs/ca1.pem"),
                PathBuf::from("/etc/certs.d/r/rel/ca2.pem")
            ]
        );
        assert_eq!(hosts[0].dial_timeout, Some(Duration::from_millis(1500)));
        assert!(hosts[1].plain_http && hosts[1].skip_verify);
        assert!(hosts[1].caps.has(Caps::RESOLVE) && !hosts[1].caps.has(Caps::PUSH));
        // containerd: no capabilities means all of them, mirrors included.
        assert_eq!(hosts[2].caps, Caps::ALL);
        assert_eq!(hosts[3].ca, [PathBuf::from("/etc/certs.d/r/server-ca.pem")]);
        assert!(!hosts[3].plain_http);
    }

    #[test]
    fn implicit_server() {
        let hosts = parse(
            "[host.\"https://m\"]\ncapabilities=[\"pull\"]\n",
            "docker.io",
        )
        .unwrap();
        assert_eq!(hosts[1].url(), "https://registry-1.docker.io");
        assert_eq!(hosts[1].caps, Caps::ALL);
        let hosts = parse_hosts_toml(
            Path::new("/d"),
            "skip_verify = true\ncapabilities = [\"pull\"]\n",
            "127.0.0.1:5000",
            true,
        )
        .unwrap();
        assert_eq!(hosts.len(), 1);
        assert_eq!(hosts[0].url(), "http://127.0.0.1:5000");
        assert!(hosts[0].skip_verify && !hosts[0].mirror);
        assert_eq!(hosts[0].caps, Caps::ALL);
    }

    #[test]
    fn refuses_what_it_cannot_do() {
        for (text, needle) in [
            ("[host.\"https://m/some/path\"]\n", "only <host>/v2"),
            (
                "[host.\"https://m/v2/up\"]\noverride_path = true\n",
                "override_path",
            ),
            (
                "[host.\"https://m\"]\noverride_path = true\n",
                "override_path",
            ),
            ("[host.\"https://m\"]\nclient = \"c.pem\"\n", "`client`"),
            (
                "[host.\"https://m\"]\n[host.\"https://m\".header]\nx = \"y\"\n",
                "`header`",
            ),
            ("proxy = \"http://p:1\"\n", "`proxy`"),
            (
                "[host.\"https://m\"]\ncapabilities = [\"fly\"]\n",
                "unknown capability",
            ),
            ("[host.\"ftp://m\"]\n", "only http and https"),
            (
                "[host.\"https://m\"]\ndial_timeout = \"soon\"\n",
                "duration",
            ),
            ("server = [1]\n", "`server`"),
            ("this is not toml", "not TOML"),
        ] {
            let e = parse(text, "r").expect_err(text);
            assert!(e.contains(needle), "{text}: {e}");
        }
        // /v2 is the API root oci-client uses, with or without override_path.
        let h = parse("[host.\"https://m/v2/\"]\noverride_path = true\n", "r").unwrap();
        assert_eq!(h[0].url(), "https://m");
    }

    #[test]
    fn directory_lookup() {
        let root = tempfile::tempdir().unwrap();
        let r = root.path();
        // No directory at all: the registry itself.
        let h = hosts_for(r, "127.0.0.1:5000", true).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].url(), "http://127.0.0.1:5000");
        assert_eq!(
            hosts_for(r, "docker.io", true).unwrap()[0].url(),
            "https://registry-1.docker.io"
        );

        std::fs::create_dir(r.join("_default")).unwrap();
        std::fs::write(
            r.join("_default/hosts.toml"),
            "[host.\"http://default-mirror:1\"]\ncapabilities=[\"pull\"]\n",
        )
        .unwrap();
        assert_eq!(
            hosts_for(r, "a.example", false).unwrap()[0].host,
            "default-mirror:1"
        );

        std::fs::create_dir(r.join("127.0.0.1:5000")).unwrap();
        std::fs::write(
            r.join("127.0.0.1:5000/hosts.toml"),
            "server = \"http://colon:1\"\n",
        )
        .unwrap();
        assert_eq!(
            hosts_for(r, "127.0.0.1:5000", false).unwrap()[0].host,
            "colon:1"
        );
        // host_port_ comes first.
        std::fs::create_dir(r.join("127.0.0.1_5000_")).unwrap();
        std::fs::write(r.join("127.0.0.1_5000_/ca.crt"), "pem").unwrap();
        let h = hosts_for(r, "127.0.0.1:5000", false).unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].url(), "https://127.0.0.1:5000");
        assert_eq!(h[0].ca, [r.join("127.0.0.1_5000_/ca.crt")]);

        std::fs::write(r.join("127.0.0.1_5000_/hosts.toml"), "server = [").unwrap();
        let e = hosts_for(r, "127.0.0.1:5000", false).unwrap_err();
        assert!(e.to_string().contains("127.0.0.1_5000_/hosts.toml"), "{e}");
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("500ms").unwrap(), Duration::from_millis(500));
        assert_eq!(parse_duration("1m30s").unwrap(), Duration::from_secs(90));
        assert_eq!(parse_duration("0.5s").unwrap(), Duration::from_millis(500));
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("").is_err());
    }
}
