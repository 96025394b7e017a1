//! One host a registry is reached through (its server or a mirror): its own HTTP
//! clients (TLS settings are per host), its credentials, its bound on requests in
//! flight, and the token renewal after a 401.

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::errors::OciDistributionError;
use oci_client::secrets::RegistryAuth;
use oci_client::{Reference, RegistryOperation};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};

use super::error::{from_reqwest, from_status, is_stale_connection};
use super::hosts::HostConfig;
use super::{ImageRef, RegistryError, Target};

/// Sent as `User-Agent`.
const USER_AGENT: &str = concat!("dedupd/", env!("CARGO_PKG_VERSION"));

/// A host with its clients.
pub(crate) struct Endpoint {
    /// Where it is and what it may do.
    pub cfg: HostConfig,
    /// The image registry this endpoint serves, for messages.
    pub registry: String,
    /// Blobs, pushes and referrers. It learns credentials only when a 401 asks for
    /// them ([`Endpoint::call`]): oci-client asks `/v2/` for a challenge before every
    /// request it has no cached token for once it holds credentials, which would
    /// double the round trips to a registry that needs none.
    pub client: oci_client::Client,
    /// Manifest GETs: oci-client stores the credentials as it pulls a manifest. It
    /// shares the token cache of `client`.
    pub manifest_client: oci_client::Client,
    /// Plain requests oci-client has no call for (probing the referrers API).
    pub raw: reqwest::Client,
    /// Credentials of this host (anonymous when `config.json` has none).
    pub auth: RegistryAuth,
    /// How credentials are sent, for 401 messages.
    auth_hint: String,
    /// Bounds the requests in flight to this host.
    sem: Arc<Semaphore>,
    /// Per (repository, push) scope: how many times its token was renewed.
    renewals: Mutex<HashMap<(String, bool), u64>>,
    /// One renewal at a time, so a burst of 401s fetches one token.
    renew_lock: tokio::sync::Mutex<()>,
    /// Longest wait for an answer.
    pub request_timeout: Duration,
}

impl std::fmt::Debug for Endpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Endpoint")
            .field("cfg", &self.cfg)
            .field("auth", &self.auth) // oci-client redacts secrets
            .finish_non_exhaustive()
    }
}

/// Settings shared by every endpoint of a [`super::Registry`].
pub(crate) struct EndpointSettings {
    pub connect_timeout: Duration,
    pub request_timeout: Duration,
}

impl Endpoint {
    /// Builds the clients of `cfg`; reads its CA files.
    pub fn new(
        cfg: HostConfig,
        registry: &str,
        auth: RegistryAuth,
        auth_hint: String,
        sem: Arc<Semaphore>,
        settings: &EndpointSettings,
    ) -> Result<Endpoint, RegistryError> {
        let mut certs = Vec::new();
        for path in &cfg.ca {
            let data = std::fs::read(path).map_err(|e| RegistryError::Config {
                what: path.display().to_string(),
                reason: format!("cannot read CA file: {e}"),
            })?;
            // Parse here, so that a bad file is named rather than failing the client.
            reqwest::Certificate::from_pem_bundle(&data)
                .ok()
                .filter(|c| !c.is_empty())
                .ok_or_else(|| RegistryError::Config {
                    what: path.display().to_string(),
                    reason: "no PEM certificate in CA file".to_string(),
                })?;
            certs.push(Certificate {
                encoding: CertificateEncoding::Pem,
                data,
            });
        }
        let connect_timeout = cfg.dial_timeout.unwrap_or(settings.connect_timeout);
        let config = || ClientConfig {
            protocol: if cfg.plain_http {
                ClientProtocol::Http
            } else {
                ClientProtocol::Https
            },
            accept_invalid_certificates: cfg.skip_verify,
            // One PUT per blob, streamed: no 4 MiB PATCH round trips for large blobs.
            use_monolithic_push: true,
            extra_root_certificates: certs.clone(),
            platform_resolver: None,
            read_timeout: Some(settings.request_timeout),
            connect_timeout: Some(connect_timeout),
            user_agent: USER_AGENT,
            ..ClientConfig::default()
        };
        let config_err = |e: OciDistributionError| RegistryError::Config {
            what: cfg.url(),
            reason: format!("cannot build an HTTP client: {e}"),
        };
        let client = oci_client::Client::try_from(config()).map_err(config_err)?;
        let mut manifest_client = oci_client::Client::try_from(config()).map_err(config_err)?;
        manifest_client.tokens = client.tokens.clone();
        let mut raw = reqwest::Client::builder()
            .user_agent(USER_AGENT)
            .connect_timeout(connect_timeout)
            .read_timeout(settings.request_timeout)
            .danger_accept_invalid_certs(cfg.skip_verify);
        if !certs.is_empty() {
            let mut list = Vec::new();
            for c in &certs {
                list.extend(reqwest::Certificate::from_pem_bundle(&c.data).unwrap_or_default());
            }
            raw = raw.tls_certs_merge(list);
        }
        let raw = raw.build().map_err(|e| RegistryError::Config {
            what: cfg.url(),
            reason: format!("cannot build an HTTP client: {e}"),
        })?;
        Ok(Endpoint {
            cfg,
            registry: registry.to_string(),
            client,
            manifest_client,
            raw,
            auth,
            auth_hint,
            sem,
            renewals: Mutex::new(HashMap::new()),
            renew_lock: tokio::sync::Mutex::new(()),
            request_timeout: settings.request_timeout,
        })
    }

