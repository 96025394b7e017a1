#!/usr/bin/env python3
"""Cold-start benchmark: dedup vs overlayfs snapshotters, same registry, same run.

Started by `bench/coldstart/run` (which installs packages and builds dedupd); see
bench/README.md for what each number means. Python standard library only.
"""

import argparse
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import images  # noqa: E402
import link  # noqa: E402
import report  # noqa: E402

NS = "coldstart"
# Image groups measured together: a group is pulled image by image, then run image by
# image; disk use is taken once every image of the group is pulled.
GROUPS = [["hello"], ["python"], ["ml"], ["app-v1", "app-v2"]]
# Measured on a cold node of their own (`dedupd pull`, then `ctr run`), not on the shared one.
NODE_SNAPSHOTTERS = ("dedup-lazy", "dedup-stream")
# The images again, pushed but never published (dedup-stream).
PLAIN_REPO = "plain"
WAIT_LIMIT_S = 60
RUN_LIMIT_S = 600


def log(msg):
    print(f"coldstart: {msg}", flush=True)


class Fail(Exception):
    pass


def sh(*cmd, check=True, capture=True, timeout=RUN_LIMIT_S):
    r = subprocess.run(cmd, stdout=subprocess.PIPE if capture else None,
                       stderr=subprocess.PIPE if capture else None, text=True, timeout=timeout)
    if check and r.returncode != 0:
        raise Fail(f"{' '.join(cmd)} exited {r.returncode}: {(r.stderr or '').strip()[-2000:]}")
    return r.stdout if capture else ""


def wait_until(pred, what, limit_s=WAIT_LIMIT_S):
    end = time.monotonic() + limit_s
    while time.monotonic() < end:
        try:
            if pred():
                return
        except Exception:
            pass
        time.sleep(0.1)
    raise Fail(f"timed out after {limit_s} s waiting for {what}")


def terminate(p, limit_s):
    """SIGTERM `p` and wait up to `limit_s` seconds for it, then SIGKILL it."""
    p.send_signal(signal.SIGTERM)
    try:
        p.wait(timeout=limit_s)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait()


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def drop_caches():
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def settle_trash(trash, limit_s=30.0):
    """Waits (bounded) until dedupd's background deletions have emptied `trash`."""
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        try:
            if not os.listdir(trash):
                return
        except FileNotFoundError:
            return
        time.sleep(0.05)
    log(f"{trash} still not empty after {limit_s:.0f} s; measuring anyway")


def disk_bytes(*roots):
    """Allocated bytes under `roots`, each hard-linked inode once, not crossing mounts."""
    seen = set()
    total = 0
    for root in roots:
        if not os.path.exists(root):
            continue
        if not os.path.isdir(root):
            total += os.lstat(root).st_blocks * 512
            continue
        dev = os.lstat(root).st_dev
        for dirpath, dirnames, filenames in os.walk(root):
            keep = []
            for d in dirnames:
                p = os.path.join(dirpath, d)
                try:
                    st = os.lstat(p)
                except FileNotFoundError:
                    continue
                if st.st_dev == dev:
                    keep.append(d)
                    total += st.st_blocks * 512
            dirnames[:] = keep
            for n in filenames:
                try:
                    st = os.lstat(os.path.join(dirpath, n))
                except FileNotFoundError:
                    continue
                if st.st_dev != dev or (st.st_dev, st.st_ino) in seen:
                    continue
                seen.add((st.st_dev, st.st_ino))
                total += st.st_blocks * 512
    return total


def block_device_of(path):
    """Name of the /sys/block device holding `path` (for its read counters), or None."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    link = f"/sys/dev/block/{major}:{minor}"
    if not os.path.exists(link):
        return None
    real = os.path.realpath(link)
    # A partition's counters are its own; a whole disk's too. Either has a `stat` file.
    return real if os.path.exists(os.path.join(real, "stat")) else None


def device_read_bytes(sysdev):
    if sysdev is None:
        return 0
    with open(os.path.join(sysdev, "stat")) as f:
        return int(f.read().split()[2]) * 512


def cgroup_read_bytes(ns, cid):
    """Bytes the container's processes made the kernel read from storage.

    Sums `/proc/PID/io` read_bytes of the processes in the container's cgroup (its
    children that exited were reaped into their parent's counters). Called while the
    program sleeps after READY. None when the cgroup cannot be found.
    """
    for ctl in ("pids/", "memory/", "systemd/", ""):  # cgroup v1 controllers, then v2
        path = f"/sys/fs/cgroup/{ctl}{ns}/{cid}/cgroup.procs"
        try:
            with open(path) as f:
                pids = [int(x) for x in f.read().split()]
        except (OSError, ValueError):
            continue
        counts = [proc_io(pid, "read_bytes") for pid in pids]
        return None if None in counts else sum(counts)
    return None


def proc_io(pid, field):
    """A `/proc/PID/io` counter; None without task I/O accounting in the kernel, 0 for a
    process that is gone."""
    if not os.path.exists("/proc/self/io"):
        return None
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                k, v = line.split(":")
                if k == field:
                    return int(v)
    except OSError:
        pass
    return 0


def proc_hwm_bytes(pid):
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def delta(after, before):
    return None if after is None or before is None else after - before


def reset_hwm(pid):
    try:
        with open(f"/proc/{pid}/clear_refs", "w") as f:
            f.write("5\n")  # resets the peak RSS
    except OSError:
        pass


class Bench:
    def __init__(self, args):
        self.args = args
        self.procs = []
        self.dedupd = None
        self.dedupd_cmd = None
        self.work = tempfile.mkdtemp(prefix="dedupd-coldstart.", dir=args.scratch)
        self.csock = os.path.join(self.work, "containerd", "containerd.sock")
        self.dsock = os.path.join(self.work, "run", "dedupd.sock")
        self.droot = os.path.join(self.work, "dedupd")
        self.croot = os.path.join(self.work, "containerd", "root")
        self.reg_log = os.path.join(self.work, "registry.log")
        self.sysdev = block_device_of(self.work)
        self.seq = 0
        self.restarts = 0
        self.measured_dedup = False
        # Where the registry is reached (loopback, or the relay of a shaped link) and
        # the hosts.toml dir telling dedupd it speaks plain HTTP.
        self.certs = os.path.join(self.work, "certs.d")
        self.host = None
        self.link = "loopback"
        self.link_procs = []
        self.nodes = 0

    # --- services ----------------------------------------------------------------------
    def spawn(self, cmd, logname):
        f = open(os.path.join(self.work, logname), "ab")
        p = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, start_new_session=True)
        self.procs.append(p)
        return p

    def start_registry(self):
        self.port = free_port()
        storage = self.args.registry_root or os.path.join(self.work, "registry")
        os.makedirs(storage, exist_ok=True)
        cfg = os.path.join(self.work, "registry.yml")
        with open(cfg, "w") as f:
            f.write(f"""version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: {storage}
  delete:
    enabled: true
