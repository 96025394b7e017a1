"""The cold-start image set, generated without Docker as an OCI image layout.

Every byte is produced by seeded generators, so the same scale gives the same layer
digests on every machine (the cache key in coldstart.py relies on it). Layers are
gzip-compressed tars, as registries usually serve them.

Images (S is the scale factor; sizes are for S = 1):
  hello        busybox base only; prints READY.
  python       ~6000 small source-like files (~45 MiB) plus 20 native-module-like
               1 MiB binaries; start-up reads 3 % of the files (cat of a fixed list).
  ml           8 weight files of 128 MiB (1 GiB, incompressible like fp16 weights) plus
               a small runtime; start-up reads 5 % of each weight file (dd of ranges).
  app-v1/v2    two releases of one app: the same base layer (same digest), a
               dependencies layer rebuilt for v2 (new digest, 95 % of its files
               identical), and a small app layer each. Shows dedup below the layer level.
"""

import hashlib
import io
import json
import os
import random
import tarfile
import zlib

BUSYBOX_APPLETS = ["sh", "cat", "echo", "dd", "xargs", "ls", "head", "true", "sleep", "env"]
MTIME_BASE = 1_700_000_000
MIB = 1 << 20

# What a program reads at start, as a fraction of the files (python-like) or of the bytes
# of each weight file (ml-like). Also reported by the harness as the designed read set.
PYTHON_READ_FRACTION = 0.03
ML_READ_FRACTION = 0.05


class _LayerWriter:
    """File-like sink for tarfile: hashes the tar (diff id), gzips, hashes the blob."""

    def __init__(self, out):
        self.out = out
        self.diff = hashlib.sha256()
        self.blob = hashlib.sha256()
        self.comp = zlib.compressobj(1, zlib.DEFLATED, 31)  # gzip wrapper, mtime 0
        self.tar_bytes = 0
        self.blob_bytes = 0

    def write(self, b):
        self.diff.update(b)
        self.tar_bytes += len(b)
        self._emit(self.comp.compress(b))
        return len(b)

    def _emit(self, c):
        if c:
            self.blob.update(c)
            self.out.write(c)
            self.blob_bytes += len(c)

    def finish(self):
        self._emit(self.comp.flush())


class _RandReader:
    """`size` seeded pseudo-random bytes, read in pieces (never all in memory)."""

    def __init__(self, seed, size):
        self.rng = random.Random(seed)
        self.left = size

    def read(self, n=-1):
        if n < 0 or n > self.left:
            n = self.left
        n = min(n, 4 * MIB)
        self.left -= n
        return self.rng.randbytes(n)


_CORPUS = None


def _corpus():
    """1 MiB of source-like text that every small file is cut from."""
    global _CORPUS
    if _CORPUS is None:
        rng = random.Random("corpus")
        words = ["def", "return", "self", "import", "from", "class", "if", "else", "for",
                 "in", "None", "True", "False", "value", "result", "config", "path",
                 "data", "items", "len", "range", "yield", "lambda", "try", "except",
                 "raise", "with", "as", "assert", "print", "dict", "list", "str", "int"]
        out = []
        size = 0
        while size < MIB:
            indent = "    " * rng.randrange(4)
            line = indent + " ".join(rng.choice(words) for _ in range(rng.randrange(3, 12)))
            line += f"  # {rng.randrange(1 << 30):x}\n"
            out.append(line)
            size += len(line)
        _CORPUS = "".join(out).encode()[:MIB]
    return _CORPUS


def _text(seed, size):
    rng = random.Random(seed)
    corpus = _corpus()
    head = f"# generated module {seed}\n".encode()
    body_len = max(0, size - len(head))
    off = rng.randrange(len(corpus) - body_len) if body_len < len(corpus) else 0
    return head + corpus[off:off + body_len]


