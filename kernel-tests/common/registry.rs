//! Real registries for tests, on 127.0.0.1 only, killed and removed on drop (also when
//! a test panics).
//!
//! - [`TestRegistry`]: Debian's `docker-registry` (distribution 2.8) with its storage in
//!   a temporary directory, in three modes: [`TestRegistry::plain`] (HTTP, no auth),
//!   [`TestRegistry::tls_basic`] (HTTPS with a private CA made with `openssl`, htpasswd
//!   bcrypt users made with `htpasswd -B`), and [`TestRegistry::bearer`] (token auth
//!   through `kernel-tests/registry/token-issuer.py`, a [`TokenIssuer`]).
//!   [`TestRegistry::stop`] / [`TestRegistry::restart`] keep the port and the storage.
//! - [`FaultProxy`]: `kernel-tests/registry/fault-proxy.py` in front of a registry, with
//!   faults switched at run time ([`Fault`]) and a log of the requests it saw (for
//!   counting range requests).
//! - [`docker_config`] and [`hosts_toml`] write the client-side files.
//!
//! Needs `docker-registry`, `openssl`, `htpasswd` (apache2-utils) and `python3`, which
//! `kernel-tests/install-host-deps` installs.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Longest wait for a server to listen.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// How a [`TestRegistry`] authenticates.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Mode {
    /// Plain HTTP, anonymous.
    Plain,
    /// HTTPS (private CA) and htpasswd Basic auth.
    TlsBasic,
    /// Plain HTTP and Bearer tokens from a [`TokenIssuer`].
    Bearer,
}

/// A `docker-registry serve` process.
pub struct TestRegistry {
    /// `127.0.0.1:<port>`.
    pub host: String,
    /// Its mode.
    pub mode: Mode,
    /// The user the registry (or its token issuer) accepts, if any.
    pub user: Option<(String, String)>,
    /// The CA that signed the server certificate (TLS mode).
    pub ca_cert: Option<PathBuf>,
    /// The token issuer (Bearer mode).
    pub issuer: Option<TokenIssuer>,
    child: Option<Child>,
    config: PathBuf,
    dir: tempfile::TempDir,
}

impl TestRegistry {
    /// HTTP, anonymous.
    pub fn plain() -> TestRegistry {
        Self::start(Mode::Plain, None)
    }

    /// HTTPS with a private CA ([`TestRegistry::ca_cert`]) and Basic auth for `user`.
    pub fn tls_basic(user: &str, password: &str) -> TestRegistry {
        Self::start(Mode::TlsBasic, Some((user.into(), password.into())))
    }

    /// HTTP with token auth: tokens for `user` from a [`TokenIssuer`].
    pub fn bearer(user: &str, password: &str) -> TestRegistry {
        Self::start(Mode::Bearer, Some((user.into(), password.into())))
    }

    fn start(mode: Mode, user: Option<(String, String)>) -> TestRegistry {
        let dir = tempfile::Builder::new()
            .prefix("dedupd-registry-")
            .tempdir()
            .expect("temp dir");
        let d = dir.path();
        std::fs::create_dir(d.join("storage")).unwrap();
        let mut extra = String::new();
        let mut ca_cert = None;
        let mut issuer = None;
        match mode {
            Mode::Plain => {}
            Mode::TlsBasic => {
                let (ca, ca_key) = make_ca(d, "ca");
                let (crt, key) = make_server_cert(d, &ca, &ca_key);
                let (u, p) = user.as_ref().unwrap();
                let out = run(Command::new("htpasswd").args(["-Bbn", u, p]));
                std::fs::write(d.join("htpasswd"), out).unwrap();
                extra = format!(
                    "  tls:\n    certificate: {}\n    key: {}\nauth:\n  htpasswd:\n    realm: dedupd-test\n    path: {}\n",
                    crt.display(),
                    key.display(),
                    d.join("htpasswd").display()
                );
                ca_cert = Some(ca);
            }
            Mode::Bearer => {
                let (u, p) = user.as_ref().unwrap();
                let t = TokenIssuer::start(u, p);
                extra = t.registry_auth_config(&t.cert);
                issuer = Some(t);
            }
        }
        let mut reg = TestRegistry {
            host: String::new(),
            mode,
            user,
            ca_cert,
            issuer,
            child: None,
            config: d.join("config.yml"),
            dir,
        };
        // A port picked free can be taken before the registry binds it: try a few.
        for _ in 0..5 {
            let port = free_port();
            reg.host = format!("127.0.0.1:{port}");
            reg.write_config(&extra);
            if reg.spawn() {
                return reg;
            }
        }
        panic!("docker-registry did not start; log:\n{}", reg.log());
    }

