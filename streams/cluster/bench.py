"""What the cluster gateway's websocket relay adds per frame, without the engine's noise.

    python -m duplex_agent.streams.cluster.bench [--clients 1,8,16,40] [--duration 10]

An echo server stands in for a replica (it answers each message at once). N clients send a
1.2 kB binary message every 80 ms (an Opus frame's size and pace) and time each echo, straight to
the echo server and through the gateway's relay (`cluster.gateway.Gateway.handle_websocket`, the code
every `/api/chat` frame passes). The difference is the relay's cost per frame, both directions.
The echo server, the gateway and the clients run in three processes, as they would. Results go to
bench/results/gateway-relay-cpu-STAMP.json; the end-to-end comparison with the engine in the loop
is the `loadtest` command against `serve` and `cluster` (bench/results/README.md).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import time
from pathlib import Path

FRAME_BYTES = 1200
FRAME_S = 0.08


def _serve_forever(handler, port_out) -> None:
    """Serve `handler` at /api/chat on a free local port (put on `port_out`) until killed."""
    from aiohttp import web

    async def main():
        app = web.Application()
        app.router.add_get("/api/chat", handler)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        port_out.put(runner.addresses[0][1])
        await asyncio.Event().wait()

    asyncio.run(main())


def _echo_server(port_out) -> None:
    from aiohttp import web

    async def echo(request):
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        await ws.send_bytes(b"\x00")  # a handshake, as Moshi's
        async for msg in ws:
            await ws.send_bytes(msg.data)
        return ws

    _serve_forever(echo, port_out)


def _gateway(upstream: str, port_out) -> None:
    """The real relay in front of the echo server; only the Serve hold is left out (it is taken
    once per conversation, not per frame)."""
    import aiohttp

    from duplex_agent.streams.cluster.gateway import Gateway
    from duplex_agent.streams.security import Policy

    class EchoHold:
        replica, url, ticket = "echo", upstream, "-"

        def release(self):
            pass

    async def reserve_slot(client, transport):
        return EchoHold()

    gateway = Gateway(None, None, 1000, Policy(idle_timeout_s=None), "token")
    gateway.reserve_slot = reserve_slot

    async def relay(request):
        if gateway.session is None:  # made on the serving loop
            gateway.session = aiohttp.ClientSession()
        return await gateway.handle_websocket(request)

    _serve_forever(relay, port_out)


async def _client(session, url: str, duration_s: float, rtts: list[float]) -> None:
    payload = b"\x01" + os.urandom(FRAME_BYTES - 1)
    async with session.ws_connect(url) as ws:
        assert (await ws.receive_bytes()) == b"\x00"
        t0 = time.monotonic()
        i = 0
        while t0 + i * FRAME_S < t0 + duration_s:
            await asyncio.sleep(max(0.0, t0 + i * FRAME_S - time.monotonic()))
            sent = time.monotonic()
            await ws.send_bytes(payload)
            await ws.receive_bytes()
            rtts.append((time.monotonic() - sent) * 1000)
            i += 1


async def _run(url: str, clients: int, duration_s: float) -> dict:
    import aiohttp

    from duplex_agent.streams.loadtest import percentiles
    rtts: list[float] = []
    async with aiohttp.ClientSession() as session:
        await asyncio.gather(*(_client(session, url, duration_s, rtts) for _ in range(clients)))
    return percentiles(rtts)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", default="1,8,16,40")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--out", default=str(Path(__file__).resolve().parents[2] / "bench" / "results"))
    args = parser.parse_args()
    ctx = multiprocessing.get_context("spawn")
    ports = ctx.Queue()
    echo = ctx.Process(target=_echo_server, args=(ports,), daemon=True)
    echo.start()
    echo_url = f"http://127.0.0.1:{ports.get(timeout=30)}"
    gateway = ctx.Process(target=_gateway, args=(echo_url, ports), daemon=True)
    gateway.start()
    gateway_port = ports.get(timeout=60)
    rows = []
    try:
        for n in (int(c) for c in args.clients.split(",")):
            direct = asyncio.run(_run(f"ws{echo_url[4:]}/api/chat", n, args.duration))
            relayed = asyncio.run(_run(f"ws://127.0.0.1:{gateway_port}/api/chat", n,
                                       args.duration))
            row = {"clients": n, "direct_rtt_ms": direct, "relayed_rtt_ms": relayed,
                   "added_ms_p50": round(relayed["p50"] - direct["p50"], 2),
                   "added_ms_p99": round(relayed["p99"] - direct["p99"], 2)}
            rows.append(row)
            print(f"{n:3d} clients: round trip p50 {direct['p50']} -> {relayed['p50']} ms, "
                  f"p99 {direct['p99']} -> {relayed['p99']} ms", flush=True)
    finally:
        gateway.terminate()
        echo.terminate()
    out = Path(args.out) / f"gateway-relay-cpu-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps({
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores, no GPU "
                   "(shared with other work while measured)",
        "frame_bytes": FRAME_BYTES, "frame_s": FRAME_S, "duration_s": args.duration,
        "rows": rows}, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