http:
  addr: 127.0.0.1:{self.port}
""")
        self.spawn(["docker-registry", "serve", cfg], "registry.log")

        def up():
            with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                return True
        wait_until(up, "the registry")
        log(f"registry on 127.0.0.1:{self.port}")
        self.host = f"127.0.0.1:{self.port}"
        self.storage = storage
        self.write_hosts(self.host)

    def write_hosts(self, host):
        """containerd's convention for a plain-HTTP registry, read by dedupd."""
        d = os.path.join(self.certs, host)
        os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, "hosts.toml"), "w") as f:
            f.write(f'server = "http://{host}"\n[host."http://{host}"]\n'
                    f'  capabilities = ["pull", "resolve", "push"]\n')

    # --- shaped links --------------------------------------------------------------------
    def link_up(self, name):
        """A network namespace with the registry inside (same storage), a tbf-shaped veth
        pair and a delay relay on 127.0.0.1 (see link.py); the registry is then reached
        through the relay."""
        rate, rtt = link.SHAPES[name]
        link.up(rate, rtt)
        cfg = os.path.join(self.work, f"registry-{name}.yml")
        with open(cfg, "w") as f:
            f.write(f"""version: 0.1
log:
  level: info
  formatter: text
storage:
  filesystem:
    rootdirectory: {self.storage}
  delete:
    enabled: true
http:
  addr: {link.NS_ADDR}:{link.REGISTRY_PORT}
""")
        logname = f"registry-{name}.log"
        reg = self.spawn(link.in_ns("docker-registry", "serve", cfg), logname)
        self.link_procs.append(reg)

        def up():
            with socket.create_connection((link.NS_ADDR, link.REGISTRY_PORT), timeout=1):
                return True
        wait_until(up, f"the registry in namespace {link.NETNS}")
        port = free_port()
        relay = self.spawn([sys.executable, os.path.join(HERE, "link.py"), "relay", str(port),
                            link.NS_ADDR, str(link.REGISTRY_PORT), str(rtt)], f"relay-{name}.log")
        self.link_procs.append(relay)

        def relay_up():
            with socket.create_connection(("127.0.0.1", port), timeout=1):
                return True
        wait_until(relay_up, "the delay relay")
        self.link, self.host = name, f"127.0.0.1:{port}"
        self.reg_log = os.path.join(self.work, logname)
        self.write_hosts(self.host)
        log(f"link {name}: registry at {link.NS_ADDR}:{link.REGISTRY_PORT} in namespace "
            f"{link.NETNS} ({rate}, veth shaped by tbf), reached through 127.0.0.1:{port} "
            f"(+{rtt:g} ms round trip)")

    def link_down(self):
        for p in reversed(self.link_procs):
            if p.poll() is None:
                terminate(p, 10)
        self.link_procs = []
        link.down()
        self.link, self.host = "loopback", f"127.0.0.1:{self.port}"
        self.reg_log = os.path.join(self.work, "registry.log")

    def registry_bytes(self):
        """Bytes the registry has sent so far (its `http.response.written` log fields)."""
        total = 0
        with open(self.reg_log, errors="replace") as f:
            for line in f:
                m = re.search(r"http\.response\.written=(\d+)", line)
                if m and "response completed" in line:
                    total += int(m.group(1))
        return total

    def start_dedupd(self):
        """Starts dedupd as the `dedup` proxy snapshotter. Tries `run` (the whole daemon,
        with a lazy front end) first, then `snapshotter` (local front end)."""
        binary = self.args.dedupd
        os.makedirs(os.path.dirname(self.dsock), exist_ok=True)
        choices = [self.args.dedupd_cmd] if self.args.dedupd_cmd else ["run", "snapshotter"]
        errors = []
        for sub in choices:
            cmd = [binary] + sub.split() + ["--root", self.droot, "--socket", self.dsock]
            p = self.spawn(cmd, "dedupd.log")
            end = time.monotonic() + 20
            while time.monotonic() < end and p.poll() is None and not os.path.exists(self.dsock):
                time.sleep(0.05)
            if p.poll() is None and os.path.exists(self.dsock):
                self.dedupd, self.dedupd_cmd = p, " ".join(cmd[1:2] + sub.split()[1:])
                log(f"dedupd `{sub}` serving on {self.dsock} (pid {p.pid})")
                return
            if p.poll() is None:
                p.kill()
                p.wait()
            errors.append(f"`dedupd {sub}` exited {p.returncode}")
        tail = open(os.path.join(self.work, "dedupd.log"), errors="replace").read()[-1500:]
        raise Fail(f"dedupd did not serve its socket ({'; '.join(errors)}); log tail:\n{tail}")

    def dedupd_log_size(self):
        try:
            return os.path.getsize(os.path.join(self.work, "dedupd.log"))
        except OSError:
            return 0

    def commit_timing(self, since):
        """Sums of the snapshotter's `commit timing` log lines written after byte `since`
        of dedupd.log: seconds spent at Commit (disk usage walk, conversion, mount,
        metadata and removal of the unpacked tree) and the number of layers."""
        sums = {"commit_s": 0.0, "commit_usage_s": 0.0, "commit_convert_s": 0.0,
                "commit_mount_s": 0.0, "commit_record_s": 0.0, "commit_remove_s": 0.0,
                "commit_layers": 0}
        try:
            with open(os.path.join(self.work, "dedupd.log"), "rb") as f:
                f.seek(since)
                text = f.read().decode(errors="replace")
        except OSError:
            return None
        for line in re.sub(r"\x1b\[[0-9;]*m", "", text).splitlines():
            if "commit timing" not in line:
                continue
            f = dict(re.findall(r"(\w+)_ms=([0-9.]+)", line))
            sums["commit_s"] += float(f.get("total", 0)) / 1e3
            for k in ("usage", "convert", "mount", "record", "remove"):
                sums[f"commit_{k}_s"] += float(f.get(k, 0)) / 1e3
            sums["commit_layers"] += 1
        return sums if sums["commit_layers"] else None

    def dedupd_status(self, root=None):
        """dedupd's own counters (`ROOT/run/stats.json`, written by `dedupd run`), if any."""
        try:
            with open(os.path.join(root or self.droot, "run", "stats.json")) as f:
                return json.load(f)
        except (OSError, ValueError):
            return None

    def start_containerd(self, with_dedup):
        d = os.path.join(self.work, "containerd")
        os.makedirs(d, exist_ok=True)
        cfg = os.path.join(d, "config.toml")
        with open(cfg, "w") as f:
            f.write(containerd_config(self.croot, d, self.csock, self.dsock if with_dedup else None))
        self.containerd = self.spawn(["containerd", "--config", cfg], "containerd.log")
        wait_until(lambda: os.path.exists(self.csock) and
                   subprocess.run(["ctr", "-a", self.csock, "version"],
                                  capture_output=True).returncode == 0, "containerd")
        plugins = self.ctr("plugins", "ls")
        if with_dedup and not re.search(r"dedup\s.*\sok", plugins):
            raise Fail("containerd did not load the dedup proxy snapshotter:\n" + plugins)
        log("containerd up" + (" with the dedup proxy snapshotter" if with_dedup else ""))

    def ctr(self, *a, check=True, timeout=RUN_LIMIT_S):
        return sh("ctr", "-a", self.csock, "-n", NS, *a, check=check, timeout=timeout)

    def stop(self):
        if os.path.exists(self.csock):
            for t in self.ctr("tasks", "ls", "-q", check=False).split():
                self.ctr("tasks", "kill", "-s", "KILL", t, check=False)
            time.sleep(0.3)
            for t in self.ctr("tasks", "ls", "-q", check=False).split():
                self.ctr("tasks", "rm", "-f", t, check=False)
            for c in self.ctr("containers", "ls", "-q", check=False).split():
                self.ctr("containers", "rm", c, check=False)
        for p in reversed(self.procs):
            if p.poll() is None:
                terminate(p, 15)
        link.down()
        kill_shims(self.work)
        unmount_under(self.work)
        # With layers still mounted when dedupd stopped (a failed run), its fanotify
        # holder stays for a successor that will not come.
        self.stop_holder(2)
        if self.args.keep:
            log(f"kept {self.work}")
        else:
            shutil.rmtree(self.work, ignore_errors=True)

    # --- images ------------------------------------------------------------------------
    def prepare_images(self):
        if self.args.registry_root and not self.args.prepare_registry:
            # Images pushed beforehand (the VM): their description sits beside the storage.
            with open(os.path.join(self.args.registry_root, "images.json")) as f:
                self.info = json.load(f)
            log(f"serving {len(self.info)} pushed images from {self.args.registry_root}")
            return
        cache = os.path.join(self.args.cache, f"scale-{self.args.scale:g}")
        t0 = time.monotonic()
        self.info = images.build_layout(cache, self.args.scale, self.args.busybox, log=log)
        log(f"image layout ready in {time.monotonic() - t0:.1f} s ({cache})")
        t0 = time.monotonic()
        for name in self.info:
            sh("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{cache}:{name}",
               f"docker://127.0.0.1:{self.port}/coldstart/{name}:1")
        log(f"pushed {len(self.info)} images in {time.monotonic() - t0:.1f} s")
        if self.args.registry_root:
            with open(os.path.join(self.args.registry_root, "images.json"), "w") as f:
                json.dump(self.info, f)

    def ref(self, name, repo="coldstart", host=None):
        return f"{host or self.host}/{repo}/{name}:1"

    def publish(self, repo="coldstart", traces_from=None, names=None):
        """`dedupd publish` of every image of `repo` (from the publisher's own store,
        which converts each layer once); returns {name: summary JSON}."""
        root = os.path.join(self.work, "publisher")
        out = {}
        t0 = time.monotonic()
        for name in names or self.info:
            cmd = [self.args.dedupd, "publish", "--root", root, "--hosts-dir", self.certs]
            if traces_from:
                cmd += ["--traces-from", traces_from]
            out[name] = json.loads(sh(*cmd, self.ref(name, repo, f"127.0.0.1:{self.port}")))
        log(f"published {len(out)} images of {repo} in {time.monotonic() - t0:.1f} s")
        return out

    def push(self, repo):
        cache = os.path.join(self.args.cache, f"scale-{self.args.scale:g}")
        for name in self.info:
            sh("skopeo", "copy", "-q", "--dest-tls-verify=false", f"oci:{cache}:{name}",
               f"docker://{self.ref(name, repo, f'127.0.0.1:{self.port}')}")

    # --- one measurement ---------------------------------------------------------------
    def clean(self, snapshotter):
        refs = self.ctr("images", "ls", "-q", check=False).split()
        if refs:
            self.ctr("images", "rm", "--sync", *refs, check=False)

        def empty():
            snaps = self.ctr("snapshots", "--snapshotter", snapshotter, "ls").strip().splitlines()[1:]
            content = self.ctr("content", "ls", "-q").split()
            return not snaps and not content
        wait_until(empty, f"{snapshotter} snapshots and content to be garbage-collected")

    def run_container(self, snapshotter, name, csock=None, at_ready=None, repo="coldstart"):
        """`ctr run --rm` until the READY line; returns (ready_s, exit_s). `at_ready` is
        called when the line arrives."""
        self.seq += 1
        cid = f"cs-{snapshotter}-{name}-{self.seq}"
        cmd = ["ctr", "-a", csock or self.csock, "-n", NS, "run", "--rm", "--snapshotter", snapshotter]
        if self.args.in_vm:
            cmd.append("--no-pivot")  # the VM's root is the initramfs: pivot_root refuses it
        cmd += [self.ref(name, repo), cid]
        t0 = time.monotonic()
        p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        ready = None
        cg_read = None
        for line in p.stdout:
            if line.strip() == "READY" and ready is None:
                ready = time.monotonic() - t0
                if at_ready:
                    at_ready()
                # The program sleeps a second after READY: its cgroup still exists.
                cg_read = cgroup_read_bytes(NS, cid)
        err = p.stderr.read()
        rc = p.wait(timeout=RUN_LIMIT_S)
        done = time.monotonic() - t0
        if rc != 0 or ready is None:
            raise Fail(f"{' '.join(cmd)}: exit {rc}, ready line {'seen' if ready else 'missing'}: {err.strip()[-1000:]}")
        return ready, done, cg_read

    def holder_pid(self):
        """Pid of the fanotify front end's holder process of our dedupd, if it runs."""
        try:
            pid = int(open(os.path.join(self.droot, "fanotify", "holder.pid")).read().split()[0])
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
        except (OSError, ValueError, IndexError):
            return None
        if b"fanotify-holder" in cmdline and self.work.encode() in cmdline:
            return pid
        return None

    def stop_holder(self, limit_s):
        """Waits up to `limit_s` for the holder to exit, then kills it (it ignores
        SIGTERM by design: it outlives a daemon so that a successor can take over)."""
        end = time.monotonic() + limit_s
        while self.holder_pid() is not None and time.monotonic() < end:
            time.sleep(0.1)
        pid = self.holder_pid()
        if pid is not None:
            log(f"killing dedupd's fanotify holder (pid {pid})")
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass

    def restart_dedupd(self):
        """Stops dedupd (and its fanotify holder), deletes its cachefiles cache
        (ROOT/cache) and starts it again on the same root; the chunk store stays.

        Why, per front end:
        - cachefiles keeps the data it served in cache files that outlive the layer: a
          layer converted again (the next repetition) has the same blob ids, and its
          reads would be answered from the old cache files instead of by dedupd. Dropping
          the cache while dedupd is down (unbound) keeps every repetition cold.
        - fanotify: a fresh holder per measurement starts every repetition with no
          kept writer fds or group state from the last one. (It was first needed for a
          front-end bug, since fixed: a blob file made again under the same id got the
          holder's writer fd for the deleted inode, so readers read holes.)
        """
        terminate(self.dedupd, 30)
        self.stop_holder(10)
        shutil.rmtree(os.path.join(self.droot, "cache"), ignore_errors=True)
        if os.path.exists(self.dsock):
            os.unlink(self.dsock)
        self.start_dedupd()
        self.restarts += 1
        # containerd redials the proxy with a backoff of at most a few seconds: wait
        # until a real round trip (prepare and remove a scratch snapshot) goes through.
        def reachable():
            key = f"coldstart-probe-{self.restarts}"
            snap = ["ctr", "-a", self.csock, "-n", NS, "snapshots", "--snapshotter", "dedup"]
            ok = subprocess.run(snap + ["prepare", key], capture_output=True).returncode == 0
            return ok and subprocess.run(snap + ["rm", key], capture_output=True).returncode == 0
        wait_until(reachable, "containerd to reach the restarted dedupd")

    # --- dedup-lazy: a cold node per measurement -------------------------------------------
    def start_node(self):
        """A cold node: a fresh dedupd root (`dedupd run`, lazy pull on, prefetch as
        --lazy-prefetch says) and a fresh containerd (root, content store, state) using it."""
        self.nodes += 1
        d = os.path.join(self.work, f"node-{self.nodes}")
        n = {"dir": d, "droot": os.path.join(d, "dedupd"), "dsock": os.path.join(d, "run", "dedupd.sock"),
             "cdir": os.path.join(d, "containerd"), "procs": []}
        n["croot"] = os.path.join(n["cdir"], "root")
        n["csock"] = os.path.join(n["cdir"], "containerd.sock")
        os.makedirs(os.path.dirname(n["dsock"]), exist_ok=True)
        os.makedirs(n["cdir"], exist_ok=True)
        cfg = os.path.join(d, "dedupd.toml")
        with open(cfg, "w") as f:
            f.write(f'[registry]\nhosts_dir = "{self.certs}"\n\n'
                    f'[lazy]\nprefetch = "{self.args.lazy_prefetch}"\n')
        p = self.spawn([self.args.dedupd, "run", "--root", n["droot"], "--socket", n["dsock"],
                        "--config", cfg], "nodes-dedupd.log")
        n["procs"].append(p)
        n["dedupd"] = p
        wait_until(lambda: p.poll() is None and os.path.exists(n["dsock"]), "the node's dedupd")
        ccfg = os.path.join(n["cdir"], "config.toml")
        with open(ccfg, "w") as f:
            f.write(containerd_config(n["croot"], n["cdir"], n["csock"], n["dsock"]))
        c = self.spawn(["containerd", "--config", ccfg], "nodes-containerd.log")
        n["procs"].append(c)
        wait_until(lambda: os.path.exists(n["csock"]) and
                   subprocess.run(["ctr", "-a", n["csock"], "version"],
                                  capture_output=True).returncode == 0, "the node's containerd")
        plugins = sh("ctr", "-a", n["csock"], "plugins", "ls")
        if not re.search(r"dedup\s.*\sok", plugins):
            raise Fail("the node's containerd did not load the dedup proxy snapshotter:\n" + plugins)
        return n

    def stop_node(self, n, remove=True):
        """Stops the node's containerd (and shims) and dedupd, unmounts what they left and
        (with `remove`) deletes the node."""
        for p in reversed(n["procs"]):
            if p.poll() is None:
                terminate(p, 30)
            if p in self.procs:
                self.procs.remove(p)
        kill_shims(n["dir"])
        try:
            pid = int(open(os.path.join(n["droot"], "fanotify", "holder.pid")).read().split()[0])
            if n["dir"].encode() in open(f"/proc/{pid}/cmdline", "rb").read():
                os.kill(pid, signal.SIGKILL)
        except (OSError, ValueError, IndexError):
            pass
        unmount_under(n["dir"])
        if remove and not self.args.keep:
            shutil.rmtree(n["dir"], ignore_errors=True)

    def measure_lazy(self, group, repo="coldstart", keep_node=False):
        """dedup-lazy on a cold node: `dedupd pull` of each image of the group (metadata
        only; data on first read), then `ctr run` of each to READY. Registry bytes up to
        READY and disk after READY are taken."""
        n = self.start_node()
        try:
            drop_caches()
            out = {}
            for name in group:
                net0 = self.registry_bytes()
                t0 = time.monotonic()
                sh(self.args.dedupd, "pull", "-a", n["csock"], "-n", NS, "--hosts-dir", self.certs,
                   self.ref(name, repo))
                pull_s = time.monotonic() - t0
                # Bytes between the pulls and a run (the prefetcher keeps fetching after
                # `dedupd pull` returns, also while caches are dropped) count toward the
                # next READY.
                net_run0 = self.registry_bytes()
                out[name] = {"pull_s": pull_s, "net_bytes": net_run0 - net0}
            drop_caches()
            for name in group:
                st0 = self.dedupd_status(n["droot"])
                at = {}
                ready_s, exit_s, cg_read = self.run_container(
                    "dedup", name, csock=n["csock"], repo=repo,
                    at_ready=lambda: at.setdefault("net", self.registry_bytes()))
                st1 = self.dedupd_status(n["droot"])
                for k, field in (("bytes_written", "dedupd_filled_bytes"), ("reads", "dedupd_events")):
                    if st0 and st1 and k in st0 and k in st1:
                        out[name][field] = st1[k] - st0[k]
                out[name].update({
                    "ready_s": ready_s, "exit_s": exit_s,
                    "pull_to_ready_s": out[name]["pull_s"] + ready_s,
                    "container_read_bytes": cg_read,
                    "net_run_to_ready_bytes": at["net"] - net_run0,
                    "net_ready_bytes": out[name]["net_bytes"] + at["net"] - net_run0,
                })
                net_run0 = at["net"]
            content = disk_bytes(n["croot"])
            snap = disk_bytes(n["droot"])
            breakdown = {e: disk_bytes(os.path.join(n["droot"], e)) for e in sorted(os.listdir(n["droot"]))}
            group_out = {
                "images": out,
                "disk_content_bytes": content,
                "disk_snapshot_bytes": snap,
                "disk_total_bytes": content + snap,
                "disk_after_ready_bytes": content + snap,
                "dedupd_hwm_bytes": proc_hwm_bytes(n["dedupd"].pid),
                "dedupd_root_breakdown_bytes": breakdown,
            }
        except BaseException:
            self.stop_node(n, remove=False)
            raise
        self.stop_node(n, remove=not keep_node)
        try:
            text = open(os.path.join(self.work, "nodes-dedupd.log"), errors="replace").read()
            group_out["lazily_pulled_layers_so_far"] = text.count("layer pulled lazily")
            group_out["streamed_layers_so_far"] = text.count("layer streamed from the registry")
        except OSError:
            pass
        if keep_node:
            group_out["node_root"] = n["droot"]
        return group_out

    def measure_group(self, snapshotter, group):
        if snapshotter == "dedup-lazy":
            return self.measure_lazy(group)
        if snapshotter == "dedup-stream":
            return self.measure_lazy(group, repo=PLAIN_REPO)
        self.clean(snapshotter)
        if snapshotter == "dedup" and self.args.restart_dedupd and self.measured_dedup:
            self.restart_dedupd()
        if snapshotter == "dedup":
            self.measured_dedup = True
        dpid = self.dedupd.pid if (snapshotter == "dedup" and self.dedupd) else None
        snap_dirs = [os.path.join(self.croot, "io.containerd.snapshotter.v1.overlayfs")]
        if snapshotter == "dedup":
            snap_dirs.append(self.droot)
        # What is left with no image at all (a snapshotter that does not give space back
        # keeps it here): subtracted, so each group is charged only what its pull added.
        residual = disk_bytes(*snap_dirs)
        if dpid:
            reset_hwm(dpid)
        drop_caches()
        out = {}
        for name in group:
            net0 = self.registry_bytes()
            dio0 = proc_io(dpid, "read_bytes") if dpid else 0
            log0 = self.dedupd_log_size() if dpid else 0
            t0 = time.monotonic()
            self.ctr("image", "pull", "--plain-http", "--snapshotter", snapshotter, self.ref(name))
            pull_s = time.monotonic() - t0
            out[name] = {"pull_s": pull_s, "net_bytes": self.registry_bytes() - net0,
                         "dedupd_pull_read_bytes": delta(proc_io(dpid, "read_bytes"), dio0) if dpid else None}
            if dpid:
                out[name].update(self.commit_timing(log0) or {})
        if snapshotter == "dedup":
            # dedupd deletes unpacked trees in the background after Commit (its
            # <root>/trash): measure the steady state, not a deletion in progress.
            settle_trash(os.path.join(self.droot, "trash"))
        content = disk_bytes(os.path.join(self.croot, "io.containerd.content.v1.content"))
        snap = disk_bytes(*snap_dirs) - residual
        breakdown = {e: disk_bytes(os.path.join(self.droot, e))
                     for e in sorted(os.listdir(self.droot))} if snapshotter == "dedup" else None

        status0 = self.dedupd_status() if dpid else None
        drop_caches()
        for name in group:
            disk0 = device_read_bytes(self.sysdev)
            dio0 = proc_io(dpid, "read_bytes") if dpid else 0
            st0 = self.dedupd_status() if dpid else None
            net_run0 = self.registry_bytes()
            at = {}
            ready_s, exit_s, cg_read = self.run_container(
                snapshotter, name, at_ready=lambda: at.setdefault("net", self.registry_bytes()))
            out[name]["net_run_to_ready_bytes"] = at["net"] - net_run0
            out[name]["net_ready_bytes"] = out[name]["net_bytes"] + at["net"] - net_run0
            st1 = self.dedupd_status() if dpid else None
            for k, field in (("bytes_written", "dedupd_filled_bytes"), ("reads", "dedupd_events")):
                if st0 and st1 and k in st0 and k in st1:
                    # The program slept a second after READY: stats.json (rewritten every
                    # 200 ms) holds the start's fills.
                    out[name][field] = st1[k] - st0[k]
            out[name].update({
                "ready_s": ready_s, "exit_s": exit_s,
                "pull_to_ready_s": out[name]["pull_s"] + ready_s,
                "device_read_bytes": device_read_bytes(self.sysdev) - disk0,
                "container_read_bytes": cg_read,
                "dedupd_run_read_bytes": delta(proc_io(dpid, "read_bytes"), dio0) if dpid else None,
            })
        status1 = self.dedupd_status() if dpid else None
        if snapshotter == "dedup":
            settle_trash(os.path.join(self.droot, "trash"))
        after = disk_bytes(os.path.join(self.croot, "io.containerd.content.v1.content")) + \
            disk_bytes(*snap_dirs) - residual
        group_out = {
            "images": out,
            "disk_content_bytes": content,
            "disk_snapshot_bytes": snap,
            "disk_total_bytes": content + snap,
            "disk_after_ready_bytes": after,
            "dedupd_hwm_bytes": proc_hwm_bytes(dpid) if dpid else None,
            "dedupd_root_breakdown_bytes": breakdown,
            "residual_before_pull_bytes": residual,
        }
        if status0 and status1:
            # Chunk-store reads by the lazy front end while the group ran.
            for k in ("bytes_written", "chunks_fetched", "reads"):
                if k in status1 and k in status0:
                    group_out[f"dedupd_{k}"] = status1[k] - status0[k]
        return group_out

    # --- the whole run -----------------------------------------------------------------
    def run(self):
        a = self.args
        snapshotters = a.snapshotters
        self.start_registry()
        if a.prepare_registry:
            self.prepare_images()
            return None
        if "dedup" in snapshotters:
            self.start_dedupd()
        self.start_containerd("dedup" in snapshotters)
        self.prepare_images()
        # runc works here (cgroups, namespaces)? One hello run with overlayfs proves it.
        self.ctr("image", "pull", "--plain-http", self.ref("hello"))
        _, _, cg = self.run_container("overlayfs", "hello")
        if cg is None:
            log("note: no blkio cgroup counters for containers; container reads not measured")
        self.clean("overlayfs")
        log("runc works (hello-world on overlayfs)")
        groups = [g for g in GROUPS if all(n in a.images for n in g)]
        if "dedup-lazy" in snapshotters:
            for name, pub in self.publish().items():
                layers = pub["artifacts"][0]["layers"]
                self.info[name]["lazy_meta_bytes"] = sum(x["meta"]["bytes"] for x in layers)
                self.info[name]["lazy_data_bytes"] = sum(d["bytes"] for x in layers for d in x["data"])
        if "dedup-stream" in snapshotters:
            # The same images in a repository nothing is published to: `dedupd pull` finds
            # no artifact and streams each layer from the registry into the converter.
            t0 = time.monotonic()
            self.push(PLAIN_REPO)
            log(f"pushed {len(self.info)} images to {PLAIN_REPO} (unpublished) in {time.monotonic() - t0:.1f} s")
        t_start = time.monotonic()
        links = {}
        trace = {}
        for ln in a.links:
            if ln != "loopback":
                self.link_up(ln)
            try:
                reps = a.reps if ln == "loopback" else a.link_reps
                t0 = time.monotonic()
                samples = self.measure_reps(groups, snapshotters, reps)
                links[ln] = {"reps": reps, "samples": samples, "elapsed_s": time.monotonic() - t0}
                links[ln]["summary"] = summarize(links[ln])
                if "dedup-lazy" in snapshotters and a.trace_reps > 0:
                    trace[ln] = self.trace_phase(groups, a.trace_reps)
            finally:
                if ln != "loopback":
                    self.link_down()
        for s in snapshotters:
            if s not in NODE_SNAPSHOTTERS:
                self.clean(s)
        main = links["loopback"] if "loopback" in links else links[a.links[0]]
        results = {
            "command": a.command_line,
            "machine": machine_info(self.work),
            "scale": a.scale,
            "reps": main["reps"],
            "mode": "vm" if a.in_vm else "native",
            "dedupd_command": self.dedupd_cmd,
            "dedupd_front_end": self.front_end(),
            "dedupd_restarted_between_measurements": self.args.restart_dedupd,
            "dedupd_restarts": self.restarts,
            "images": self.info,
            "groups": [" ".join(g) for g in groups],
            "samples": main["samples"],
            "main_link": "loopback" if "loopback" in links else a.links[0],
            "links": links,
            "trace": trace,
            "lazy_prefetch": a.lazy_prefetch,
            "elapsed_s": time.monotonic() - t_start,
            "taken_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
        }
        results["summary"] = summarize(results)
        return results

    def measure_reps(self, groups, snapshotters, reps):
        samples = {s: {" ".join(g): [] for g in groups} for s in snapshotters}
        for rep in range(reps):
            # Alternate which snapshotter goes first, so drift hits both alike.
            order = snapshotters if rep % 2 == 0 else list(reversed(snapshotters))
            for g in groups:
                for s in order:
                    r = self.measure_group(s, g)
                    samples[s][" ".join(g)].append(r)
                    brief = ", ".join(f"{n}: pull {r['images'][n]['pull_s']:.2f} s ready {r['images'][n]['ready_s']:.2f} s"
                                      for n in g)
                    log(f"{self.link} rep {rep + 1}/{reps} {s:10} {brief}; disk {r['disk_total_bytes'] / 2**20:.1f} MiB")
        return samples

    def trace_phase(self, groups, reps):
        """A first start on a cold node (prefetch as --lazy-prefetch; no trace published
        yet: it records one), its traces published (`dedupd publish --traces-from` that
        node's root), then a second start of the same images on another cold node. Each
        repetition uses a repository of its own, pushed and published afresh."""
        out = []
        for rep in range(reps):
            repo = f"coldstart-trace-{self.link}-{rep + 1}"
            self.push(repo)
            self.publish(repo)
            for g in groups:
                first = self.measure_lazy(g, repo, keep_node=True)
                root = first.pop("node_root")
                pub = self.publish(repo, traces_from=root, names=g)
                shutil.rmtree(os.path.dirname(root), ignore_errors=True)
                second = self.measure_lazy(g, repo)
                traced = {n: pub[n]["artifacts"][0].get("traced_blobs") for n in g}
                out.append({"group": " ".join(g), "rep": rep, "first": first, "second": second,
                            "traced_blobs": traced})
                log(f"{self.link} trace rep {rep + 1}/{reps} " + ", ".join(
                    f"{n}: first ready {first['images'][n]['ready_s']:.2f} s (pull {first['images'][n]['pull_s']:.2f}), "
                    f"second ready {second['images'][n]['ready_s']:.2f} s (pull {second['images'][n]['pull_s']:.2f}); "
                    f"{traced[n]} traced blobs" for n in g))
        return out

    def front_end(self):
        st = self.dedupd_status()
        if st and st.get("front_end"):
            return st["front_end"]
        try:
            text = open(os.path.join(self.work, "dedupd.log"), errors="replace").read()
        except OSError:
            return None
        text = re.sub(r"\x1b\[[0-9;]*m", "", text)  # the log may carry colour codes
        m = re.search(r"front_end=(\w+)", text)
        return m.group(1) if m else None


