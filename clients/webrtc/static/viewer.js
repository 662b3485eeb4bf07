// streamgen live viewer: negotiates WebRTC with the gateway (POST /offer, no trickle ICE; the ICE
// servers come from GET /config), plays the generated video, sends prompt changes and stop on the
// "control" data channel, shows live stats and where the latency goes.
// URL parameters: prompt=TEXT (initial prompt), seed=N, obs=1 (clean OBS view: starts by itself,
// no controls, reconnects every few seconds after an error or the end of a stream).
"use strict";

const params = new URLSearchParams(location.search);
const OBS = params.get("obs") === "1";
const RETRY_MS = 5000;
const $ = (id) => document.getElementById(id);
const els = { form: $("controls"), prompt: $("prompt"), send: $("send"), toggle: $("toggle"),
              stats: $("stats"), status: $("status"), video: $("video") };

// For the console (and the browser test): what this page is doing, the gateway's last messages, and
// send(message) to put any message on the data channel.
// latency: per received frame {gatewayMs, jitterMs}: the gateway's share (ready at the gateway ->
// received here, both Unix ms) and the jitter buffer + decode (received -> shown).
const viewer = window.streamgen = { state: "idle", sessionId: null, messages: [], error: null, send: sendMessage,
                                    pcConfig: null, latency: [] };
let pc = null;
let channel = null;
let statsTimer = null;
let retryTimer = null;
let gatewayStats = {};
let sentFrames = new Map();   // RTP pts (gateway's, before the sender's random offset) -> {ready, sent}
let rtpOffset = null;         // RTP timestamp - gateway pts, found by matching (see matchOffset)
let seen = [];                // recent {rtp, received, shown} from requestVideoFrameCallback

function sendMessage(message) {
  if (!channel || channel.readyState !== "open") return false;
  channel.send(typeof message === "string" ? message : JSON.stringify(message));
  return true;
}

function setState(state) {
  viewer.state = state;
  els.toggle.textContent = state === "idle" ? "Start" : "Stop";
  els.send.disabled = state !== "playing";
}

function setStatus(text, isError = false) {
  els.status.textContent = text;
  els.status.classList.toggle("error", isError);
  if (isError) viewer.error = text;
}

function fail(message) {
  setStatus(message, true);
  teardown();
  if (OBS) retryTimer = setTimeout(start, RETRY_MS);
}

function teardown() {
  document.body.classList.remove("playing");
  clearInterval(statsTimer);
  statsTimer = null;
  if (channel) channel.onclose = null;
  if (pc) pc.onconnectionstatechange = null;
  if (pc) pc.close();  // the gateway sees the pc close and cancels the server's stream
  pc = null;
  channel = null;
  setState("idle");
}

async function pcConfig() {
  const res = await fetch("/config");
  if (!res.ok) throw new Error(`the gateway answered HTTP ${res.status} for /config`);
  return { iceServers: (await res.json()).iceServers || [] };
}

// RTP timestamp = gateway pts + a random 32-bit offset chosen by the sender: the offset is the
// difference that most (received frame, sent frame) pairs share.
function matchOffset() {
  const counts = new Map();
  let best = null, bestCount = 0;
  for (const f of seen.slice(-30)) {
    for (const pts of Array.from(sentFrames.keys()).slice(-60)) {
      const d = (f.rtp - pts) >>> 0;
      const c = (counts.get(d) || 0) + 1;
      counts.set(d, c);
      if (c > bestCount) { best = d; bestCount = c; }
    }
  }
  return bestCount >= 3 ? best : null;
}

// A frame's gateway times arrive with the next stats message, often after the frame itself: frames
// wait in `seen` until both sides are known.
function matchFrames() {
  if (rtpOffset === null) rtpOffset = matchOffset();
  if (rtpOffset === null) return;
  for (const f of seen) {
    if (f.matched) continue;
    const sent = sentFrames.get((f.rtp - rtpOffset) >>> 0);
    if (!sent) continue;
    f.matched = true;
    viewer.latency.push({ gatewayMs: f.received - sent.ready, pacingMs: sent.sent - sent.ready,
                          jitterMs: f.shown - f.received });
    if (viewer.latency.length > 600) viewer.latency.shift();
  }
}

