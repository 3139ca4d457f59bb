// The service's page: images (or a drawing) to POST /predict?explain=true&return_csm=true, the answer drawn.
// Same-origin requests only; no library. With a read token, /info answers 401: the page asks for the token,
// keeps it in this tab's sessionStorage and sends it as a bearer token with its own requests.
"use strict";

const state = { info: null, alpha: null };
const $ = (id) => document.getElementById(id);
const TOKEN_KEY = "gga-read-token";

function authHeaders() {
  const token = sessionStorage.getItem(TOKEN_KEY);
  return token ? { authorization: `Bearer ${token}` } : {};
}

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "text") node.textContent = v;
    else if (k === "style") Object.assign(node.style, v);
    else node.setAttribute(k, v);
  }
  for (const child of children) node.append(child);
  return node;
}

function say(message, isError = false) {
  const status = $("status");
  status.textContent = message;
  status.classList.toggle("error", isError);
}

async function loadInfo() {
  const response = await fetch("info", { headers: { accept: "application/json", ...authHeaders() } });
  if (response.status === 401) {
    const had = sessionStorage.getItem(TOKEN_KEY) !== null;
    sessionStorage.removeItem(TOKEN_KEY);
    $("model-line").textContent = had ? "That token was refused; enter the read token." :
      "Enter the service's read token to use this page.";
    $("token-form").hidden = false;
    $("token").focus();
    return;
  }
  $("token-form").hidden = true;
  if (!response.ok) {
    $("model-line").textContent = `/info answered ${response.status}: ${await errorText(response)}`;
    return;
  }
  const info = await response.json();
  state.info = info;
  state.alpha = info.alpha;
  const det = info.detector;
  $("model-line").textContent = `Model ${info.model} (${info.class_names.length} classes, input ` +
    `${info.input_shape.join("×")}), detector ${det ? det.kind + " " + info.detector_version : "none yet"}, ` +
    `alpha ${info.alpha}.`;
  const prep = info.preprocessing;
  if (prep && prep.color_mode === "L") $("draw").hidden = false;
  if (!prep) say("This model takes no images.", true);
}

async function errorText(response) {
  try {
    const doc = await response.json();
    return doc.error ? `${doc.error.type}: ${doc.error.message}` : JSON.stringify(doc);
  } catch (e) {
    return response.statusText;
  }
}

async function predict(body, names) {
  say(`Sending ${names.length} image(s)…`);
  let response;
  try {
    response = await fetch("predict?explain=true&return_csm=true", { method: "POST", body: body.data,
      headers: { ...authHeaders(), ...(body.type ? { "content-type": body.type } : {}) } });
  } catch (e) {
    say(`The service could not be reached: ${e}`, true);
    return;
  }
  if (!response.ok) {
    say(`The service answered ${response.status}: ${await errorText(response)}`, true);
    return;
  }
  const doc = await response.json();
  state.alpha = doc.alpha;
  doc.predictions.forEach((p, i) => $("results").prepend(resultCard(p, names[i], doc.alpha)));
  const flagged = doc.predictions.filter((p) => p.flagged).length;
  say(`${doc.predictions.length} prediction(s), ${flagged} flagged.`);
}

function sendFiles(fileList) {
  const files = Array.from(fileList).filter((f) => /^image\/(png|jpeg|webp)$/.test(f.type));
  if (!files.length) {
    say("Choose PNG, JPEG or WebP images.", true);
    return;
  }
  const form = new FormData();
  for (const f of files) form.append("file", f, f.name);
  predict({ data: form, type: null }, files.map((f) => ({ name: f.name, blob: f })));
}

function pct(v) {
  return `${(100 * v).toFixed(1)}%`;
}

function fmtP(p) {
  if (p === null || p === undefined) return "n/a";
  return p < 0.001 ? p.toExponential(1) : p.toFixed(3);
}

function resultCard(p, source, alpha) {
  const card = el("li", { class: "card" + (p.flagged ? " flagged" : ""), "data-label": String(p.label),
    "data-flagged": String(p.flagged) });
  const img = el("img", { alt: `input ${source.name}`, class: "thumb" });
  img.src = URL.createObjectURL(source.blob);
  const verdict = p.flagged ? "Flagged: do not act on this prediction" : "Trusted";
  card.append(
    el("div", { class: "head" }, img, el("div", {},
      el("h3", {}, el("span", { class: "label", text: p.label_name }),
        el("span", { class: "confidence", text: ` · confidence ${pct(p.confidence)}` })),
      el("p", { class: "source", text: source.name }),
      el("p", { class: "verdict", text: `${verdict} (trust ${fmtP(p.trust)}, alpha ${alpha})` }))),
    el("p", { class: "top", text: "Top classes: " + p.top_classes.map((c) => c.name).join(", ") }),
  );
  const panels = el("div", { class: "panels" });
  if (p.csm) panels.append(heatmap(p.csm, p.top_classes));
  if (p.components) panels.append(bars(p.components, alpha));
  card.append(panels);
  return card;
}

