"""The `loadtest` command: N websocket clients hold real-time conversations with a server.

    python run_agent.py loadtest --url ws://127.0.0.1:8998/api/chat --clients 8 --duration 30 \\
        [--wav speech.wav] [--json report.json] [--token TOKEN] [--cafile ca.pem] [--ramp S]

Each client speaks Moshi's protocol (streams/moshi_ws.py): after the handshake it sends one 80 ms
Ogg/Opus frame of speech every 80 ms, on an absolute schedule so it does not drift, looping the
recording (--wav, any format and rate, resampled to 24 kHz; by default a sentence from espeak-ng),
for --duration seconds; then it waits up to --drain seconds for the outputs still due.

The server answers every input frame with one output frame, so output frame k belongs to input
frame k (matched by count): a frame's latency is the receive time of output frame k minus the send
time of input frame k, network, Opus and queueing included. Reported per conversation and pooled:
frames sent and received, latency percentiles, text pieces, errors (0x05 messages, refusals,
abnormal closes) and, when the server's /metrics answers, how its counters of dropped, late and
skipped frames and refusals changed during the run.

With `--protocol realtime` (and `--url ws://HOST:PORT/v1/realtime`) each client speaks the
OpenAI Realtime protocol instead (streams/realtime/session.py): one 80 ms pcm16 `input_audio_buffer.append`
every 80 ms. The agent's audio then comes only while it speaks (one response per utterance), so
output frames cannot be matched to input frames by count: the latency figure is the server's own,
input frame complete -> its `response.output_audio.delta` sent, read from /api/stats after the run
(start a fresh server for each run: the figure covers the server's last 20000 deltas).

With `--protocol twilio` (and `--url http://HOST:PORT/twilio/voice --twilio-auth-token TOKEN`,
where the server's `--public-url` is http://HOST:PORT) each client places a phone call as Twilio
does (streams/phone/): a webhook signed with the token, then the media stream its TwiML names,
speaking Twilio's messages: 20 ms of μ-law 8 kHz every 20 ms (four per 80 ms frame), marks echoed
once the audio before them has played (a real-time playback clock per call). Output frame k is
the k-th 80 ms of μ-law received, matched by count as for Moshi; its latency is the arrival of its
first sample (the server paces each frame over 80 ms, as a phone plays it) minus the send time of
input frame k's last 20 ms. The server's playback lag (mark sent -> echoed) is read from /api/stats.

The functions (`load_speech`, `run_load`, `MoshiClient`, `RealtimeClient`, `TwilioClient`) are
used by the tests as well.
"""
from __future__ import annotations

import asyncio
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from urllib.parse import urlsplit, urlunsplit

DEFAULT_SENTENCE = ("Hello, who are you? Tell me about the weather in Paris today, and what I "
                    "should wear for a walk along the river this afternoon.")
CONNECT_TIMEOUT_S = 10.0


# -- one client ------------------------------------------------------------------------------------

@dataclass
class ClientResult:
    client: int
    sent_frames: int = 0
    received_frames: int = 0
    text_pieces: int = 0
    handshake_ms: float | None = None
    latencies_ms: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def summary(self) -> dict:
        out = asdict(self)
        out["latency_ms"] = percentiles(out.pop("latencies_ms"))
        return out


