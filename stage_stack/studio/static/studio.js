// stage-stack studio page: talks to the JSON API in stage_stack/studio/app.py.
// Playback sums the stems in the browser (Web Audio) so solo, mute, gain and auditioning a
// candidate are instant; "Apply gains to the mix" writes the gains into mix.wav on the server.
// wavesurfer.js draws the waveforms (from peaks computed here, so each file is fetched once).
"use strict";

const TOKEN = new URLSearchParams(location.search).get("token");
const $ = (sel) => document.querySelector(sel);

function withToken(url) {
  if (!TOKEN) return url;
  return url + (url.includes("?") ? "&" : "?") + "token=" + encodeURIComponent(TOKEN);
}

async function api(method, path, body, isForm) {
  const headers = {};
  if (TOKEN) headers["X-Studio-Token"] = TOKEN;
  const init = { method, headers };
  if (body !== undefined) {
    if (isForm) init.body = body;
    else { headers["Content-Type"] = "application/json"; init.body = JSON.stringify(body); }
  }
  const response = await fetch(withToken(path), init);
  let data = null;
  try { data = await response.json(); } catch (e) { data = null; }
  if (!response.ok) throw new Error((data && data.error) || `${response.status} ${response.statusText}`);
  return data;
}

function say(message, kind) {
  const el = $("#status");
  el.textContent = message || "";
  el.className = kind || "";
}

function fmtTime(t) {
  const m = Math.floor(t / 60), s = t - 60 * m;
  return `${m}:${s.toFixed(1).padStart(4, "0")}`;
}

// -- state ----------------------------------------------------------------------------------
const studio = {
  songName: null,
  song: null,             // GET /api/songs/{song}
  instruments: [],
  lanes: [],              // {name, kind, picked, audition, urls, gain_db, muted, solo, el, ws, node}
  buffers: new Map(),     // url -> AudioBuffer (urls carry the file's digest, so a changed file is new)
  job: null,
  pollTimer: null,
};
const audio = { ctx: null, master: null, playing: false, startedAt: 0, offset: 0, sources: [] };

function audioContext() {
  if (!audio.ctx) {
    audio.ctx = new AudioContext();
    // roughly the song's limiter (-1 dBTP), so the sum of the stems does not clip in the browser
    audio.master = audio.ctx.createDynamicsCompressor();
    audio.master.threshold.value = -1; audio.master.knee.value = 0; audio.master.ratio.value = 20;
    audio.master.attack.value = 0.003; audio.master.release.value = 0.08;
    audio.master.connect(audio.ctx.destination);
  }
  return audio.ctx;
}

async function bufferFor(url) {
  if (!studio.buffers.has(url)) {
    studio.buffers.set(url, (async () => {
      const response = await fetch(withToken(url), { headers: TOKEN ? { "X-Studio-Token": TOKEN } : {} });
      if (!response.ok) throw new Error(`could not load ${url}: ${response.status}`);
      return audioContext().decodeAudioData(await response.arrayBuffer());
    })());
  }
  return studio.buffers.get(url);
}

function peaksOf(buffer, points = 1600) {
  const data = buffer.getChannelData(0), step = Math.max(1, Math.floor(data.length / points)), out = [];
  for (let i = 0; i < data.length; i += step) {
    let peak = 0;
    for (let j = i; j < Math.min(i + step, data.length); j++) peak = Math.max(peak, Math.abs(data[j]));
    out.push(peak);
  }
  return out;
}

// -- songs ----------------------------------------------------------------------------------
async function loadSongList(select) {
  const { songs } = await api("GET", "/api/songs");
  const el = $("#song-select");
  el.innerHTML = "";
  for (const name of songs) el.add(new Option(name, name));
  if (!songs.length) el.add(new Option("(no songs yet)", ""));
  if (select) el.value = select;
  return songs;
}

async function openSong(name) {
  stop();
  studio.songName = name;
  if (!name) { showStart(); return; }
  const params = new URLSearchParams(location.search);
  params.set("song", name);  // a reload comes back to this song (the token stays in the URL)
  history.replaceState(null, "", "?" + params);
  $("#start").hidden = true;
  $("#song").hidden = false;
  $("#song-select").value = name;
  await refresh();
}

