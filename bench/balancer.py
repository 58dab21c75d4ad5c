"""``python -m bench.balancer``: what HAProxy with PROXY protocol v2 in front of a node costs (setup, bulk).

Three paths to the same kind of node (``medbroker serve`` on 127.0.0.1, recording on, a real sshd device),
measured interleaved so that machine noise hits each alike:

- ``plain``: a node with ``listen.proxy_protocol_from = []`` (asyncssh's own listener, as before);
- ``front``: a node with ``proxy_protocol_from = ["127.0.0.1/32"]``, the client connecting directly from
  127.0.0.5 (not a balancer: the front protocol looks at the first bytes, then steps aside);
- ``haproxy``: the same node through HAProxy (send-proxy-v2; the node reads the header, then hands over).

Reuses the test helpers (tests/helpers: sshd device, HAProxy, ``medbroker serve`` processes). Prints a table;
``--json FILE`` also writes the raw samples. Numbers for docs/ha.md ("Balancer").
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO / "tests"), str(REPO)]

from frontdoor_support import Serve, prepared_home  # noqa: E402
from helpers.clients import ssh_options, write_known_hosts  # noqa: E402
from helpers.haproxy import HAProxy  # noqa: E402
from helpers.net import free_port  # noqa: E402
from helpers.sshd import SshdDevice  # noqa: E402

PROXY_CONFIG = '[listen]\nproxy_protocol_from = ["127.0.0.1/32"]\n'


def _ssh(key: str, known_hosts: Path, port: int, command: str, *, stdin=None, stdout=subprocess.DEVNULL) -> float:
    argv = ["ssh", *ssh_options(key=key, known_hosts=known_hosts, host_key_checking="yes"),
            "-o", "BindAddress=127.0.0.5", "-p", str(port), "alice@ct-01@127.0.0.1", command]
    start = time.perf_counter()
    proc = subprocess.run(argv, stdin=stdin or subprocess.DEVNULL, stdout=stdout, stderr=subprocess.PIPE,
                          timeout=300)
    took = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"ssh to port {port} failed ({proc.returncode}): {proc.stderr.decode()[-500:]}")
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--setups", type=int, default=15, help="connections per path and round")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--mib", type=int, default=128, help="bulk size per transfer")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args(argv)

    tmp = Path(tempfile.mkdtemp(prefix="medbroker-bench-balancer-"))
    device = SshdDevice(tmp / "device").start()
    started: list = []
    try:
        plain_home, keys = prepared_home(tmp / "plain", device, "")
        proxy_home, proxy_keys = prepared_home(tmp / "proxy", device, PROXY_CONFIG)
        plain_port = free_port()
        plain = Serve(plain_home, plain_port, tmp / "plain.log", "--log-level", "warning")
        started.append(plain)
        front_port = free_port()
        front = Serve(proxy_home, front_port, tmp / "front.log", "--log-level", "warning")
        started.append(front)
        haproxy = HAProxy([("node1", front_port)], check_inter="1s")
        started.append(haproxy)
        paths = {
            "plain": (plain_port, plain_home, keys),
            "front": (front_port, proxy_home, proxy_keys),
            "haproxy": (haproxy.port, proxy_home, proxy_keys),
        }
        known = {}
        for name, (port, home, k) in paths.items():
            host_key = (home / "keys" / "host_ed25519.pub").read_text()
            known[name] = write_known_hosts(tmp / f"kh-{name}", "127.0.0.1", port, host_key)
        blob = tmp / "blob"
        with open(blob, "wb") as f:
            f.write(b"\x00" * (args.mib << 20))
        samples: dict[str, dict[str, list[float]]] = {n: {"setup_s": [], "download_mbs": [], "upload_mbs": []}
                                                      for n in paths}
        for name, (port, _, k) in paths.items():  # warm up each path once
            _ssh(k["alice"].private_path, known[name], port, "true")
        for rnd in range(args.rounds):
            for name, (port, _, k) in paths.items():
                key = k["alice"].private_path
                for _ in range(args.setups):
                    samples[name]["setup_s"].append(_ssh(key, known[name], port, "true"))
                took = _ssh(key, known[name], port, f"head -c {args.mib << 20} /dev/zero")
                samples[name]["download_mbs"].append(args.mib * 1.048576 / took)
                with open(blob, "rb") as f:
                    took = _ssh(key, known[name], port, "cat > /dev/null", stdin=f)
                samples[name]["upload_mbs"].append(args.mib * 1.048576 / took)
            print(f"round {rnd + 1}/{args.rounds} done", file=sys.stderr)
        print(f"{'path':8} {'setup p50':>10} {'setup p90':>10} {'down MB/s (min-max)':>22} {'up MB/s (min-max)':>22}")
        for name, s in samples.items():
            setups = sorted(s["setup_s"])
            p90 = setups[int(0.9 * (len(setups) - 1))]
            down, up = s["download_mbs"], s["upload_mbs"]
            print(f"{name:8} {statistics.median(setups) * 1000:8.0f}ms {p90 * 1000:8.0f}ms "
                  f"{statistics.median(down):8.0f} ({min(down):.0f}-{max(down):.0f}){'':6}"
                  f"{statistics.median(up):8.0f} ({min(up):.0f}-{max(up):.0f})")
        if args.json:
            args.json.write_text(json.dumps(samples, indent=1))
        return 0
    finally:
        for thing in reversed(started):
            thing.stop()
        device.close()


if __name__ == "__main__":
    sys.exit(main())