class MoshiClient:
    """One conversation over Moshi's websocket protocol. Sends 80 ms frames and times the output
    frame that answers each; records text pieces and errors."""

    def __init__(self, ws, result: ClientResult):
        import sphn

        from duplex_agent.agent.config import SAMPLE_RATE
        self.ws, self.result = ws, result
        self._writer = sphn.OpusStreamWriter(SAMPLE_RATE)
        self._reader = sphn.OpusStreamReader(SAMPLE_RATE)
        self._sent_at: list[float] = []  # time.monotonic() of each input frame's send
        self._received_samples = 0
        self.handshake = asyncio.Event()
        self._task = asyncio.create_task(self._receive())

    @classmethod
    async def connect(cls, session, url: str, result: ClientResult | None = None, token=None,
                      ssl=None, timeout: float = CONNECT_TIMEOUT_S, **query) -> "MoshiClient":
        """Open the socket and wait for the handshake. Raises ConnectionError with the server's
        message if it refuses (0x05 instead of the handshake, or an HTTP error)."""
        import aiohttp
        headers = {"Authorization": f"Bearer {token}"} if token else None
        t0 = time.monotonic()
        try:
            ws = await session.ws_connect(url, params=query or None, headers=headers, ssl=ssl)
        except aiohttp.WSServerHandshakeError as e:
            raise ConnectionError(f"HTTP {e.status}: {e.message}") from None
        client = cls(ws, result or ClientResult(0))
        waiter = asyncio.create_task(client.handshake.wait())
        done, _ = await asyncio.wait([waiter, client._task], timeout=timeout,
                                     return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if not client.handshake.is_set():
            await client.close()
            if not done:
                raise ConnectionError(f"no handshake within {timeout:g} s")
            raise ConnectionError("; ".join(client.result.errors) or "closed before the handshake")
        client.result.handshake_ms = round((time.monotonic() - t0) * 1000, 1)
        return client

    @property
    def closed(self) -> bool:
        return self._task.done()

    async def send_frame(self, pcm) -> None:
        """One 80 ms frame (1920 float32 samples at 24 kHz) as one Ogg/Opus message."""
        message = b"\x01" + self._writer.append_pcm(pcm)
        self._sent_at.append(time.monotonic())
        self.result.sent_frames += 1
        await self.ws.send_bytes(message)

    async def _receive(self) -> None:
        import aiohttp

        from duplex_agent.agent.config import FRAME_SIZE
        result = self.result
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.BINARY or not msg.data:
                continue
            kind, payload = msg.data[0], msg.data[1:]
            if kind == 0:
                self.handshake.set()
            elif kind == 1:
                now = time.monotonic()
                try:
                    self._received_samples += len(self._reader.append_bytes(payload))
                except ValueError as e:
                    result.errors.append(f"invalid audio from the server: {e}")
                    break
                while (result.received_frames + 1) * FRAME_SIZE <= self._received_samples:
                    k = result.received_frames
                    if k < len(self._sent_at):
                        result.latencies_ms.append((now - self._sent_at[k]) * 1000)
                    result.received_frames += 1
            elif kind == 2:
                result.text_pieces += 1
            elif kind == 5:
                result.errors.append(payload.decode(errors="replace"))
        code = self.ws.close_code
        if code not in (None, 1000) and not result.errors:
            result.errors.append(f"closed by the server with code {code}")

    async def wait_for_outputs(self, timeout: float) -> None:
        """Until every frame sent has its output, the socket closes, or the time is up."""
        deadline = time.monotonic() + timeout
        while (self.result.received_frames < self.result.sent_frames and not self.closed
               and time.monotonic() < deadline):
            await asyncio.sleep(0.02)

    async def close(self) -> None:
        await self.ws.close()
        await asyncio.wait([self._task], timeout=5.0)


class RealtimeClient(MoshiClient):
    """One conversation over the OpenAI Realtime protocol: 80 ms pcm16 appends; counts the audio
    deltas (as 80 ms frames), transcript deltas and error events. Connects and closes as
    MoshiClient does, `session.created` standing for the handshake."""

    def __init__(self, ws, result: ClientResult):
        self.ws, self.result = ws, result
        self.handshake = asyncio.Event()  # session.created
        self._received_bytes = 0
        self._last_event = time.monotonic()
        self._task = asyncio.create_task(self._receive())

    async def send_frame(self, pcm) -> None:
        import base64

        import numpy as np
        audio = base64.b64encode((np.clip(pcm, -1, 1) * 32767).astype("<i2").tobytes()).decode()
        self.result.sent_frames += 1
        await self.ws.send_str(json.dumps({"type": "input_audio_buffer.append", "audio": audio}))

    async def _receive(self) -> None:
        import base64

        import aiohttp

        from duplex_agent.agent.config import FRAME_SIZE
        result = self.result
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            self._last_event = time.monotonic()
            event = json.loads(msg.data)
            kind = event.get("type")
            if kind == "session.created":
                self.handshake.set()
            elif kind == "response.output_audio.delta":
                self._received_bytes += len(base64.b64decode(event["delta"]))
                result.received_frames = self._received_bytes // (2 * FRAME_SIZE)
            elif kind == "response.output_audio_transcript.delta":
                result.text_pieces += 1
            elif kind == "error":
                result.errors.append(event["error"]["message"])

    async def wait_for_outputs(self, timeout: float) -> None:
        """Until the server has been quiet for half a second, the socket closes, or the time is up
        (the agent's silent frames are not sent: there is no count to wait for)."""
        deadline = time.monotonic() + timeout
        while (time.monotonic() - self._last_event < 0.5 and not self.closed
               and time.monotonic() < deadline):
            await asyncio.sleep(0.05)


class TwilioClient(MoshiClient):
    """One phone call as Twilio places it: the signed webhook, then the media stream of its TwiML.
    Connects and closes as MoshiClient does, `start` standing for the handshake; a refusal (HTTP
    error, or TwiML without a <Stream>: the busy <Say>) raises ConnectionError."""

    def __init__(self, ws, result: ClientResult, call_sid: str, parameters: dict):
        import secrets

        from duplex_agent.streams.phone.twilio import CHUNK_BYTES, PHONE_FORMAT, PHONE_RATE
        from duplex_agent.streams.realtime.events import AudioEncoder
        self._rate, self._chunk_bytes = PHONE_RATE, CHUNK_BYTES  # μ-law: a byte a sample
        self.ws, self.result = ws, result
        self.call_sid, self.parameters = call_sid, parameters
        self.stream_sid = "MZ" + secrets.token_hex(16)
        self.handshake = asyncio.Event()
        self._sent_at: list[float] = []  # per 80 ms input frame: its last chunk's send time
        self._received_samples = 0
        self._sequence = self._chunk = 0
        self._play_end = 0.0  # when the audio received so far will have played
        self._marks: list[tuple[str, asyncio.TimerHandle]] = []  # echoes not sent yet
        self._encoder = AudioEncoder(PHONE_FORMAT)  # 24 -> 8 kHz μ-law, as the server's
        self._pcm = b""
        self._task = asyncio.create_task(self._receive())

    @classmethod
    async def connect(cls, session, url: str, result: ClientResult | None = None, token=None,
                      ssl=None, timeout: float = CONNECT_TIMEOUT_S, twilio_auth_token: str = "",
                      **query) -> "TwilioClient":
        """`url`: the webhook (http://HOST:PORT/twilio/voice), signed as given."""
        import secrets
        import xml.etree.ElementTree as ElementTree
        from urllib.parse import urlencode

        import aiohttp
        from twilio.request_validator import RequestValidator

        from duplex_agent.streams.phone.twilio import MEDIA_FORMAT
        if query:
            url += ("&" if "?" in url else "?") + urlencode(query)
        result = result or ClientResult(0)
        call_sid = "CA" + secrets.token_hex(16)
        form = {"CallSid": call_sid, "AccountSid": "AC" + "0" * 32, "From": f"+1555{result.client:07d}",
                "To": "+15550000000", "CallStatus": "ringing", "Direction": "inbound",
                "ApiVersion": "2010-04-01"}
        signature = RequestValidator(twilio_auth_token).compute_signature(url, form)
        t0 = time.monotonic()
        async with session.post(url, data=form, headers={"X-Twilio-Signature": signature},
                                ssl=ssl, timeout=aiohttp.ClientTimeout(total=timeout)) as r:
            if r.status != 200:
                raise ConnectionError(f"webhook: HTTP {r.status}: {await r.text()}")
            twiml = ElementTree.fromstring(await r.text())
        stream = twiml.find("Connect/Stream")
        if stream is None:
            said = " ".join(e.text or "" for e in twiml.iter("Say"))
            raise ConnectionError(f"the call was not taken: {said or 'no <Stream> in the TwiML'}")
        parameters = {p.get("name"): p.get("value") for p in stream.iter("Parameter")}
        try:
            ws = await session.ws_connect(stream.get("url"), ssl=ssl)
        except aiohttp.WSServerHandshakeError as e:
            raise ConnectionError(f"media stream: HTTP {e.status}: {e.message}") from None
        client = cls(ws, result, call_sid, parameters)
        await client._send({"event": "connected", "protocol": "Call", "version": "1.0.0"},
                           sequenced=False)
        await client._send({"event": "start", "start": {
            "accountSid": form["AccountSid"], "streamSid": client.stream_sid, "callSid": call_sid,
            "tracks": ["inbound"], "customParameters": parameters,
            "mediaFormat": MEDIA_FORMAT}})
        client.handshake.set()
        client.result.handshake_ms = round((time.monotonic() - t0) * 1000, 1)
        return client

    async def _send(self, message: dict, sequenced: bool = True) -> None:
        if sequenced:
            self._sequence += 1
            message = {**message, "sequenceNumber": str(self._sequence),
                       "streamSid": self.stream_sid}
        await self.ws.send_str(json.dumps(message))

    async def send_frame(self, pcm) -> None:
        """One 80 ms frame (24 kHz float32) as four 20 ms μ-law `media` messages, 20 ms apart."""
        self._pcm += self._encoder.encode_bytes(pcm)
        t0 = time.monotonic()
        for j in range(4):
            await asyncio.sleep(max(0.0, t0 + j * 0.02 - time.monotonic()))
            chunk, self._pcm = self._pcm[:self._chunk_bytes], self._pcm[self._chunk_bytes:]
            await self._media(chunk.ljust(self._chunk_bytes, b"\xff"))  # μ-law silence while the resampler fills
        self._sent_at.append(time.monotonic())
        self.result.sent_frames += 1

    async def _receive(self) -> None:
        import base64

        import aiohttp
        result, loop = self.result, asyncio.get_running_loop()
        frame = 4 * self._chunk_bytes
        async for msg in self.ws:
            if msg.type != aiohttp.WSMsgType.TEXT:
                continue
            event = json.loads(msg.data)
            kind, now = event.get("event"), loop.time()
            if event.get("streamSid") != self.stream_sid:
                result.errors.append(f"a {kind!r} message for another stream")
            elif kind == "media":
                samples = len(base64.b64decode(event["media"]["payload"]))
                self._received_samples += samples
                self._play_end = max(self._play_end, now) + samples / self._rate
                while result.received_frames * frame < self._received_samples:
                    k = result.received_frames  # output frame k's first sample has come
                    if k < len(self._sent_at):
                        result.latencies_ms.append((time.monotonic() - self._sent_at[k]) * 1000)
                    result.received_frames += 1
            elif kind == "mark":  # echoed once the audio before it has played
                name = event["mark"]["name"]
                self._marks = [(n, h) for n, h in self._marks if h.when() > now]
                self._marks.append((name, loop.call_at(self._play_end, self._echo, name)))
            elif kind == "clear":  # the queued audio is dropped, the pending marks echoed now
                self._play_end = now
                for name, handle in self._marks:
                    if handle.when() > now:
                        handle.cancel()
                        self._echo(name)
                self._marks.clear()
        code = self.ws.close_code
        if code not in (None, 1000) and not result.errors:
            result.errors.append(f"closed by the server with code {code}")

    async def wait_for_outputs(self, timeout: float) -> None:
        """As MoshiClient's, while the line carries silence, as a phone line does: the last
        frame's answer is behind the resamplers' ~60 ms, which only more audio pushes out."""
        deadline = time.monotonic() + timeout
        while (self.result.received_frames < self.result.sent_frames and not self.closed
               and time.monotonic() < deadline):
            await self._media(b"\xff" * self._chunk_bytes)
            await asyncio.sleep(0.02)

    async def _media(self, ulaw: bytes) -> None:
        import base64
        self._chunk += 1
        await self._send({"event": "media", "media": {
            "track": "inbound", "chunk": str(self._chunk), "timestamp": str(self._chunk * 20),
            "payload": base64.b64encode(ulaw).decode()}})

    def _echo(self, name: str) -> None:
        if not self.ws.closed:
            asyncio.ensure_future(self._send({"event": "mark", "mark": {"name": name}}))

    async def close(self) -> None:
        if not self.ws.closed:
            from contextlib import suppress
            with suppress(ConnectionError):
                await self._send({"event": "stop", "stop": {"accountSid": "AC" + "0" * 32,
                                                            "callSid": self.call_sid}})
        await asyncio.wait([self._task], timeout=5.0)  # the server hangs up after `stop`
        await self.ws.close()


PROTOCOLS = {"moshi": MoshiClient, "realtime": RealtimeClient, "twilio": TwilioClient}


async def run_client(index: int, session, url: str, speech, duration_s: float,
                     start_delay_s: float = 0.0, drain_s: float = 3.0, token=None, ssl=None,
                     query: dict | None = None, protocol: str = "moshi",
                     twilio_auth_token: str | None = None) -> ClientResult:
    """One client's whole run; never raises for the server's behaviour, it records it."""
    from duplex_agent.agent.config import FRAME_RATE, FRAME_SIZE
    result = ClientResult(index)
    await asyncio.sleep(start_delay_s)
    signing = {"twilio_auth_token": twilio_auth_token} if protocol == "twilio" else {}
    try:
        client = await PROTOCOLS[protocol].connect(session, url, result, token=token, ssl=ssl,
                                                   **signing, **(query or {}))
    except (ConnectionError, OSError, asyncio.TimeoutError) as e:
        result.errors = [f"connect: {e or type(e).__name__}"]  # includes a refusal's 0x05 message
        return result
    frames = len(speech) // FRAME_SIZE
    t0 = time.monotonic()
    try:
        i = 0
        while not client.closed:
            due = t0 + i / FRAME_RATE  # absolute schedule: a late wake-up does not shift the rest
            if due >= t0 + duration_s:
                break
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            j = i % frames
            await client.send_frame(speech[j * FRAME_SIZE:(j + 1) * FRAME_SIZE])
            i += 1
        await client.wait_for_outputs(drain_s)
    except (ConnectionError, OSError) as e:
        result.errors.append(f"send: {e or type(e).__name__}")
    finally:
        await client.close()
    return result


# -- a whole run -----------------------------------------------------------------------------------

async def run_load(url: str, clients: int, duration_s: float, speech, *, token=None, ssl=None,
                   ramp_s: float = 0.0, drain_s: float = 3.0, query: dict | None = None,
                   protocol: str = "moshi", twilio_auth_token: str | None = None) -> dict:
    """Run `clients` conversations at once against `url` (ws:// or wss://) and return the report."""
    import aiohttp
    timeout = aiohttp.ClientTimeout(total=None, connect=CONNECT_TIMEOUT_S)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        before = await scrape_metrics(session, url, token, ssl)
        t0 = time.monotonic()
        results = await asyncio.gather(*(
            run_client(i, session, url, speech, duration_s, ramp_s * i / max(1, clients), drain_s,
                       token, ssl, query, protocol, twilio_auth_token) for i in range(clients)))
        wall_s = time.monotonic() - t0
        after = await scrape_metrics(session, url, token, ssl)
        server_stats = await scrape_stats(session, url, token, ssl)
    out = report(url, clients, duration_s, wall_s, results, before, after)
    out["protocol"] = protocol
    if server_stats is not None:
        out["server_stats"] = {"engine": server_stats.get("engine"),
                               "realtime": server_stats.get("realtime")}
        if "phone" in server_stats:
            out["server_stats"]["phone"] = {k: v for k, v in server_stats["phone"].items()
                                            if k != "calls"}
    return out


def report(url, clients, duration_s, wall_s, results: list[ClientResult], before, after) -> dict:
    latencies = [ms for r in results for ms in r.latencies_ms]
    sent = sum(r.sent_frames for r in results)
    received = sum(r.received_frames for r in results)
    return {
        "url": url, "clients": clients, "duration_s": duration_s, "wall_s": round(wall_s, 2),
        "sent_frames": sent, "received_frames": received, "missing_frames": sent - received,
        "latency_ms": percentiles(latencies),
        "failed_conversations": sum(1 for r in results if r.errors),
        "errors": [f"client {r.client}: {e}" for r in results for e in r.errors],
        "conversations": [r.summary() for r in results],
        "server": server_deltas(before, after),
    }


def percentiles(values: list[float]) -> dict:
    import numpy as np
    if not values:
        return {"count": 0}
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {"count": len(values), "p50": round(p50, 1), "p90": round(p90, 1), "p99": round(p99, 1),
            "max": round(max(values), 1), "mean": round(float(np.mean(values)), 1)}


# -- the server's own counters ---------------------------------------------------------------------

def metrics_url(ws_url: str, path: str = "/metrics") -> str:
    """ws://host:port/api/chat -> http://host:port/metrics (wss -> https)."""
    parts = urlsplit(ws_url)
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, path, "", ""))