function showStart() {
  stop();
  $("#start").hidden = false;
  $("#song").hidden = true;
  const used = new Set([...$("#song-select").options].map((o) => o.value));
  for (const form of ["#click-form", "#upload-form"]) {
    const input = $(form).elements.name;
    let n = 1, base = input.value.replace(/-\d+$/, "") || (form === "#click-form" ? "song" : "mix");
    while (used.has(`${base}-${n}`)) n++;
    input.value = `${base}-${n}`;
  }
}

async function refresh() {
  const song = await api("GET", `/api/songs/${encodeURIComponent(studio.songName)}`);
  studio.song = song;
  const old = new Map(studio.lanes.map((l) => [l.name, l]));
  studio.lanes = [];
  if (song.context) studio.lanes.push({ name: "context", kind: "context", label: `your mix (${song.context.source})`,
    picked: 0, urls: [song.context.file], gain_db: 0 });
  for (const layer of song.layers) {
    const before = old.get(layer.name);
    studio.lanes.push({ name: layer.name, kind: "layer", layer, picked: layer.picked, audition: null,
      urls: layer.candidates, gain_db: layer.gain_db,
      muted: before ? before.muted : false, solo: before ? before.solo : false });
  }
  renderSong();
  if (song.job && (!studio.job || studio.job.id !== song.job.id)) watchJob(song.job);
}

function renderSong() {
  const song = studio.song;
  const bpm = song.bpm === null ? "no tempo" : `${song.bpm} BPM`;
  $("#song-info").textContent = `${song.name}: ${song.duration} s, ${bpm}, ${song.sample_rate} Hz`;
  $("#no-layers").hidden = song.layers.length > 0;
  $("#undo").disabled = !song.can_undo;
  updateDownload();
  const lanes = $("#lanes");
  lanes.innerHTML = "";
  if (song.layers.length) lanes.append(playhead());
  for (const lane of studio.lanes) lanes.append(renderLane(lane));
  const hist = $("#history");
  hist.innerHTML = "";
  for (const entry of song.history) {  // newest first; Undo goes back one
    const li = document.createElement("li");
    const when = new Date(entry.time).toLocaleTimeString();
    li.innerHTML = `<span class="hint"></span> <strong></strong> <span></span>`;
    li.querySelector(".hint").textContent = when;
    li.querySelector("strong").textContent = entry.action === "arrange" && !entry.detail ? "new song" : entry.action;
    li.querySelector("span:last-child").textContent = entry.detail + (entry.current ? " (now)" : "");
    li.title = `layers: ${entry.layers.join(", ") || "none"}`;
    if (entry.current) li.classList.add("current");
    hist.append(li);
  }
  gainsChanged();
  tick();
}

function playhead() {
  const el = document.createElement("div");
  el.id = "playhead";
  return el;
}

