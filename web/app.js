// Browser client for the duplex agent: microphone -> WebRTC -> agent, agent voice -> <audio>,
// both sides' words (the agent's text; the user's, when the server runs a transcriber) and server
// stats over the "events" data channel. Standard APIs only, no build step.
"use strict";

const $ = (id) => document.getElementById(id);
const ui = {
  toggle: $("toggle"), status: $("status"), error: $("error"), transcript: $("transcript"),
  lampUser: $("lamp-user"), lampAgent: $("lamp-agent"), audio: $("remote"), details: $("details"),
  turns: $("turns"), persona: $("persona"), voice: $("voice"), role: $("role"), endInput: $("end-input"),
  total: $("m-total"), server: $("m-server"), rtt: $("m-rtt"), jitter: $("m-jitter"),
};

const LAMP_THRESHOLD = 0.02;   // RMS of [-1, 1] samples: about -34 dBFS
const NEW_LINE_GAP_S = 1.5;    // a pause this long in one side's words starts a new paragraph
const ICE_GATHER_TIMEOUT_MS = 3000;
const STATS_INTERVAL_MS = 1000;

class UserError extends Error {}

// A server started with --auth-token is opened as /?token=...: every API call passes it on.
function withToken(path) {
  const token = new URLSearchParams(location.search).get("token");
  return token ? `${path}?token=${encodeURIComponent(token)}` : path;
}

function setStatus(state, text) {
  ui.status.dataset.state = state;
  ui.status.textContent = text;
}

function showError(message) {
  ui.error.textContent = message;
  ui.error.hidden = !message;
}

const ms = (seconds) => (seconds == null ? null : seconds * 1000);
function fmt(value) {
  if (value == null || Number.isNaN(value)) return "–";
  return `${value < 10 ? value.toFixed(1) : Math.round(value)} ms`;  // loopback RTTs are sub-ms
}

// One conversation: peer connection, microphone, audio graph and timers.
class Session {
  constructor() {
    this.pc = null;
    this.mic = null;
    this.channel = null;
    this.audioCtx = null;
    this.timers = [];
    this.server = {};        // latest stats message from the server
    this.browser = {};       // latest figures from getStats()
    this.prevInbound = null;
    this.lines = { agent: null, user: null };  // each side's open paragraph
    this.stopped = false;
    this.translated = false;  // a translation completed: the server's close is not an error
  }

  async start() {
    this.audioCtx = new AudioContext();  // created inside the click, so it may play
    this.mic = await openMicrophone();
    if (this.stopped) return;
    this.watchLevel(this.mic, ui.lampUser);

    const pc = (this.pc = new RTCPeerConnection({ iceServers: [] }));
    for (const track of this.mic.getAudioTracks()) pc.addTrack(track, this.mic);
    this.channel = pc.createDataChannel("events");
    this.channel.onmessage = (e) => this.onMessage(JSON.parse(e.data));
    this.channel.onclose = () => {
      if (!this.translated) this.fail("The server ended the conversation.");
    };
    pc.ontrack = (e) => this.onRemoteTrack(e);
    pc.onconnectionstatechange = () => this.onConnectionState();

    await pc.setLocalDescription(await pc.createOffer());
    await iceGatheringComplete(pc);
    if (this.stopped) return;
    const answer = await postOffer(pc.localDescription, chosenPersona());
    if (this.stopped) return;
    await pc.setRemoteDescription(answer);
    ui.endInput.hidden = !answer.translates;  // a translator: the speech has an end
    // getStats() may reject while the connection closes; the next poll simply tries again.
    this.timers.push(setInterval(() => this.pollStats().catch(() => {}), STATS_INTERVAL_MS));
  }

  stop() {
    this.stopped = true;
    this.timers.forEach(clearInterval);
    if (this.channel) this.channel.close();
    if (this.pc) this.pc.close();
    if (this.mic) this.mic.getTracks().forEach((t) => t.stop());
    if (this.audioCtx) this.audioCtx.close().catch(() => {});
    ui.audio.srcObject = null;
    ui.endInput.hidden = true;
    ui.lampUser.classList.remove("on");
    ui.lampAgent.classList.remove("on");
  }

  onRemoteTrack(event) {
    const stream = event.streams[0] || new MediaStream([event.track]);
    ui.audio.srcObject = stream;
    ui.audio.play().catch((e) => {
      if (e.name === "NotAllowedError") this.fail("The browser blocked audio playback — click Start to try again.");
    });
    this.watchLevel(stream, ui.lampAgent);
  }

  onConnectionState() {
    const state = this.pc.connectionState;
    if (state === "connected") setStatus("live", "Live");
    else if (state === "disconnected") setStatus("connecting", "Reconnecting…");
    else if (state === "failed") this.fail("The connection to the server was lost.");
  }

