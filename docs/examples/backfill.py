#!/usr/bin/env python3
"""Backfill in Python with nats-py only: the latest event of every object, then live.

    pip install 'nats-py>=2,<3'
    NATS_URL=nats://127.0.0.1:4222 python3 docs/examples/backfill.py

The raw protocol of docs/protocol.md ("Backfill"), for a consumer that joins
late and bootstraps from the latest state of every object instead of the whole
history:

1. an ephemeral consumer on the events stream with deliver policy
   `last_per_subject` (the last event of every subject: per object, action and
   entity);
2. *then* the bound B = the stream's last sequence;
3. read up to B (stop at a sequence >= B, or when the server says nothing is
   pending); keep, per object (the `Pagoda-Object` header), the highest sequence;
4. handle those in stream order; everything up to B is done;
5. follow live from B + 1 (deliver policy `by_start_sequence`).

Prints, in stream order, one line per object, then the bound, then one line
per new event, and runs until SIGTERM or Ctrl-C:

    latest 12 entry/3 entry.after_update
    latest 14 entry/2 entry.after_delete
    through 14
    live 15 entry/3 entry.after_update

Environment: NATS_URL (default nats://127.0.0.1:4222), PAGODA_SUBJECT_PREFIX
(default pagoda), NATS_USER and NATS_PASSWORD (a plugin's user from
`hookbus nats-config`: plugins may create consumers on the events stream; its
inbox prefix is then `_INBOX_<user>`).
"""

import asyncio
import os
import signal

import nats
import nats.errors
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy, ReplayPolicy

PREFIX = os.environ.get("PAGODA_SUBJECT_PREFIX", "pagoda")
# The events stream: the prefix in upper case with '.' and '-' as '_', plus "_EVENTS".
STREAM = PREFIX.upper().replace(".", "_").replace("-", "_") + "_EVENTS"
# Every event; narrow it like a replay (docs/protocol.md, "Filters"), e.g.
# f"{PREFIX}.events.*.*.customer.>" for one entity.
FILTER = f"{PREFIX}.events.>"
BATCH = 256


def event_line(kind, msg):
    headers = msg.headers or {}
    return f"{kind} {msg.metadata.sequence.stream} {headers.get('Pagoda-Object')} {headers.get('Pagoda-Hook')}"


async def ephemeral(js, **config):
    """An ephemeral pull consumer without acks, removed by the server when unused."""
    info = await js.add_consumer(STREAM, ConsumerConfig(
        filter_subject=FILTER,
        ack_policy=AckPolicy.NONE,
        replay_policy=ReplayPolicy.INSTANT,
        inactive_threshold=30.0,
        mem_storage=True,
        **config,
    ))
    return info.name, await js.pull_subscribe_bind(durable=info.name, stream=STREAM)


async def fetch(sub):
    try:
        return await sub.fetch(BATCH, timeout=1)
    except nats.errors.TimeoutError:
        return []


async def latest_per_object(js):
    """Steps 1-4: the latest event of every object up to B, in stream order, and B."""
    name, sub = await ephemeral(js, deliver_policy=DeliverPolicy.LAST_PER_SUBJECT)
    # The bound is read after the consumer exists: an event stored in between is
    # then delivered by the consumer (it goes on with new events) and counted.
    through = (await js.stream_info(STREAM)).state.last_seq
    pending = (await js.consumer_info(STREAM, name)).num_pending
    latest = {}  # object -> its message with the highest sequence so far
    done = pending == 0
    while not done:
        for msg in await fetch(sub):
            seq = msg.metadata.sequence.stream
            if seq > through:  # stored after B: comes live
                done = True
                break
            latest[(msg.headers or {}).get("Pagoda-Object") or f"seq/{seq}"] = msg
            if seq >= through or msg.metadata.num_pending == 0:
                done = True
                break
    await sub.unsubscribe()
    await js.delete_consumer(STREAM, name)
    return sorted(latest.values(), key=lambda m: m.metadata.sequence.stream), through


async def main():
    url = os.environ.get("NATS_URL", "nats://127.0.0.1:4222")
    options = {"name": "pagoda backfill example"}
    user = os.environ.get("NATS_USER")
    if user:
        # The generated permissions let a user read replies only on its own inbox.
        options.update(user=user, password=os.environ.get("NATS_PASSWORD", ""),
                       inbox_prefix=f"_INBOX_{user}")
    nc = await nats.connect(url, **options)
    js = nc.jetstream()

    events, through = await latest_per_object(js)
    for msg in events:
        print(event_line("latest", msg), flush=True)
    print(f"through {through}", flush=True)

    # Step 5: every event after B, as it is stored.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    _, live = await ephemeral(js, deliver_policy=DeliverPolicy.BY_START_SEQUENCE,
                              opt_start_seq=through + 1)
    while not stop.is_set():
        for msg in await fetch(live):
            print(event_line("live", msg), flush=True)
    await nc.drain()


if __name__ == "__main__":
    asyncio.run(main())
