//! The Prometheus endpoint (`metrics_address`, off by default).
//!
//! Nothing here runs on the data plane: a scrape calls the daemon's [`Source`], which
//! sums the engine threads' own counter blocks, reads the fetcher's and the snapshotter's
//! counters and the cache directory's size, and the `prometheus-client` crate writes the
//! families ([`Families`], a custom collector): the Prometheus text format 0.0.4, or
//! OpenMetrics 1.0 when the scraper asks for it in `Accept` (Prometheus does).
//!
//! Names follow Prometheus conventions: `dedupd_` first, the unit last before `_total`
//! (`_seconds`, `_bytes`), `_total` on counters. Labels carry only fixed words (front
//! end, result, cause, kind): no path, image reference, blob id or credential ever
//! appears (the endpoint has no authentication).
//!
//! Where it listens ([`Address`]): a unix socket (mode 0600 through the daemon's umask,
//! so root only) or a TCP port on 127.0.0.1; any other address is refused.

mod server;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Unit;
use serde::{Deserialize, Serialize};

pub use self::server::Server;
use crate::remote::fetch::FetchStatsSnapshot;
use crate::serve::stats::{bucket_upper, LatencyHistogram, LATENCY_BUCKETS};
use crate::serve::StatsSnapshot;
use crate::snapshotter::ConversionStats;

/// Errors of the metrics endpoint.
#[derive(Debug, thiserror::Error)]
pub enum MetricsError {
    /// `metrics_address` is not one we serve on.
    #[error("metrics_address {address:?}: {reason}")]
    BadAddress {
        /// As configured.
        address: String,
        /// The rule it broke.
        reason: String,
    },
    /// Binding or serving failed.
    #[error("metrics endpoint {address}: {source}")]
    Io {
        /// Where.
        address: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Where the endpoint listens.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Address {
    /// A unix socket (`/path` or `unix:/path`).
    Unix(PathBuf),
    /// A TCP port on a loopback address (`127.0.0.1:9464`).
    Tcp(SocketAddr),
}

impl Address {
    /// Parses `metrics_address`: an absolute unix socket path (optionally `unix:`), or
    /// `127.0.0.1:PORT` (any 127.0.0.0/8 address, or `[::1]:PORT`). Anything reachable
    /// from another host is refused: the endpoint has no authentication.
    pub fn parse(s: &str) -> Result<Address, MetricsError> {
        let bad = |reason: &str| MetricsError::BadAddress {
            address: s.to_string(),
            reason: reason.to_string(),
        };
        let path = s.strip_prefix("unix:").unwrap_or(s);
        if path.starts_with('/') {
            return Ok(Address::Unix(PathBuf::from(path)));
        }
        let addr: SocketAddr = s.parse().map_err(|_| {
            bad(
                "want an absolute unix socket path (`/run/dedupd/metrics.sock`) or \
                 `127.0.0.1:PORT`",
            )
        })?;
        if !addr.ip().is_loopback() {
            return Err(bad(
                "only a unix socket or a loopback address (127.0.0.1, ::1) is allowed: the \
                 endpoint has no authentication",
            ));
        }
        if addr.port() == 0 {
            return Err(bad("port 0: name the port to listen on"));
        }
        Ok(Address::Tcp(addr))
    }
}

impl std::fmt::Display for Address {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Address::Unix(p) => write!(f, "unix:{}", p.display()),
            Address::Tcp(a) => write!(f, "{a}"),
        }
    }
}

/// The front end's cache on disk, against its limit.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct CacheUsage {
    /// Bytes the front end's cache files take on disk (allocated blocks: blob files of
    /// fanotify, the cachefiles cache directory, materialized blobs of `local`).
    pub bytes: u64,
    /// The configured limit; `None` when the cache is unbounded.
    #[serde(default)]
    pub limit_bytes: Option<u64>,
    /// Chunks evicted to stay under the limit.
    #[serde(default)]
    pub evictions: u64,
    /// Bytes counted against the limit: chunks of lazily pulled layers the store
    /// holds, evicted ones not yet deallocated, and the front end's copies of lazily
    /// pulled layers (`copy_bytes`).
    #[serde(default)]
    pub bounded_bytes: u64,
    /// Of `bounded_bytes`, the front end's copies (cache or blob files) of lazily
    /// pulled layers, mounted or not.
    #[serde(default)]
    pub copy_bytes: u64,
    /// Idle lazily pulled layers unmounted so that their copies could be freed.
    #[serde(default)]
    pub layers_released: u64,
}