def containerd_config(root, d, csock, dsock):
    proxy = f"""
[proxy_plugins]
  [proxy_plugins.dedup]
    type = "snapshot"
    address = "{dsock}"
""" if dsock else ""
    return f"""version = 2
root = "{root}"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{csock}"
[ttrpc]
  address = "{csock}.ttrpc"
[debug]
  address = "{d}/debug.sock"
{proxy}"""


def kill_shims(under):
    """SIGKILLs the containerd shims whose command line or environment names `under`."""
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = open(f"/proc/{pid}/cmdline", "rb").read()
            if b"containerd-shim" in cmdline and under.encode() in open(f"/proc/{pid}/environ", "rb").read() + cmdline:
                os.kill(int(pid), signal.SIGKILL)
        except OSError:
            pass


def unmount_under(path):
    mounts = [line.split()[1] for line in open("/proc/self/mounts")]
    for m in sorted((m for m in mounts if m == path or m.startswith(path + "/")), reverse=True):
        if subprocess.run(["umount", m], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", m], capture_output=True)


def median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def _medians(rows):
    keys = sorted({k for r in rows for k, v in r.items() if isinstance(v, (int, float)) and not isinstance(v, bool)})
    return {k: median([r.get(k) for r in rows]) for k in keys}


def summarize(results):
    """Medians per snapshotter per image and per group."""
    out = {}
    for s, groups in results["samples"].items():
        per_image = {}
        per_group = {}
        for gname, reps in groups.items():
            per_group[gname] = _medians(reps)
            for name in gname.split():
                per_image[name] = _medians([r["images"][name] for r in reps])
        out[s] = {"images": per_image, "groups": per_group}
    return out


def machine_info(path):
    def read(p):
        try:
            return open(p).read()
        except OSError:
            return ""
    cpu = re.search(r"model name\s*:\s*(.*)", read("/proc/cpuinfo"))
    mem = re.search(r"MemTotal:\s*(\d+)", read("/proc/meminfo"))
    virt = subprocess.run(["systemd-detect-virt"], capture_output=True, text=True).stdout.strip() \
        if shutil.which("systemd-detect-virt") else ""
    fs = subprocess.run(["stat", "-f", "-c", "%T", path], capture_output=True, text=True).stdout.strip()
    versions = {}
    for tool, cmd in (("containerd", ["containerd", "--version"]), ("runc", ["runc", "--version"])):
        try:
            versions[tool] = subprocess.run(cmd, capture_output=True, text=True).stdout.splitlines()[0]
        except (OSError, IndexError):
            versions[tool] = None
    return {
        "cpu": cpu.group(1) if cpu else None,
        "cpus": os.cpu_count(),
        "mem_gib": round(int(mem.group(1)) / 2**20, 1) if mem else None,
        "kernel": os.uname().release,
        "virtualization": virt or None,
        "scratch_fs": fs,
        "load_avg_at_end": os.getloadavg(),
        **versions,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--scale", type=float, default=1.0)
    ap.add_argument("--snapshotters", default="dedup,overlayfs",
                    help="any of overlayfs, dedup, dedup-lazy (a cold node per measurement, "
                         "`dedupd pull` of the published image), dedup-stream (a cold node per "
                         "measurement, `dedupd pull` of the unpublished image: each layer "
                         "streamed from the registry into the converter)")
    ap.add_argument("--links", default="loopback",
                    help="loopback and/or shaped links: " + ", ".join(link.SHAPES))
    ap.add_argument("--link-reps", type=int, default=None,
                    help="repetitions on a shaped link (default: --reps)")
    ap.add_argument("--trace-reps", type=int, default=1,
                    help="dedup-lazy: first/second start pairs per link (trace published between)")
    ap.add_argument("--lazy-prefetch", default="trace", choices=["none", "trace", "all"],
                    help="dedup-lazy nodes' [lazy] prefetch")
    ap.add_argument("--images", default="hello,python,ml,app-v1,app-v2")
    ap.add_argument("--dedupd", default=None, help="dedupd binary")
    ap.add_argument("--dedupd-cmd", default=None,
                    help="subcommand serving the snapshotter (default: try `run`, then `snapshotter`)")
    ap.add_argument("--busybox", default=shutil.which("busybox") or "/bin/busybox")
    ap.add_argument("--scratch", default="/var/tmp")
    ap.add_argument("--cache", default="/var/tmp/dedupd-coldstart-images")
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--results-md", default=None, help="RESULTS.md whose cold-start section to rewrite")
    ap.add_argument("--in-vm", action="store_true")
    ap.add_argument("--registry-root", default=None,
                    help="registry storage dir: with --prepare-registry, push the images into "
                         "it and stop; without, serve the images pushed there before")
    ap.add_argument("--prepare-registry", action="store_true")
    ap.add_argument("--keep", action="store_true")
    ap.add_argument("--no-restart-dedupd", dest="restart_dedupd", action="store_false",
                    help="keep one dedupd for the whole run instead of a fresh one (and an "
                         "empty cachefiles cache) before each dedup measurement")
    ap.add_argument("--command-line", default=" ".join(sys.argv))
    ap.add_argument("--report-only", metavar="RESULTS_JSON",
                    help="only redraw the chart and tables of an earlier run's results.json")
    a = ap.parse_args()
    if a.report_only:
        with open(a.report_only) as f:
            write_reports(json.load(f), os.path.dirname(os.path.abspath(a.report_only)), a.results_md)
        return
    a.snapshotters = [s for s in a.snapshotters.split(",") if s]
    a.links = [x for x in a.links.split(",") if x]
    for x in a.links:
        if x != "loopback" and x not in link.SHAPES:
            ap.error(f"unknown link {x}")
    if a.link_reps is None:
        a.link_reps = a.reps
    for x in a.snapshotters:
        if x not in ("overlayfs", "dedup") + NODE_SNAPSHOTTERS:
            ap.error(f"unknown snapshotter {x}")
    a.images = a.images.split(",")
    if not 1 <= a.reps <= 50:
        ap.error("--reps must be 1..50")
    if not 0.001 <= a.scale <= 64:
        ap.error("--scale must be 0.001..64")
    if a.prepare_registry and not a.registry_root:
        ap.error("--prepare-registry needs --registry-root")
    if any(s != "overlayfs" for s in a.snapshotters) and not a.dedupd and not a.prepare_registry:
        ap.error("--dedupd is required with the dedup snapshotter")
    if os.geteuid() != 0:
        sys.exit("coldstart: needs root (containerd, mounts, drop_caches)")
    b = Bench(a)
    try:
        results = b.run()
    except Fail as e:
        log(f"FAILED: {e}")
        b.args.keep = True
        b.stop()
        sys.exit(1)
    except BaseException:
        b.args.keep = True
        b.stop()
        raise
    b.stop()
    if results is None:
        log(f"images pushed into {a.registry_root}")
        return
    os.makedirs(a.out, exist_ok=True)
    jpath = os.path.join(a.out, "results.json")
    with open(jpath, "w") as f:
        json.dump(results, f, indent=1, sort_keys=True)
    write_reports(results, a.out, a.results_md)


def write_reports(results, out, results_md):
    svg = os.path.join(out, "chart.svg")
    with open(svg, "w") as f:
        f.write(report.svg(results))
    chart = "coldstart/results/chart.svg" if results["mode"] == "native" else "coldstart/results-vm/chart.svg"
    md = report.markdown(results, chart_path=chart)
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(md)
    if results_md:
        report.update_results_md(results_md, md, results["mode"])
    print(md)
    log(f"wrote {svg} and results.md" + (f"; updated {results_md}" if results_md else ""))


if __name__ == "__main__":
    main()
