// facecast web page: camera in over WebRTC, swapped video back on the same transceiver.
// Plain browser JavaScript, no build step; standard APIs only (Chromium and Firefox).
"use strict";

(() => {
  const API = "/api/web";
  const TOKEN_KEY = "facecast.token";
  // One full offer/answer exchange (no trickle ICE): wait this long for host candidates.
  const ICE_GATHER_MS = 5000;
  const STATS_EVERY_MS = 1000;

  const $ = (id) => document.getElementById(id);
  const ui = {
    start: $("start"),
    stop: $("stop"),
    swapping: $("swapping"),
    faceFile: $("face-file"),
    faceSample: $("face-sample"),
    remote: $("remote"),
    local: $("local"),
    fps: $("fps"),
    serverFps: $("server-fps"),
    latency: $("latency"),
    latencyP95: $("latency-p95"),
    faces: $("faces"),
    faceName: $("face-name"),
    status: $("status"),
    session: $("session"),
    token: $("token"),
    tokenRow: $("token-row"),
  };

  const state = {
    pc: null,
    camera: null,
    session: null,
    pendingFiles: null, // the photos of a face chosen before the session existed
    generation: 0, // bumped on teardown so callbacks of an old connection stop
    rvfcFrames: 0,
    lastSample: null,
    fpsTimer: null,
    statsTimer: null,
    // an error while connected (a refused photo, say) stays on screen until the next
    // success, rather than being overwritten by the connection's own state
    errorShown: false,
    statsFailed: false,
  };

  const hasFrameCallback =
    typeof HTMLVideoElement !== "undefined" &&
    "requestVideoFrameCallback" in HTMLVideoElement.prototype;

  // ------------------------------------------------------------------ status and errors

  function setStatus(text) {
    ui.status.textContent = text;
  }

  function showError(err) {
    const message = err instanceof Error ? err.message : String(err);
    setStatus(`error: ${message}`);
    state.errorShown = true;
    console.error(err);
  }

  // After a change went through: the connection's state again, in place of an old error.
  function cleared() {
    state.errorShown = false;
    if (state.pc && state.pc.connectionState === "connected") {
      setStatus("connected");
    }
  }

  function number(value, digits) {
    return typeof value === "number" && Number.isFinite(value) ? value.toFixed(digits) : "-";
  }

  // ------------------------------------------------------------------ HTTP

  class HttpError extends Error {
    constructor(status, message) {
      super(message);
      this.status = status;
    }
  }

  function authHeaders() {
    const token = sessionStorage.getItem(TOKEN_KEY);
    return token ? { Authorization: `Bearer ${token}` } : {};
  }

  async function errorText(reply) {
    const text = await reply.text().catch(() => "");
    let detail;
    try {
      const data = JSON.parse(text);
      // FastAPI: {"detail": "message"} or {"detail": [validation errors]}
      const inner = data && data.detail !== undefined ? data.detail : data;
      detail = typeof inner === "string" ? inner : JSON.stringify(inner);
    } catch {
      // not JSON: a short plain text is the message; an HTML error page is not
      detail = text && !text.trimStart().startsWith("<") ? text : reply.statusText;
    }
    return `${reply.status} ${detail.slice(0, 300)}`.trim();
  }

  async function api(method, path, { json, body, contentType } = {}) {
    const headers = authHeaders();
    let payload = body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      payload = JSON.stringify(json);
    } else if (contentType) {
      headers["Content-Type"] = contentType;
    }
    let reply;
    try {
      reply = await fetch(API + path, { method, headers, body: payload });
    } catch (err) {
      throw new Error(`cannot reach the server (${err.message})`);
    }
    if (reply.status === 401) {
      ui.tokenRow.hidden = false;
      throw new HttpError(401, "this server needs an access token: enter it above");
    }
    if (!reply.ok) {
      throw new HttpError(reply.status, await errorText(reply));
    }
    if (reply.status === 204) {
      return null;
    }
    return reply.json();
  }

  function sessionPath(id, tail = "") {
    return `/sessions/${encodeURIComponent(id)}${tail}`;
  }

  // ------------------------------------------------------------------ faces

  async function loadFaces() {
    const { faces } = await api("GET", "/faces");
    while (ui.faceSample.options.length > 1) {
      ui.faceSample.remove(1);
    }
    for (const name of faces) {
      ui.faceSample.add(new Option(name, name));
    }
  }

  // One photo goes as the body; several photos of the person go as a multipart form with
  // the part "file" repeated (the browser sets the boundary), and each face on the server
  // then gets the photo nearest its expression.
  async function uploadFace(files) {
    // ?name= only labels the upload on screen; the server keeps no file name
    const label = files.length === 1 ? files[0].name : `${files.length} photos`;
    const query = `?name=${encodeURIComponent(label)}`;
    let request;
    if (files.length === 1) {
      request = { body: files[0], contentType: files[0].type || "application/octet-stream" };
    } else {
      const form = new FormData();
      for (const file of files) {
        form.append("file", file, file.name);
      }
      request = { body: form };
    }
    const reply = await api("PUT", sessionPath(state.session, "/face") + query, request);
    ui.faceName.textContent = reply.face;
    cleared();
  }

  async function pickSample(name) {
    const query = `?sample=${encodeURIComponent(name)}`;
    const reply = await api("PUT", sessionPath(state.session, "/face") + query);
    ui.faceName.textContent = reply.face;
    cleared();
  }

  async function onSampleChange() {
    const name = ui.faceSample.value;
    state.pendingFiles = null;
    ui.faceFile.value = "";
    if (!state.session) {
      return;
    }
    try {
      if (name) {
        await pickSample(name);
        // picking a face means "swap to it", even after "(none)" turned swapping off
        if (!ui.swapping.checked) {
          ui.swapping.checked = true;
          await setSwapping(true);
        }
      } else {
        // there is no "no face" on the server: passing through is swapping off
        ui.swapping.checked = false;
        await setSwapping(false);
      }
    } catch (err) {
      showError(err);
    }
  }

  async function onFileChange() {
    const files = Array.from(ui.faceFile.files);
    if (files.length === 0) {
      return;
    }
    ui.faceSample.value = "";
    if (!state.session) {
      state.pendingFiles = files; // sent right after connecting
      const label = files.length === 1 ? files[0].name : `${files.length} photos`;
      ui.faceName.textContent = `${label} (sent on Start)`;
      return;
    }
    try {
      await uploadFace(files);
      if (!ui.swapping.checked) {
        ui.swapping.checked = true;
        await setSwapping(true);
      }
    } catch (err) {
      showError(err);
    }
  }

  // ------------------------------------------------------------------ swapping

  async function setSwapping(enabled) {
    const reply = await api("POST", sessionPath(state.session, "/swapping"), {
      json: { enabled },
    });
    ui.swapping.checked = reply.enabled;
    cleared();
  }

  async function onSwappingChange() {
    if (!state.session) {
      return; // applied right after connecting
    }
    const wanted = ui.swapping.checked;
    try {
      await setSwapping(wanted);
    } catch (err) {
      ui.swapping.checked = !wanted;
      showError(err);
    }
  }

  // ------------------------------------------------------------------ connection

  function iceGatheringComplete(pc, ms) {
    if (pc.iceGatheringState === "complete") {
      return Promise.resolve();
    }
    return new Promise((resolve) => {
      const done = () => {
        clearTimeout(timer);
        pc.removeEventListener("icegatheringstatechange", check);
        resolve();
      };
      const check = () => {
        if (pc.iceGatheringState === "complete") {
          done();
        }
      };
      // host candidates come first; after the wait, send whatever was gathered
      const timer = setTimeout(done, ms);
      pc.addEventListener("icegatheringstatechange", check);
    });
  }

  function onConnectionState(pc, generation) {
    if (generation !== state.generation) {
      return;
    }
    const s = pc.connectionState;
    if (s === "connected") {
      if (!state.errorShown) {
        setStatus("connected");
      }
    } else if (s === "connecting" || s === "disconnected") {
      if (!state.errorShown) {
        setStatus("connecting");
      }
    } else if (s === "failed") {
      const id = state.session;
      teardown();
      showError(new Error("the connection failed"));
      closeOnServer(id);
    } else if (s === "closed") {
      teardown();
      setStatus("closed");
    }
  }

  // Choices made before the session existed: a refusal (no face in the photo, say) is
  // shown but keeps the connection.
  async function applyPending() {
    if (state.pendingFiles) {
      const files = state.pendingFiles;
      state.pendingFiles = null;
      try {
        await uploadFace(files);
      } catch (err) {
        ui.faceName.textContent = `${files.length === 1 ? files[0].name : "photos"} refused`;
        showError(err);
      }
    }
    if (!ui.swapping.checked) {
      await setSwapping(false).catch(showError);
    }
  }

  async function start() {
    if (state.pc) {
      return;
    }
    ui.start.disabled = true;
    ui.stop.disabled = false;
    setStatus("connecting");
    state.errorShown = false;
    const generation = state.generation;
    try {
      if (!navigator.mediaDevices || !navigator.mediaDevices.getUserMedia) {
        throw new Error("no camera access here (the page needs https or localhost)");
      }
      const camera = await navigator.mediaDevices.getUserMedia({
        video: { width: { ideal: 640 }, height: { ideal: 360 } },
        audio: false,
      });
      if (generation !== state.generation) {
        camera.getTracks().forEach((t) => t.stop()); // Stop was pressed meanwhile
        return;
      }
      state.camera = camera;
      ui.local.srcObject = camera;

      // Loopback and LAN only: no STUN/TURN, host candidates are enough.
      const pc = new RTCPeerConnection({ iceServers: [] });
      state.pc = pc;
      const [track] = camera.getVideoTracks();
      pc.addTransceiver(track, { direction: "sendrecv", streams: [camera] });
      pc.addEventListener("track", (event) => {
        if (generation !== state.generation) {
          return;
        }
        ui.remote.srcObject = event.streams[0] || new MediaStream([event.track]);
        // muted, so autoplay is allowed; AbortError only means a newer source replaced it
        ui.remote.play().catch((err) => {
          if (err.name !== "AbortError") {
            showError(new Error(`the video does not play: ${err.message}`));
          }
        });
        watchFrames(generation);
      });
      pc.addEventListener("connectionstatechange", () => onConnectionState(pc, generation));

      await pc.setLocalDescription(await pc.createOffer());
      await iceGatheringComplete(pc, ICE_GATHER_MS);
      const sample = state.pendingFiles ? null : ui.faceSample.value || null;
      const answer = await api("POST", "/sessions", {
        json: { sdp: pc.localDescription.sdp, type: "offer", face: sample },
      });
      if (generation !== state.generation) {
        closeOnServer(answer.session);
        return;
      }
      state.session = answer.session;
      ui.session.textContent = answer.session;
      ui.faceName.textContent = sample || "none";
      await pc.setRemoteDescription({ type: answer.type || "answer", sdp: answer.sdp });
      await applyPending();

      startTimers(generation);
    } catch (err) {
      if (generation === state.generation) {
        const id = state.session;
        teardown();
        showError(err);
        closeOnServer(id);
      }
    }
  }

  function teardown() {
    state.generation += 1;
    clearTimeout(state.statsTimer);
    clearInterval(state.fpsTimer);
    state.statsTimer = null;
    state.fpsTimer = null;
    if (state.pc) {
      state.pc.close();
      state.pc = null;
    }
    if (state.camera) {
      state.camera.getTracks().forEach((t) => t.stop());
      state.camera = null;
    }
    ui.remote.srcObject = null;
    ui.local.srcObject = null;
    state.session = null;
    state.rvfcFrames = 0;
    state.lastSample = null;
    ui.session.textContent = "none";
    ui.start.disabled = false;
    ui.stop.disabled = true;
  }

  function closeOnServer(id) {
    if (!id) {
      return;
    }
    api("DELETE", sessionPath(id)).catch(showError);
  }

  function stop() {
    const id = state.session;
    teardown();
    setStatus("closed");
    closeOnServer(id);
  }

  // The tab goes away: tell the server now rather than leave it to the idle timeout.
  function onPageHide() {
    const id = state.session;
    if (id) {
      const headers = authHeaders();
      if (headers.Authorization) {
        // sendBeacon cannot carry headers; a keepalive fetch outlives the page too
        fetch(API + sessionPath(id), { method: "DELETE", keepalive: true, headers }).catch(
          () => {},
        );
      } else if (!navigator.sendBeacon(API + sessionPath(id, "/close"))) {
        fetch(API + sessionPath(id, "/close"), { method: "POST", keepalive: true }).catch(
          () => {},
        );
      }
    }
    teardown();
    setStatus("closed");
  }

  // ------------------------------------------------------------------ on-screen stats

  function watchFrames(generation) {
    if (!hasFrameCallback) {
      return;
    }
    const onFrame = () => {
      if (generation !== state.generation) {
        return;
      }
      state.rvfcFrames += 1;
      ui.remote.requestVideoFrameCallback(onFrame);
    };
    ui.remote.requestVideoFrameCallback(onFrame);
  }

  async function decodedFrames(pc) {
    const report = await pc.getStats();
    let frames = null;
    report.forEach((entry) => {
      if (entry.type === "inbound-rtp" && entry.kind === "video") {
        frames = (frames || 0) + (entry.framesDecoded || 0);
      }
    });
    return frames;
  }

  // Received fps: frames painted (requestVideoFrameCallback) where the browser has it and
  // it has counted anything, else frames decoded (getStats).
  async function sampleFps(generation) {
    const pc = state.pc;
    if (!pc || generation !== state.generation) {
      return;
    }
    let frames = hasFrameCallback && state.rvfcFrames > 0 ? state.rvfcFrames : null;
    let source = "painted";
    if (frames === null) {
      frames = await decodedFrames(pc).catch(() => null);
      source = "decoded";
    }
    if (frames === null || generation !== state.generation) {
      return;
    }
    const now = performance.now();
    const last = state.lastSample;
    if (last && last.source === source && now > last.time) {
      ui.fps.textContent = number(((frames - last.frames) * 1000) / (now - last.time), 1);
    }
    state.lastSample = { frames, time: now, source };
  }

  async function pollStats(generation) {
    if (generation !== state.generation || !state.session) {
      return;
    }
    try {
      const s = await api("GET", sessionPath(state.session, "/stats"));
      if (generation !== state.generation) {
        return;
      }
      if (state.statsFailed) {
        state.statsFailed = false;
        cleared();
      }
      const latency = s.latency_ms || {};
      ui.latency.textContent = number(latency.p50, 0);
      ui.latencyP95.textContent = number(latency.p95, 0);
      ui.serverFps.textContent = number(s.fps, 1);
      ui.faces.textContent = Number.isInteger(s.faces) ? String(s.faces) : "-";
      if (s.face !== undefined) {
        ui.faceName.textContent = s.face || "none";
      }
    } catch (err) {
      if (generation !== state.generation) {
        return;
      }
      if (err.status === 404) {
        teardown();
        showError(new Error("the server closed this session"));
        return;
      }
      state.statsFailed = true;
      showError(err);
    }
    state.statsTimer = setTimeout(() => pollStats(generation), STATS_EVERY_MS);
  }

  function startTimers(generation) {
    state.fpsTimer = setInterval(() => sampleFps(generation).catch(showError), STATS_EVERY_MS);
    pollStats(generation);
  }

  // ------------------------------------------------------------------ wiring

  function onTokenChange() {
    const token = ui.token.value.trim();
    if (token) {
      sessionStorage.setItem(TOKEN_KEY, token);
    } else {
      sessionStorage.removeItem(TOKEN_KEY);
    }
    loadFaces()
      .then(() => {
        if (!state.pc) {
          setStatus("idle");
        }
      })
      .catch(showError);
  }

  function init() {
    if (sessionStorage.getItem(TOKEN_KEY)) {
      ui.token.value = sessionStorage.getItem(TOKEN_KEY);
      ui.tokenRow.hidden = false;
    }
    ui.start.addEventListener("click", start);
    ui.stop.addEventListener("click", stop);
    ui.swapping.addEventListener("change", onSwappingChange);
    ui.faceSample.addEventListener("change", onSampleChange);
    ui.faceFile.addEventListener("change", onFileChange);
    ui.token.addEventListener("change", onTokenChange);
    // Enter in the token field must not reload the page
    $("controls").addEventListener("submit", (event) => event.preventDefault());
    window.addEventListener("pagehide", onPageHide);
    window.addEventListener("unhandledrejection", (event) => showError(event.reason));
    if (!window.RTCPeerConnection) {
      ui.start.disabled = true;
      showError(new Error("this browser has no WebRTC (RTCPeerConnection)"));
      return;
    }
    loadFaces().catch(showError);
  }

  init();
})();
