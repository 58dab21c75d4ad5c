"""Summaries of a bench result and the RESULTS.md tables (absolute numbers, the product overhead over the bare
asyncssh relay, ratios to ProxyJump, targets).

``python -m bench.report bench/results/X.json`` regenerates bench/RESULTS.md from a stored result.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench.stats import percentile, spread

__all__ = ["summarize", "render_markdown", "METRICS", "main"]

# metric -> (label, unit, higher_is_better)
METRICS: dict[str, tuple[str, str, bool]] = {
    "bulk_download": ("bulk exec download (`ssh host cat`)", "MB/s", True),
    "bulk_upload": ("bulk exec upload (`ssh host 'cat > f'`)", "MB/s", True),
    "sftp_get": ("SFTP get (`sftp -b`)", "MB/s", True),
    "sftp_put": ("SFTP put (`sftp -b`)", "MB/s", True),
    "scp_get": ("scp download, wall time incl. setup", "MB/s", True),
    "scp_put": ("scp upload, wall time incl. setup", "MB/s", True),
    "keystroke_p50": ("keystroke round trip p50 (PTY, raw)", "ms", False),
    "keystroke_p99": ("keystroke round trip p99", "ms", False),
    "setup": ("session setup (`ssh host true`)", "ms", False),
}
# medbroker only: a new session's keystrokes right after a bulk download session closed, and after settling
INTERFERENCE = {"keystroke_after_bulk": "right after a bulk download closed (broker still finishing it)",
                "keystroke_after_bulk_settled": "after the broker went idle again"}
MAIN_PATHS = ("direct", "proxyjump", "proxyjump-gcm", "bare", "medbroker")
LABELS = {"direct": "direct", "proxyjump": "ProxyJump", "proxyjump-gcm": "ProxyJump AES-GCM",
          "bare": "bare asyncssh relay", "medbroker": "medbroker", "medbroker-tmpfs": "medbroker, recordings on tmpfs",
          "medbroker-2w": "medbroker, 2 worker processes"}
MiB = 1 << 20


def _values(samples: list[dict], metric: str, path: str) -> tuple[list[float], list[str], str | None]:
    """Values of one metric on one path (keystroke p50/p99: one per round), its errors and any refusal."""
    base = "keystroke" if metric.startswith("keystroke_") else metric
    vals, errors, refused = [], [], None
    for s in samples:
        if s["path"] != path or s["metric"] != base:
            continue
        if not s["ok"]:
            if s.get("refused"):
                refused = s["refused"]
            else:
                errors.append(s.get("error") or "unknown error")
        elif base == "keystroke":
            vals.append(percentile(sorted(s["extra"]["rtt_ms"]), 50 if metric.endswith("p50") else 99))
        else:
            vals.append(s["value"])
    return vals, errors, refused


def summarize(result: dict) -> dict:
    """Per metric and path: median/min/max over rounds (setup: over runs), errors, refusals, ratios, targets."""
    samples = result["samples"]
    paths = sorted({s["path"] for s in samples}, key=lambda p: list(LABELS).index(p) if p in LABELS else 99)
    table: dict = {}
    for metric in METRICS:
        row = {}
        for path in paths:
            vals, errors, refused = _values(samples, metric, path)
            sp = spread(vals)
            if sp is None and not errors and not refused:
                continue
            row[path] = {"stats": sp.as_dict() if sp else None, "errors": errors, "refused": refused}
        if row:
            table[metric] = row
    pooled = {}
    for path in paths:
        rtts = sorted(x for s in samples if s["path"] == path and s["metric"] == "keystroke" and s["ok"]
                      for x in s["extra"]["rtt_ms"])
        if rtts:
            pooled[path] = {"n": len(rtts), **{f"p{q}": percentile(rtts, q) for q in (50, 90, 99, 99.9)},
                            "max": rtts[-1]}
    noise = {}
    for path in paths:
        vals = [s["extra"]["other_cpu_pct"] for s in samples if s["path"] == path and "other_cpu_pct" in s["extra"]]
        if vals:
            noise[path] = spread(vals).as_dict()
    out = {"table": table, "keystrokes_pooled": pooled, "other_load": noise, "ratios": _ratios(table), "broker_cpu": _broker_cpu(samples)}
    out["recording"] = _recording(table)
    out["targets"] = _targets(out, result.get("concurrency", []))
    return out


def _med(table: dict, metric: str, path: str) -> float | None:
    cell = table.get(metric, {}).get(path)
    return cell["stats"]["median"] if cell and cell["stats"] else None


def _ratios(table: dict) -> dict:
    out: dict = {}
    for metric in table:
        for ref in ("proxyjump", "proxyjump-gcm", "direct", "bare"):
            r = _med(table, metric, ref)
            for path in table[metric]:
                m = _med(table, metric, path)
                if r and m is not None and path != ref:
                    out.setdefault(metric, {}).setdefault(path, {})[ref] = m / r
    return out


def _broker_cpu(samples: list[dict]) -> dict:
    """Broker CPU seconds per GiB moved, per bulk metric (medbroker paths only)."""
    out: dict = {}
    for s in samples:
        cpu = s.get("extra", {}).get("broker_cpu_s")
        if s["ok"] and cpu is not None and s["metric"] in ("bulk_download", "bulk_upload", "sftp_get", "sftp_put"):
            gib = s["extra"]["bytes"] / (1 << 30)
            out.setdefault(s["metric"], {}).setdefault(s["path"], []).append(cpu / gib)
    return {m: {p: spread(v).as_dict() for p, v in d.items()} for m, d in out.items()}


def _recording(table: dict) -> dict:
    out = {}
    for metric in ("bulk_download", "bulk_upload"):
        disk, tmpfs = _med(table, metric, "medbroker"), _med(table, metric, "medbroker-tmpfs")
        if disk and tmpfs:
            out[metric] = {"disk": disk, "tmpfs": tmpfs, "overhead_pct": (tmpfs - disk) / tmpfs * 100}
    return out


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else ("yes" if ok else "**no**")


def _targets(s: dict, concurrency: list[dict]) -> list[dict]:
    t, r = s["table"], s["ratios"]
    rows = []

    def ratio_row(label, metric, ref, need):
        cell = t.get(metric, {}).get("medbroker")
        if cell and cell["refused"] and not cell["stats"]:
            rows.append({"target": label, "measured": "not available yet (the broker refuses it; message under "
                         "Errors, refusals and notes)", "met": None})
            return
        x = r.get(metric, {}).get("medbroker", {}).get(ref)
        rows.append({"target": label, "measured": "-" if x is None else f"{x:.2f}x", "met": None if x is None else x >= need})

    ratio_row("bulk download >= 1.0x ProxyJump AES-GCM", "bulk_download", "proxyjump-gcm", 1.0)
    ratio_row("bulk upload >= 1.0x ProxyJump AES-GCM", "bulk_upload", "proxyjump-gcm", 1.0)
    ratio_row("SFTP get >= 1.0x ProxyJump", "sftp_get", "proxyjump", 1.0)
    ratio_row("SFTP put >= 1.0x ProxyJump", "sftp_put", "proxyjump", 1.0)
    for q, limit in (("p50", 0.1), ("p99", 1.0)):
        m = _med(t, f"keystroke_{q}", "medbroker")
        d, pj = _med(t, f"keystroke_{q}", "direct"), _med(t, f"keystroke_{q}", "proxyjump")
        if m is None or d is None:
            rows.append({"target": f"keystroke {q} overhead <= {limit} ms", "measured": "-", "met": None})
            continue
        text = f"+{m - d:.3f} ms vs direct" + (f", {m - pj:+.3f} ms vs ProxyJump" if pj is not None else "")
        rows.append({"target": f"keystroke {q} overhead <= {limit} ms (vs direct)", "measured": text,
                     "met": (m - d) <= limit})
    x = r.get("setup", {}).get("medbroker", {}).get("proxyjump")
    rows.append({"target": "session setup <= 0.5x ProxyJump", "measured": "-" if x is None else f"{x:.2f}x",
                 "met": None if x is None else x <= 0.5})
    big = [c for c in concurrency if c.get("path") == "medbroker" and "loadgen" in c]
    if big:
        c = max(big, key=lambda c: c["sessions"])
        lg = c["loadgen"]
        p99 = lg["rtt_ms"]["99"]
        per = c.get("broker_rss_per_session_bytes")
        rows.append({"target": f"{c['sessions']} sessions: keystroke p99 < 20 ms", "measured": f"{p99:.1f} ms",
                     "met": p99 is not None and p99 < 20})
        rows.append({"target": f"{c['sessions']} sessions: broker RSS < 1 MiB per session",
                     "measured": "-" if per is None else f"{per / MiB:.2f} MiB", "met": None if per is None else per < MiB})
        errs = lg["errors"] + (c["sessions"] - lg["connected"])
        rows.append({"target": f"{c['sessions']} sessions: zero errors", "measured": f"{errs} errors",
                     "met": errs == 0})
    for metric, rec in s["recording"].items():
        rows.append({"target": f"recording overhead <= 5 % ({METRICS[metric][0].split(' (')[0]})",
                     "measured": f"{rec['overhead_pct']:.1f} % (disk {rec['disk']:.0f} vs tmpfs {rec['tmpfs']:.0f} MB/s)",
                     "met": rec["overhead_pct"] <= 5})
    return rows


def _fmt(v: float | None, unit: str) -> str:
    if v is None:
        return "-"
    if unit == "ms":
        return f"{v:.2f}" if v < 10 else f"{v:.0f}"
    return f"{v:.0f}" if v >= 10 else f"{v:.1f}"


def _cell(cell: dict | None, unit: str) -> str:
    if cell is None:
        return "-"
    if cell["stats"]:
        st = cell["stats"]
        text = f"{_fmt(st['median'], unit)} ({_fmt(st['min'], unit)}–{_fmt(st['max'], unit)})"
    elif cell["refused"]:
        text = "not available yet"
    else:
        text = "failed"
    if cell["errors"]:
        text += f" [{len(cell['errors'])} err]"
    return text


def render_markdown(result: dict, summary: dict, json_name: str, link_dir: str = "results/") -> str:
    """The RESULTS.md text for one run (``link_dir``: where the JSON lives relative to the markdown file)."""
    m, plan = result["machine"], result["plan"]
    lines = [
        "# medbroker side-by-side benchmark: results",
        "",
        f"Generated by `python -m bench` from [`{link_dir}{json_name}`]({link_dir}{json_name}); do not edit by hand.",
        "",
        f"- run: {result['started_at']} → {result['finished_at']}, mode **{result['mode']}**, "
        f"{plan['rounds']} interleaved rounds (paths round-robin, start rotated each round)",
        f"- machine: {m['cores']} cores ({m['cpu_model']}), {(m['memory_bytes'] or 0) / (1 << 30):.0f} GiB RAM, "
        f"Linux {m['kernel']}",
        f"- versions: {m['openssh']}; Python {m['python']}; asyncssh {m['asyncssh']}; cryptography "
        f"{m['cryptography']}; uvloop {m['uvloop']}",
        f"- product: commit `{result['product']['commit'][:10]}`"
        f"{' + uncommitted changes in broker/ or sessions/' if result['product']['dirty'] else ''}; broker started with "
        f"{result['product']['launcher']} as its own process; recordings strict + encrypted (defaults)",
        _code_line(result),
        f"- payload: {plan['blob_mib']} MiB on the device's tmpfs, sha256-checked after every transfer: "
        f"{result['world'].get('payload', 'random bytes')}; "
        f"keystrokes: {plan['keys_per_round']} per path per round, {plan['key_gap_ms']} ms apart; setup: "
        f"{plan['setups_per_round']} per path per round",
        "- other load on the machine (not this bench) during the rounds: "
        + ", ".join(f"{n['other_cpu_pct']:.0f} %" for n in result.get("noise", [])) + " of one core",
        "",
        "Cells: median (min–max) over rounds; setup over all runs. MB/s = 10^6 bytes/s. Ratios are medbroker's "
        "median over the reference path's median from the same run.",
        "",
        *_overhead_section(result, summary),
        "| metric | " + " | ".join(LABELS[p] for p in MAIN_PATHS)
        + " | medbroker ÷ bare relay | medbroker ÷ ProxyJump | medbroker ÷ ProxyJump AES-GCM |",
        "|---|" + "---|" * (len(MAIN_PATHS) + 3),
    ]
    for metric, row in summary["table"].items():
        label, unit, _ = METRICS[metric]
        ratio = summary["ratios"].get(metric, {}).get("medbroker", {})
        lines.append(f"| {label} [{unit}] | " + " | ".join(_cell(row.get(p), unit) for p in MAIN_PATHS) + " | "
                     + " | ".join(_x(ratio.get(ref)) for ref in ("bare", "proxyjump", "proxyjump-gcm")) + " |")
    noise = summary.get("other_load", {})
    if noise:
        lines.append("| other load on the machine while measuring [% of a core] | "
                     + " | ".join(f"{noise[p]['median']:.0f} ({noise[p]['min']:.0f}–{noise[p]['max']:.0f})" if p in noise
                                  else "-" for p in MAIN_PATHS) + " | | | |")
    lines += ["", "## Targets", "", "| target | measured | met? |", "|---|---|---|"]
    lines += [f"| {row['target']} | {row['measured']} | {_verdict(row['met'])} |" for row in summary["targets"]]
    lines += _keystroke_section(summary) + _interference_section(result) + _concurrency_section(result) + _recording_section(result, summary)
    lines += _profile_section(result, link_dir) + _errors_section(summary, result)
    return "\n".join(lines) + "\n"


def _x(ratio: float | None) -> str:
    return "-" if ratio is None else f"{ratio:.2f}x"


def _overhead_section(result: dict, summary: dict) -> list[str]:
    """The headline: medbroker ÷ the bare asyncssh relay per metric (what the product costs over asyncssh itself),
    beside the relay's own ratio to ProxyJump AES-GCM (what the engine costs) and medbroker's ProxyJump ratios."""
    t, r = summary["table"], summary["ratios"]
    rows = []
    for metric, (label, unit, _) in METRICS.items():
        bare, med = _med(t, metric, "bare"), _med(t, metric, "medbroker")
        if bare is None:
            continue
        delta = f" {med - bare:+.2f} ms" if unit == "ms" and bare is not None and med is not None else ""
        rows.append(f"| {label} [{unit}] | {_fmt(bare, unit)} | {_fmt(med, unit)} | "
                    f"**{_x(r.get(metric, {}).get('medbroker', {}).get('bare'))}**{delta} | "
                    f"{_x(r.get(metric, {}).get('bare', {}).get('proxyjump-gcm'))} | "
                    f"{_x(r.get(metric, {}).get('medbroker', {}).get('proxyjump'))} | "
                    f"{_x(r.get(metric, {}).get('medbroker', {}).get('proxyjump-gcm'))} |")
    cpu = summary["broker_cpu"]
    for metric in ("bulk_download", "bulk_upload", "sftp_get", "sftp_put"):
        b, m = (cpu.get(metric, {}).get(p) for p in ("bare", "medbroker"))
        if b and m:
            rows.append(f"| {METRICS[metric][0].split(' (')[0]}: relay CPU during the transfer [s/GiB] | "
                        f"{b['median']:.2f} | {m['median']:.2f} | **{_x(m['median'] / b['median'])}** | | | |")
    per_key = {p: spread([s["extra"]["broker_cpu_s"] * 1e6 / len(s["extra"]["rtt_ms"]) for s in result["samples"]
                          if s["path"] == p and s["metric"] == "keystroke" and s["ok"] and "broker_cpu_s" in s["extra"]])
               for p in ("bare", "medbroker")}
    if per_key["bare"] and per_key["medbroker"]:
        b, m = per_key["bare"].median, per_key["medbroker"].median
        rows.append(f"| keystrokes, one session: relay CPU per keystroke, its setup included [µs] | {b:.0f} | {m:.0f} | "
                    f"**{_x(m / b if b else None)}** | | | |")
    by = {(c["path"], c["sessions"]): c for c in result.get("concurrency", []) if "loadgen" in c}
    for n in sorted(n for path, n in by if path == "bare" and ("medbroker", n) in by):
        bare, med = by[("bare", n)], by[("medbroker", n)]
        for q in ("50", "99"):
            b, m = bare["loadgen"]["rtt_ms"][q], med["loadgen"]["rtt_ms"][q]
            rows.append(f"| {n} sessions typing: keystroke p{q} [ms] | {_fmt(b, 'ms')} | {_fmt(m, 'ms')} | "
                        f"**{_x(m / b if b else None)}** {m - b:+.2f} ms | | | |")
        b, m = bare.get("broker_cpu_us_per_key"), med.get("broker_cpu_us_per_key")
        if b and m:
            rows.append(f"| {n} sessions typing: relay CPU per keystroke [µs] | {b:.0f} | {m:.0f} | **{_x(m / b)}** | | | |")
    if not rows:
        return []
    return ["## Product overhead: medbroker ÷ bare asyncssh relay (same run)", "",
            "The bare relay (`bench/bare_relay.py`) is asyncssh with the broker's algorithms and loop, forwarding "
            "PTY, exec and SFTP with a raw append-only recording of both directions and no policy: the ratio is "
            "what the product itself costs over asyncssh. MB/s: below 1.00x is slower than the relay; ms and µs: "
            "above 1.00x is slower. \"bare ÷ ProxyJump AES-GCM\" is what asyncssh costs next to OpenSSH.", "",
            "| metric | bare relay | medbroker | medbroker ÷ bare relay | bare ÷ ProxyJump AES-GCM | "
            "medbroker ÷ ProxyJump | medbroker ÷ ProxyJump AES-GCM |", "|---|---|---|---|---|---|---|", *rows, ""]


def _code_line(result: dict) -> str:
    """Say whether every broker process in the run ran the same product code (the working tree is shared)."""
    versions = result["product"].get("code_versions")
    if not versions:
        return "- product code during the run: not tracked (older result)"
    all_versions = {v for starts in versions.values() for _, v in starts} | {result["product"].get("code_at_end", "")}
    all_versions.discard("")
    code = {v.split("+")[-1] for v in all_versions}  # the broker/ and sessions/ content hash, without HEAD
    if len(code) <= 1:
        heads = sorted({v.split("+")[0] for v in all_versions})
        moved = f"; HEAD moved ({', '.join(heads)}) by commits outside broker/ and sessions/" if len(heads) > 1 else ""
        return f"- product code (broker/, sessions/): the same in every broker process and at the end (`{next(iter(code), '?')}`){moved}"
    starts = "; ".join(f"{name}: " + ", ".join(f"{t} `{v}`" for t, v in s) for name, s in versions.items())
    return (f"- **product code changed during the run** ({len(code)} versions of broker/ and sessions/; the working tree "
            f"is shared): broker starts {starts}; at the end `{result['product'].get('code_at_end')}`")


def _keystroke_section(summary: dict) -> list[str]:
    p = summary["keystrokes_pooled"]
    if not p:
        return []
    out = ["", "## Keystrokes, all rounds pooled", "", "| path | n | p50 | p90 | p99 | p99.9 | max |",
           "|---|---|---|---|---|---|---|"]
    for path, d in p.items():
        out.append(f"| {LABELS.get(path, path)} | {d['n']} | " + " | ".join(
            f"{d[k]:.3f}" for k in ("p50", "p90", "p99", "p99.9", "max")) + " |")
    return out


def _interference_section(result: dict) -> list[str]:
    rows = []
    for metric, title in INTERFERENCE.items():
        rtts = sorted(x for s in result["samples"] if s["metric"] == metric and s["ok"] for x in s["extra"]["rtt_ms"])
        cpu = [s["extra"].get("broker_cpu_s", 0) for s in result["samples"] if s["metric"] == metric and s["ok"]]
        if rtts:
            rows.append(f"| {title} | {len(rtts)} | " + " | ".join(
                f"{percentile(rtts, q):.2f}" for q in (50, 99, 99.9)) + f" | {rtts[-1]:.1f} | {sum(cpu) / len(cpu):.1f} |")
    if not rows:
        return []
    return ["", "## Keystrokes on medbroker while it finishes another session", "",
            "A bulk download through medbroker ends; a new session starts typing at once (first row) or after the "
            "broker is idle again (second row).", "",
            "| when | n | p50 ms | p99 ms | p99.9 ms | max ms | broker CPU s during the typing |", "|---|---|---|---|---|---|---|"] + rows


def _concurrency_section(result: dict) -> list[str]:
    rows = result.get("concurrency", [])
    if not rows:
        return []
    out = ["", "## Concurrency: N interactive sessions, one key per session every "
           f"{rows[0].get('interval_s', 0.1) * 1000:.0f} ms (asyncssh load generator in its own process)", "",
           "On the bare relay's row the broker columns are the relay process's.", "",
           "| path | sessions | open | errors | keys | p50 ms | p99 ms | p99.9 ms | max ms | broker CPU % of a core | "
           "broker CPU µs/key | broker RSS idle → loaded MiB | RSS/session KiB | broker threads | device sshd+cat CPU % | device PSS/session KiB | "
           "load gen CPU % (loop lag p99 ms) | other load % |",
           "|---|" + "---|" * 17]
    for c in rows:
        if "loadgen" not in c:
            out.append(f"| {LABELS.get(c['path'], c['path'])} | {c['sessions']} | failed: {c.get('error', '?')[:200]} |"
                       + " |" * 15)
            continue
        lg = c["loadgen"]
        rtt = lg["rtt_ms"]
        b = c.get("broker_rss_bytes")
        broker = (f"{c['broker_cpu_pct']:.0f} | {c['broker_cpu_us_per_key']:.0f} | {c['broker_rss_idle_bytes'] / MiB:.0f} → {b / MiB:.0f} | "
                  f"{c['broker_rss_per_session_bytes'] / 1024:.0f} | {c['broker_threads']}") if b else "- | - | - | - | -"
        errs = lg["errors"] + (c["sessions"] - lg["connected"])
        out.append(f"| {LABELS.get(c['path'], c['path'])} | {c['sessions']} | {lg['connected']} | {errs} | {lg['keystrokes']} | "
                   f"{rtt['50']:.2f} | {rtt['99']:.2f} | {rtt['99.9']:.2f} | {rtt['100']:.1f} | {broker} | "
                   f"{c['device_cpu_pct']:.0f} | {c['device_pss_per_session_bytes'] / 1024:.0f} | "
                   f"{c['loadgen_cpu_pct']:.0f} ({lg['loop_lag_ms']['99']:.1f}) | {c['other_cpu_pct']:.0f} |")
    return out + _workers_comparison(rows)


def _workers_comparison(rows: list[dict]) -> list[str]:
    """One process vs two worker processes (``medbroker`` vs ``medbroker-2w``) at each level both ran."""
    by = {(c["path"], c["sessions"]): c for c in rows if "loadgen" in c}
    levels = sorted(n for path, n in by if path == "medbroker-2w" and ("medbroker", n) in by)
    if not levels:
        return []
    out = ["", "One broker process vs two worker processes (`listen.workers = 2`; broker CPU, RSS and threads "
           "are summed over the supervisor and its workers):", "",
           "| sessions | p50 ms 1 → 2 | p99 ms 1 → 2 | broker CPU % 1 → 2 | broker CPU µs/key 1 → 2 | "
           "broker RSS loaded MiB 1 → 2 |", "|---|---|---|---|---|---|"]
    for n in levels:
        one, two = by[("medbroker", n)], by[("medbroker-2w", n)]
        r1, r2 = one["loadgen"]["rtt_ms"], two["loadgen"]["rtt_ms"]

        def pair(key: str, fmt: str, scale: float = 1.0) -> str:
            a, b = one.get(key), two.get(key)
            return "-" if a is None or b is None else f"{a / scale:{fmt}} → {b / scale:{fmt}}"

        out.append(f"| {n} | {r1['50']:.1f} → {r2['50']:.1f} | {r1['99']:.1f} → {r2['99']:.1f} | "
                   f"{pair('broker_cpu_pct', '.0f')} | {pair('broker_cpu_us_per_key', '.0f')} | "
                   f"{pair('broker_rss_bytes', '.0f', MiB)} |")
    return out


def _recording_section(result: dict, summary: dict) -> list[str]:
    rec = summary["recording"]
    out = ["", "## Recording overhead (same broker code, recordings dir on disk vs on tmpfs)", "",
           f"tmpfs: {result['world'].get('recordings_tmpfs', '-')}", ""]
    if not rec:
        return out + ["not measured (see the tmpfs line above)"]
    out += ["| transfer | disk MB/s | tmpfs MB/s | overhead | broker CPU s/GiB disk | tmpfs |", "|---|---|---|---|---|---|"]
    cpu = summary["broker_cpu"]
    for metric, r in rec.items():
        c = cpu.get(metric, {})
        cd, ct = c.get("medbroker"), c.get("medbroker-tmpfs")
        cpu_disk = "-" if not cd else f"{cd['median']:.2f}"
        cpu_tmpfs = "-" if not ct else f"{ct['median']:.2f}"
        out.append(f"| {METRICS[metric][0]} | {r['disk']:.0f} | {r['tmpfs']:.0f} | {r['overhead_pct']:.1f} % | "
                   f"{cpu_disk} | {cpu_tmpfs} |")
    return out


PROFILE_PARTS = {
    "bulk": "during bulk exec transfers (download and upload)",
    "sftp": "during SFTP get and put (through the broker's SFTP guard)",
    "after_session": "after each bulk session closed (work the broker does once the client has gone)",
    "interactive": "during interactive load (N sessions typing)",
    "bare_bulk": "the bare asyncssh relay during the same bulk exec transfers (the reference: asyncssh's own time)",
    "bare_sftp": "the bare asyncssh relay during the same SFTP get and put",
}


def _profile_section(result: dict, link_dir: str = "results/") -> list[str]:
    prof = result.get("profile")
    if not prof:
        return []
    out = ["", f"## Broker profile ({prof.get('tool', '?')})", ""]
    for e in prof.get("errors", []):
        out.append(f"- profiler error: {e}")
    for part, title in PROFILE_PARTS.items():
        p = prof.get(part)
        if not p or not p.get("samples"):
            continue
        out += ["", f"### {title}: {p['samples']} samples (raw stacks: `{link_dir}{p.get('raw', '?')}`)", "",
                "Samples per thread: " + ", ".join(f"{k} {v:.0f} %" for k, v in p.get("threads", {}).items()), "",
                "| self % | function (self time) | | inclusive % | function (with callees) |", "|---|---|---|---|---|"]
        selfs, incl = p.get("self_functions", [])[:15], [e for e in p.get("inclusive", []) if not _boring(e["frame"])][:15]
        for i in range(max(len(selfs), len(incl))):
            a = selfs[i] if i < len(selfs) else None
            b = incl[i] if i < len(incl) else None
            out.append(f"| {a['pct']:.1f} | `{a['frame']}` | | " if a else "| | | | ")
            out[-1] += f"{b['pct']:.1f} | `{b['frame']}` |" if b else " | |"
    return out


def _boring(frame: str) -> bool:
    """Frames every sample of a thread shares (entry points), which say nothing about cost."""
    return frame.startswith(("Thread._bootstrap", "Thread.run", "_worker (concurrent", "<module>", "main (broker/cli",
                             "Typer", "TyperGroup", "Command.", "Context.invoke", "get_callback", "BrokerGroup",
                             "_main (typer", "run (uvloop", "serve (broker", "run_server (broker", "Runner.run",
                             "_run_module_as_main", "_run_code", "main (bench/bare_relay", "serve (bench/bare_relay",
                             "_WorkItem.run"))


def _errors_section(summary: dict, result: dict) -> list[str]:
    out = []
    for metric, row in summary["table"].items():
        for path, cell in row.items():
            for e in cell["errors"][:3]:
                out.append(f"- {metric} / {path}: {e[:300]}")
            if cell["refused"]:
                out.append(f"- {metric} / {path}: not available yet — {cell['refused'][:200]}")
    notes = result["world"].get("notes", [])
    if not out and not notes:
        return ["", "## Errors and refusals", "", "none"]
    return ["", "## Errors, refusals and notes", ""] + sorted(set(out)) + [f"- note: {n}" for n in notes]


def main(argv: list[str] | None = None) -> None:
    """Regenerate bench/RESULTS.md from a stored result JSON."""
    args = sys.argv[1:] if argv is None else argv
    path = Path(args[0])
    result = json.loads(path.read_text())
    summary = summarize(result)
    target = Path(__file__).resolve().parent / "RESULTS.md"
    target.write_text(render_markdown(result, summary, path.name))
    print(f"wrote {target}")


if __name__ == "__main__":
    main()
