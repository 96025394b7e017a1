//! The HTTP side of the endpoint: `GET /metrics` on a unix socket or a loopback port,
//! served by a thread of its own (a current-thread tokio runtime), one short request per
//! connection (`Connection: close`).
//!
//! Bounded: at most [`MAX_CONNECTIONS`] connections at once (more are closed at once),
//! a request head of at most [`MAX_HEAD_BYTES`], read within [`READ_TIMEOUT`].

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use super::{render, Address, MetricsError, Source};

/// Connections served at once.
pub const MAX_CONNECTIONS: usize = 16;
/// Largest request head read.
pub const MAX_HEAD_BYTES: usize = 8192;
/// Longest wait for a request head.
pub const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// The running endpoint. [`Server::stop`] (or drop) ends it.
pub struct Server {
    address: Address,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

enum Listener {
    Unix(std::os::unix::net::UnixListener),
    Tcp(std::net::TcpListener),
}

fn bind_unix(path: &Path) -> io::Result<std::os::unix::net::UnixListener> {
    if let Some(dir) = path.parent() {
        // A directory made here gets the daemon's umask (0700).
        std::fs::create_dir_all(dir)?;
    }
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    // Created under the daemon's umask (077): 0700 from the start, root only; then
    // 0600 like every socket of ours.
    let l = std::os::unix::net::UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600))?;
    Ok(l)
}

impl Server {
    /// Binds `address` (errors are reported here, before the daemon says it serves) and
    /// starts serving `source` in a thread named `metrics`.
    pub fn start(address: Address, source: Source) -> Result<Server, MetricsError> {
        let ioerr = |source| MetricsError::Io {
            address: address.to_string(),
            source,
        };
        let listener = match &address {
            Address::Unix(p) => Listener::Unix(bind_unix(p).map_err(ioerr)?),
            Address::Tcp(a) => Listener::Tcp(std::net::TcpListener::bind(a).map_err(ioerr)?),
        };
        match &listener {
            Listener::Unix(l) => l.set_nonblocking(true),
            Listener::Tcp(l) => l.set_nonblocking(true),
        }
        .map_err(ioerr)?;
        let (tx, rx) = tokio::sync::oneshot::channel::<()>();
        let thread = std::thread::Builder::new()
            .name("metrics".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .max_blocking_threads(2)
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        tracing::error!("metrics endpoint: no runtime: {e}");
                        return;
                    }
                };
                rt.block_on(serve(listener, source, rx));
            })
            .map_err(ioerr)?;
        tracing::info!(address = %address, "metrics endpoint serving /metrics");
        Ok(Server {
            address,
            stop: Some(tx),
            thread: Some(thread),
        })
    }

    /// Where it listens.
    pub fn address(&self) -> &Address {
        &self.address
    }

    /// Stops serving and removes a unix socket.
    pub fn stop(mut self) {
        self.halt();
    }

    fn halt(&mut self) {
        if let Some(tx) = self.stop.take() {
            let _ = tx.send(());
        }
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
        if let Address::Unix(p) = &self.address {
            let _ = std::fs::remove_file(p);
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.halt();
    }
}

