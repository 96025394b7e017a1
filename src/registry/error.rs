//! What can go wrong talking to a registry, in terms a caller can act on.

use std::fmt;
use std::time::Duration;

use oci_client::errors::{OciDistributionError, OciErrorCode};

/// The object a request was about, for error messages: which host answered (a mirror or
/// the registry itself), the repository, and what was asked for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Target {
    /// The image's registry (`docker.io`, `127.0.0.1:5000`).
    pub registry: String,
    /// The host that answered: the registry's server or one of its mirrors.
    pub host: String,
    /// Repository path.
    pub repository: String,
    /// What was asked for: `blob sha256:...`, `manifest latest`, ...
    pub object: String,
}

impl fmt::Display for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{} {}", self.host, self.repository, self.object)?;
        if self.host != self.registry {
            write!(f, " (host for {})", self.registry)?;
        }
        Ok(())
    }
}

/// Longest server message kept in an error.
const MAX_MESSAGE_CHARS: usize = 300;

/// Errors of the registry client. Messages name the host, repository and object; they
/// never contain credentials or tokens.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The image reference does not parse.
    #[error("invalid image reference {input:?}: {rule}")]
    InvalidReference {
        /// What was given.
        input: String,
        /// The rule it broke.
        rule: &'static str,
    },
    /// A digest argument is not `sha256:<64 lowercase hex>`.
    #[error("invalid digest {digest:?}: expected sha256:<64 lowercase hex>")]
    InvalidDigest {
        /// What was given.
        digest: String,
    },
    /// A byte range that cannot be asked for (it overflows `u64`).
    #[error("invalid range: offset {offset} length {len}")]
    InvalidRange {
        /// First byte.
        offset: u64,
        /// Length in bytes.
        len: u64,
    },
    /// Bad configuration: options, `hosts.toml`, a CA file, docker's `config.json`.
    #[error("{what}: {reason}")]
    Config {
        /// The file or setting.
        what: String,
        /// What is wrong with it.
        reason: String,
    },
    /// No configured host of the registry has the capability the operation needs.
    #[error("registry {registry}: no configured host has the {capability:?} capability")]
    NoHost {
        /// The image's registry.
        registry: String,
        /// `pull`, `resolve` or `push`.
        capability: &'static str,
    },
    /// 404, or an error code that means the same (`MANIFEST_UNKNOWN`, `BLOB_UNKNOWN`...).
    #[error("{at}: not found")]
    NotFound {
        /// What was asked.
        at: Target,
    },
    /// 401 even after fetching a fresh token, or 403.
    #[error("{at}: {} (HTTP {status}){hint}", if *.status == 403 { "access denied" } else { "unauthorized" })]
    Unauthorized {
        /// What was asked.
        at: Target,
        /// 401 or 403.
        status: u16,
        /// Whether credentials were sent: `" with the credentials of <file>"` or
        /// `" anonymously (no credentials for this host)"`.
        hint: String,
    },
    /// The token server refused to issue a token (wrong password, unknown user).
    #[error("{at}: token request refused: {reason}")]
    AuthFailed {
        /// What was asked.
        at: Target,
        /// The token server's answer, shortened.
        reason: String,
    },
    /// The bytes do not match their digest.
    #[error("{at}: digest mismatch: the bytes hash to {actual}")]
    DigestMismatch {
        /// What was asked (its object names the expected digest).
        at: Target,
        /// Digest of the bytes received (or sent).
        actual: String,
    },
    /// The blob is larger than the caller allowed.
    #[error("{at}: {size} bytes is more than the limit of {max}")]
    TooLarge {
        /// What was asked.
        at: Target,
        /// Size announced or received so far.
        size: u64,
        /// The caller's limit.
        max: u64,
    },
    /// A range request was answered `200` with the whole blob.
    #[error("{at}: the server ignored the Range header and sent the whole blob")]
    RangeIgnored {
        /// What was asked.
        at: Target,
    },
    /// Fewer bytes arrived than were asked for.
    #[error("{at}: short body: got {got} of {want} bytes")]
    Short {
        /// What was asked.
        at: Target,
        /// Bytes received.
        got: u64,
        /// Bytes asked for.
        want: u64,
    },
    /// Any other unexpected HTTP status.
    #[error("{at}: HTTP {status}: {message}")]
    Status {
        /// What was asked.
        at: Target,
        /// The status code.
        status: u16,
        /// The server's message, shortened.
        message: String,
    },
    /// Connecting, sending or receiving failed (refused, reset, TLS, truncated body).
    #[error("{at}: connection failed")]
    Network {
        /// What was asked.
        at: Target,
        /// The transport error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// The TLS handshake failed: an untrusted or wrong certificate, or a server that
    /// does not speak TLS. Not retryable: it needs a CA, `skip_verify` or plain HTTP.
    #[error("{at}: TLS handshake failed")]
    Tls {
        /// What was asked.
        at: Target,
        /// The transport error.
        #[source]
        source: Box<dyn std::error::Error + Send + Sync>,
    },
    /// No answer in time.
    #[error("{at}: no answer within {after:?}")]
    Timeout {
        /// What was asked.
        at: Target,
        /// The limit that ran out.
        after: Duration,
    },
    /// The registry answered something this client cannot use.
    #[error("{at}: {reason}")]
    Protocol {
        /// What was asked.
        at: Target,
        /// What was wrong.
        reason: String,
    },
}

