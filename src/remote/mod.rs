//! Lazy pull: dedupd's own use of a registry, on top of the protocol client in
//! [`crate::registry`].
//!
//! - [`artifact`]: the format published beside an image (metadata and data blobs
//!   under a `subject`-linked manifest); see `docs/artifact-format.md`.
//! - [`fetch`]: chunks that a kernel read needs and the node does not hold, fetched with
//!   range requests from the published data blobs, verified, kept in the store, and
//!   handed back to the serving threads (single flight per chunk, adjacent misses in one
//!   request, bounded concurrency, retries with a deadline).
//! - [`image`]: image manifests, configs and chain ids.
//! - [`publish`]: `dedupd publish`, which builds and pushes an image's artifact.
//! - [`pull`]: finding a layer's artifact and registering the layer from its metadata.

pub mod artifact;
pub mod fetch;
pub mod image;
pub mod publish;
pub mod pull;

pub use self::fetch::{
    FetchConfig, FetchFailure, FetchStats, Fetcher, Mailbox, RangeError, RangeSource, Reply,
    TouchLog,
};
pub use self::pull::{LazyPuller, PrefetchMode, PullError, Traces};