function renderLane(lane) {
  const el = $("#lane-template").content.firstElementChild.cloneNode(true);
  lane.el = el;
  el.dataset.layer = lane.name;
  el.classList.add(lane.kind);
  el.querySelector(".lane-name").textContent = lane.kind === "layer" ? lane.name : lane.label;
  const controls = el.querySelector(".lane-controls");
  if (lane.kind === "layer") {
    const l = lane.layer;
    el.querySelector(".lane-meta").textContent =
      `${l.instrument !== l.name ? l.instrument + ", " : ""}take ${l.take}, seed ${l.seed}${l.prompt ? `, “${l.prompt}”` : ""}` +
      (l.hears ? `, hears ${l.hears.length ? l.hears.join(" + ") : "no layer"}` : "") +
      (l.chords ? `, chords ${l.chords === "heard" ? "heard in the mix" : "its own"}` : "") +
      (l.beats === "heard" ? ", beats heard in the mix" : "");
    if (l.stale) {
      const badge = document.createElement("span");
      badge.className = "badge stale";
      badge.textContent = "stale";
      badge.title = "It was generated against an earlier version of the layers before it; Redo regenerates it";
      el.querySelector(".lane-badges").append(badge);
    }
    const chips = el.querySelector(".candidates");
    lane.urls.forEach((url, i) => {
      const chip = document.createElement("button");
      chip.className = "chip small";
      chip.textContent = String(i);
      chip.title = i === lane.picked ? `candidate ${i} (picked)` : `listen to candidate ${i} in the mix`;
      chip.addEventListener("click", () => audition(lane, i));
      chips.insertBefore(chip, chips.querySelector(".keep"));
    });
    el.querySelector(".keep").addEventListener("click", () => keep(lane));
    el.querySelector(".redo").addEventListener("click", () => redo(lane, false));
    el.querySelector(".redo-after").addEventListener("click", () => redo(lane, true));
    el.querySelector(".remove").addEventListener("click", () => removeLayer(lane));
    const index = studio.song.layers.findIndex((x) => x.name === lane.name);
    el.querySelector(".redo-after").hidden = index === studio.song.layers.length - 1;
  } else {
    el.querySelector(".lane-actions").remove();
    el.querySelector(".candidates").remove();
    el.querySelector(".gain").remove();
  }
  el.querySelector(".mute").addEventListener("click", () => { lane.muted = !lane.muted; updateGains(); });
  el.querySelector(".solo").addEventListener("click", () => { lane.solo = !lane.solo; updateGains(); });
  const range = el.querySelector(".gain input");
  if (range) {
    range.value = lane.gain_db;
    el.querySelector(".gain output").textContent = `${(+lane.gain_db).toFixed(1)} dB`;
    range.addEventListener("input", () => {
      lane.gain_db = +range.value;
      el.querySelector(".gain output").textContent = `${lane.gain_db.toFixed(1)} dB`;
      updateGains();
      gainsChanged();
    });
  }
  el.querySelector(".wave").addEventListener("click", (event) => {
    const rect = event.currentTarget.getBoundingClientRect();
    seek(((event.clientX - rect.left) / rect.width) * studio.song.duration);
  });
  updateLane(lane);
  drawWave(lane);
  return el;
}

function currentUrl(lane) {
  return lane.urls[lane.audition !== null && lane.audition !== undefined ? lane.audition : lane.picked];
}

async function drawWave(lane) {
  const url = currentUrl(lane);
  const container = lane.el.querySelector(".wave");
  try {
    const buffer = await bufferFor(url);
    if (currentUrl(lane) !== url || !container.isConnected) return;
    container.innerHTML = "";
    const color = lane.kind === "context" ? "#8a94a6" : lane.audition !== null && lane.audition !== lane.picked ? "#e0a030" : "#4f8cc9";
    lane.ws = WaveSurfer.create({ container, height: 56, waveColor: color, progressColor: color, cursorWidth: 0,
      interact: false, normalize: true, barWidth: 2, barGap: 1, barRadius: 1,
      peaks: [peaksOf(buffer)], duration: buffer.duration });
    container.dataset.ready = url;
  } catch (e) {
    container.textContent = e.message;
  }
}

function updateLane(lane) {
  const el = lane.el;
  el.querySelector(".mute").classList.toggle("on", !!lane.muted);
  el.querySelector(".solo").classList.toggle("on", !!lane.solo);
  el.classList.toggle("silent", gainOf(lane) === 0);
  if (lane.kind !== "layer") return;
  const shown = lane.audition !== null ? lane.audition : lane.picked;
  el.querySelectorAll(".chip").forEach((chip, i) => {
    chip.classList.toggle("picked", i === lane.picked);
    chip.classList.toggle("shown", i === shown);
  });
  el.querySelector(".keep").hidden = lane.audition === null || lane.audition === lane.picked;
  el.querySelector(".keep").textContent = `Keep candidate ${shown}`;
}

// -- playback -------------------------------------------------------------------------------
function gainOf(lane) {
  const anySolo = studio.lanes.some((l) => l.solo);
  if (anySolo ? !lane.solo : lane.muted) return 0;
  return Math.pow(10, (lane.gain_db || 0) / 20);
}

function updateGains() {
  for (const lane of studio.lanes) {
    if (lane.node) lane.node.gain.value = gainOf(lane);
    if (lane.el) updateLane(lane);
  }
}

function gainsChanged() {
  const changed = studio.song && studio.song.layers.some((l) => {
    const lane = studio.lanes.find((x) => x.name === l.name);
    return lane && Math.abs(lane.gain_db - l.gain_db) > 1e-9;
  });
  $("#apply-gains").disabled = !changed;
}