impl RegistryError {
    /// True when the same request may succeed if tried again: 5xx, 408, 429, transport
    /// errors, timeouts, an ignored Range and a short body. Not for 401/403/404, digest
    /// mismatches or bad input and configuration.
    pub fn is_retryable(&self) -> bool {
        match self {
            RegistryError::Network { .. }
            | RegistryError::Timeout { .. }
            | RegistryError::RangeIgnored { .. }
            | RegistryError::Short { .. } => true,
            RegistryError::Status { status, .. } => {
                *status >= 500 || *status == 408 || *status == 429
            }
            _ => false,
        }
    }

    /// True when a pull should go on to the registry's next host: the host is
    /// unreachable, too slow, broken (5xx) or lacks the object (404).
    pub(crate) fn falls_back(&self) -> bool {
        match self {
            RegistryError::Network { .. }
            | RegistryError::Tls { .. }
            | RegistryError::Timeout { .. }
            | RegistryError::NotFound { .. } => true,
            RegistryError::Status { status, .. } => *status >= 500,
            _ => false,
        }
    }

    /// The 401 that makes the client fetch a new token and try once more.
    pub(crate) fn is_401(&self) -> bool {
        matches!(self, RegistryError::Unauthorized { status: 401, .. })
    }

    /// Maps an oci-client error about `at`.
    pub(crate) fn from_oci(e: OciDistributionError, at: &Target) -> RegistryError {
        let at = at.clone();
        match e {
            OciDistributionError::UnauthorizedError { .. } => RegistryError::Unauthorized {
                at,
                status: 401,
                hint: String::new(),
            },
            OciDistributionError::ServerError { code, message, .. } => {
                from_status(at, code, &message)
            }
            OciDistributionError::RegistryError { envelope, .. } => {
                let first = envelope.errors.first();
                let message = first.map(|e| e.message.clone()).unwrap_or_default();
                match first.map(|e| &e.code) {
                    Some(
                        OciErrorCode::BlobUnknown
                        | OciErrorCode::ManifestUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound,
                    ) => RegistryError::NotFound { at },
                    Some(OciErrorCode::Unauthorized) => RegistryError::Unauthorized {
                        at,
                        status: 401,
                        hint: String::new(),
                    },
                    Some(OciErrorCode::Denied) => RegistryError::Unauthorized {
                        at,
                        status: 403,
                        hint: String::new(),
                    },
                    Some(OciErrorCode::Toomanyrequests) => RegistryError::Status {
                        at,
                        status: 429,
                        message: shorten(&message),
                    },
                    Some(OciErrorCode::DigestInvalid) => RegistryError::DigestMismatch {
                        at,
                        actual: "(computed by the registry)".to_string(),
                    },
                    _ => RegistryError::Status {
                        at,
                        status: 400,
                        message: shorten(&message),
                    },
                }
            }
            OciDistributionError::RequestError(e) => from_reqwest(at, e),
            OciDistributionError::IoError(e) => from_io(at, e),
            OciDistributionError::DigestError(
                oci_client::errors::DigestError::VerificationError { actual, .. },
            ) => RegistryError::DigestMismatch { at, actual },
            OciDistributionError::AuthenticationFailure(reason) => RegistryError::AuthFailed {
                at,
                reason: shorten(&reason),
            },
            OciDistributionError::RegistryTokenDecodeError(reason) => RegistryError::AuthFailed {
                at,
                reason: format!("undecodable token: {}", shorten(&reason)),
            },
            other => RegistryError::Protocol {
                at,
                reason: shorten(&other.to_string()),
            },
        }
    }
}

/// Maps an HTTP status (and the body's message) to an error.
pub(crate) fn from_status(at: Target, status: u16, message: &str) -> RegistryError {
    match status {
        401 | 403 => RegistryError::Unauthorized {
            at,
            status,
            hint: String::new(),
        },
        404 => RegistryError::NotFound { at },
        400 if message.contains("DIGEST_INVALID") => RegistryError::DigestMismatch {
            at,
            actual: "(computed by the registry)".to_string(),
        },
        _ => RegistryError::Status {
            at,
            status,
            message: shorten(message),
        },
    }
}

/// Maps a transport error, including errors in a body stream that wrap one.
pub(crate) fn from_reqwest(at: Target, e: reqwest::Error) -> RegistryError {
    if let Some(status) = e.status() {
        return from_status(at, status.as_u16(), "");
    }
    if e.is_timeout() {
        return RegistryError::Timeout {
            at,
            after: Duration::ZERO,
        };
    }
    if e.is_builder() {
        return RegistryError::Protocol {
            at,
            reason: shorten(&e.to_string()),
        };
    }
    if is_tls(&e) {
        return RegistryError::Tls {
            at,
            source: Box::new(e),
        };
    }
    RegistryError::Network {
        at,
        source: Box::new(e),
    }
}

