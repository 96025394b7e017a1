//! Snapshot metadata in its own redb file (`ROOT/snapshots.redb`), with the rules of
//! containerd's snapshot metastore: which kinds may be created, committed and removed,
//! and which gRPC error each broken rule gives.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use redb::{ReadableDatabase, ReadableTable, TableDefinition};
use serde::{Deserialize, Serialize};

use super::SnapError;

/// key -> JSON [`Snap`].
const SNAPSHOTS: TableDefinition<&str, &[u8]> = TableDefinition::new("snapshots");
/// Counters (`next_id`).
const COUNTERS: TableDefinition<&str, u64> = TableDefinition::new("counters");
/// Layers (diff id hex) this snapshotter converted or adopted, and so may remove from the
/// store when no snapshot references them. Value: unix seconds when recorded.
const OWNED_LAYERS: TableDefinition<&str, u64> = TableDefinition::new("owned_layers");
/// Layer (hex) -> its mount slot, the number naming its mountpoint `ROOT/m/<slot>`. A
/// slot is given when the layer is first mounted and freed only once it is unmounted, so
/// a path never names two layers while either is mounted.
const LAYER_SLOTS: TableDefinition<&str, u64> = TableDefinition::new("layer_slots");

/// Highest mount slot, so at most this many layers are mounted at once. Slots are given
/// lowest free first, so they stay as short as the number of mounted layers allows; five
/// digits keep a 128-layer overlay's options under a page (see
/// `super::OVERLAY_WORST_DATA_BYTES`).
pub const MAX_LAYER_SLOT: u64 = 99_999;

/// Largest label key plus value, in bytes (containerd's own limit).
pub const MAX_LABEL_BYTES: usize = 4096;
/// Most labels one snapshot may carry.
pub const MAX_LABELS: usize = 256;
/// Longest snapshot key, in bytes.
pub const MAX_KEY_BYTES: usize = 4096;

/// A snapshot's kind, numbered as in the protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Kind {
    /// Read-only view of a committed parent.
    View = 1,
    /// Writable.
    Active = 2,
    /// Immutable; a parent for others.
    Committed = 3,
}

impl Kind {
    /// The name containerd's filters use.
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::View => "view",
            Kind::Active => "active",
            Kind::Committed => "committed",
        }
    }
}

/// A point in time as seconds and nanoseconds since the Unix epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Stamp {
    /// Seconds.
    pub secs: i64,
    /// Nanoseconds, < 1e9.
    pub nanos: i32,
}

impl Stamp {
    /// Now.
    pub fn now() -> Stamp {
        let d = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default();
        Stamp {
            secs: d.as_secs() as i64,
            nanos: d.subsec_nanos() as i32,
        }
    }
}

/// One snapshot's record.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Snap {
    /// Number naming its directory `ROOT/snapshots/<id>`.
    pub id: u64,
    /// Kind.
    pub kind: Kind,
    /// Parent key, empty for none.
    pub parent: String,
    /// Labels.
    pub labels: BTreeMap<String, String>,
    /// Creation time.
    pub created: Stamp,
    /// Last update.
    pub updated: Stamp,
    /// Committed snapshots: the hex id of the converted layer holding their content.
    pub layer: Option<String>,
    /// Committed snapshots: bytes and inodes of the tree when it was committed.
    pub size_bytes: u64,
    /// See `size_bytes`.
    pub inodes: u64,
}

/// The snapshot metadata database.
pub struct Meta {
    path: PathBuf,
    db: redb::Database,
}

/// Checks a label set against the size limits.
pub fn check_labels(labels: &BTreeMap<String, String>) -> Result<(), SnapError> {
    if labels.len() > MAX_LABELS {
        return Err(SnapError::InvalidArgument(format!(
            "{} labels: at most {MAX_LABELS} are allowed",
            labels.len()
        )));
    }
    for (k, v) in labels {
        if k.len() + v.len() > MAX_LABEL_BYTES {
            return Err(SnapError::InvalidArgument(format!(
                "label {k:?}: key and value exceed {MAX_LABEL_BYTES} bytes"
            )));
        }
    }
    Ok(())
}

fn check_key(what: &str, key: &str) -> Result<(), SnapError> {
    if key.is_empty() {
        return Err(SnapError::InvalidArgument(format!("{what} is required")));
    }
    if key.len() > MAX_KEY_BYTES {
        return Err(SnapError::InvalidArgument(format!(
            "{what} is longer than {MAX_KEY_BYTES} bytes"
        )));
    }
    Ok(())
}