    /// The error context for `object` of `image` on this host.
    pub fn target(&self, image: &ImageRef, object: String) -> Target {
        Target {
            registry: self.registry.clone(),
            host: self.cfg.host.clone(),
            repository: image.repository.clone(),
            object,
        }
    }

    /// oci-client's reference to `image` on this host, by `digest` or else by `tag`.
    /// A mirror gets the image's registry as `?ns=`, as containerd sends it.
    pub fn reference(
        &self,
        image: &ImageRef,
        tag: Option<&str>,
        digest: Option<&str>,
    ) -> Reference {
        let registry = if self.cfg.mirror {
            image.registry.clone()
        } else {
            self.cfg.host.clone()
        };
        let repo = image.repository.clone();
        let mut r = match (digest, tag) {
            (Some(d), _) => Reference::with_digest(registry, repo, d.to_string()),
            (None, t) => Reference::with_tag(registry, repo, t.unwrap_or("latest").to_string()),
        };
        if self.cfg.mirror {
            r.set_mirror_registry(self.cfg.host.clone());
        }
        r
    }

    /// Runs `f` (one oci-client call for `r`) under this host's request bound and,
    /// when `deadline` is set, a time limit. A 401 renews the token of `r`'s scope
    /// (or learns that Basic credentials are wanted) and runs `f` once more. Returns
    /// the permit too, for callers that keep reading a body.
    pub async fn call<T, F, Fut>(
        &self,
        r: &Reference,
        op: RegistryOperation,
        at: &Target,
        deadline: Option<Duration>,
        f: F,
    ) -> Result<(T, OwnedSemaphorePermit), RegistryError>
    where
        F: Fn() -> Fut,
        Fut: Future<Output = Result<T, OciDistributionError>>,
    {
        let permit = self
            .sem
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let attempt = || async {
            let result = match deadline {
                Some(d) => match tokio::time::timeout(d, f()).await {
                    Ok(r) => r,
                    Err(_) => {
                        return Err(RegistryError::Timeout {
                            at: at.clone(),
                            after: d,
                        })
                    }
                },
                None => f().await,
            };
            result.map_err(|e| self.fix(RegistryError::from_oci(e, at)))
        };
        let seen = self.renewal_count(r, op);
        let first = match attempt().await {
            Err(e) if is_stale_connection(&e) => {
                tracing::debug!(host = %self.cfg.host, "stale keep-alive connection: sending again");
                attempt().await
            }
            other => other,
        };
        match first {
            Err(e) if e.is_401() => {
                self.renew(r, op, seen, at).await?;
                attempt()
                    .await
                    .map(|v| (v, permit))
                    .map_err(|e| self.hint(e))
            }
            other => other.map(|v| (v, permit)).map_err(|e| self.hint(e)),
        }
    }