/// Snapshot and layer counts.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct SnapshotCounts {
    /// Active snapshots (containers, layers being unpacked).
    pub active: u64,
    /// Views.
    pub views: u64,
    /// Committed snapshots.
    pub committed: u64,
    /// Layers the committed snapshots use.
    pub layers: u64,
    /// Of those, mounted.
    pub mounted: u64,
    /// Of those, pulled lazily.
    pub lazy: u64,
}

/// Everything one scrape reports, gathered by the daemon at scrape time.
#[derive(Clone, Debug, Default)]
pub struct Sample {
    /// The serving front end (`cachefiles`, `fanotify`, `local`).
    pub front_end: String,
    /// Kernel requests received: cachefiles READs, fanotify permission events.
    pub requests: u64,
    /// Kernel requests answered with an error (the reader got EIO).
    pub requests_failed: u64,
    /// The serving engine's counters (fill requests, bytes, errors, latency).
    pub engine: StatsSnapshot,
    /// Bytes written into cache or blob files (fanotify also fills outside the engine:
    /// recovery, events queued at stop).
    pub filled_bytes: u64,
    /// Bytes filled ahead of readers (fanotify prefetch).
    pub prefetch_bytes: u64,
    /// The fetcher's counters and range latency, with lazy pull.
    pub fetch: Option<(FetchStatsSnapshot, LatencyHistogram)>,
    /// The cache on disk.
    pub cache: CacheUsage,
    /// Bytes of the store's pack files.
    pub store_bytes: u64,
    /// Blobs the front end serves.
    pub registered_blobs: u64,
    /// Snapshots and layers.
    pub snapshots: SnapshotCounts,
    /// Layer conversions at Commit.
    pub conversions: ConversionStats,
}

/// What the daemon gives the endpoint: called once per scrape.
pub type Source = Arc<dyn Fn() -> Sample + Send + Sync>;

/// The custom collector: every family, from one [`Sample`] taken at scrape time.
pub struct Families {
    source: Source,
}

impl std::fmt::Debug for Families {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Families")
    }
}

impl Families {
    /// A collector over `source`.
    pub fn new(source: Source) -> Families {
        Families { source }
    }
}

/// Prometheus histogram buckets from the engine's log buckets (microseconds): one bound
/// per power of two, from 8 us to about 134 s, in seconds, with per-bucket counts.
pub fn seconds_buckets(h: &LatencyHistogram) -> Vec<(f64, u64)> {
    // Engine bucket b holds values <= bucket_upper(b) us; bucket 7 ends at 7 us, and
    // from 8 on every fourth bucket ends just under a power of two.
    const LAST: usize = 8 + 23 * 4 + 3;
    const _: () = assert!(LAST < LATENCY_BUCKETS - 1);
    let mut out = Vec::with_capacity(25);
    let mut acc = 0;
    for (b, n) in h.buckets.iter().enumerate().take(LAST + 1) {
        acc += n;
        if b == 7 || (b > 8 && (b - 8) % 4 == 3) {
            let le_us = bucket_upper(b) + 1;
            out.push((le_us as f64 / 1e6, acc));
            acc = 0;
        }
    }
    // OpenMetrics wants the +Inf bucket written; the Prometheus text encoder adds it
    // only when it is missing.
    let rest: u64 = h.buckets.iter().skip(LAST + 1).sum();
    out.push((f64::INFINITY, rest));
    out
}

type Labels<'a> = Vec<(&'static str, &'a str)>;

