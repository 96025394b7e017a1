//! The in-memory tree an EROFS image is written from.
//!
//! Conversion builds it entry by entry (later entries win, whiteouts remove, hard links
//! share a node); the writer lays it out. Only metadata lives here: file data is a list
//! of chunk addresses into the layer's data blobs, so memory is bounded by the number of
//! entries, not by the size of the layer.

use std::collections::BTreeMap;

/// Index of a node in a [`Tree`].
pub type NodeId = u32;

/// Where one chunk of a file lives.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ChunkAddr {
    /// All zeros; occupies no blob space (sparse files).
    Hole,
    /// Block `blkaddr` of device `device` (1 = the first data blob in the device table).
    Blob {
        /// Device index (0 is the image itself; data blobs start at 1).
        device: u16,
        /// Block address (4 KiB units) within that device.
        blkaddr: u32,
    },
}

/// A regular file's data: `chunks[i]` covers bytes `[i << chunk_bits, (i + 1) << chunk_bits)`.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct FileData {
    /// File size in bytes.
    pub size: u64,
    /// One address per chunk: `size.div_ceil(1 << chunk_bits)` of them.
    pub chunks: Vec<ChunkAddr>,
}

/// What a node is.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Kind {
    /// Regular file.
    File(FileData),
    /// Directory: children by name, kept sorted as EROFS directories must be.
    Dir(BTreeMap<Vec<u8>, NodeId>),
    /// Symbolic link and its target.
    Symlink(Vec<u8>),
    /// Character device (an overlay whiteout is 0:0).
    CharDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// Block device.
    BlockDev {
        /// Major number.
        major: u32,
        /// Minor number.
        minor: u32,
    },
    /// Named pipe.
    Fifo,
    /// Unix socket.
    Socket,
}

/// Metadata common to every node.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Meta {
    /// Permission bits including setuid, setgid and sticky (`mode & 0o7777`).
    pub perm: u16,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Modification time, seconds since the epoch (may be negative).
    pub mtime: i64,
    /// Nanoseconds part of the modification time.
    pub mtime_nsec: u32,
    /// Extended attributes by full name (`user.x`, `trusted.overlay.opaque`, ...).
    pub xattrs: BTreeMap<Vec<u8>, Vec<u8>>,
}

impl Meta {
    /// root:root with `perm` and time 0.
    pub fn with_perm(perm: u16) -> Meta {
        Meta {
            perm,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: BTreeMap::new(),
        }
    }
}

/// One inode.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node {
    /// Metadata.
    pub meta: Meta,
    /// Type and type-specific payload.
    pub kind: Kind,
}

impl Node {
    /// True for directories.
    pub fn is_dir(&self) -> bool {
        matches!(self.kind, Kind::Dir(_))
    }
}