async fn serve(listener: Listener, source: Source, mut stop: tokio::sync::oneshot::Receiver<()>) {
    let permits = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    let listener = match listener {
        Listener::Unix(l) => tokio::net::UnixListener::from_std(l).map(Accept::Unix),
        Listener::Tcp(l) => tokio::net::TcpListener::from_std(l).map(Accept::Tcp),
    };
    let listener = match listener {
        Ok(l) => l,
        Err(e) => {
            tracing::error!("metrics endpoint: {e}");
            return;
        }
    };
    // Bounded by the stop signal; each pass accepts one connection or stops.
    loop {
        tokio::select! {
            _ = &mut stop => return,
            conn = listener.accept(source.clone(), permits.clone()) => {
                if let Err(e) = conn {
                    tracing::warn!("metrics endpoint: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
}

enum Accept {
    Unix(tokio::net::UnixListener),
    Tcp(tokio::net::TcpListener),
}

impl Accept {
    /// Accepts one connection and serves it in a task (closes it when too many are open).
    async fn accept(&self, source: Source, permits: Arc<tokio::sync::Semaphore>) -> io::Result<()> {
        match self {
            Accept::Unix(l) => {
                let (s, _) = l.accept().await?;
                spawn(s, source, permits);
            }
            Accept::Tcp(l) => {
                let (s, _) = l.accept().await?;
                spawn(s, source, permits);
            }
        }
        Ok(())
    }
}

fn spawn<S>(stream: S, source: Source, permits: Arc<tokio::sync::Semaphore>)
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let Ok(permit) = permits.try_acquire_owned() else {
        return; // dropped: closed
    };
    tokio::spawn(async move {
        let _permit = permit;
        if let Err(e) = handle(stream, source).await {
            tracing::debug!("metrics endpoint: {e}");
        }
    });
}

/// What a request head asks for.
#[derive(Debug, PartialEq, Eq)]
enum Ask {
    /// `GET /metrics` (or HEAD); true when `Accept` names OpenMetrics.
    Metrics { openmetrics: bool, head: bool },
    /// Another path.
    NotFound,
    /// Another method.
    BadMethod,
    /// Not HTTP.
    Malformed,
}

fn parse_head(head: &[u8]) -> Ask {
    let Ok(text) = std::str::from_utf8(head) else {
        return Ask::Malformed;
    };
    let mut lines = text.split("\r\n");
    let mut first = lines.next().unwrap_or("").split_whitespace();
    let (Some(method), Some(target), Some(version)) = (first.next(), first.next(), first.next())
    else {
        return Ask::Malformed;
    };
    if !version.starts_with("HTTP/1.") {
        return Ask::Malformed;
    }
    if method != "GET" && method != "HEAD" {
        return Ask::BadMethod;
    }
    if target.split('?').next() != Some("/metrics") {
        return Ask::NotFound;
    }
    let openmetrics = lines.any(|l| {
        let l = l.to_ascii_lowercase();
        l.starts_with("accept:") && l.contains("application/openmetrics-text")
    });
    Ask::Metrics {
        openmetrics,
        head: method == "HEAD",
    }
}

async fn handle<S: AsyncRead + AsyncWrite + Unpin>(mut s: S, source: Source) -> io::Result<()> {
    let mut head = Vec::with_capacity(1024);
    let mut buf = [0u8; 1024];
    let read = tokio::time::timeout(READ_TIMEOUT, async {
        // Bounded by MAX_HEAD_BYTES.
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
            }
            head.extend_from_slice(&buf[..n]);
            if let Some(end) = head.windows(4).position(|w| w == b"\r\n\r\n") {
                head.truncate(end);
                return Ok(());
            }
            if head.len() > MAX_HEAD_BYTES {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    "request head too large",
                ));
            }
        }
    })
    .await;
    match read {
        Ok(Ok(())) => {}
        Ok(Err(e)) => return Err(e),
        Err(_) => return Err(io::Error::new(io::ErrorKind::TimedOut, "no request head")),
    }
    let (status, ctype, body, head_only) = match parse_head(&head) {
        Ask::Metrics { openmetrics, head } => {
            let src = source.clone();
            let (body, ct) = tokio::task::spawn_blocking(move || render(&src, openmetrics))
                .await
                .map_err(io::Error::other)?;
            ("200 OK", ct, body, head)
        }
        Ask::NotFound => (
            "404 Not Found",
            "text/plain",
            "try /metrics\n".to_string(),
            false,
        ),
        Ask::BadMethod => (
            "405 Method Not Allowed",
            "text/plain",
            "GET /metrics\n".to_string(),
            false,
        ),
        Ask::Malformed => (
            "400 Bad Request",
            "text/plain",
            "not HTTP/1\n".to_string(),
            false,
        ),
    };
    let mut out = format!(
        "HTTP/1.1 {status}\r\nContent-Type: {ctype}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    if !head_only {
        out.push_str(&body);
    }
    s.write_all(out.as_bytes()).await?;
    s.shutdown().await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn request_heads() {
        assert_eq!(
            parse_head(b"GET /metrics HTTP/1.1\r\nHost: x\r\nAccept: application/openmetrics-text;version=1.0.0,text/plain;q=0.5"),
            Ask::Metrics { openmetrics: true, head: false }
        );
        assert_eq!(
            parse_head(b"GET /metrics?x=1 HTTP/1.0"),
            Ask::Metrics {
                openmetrics: false,
                head: false
            }
        );
        assert_eq!(parse_head(b"GET / HTTP/1.1"), Ask::NotFound);
        assert_eq!(parse_head(b"POST /metrics HTTP/1.1"), Ask::BadMethod);
        assert_eq!(parse_head(b"\x16\x03\x01"), Ask::Malformed);
    }

    #[test]
    fn serves_a_scrape_on_a_unix_socket_with_mode_0600() {
        use std::io::{Read, Write};
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub").join("m.sock");
        let old = nix::sys::stat::umask(nix::sys::stat::Mode::from_bits_truncate(0o077));
        let src: Source = Arc::new(|| super::super::Sample {
            front_end: "local".into(),
            ..Default::default()
        });
        let srv = Server::start(Address::Unix(path.clone()), src).unwrap();
        nix::sys::stat::umask(old);
        let mode = std::fs::metadata(&path).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let mut c = std::os::unix::net::UnixStream::connect(&path).unwrap();
        c.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            .unwrap();
        let mut got = String::new();
        c.read_to_string(&mut got).unwrap();
        assert!(got.starts_with("HTTP/1.1 200 OK\r\n"), "{got}");
        assert!(
            got.contains("dedupd_front_end_info{front_end=\"local\"} 1"),
            "{got}"
        );
        srv.stop();
        assert!(!path.exists());
    }
}