function colour(v) {
  const t = Math.max(-1, Math.min(1, v));
  const fade = Math.round(255 * (1 - Math.abs(t)));
  return t >= 0 ? `rgb(${fade}, ${fade}, 255)` : `rgb(255, ${fade}, ${fade})`;
}

function heatmap(csm, top) {
  const n = csm.length;
  const names = Array.from({ length: n }, (_, i) => (top[i] ? top[i].name : `#${i + 1}`));
  const grid = el("div", { class: "heatmap", role: "table", "data-n": String(n),
    "aria-label": `cosine similarity matrix, ${n} by ${n}, predicted class first`,
    style: { gridTemplateColumns: `auto repeat(${n}, minmax(0, 1fr))` } });
  grid.append(el("span", { class: "corner", role: "columnheader" }));
  names.forEach((name) => grid.append(el("span", { class: "colhead", role: "columnheader", text: name })));
  csm.forEach((row, i) => {
    grid.append(el("span", { class: "rowhead", role: "rowheader", text: names[i] }));
    row.forEach((v, j) => grid.append(el("span", { class: "cell", role: "cell", title:
      `${names[i]} · ${names[j]}: ${v.toFixed(3)}`, "aria-label": v.toFixed(2), style: { background: colour(v) } })));
  });
  return el("figure", {}, el("figcaption", { text: "Gradient cosine similarities" }), grid);
}

function bars(components, alpha) {
  const cap = 6;
  const scale = (p) => Math.min(cap, -Math.log10(Math.max(p, 1e-300))) / cap;
  const list = el("ul", { class: "bars" });
  for (const c of components) {
    const p = c.p_value;
    const low = p !== null && p < alpha;
    const track = el("span", { class: "track" },
      el("span", { class: "bar" + (low ? " low" : ""), style: { width: p === null ? "0" : `${100 * scale(p)}%` } }),
      el("span", { class: "alpha", style: { left: `${100 * scale(alpha)}%` } }));
    list.append(el("li", { "data-name": c.name }, el("span", { class: "name", text: c.name }), track,
      el("span", { class: "p", text: `p ${fmtP(p)}${low ? " < alpha" : ""}` })));
  }
  return el("figure", {}, el("figcaption", { text: "Signals (−log10 p; line: alpha)" }), list);
}

function setupToken() {
  $("token-form").addEventListener("submit", (e) => {
    e.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, $("token").value.trim());
    $("token").value = "";
    loadInfo().catch((err) => say(`The page could not read /info: ${err}`, true));
  });
}

function setupDrop() {
  const drop = $("drop");
  const input = $("files");
  input.addEventListener("change", () => {
    if (input.files.length) sendFiles(input.files);
    input.value = "";
  });
  drop.addEventListener("keydown", (e) => {
    if (e.target === drop && (e.key === "Enter" || e.key === " ")) {
      e.preventDefault();
      input.click();
    }
  });
  drop.addEventListener("dragover", (e) => {
    e.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (e) => {
    e.preventDefault();
    drop.classList.remove("over");
    sendFiles(e.dataTransfer.files);
  });
}

function setupPad() {
  const pad = $("pad");
  const ctx = pad.getContext("2d");
  let last = null;
  const clear = () => {
    ctx.fillStyle = "#000";
    ctx.fillRect(0, 0, pad.width, pad.height);
  };
  const point = (e) => {
    const r = pad.getBoundingClientRect();
    return [(e.clientX - r.left) * pad.width / r.width, (e.clientY - r.top) * pad.height / r.height];
  };
  clear();
  ctx.strokeStyle = "#fff";
  ctx.lineWidth = 22;
  ctx.lineCap = ctx.lineJoin = "round";
  pad.addEventListener("pointerdown", (e) => {
    pad.setPointerCapture(e.pointerId);
    last = point(e);
    ctx.beginPath();
    ctx.arc(last[0], last[1], ctx.lineWidth / 2, 0, 2 * Math.PI);
    ctx.fillStyle = "#fff";
    ctx.fill();
  });
  pad.addEventListener("pointermove", (e) => {
    if (!last) return;
    const next = point(e);
    ctx.beginPath();
    ctx.moveTo(last[0], last[1]);
    ctx.lineTo(next[0], next[1]);
    ctx.stroke();
    last = next;
  });
  const stop = () => { last = null; };
  pad.addEventListener("pointerup", stop);
  pad.addEventListener("pointercancel", stop);
  $("clear-drawing").addEventListener("click", clear);
  $("predict-drawing").addEventListener("click", () => {
    pad.toBlob((blob) => predict({ data: blob, type: "image/png" }, [{ name: "drawing", blob }]), "image/png");
  });
}

setupToken();
setupDrop();
setupPad();
loadInfo().catch((e) => say(`The page could not read /info: ${e}`, true));