impl Meta {
    /// Opens (creating) the database at `path`.
    pub fn open(path: &Path) -> Result<Meta, SnapError> {
        let db = match redb::Database::create(path) {
            Ok(db) => db,
            Err(redb::DatabaseError::DatabaseAlreadyOpen) => {
                return Err(SnapError::Internal(format!(
                    "{} is in use by another dedupd process",
                    path.display()
                )))
            }
            Err(e) => return Err(SnapError::Internal(format!("{}: {e}", path.display()))),
        };
        let meta = Meta {
            path: path.to_path_buf(),
            db,
        };
        let txn = meta.db.begin_write().map_err(meta.err())?;
        {
            txn.open_table(SNAPSHOTS).map_err(meta.err())?;
            txn.open_table(COUNTERS).map_err(meta.err())?;
            txn.open_table(OWNED_LAYERS).map_err(meta.err())?;
            txn.open_table(LAYER_SLOTS).map_err(meta.err())?;
        }
        txn.commit().map_err(meta.err())?;
        Ok(meta)
    }

    fn err<E: Into<redb::Error>>(&self) -> impl Fn(E) -> SnapError + '_ {
        move |e| SnapError::Internal(format!("{}: {}", self.path.display(), e.into()))
    }

    fn decode(&self, key: &str, bytes: &[u8]) -> Result<Snap, SnapError> {
        serde_json::from_slice(bytes).map_err(|e| {
            SnapError::Internal(format!(
                "{}: corrupt record of snapshot {key:?}: {e}",
                self.path.display()
            ))
        })
    }

    /// The snapshot `key`, if any.
    pub fn get(&self, key: &str) -> Result<Option<Snap>, SnapError> {
        let txn = self.db.begin_read().map_err(self.err())?;
        let t = txn.open_table(SNAPSHOTS).map_err(self.err())?;
        match t.get(key).map_err(self.err())? {
            Some(v) => Ok(Some(self.decode(key, v.value())?)),
            None => Ok(None),
        }
    }

    /// The snapshot `key`, or NotFound.
    pub fn stat(&self, key: &str) -> Result<Snap, SnapError> {
        self.get(key)?
            .ok_or_else(|| SnapError::NotFound(format!("snapshot {key:?}")))
    }

    /// Every snapshot, by key.
    pub fn list(&self) -> Result<Vec<(String, Snap)>, SnapError> {
        let txn = self.db.begin_read().map_err(self.err())?;
        let t = txn.open_table(SNAPSHOTS).map_err(self.err())?;
        let mut out = Vec::new();
        for item in t.iter().map_err(self.err())? {
            let (k, v) = item.map_err(self.err())?;
            out.push((k.value().to_string(), self.decode(k.value(), v.value())?));
        }
        Ok(out)
    }

    /// The committed ancestors of a snapshot with parent `parent`, nearest first.
    pub fn ancestors(&self, parent: &str) -> Result<Vec<(String, Snap)>, SnapError> {
        let mut out = Vec::new();
        let mut next = parent.to_string();
        // Bounded: a chain longer than the number of snapshots has a cycle.
        let limit = self.list()?.len() + 1;
        while !next.is_empty() {
            if out.len() > limit {
                return Err(SnapError::Internal(format!(
                    "snapshot {parent:?}: parent chain has a cycle"
                )));
            }
            let s = self.get(&next)?.ok_or_else(|| {
                SnapError::Internal(format!("parent {next:?} of a snapshot is missing"))
            })?;
            let p = s.parent.clone();
            out.push((next, s));
            next = p;
        }
        Ok(out)
    }

    /// Creates an active or view snapshot, as containerd's metastore does: the parent must
    /// exist (NotFound) and be committed (InvalidArgument); the key must be new
    /// (AlreadyExists).
    pub fn create(
        &self,
        kind: Kind,
        key: &str,
        parent: &str,
        labels: BTreeMap<String, String>,
    ) -> Result<Snap, SnapError> {
        if kind == Kind::Committed {
            return Err(SnapError::InvalidArgument(
                "only active or view snapshots can be created".into(),
            ));
        }
        check_key("key", key)?;
        check_labels(&labels)?;
        let txn = self.db.begin_write().map_err(self.err())?;
        let snap = {
            let mut t = txn.open_table(SNAPSHOTS).map_err(self.err())?;
            let mut c = txn.open_table(COUNTERS).map_err(self.err())?;
            if !parent.is_empty() {
                let p = match t.get(parent).map_err(self.err())? {
                    Some(v) => self.decode(parent, v.value())?,
                    None => return Err(SnapError::NotFound(format!("parent snapshot {parent:?}"))),
                };
                if p.kind != Kind::Committed {
                    return Err(SnapError::InvalidArgument(format!(
                        "parent {parent:?} is not a committed snapshot"
                    )));
                }
            }
            if t.get(key).map_err(self.err())?.is_some() {
                return Err(SnapError::AlreadyExists(format!("snapshot {key:?}")));
            }
            let id = c
                .get("next_id")
                .map_err(self.err())?
                .map_or(1, |v| v.value());
            c.insert("next_id", id + 1).map_err(self.err())?;
            let now = Stamp::now();
            let snap = Snap {
                id,
                kind,
                parent: parent.to_string(),
                labels,
                created: now,
                updated: now,
                layer: None,
                size_bytes: 0,
                inodes: 0,
            };
            let json = serde_json::to_vec(&snap).expect("serializable");
            t.insert(key, json.as_slice()).map_err(self.err())?;
            snap
        };
        txn.commit().map_err(self.err())?;
        Ok(snap)
    }

    /// Checks that `key` can be committed as `name`, as containerd does: the name must be
    /// new (AlreadyExists), the key must exist (NotFound) and be active
    /// (FailedPrecondition). Returns the active snapshot.
    pub fn check_commit(&self, key: &str, name: &str) -> Result<Snap, SnapError> {
        check_key("name", name)?;
        check_key("key", key)?;
        if self.get(name)?.is_some() {
            return Err(SnapError::AlreadyExists(format!(
                "committed snapshot {name:?}"
            )));
        }
        let s = self
            .get(key)?
            .ok_or_else(|| SnapError::NotFound(format!("active snapshot {key:?}")))?;
        if s.kind != Kind::Active {
            return Err(SnapError::FailedPrecondition(format!(
                "snapshot {key:?} is not active"
            )));
        }
        Ok(s)
    }

    /// Replaces active snapshot `key` by committed snapshot `name` in one transaction,
    /// re-checking the rules of [`Meta::check_commit`]. Children of `key` (there can be
    /// none: only committed snapshots are parents) need no update.
    pub fn commit(
        &self,
        key: &str,
        name: &str,
        labels: BTreeMap<String, String>,
        layer: &str,
        size_bytes: u64,
        inodes: u64,
    ) -> Result<Snap, SnapError> {
        check_labels(&labels)?;
        let txn = self.db.begin_write().map_err(self.err())?;
        let snap = {
            let mut t = txn.open_table(SNAPSHOTS).map_err(self.err())?;
            if t.get(name).map_err(self.err())?.is_some() {
                return Err(SnapError::AlreadyExists(format!(
                    "committed snapshot {name:?}"
                )));
            }
            let active = match t.remove(key).map_err(self.err())? {
                Some(v) => self.decode(key, v.value())?,
                None => return Err(SnapError::NotFound(format!("active snapshot {key:?}"))),
            };
            if active.kind != Kind::Active {
                return Err(SnapError::FailedPrecondition(format!(
                    "snapshot {key:?} is not active"
                )));
            }
            let now = Stamp::now();
            let snap = Snap {
                id: active.id,
                kind: Kind::Committed,
                parent: active.parent,
                labels,
                created: now,
                updated: now,
                layer: Some(layer.to_string()),
                size_bytes,
                inodes,
            };
            let json = serde_json::to_vec(&snap).expect("serializable");
            t.insert(name, json.as_slice()).map_err(self.err())?;
            snap
        };
        txn.commit().map_err(self.err())?;
        Ok(snap)
    }

    /// Removes `key`: NotFound if missing, FailedPrecondition if it has children.
    pub fn remove(&self, key: &str) -> Result<Snap, SnapError> {
        let txn = self.db.begin_write().map_err(self.err())?;
        let snap = {
            let mut t = txn.open_table(SNAPSHOTS).map_err(self.err())?;
            let snap = match t.get(key).map_err(self.err())? {
                Some(v) => self.decode(key, v.value())?,
                None => return Err(SnapError::NotFound(format!("snapshot {key:?}"))),
            };
            for item in t.iter().map_err(self.err())? {
                let (k, v) = item.map_err(self.err())?;
                if self.decode(k.value(), v.value())?.parent == key {
                    return Err(SnapError::FailedPrecondition(format!(
                        "cannot remove snapshot {key:?}: snapshot {:?} is its child",
                        k.value()
                    )));
                }
            }
            t.remove(key).map_err(self.err())?;
            snap
        };
        txn.commit().map_err(self.err())?;
        Ok(snap)
    }

    /// Updates the labels of `key` following `paths` (`labels`, `labels.<key>`; none
    /// means all mutable fields, i.e. the labels). Returns the updated record.
    pub fn update(
        &self,
        key: &str,
        labels: &BTreeMap<String, String>,
        paths: &[String],
    ) -> Result<Snap, SnapError> {
        let txn = self.db.begin_write().map_err(self.err())?;
        let snap = {
            let mut t = txn.open_table(SNAPSHOTS).map_err(self.err())?;
            let mut snap = match t.get(key).map_err(self.err())? {
                Some(v) => self.decode(key, v.value())?,
                None => return Err(SnapError::NotFound(format!("snapshot {key:?}"))),
            };
            if paths.is_empty() {
                snap.labels = labels.clone();
            }
            for p in paths {
                if p == "labels" {
                    snap.labels = labels.clone();
                } else if let Some(k) = p.strip_prefix("labels.") {
                    match labels.get(k) {
                        Some(v) => snap.labels.insert(k.to_string(), v.clone()),
                        None => snap.labels.remove(k),
                    };
                } else {
                    return Err(SnapError::InvalidArgument(format!(
                        "cannot update field {p:?} of snapshot {key:?}: only labels are mutable"
                    )));
                }
            }
            check_labels(&snap.labels)?;
            snap.updated = Stamp::now();
            let json = serde_json::to_vec(&snap).expect("serializable");
            t.insert(key, json.as_slice()).map_err(self.err())?;
            snap
        };
        txn.commit().map_err(self.err())?;
        Ok(snap)
    }

    /// Records that this snapshotter owns layer `hex` (before converting it, so that a
    /// crash leaves a layer Cleanup can find).
    pub fn own_layer(&self, hex: &str) -> Result<(), SnapError> {
        let txn = self.db.begin_write().map_err(self.err())?;
        {
            let mut t = txn.open_table(OWNED_LAYERS).map_err(self.err())?;
            t.insert(hex, Stamp::now().secs as u64)
                .map_err(self.err())?;
        }
        txn.commit().map_err(self.err())
    }

    /// Forgets ownership of layer `hex`.
    pub fn disown_layer(&self, hex: &str) -> Result<(), SnapError> {
        let txn = self.db.begin_write().map_err(self.err())?;
        {
            let mut t = txn.open_table(OWNED_LAYERS).map_err(self.err())?;
            t.remove(hex).map_err(self.err())?;
        }
        txn.commit().map_err(self.err())
    }

    /// Layers this snapshotter owns.
    pub fn owned_layers(&self) -> Result<Vec<String>, SnapError> {
        let txn = self.db.begin_read().map_err(self.err())?;
        let t = txn.open_table(OWNED_LAYERS).map_err(self.err())?;
        let mut out = Vec::new();
        for item in t.iter().map_err(self.err())? {
            out.push(item.map_err(self.err())?.0.value().to_string());
        }
        Ok(out)
    }

    /// The mount slot of layer `hex`, if it has one.
    pub fn layer_slot(&self, hex: &str) -> Result<Option<u64>, SnapError> {
        let txn = self.db.begin_read().map_err(self.err())?;
        let t = txn.open_table(LAYER_SLOTS).map_err(self.err())?;
        Ok(t.get(hex).map_err(self.err())?.map(|v| v.value()))
    }

    /// The mount slot of layer `hex`, given now (the lowest free one) if it has none.
    /// FailedPrecondition when all [`MAX_LAYER_SLOT`] slots are taken.
    pub fn assign_layer_slot(&self, hex: &str) -> Result<u64, SnapError> {
        let txn = self.db.begin_write().map_err(self.err())?;
        let slot = {
            let mut t = txn.open_table(LAYER_SLOTS).map_err(self.err())?;
            if let Some(v) = t.get(hex).map_err(self.err())? {
                return Ok(v.value());
            }
            let mut taken = Vec::new();
            for item in t.iter().map_err(self.err())? {
                taken.push(item.map_err(self.err())?.1.value());
            }
            taken.sort_unstable();
            // The lowest slot from 1 not taken: the first gap in the sorted list.
            let mut slot = 1;
            for s in taken {
                if s == slot {
                    slot += 1;
                } else if s > slot {
                    break;
                }
            }
            if slot > MAX_LAYER_SLOT {
                return Err(SnapError::FailedPrecondition(format!(
                    "layer {hex}: {MAX_LAYER_SLOT} layers are mounted, no mount slot is free"
                )));
            }
            t.insert(hex, slot).map_err(self.err())?;
            slot
        };
        txn.commit().map_err(self.err())?;
        Ok(slot)
    }

    /// Frees the mount slot of layer `hex` (call once it is unmounted).
    pub fn free_layer_slot(&self, hex: &str) -> Result<(), SnapError> {
        let txn = self.db.begin_write().map_err(self.err())?;
        {
            let mut t = txn.open_table(LAYER_SLOTS).map_err(self.err())?;
            t.remove(hex).map_err(self.err())?;
        }
        txn.commit().map_err(self.err())
    }

    /// Every layer holding a mount slot, with its slot.
    pub fn layer_slots(&self) -> Result<Vec<(String, u64)>, SnapError> {
        let txn = self.db.begin_read().map_err(self.err())?;
        let t = txn.open_table(LAYER_SLOTS).map_err(self.err())?;
        let mut out = Vec::new();
        for item in t.iter().map_err(self.err())? {
            let (k, v) = item.map_err(self.err())?;
            out.push((k.value().to_string(), v.value()));
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta() -> (tempfile::TempDir, Meta) {
        let dir = tempfile::tempdir().unwrap();
        let m = Meta::open(&dir.path().join("s.redb")).unwrap();
        (dir, m)
    }

    #[test]
    fn rules_follow_containerd() {
        let (_d, m) = meta();
        let none = BTreeMap::new();
        m.create(Kind::Active, "a", "", none.clone()).unwrap();
        assert!(matches!(
            m.create(Kind::Active, "a", "", none.clone()),
            Err(SnapError::AlreadyExists(_))
        ));
        assert!(matches!(
            m.create(Kind::Active, "b", "missing", none.clone()),
            Err(SnapError::NotFound(_))
        ));
        assert!(matches!(
            m.create(Kind::Active, "b", "a", none.clone()),
            Err(SnapError::InvalidArgument(_))
        ));
        m.commit("a", "c", none.clone(), "00", 1, 1).unwrap();
        assert!(m.get("a").unwrap().is_none());
        assert!(matches!(
            m.check_commit("c", "d"),
            Err(SnapError::FailedPrecondition(_))
        ));
        assert!(matches!(
            m.check_commit("zz", "d"),
            Err(SnapError::NotFound(_))
        ));
        m.create(Kind::View, "v", "c", none.clone()).unwrap();
        assert!(matches!(
            m.remove("c"),
            Err(SnapError::FailedPrecondition(_))
        ));
        assert_eq!(m.ancestors("c").unwrap().len(), 1);
        m.remove("v").unwrap();
        m.remove("c").unwrap();
        assert!(matches!(m.remove("c"), Err(SnapError::NotFound(_))));
    }

    #[test]
    fn update_follows_field_paths() {
        let (_d, m) = meta();
        let mut l = BTreeMap::new();
        l.insert("x".to_string(), "1".to_string());
        l.insert("y".to_string(), "2".to_string());
        m.create(Kind::Active, "a", "", l).unwrap();
        let mut new = BTreeMap::new();
        new.insert("x".to_string(), "9".to_string());
        let s = m.update("a", &new, &["labels.y".to_string()]).unwrap();
        assert_eq!(s.labels.get("y"), None);
        assert_eq!(s.labels.get("x").map(String::as_str), Some("1"));
        let s = m.update("a", &new, &["labels".to_string()]).unwrap();
        assert_eq!(s.labels, new);
        assert!(matches!(
            m.update("a", &new, &["kind".to_string()]),
            Err(SnapError::InvalidArgument(_))
        ));
    }

    #[test]
    fn layer_slots_are_lowest_free_and_persist() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("s.redb");
        {
            let m = Meta::open(&path).unwrap();
            assert_eq!(m.layer_slot("a").unwrap(), None);
            assert_eq!(m.assign_layer_slot("a").unwrap(), 1);
            assert_eq!(m.assign_layer_slot("b").unwrap(), 2);
            assert_eq!(m.assign_layer_slot("c").unwrap(), 3);
            assert_eq!(
                m.assign_layer_slot("a").unwrap(),
                1,
                "a layer keeps its slot"
            );
            m.free_layer_slot("b").unwrap();
            assert_eq!(m.assign_layer_slot("d").unwrap(), 2, "the lowest free slot");
            assert_eq!(m.assign_layer_slot("e").unwrap(), 4);
        }
        let m = Meta::open(&path).unwrap();
        let mut slots = m.layer_slots().unwrap();
        slots.sort();
        let want = [("a", 1), ("c", 3), ("d", 2), ("e", 4)];
        assert_eq!(
            slots,
            want.map(|(h, s)| (h.to_string(), s)).to_vec(),
            "slots survive a reopen"
        );
    }
}