fn counter(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Counter)?;
    for (labels, v) in rows {
        ConstCounter::new(*v).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn gauge(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    rows: &[(Labels, u64)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, unit, MetricType::Gauge)?;
    for (labels, v) in rows {
        ConstGauge::new(i64::try_from(*v).unwrap_or(i64::MAX)).encode(m.encode_family(labels)?)?;
    }
    Ok(())
}

fn histogram(
    e: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    rows: &[(Labels, &LatencyHistogram)],
) -> Result<(), std::fmt::Error> {
    let mut m = e.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    for (labels, h) in rows {
        let mut f = m.encode_family(labels)?;
        f.encode_histogram::<prometheus_client::encoding::NoLabelSet>(
            h.sum_us as f64 / 1e6,
            h.count(),
            &seconds_buckets(h),
            None,
        )?;
    }
    Ok(())
}

impl Collector for Families {
    fn encode(&self, mut e: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = (self.source)();
        let fe = s.front_end.as_str();
        let by_fe = |v: u64| vec![(vec![("front_end", fe)], v)];
        let en = &s.engine;
        {
            let mut m = e.encode_descriptor(
                "dedupd_front_end",
                "The front end serving page-cache misses.",
                None,
                MetricType::Info,
            )?;
            m.encode_info(&vec![("front_end", fe)])?;
        }
        counter(
            &mut e,
            "dedupd_requests",
            "Kernel requests received (cachefiles READs, fanotify permission events).",
            None,
            &by_fe(s.requests),
        )?;
        counter(
            &mut e,
            "dedupd_request_failures",
            "Kernel requests answered with an error (the reader got EIO).",
            None,
            &by_fe(s.requests_failed),
        )?;
        counter(
            &mut e,
            "dedupd_fill_requests",
            "Fill requests the serving engine completed.",
            None,
            &[
                (vec![("front_end", fe), ("result", "ok")], en.reads_ok),
                (
                    vec![("front_end", fe), ("result", "failed")],
                    en.reads_failed,
                ),
            ],
        )?;
        histogram(
            &mut e,
            "dedupd_fill_latency",
            "Time from a fill request to its answer.",
            &[(vec![("front_end", fe)], &en.latency)],
        )?;
        counter(
            &mut e,
            "dedupd_filled",
            "Bytes written into cache or blob files.",
            Some(&Unit::Bytes),
            &by_fe(s.filled_bytes),
        )?;
        counter(
            &mut e,
            "dedupd_store_served",
            "Bytes filled from chunks the local store held.",
            Some(&Unit::Bytes),
            &by_fe(en.served_from_store_bytes),
        )?;
        counter(
            &mut e,
            "dedupd_registry_served",
            "Bytes filled from chunks fetched from a registry.",
            Some(&Unit::Bytes),
            &by_fe(en.served_from_registry_bytes),
        )?;
        counter(
            &mut e,
            "dedupd_prefetched",
            "Bytes filled ahead of sequential readers.",
            Some(&Unit::Bytes),
            &by_fe(s.prefetch_bytes),
        )?;
        counter(
            &mut e,
            "dedupd_chunks_read",
            "Chunk records read from the local store.",
            None,
            &by_fe(en.chunks_fetched),
        )?;
        counter(
            &mut e,
            "dedupd_pack_reads",
            "Reads of pack files by the data plane: one per run of chunks adjacent in a \
             file and in a pack.",
            None,
            &by_fe(en.pack_reads),
        )?;
        let causes: [(&str, u64); 9] = [
            ("chunk", en.chunk_errors),
            ("source", en.source_errors),
            ("write", en.write_errors),
            ("fetch", en.fetch_errors),
            ("device", en.device_errors),
            ("malformed", en.malformed_messages),
            ("unknown_object", en.unknown_objects),
            ("insane_range", en.insane_reads),
            ("complete", en.complete_errors),
        ];
        let rows: Vec<(Labels, u64)> = causes
            .iter()
            .map(|(c, v)| (vec![("front_end", fe), ("cause", *c)], *v))
            .collect();
        counter(
            &mut e,
            "dedupd_fill_errors",
            "Errors of the data plane, by cause.",
            None,
            &rows,
        )?;
        counter(
            &mut e,
            "dedupd_fetch_waits",
            "Chunks a fill request waited for from a registry.",
            None,
            &by_fe(en.fetch_waits),
        )?;
        counter(
            &mut e,
            "dedupd_refetches",
            "Chunks whose stored record had been evicted (or failed) and that a fill \
             asked of the fetcher again.",
            None,
            &by_fe(en.refetches),
        )?;
        if let Some((f, lat)) = &s.fetch {
            counter(
                &mut e,
                "dedupd_registry_chunk_requests",
                "Chunks asked of the fetcher.",
                None,
                &[(vec![], f.requests)],
            )?;
            counter(
                &mut e,
                "dedupd_registry_chunks",
                "Chunks the fetcher answered, by where they came from.",
                None,
                &[
                    (vec![("source", "local")], f.local),
                    (vec![("source", "registry")], f.chunks_fetched),
                    (vec![("source", "zero")], f.zero_chunks),
                ],
            )?;
            counter(
                &mut e,
                "dedupd_registry_single_flight_joins",
                "Chunk requests that joined a fetch already in flight.",
                None,
                &[(vec![], f.joined)],
            )?;
            counter(
                &mut e,
                "dedupd_registry_range_requests",
                "Range requests sent to registries (retries included).",
                None,
                &[(vec![], f.range_requests)],
            )?;
            counter(
                &mut e,
                "dedupd_registry_retries",
                "Range requests retried.",
                None,
                &[(vec![], f.retries)],
            )?;
            counter(
                &mut e,
                "dedupd_registry_fetched",
                "Body bytes received from registries.",
                Some(&Unit::Bytes),
                &[(vec![], f.bytes_fetched)],
            )?;
            counter(
                &mut e,
                "dedupd_registry_fetch_errors",
                "Chunk fetches that failed, by cause (corrupt counts each try).",
                None,
                &[
                    (vec![("cause", "timeout")], f.timeouts),
                    (vec![("cause", "corrupt")], f.corrupt),
                    (vec![("cause", "registry")], f.registry_errors),
                    (vec![("cause", "store")], f.store_errors),
                ],
            )?;
            histogram(
                &mut e,
                "dedupd_registry_fetch_latency",
                "Time of one range request to a registry.",
                &[(vec![], lat)],
            )?;
        }
        gauge(
            &mut e,
            "dedupd_cache",
            "Bytes the front end's cache files take on disk.",
            Some(&Unit::Bytes),
            &by_fe(s.cache.bytes),
        )?;
        if let Some(limit) = s.cache.limit_bytes {
            gauge(
                &mut e,
                "dedupd_cache_limit",
                "The cache's configured limit.",
                Some(&Unit::Bytes),
                &by_fe(limit),
            )?;
            gauge(
                &mut e,
                "dedupd_cache_bounded",
                "Bytes counted against the limit: chunks of lazily pulled layers in the \
                 store, evicted ones not yet deallocated, and the front end's copies of \
                 lazily pulled layers.",
                Some(&Unit::Bytes),
                &by_fe(s.cache.bounded_bytes),
            )?;
            gauge(
                &mut e,
                "dedupd_cache_copies",
                "Of the bytes counted against the limit, the front end's cache or blob \
                 files of lazily pulled layers.",
                Some(&Unit::Bytes),
                &by_fe(s.cache.copy_bytes),
            )?;
            counter(
                &mut e,
                "dedupd_cache_layers_released",
                "Lazily pulled layers no container used, unmounted to free their \
                 front-end files.",
                None,
                &by_fe(s.cache.layers_released),
            )?;
        }
        counter(
            &mut e,
            "dedupd_cache_evictions",
            "Chunks evicted to stay under the cache limit.",
            None,
            &by_fe(s.cache.evictions),
        )?;
        gauge(
            &mut e,
            "dedupd_store",
            "Bytes of the chunk store's pack files.",
            Some(&Unit::Bytes),
            &[(vec![], s.store_bytes)],
        )?;
        gauge(
            &mut e,
            "dedupd_registered_blobs",
            "Blobs the front end serves.",
            None,
            &[(vec![], s.registered_blobs)],
        )?;
        let sn = &s.snapshots;
        gauge(
            &mut e,
            "dedupd_snapshots",
            "Snapshots, by kind.",
            None,
            &[
                (vec![("kind", "active")], sn.active),
                (vec![("kind", "view")], sn.views),
                (vec![("kind", "committed")], sn.committed),
            ],
        )?;
        gauge(
            &mut e,
            "dedupd_layers",
            "Layers the committed snapshots use.",
            None,
            &[(vec![], sn.layers)],
        )?;
        gauge(
            &mut e,
            "dedupd_layers_mounted",
            "Layers mounted.",
            None,
            &[(vec![], sn.mounted)],
        )?;
        gauge(
            &mut e,
            "dedupd_layers_lazy",
            "Layers pulled lazily (data fetched when read).",
            None,
            &[(vec![], sn.lazy)],
        )?;
        let c = &s.conversions;
        counter(
            &mut e,
            "dedupd_conversions",
            "Layer conversions at Commit.",
            None,
            &[
                (vec![("result", "ok")], c.ok),
                (vec![("result", "failed")], c.failed),
            ],
        )?;
        histogram(
            &mut e,
            "dedupd_conversion_duration",
            "Time to convert one layer.",
            &[(vec![], &c.latency)],
        )?;
        Ok(())
    }
}

/// One scrape in the Prometheus text format 0.0.4, or OpenMetrics 1.0 with
/// `openmetrics`. Returns the body and its content type.
pub fn render(source: &Source, openmetrics: bool) -> (String, &'static str) {
    let mut registry = prometheus_client::registry::Registry::default();
    registry.register_collector(Box::new(Families::new(source.clone())));
    let mut out = String::new();
    if openmetrics {
        // Writing into a String cannot fail; a collector error would leave a partial
        // body, which the scraper rejects.
        let _ = prometheus_client::encoding::text::encode(&mut out, &registry);
        (
            out,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
        )
    } else {
        let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry);
        (
            out,
            prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::serve::stats::bucket_of;

    #[test]
    fn addresses_are_unix_sockets_or_loopback() {
        assert_eq!(
            Address::parse("/run/dedupd/metrics.sock").unwrap(),
            Address::Unix("/run/dedupd/metrics.sock".into())
        );
        assert_eq!(
            Address::parse("unix:/tmp/m.sock").unwrap(),
            Address::Unix("/tmp/m.sock".into())
        );
        assert!(matches!(
            Address::parse("127.0.0.1:9464").unwrap(),
            Address::Tcp(_)
        ));
        assert!(matches!(
            Address::parse("[::1]:9464").unwrap(),
            Address::Tcp(_)
        ));
        for bad in [
            "0.0.0.0:9464",
            "10.1.2.3:80",
            "[::]:9464",
            "localhost:9464",
            "m.sock",
            "127.0.0.1:0",
        ] {
            let e = Address::parse(bad).unwrap_err().to_string();
            assert!(e.contains(bad), "{e}");
        }
        let e = Address::parse("0.0.0.0:9464").unwrap_err().to_string();
        assert!(e.contains("no authentication"), "{e}");
    }

    #[test]
    fn seconds_buckets_bound_every_value() {
        let mut h = LatencyHistogram::default();
        for us in [0u64, 5, 8, 15, 16, 100, 1000, 65_000, 10_000_000] {
            h.buckets[bucket_of(us)] += 1;
            h.sum_us += us;
        }
        let b = seconds_buckets(&h);
        assert_eq!(b[0].0, 8e-6);
        assert_eq!(b.last().unwrap().0, f64::INFINITY);
        assert!(b.windows(2).all(|w| w[0].0 < w[1].0));
        let total: u64 = b.iter().map(|(_, n)| n).sum();
        assert_eq!(total, h.count());
        // Each value lands in the first bucket whose bound is above it.
        let le = |us: u64| {
            b.iter()
                .position(|(le, _)| (us as f64) / 1e6 < *le)
                .unwrap()
        };
        let mut want = vec![0u64; b.len()];
        for us in [0u64, 5, 8, 15, 16, 100, 1000, 65_000, 10_000_000] {
            want[le(us)] += 1;
        }
        assert_eq!(b.iter().map(|(_, n)| *n).collect::<Vec<_>>(), want);
    }

    fn sample() -> Sample {
        let mut s = Sample {
            front_end: "fanotify".into(),
            requests: 10,
            ..Sample::default()
        };
        s.engine.reads_ok = 9;
        s.engine.latency.buckets[bucket_of(300)] = 9;
        s.engine.latency.sum_us = 2700;
        s.fetch = Some((FetchStatsSnapshot::default(), LatencyHistogram::default()));
        s.cache.limit_bytes = Some(1 << 30);
        s
    }

    #[test]
    fn both_formats_name_every_family_and_nothing_private() {
        let src: Source = Arc::new(sample);
        for om in [false, true] {
            let (text, ct) = render(&src, om);
            assert!(ct.contains(if om { "openmetrics" } else { "0.0.4" }));
            for fam in [
                "dedupd_requests_total{front_end=\"fanotify\"} 10",
                "dedupd_fill_requests_total{front_end=\"fanotify\",result=\"ok\"} 9",
                "dedupd_fill_latency_seconds_count{front_end=\"fanotify\"} 9",
                "dedupd_registry_fetch_latency_seconds_count 0",
                "dedupd_registry_single_flight_joins_total 0",
                "dedupd_cache_limit_bytes{front_end=\"fanotify\"} 1073741824",
                "dedupd_front_end_info{front_end=\"fanotify\"} 1",
                "dedupd_conversion_duration_seconds_count 0",
            ] {
                assert!(text.contains(fam), "no {fam} in\n{text}");
            }
            let inf = if om {
                "dedupd_fill_latency_seconds_bucket{le=\"+Inf\",front_end=\"fanotify\"} 9"
            } else {
                "dedupd_fill_latency_seconds_bucket{front_end=\"fanotify\",le=\"+Inf\"} 9"
            };
            assert!(text.contains(inf), "no {inf} in\n{text}");
            assert_eq!(om, text.ends_with("# EOF\n"));
            assert!(!text.contains('/'), "a path in the metrics:\n{text}");
        }
    }
}
