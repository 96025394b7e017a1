//! Credentials from docker's `config.json` (`auths` entries only).
//!
//! Keys are matched leniently, as docker and containerd write them: `host`,
//! `https://host`, `http://host/v1/`... all name `host`; `index.docker.io`,
//! `registry-1.docker.io` and `docker.io` are one registry. Credential helpers
//! (`credsStore`, `credHelpers`) are not run: a warning says so once, and hosts without
//! an `auths` entry are reached anonymously.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;

use super::RegistryError;

/// The credentials for one host. `Debug` never shows a password or token.
#[derive(Clone, PartialEq, Eq)]
pub enum Credentials {
    /// User name and password (HTTP Basic, or exchanged for a Bearer token).
    Basic {
        /// User name.
        username: String,
        /// Password.
        password: String,
    },
    /// A registry token sent as `Authorization: Bearer` (`registrytoken`).
    Token(String),
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credentials::Basic { username, .. } => f
                .debug_struct("Basic")
                .field("username", username)
                .field("password", &"<redacted>")
                .finish(),
            Credentials::Token(_) => f.write_str("Token(<redacted>)"),
        }
    }
}

impl Credentials {
    /// oci-client's form.
    pub(crate) fn to_auth(&self) -> RegistryAuth {
        match self {
            Credentials::Basic { username, password } => {
                RegistryAuth::Basic(username.clone(), password.clone())
            }
            Credentials::Token(t) => RegistryAuth::Bearer(t.clone()),
        }
    }
}

/// The parsed `auths` of one `config.json`.
#[derive(Clone, Default)]
pub struct DockerConfig {
    /// The file read, for messages.
    pub path: Option<PathBuf>,
    /// Normalized host -> credentials, keys as [`normalize_host`] makes them.
    entries: BTreeMap<String, Credentials>,
}

impl fmt::Debug for DockerConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DockerConfig")
            .field("path", &self.path)
            .field("entries", &self.entries)
            .finish()
    }
}

#[derive(serde::Deserialize)]
struct FileFormat {
    #[serde(default)]
    auths: BTreeMap<String, AuthEntry>,
    #[serde(default, rename = "credsStore")]
    creds_store: Option<String>,
    #[serde(default, rename = "credHelpers")]
    cred_helpers: BTreeMap<String, String>,
}

#[derive(serde::Deserialize)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
    #[serde(default)]
    registrytoken: Option<String>,
}

impl DockerConfig {
    /// Reads `path`; a missing file is an empty configuration. A file that does not
    /// parse is an error naming the file (and the key, never a value).
    pub fn load(path: &Path) -> Result<DockerConfig, RegistryError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                tracing::debug!(path = %path.display(), "no docker config: anonymous access");
                return Ok(DockerConfig {
                    path: Some(path.to_path_buf()),
                    entries: BTreeMap::new(),
                });
            }
            Err(e) => {
                return Err(RegistryError::Config {
                    what: path.display().to_string(),
                    reason: format!("cannot read: {e}"),
                })
            }
        };
        Self::parse(path, &text)
    }

    /// Parses the text of `path`.
    pub fn parse(path: &Path, text: &str) -> Result<DockerConfig, RegistryError> {
        let config_err = |reason: String| RegistryError::Config {
            what: path.display().to_string(),
            reason,
        };
        // serde_json's messages quote no input, only positions.
        let file: FileFormat = serde_json::from_str(text)
            .map_err(|e| config_err(format!("not docker's config.json: {e}")))?;
        if let Some(store) = &file.creds_store {
            tracing::warn!(
                path = %path.display(),
                store,
                "docker credsStore is not supported: hosts without an auths entry are reached anonymously"
            );
        }
        if !file.cred_helpers.is_empty() {
            let hosts: Vec<&String> = file.cred_helpers.keys().collect();
            tracing::warn!(
                path = %path.display(),
                ?hosts,
                "docker credHelpers are not supported: these hosts are reached anonymously unless they have an auths entry"
            );
        }
        let mut entries = BTreeMap::new();
        for (key, entry) in file.auths {
            let host = normalize_host(&key);
            let creds = match entry_credentials(&entry) {
                Ok(Some(c)) => c,
                Ok(None) => {
                    if entry.identitytoken.is_some() {
                        tracing::warn!(
                            path = %path.display(),
                            key,
                            "identitytoken (OAuth refresh token) is not supported: anonymous access"
                        );
                    }
                    continue;
                }
                Err(rule) => return Err(config_err(format!("auths entry {key:?}: {rule}"))),
            };
            // An exact key wins over one that only normalizes to the same host.
            if key == host || !entries.contains_key(&host) {
                entries.insert(host, creds);
            }
        }
        Ok(DockerConfig {
            path: Some(path.to_path_buf()),
            entries,
        })
    }

    /// The credentials for `host` (`host[:port]` as the client connects to it).
    pub fn lookup(&self, host: &str) -> Option<&Credentials> {
        self.entries.get(&normalize_host(host))
    }

    /// How many hosts have credentials.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no host has credentials.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }
}