  onMessage(msg) {
    if (msg.type === "text") this.addWords("agent", msg.text, msg);
    else if (msg.type === "user_word") this.addWords("user", msg.text, msg);
    else if (msg.type === "stats") { this.server = msg; this.render(); }
    else if (msg.type === "error") this.fail(`The agent stopped: ${msg.message}`);
    else if (msg.type === "end" && session === this) {  // the translation is complete
      this.translated = true;
      setTimeout(() => { if (session === this) { stop(); setStatus("idle", "Translated"); } }, 500);
    }
  }

  // A translation's speech is over: the agent finishes translating, then the server ends it.
  endInput() {
    if (this.channel && this.channel.readyState === "open") {
      this.channel.send(JSON.stringify({ type: "end_of_input" }));
      ui.endInput.disabled = true;
      setStatus("connecting", "Finishing the translation…");
    }
  }

  // Ends the page's session with a message, unless this session was already stopped or replaced.
  fail(message) {
    if (!this.stopped && session === this) fail(message);
  }

  // One side's words: the agent's text pieces carry their own spaces, the user's are whole words.
  // A side's paragraph goes on until it pauses; paragraphs stand in the order they started (the
  // user's words come a second or two after they were said).
  addWords(side, text, { start, end }) {
    const box = ui.transcript;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
    let line = this.lines[side];
    if (!line || start - line.end > NEW_LINE_GAP_S) {
      const p = document.createElement("p");
      p.dataset.side = side;
      p.dataset.start = start;
      p.append(Object.assign(document.createElement("span"), { className: "who", textContent: side === "user" ? "You" : "Agent" }));
      p.append(Object.assign(document.createElement("span"), { className: "words" }));
      const later = [...box.children].find((other) => Number(other.dataset.start) > start);
      box.insertBefore(p, later || null);
      line = this.lines[side] = { p, end, empty: true };
    }
    const words = line.p.querySelector(".words");
    words.textContent += line.empty ? text.trimStart() : side === "user" ? ` ${text}` : text;
    line.empty = false;
    line.end = end;
    if (atBottom) box.scrollTop = box.scrollHeight;
  }

  // Lights `lamp` while the stream's level is above the threshold.
  watchLevel(stream, lamp) {
    const analyser = this.audioCtx.createAnalyser();
    analyser.fftSize = 1024;
    this.audioCtx.createMediaStreamSource(stream).connect(analyser);
    const samples = new Float32Array(analyser.fftSize);
    const tick = () => {
      if (this.stopped) return;
      analyser.getFloatTimeDomainData(samples);
      let sum = 0;
      for (const s of samples) sum += s * s;
      lamp.classList.toggle("on", Math.sqrt(sum / samples.length) > LAMP_THRESHOLD);
      requestAnimationFrame(tick);
    };
    tick();
  }

  async pollStats() {
    if (!this.pc || this.pc.connectionState === "closed") return;
    const report = await this.pc.getStats();
    let inbound = null, pair = null, remoteInbound = null;
    report.forEach((s) => {
      if (s.type === "inbound-rtp" && s.kind === "audio") inbound = s;
      else if (s.type === "remote-inbound-rtp" && s.kind === "audio") remoteInbound = s;
      else if (s.type === "transport" && s.selectedCandidatePairId) pair = report.get(s.selectedCandidatePairId);
      else if (s.type === "candidate-pair" && s.selected && !pair) pair = s;  // Firefox
    });
    const b = {};
    b.rtt = ms(pair && pair.currentRoundTripTime != null ? pair.currentRoundTripTime
      : remoteInbound && remoteInbound.roundTripTime);
    if (inbound) {
      b.jitter = ms(inbound.jitter);
      b.packetsLost = inbound.packetsLost;
      // The browser's own playout buffer over the last interval.
      const prev = this.prevInbound;
      if (prev && inbound.jitterBufferEmittedCount > prev.jitterBufferEmittedCount) {
        b.playout = ms((inbound.jitterBufferDelay - prev.jitterBufferDelay)
          / (inbound.jitterBufferEmittedCount - prev.jitterBufferEmittedCount));
      }
      this.prevInbound = inbound;
    }
    this.browser = b;
    this.render();
  }