function position() {
  return audio.playing ? audio.ctx.currentTime - audio.startedAt : audio.offset;
}

async function play() {
  if (!studio.song || !studio.lanes.length) return;
  const ctx = audioContext();
  await ctx.resume();
  say("loading audio…");
  let buffers;
  try {
    buffers = await Promise.all(studio.lanes.map((lane) => bufferFor(currentUrl(lane))));
  } catch (e) { say(e.message, "error"); return; }
  say("");
  stopSources();
  if (audio.offset >= studio.song.duration - 0.01) audio.offset = 0;
  const when = ctx.currentTime + 0.05;
  studio.lanes.forEach((lane, i) => {
    const source = ctx.createBufferSource();
    source.buffer = buffers[i];
    lane.node = ctx.createGain();
    lane.node.gain.value = gainOf(lane);
    source.connect(lane.node).connect(audio.master);
    source.start(when, audio.offset);
    audio.sources.push(source);
  });
  audio.startedAt = when - audio.offset;
  audio.playing = true;
  $("#play").innerHTML = "&#10074;&#10074;";
  $("#play").setAttribute("aria-label", "pause");
  requestAnimationFrame(tick);
}

function stopSources() {
  for (const source of audio.sources) { try { source.stop(); } catch (e) { /* not started */ } }
  audio.sources = [];
}

function pause() {
  if (!audio.playing) return;
  audio.offset = position();
  audio.playing = false;
  stopSources();
  $("#play").innerHTML = "&#9654;";
  $("#play").setAttribute("aria-label", "play");
  tick();
}

function stop() {
  pause();
  audio.offset = 0;
  tick();
}

function seek(t) {
  const wasPlaying = audio.playing;
  pause();
  audio.offset = Math.max(0, Math.min(t, studio.song.duration));
  if (wasPlaying) play(); else tick();
}

function tick() {
  if (!studio.song) return;
  let t = position();
  if (audio.playing && t >= studio.song.duration) { pause(); audio.offset = 0; t = studio.song.duration; }
  $("#time").textContent = `${fmtTime(Math.min(t, studio.song.duration))} / ${fmtTime(studio.song.duration)}`;
  $("#time").dataset.seconds = t.toFixed(3);
  const head = $("#playhead"), wave = document.querySelector(".lane .wave");
  if (head && wave) {
    const lanes = $("#lanes").getBoundingClientRect(), rect = wave.getBoundingClientRect();
    head.style.left = `${rect.left - lanes.left + (t / studio.song.duration) * rect.width}px`;
  }
  if (audio.playing) requestAnimationFrame(tick);
}

function audition(lane, i) {
  lane.audition = i === lane.picked ? null : i;
  updateLane(lane);
  drawWave(lane);
  if (audio.playing) { const t = position(); pause(); audio.offset = t; play(); }
}

// -- actions --------------------------------------------------------------------------------
async function act(label, fn) {
  say(label + "…");
  try {
    await fn();
    say("");
  } catch (e) {
    say(e.message, "error");
  }
}

const songPath = () => `/api/songs/${encodeURIComponent(studio.songName)}`;

function keep(lane) {
  return act(`keeping candidate ${lane.audition} of ${lane.name}`, async () => {
    await api("POST", `${songPath()}/layers/${encodeURIComponent(lane.name)}/pick`, { candidate: lane.audition });
    await refresh();
  });
}

function redo(lane, downstream) {
  return act(`redoing ${lane.name}`, async () => {
    watchJob(await api("POST", `${songPath()}/layers/${encodeURIComponent(lane.name)}/redo`, { downstream }));
  });
}

function removeLayer(lane) {
  if (!confirm(`Remove ${lane.name}? Undo brings it back.`)) return;
  return act(`removing ${lane.name}`, async () => {
    await api("DELETE", `${songPath()}/layers/${encodeURIComponent(lane.name)}`);
    await refresh();
  });
}

function undo() {
  return act("undoing", async () => {
    await api("POST", `${songPath()}/undo`, {});
    await refresh();
  });
}