/// A tree of nodes rooted at [`Tree::ROOT`]. Nodes unlinked from every directory stay in
/// the arena but are not written.
#[derive(Clone, Debug)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// The root directory's id.
    pub const ROOT: NodeId = 0;

    /// A tree holding an empty root directory with `meta`.
    pub fn new(meta: Meta) -> Tree {
        Tree {
            nodes: vec![Node {
                meta,
                kind: Kind::Dir(BTreeMap::new()),
            }],
        }
    }

    /// The node `id`.
    pub fn node(&self, id: NodeId) -> &Node {
        &self.nodes[id as usize]
    }

    /// The node `id`, mutable.
    pub fn node_mut(&mut self, id: NodeId) -> &mut Node {
        &mut self.nodes[id as usize]
    }

    /// Number of nodes in the arena (reachable or not).
    pub fn arena_len(&self) -> usize {
        self.nodes.len()
    }

    /// The child `name` of directory `dir`.
    pub fn child(&self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &self.node(dir).kind {
            Kind::Dir(children) => children.get(name).copied(),
            _ => None,
        }
    }

    /// Children of directory `dir` in name order (empty for non-directories).
    pub fn children(&self, dir: NodeId) -> impl Iterator<Item = (&[u8], NodeId)> {
        let map = match &self.node(dir).kind {
            Kind::Dir(children) => Some(children),
            _ => None,
        };
        map.into_iter()
            .flat_map(|m| m.iter().map(|(k, &v)| (k.as_slice(), v)))
    }

    /// Adds a new node under `dir` as `name`, replacing any entry of that name, and returns
    /// its id. Panics if `dir` is not a directory: callers resolve paths first.
    pub fn insert(&mut self, dir: NodeId, name: &[u8], node: Node) -> NodeId {
        let id = NodeId::try_from(self.nodes.len()).expect("fewer than 2^32 nodes");
        self.nodes.push(node);
        self.link(dir, name, id);
        id
    }

    /// Makes `name` in `dir` another name of node `target` (a hard link), replacing any
    /// entry of that name.
    pub fn link(&mut self, dir: NodeId, name: &[u8], target: NodeId) {
        match &mut self.nodes[dir as usize].kind {
            Kind::Dir(children) => {
                children.insert(name.to_vec(), target);
            }
            _ => panic!("link into a non-directory node {dir}"),
        }
    }

    /// Removes entry `name` from `dir`, returning the node it named.
    pub fn unlink(&mut self, dir: NodeId, name: &[u8]) -> Option<NodeId> {
        match &mut self.nodes[dir as usize].kind {
            Kind::Dir(children) => children.remove(name),
            _ => None,
        }
    }

    /// Removes every entry of directory `dir` (an opaque directory drops what it hid).
    pub fn clear_dir(&mut self, dir: NodeId) {
        if let Kind::Dir(children) = &mut self.nodes[dir as usize].kind {
            children.clear();
        }
    }

    /// Every reachable node, each once, in a deterministic depth-first order starting with
    /// the root; with, for each, how many directory entries name it.
    pub fn reachable(&self) -> Vec<(NodeId, u32)> {
        let mut links = vec![0u32; self.nodes.len()];
        let mut order = Vec::new();
        let mut stack = vec![Tree::ROOT];
        links[Tree::ROOT as usize] = 1;
        order.push(Tree::ROOT);
        while let Some(dir) = stack.pop() {
            // Reverse so that the first child is visited first.
            let kids: Vec<NodeId> = self.children(dir).map(|(_, id)| id).collect();
            for &id in kids.iter().rev() {
                links[id as usize] += 1;
                if links[id as usize] == 1 {
                    order.push(id);
                    if self.node(id).is_dir() {
                        stack.push(id);
                    }
                }
            }
        }
        order
            .into_iter()
            .map(|id| (id, links[id as usize]))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file(size: u64) -> Node {
        Node {
            meta: Meta::with_perm(0o644),
            kind: Kind::File(FileData {
                size,
                chunks: vec![],
            }),
        }
    }

    #[test]
    fn later_entries_replace_and_links_share_a_node() {
        let mut t = Tree::new(Meta::with_perm(0o755));
        let d = t.insert(
            Tree::ROOT,
            b"d",
            Node {
                meta: Meta::with_perm(0o755),
                kind: Kind::Dir(BTreeMap::new()),
            },
        );
        let a = t.insert(d, b"a", file(1));
        t.link(Tree::ROOT, b"hard", a);
        let a2 = t.insert(d, b"a", file(2));
        assert_ne!(a, a2);
        assert_eq!(t.child(d, b"a"), Some(a2));
        let r = t.reachable();
        assert!(r.contains(&(a, 1)));
        assert!(r.contains(&(a2, 1)));
        t.link(d, b"b", a2);
        assert!(t.reachable().contains(&(a2, 2)));
        assert_eq!(t.unlink(d, b"b"), Some(a2));
        t.clear_dir(d);
        assert_eq!(t.children(d).count(), 0);
    }
}
