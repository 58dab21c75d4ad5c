"""``python -m bench.ablation``: where medbroker's own cost goes, measured by switching its layers off one at a time.

A py-spy profile samples where the broker's thread *is*; it cannot say what a layer costs once caches, the
writer thread and 50 interleaved sessions are counted. This tool measures it the direct way: the same broker
(bench/broker.toml, a real sshd device, stock clients) is restarted with one layer replaced by a no-op, and
the same load runs again next to the bare asyncssh relay (bench/bare_relay.py):

* **typing**: N sessions (bench/loadgen.py) type one key every 100 ms; broker CPU per keystroke;
* **exec download / upload**: ``ssh host cat LOG`` and ``cat > F`` of the bench payload; MB/s and CPU s/GiB;
* **SFTP get / put** (``sftp_get``, ``sftp_put``): ``sftp -b`` of the random payload; MB/s and CPU s/GiB.

Layers (each a monkeypatch applied in the broker process before it starts, see :func:`patch`):

=========  ============================================================================================
``scan``   the deep output scanner (sessions/decoders.py ``DeepScanner.feed``): patient-data detection
``judge``  the stream judge (sessions/streams.py ``StreamJudge.feed``): file-transfer protocols, both ways
``upload`` the upload guard on stdin (sessions/upload_check.py ``StreamGuard.feed``): protected paths
``screen`` the shell guard's screen model (sessions/shell_lines.py ``LiveScreen``): command lines
``rec``    the recording's data frames (sessions/recwriter.py ``append_data``): nothing is written
``filescan`` the signature scanner (sessions/content.py ``OutputScanner.feed``): SFTP reads, per file
``filehash`` the SFTP guard's per-file SHA-256 (sessions/sftp.py ``_Handle.account``; the counts stay)
``hyperscan`` not a layer: the anchor search of binary streams runs in pure Python (sessions/anchors.py)
``native`` not a layer: the deep scanner's byte scans run in pure Python (sessions/fastscan.py)
=========  ============================================================================================

``all`` is every layer at once (``hyperscan`` and ``native`` aside): what the relay itself (channels, acknowledgment
window, policy glue) costs over the bare relay. A layer switched off breaks a guarantee, so this runs only here, on a bench broker that serves
nothing else; the product has no such switch. Results: a Markdown table on stdout and, with ``--save``, in
``bench/results/<stamp>-ablation.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

__all__ = ["LAYERS", "patch", "main"]

LAYERS = ("scan", "judge", "upload", "screen", "rec", "filescan", "filehash", "hyperscan", "native")
ENV = "MEDBROKER_BENCH_ABLATE"
_LAUNCH = ("import sys, bench.ablation as a; a.patch_from_env(); from broker.cli import main; "
           "sys.argv[0] = 'medbroker'; main()")


def patch(parts: set[str]) -> None:
    """Replace the named layers (:data:`LAYERS`) with no-ops in this process."""
    unknown = parts - set(LAYERS)
    if unknown:
        raise SystemExit(f"unknown layer(s) {sorted(unknown)}; layers: {', '.join(LAYERS)}")
    if "scan" in parts:
        import sessions.decoders as decoders

        decoders.DeepScanner.feed = lambda self, chunk: None  # type: ignore[method-assign]
        decoders.DeepScanner.flush = lambda self: None  # type: ignore[method-assign]
    if "judge" in parts:
        import sessions.streams as streams

        streams.StreamJudge.feed = lambda self, direction, data: None  # type: ignore[method-assign]
    if "upload" in parts:
        import sessions.upload_check as upload_check

        upload_check.StreamGuard.feed = lambda self, data: None  # type: ignore[method-assign]
    if "screen" in parts:
        import sessions.shell_lines as shell_lines

        for name in ("output", "keystroke", "settle"):
            setattr(shell_lines.LiveScreen, name, lambda self, *a, **k: None)
    if "rec" in parts:
        import sessions.recwriter as recwriter

        recwriter.RecordingWriter.append_data = lambda self, channel, kind, data: 1  # type: ignore[method-assign]
    if "filescan" in parts:
        import sessions.content as content

        content.OutputScanner.feed = lambda self, chunk: None  # type: ignore[method-assign]
    if "filehash" in parts:
        import sessions.sftp as sftp

        class NoHash:
            def update(self, data: bytes) -> None:
                pass

            def hexdigest(self) -> str:
                return "not hashed (bench/ablation.py)"

        account = sftp._Handle.account

        def unhashed(self: Any, direction: str, offset: int, data: bytes) -> None:
            self.hashes[direction] = NoHash()  # the counts and offsets stay the product's own
            account(self, direction, offset, data)

        sftp._Handle.account = unhashed  # type: ignore[method-assign]
    if "hyperscan" in parts:
        from sessions import anchors

        anchors.set_engine("python")
    if "native" in parts:
        from sessions import fastscan

        fastscan.set_native(False)


def patch_from_env() -> None:
    """The broker launcher's hook: apply :func:`patch` to the layers named in ``$MEDBROKER_BENCH_ABLATE``."""
    value = os.environ.get(ENV, "")
    if value:
        patch(set(LAYERS) - {"hyperscan", "native"} if value == "all" else {p for p in value.split(",") if p})