function applyGains() {
  const gains = {};
  for (const lane of studio.lanes) {  // only the changed ones: a gain change makes later layers stale
    if (lane.kind === "layer" && Math.abs(lane.gain_db - lane.layer.gain_db) > 1e-9) gains[lane.name] = lane.gain_db;
  }
  return act("re-mixing", async () => {
    await api("POST", `${songPath()}/mix`, { gains });
    await refresh();
  });
}

function updateDownload() {
  const fmt = $("#export-format").value, rate = $("#export-rate").value;
  const link = $("#download");
  link.href = withToken(`${songPath()}/export.zip?format=${fmt}&rate=${rate}`);
  link.setAttribute("download", `${studio.songName}.zip`);
  link.classList.toggle("disabled", !studio.song || !studio.song.layers.length);
}

// -- jobs -----------------------------------------------------------------------------------
function watchJob(job) {
  studio.job = job;
  clearTimeout(studio.pollTimer);
  showJob(job);
  const poll = async () => {
    try {
      const now = await api("GET", `/api/jobs/${job.id}`);
      studio.job = now;
      showJob(now);
      if (now.state === "queued" || now.state === "running") { studio.pollTimer = setTimeout(poll, 300); return; }
      studio.job = null;
      if (now.state === "failed") say(`${now.action} failed: ${now.error}`, "error");
      else if (now.state === "cancelled") say(`${now.action} was cancelled; the song is as it was`);
      else say(`${now.action}: done`);
      if (now.song === studio.songName) await refresh();
    } catch (e) { say(e.message, "error"); }
  };
  studio.pollTimer = setTimeout(poll, 200);
}

function showJob(job) {
  const active = job && (job.state === "queued" || job.state === "running");
  $("#job").hidden = !active;
  $("#generate").disabled = !!active && job.song === studio.songName;  // other songs' jobs queue behind it
  if (!active) {  // nothing left over for the next job to show before its first report
    $("#job-steps").textContent = "";
    $("#job-bar").style.width = "0%";
    return;
  }
  const label = job.state === "queued"
    ? `${job.action}: waiting, ${job.position - 1 === 0 ? "next in line" : `${job.position - 1} job(s) ahead`}`
    : `${job.action}` + (job.layers > 1 ? ` (layer ${job.index + 1} of ${job.layers}: ${job.layer})` : "");
  $("#job-label").textContent = (job.song !== studio.songName ? `[${job.song}] ` : "") + label;
  const frac = job.steps ? (job.index + job.step / job.steps) / job.layers : 0;
  $("#job-bar").style.width = `${(100 * frac).toFixed(1)}%`;
  $("#job-steps").textContent = job.state === "queued" ? "" :
    job.steps ? `decoding step ${job.step} of ${job.steps}` : "loading the expert…";
}

// -- forms ----------------------------------------------------------------------------------
async function loadInstruments() {
  const { instruments } = await api("GET", "/api/instruments");
  studio.instruments = instruments;
  const select = $("#instrument-select");
  select.innerHTML = "";
  for (const inst of instruments) {
    const option = new Option(inst.installed ? inst.name : `${inst.name} (not installed)`, inst.name);
    option.disabled = !inst.installed;
    select.add(option);
  }
  const missing = instruments.filter((i) => !i.installed);
  const hint = $("#install-hint");
  hint.hidden = !missing.length;
  hint.innerHTML = missing.length ? "<strong>Not installed</strong> (run in a terminal, then reload):" : "";
  for (const inst of missing) {
    const line = document.createElement("div");
    line.innerHTML = `<span></span> <code></code>`;
    line.querySelector("span").textContent = inst.name + ":";
    line.querySelector("code").textContent = inst.install || inst.message || "see stage-stack instruments";
    hint.append(line);
  }
}

function numberOrNull(value) { return value === "" || value === null ? null : Number(value); }