function onFrame(now, meta) {
  if (meta.rtpTimestamp !== undefined && meta.receiveTime !== undefined) {
    const received = performance.timeOrigin + meta.receiveTime;
    const shown = performance.timeOrigin + (meta.presentationTime ?? now);
    seen.push({ rtp: meta.rtpTimestamp, received, shown, matched: false });
    if (seen.length > 200) seen.shift();
    matchFrames();
  }
  if (pc) els.video.requestVideoFrameCallback(onFrame);
}

function median(values) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.floor(sorted.length / 2)];
}

function waitForIceGathering(conn, timeoutMs) {
  if (conn.iceGatheringState === "complete") return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => { conn.removeEventListener("icegatheringstatechange", check); resolve(); };
    const check = () => { if (conn.iceGatheringState === "complete") done(); };
    conn.addEventListener("icegatheringstatechange", check);
    setTimeout(done, timeoutMs);  // loopback and LAN candidates come at once; don't wait for stragglers
  });
}

async function start() {
  clearTimeout(retryTimer);
  teardown();
  const prompt = els.prompt.value.trim();
  if (!prompt) { setStatus("enter a prompt first", true); return; }
  setState("connecting");
  setStatus("connecting to the gateway...");
  viewer.error = null;
  let config;
  try {
    config = viewer.pcConfig = await pcConfig();
  } catch (err) {
    fail(err instanceof TypeError ? `the gateway is unreachable (${err.message})` : err.message);
    return;
  }
  if (viewer.state !== "connecting") return;  // stopped meanwhile
  sentFrames = new Map();
  rtpOffset = null;
  seen = [];
  const conn = pc = new RTCPeerConnection({ iceServers: config.iceServers });
  viewer.iceServers = conn.getConfiguration().iceServers;  // what this peer really uses (tests read it)
  conn.addTransceiver("video", { direction: "recvonly" });
  channel = conn.createDataChannel("control");
  channel.onmessage = (e) => onMessage(e.data);
  channel.onclose = () => { if (pc === conn && viewer.state !== "idle") fail("the gateway closed the stream"); };
  conn.ontrack = (e) => {
    els.video.srcObject = e.streams[0] || new MediaStream([e.track]);
    els.video.play().catch(() => {});  // muted autoplay is allowed; a refusal only means no gesture yet
    if ("requestVideoFrameCallback" in els.video) els.video.requestVideoFrameCallback(onFrame);
  };
  conn.onconnectionstatechange = () => {
    if (pc === conn && conn.connectionState === "failed") fail("the WebRTC connection to the gateway failed");
  };
  const body = { sdp: "", type: "offer", prompt };
  if (params.has("seed")) body.seed = Number(params.get("seed"));
  let answer;
  try {
    await conn.setLocalDescription(await conn.createOffer());
    await waitForIceGathering(conn, 2000);
    if (pc !== conn) return;  // stopped meanwhile
    body.sdp = conn.localDescription.sdp;
    const res = await fetch("/offer", { method: "POST", headers: { "Content-Type": "application/json" },
                                        body: JSON.stringify(body) });
    answer = await res.json().catch(() => ({ error: `the gateway answered HTTP ${res.status}` }));
    if (!res.ok) throw new Error(answer.error || `the gateway answered HTTP ${res.status}`);
  } catch (err) {
    if (pc === conn) fail(err instanceof TypeError ? `the gateway is unreachable (${err.message})` : err.message);
    return;
  }
  if (pc !== conn) return;
  try {
    await conn.setRemoteDescription({ sdp: answer.sdp, type: answer.type });
  } catch (err) {
    if (pc === conn) fail(`the gateway's answer was refused by this browser: ${err.message}`);
    return;
  }
  setStatus("waiting for the first frames...");
  statsTimer = setInterval(showStats, 1000);
}

function stop() {
  clearTimeout(retryTimer);
  if (viewer.state === "playing" && sendMessage({ type: "stop" })) {  // the gateway answers "ended", then we close
    setState("stopping");
    setStatus("stopping...");
    setTimeout(() => { if (viewer.state === "stopping") teardown(); }, 3000);
  } else {
    teardown();
    setStatus("stopped");
  }
}

