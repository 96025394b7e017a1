"""A shaped network link for the cold-start benchmark (standard library only).

The registry runs inside a network namespace the benchmark creates, reached over a
veth pair whose two ends are rate-limited by `tc tbf`; containerd and dedupd stay
outside and reach it through a delay relay on 127.0.0.1:

    ctr / dedupd -> 127.0.0.1:PORT (relay, + RTT/2 each way) -> veth, tbf both ends
                 -> 198.19.77.2:5000 (the registry, inside the namespace)

This machine's kernel has no `sch_netem` (nor `sch_fq`), so the round trip is added in
user space by the relay: every piece of data is forwarded half a round trip after it
arrived, in each direction, and a new connection is opened upstream one round trip
after the client's (the TCP handshake). What the relay does not model: TCP's own
reaction to the round trip (slow start and the window on the shaped hop see the veth's
~0 RTT), so a long transfer reaches the link rate sooner than over a real 20 ms path;
request/response latency, which is what lazy fetching pays per range request, is
modelled. The rate is the kernel's (tbf), on the real TCP connection over the veth.

Addresses: 198.19.77.0/30 (in the RFC 2544 benchmark range) on the veth pair only.

    python3 link.py up RATE RTT_MS      # creates the namespace, veth pair and shaping
    python3 link.py down                # removes them (also what a failed run left)
    python3 link.py relay LISTEN_PORT TARGET_HOST TARGET_PORT DELAY_MS
"""

import asyncio
import subprocess
import sys
import time

NETNS = "dedupd-coldstart"
VETH_HOST = "dcs-host"
VETH_NS = "dcs-ns"
HOST_ADDR = "198.19.77.1"
NS_ADDR = "198.19.77.2"
REGISTRY_PORT = 5000

# name -> (tbf rate, round trip in ms)
SHAPES = {
    "1gbit-2ms": ("1gbit", 2.0),
    "100mbit-20ms": ("100mbit", 20.0),
}


def _sh(*cmd, check=True):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    if check and r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def in_ns(*cmd):
    return ["ip", "netns", "exec", NETNS, *cmd]


def down():
    """Removes the namespace and the veth pair (deleting one end deletes both)."""
    _sh("ip", "link", "del", VETH_HOST, check=False)
    _sh("ip", "netns", "del", NETNS, check=False)


def up(rate, rtt_ms):
    down()
    _sh("ip", "netns", "add", NETNS)
    _sh("ip", "link", "add", VETH_HOST, "type", "veth", "peer", "name", VETH_NS)
    _sh("ip", "link", "set", VETH_NS, "netns", NETNS)
    _sh("ip", "addr", "add", f"{HOST_ADDR}/30", "dev", VETH_HOST)
    _sh("ip", "link", "set", VETH_HOST, "up")
    _sh(*in_ns("ip", "addr", "add", f"{NS_ADDR}/30", "dev", VETH_NS))
    _sh(*in_ns("ip", "link", "set", VETH_NS, "up"))
    _sh(*in_ns("ip", "link", "set", "lo", "up"))
    # tbf on each end's egress: host -> namespace (requests) and namespace -> host (the
    # registry's answers). Burst: a GSO packet (64 KiB) at 100 Mbit/s, 256 KiB at 1 Gbit/s;
    # queue: up to 100 ms at the rate.
    burst = "256kb" if rate.endswith("gbit") else "64kb"
    for prefix in ([], ["ip", "netns", "exec", NETNS]):
        dev = VETH_HOST if not prefix else VETH_NS
        _sh(*prefix, "tc", "qdisc", "add", "dev", dev, "root", "tbf", "rate", rate,
            "burst", burst, "latency", "100ms")


async def _pump(reader, writer, delay):
    """Forwards reader -> writer, each piece `delay` seconds after it arrived."""
    q = asyncio.Queue()

    async def rx():
        try:
            while True:
                data = await reader.read(1 << 18)
                q.put_nowait((time.monotonic() + delay, data))
                if not data:
                    return
        except (ConnectionError, OSError):
            q.put_nowait((time.monotonic(), b""))

    async def tx():
        try:
            while True:
                due, data = await q.get()
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                writer.write(data)
                await writer.drain()
        except (ConnectionError, OSError):
            pass

    await asyncio.gather(rx(), tx())


async def _serve(listen_port, host, port, delay):
    async def handle(cr, cw):
        await asyncio.sleep(2 * delay)  # the handshake's round trip
        try:
            ur, uw = await asyncio.open_connection(host, port)
        except OSError:
            cw.close()
            return
        try:
            await asyncio.gather(_pump(cr, uw, delay), _pump(ur, cw, delay))
        finally:
            cw.close()
            uw.close()

    server = await asyncio.start_server(handle, "127.0.0.1", listen_port, backlog=256)
    async with server:
        await server.serve_forever()


def main():
    cmd = sys.argv[1] if len(sys.argv) > 1 else ""
    if cmd == "up":
        up(sys.argv[2], float(sys.argv[3]))
    elif cmd == "down":
        down()
    elif cmd == "relay":
        listen, host, port, delay_ms = sys.argv[2:6]
        asyncio.run(_serve(int(listen), host, int(port), float(delay_ms) / 2000.0))
    else:
        sys.exit(__doc__)


if __name__ == "__main__":
    main()