class Layer:
    """A layer as a list of entries: (path, kind, payload, mode).

    kind: "dir", "file" (payload bytes), "rand" (payload (seed, size)),
    "symlink" (payload target), "hostfile" (payload host path).
    """

    def __init__(self, name, mtime=MTIME_BASE):
        self.name = name
        self.mtime = mtime
        self.entries = []
        self._dirs = set()

    def _parents(self, path):
        parts = path.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            d = "/".join(parts[:i])
            if d and d not in self._dirs:
                self._dirs.add(d)
                self.entries.append((d, "dir", None, 0o755))

    def dir(self, path, mode=0o755):
        self._parents(path + "/x")
        return self

    def file(self, path, data, mode=0o644):
        self._parents(path)
        self.entries.append((path, "file", data, mode))
        return self

    def rand(self, path, seed, size, mode=0o644):
        self._parents(path)
        self.entries.append((path, "rand", (seed, size), mode))
        return self

    def symlink(self, path, target):
        self._parents(path)
        self.entries.append((path, "symlink", target, 0o777))
        return self

    def hostfile(self, path, host, mode=0o755):
        self._parents(path)
        self.entries.append((path, "hostfile", host, mode))
        return self

    def spec_digest(self):
        """Identity of the layer's content, for caching built blobs."""
        h = hashlib.sha256(f"{self.name}:{self.mtime}".encode())
        for path, kind, payload, mode in self.entries:
            if kind == "file":
                payload = hashlib.sha256(payload).hexdigest()
            elif kind == "hostfile":
                payload = hashlib.sha256(open(payload, "rb").read()).hexdigest()
            h.update(repr((path, kind, payload, mode)).encode())
        return h.hexdigest()

    def write(self, out):
        """Writes the gzipped tar to `out`; returns (blob digest, blob size, diff id, tar size)."""
        w = _LayerWriter(out)
        with tarfile.open(fileobj=w, mode="w|", format=tarfile.PAX_FORMAT) as tar:
            for path, kind, payload, mode in self.entries:
                ti = tarfile.TarInfo(path)
                ti.mtime = self.mtime
                ti.mode = mode
                ti.uid = ti.gid = 0
                ti.uname = ti.gname = "root"
                if kind == "dir":
                    ti.type = tarfile.DIRTYPE
                    tar.addfile(ti)
                elif kind == "symlink":
                    ti.type = tarfile.SYMTYPE
                    ti.linkname = payload
                    tar.addfile(ti)
                elif kind == "file":
                    ti.size = len(payload)
                    tar.addfile(ti, io.BytesIO(payload))
                elif kind == "rand":
                    seed, size = payload
                    ti.size = size
                    tar.addfile(ti, _RandReader(seed, size))
                elif kind == "hostfile":
                    with open(payload, "rb") as f:
                        data = f.read()
                    ti.size = len(data)
                    tar.addfile(ti, io.BytesIO(data))
        w.finish()
        return "sha256:" + w.blob.hexdigest(), w.blob_bytes, "sha256:" + w.diff.hexdigest(), w.tar_bytes


def _base(busybox):
    layer = Layer("base").hostfile("bin/busybox", busybox)
    for a in BUSYBOX_APPLETS:
        layer.symlink(f"bin/{a}", "busybox")
    layer.file("etc/passwd", b"root:x:0:0:root:/root:/bin/sh\n")
    layer.dir("tmp", 0o1777)
    return layer


def _scaled(n, scale, minimum=1):
    return max(minimum, int(round(n * scale)))


def _source_tree(layer, prefix, seed, files, rng_sizes):
    """`files` source-like files under `prefix`, 40 per directory. Returns their paths."""
    rng = random.Random(f"sizes:{seed}")
    paths = []
    for i in range(files):
        path = f"{prefix}/pkg{i // 40:03d}/mod{i:05d}.py"
        size = rng_sizes(rng)
        layer.file(path, _text(f"{seed}:{i}", size))
        paths.append(path)
    return paths


def _small_size(rng):
    # Mostly small, a long tail: median ~4 KiB, mean ~7 KiB.
    return min(64 * 1024, int(rng.lognormvariate(8.3, 0.9)))