/// True if a rustls error is among the causes of `e`. `io::Error` hides the error it
/// wraps from `source()`, so look inside those too.
fn is_tls(e: &(dyn std::error::Error + 'static)) -> bool {
    let mut cur = Some(e);
    // Causes nest a handful deep (reqwest, hyper-util, the connector, io, rustls).
    for _ in 0..16 {
        let Some(err) = cur else { return false };
        if err.is::<rustls::Error>() {
            return true;
        }
        cur = match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        };
    }
    false
}

/// True if the request went out on a kept-alive connection the server had already
/// closed (hyper's "incomplete message"): the usual fate of the first request after a
/// registry restarts or drops idle connections, and safe to send once more.
pub(crate) fn is_stale_connection(e: &RegistryError) -> bool {
    let RegistryError::Network { source, .. } = e else {
        return false;
    };
    let mut cur: Option<&(dyn std::error::Error + 'static)> = Some(source.as_ref());
    for _ in 0..16 {
        let Some(err) = cur else { return false };
        if err
            .downcast_ref::<hyper::Error>()
            .is_some_and(|h| h.is_incomplete_message())
        {
            return true;
        }
        cur = err.source();
    }
    false
}

/// Maps an I/O error of a body stream: a digest mismatch found at its end, or a
/// transport error.
pub(crate) fn from_io(at: Target, e: std::io::Error) -> RegistryError {
    if e.get_ref()
        .is_some_and(|i| i.is::<oci_client::errors::DigestError>())
    {
        let inner = e.into_inner().expect("checked above");
        let d = inner
            .downcast::<oci_client::errors::DigestError>()
            .expect("checked above");
        return match *d {
            oci_client::errors::DigestError::VerificationError { actual, .. } => {
                RegistryError::DigestMismatch { at, actual }
            }
            other => RegistryError::Protocol {
                at,
                reason: other.to_string(),
            },
        };
    }
    if e.get_ref().is_some_and(|i| i.is::<reqwest::Error>()) {
        let inner = e.into_inner().expect("checked above");
        let r = inner.downcast::<reqwest::Error>().expect("checked above");
        return from_reqwest(at, *r);
    }
    if e.kind() == std::io::ErrorKind::TimedOut {
        return RegistryError::Timeout {
            at,
            after: Duration::ZERO,
        };
    }
    RegistryError::Network {
        at,
        source: Box::new(e),
    }
}

/// At most [`MAX_MESSAGE_CHARS`] characters of a server message, on one line.
pub(crate) fn shorten(s: &str) -> String {
    let one_line: String = s
        .trim()
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if one_line.chars().count() <= MAX_MESSAGE_CHARS {
        one_line
    } else {
        let mut out: String = one_line.chars().take(MAX_MESSAGE_CHARS).collect();
        out.push_str("...");
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at() -> Target {
        Target {
            registry: "docker.io".into(),
            host: "mirror:5000".into(),
            repository: "library/busybox".into(),
            object: "blob sha256:00".into(),
        }
    }

    #[test]
    fn retryable_classes() {
        let retry = [
            from_status(at(), 503, "busy"),
            from_status(at(), 429, ""),
            RegistryError::RangeIgnored { at: at() },
            RegistryError::Short {
                at: at(),
                got: 1,
                want: 2,
            },
            RegistryError::Timeout {
                at: at(),
                after: Duration::from_secs(1),
            },
            from_io(
                at(),
                std::io::Error::from(std::io::ErrorKind::ConnectionReset),
            ),
        ];
        for e in &retry {
            assert!(e.is_retryable(), "{e}");
        }
        let final_ = [
            from_status(at(), 401, ""),
            from_status(at(), 403, ""),
            from_status(at(), 404, ""),
            from_status(at(), 400, "{\"errors\":[{\"code\":\"DIGEST_INVALID\"}]}"),
            RegistryError::DigestMismatch {
                at: at(),
                actual: "sha256:11".into(),
            },
            RegistryError::Config {
                what: "x".into(),
                reason: "y".into(),
            },
        ];
        for e in &final_ {
            assert!(!e.is_retryable(), "{e}");
        }
        assert!(matches!(
            from_status(at(), 400, "DIGEST_INVALID"),
            RegistryError::DigestMismatch { .. }
        ));
    }

    #[test]
    fn messages_name_the_target() {
        let e = from_status(at(), 404, "");
        assert_eq!(
            e.to_string(),
            "mirror:5000/library/busybox blob sha256:00 (host for docker.io): not found"
        );
        let long = "x".repeat(1000);
        let e = from_status(at(), 500, &long);
        assert!(e.to_string().len() < 500);
    }
}
