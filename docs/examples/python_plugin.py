#!/usr/bin/env python3
"""A Pagoda hook bus plugin in Python, with nats-py only (no Pagoda SDK).

    pip install 'nats-py>=2,<3'
    NATS_URL=nats://127.0.0.1:4222 python3 docs/examples/python_plugin.py

Plugin id `py-hello`, one handler `greet` on `entry.after_create` (all entities).
Prints one line per delivery to stdout:

    [py-hello] greet entry.after_create object=entry/42 seq=7 trace=4bf92f3577b34da6a3ce929d0e0e4736

and runs until SIGTERM or Ctrl-C. The bus must run with `py-hello` in
ENABLED_PLUGINS to dispatch to it. See docs/protocol.md for the protocol and
docs/writing-a-plugin.md for a walkthrough of this file.

Environment: NATS_URL (default nats://127.0.0.1:4222), PAGODA_SUBJECT_PREFIX
(default pagoda), NATS_USER and NATS_PASSWORD (the plugin's user from
`hookbus nats-config`; its inbox prefix is then `_INBOX_<user>`, as the
generated permissions require).
"""

import asyncio
import contextlib
import json
import os
import signal
import sys
import time
import uuid
from datetime import datetime, timezone

import nats
import nats.errors
from nats.js.errors import BucketNotFoundError

try:  # Optional: continue the bus's trace when OpenTelemetry is installed
    # (pip install opentelemetry-sdk opentelemetry-exporter-otlp-proto-http);
    # without it, nothing is traced.
    from opentelemetry import trace as otel_trace
    from opentelemetry.propagate import extract as otel_extract
except ImportError:
    otel_trace = None


def init_tracing():
    """Exports spans over OTLP/HTTP when OTEL_EXPORTER_OTLP_ENDPOINT (or
    ..._TRACES_ENDPOINT) is set, as the bus does; the SDK reads the other OTEL_*
    variables (OTEL_SERVICE_NAME, OTEL_BSP_SCHEDULE_DELAY, ...). Returns the
    provider to shut down (flushing its spans), or None."""
    if otel_trace is None or not (
        os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or os.environ.get("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")
    ):
        return None
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    service = os.environ.get("OTEL_SERVICE_NAME", "py-hello")
    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter()))
    otel_trace.set_tracer_provider(provider)
    return provider

PLUGIN_ID = "py-hello"
VERSION = "1.0.0"
PREFIX = os.environ.get("PAGODA_SUBJECT_PREFIX", "pagoda")
# The registry bucket: the prefix with '.' and '-' replaced by '_', plus "_registry".
BUCKET = PREFIX.replace(".", "_").replace("-", "_") + "_registry"

# The manifest the bus reads from KV key `plugins.<id>`. Omitted handler fields
# take their defaults: entities = all, priority 100, timeout_ms 5000,
# retry_backoff_ms [100, 500, 2000, 10000].
MANIFEST = {
    "id": PLUGIN_ID,
    "name": "Python Hello",
    "version": VERSION,
    "description": "Prints every entry it is told about",
    "author": "Pagoda hook bus docs",
    "handlers": [
        {"name": "greet", "hook": "entry.after_create", "priority": 100, "timeout_ms": 5000},
    ],
}


def handler_subject(handler):
    return f"{PREFIX}.hooks.{PLUGIN_ID}.{handler}"


class Stats:
    """Per-endpoint counters, for `nats micro stats py-hello`."""

    def __init__(self, name):
        self.name, self.requests, self.errors, self.last_error, self.nanos = name, 0, 0, "", 0

    def as_dict(self):
        return {
            "name": self.name,
            "subject": handler_subject(self.name),
            "queue_group": PLUGIN_ID,
            "num_requests": self.requests,
            "num_errors": self.errors,
            "last_error": self.last_error,
            "processing_time": self.nanos,
            "average_processing_time": self.nanos // self.requests if self.requests else 0,
            "data": None,
        }


async def reply_ok(msg):
    # Success: no Nats-Service-Error header and an empty body (or {"status":"ok"}).
    await msg.respond(b"")


async def reply_error(nc, msg, code, text):
    # Failure: 400-499 = permanent (dead-lettered at once); anything else is retried
    # on the handler's retry_backoff_ms schedule, then dead-lettered.
    await nc.publish(
        msg.reply,
        b"",
        headers={"Nats-Service-Error": text, "Nats-Service-Error-Code": str(code)},
    )


def trace_id_of(headers):
    """The trace id of the W3C `traceparent` header (version-traceid-spanid-flags),
    or None: every delivery of one model change carries the same one."""
    parts = headers.get("traceparent", "").split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def handler_span(headers, handler):
    """The SERVER span of one delivery, a child of the bus's delivery attempt (the
    request's `traceparent` / `tracestate`), when OpenTelemetry is installed."""
    if otel_trace is None:
        return contextlib.nullcontext()
    return otel_trace.get_tracer(PLUGIN_ID).start_as_current_span(
        f"handle {PLUGIN_ID}.{handler}",
        context=otel_extract(headers),
        kind=otel_trace.SpanKind.SERVER,
        attributes={"messaging.system": "nats", "messaging.destination.name": handler_subject(handler)},
    )