    fn write_config(&self, extra: &str) {
        let text = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: false\nstorage:\n  filesystem:\n    rootdirectory: {}\n  delete:\n    enabled: true\n  maintenance:\n    uploadpurging:\n      enabled: false\nhttp:\n  addr: {}\n  secret: dedupd-test-secret\n{}",
            self.dir.path().join("storage").display(),
            self.host,
            extra
        );
        // `auth:` must be top level: `extra` holds `  tls:` (under http) then `auth:`.
        std::fs::write(&self.config, text).unwrap();
    }

    /// Starts the process; true once it listens.
    fn spawn(&mut self) -> bool {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.path().join("registry.log"))
            .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&self.config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("running docker-registry (kernel-tests/install-host-deps installs it)");
        self.child = Some(child);
        let deadline = Instant::now() + START_TIMEOUT;
        while Instant::now() < deadline {
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                eprintln!("docker-registry exited: {status}");
                self.child = None;
                return false;
            }
            if TcpStream::connect(&self.host).is_ok() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.stop();
        false
    }

    /// Kills the registry (its port and storage stay).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Starts it again on the same port, with the same storage.
    pub fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + START_TIMEOUT;
        while !self.spawn() {
            assert!(Instant::now() < deadline, "restart failed:\n{}", self.log());
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Bearer mode: makes the issuer sign with a new key, and restarts the registry
    /// trusting only that key, so tokens issued before are rejected.
    pub fn rotate_token_key(&mut self) {
        let issuer = self.issuer.as_mut().expect("a bearer-mode registry");
        let cert = issuer.rotate();
        let extra = issuer.registry_auth_config(&cert);
        self.stop();
        self.write_config(&extra);
        self.restart();
    }

    /// The registry's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
    }

    /// A scratch directory that lives as long as the registry.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

impl Drop for TestRegistry {
    fn drop(&mut self) {
        self.stop();
    }
}

/// `kernel-tests/registry/token-issuer.py`: JWTs (RS256, `x5c`) for a Bearer-mode
/// registry.
pub struct TokenIssuer {
    /// `http://127.0.0.1:<port>`.
    pub url: String,
    /// The certificate tokens are signed under now.
    pub cert: PathBuf,
    child: Child,
    dir: tempfile::TempDir,
    rotations: u32,
}

/// The `iss` and `service` the issuer and the registry agree on.
const ISSUER: &str = "dedupd-test-issuer";
const SERVICE: &str = "dedupd-test-registry";