def image_set(scale, busybox):
    """The images as {name: (layers, cmd, designed read bytes, read note)}."""
    base = _base(busybox)
    images = {}

    images["hello"] = ([base], ["/bin/sh", "-c", "echo READY; sleep 1"], 0, "echo only")

    # --- python-like -----------------------------------------------------------------
    stdlib = Layer("py-stdlib")
    paths = _source_tree(stdlib, "usr/lib/python", "stdlib", _scaled(4000, scale), _small_size)
    site = Layer("py-site")
    paths += _source_tree(site, "usr/lib/site", "site", _scaled(2000, scale), _small_size)
    for i in range(_scaled(20, scale)):
        p = f"usr/lib/site/native/ext{i:02d}.so"
        site.rand(p, f"so:{i}", MIB)
        paths.append(p)
    rng = random.Random("python-startup")
    chosen = sorted(rng.sample(paths, max(1, int(len(paths) * PYTHON_READ_FRACTION))))
    sizes = {}
    for layer in (stdlib, site):
        for path, kind, payload, _ in layer.entries:
            if kind == "file":
                sizes[path] = len(payload)
            elif kind == "rand":
                sizes[path] = payload[1]
    app = Layer("py-app")
    app.file("app/startup.list", "".join("/" + p + "\n" for p in chosen).encode())
    app.file("app/start.sh", b"#!/bin/sh\nxargs cat </app/startup.list >/dev/null\necho READY\nsleep 1\n", 0o755)
    images["python"] = ([base, stdlib, site, app], ["/bin/sh", "/app/start.sh"],
                        sum(sizes[p] for p in chosen),
                        f"cat of {len(chosen)} of {len(paths)} files")

    # --- ml-like -----------------------------------------------------------------------
    runtime = Layer("ml-runtime")
    _source_tree(runtime, "opt/runtime/py", "ml-rt", _scaled(300, scale), _small_size)
    for i in range(4):
        runtime.rand(f"opt/runtime/lib/libkernel{i}.so", f"mlso:{i}", _scaled(4, scale) * MIB)
    weights = Layer("ml-weights")
    weight_mib = _scaled(128, scale)
    block = 64 * 1024
    blocks = weight_mib * MIB // block
    per_file = max(1, int(blocks * ML_READ_FRACTION))
    lines = ["#!/bin/sh", "cat /models/config.json >/dev/null"]
    read = 0
    rng = random.Random("ml-startup")
    for i in range(8):
        weights.rand(f"models/shard{i}.bin", f"weights:{i}", weight_mib * MIB)
        # Two ranges per shard, as a loader reading a header and one tensor group would.
        first = per_file // 2
        for count in (first, per_file - first):
            if count == 0:
                continue
            skip = rng.randrange(blocks - count)
            lines.append(f"dd if=/models/shard{i}.bin of=/dev/null bs={block} skip={skip} count={count} 2>/dev/null")
            read += count * block
    weights.file("models/config.json", json.dumps({"shards": 8, "dtype": "f16"}).encode())
    lines.append("echo READY")
    lines.append("sleep 1")
    ml_app = Layer("ml-app").file("app/start.sh", ("\n".join(lines) + "\n").encode(), 0o755)
    images["ml"] = ([base, runtime, weights, ml_app], ["/bin/sh", "/app/start.sh"], read,
                    f"dd of {ML_READ_FRACTION:.0%} of each of 8 x {weight_mib} MiB shards")

    # --- two versions ------------------------------------------------------------------
    files = _scaled(2000, scale)
    libs = _scaled(16, scale)
    changed = set(random.Random("v2-changes").sample(range(files), max(1, files // 20)))
    for version in (1, 2):
        deps = Layer(f"deps-v{version}", MTIME_BASE + version * 86400)
        dpaths = []
        rng = random.Random("deps-sizes")
        for i in range(files):
            p = f"usr/lib/deps/pkg{i // 40:03d}/mod{i:05d}.py"
            seed = f"deps:{i}" + (":v2" if version == 2 and i in changed else "")
            deps.file(p, _text(seed, _small_size(rng)))
            dpaths.append(p)
        for i in range(libs):
            seed = f"lib:{i}" + (":v2" if version == 2 and i == 0 else "")
            deps.rand(f"usr/lib/deps/native/lib{i:02d}.so", seed, 4 * MIB)
        chosen = sorted(random.Random("app-startup").sample(dpaths, max(1, files * 3 // 100)))
        app = Layer(f"app-v{version}", MTIME_BASE + version * 86400)
        app.file("app/VERSION", f"{version}\n".encode())
        app.file("app/startup.list", "".join("/" + p + "\n" for p in chosen).encode())
        app.file("app/start.sh", b"#!/bin/sh\nxargs cat </app/startup.list >/dev/null\n"
                 b"cat /usr/lib/deps/native/lib00.so >/dev/null\necho READY\nsleep 1\n", 0o755)
        read = sum(len(payload) for p, k, payload, _ in deps.entries if p in set(chosen)) + 4 * MIB
        images[f"app-v{version}"] = ([base, deps, app], ["/bin/sh", "/app/start.sh"], read,
                                     f"cat of {len(chosen)} of {files} files and one 4 MiB lib")
    return images


def _put_blob(layout, data):
    digest = hashlib.sha256(data).hexdigest()
    path = os.path.join(layout, "blobs", "sha256", digest)
    if not os.path.exists(path):
        with open(path + ".tmp", "wb") as f:
            f.write(data)
        os.rename(path + ".tmp", path)
    return "sha256:" + digest, len(data)


def build_layout(layout, scale, busybox, log=print):
    """Writes every image into the OCI layout `layout` (tag = image name).

    Returns {name: {"layers": [...], "tar_bytes": N, "blob_bytes": N, "read_bytes": N,
    "read_note": str}}. Layer blobs already present (same spec digest) are reused.
    """
    os.makedirs(os.path.join(layout, "blobs", "sha256"), exist_ok=True)
    with open(os.path.join(layout, "oci-layout"), "w") as f:
        json.dump({"imageLayoutVersion": "1.0.0"}, f)
    cache_path = os.path.join(layout, "layers.json")
    cache = json.load(open(cache_path)) if os.path.exists(cache_path) else {}
    manifests = []
    info = {}
    for name, (layers, cmd, read_bytes, note) in image_set(scale, busybox).items():
        descs = []
        for layer in layers:
            key = layer.spec_digest()
            hit = cache.get(key)
            if hit is None or not os.path.exists(os.path.join(layout, "blobs", "sha256", hit["digest"][7:])):
                log(f"images: building layer {layer.name} of {name}")
                tmp = os.path.join(layout, "layer.tmp")
                with open(tmp, "wb") as out:
                    digest, size, diff_id, tar_bytes = layer.write(out)
                os.rename(tmp, os.path.join(layout, "blobs", "sha256", digest[7:]))
                hit = {"digest": digest, "size": size, "diff_id": diff_id, "tar_bytes": tar_bytes}
                cache[key] = hit
                with open(cache_path, "w") as f:
                    json.dump(cache, f)
            descs.append(dict(hit, name=layer.name))
        config = {
            "architecture": "amd64",
            "os": "linux",
            "config": {"Cmd": cmd, "Env": ["PATH=/bin"], "WorkingDir": "/"},
            "rootfs": {"type": "layers", "diff_ids": [d["diff_id"] for d in descs]},
            "history": [{"created_by": f"coldstart layer {d['name']}"} for d in descs],
        }
        cdigest, csize = _put_blob(layout, json.dumps(config, sort_keys=True).encode())
        manifest = {
            "schemaVersion": 2,
            "mediaType": "application/vnd.oci.image.manifest.v1+json",
            "config": {"mediaType": "application/vnd.oci.image.config.v1+json",
                       "digest": cdigest, "size": csize},
            "layers": [{"mediaType": "application/vnd.oci.image.layer.v1.tar+gzip",
                        "digest": d["digest"], "size": d["size"]} for d in descs],
        }
        mdigest, msize = _put_blob(layout, json.dumps(manifest, sort_keys=True).encode())
        manifests.append({"mediaType": "application/vnd.oci.image.manifest.v1+json",
                          "digest": mdigest, "size": msize,
                          "annotations": {"org.opencontainers.image.ref.name": name}})
        info[name] = {
            "layers": [{"name": d["name"], "digest": d["digest"], "blob_bytes": d["size"],
                        "tar_bytes": d["tar_bytes"]} for d in descs],
            "tar_bytes": sum(d["tar_bytes"] for d in descs),
            "blob_bytes": sum(d["size"] for d in descs),
            "read_bytes": read_bytes,
            "read_note": note,
        }
    with open(os.path.join(layout, "index.json"), "w") as f:
        json.dump({"schemaVersion": 2, "manifests": manifests}, f)
    return info
