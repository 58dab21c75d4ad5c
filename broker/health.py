"""Health, readiness and Prometheus metrics over HTTP: ``/healthz``, ``/readyz``, ``/metrics``.

Served on the web console's listener and, with ``[metrics] address``, on a listener of their own (so a
broker without a console is still monitored). Counters are derived from the audit log, which every broker
process and every CLI command writes: the exporter reads the rows committed since its last scrape, so
sessions started by another worker or a grant approved from the CLI are counted too. Counters start at
zero when the exporting process starts (Prometheus' ``rate()`` handles the reset). Gauges (live sessions,
pending requests) come from the database at scrape time; the recording backlog is this process's.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import shutil
import threading
from dataclasses import dataclass
from typing import Any

from broker.app import App

__all__ = ["Health", "health_routes", "start_metrics_listener", "stop_metrics_listener", "MetricsHandle",
           "serve_asgi", "stop_asgi"]

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
_SCRAPE_ROWS = 50_000  # audit rows read per scrape at most (a backlog is caught up over the next scrapes)


class Health:
    """Checks and counters for one broker process (``broker`` is the SSH ``Broker`` in this loop, if any)."""

    def __init__(self, app: App, broker: Any = None) -> None:
        self.app = app
        self.broker = broker
        self._lock = threading.Lock()
        self._cursor: int | None = None
        self.counts: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}

    # ------------------------------------------------------------------ readiness
    def ready(self) -> tuple[bool, dict[str, Any]]:
        """Run the readiness checks (blocking: run it on the store thread). Returns (ready, {check: details})."""
        cfg = self.app.config
        checks: dict[str, Any] = {}
        try:
            self.app.store.set_web_state("readyz", "ok")  # a real write: the store takes writes
            checks["store"] = {"ok": True}
        except Exception as exc:  # noqa: BLE001 - any failure means not ready; say which
            checks["store"] = {"ok": False, "error": str(exc)[:200]}
        rec = cfg.recordings_dir
        try:
            usage = shutil.disk_usage(rec)
            probe = rec / f".readyz-{os.getpid()}"
            probe.write_bytes(b"ok")
            probe.unlink()
            need = cfg.metrics.min_free_mb * 1024 * 1024
            checks["recordings"] = {"ok": usage.free >= need, "free_bytes": usage.free, "min_free_bytes": need}
        except OSError as exc:
            checks["recordings"] = {"ok": False, "error": str(exc)[:200]}
        if self.broker is not None:
            key = cfg.path(cfg.listen.host_key)
            checks["host_key"] = {"ok": key.is_file() and os.access(key, os.R_OK)}
            checks["ssh"] = {"ok": not getattr(self.broker, "stopping", False), "port": self.broker.port}
        checks["devices"] = self._device_summary()
        ok = all(c.get("ok", True) for c in checks.values())
        return ok, checks

    def _device_summary(self) -> dict[str, Any]:
        """Informational (never fails readiness): devices whose last connection attempt failed."""
        store = self.app.store
        unreachable = sorted({r["device"] for r in store.audit_rows(event="device.unreachable",
                                                                    after_id=max(0, store.last_audit_id() - 5000))
                              if r["device"]})
        return {"ok": True, "registered": len(store.list_devices()), "recently_unreachable": unreachable}

    # ------------------------------------------------------------------ metrics
    def _count(self, name: str, value: float = 1.0, **labels: str) -> None:
        key = (name, tuple(sorted(labels.items())))
        self.counts[key] = self.counts.get(key, 0.0) + value

    def _catch_up(self) -> None:
        store = self.app.store
        if self._cursor is None:
            self._cursor = store.last_audit_id()
            return
        rows = store.audit_rows(after_id=self._cursor, limit=_SCRAPE_ROWS)
        for row in rows:
            self._cursor = row["id"]
            event = row["event"]
            try:
                details = json.loads(row["details"] or "{}")
            except ValueError:
                details = {}
            self._count("medbroker_audit_events_total", event=event)
            if event == "session.start":
                self._count("medbroker_sessions_started_total", device=row["device"] or "")
            elif event == "session.refused":
                self._count("medbroker_sessions_refused_total", reason=str(details.get("reason", "?"))[:60])
            elif event == "session.end":
                self._count("medbroker_sessions_ended_total", status=str(details.get("status", "?")))
                for direction, field in (("in", "bytes_in"), ("out", "bytes_out")):
                    self._count("medbroker_relayed_bytes_total", float(details.get(field) or 0), direction=direction)
            elif event == "auth.failure":
                self._count("medbroker_auth_failures_total", reason=str(details.get("reason", "?"))[:60])
            elif event == "auth.lockout":
                self._count("medbroker_auth_lockouts_total")
            elif event == "alert.exfiltration":
                self._count("medbroker_scanner_detections_total", content=str(details.get("content", "?"))[:40])
            elif event == "notify.failed":
                self._count("medbroker_delivery_failures_total", channel=str(details.get("channel", "?")))
            elif event == "recording.failed":
                self._count("medbroker_recording_failures_total")
            elif event == "recording.archived":
                self._count("medbroker_archived_bytes_total", float(details.get("bytes") or 0))

    def render(self) -> bytes:
        """The Prometheus text exposition (blocking: run it on the store thread)."""
        from prometheus_client import CollectorRegistry, generate_latest
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            self._catch_up()
            counts = dict(self.counts)
            store = self.app.store
            live = store.list_sessions(status="live")
            pending = store.list_requests(status="pending")
            archive = store.archive_backlog() if self.app.config.archive.url else None
        backlog = 0
        if self.broker is not None:
            for session in list(self.broker.live.values()):
                backlog += getattr(session.recorder, "pending_bytes", 0) or 0
        from sessions.recwriter import writer_stats

        writes = writer_stats(reset_max=True)
        siem = {"sent": 0, "errors": 0, "dropped": 0}
        for sink in list(self.app.audit.sinks):
            for key in siem:
                siem[key] += int(getattr(sink, key, 0) or 0)
        sink_failures = dict(self.app.audit.sink_failures)
        helps = {
            "medbroker_audit_events_total": "Audit rows committed, by event",
            "medbroker_sessions_started_total": "Device sessions started",
            "medbroker_sessions_refused_total": "Device sessions refused, by reason",
            "medbroker_sessions_ended_total": "Device sessions ended, by final status",
            "medbroker_relayed_bytes_total": "Bytes relayed by ended sessions (in: vendor to device, out: device to vendor)",
            "medbroker_auth_failures_total": "Failed authentications, by reason",
            "medbroker_auth_lockouts_total": "Lockouts started",
            "medbroker_scanner_detections_total": "Patient-data detections that ended a session, by content",
            "medbroker_delivery_failures_total": "Webhook/e-mail notifications that failed, by channel",
            "medbroker_recording_failures_total": "Recordings that failed while a session ran",
            "medbroker_archived_bytes_total": "Recording bytes uploaded to the [archive] object store and verified",
        }

        class _Collector:
            def collect(self):  # noqa: ANN202 - prometheus_client protocol
                families: dict[str, CounterMetricFamily] = {}
                for name, help_text in helps.items():
                    label_names = sorted({k for (n, labels) in counts for k, _ in labels if n == name})
                    fam = CounterMetricFamily(name.removesuffix("_total"), help_text, labels=label_names)
                    families[name] = fam
                for (name, labels), value in sorted(counts.items()):
                    fam = families[name]
                    fam.add_metric([v for _, v in labels], value)
                yield from families.values()
                g = GaugeMetricFamily("medbroker_live_sessions", "Device sessions live now, by device",
                                      labels=["device"])
                by_device: dict[str, int] = {}
                for row in live:
                    by_device[row["device"]] = by_device.get(row["device"], 0) + 1
                for device, n in sorted(by_device.items()):
                    g.add_metric([device], n)
                yield g
                yield GaugeMetricFamily("medbroker_requests_pending", "Access requests waiting for a decision",
                                        value=len(pending))
                if archive is not None:
                    yield GaugeMetricFamily("medbroker_archive_waiting", "Finished sessions whose recording is not "
                                            "archived yet", value=archive["waiting"])
                    yield GaugeMetricFamily("medbroker_archive_uploads", "Multipart uploads in progress or cut off "
                                            "(resumed by the next pass)", value=archive["uploading"])
                yield GaugeMetricFamily("medbroker_recording_backlog_bytes",
                                        "Recorded bytes queued but not yet written (this process)", value=backlog)
                yield CounterMetricFamily("medbroker_recording_writes", "Batch writes of the recording writer "
                                          "(this process)", value=writes["writes"])
                yield CounterMetricFamily("medbroker_recording_write_seconds", "Time spent in recording batch "
                                          "writes (this process); divide by writes for the mean latency",
                                          value=writes["seconds"])
                yield GaugeMetricFamily("medbroker_recording_write_seconds_max", "The slowest recording batch "
                                        "write since the previous scrape (this process)", value=writes["max_seconds"])
                siem_fam = CounterMetricFamily("medbroker_siem_messages", "Audit events handed to syslog "
                                               "collectors by this process, by outcome", labels=["outcome"])
                for outcome in ("sent", "errors", "dropped"):
                    siem_fam.add_metric([outcome], siem[outcome])
                yield siem_fam
                failed = CounterMetricFamily("medbroker_audit_sink_failures", "Committed audit rows an export "
                                             "sink (jsonl, syslog, alert_sink) raised on (this process); the row "
                                             "is kept, that copy is missing", labels=["sink"])
                for name, n in sorted(sink_failures.items()):
                    failed.add_metric([name], n)
                yield failed

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector())
        return generate_latest(registry)


def health_routes(health: Health) -> list[Any]:
    """Starlette routes for /healthz, /readyz and /metrics (no sign-in: bind them where only monitoring
    reaches, or put them behind the proxy's access rules; they show counts, never names of patients)."""
    from starlette.requests import Request
    from starlette.responses import JSONResponse, PlainTextResponse, Response
    from starlette.routing import Route

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok\n")

    async def readyz(request: Request) -> Response:
        ok, checks = await health.app.store.run(health.ready)  # the store thread owns the database connection
        return JSONResponse({"ready": ok, "checks": checks}, status_code=200 if ok else 503)

    async def metrics(request: Request) -> Response:
        body = await health.app.store.run(health.render)
        return Response(body, media_type=CONTENT_TYPE)

    return [Route("/healthz", healthz), Route("/readyz", readyz), Route("/metrics", metrics)]


@dataclass
class MetricsHandle:
    server: Any
    task: asyncio.Task
    port: int


async def serve_asgi(asgi: Any, host: str, port: int, what: str, **options: Any) -> tuple[Any, asyncio.Task, int]:
    """Run ``asgi`` with uvicorn in the running loop (the broker's loop keeps SIGINT/SIGTERM); wait, bounded,
    until it listens. Shared by the web console and the metrics listener.

    :return: (server, task, bound port)
    :raises OSError: it could not listen (``what`` names it in the message)
    """
    import uvicorn

    class _Server(uvicorn.Server):
        @contextlib.contextmanager
        def capture_signals(self):  # the broker's loop owns SIGINT/SIGTERM (broker/serve.py)
            yield

    config = uvicorn.Config(asgi, host=host, port=port, lifespan="off", log_config=None, access_log=False,
                            server_header=False, proxy_headers=False, timeout_keep_alive=5, ws="none", **options)
    server = _Server(config)

    async def serve() -> None:
        try:
            await server.serve()
        except SystemExit:  # uvicorn exits when it cannot bind; raised in a task it would end the broker's loop
            raise OSError(f"the {what} could not listen on {host}:{port}") from None

    task = asyncio.get_running_loop().create_task(serve())
    for _ in range(200):  # bounded: 10 s
        if server.started or task.done():
            break
        await asyncio.sleep(0.05)
    if not server.started:
        server.should_exit = True
        with contextlib.suppress(Exception):  # its own failure (OSError) or the timeout; a cancel propagates
            await asyncio.wait_for(task, 5)
        raise OSError(f"the {what} could not listen on {host}:{port}")
    return server, task, server.servers[0].sockets[0].getsockname()[1]


async def stop_asgi(server: Any, task: asyncio.Task) -> None:
    """Stop a server from :func:`serve_asgi`: gracefully for 10 s, then by force (bounded)."""
    server.should_exit = True
    try:
        await asyncio.wait_for(task, 10)
    except asyncio.TimeoutError:
        server.force_exit = True
        with contextlib.suppress(Exception):  # a cancel of the caller propagates
            await asyncio.wait_for(task, 5)


async def start_metrics_listener(app: App, address: str, *, broker: Any = None) -> MetricsHandle:
    """Serve /healthz, /readyz and /metrics alone on ``address`` (``[metrics] address``).

    :raises OSError: the port is taken
    """
    from starlette.applications import Starlette

    from broker.config import parse_listen

    host, port = parse_listen(address)
    asgi = Starlette(routes=health_routes(Health(app, broker)))
    server, task, bound = await serve_asgi(asgi, host, port, "metrics listener", timeout_graceful_shutdown=2)
    return MetricsHandle(server, task, bound)


async def stop_metrics_listener(handle: MetricsHandle) -> None:
    await stop_asgi(handle.server, handle.task)