fn entry_credentials(e: &AuthEntry) -> Result<Option<Credentials>, &'static str> {
    if let Some(auth) = e.auth.as_deref().filter(|a| !a.is_empty()) {
        let raw = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| "\"auth\" is not base64")?;
        let text = String::from_utf8(raw).map_err(|_| "\"auth\" is not UTF-8")?;
        let (user, pass) = text
            .split_once(':')
            .ok_or("\"auth\" does not decode to user:password")?;
        return Ok(Some(Credentials::Basic {
            username: user.to_string(),
            password: pass.to_string(),
        }));
    }
    if let (Some(u), Some(p)) = (&e.username, &e.password) {
        if !u.is_empty() {
            return Ok(Some(Credentials::Basic {
                username: u.clone(),
                password: p.clone(),
            }));
        }
    }
    if let Some(t) = e.registrytoken.as_deref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credentials::Token(t.to_string())));
    }
    Ok(None)
}

/// `https://Host:5000/v1/` -> `host:5000`; Docker Hub's names -> `docker.io`.
pub fn normalize_host(key: &str) -> String {
    let k = key.trim();
    let k = k
        .strip_prefix("https://")
        .or_else(|| k.strip_prefix("http://"))
        .unwrap_or(k);
    let host = k.split('/').next().unwrap_or("").to_ascii_lowercase();
    match host.as_str() {
        "index.docker.io" | "registry-1.docker.io" | "registry.hub.docker.com" => {
            "docker.io".to_string()
        }
        _ => host,
    }
}

/// The default `config.json`: `$DOCKER_CONFIG/config.json`, else
/// `$HOME/.docker/config.json`, else `/root/.docker/config.json`.
pub fn default_docker_config() -> PathBuf {
    if let Some(dir) = std::env::var_os("DOCKER_CONFIG").filter(|d| !d.is_empty()) {
        return PathBuf::from(dir).join("config.json");
    }
    let home = std::env::var_os("HOME")
        .filter(|h| !h.is_empty())
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/root"));
    home.join(".docker").join("config.json")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn matches_keys_leniently() {
        let text = format!(
            r#"{{"auths": {{
                "https://index.docker.io/v1/": {{"auth": "{}"}},
                "127.0.0.1:5000": {{"username": "u2", "password": "p2"}},
                "http://Mirror.Example:8443/v2/": {{"auth": "{}"}},
                "tok.example": {{"registrytoken": "t0k"}},
                "ident.example": {{"identitytoken": "refresh"}}
            }}, "credsStore": "desktop", "credHelpers": {{"gcr.io": "gcloud"}}}}"#,
            b64("hub:hubpass"),
            b64("m:pa:ss")
        );
        let c = DockerConfig::parse(Path::new("/x/config.json"), &text).unwrap();
        let basic = |u: &str, p: &str| Credentials::Basic {
            username: u.into(),
            password: p.into(),
        };
        assert_eq!(c.lookup("docker.io"), Some(&basic("hub", "hubpass")));
        assert_eq!(
            c.lookup("registry-1.docker.io"),
            Some(&basic("hub", "hubpass"))
        );
        assert_eq!(c.lookup("127.0.0.1:5000"), Some(&basic("u2", "p2")));
        assert_eq!(c.lookup("127.0.0.1:5001"), None);
        assert_eq!(c.lookup("127.0.0.1"), None);
        // The password may itself hold ':'.
        assert_eq!(c.lookup("mirror.example:8443"), Some(&basic("m", "pa:ss")));
        assert_eq!(
            c.lookup("tok.example"),
            Some(&Credentials::Token("t0k".into()))
        );
        assert_eq!(c.lookup("ident.example"), None);
        assert_eq!(c.len(), 4);
    }

    #[test]
    fn exact_key_wins() {
        let text = format!(
            r#"{{"auths": {{"https://h:1": {{"auth": "{}"}}, "h:1": {{"auth": "{}"}}}}}}"#,
            b64("a:1"),
            b64("b:2")
        );
        let c = DockerConfig::parse(Path::new("c.json"), &text).unwrap();
        assert!(
            matches!(c.lookup("h:1"), Some(Credentials::Basic { username, .. }) if username == "b")
        );
    }

    #[test]
    fn bad_files_name_the_key_not_the_value() {
        let e = DockerConfig::parse(
            Path::new("/c.json"),
            r#"{"auths": {"h": {"auth": "bm9jb2xvbg=="}}}"#,
        )
        .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("/c.json") && msg.contains("\"h\""), "{msg}");
        assert!(!msg.contains("bm9jb2xvbg"), "{msg}");
        assert!(DockerConfig::parse(Path::new("/c.json"), "not json").is_err());
        let missing = DockerConfig::load(Path::new("/nonexistent/dedupd/config.json")).unwrap();
        assert!(missing.is_empty());
    }

    #[test]
    fn debug_hides_secrets() {
        let text = format!(
            r#"{{"auths": {{"h": {{"auth": "{}"}}, "t": {{"registrytoken": "sekrit-token"}}}}}}"#,
            b64("user:hunter2-password")
        );
        let c = DockerConfig::parse(Path::new("c.json"), &text).unwrap();
        let dbg = format!("{c:?} {:?}", c.lookup("h").unwrap().to_auth());
        assert!(dbg.contains("user"), "{dbg}");
        for secret in [
            "hunter2-password",
            "sekrit-token",
            &b64("user:hunter2-password"),
        ] {
            assert!(!dbg.contains(secret), "{dbg}");
        }
    }
}