def _variants(arg: str) -> list[str]:
    out = [v.strip() for v in arg.split(";") if v.strip()]
    for v in out:
        if v not in ("none", "all"):
            unknown = set(v.split(",")) - set(LAYERS)
            if unknown:
                raise SystemExit(f"unknown layer(s) {sorted(unknown)}; layers: {', '.join(LAYERS)}, all, none")
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.ablation", description=__doc__.splitlines()[0])
    p.add_argument("--variants", default="none;scan;judge;upload;screen;rec;all",
                   help="';'-separated: none, all, or ','-joined layers (%(default)s)")
    p.add_argument("--sessions", type=int, default=50, help="typing sessions (%(default)s)")
    p.add_argument("--seconds", type=float, default=10, help="seconds of typing per variant and round (%(default)s)")
    p.add_argument("--mib", type=int, default=64, help="exec payload in MiB (%(default)s)")
    p.add_argument("--rounds", type=int, default=2, help="rounds; the variants rotate their order (%(default)s)")
    p.add_argument("--phases", default="typing,download,upload",
                   help="of typing,download,upload,sftp_get,sftp_put (%(default)s)")
    p.add_argument("--save", action="store_true", help="write bench/results/<stamp>-ablation.{json,md}")
    a = p.parse_args(argv)
    variants = _variants(a.variants)
    phases = [x for x in a.phases.split(",") if x]
    if set(phases) - {"typing", "download", "upload", "sftp_get", "sftp_put"} or a.rounds < 1 \
            or not 1 <= a.sessions <= 1000 or not 1 <= a.seconds <= 600 or not 1 <= a.mib <= 4096:
        p.error("phases: typing,download,upload,sftp_get,sftp_put; rounds >= 1; sessions 1..1000; seconds 1..600; "
                "mib 1..4096")

    from bench import clients
    from bench.concurrency import run_level
    from bench.run import QUICK, _measure, _product_state
    from bench.world import BenchWorld
    from dataclasses import replace

    plan = replace(QUICK, blob_mib=a.mib)
    rows: dict[str, dict[str, list[float]]] = {}
    started = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    world = BenchWorld(blob_mib=a.mib, log=lambda m: print(m, file=sys.stderr)).start()
    broker = world.brokers["medbroker"]
    broker.launcher = [sys.executable, "-c", _LAUNCH]
    errors: list[str] = []
    try:
        for rnd in range(a.rounds):
            order = ["bare"] + variants[rnd % len(variants):] + variants[:rnd % len(variants)]
            for v in order:
                os.environ[ENV] = "" if v in ("bare", "none") else v
                path = "bare" if v == "bare" else "medbroker"
                if path == "medbroker":
                    broker.restart()
                    clients.setup_time(world, path, 60)  # one-off costs (imports, first recording) not billed
                got = rows.setdefault(v, {})
                if "typing" in phases:
                    out = run_level(world, path, a.sessions, a.seconds, 0.1, log=lambda m: None, restart=False)
                    if out.get("error"):
                        errors.append(f"{v} typing: {out['error']}")
                    else:
                        got.setdefault("typing_us_per_key", []).append(out["broker_cpu_us_per_key"])
                        got.setdefault("typing_p99_ms", []).append(out["loadgen"]["rtt_ms"]["99"])
                for phase, metric in (("download", "bulk_download"), ("upload", "bulk_upload"),
                                      ("sftp_get", "sftp_get"), ("sftp_put", "sftp_put")):
                    if phase not in phases:
                        continue
                    rec = _measure(world, plan, metric, path, rnd)
                    if not rec["ok"]:
                        errors.append(f"{v} {phase}: {rec['error'] or rec['refused']}")
                        continue
                    got.setdefault(f"{phase}_mb_s", []).append(rec["value"])
                    cpu = rec["extra"].get("broker_cpu_s")
                    if cpu is not None:
                        got.setdefault(f"{phase}_cpu_s_gib", []).append(cpu / (world.blob_size / 2**30))
                print(f"round {rnd + 1} {v}: " + ", ".join(f"{k} {xs[-1]:.1f}" for k, xs in got.items()),
                      file=sys.stderr, flush=True)
    finally:
        os.environ.pop(ENV, None)
        world.close()
    md = _table(rows, a, errors)
    print(md)
    if a.save:
        stamp = time.strftime("%Y-%m-%dT%H%M%S")
        out_dir = Path(__file__).resolve().parent / "results"
        (out_dir / f"{stamp}-ablation.md").write_text(md)
        (out_dir / f"{stamp}-ablation.json").write_text(json.dumps({
            "started_at": started, "args": vars(a), "product": _product_state(), "rows": rows, "errors": errors},
            indent=1))
    return 1 if errors else 0


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2] if len(s) % 2 else (s[len(s) // 2 - 1] + s[len(s) // 2]) / 2


def _table(rows: dict[str, dict[str, list[float]]], a: argparse.Namespace, errors: list[str]) -> str:
    cols = [("typing_us_per_key", "typing: CPU µs/key"), ("typing_p99_ms", "typing p99 ms"),
            ("download_mb_s", "exec download MB/s"), ("download_cpu_s_gib", "download CPU s/GiB"),
            ("upload_mb_s", "exec upload MB/s"), ("upload_cpu_s_gib", "upload CPU s/GiB"),
            ("sftp_get_mb_s", "SFTP get MB/s"), ("sftp_get_cpu_s_gib", "get CPU s/GiB"),
            ("sftp_put_mb_s", "SFTP put MB/s"), ("sftp_put_cpu_s_gib", "put CPU s/GiB")]
    cols = [c for c in cols if any(c[0] in r for r in rows.values())]
    full = rows.get("none", {})
    lines = ["# medbroker with layers switched off (bench/ablation.py)", "",
             ", ".join(([f"{a.sessions} typing sessions for {a.seconds:.0f} s"] if "typing" in a.phases else [])
                       + ([f"payload {a.mib} MiB"] if a.phases.replace("typing", "").strip(",") else [])
                       + [f"{a.rounds} rounds"]) + "; medians; in brackets: the change against medbroker with every "
             "layer on (`none`).", "",
             "| variant | " + " | ".join(label for _, label in cols) + " |",
             "|---|" + "---|" * len(cols)]
    for v, got in rows.items():
        cells = []
        for key, _ in cols:
            if key not in got:
                cells.append("–")
                continue
            m = _median(got[key])
            base = _median(full[key]) if key in full and v != "none" else None
            cells.append(f"{m:.1f}" + (f" ({m - base:+.1f})" if base is not None else ""))
        name = {"bare": "bare asyncssh relay", "none": "medbroker, every layer on",
                "all": "medbroker, every layer off",
                "hyperscan": "medbroker, binary streams searched without Hyperscan",
                "native": "medbroker, the deep scanner's byte scans in pure Python"}.get(v, f"medbroker without `{v}`")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    if errors:
        lines += ["", "Errors:", *[f"- {e}" for e in errors]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