async def scrape_stats(session, ws_url: str, token=None, ssl=None) -> dict | None:
    """The server's /api/stats, or None if it does not answer."""
    import aiohttp
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        async with session.get(metrics_url(ws_url, "/api/stats"), headers=headers, ssl=ssl,
                               timeout=aiohttp.ClientTimeout(total=5)) as r:
            return await r.json() if r.status == 200 else None
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError, ValueError):
        return None


async def scrape_metrics(session, ws_url: str, token=None, ssl=None) -> dict[str, float] | None:
    """The server's metric samples by name (labels folded into the name), or None if /metrics
    does not answer."""
    import aiohttp
    from prometheus_client.parser import text_string_to_metric_families
    headers = {"Authorization": f"Bearer {token}"} if token else None
    try:
        async with session.get(metrics_url(ws_url), headers=headers, ssl=ssl,
                               timeout=aiohttp.ClientTimeout(total=5)) as r:
            if r.status != 200:
                return None
            text = await r.text()
    except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
        return None
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(s.labels.items()))
            samples[f"{s.name}{{{labels}}}" if labels else s.name] = s.value
    return samples


def server_deltas(before: dict | None, after: dict | None) -> dict | None:
    """How the server's counters moved during the run."""
    if before is None or after is None:
        return None
    delta = lambda name: round(after.get(name, 0.0) - before.get(name, 0.0), 6)  # noqa: E731
    out = {name: delta(f"duplex_{name}_total") for name in (
        "dropped_input_frames", "dropped_output_frames", "late_frames", "skipped_frames", "ticks")}
    out["refusals"] = {k[len("duplex_refusals_total{reason=\""):-2]: delta(k)
                       for k in after if k.startswith("duplex_refusals_total{") and delta(k)}
    for hist, key in (("duplex_tick_seconds", "tick_ms_mean"),
                      ("duplex_frame_latency_seconds", "frame_latency_ms_mean")):
        count = delta(f"{hist}_count")
        out[key] = round(delta(f"{hist}_sum") / count * 1000, 2) if count else None
    return out