  render() {
    const s = this.server, b = this.browser;
    // Estimated delay until the agent's answer to a frame is heard: network both ways, the server's
    // frame-in -> audio-out time, and the browser's playout buffer where the browser reports it.
    ui.total.textContent = b.rtt == null || s.server_frame_ms == null ? "–"
      : fmt(b.rtt + s.server_frame_ms + (b.playout || 0));
    ui.server.textContent = fmt(s.server_frame_ms);
    ui.rtt.textContent = fmt(b.rtt);
    ui.jitter.textContent = fmt(b.jitter);
    const bits = [];
    if (s.frames_in != null) bits.push(`frames in ${s.frames_in} · out ${s.frames_out}`);
    if (s.frame_latency_ms_p50 != null) bits.push(`engine ${Math.round(s.frame_latency_ms_p50)} ms`);
    if (s.underruns != null) bits.push(`underruns ${s.underruns}`);
    if (b.packetsLost != null) bits.push(`packets lost ${b.packetsLost}`);
    ui.details.textContent = bits.join("  ·  ");
    // Turn taking, measured by the server with webrtcvad on both sides of the conversation.
    const t = s.turns, secs = (x) => x == null ? "–" : `${x.toFixed(2)} s`;
    ui.turns.textContent = !t ? "" : `turns: you ${t.user_segments} · agent ${t.agent_segments}` +
      `  ·  answers after ${secs(t.response_latency_p50_s)}` +
      `  ·  yields to barge-in after ${secs(t.barge_in_reaction_p50_s)} (${t.barge_ins_yielded}/${t.barge_ins})` +
      `  ·  overlap ${secs(t.overlap_s)}`;
  }
}

async function openMicrophone() {
  if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
    throw new UserError("This page needs a secure connection (https or localhost) to use the microphone.");
  }
  try {
    return await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true },
    });
  } catch (e) {
    if (e.name === "NotAllowedError" || e.name === "SecurityError") {
      throw new UserError("Microphone permission was denied. Allow microphone access for this page and try again.");
    }
    if (e.name === "NotFoundError" || e.name === "OverconstrainedError") {
      throw new UserError("No microphone was found. Plug one in and try again.");
    }
    if (e.name === "NotReadableError") {
      throw new UserError("The microphone is busy in another application.");
    }
    throw new UserError(`Could not open the microphone (${e.name}).`);
  }
}

// Non-trickle ICE: the offer is posted once, with every candidate in it.
function iceGatheringComplete(pc) {
  if (pc.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      if (pc.iceGatheringState !== "complete") return;
      pc.removeEventListener("icegatheringstatechange", done);
      resolve();
    };
    pc.addEventListener("icegatheringstatechange", done);
    setTimeout(resolve, ICE_GATHER_TIMEOUT_MS);  // go with what we have
  });
}

async function postOffer(offer, persona) {
  let response;
  try {
    response = await fetch(withToken("offer"), {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ sdp: offer.sdp, type: offer.type, ...persona }),
    });
  } catch (e) {
    throw new UserError("Could not reach the server. Check your connection and try again.");
  }
  const body = await response.json().catch(() => ({}));
  if (response.status === 503) throw new UserError("The server is full — try again in a minute.");
  if (!response.ok) {
    throw new UserError(`The server refused the call: ${body.error || `HTTP ${response.status}`}.`);
  }
  return body;
}

// Persona: the voice picker and role box, offered when the checkpoint has personas.
async function loadVoices() {
  let listing;
  try {
    const response = await fetch(withToken("api/voices"));
    if (!response.ok) return;  // an older server, or no token: conversations without a persona
    listing = await response.json();
  } catch (e) {
    return;
  }
  if (!listing.personas || !listing.voices.length) return;
  ui.voice.replaceChildren(...listing.voices.map((name) => new Option(name.replace(/\.pt$/, ""), name)));
  ui.persona.hidden = false;
}

function chosenPersona() {
  if (ui.persona.hidden) return {};
  const role = ui.role.value.trim();
  return { voice_prompt: ui.voice.value, ...(role ? { text_prompt: role } : {}) };
}

for (const chip of document.querySelectorAll(".chip[data-role]")) {
  chip.addEventListener("click", () => { ui.role.value = chip.dataset.role; });
}

let session = null;

function setButton(live) {
  ui.toggle.textContent = live ? "Stop" : "Start conversation";
  ui.endInput.disabled = false;
  ui.toggle.classList.toggle("stop", live);
  // The persona is fixed when the conversation opens.
  for (const el of ui.persona.querySelectorAll("select, textarea, button")) el.disabled = live;
}

async function start() {
  showError("");
  ui.transcript.replaceChildren();
  setStatus("connecting", "Connecting…");
  setButton(true);
  const current = (session = new Session());
  window.duplex = current;  // for tests and debugging: window.duplex.pc
  try {
    await current.start();
  } catch (e) {
    current.fail(e instanceof UserError ? e.message : `Something went wrong: ${e.message || e}`);
  }
}

function stop() {
  if (session) session.stop();
  session = null;
  setButton(false);
  setStatus("idle", "Ready");
}

function fail(message) {
  stop();
  setStatus("error", "Error");
  showError(message);
}

ui.toggle.addEventListener("click", () => (session ? stop() : start()));
ui.endInput.addEventListener("click", () => session && session.endInput());
window.addEventListener("pagehide", stop);
window.duplexVoices = loadVoices();  // for tests: resolves once the picker is filled (or not)