impl TokenIssuer {
    /// Starts the issuer for one user.
    pub fn start(user: &str, password: &str) -> TokenIssuer {
        let dir = tempfile::Builder::new()
            .prefix("dedupd-issuer-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let (cert, key) = make_rsa_cert(d, "issuer0");
        std::fs::write(d.join("users"), format!("{user}:{password}\n")).unwrap();
        let port_file = d.join("port");
        let log = std::fs::File::create(d.join("issuer.log")).unwrap();
        let child = Command::new("python3")
            .arg(script("token-issuer.py"))
            .arg("--port-file")
            .arg(&port_file)
            .arg("--key")
            .arg(&key)
            .arg("--cert")
            .arg(&cert)
            .args(["--issuer", ISSUER, "--service", SERVICE])
            .arg("--users")
            .arg(d.join("users"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("python3");
        let mut t = TokenIssuer {
            url: String::new(),
            cert,
            child,
            dir,
            rotations: 0,
        };
        let port = wait_port_file(&port_file, &mut t.child);
        t.url = format!("http://127.0.0.1:{port}");
        t
    }

    /// The registry's `auth.token` section trusting `cert`.
    fn registry_auth_config(&self, cert: &Path) -> String {
        format!(
            "auth:\n  token:\n    realm: {}/token\n    service: {SERVICE}\n    issuer: {ISSUER}\n    rootcertbundle: {}\n",
            self.url,
            cert.display()
        )
    }

    /// Signs with a new key from now on; returns its certificate.
    pub fn rotate(&mut self) -> PathBuf {
        self.rotations += 1;
        let (cert, key) = make_rsa_cert(self.dir.path(), &format!("issuer{}", self.rotations));
        let q = format!(
            "/control/rotate?key={}&cert={}",
            key.display(),
            cert.display()
        );
        http_get(&self.url["http://".len()..], &q);
        self.cert = cert.clone();
        cert
    }

    /// How many tokens it issued and refused.
    pub fn stats(&self) -> (u64, u64) {
        let body = http_get(&self.url["http://".len()..], "/control/stats");
        let v: serde_json::Value = serde_json::from_str(&body).unwrap();
        (
            v["issued"].as_u64().unwrap(),
            v["refused"].as_u64().unwrap(),
        )
    }
}

impl Drop for TokenIssuer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A fault the [`FaultProxy`] injects (see `kernel-tests/registry/fault-proxy.py`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Fault {
    /// Forward unchanged.
    Pass,
    /// Flip a byte in the middle of each blob body.
    Flip,
    /// Drop the Range header: 200 with the whole blob.
    IgnoreRange,
    /// A well-formed body of half the bytes.
    Short,
    /// Full Content-Length announced, half the body sent, then a reset.
    Truncate,
    /// Reset the connection without answering.
    Reset,
    /// 503 Service Unavailable.
    Unavailable,
    /// Wait this many milliseconds, then forward.
    Delay(u64),
}

/// `kernel-tests/registry/fault-proxy.py` in front of a registry.
pub struct FaultProxy {
    /// `127.0.0.1:<port>`: use it as the registry host (plain HTTP).
    pub host: String,
    child: Child,
    _dir: tempfile::TempDir,
}

/// One request the proxy saw.
#[derive(Clone, Debug, serde::Deserialize)]
pub struct ProxyRequest {
    /// HTTP method.
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The Range header, if any.
    pub range: Option<String>,
    /// The status answered (none for a reset).
    pub status: Option<u16>,
    /// The fault applied (`pass` when none).
    pub fault: String,
}

impl FaultProxy {
    /// Starts a proxy to `upstream` (`127.0.0.1:<port>`, plain HTTP).
    pub fn start(upstream: &str) -> FaultProxy {
        let dir = tempfile::Builder::new()
            .prefix("dedupd-proxy-")
            .tempdir()
            .unwrap();
        let port_file = dir.path().join("port");
        let log = std::fs::File::create(dir.path().join("proxy.log")).unwrap();
        let mut child = Command::new("python3")
            .arg(script("fault-proxy.py"))
            .args(["--upstream", upstream])
            .arg("--port-file")
            .arg(&port_file)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("python3");
        let port = wait_port_file(&port_file, &mut child);
        FaultProxy {
            host: format!("127.0.0.1:{port}"),
            child,
            _dir: dir,
        }
    }

    /// Injects `fault` into every blob request from now on.
    pub fn set(&self, fault: Fault) {
        self.set_for(fault, "/blobs/", None);
    }

    /// Injects `fault` into requests whose path contains `matching`, for the next
    /// `count` of them (all, if `None`).
    pub fn set_for(&self, fault: Fault, matching: &str, count: Option<u32>) {
        let (mode, ms) = match fault {
            Fault::Pass => ("pass", 0),
            Fault::Flip => ("flip", 0),
            Fault::IgnoreRange => ("ignore-range", 0),
            Fault::Short => ("short", 0),
            Fault::Truncate => ("truncate", 0),
            Fault::Reset => ("reset", 0),
            Fault::Unavailable => ("503", 0),
            Fault::Delay(ms) => ("delay", ms),
        };
        let count = count.map_or(-1, i64::from);
        http_get(
            &self.host,
            &format!("/__fault__/set?mode={mode}&match={matching}&count={count}&ms={ms}"),
        );
    }

    /// The requests seen so far, oldest first.
    pub fn requests(&self) -> Vec<ProxyRequest> {
        serde_json::from_str(&http_get(&self.host, "/__fault__/log")).unwrap()
    }

    /// Forgets the requests seen.
    pub fn clear(&self) {
        http_get(&self.host, "/__fault__/clear");
    }
}

impl Drop for FaultProxy {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Writes a docker `config.json` into `dir` with `auths` for `(key, user, password)`
/// entries (`key` as docker writes it: `host`, `https://host`...); returns its path.
pub fn docker_config(dir: &Path, entries: &[(&str, &str, &str)]) -> PathBuf {
    use base64::Engine as _;
    let mut auths = serde_json::Map::new();
    for (key, user, password) in entries {
        let auth = base64::engine::general_purpose::STANDARD.encode(format!("{user}:{password}"));
        auths.insert(key.to_string(), serde_json::json!({ "auth": auth }));
    }
    let path = dir.join("config.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&serde_json::json!({ "auths": auths })).unwrap(),
    )
    .unwrap();
    path
}

/// Writes `<hosts_dir>/<registry>/hosts.toml` with `text`; returns `hosts_dir`.
pub fn hosts_toml(hosts_dir: &Path, registry: &str, text: &str) -> PathBuf {
    let d = hosts_dir.join(registry);
    std::fs::create_dir_all(&d).unwrap();
    std::fs::write(d.join("hosts.toml"), text).unwrap();
    hosts_dir.to_path_buf()
}

fn script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("kernel-tests/registry")
        .join(name)
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_port_file(path: &Path, child: &mut Child) -> u16 {
    let deadline = Instant::now() + START_TIMEOUT;
    loop {
        if let Ok(s) = std::fs::read_to_string(path) {
            return s.trim().parse().unwrap();
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("{} exited: {status}", path.display());
        }
        assert!(Instant::now() < deadline, "no port in {}", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A GET on 127.0.0.1 without a client library; returns the body.
fn http_get(host: &str, path: &str) -> String {
    let mut s = TcpStream::connect(host).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    let (head, body) = out.split_once("\r\n\r\n").unwrap_or((&out, ""));
    assert!(
        head.starts_with("HTTP/1.1 200") || head.starts_with("HTTP/1.0 200"),
        "{head}"
    );
    body.to_string()
}

fn run(cmd: &mut Command) -> Vec<u8> {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    out.stdout
}

/// A CA (EC P-256, one day): `<name>.crt`, `<name>.key`.
fn make_ca(d: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (crt, key) = (d.join(format!("{name}.crt")), d.join(format!("{name}.key")));
    run(Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args([
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=dedupd test CA",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&crt));
    (crt, key)
}

/// A server certificate for IP 127.0.0.1 (and `localhost`) signed by the CA.
fn make_server_cert(d: &Path, ca: &Path, ca_key: &Path) -> (PathBuf, PathBuf) {
    let (crt, key, csr, ext) = (
        d.join("server.crt"),
        d.join("server.key"),
        d.join("server.csr"),
        d.join("server.ext"),
    );
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
        ])
        .args(["-nodes", "-subj", "/CN=127.0.0.1", "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    std::fs::write(
        &ext,
        "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature\nextendedKeyUsage=serverAuth\n",
    )
    .unwrap();
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "1", "-in"])
        .arg(&csr)
        .arg("-CA")
        .arg(ca)
        .arg("-CAkey")
        .arg(ca_key)
        .arg("-CAcreateserial")
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&crt));
    (crt, key)
}

/// A self-signed RSA certificate for signing tokens (RS256).
fn make_rsa_cert(d: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (crt, key) = (d.join(format!("{name}.crt")), d.join(format!("{name}.key")));
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
        ])
        .args(["-subj", &format!("/CN={name}"), "-keyout"])
        .arg(&key)
        .arg("-out")
        .arg(&crt));
    (crt, key)
}