# -- speech ----------------------------------------------------------------------------------------

def load_speech(wav: str | None = None, sentence: str = DEFAULT_SENTENCE):
    """24 kHz mono float32, a whole number of frames with half a second of silence at the end (a
    pause between turns when it loops). From `wav`, else spoken by espeak-ng."""
    import shutil
    import subprocess
    import tempfile

    import numpy as np

    from duplex_agent.agent.config import FRAME_SIZE, SAMPLE_RATE
    from duplex_agent.agent.audio_file import AudioInputError, read_mono
    if wav is None:
        if shutil.which("espeak-ng") is None:
            raise AudioInputError("espeak-ng is not installed: pass a recording with --wav")
        with tempfile.TemporaryDirectory() as tmp:
            path = f"{tmp}/speech.wav"
            subprocess.run(["espeak-ng", "-w", path, sentence], check=True, capture_output=True)
            pcm = read_mono(path, SAMPLE_RATE)
    else:
        pcm = read_mono(wav, SAMPLE_RATE)
    pcm = np.concatenate([pcm, np.zeros(SAMPLE_RATE // 2, np.float32)])
    pcm = np.pad(pcm, (0, -len(pcm) % FRAME_SIZE))
    return np.clip(pcm, -1.0, 1.0).astype(np.float32)


# -- command line ----------------------------------------------------------------------------------

def register(subparsers) -> None:
    p = subparsers.add_parser("loadtest", help="hold N real-time websocket conversations with a "
                                               "server and report frame latency and losses")
    p.set_defaults(func=run_loadtest)
    p.add_argument("--url", default="ws://127.0.0.1:8998/api/chat",
                   help="the server's websocket (default ws://127.0.0.1:8998/api/chat)")
    p.add_argument("--clients", type=int, default=8, help="conversations at once (default 8)")
    p.add_argument("--duration", type=float, default=30.0,
                   help="seconds of audio each client sends (default 30)")
    p.add_argument("--wav", help="speech to send, looped (default: a sentence from espeak-ng)")
    p.add_argument("--json", help="write the full report here")
    p.add_argument("--token", help="the server's auth token (sent as a Bearer header)")
    p.add_argument("--cafile", help="CA certificate to trust for wss:// (e.g. a self-signed one)")
    p.add_argument("--ramp", type=float, default=0.0,
                   help="spread the clients' starts over this many seconds (default 0: together)")
    p.add_argument("--protocol", choices=sorted(PROTOCOLS), default="moshi",
                   help="moshi (/api/chat, Ogg/Opus), realtime (/v1/realtime, OpenAI's "
                        "Realtime events) or twilio (phone calls: --url is the webhook, "
                        "http://HOST:PORT/twilio/voice); default moshi")
    p.add_argument("--twilio-auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN") or None,
                   help="--protocol twilio: the token the server checks webhooks with (default: "
                        "$TWILIO_AUTH_TOKEN)")
    p.add_argument("--drain", type=float, default=3.0,
                   help="after sending, wait at most this long for the last outputs (default 3 s)")


def run_loadtest(args) -> int:
    import ssl
    if args.clients < 1 or not args.duration > 0:
        print("error: --clients must be at least 1 and --duration positive", file=sys.stderr)
        return 2
    if args.protocol == "twilio" and not args.twilio_auth_token:
        print("error: --protocol twilio needs --twilio-auth-token", file=sys.stderr)
        return 2
    speech = load_speech(args.wav)
    context = ssl.create_default_context(cafile=args.cafile) if args.cafile else None
    result = asyncio.run(run_load(args.url, args.clients, args.duration, speech, token=args.token,
                                  ssl=context, ramp_s=args.ramp, drain_s=args.drain,
                                  protocol=args.protocol,
                                  twilio_auth_token=args.twilio_auth_token))
    print(format_report(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)
    return 1 if result["failed_conversations"] else 0


def format_report(r: dict) -> str:
    lat = r["latency_ms"]
    lines = [f"{r['clients']} clients x {r['duration_s']:g} s against {r['url']} ({r['wall_s']} s)",
             f"frames: sent {r['sent_frames']}, received {r['received_frames']}, "
             f"missing {r['missing_frames']}"]
    if lat["count"]:
        lines.append(f"frame latency ms: p50 {lat['p50']}  p90 {lat['p90']}  p99 {lat['p99']}  "
                     f"max {lat['max']}  (n={lat['count']})")
    lines.append(f"failed conversations: {r['failed_conversations']}")
    lines += [f"  {e}" for e in r["errors"][:10]]
    realtime = (r.get("server_stats") or {}).get("realtime")
    if r.get("protocol") == "realtime" and realtime:
        lat = realtime.get("delta_latency_ms")  # not in a cluster gateway's sums
        lines.append((f"server frame in -> delta out ms: p50 {lat['p50']}  p90 {lat['p90']}  "
                      f"p99 {lat['p99']}  (n={lat['count']}); " if lat else "server: ")
                     + f"responses {realtime['responses']}")
    phone = (r.get("server_stats") or {}).get("phone")
    if r.get("protocol") == "twilio" and phone:
        lag = phone.get("playback_lag_ms")  # not in a cluster gateway's sums
        lines.append((f"server playback lag (mark sent -> echoed) ms: p50 {lag['p50']}  p90 "
                      f"{lag['p90']}  (n={lag['count']}); " if lag else "server: ")
                     + f"cut {phone['cut_ms']} ms")
    if r["server"] is not None:
        s = r["server"]
        lines.append(f"server: dropped input {s['dropped_input_frames']:g}, output "
                     f"{s['dropped_output_frames']:g}; late {s['late_frames']:g}, skipped "
                     f"{s['skipped_frames']:g}; tick mean {s['tick_ms_mean']} ms; "
                     f"refusals {s['refusals'] or 0}")
    return "\n".join(lines)