async function addLayer(event) {
  event.preventDefault();
  const f = event.target.elements;
  const body = { instrument: f.instrument.value, candidates: Number(f.candidates.value), sampling: {} };
  for (const key of ["temperature", "top_k", "cfg"]) {  // left empty: the expert's own sampling
    const value = numberOrNull(f[key].value);
    if (value !== null) body.sampling[key] = value;
  }
  if (f.name.value) body.name = f.name.value;
  if (f.seed.value !== "") body.seed = Number(f.seed.value);
  if (f.prompt.value) body.prompt = f.prompt.value;
  if (f.click.value) body.click = f.click.value;
  if (f.chords.value) body.chords = f.chords.value;
  if (f.beats.value) body.beats = f.beats.value;
  const hears = f.hears.value.trim();
  if (hears === "-") body.hears = [];  // no earlier layer: an empty field already means the default
  else if (hears) body.hears = hears.split(",").map((n) => n.trim()).filter((n) => n);
  await act(`adding ${body.name || body.instrument}`, async () => {
    watchJob(await api("POST", `${songPath()}/layers`, body));
    f.name.value = "";
  });
}

async function startFromClick(event) {
  event.preventDefault();
  const f = event.target.elements;
  await act("starting the song", async () => {
    const song = await api("POST", "/api/songs", { name: f.name.value, bpm: Number(f.bpm.value),
      duration: Number(f.duration.value), seed: Number(f.seed.value) });
    await loadSongList(song.name);
    await openSong(song.name);
  });
}

let droppedFile = null;
async function startFromUpload(event) {
  event.preventDefault();
  const f = event.target.elements;
  const file = droppedFile || f.file.files[0];
  if (!file) { say("choose or drop an audio file first", "error"); return; }
  const form = new FormData();
  form.append("file", file);
  form.append("name", f.name.value);
  form.append("seed", f.seed.value || "0");
  if (f.bpm.value) form.append("bpm", f.bpm.value);
  await act(`uploading ${file.name}`, async () => {
    const song = await api("POST", "/api/songs/upload", form, true);
    await loadSongList(song.name);
    await openSong(song.name);
  });
}

function setupDropZone() {
  const zone = $("#drop-zone");
  const show = (file) => { droppedFile = file; $("#drop-name").textContent = file ? `${file.name} (${(file.size / 1e6).toFixed(1)} MB)` : ""; };
  zone.addEventListener("dragover", (e) => { e.preventDefault(); zone.classList.add("over"); });
  zone.addEventListener("dragleave", () => zone.classList.remove("over"));
  zone.addEventListener("drop", (e) => {
    e.preventDefault();
    zone.classList.remove("over");
    if (e.dataTransfer.files.length) show(e.dataTransfer.files[0]);
  });
  $("#upload-file").addEventListener("change", (e) => show(e.target.files[0]));
}

// -- start ----------------------------------------------------------------------------------
async function main() {
  $("#play").addEventListener("click", () => (audio.playing ? pause() : play()));
  $("#stop").addEventListener("click", stop);
  $("#undo").addEventListener("click", undo);
  $("#apply-gains").addEventListener("click", applyGains);
  $("#cancel").addEventListener("click", () => studio.job && act("cancelling", () => api("POST", `/api/jobs/${studio.job.id}/cancel`)));
  $("#export-format").addEventListener("change", updateDownload);
  $("#export-rate").addEventListener("change", updateDownload);
  $("#song-select").addEventListener("change", (e) => openSong(e.target.value));
  $("#new-song-button").addEventListener("click", showStart);
  $("#click-form").addEventListener("submit", startFromClick);
  $("#upload-form").addEventListener("submit", startFromUpload);
  $("#add-form").addEventListener("submit", addLayer);
  $("#download").addEventListener("click", (e) => { if (e.currentTarget.classList.contains("disabled")) e.preventDefault(); });
  document.addEventListener("keydown", (e) => {
    if (e.code === "Space" && !["INPUT", "SELECT", "TEXTAREA", "BUTTON"].includes(e.target.tagName)) {
      e.preventDefault();
      audio.playing ? pause() : play();
    }
  });
  window.addEventListener("resize", tick);
  setupDropZone();
  try {
    await loadInstruments();
    const songs = await loadSongList();
    const wanted = new URLSearchParams(location.search).get("song");
    if (wanted && songs.includes(wanted)) await openSong(wanted);
    else if (songs.length) await openSong(songs[songs.length - 1]);
    else showStart();
    const { jobs } = await api("GET", "/api/jobs");
    const active = jobs.find((j) => j.state === "queued" || j.state === "running");
    if (active && !studio.job) watchJob(active);
  } catch (e) {
    say(e.message, "error");
  }
  document.body.dataset.ready = "1";
}

main();