function onMessage(text) {
  let msg;
  try { msg = JSON.parse(text); } catch { return; }
  viewer.messages.push(msg);
  if (viewer.messages.length > 50) viewer.messages.shift();
  switch (msg.type) {
    case "started":
      viewer.sessionId = msg.session_id;
      setState("playing");
      setStatus(`playing: ${msg.width}x${msg.height} at ${msg.fps} fps, ${msg.codec.toUpperCase()}, ` +
                `preset ${msg.preset}, session ${msg.session_id}`);
      break;
    case "stats":
      gatewayStats = msg;
      for (const [pts, ready, sent] of msg.sent || []) sentFrames.set(pts, { ready, sent });
      while (sentFrames.size > 400) sentFrames.delete(sentFrames.keys().next().value);
      matchFrames();
      break;
    case "prompt_sent":
      setStatus(`prompt sent; it takes over at the next chunk: "${msg.prompt}"`);
      break;
    case "error":
      if (msg.fatal) fail(msg.message); else setStatus(msg.message, true);
      break;
    case "ended":
      teardown();
      setStatus(`stream ended: ${msg.reason.replace("REASON_", "").toLowerCase()}` +
                (msg.message ? ` (${msg.message})` : "") + `, ${msg.frames} frames`);
      els.stats.textContent = els.stats.textContent.replace(/frames \d+/, `frames ${msg.frames}`);
      if (OBS) retryTimer = setTimeout(start, RETRY_MS);
      break;
  }
}

async function showStats() {
  if (!pc) return;
  let fps = null;
  let report;
  try { report = await pc.getStats(); } catch { return; }  // closed meanwhile
  report.forEach((s) => {
    if (s.type === "inbound-rtp" && s.kind === "video") fps = s.framesPerSecond ?? null;
  });
  const g = gatewayStats;
  const fmt = (v, digits = 0) => (v === null || v === undefined ? "-" : Number(v).toFixed(digits));
  // Where the time goes, medians over the last 2 s: the server's chunk (generate + VAE + encode),
  // then the gateway's share (ready -> received here: its pacing wait, the WebRTC encoder and the
  // network), then this browser's jitter buffer and decoder.
  const recent = viewer.latency.slice(-32);
  const gatewayMs = median(recent.map((l) => l.gatewayMs));
  const pacingMs = median(recent.map((l) => l.pacingMs));
  const jitterMs = median(recent.map((l) => l.jitterMs));
  const total = gatewayMs !== null && jitterMs !== null ? gatewayMs + jitterMs : null;
  const networkMs = gatewayMs !== null && pacingMs !== null ? gatewayMs - pacingMs : null;
  els.stats.textContent =
    `fps ${fmt(fps, 1)} (sent ${fmt(g.fps, 1)}) · latency ${fmt(total)} ms after generation ` +
    `(gateway ${fmt(gatewayMs)}: pacing ${fmt(pacingMs)} + encode/network ${fmt(networkMs)}; ` +
    `jitter buffer ${fmt(jitterMs)}) · chunk ${fmt(g.chunk_ms)} ms · ` +
    `first frame ${g.ttff_ms === null || g.ttff_ms === undefined ? "-" : (g.ttff_ms / 1000).toFixed(2) + " s"} · ` +
    `frames ${fmt(g.frames)}` + (g.skipped ? ` (${g.skipped} skipped to stay live)` : "");
}

els.form.addEventListener("submit", (e) => {
  e.preventDefault();
  const prompt = els.prompt.value.trim();
  if (prompt) sendMessage({ type: "prompt", prompt });
});
els.toggle.addEventListener("click", () => (viewer.state === "idle" ? start() : stop()));
// The OBS view shows its status line ("connecting...", "waiting for the first frames...") over the
// black frame until the video really plays, so a source that is still connecting is not a mystery.
els.video.addEventListener("playing", () => { if (pc) document.body.classList.add("playing"); });
// Closing the tab or navigating away: close the pc now so the server frees the session at once.
window.addEventListener("pagehide", teardown);

if (params.has("prompt")) els.prompt.value = params.get("prompt");
if (OBS) {
  document.body.classList.add("obs");
  start();
}