    /// Fetches a new token for `r`'s scope unless another request did so since
    /// `seen`.
    async fn renew(
        &self,
        r: &Reference,
        op: RegistryOperation,
        seen: u64,
        at: &Target,
    ) -> Result<(), RegistryError> {
        let _one = self.renew_lock.lock().await;
        if self.renewal_count(r, op) != seen {
            return Ok(());
        }
        tracing::debug!(host = %self.cfg.host, repository = r.repository(), ?op, "401: fetching a token");
        match tokio::time::timeout(self.request_timeout, self.client.auth(r, &self.auth, op)).await
        {
            Err(_) => {
                return Err(RegistryError::Timeout {
                    at: at.clone(),
                    after: self.request_timeout,
                })
            }
            Ok(Err(e)) => return Err(self.fix(RegistryError::from_oci(e, at))),
            Ok(Ok(_)) => {}
        }
        let key = (r.repository().to_string(), op == RegistryOperation::Push);
        *self
            .renewals
            .lock()
            .expect("renewals lock")
            .entry(key)
            .or_insert(0) += 1;
        Ok(())
    }

    fn renewal_count(&self, r: &Reference, op: RegistryOperation) -> u64 {
        let key = (r.repository().to_string(), op == RegistryOperation::Push);
        self.renewals
            .lock()
            .expect("renewals lock")
            .get(&key)
            .copied()
            .unwrap_or(0)
    }

    /// Timeouts reported by reqwest carry no duration: the read timeout ran out.
    fn fix(&self, e: RegistryError) -> RegistryError {
        match e {
            RegistryError::Timeout { at, after } if after.is_zero() => RegistryError::Timeout {
                at,
                after: self.request_timeout,
            },
            other => other,
        }
    }

    /// Says how credentials were sent on a final 401/403.
    fn hint(&self, e: RegistryError) -> RegistryError {
        match e {
            RegistryError::Unauthorized { at, status, .. } => RegistryError::Unauthorized {
                at,
                status,
                hint: self.auth_hint.clone(),
            },
            other => other,
        }
    }

    /// Acquires a request slot for a request made without [`Endpoint::call`].
    pub async fn permit(&self) -> OwnedSemaphorePermit {
        self.sem
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed")
    }

    /// Whether this host answers the OCI 1.1 referrers API for `digest` of `image`:
    /// 200 yes, 404 no (distribution 2.8 has no such route).
    pub async fn has_referrers_api(
        &self,
        image: &ImageRef,
        digest: &str,
        at: &Target,
    ) -> Result<bool, RegistryError> {
        let _slot = self.permit().await;
        let url = format!(
            "{}/v2/{}/referrers/{}",
            self.cfg.url(),
            image.repository,
            digest
        );
        let send = |auth: Option<RawAuth>| {
            let mut rb = self
                .raw
                .get(&url)
                .header(reqwest::header::ACCEPT, super::OCI_INDEX);
            rb = match auth {
                Some(RawAuth::Bearer(t)) => rb.bearer_auth(t),
                Some(RawAuth::Basic(u, p)) => rb.basic_auth(u, Some(p)),
                None => rb,
            };
            tokio::time::timeout(self.request_timeout, rb.send())
        };
        let timeout = || RegistryError::Timeout {
            at: at.clone(),
            after: self.request_timeout,
        };
        let mut resp = send(None)
            .await
            .map_err(|_| timeout())?
            .map_err(|e| self.fix(from_reqwest(at.clone(), e)))?;
        if resp.status() == reqwest::StatusCode::UNAUTHORIZED {
            let r = self.reference(image, None, Some(digest));
            let auth = match tokio::time::timeout(
                self.request_timeout,
                self.client.auth(&r, &self.auth, RegistryOperation::Pull),
            )
            .await
            .map_err(|_| timeout())?
            {
                Ok(Some(token)) => Some(RawAuth::Bearer(token)),
                Ok(None) => match &self.auth {
                    RegistryAuth::Basic(u, p) => Some(RawAuth::Basic(u.clone(), p.clone())),
                    _ => None,
                },
                Err(e) => return Err(self.fix(RegistryError::from_oci(e, at))),
            };
            resp = send(auth)
                .await
                .map_err(|_| timeout())?
                .map_err(|e| self.fix(from_reqwest(at.clone(), e)))?;
        }
        let status = resp.status().as_u16();
        match status {
            200 => Ok(true),
            404 => Ok(false),
            s => {
                let body = resp.text().await.unwrap_or_default();
                Err(self.hint(from_status(at.clone(), s, &body)))
            }
        }
    }
}

/// Credentials for a request made with the raw client.
enum RawAuth {
    Bearer(String),
    Basic(String, String),
}