async def greet(nc, msg, stats):
    headers = msg.headers or {}
    with handler_span(headers, "greet"):
        await greet_traced(nc, msg, stats, headers)


async def greet_traced(nc, msg, stats, headers):
    started = time.monotonic_ns()
    stats.requests += 1
    try:
        event = json.loads(msg.data)  # the CloudEvents envelope
        entry = event["data"]["entry"]  # full snapshot: id, name, attrs, ...
        entry["id"], entry["name"]
    except (ValueError, KeyError, TypeError) as e:
        stats.errors += 1
        stats.last_error = f"not an entry.after_create event: {e}"
        await reply_error(nc, msg, 400, stats.last_error)
        return
    # Deliveries are at-least-once: a handler with side effects keeps event["id"]
    # (also header Nats-Msg-Id) to skip a second delivery of the same event.
    print(
        f"[{PLUGIN_ID}] greet {headers.get('Pagoda-Hook', event.get('type'))} "
        f"object={headers.get('Pagoda-Object', event.get('subject'))} "
        f"seq={headers.get('Pagoda-Stream-Seq', '?')} trace={trace_id_of(headers) or '-'}",
        flush=True,
    )
    # A real plugin acts on `entry` here; raising would leave the bus waiting
    # until timeout_ms, so catch errors and answer with reply_error instead.
    await reply_ok(msg)
    stats.nanos += time.monotonic_ns() - started


async def serve_discovery(nc, endpoints):
    """Answers the Services API's $SRV.PING/INFO/STATS so `nats micro ls|info|stats`
    lists the plugin. Not needed by the bus, which only calls the endpoints."""
    instance = uuid.uuid4().hex
    started = datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"
    base = {"name": PLUGIN_ID, "id": instance, "version": VERSION, "metadata": {}}

    def body(verb):
        if verb == "PING":
            return {"type": "io.nats.micro.v1.ping_response", **base}
        if verb == "INFO":
            return {
                "type": "io.nats.micro.v1.info_response",
                **base,
                "description": MANIFEST["description"],
                "endpoints": [
                    {
                        "name": h["name"],
                        "subject": handler_subject(h["name"]),
                        "queue_group": PLUGIN_ID,
                        "metadata": {"hook": h["hook"]},
                    }
                    for h in MANIFEST["handlers"]
                ],
            }
        return {
            "type": "io.nats.micro.v1.stats_response",
            **base,
            "started": started,
            "endpoints": [s.as_dict() for s in endpoints.values()],
        }

    for verb in ("PING", "INFO", "STATS"):
        async def answer(msg, verb=verb):
            await msg.respond(json.dumps(body(verb)).encode())

        for subject in (f"$SRV.{verb}", f"$SRV.{verb}.{PLUGIN_ID}", f"$SRV.{verb}.{PLUGIN_ID}.{instance}"):
            await nc.subscribe(subject, cb=answer)


async def register(nc):
    """Puts the manifest in the registry bucket, waiting for the bus to create it."""
    js = nc.jetstream()
    deadline = time.monotonic() + 30
    while True:
        try:
            kv = await js.key_value(BUCKET)
            break
        except BucketNotFoundError:
            if time.monotonic() > deadline:
                raise SystemExit(f"registry bucket {BUCKET} not found: is `hookbus run` up?")
            await asyncio.sleep(0.25)
    await kv.put(f"plugins.{PLUGIN_ID}", json.dumps(MANIFEST).encode())


async def main():
    tracing = init_tracing()
    url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    options = {"name": f"pagoda-plugin {PLUGIN_ID}"}
    user = os.environ.get("NATS_USER")
    if user:
        # The generated permissions let a user read replies only on its own inbox.
        options.update(user=user, password=os.environ.get("NATS_PASSWORD", ""),
                       inbox_prefix=f"_INBOX_{user}")
    nc = await nats.connect(url, **options)
    endpoints = {"greet": Stats("greet")}

    async def on_greet(msg):
        await greet(nc, msg, endpoints["greet"])

    # 1. Serve every handler endpoint, queue group = plugin id (replicas share work).
    await nc.subscribe(handler_subject("greet"), queue=PLUGIN_ID, cb=on_greet)
    await serve_discovery(nc, endpoints)
    # 2. Make sure the server has the subscriptions before the bus sees the manifest.
    await nc.flush()
    # 3. Register: the bus dispatches to the plugin from now on.
    await register(nc)
    print(f"[{PLUGIN_ID}] registered; serving {handler_subject('greet')}", file=sys.stderr, flush=True)

    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    # Drain: stop taking requests, finish the ones in hand, close. The manifest
    # stays registered; deliveries made while no replica runs wait for it.
    try:
        await asyncio.wait_for(nc.drain(), timeout=10)
    except (asyncio.TimeoutError, nats.errors.Error):
        await nc.close()  # e.g. the server is gone: nothing left to drain
    if tracing is not None:
        tracing.shutdown()  # exports the spans still queued


if __name__ == "__main__":
    asyncio.run(main())
