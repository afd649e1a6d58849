// classic-cnn explorer: plain JavaScript, no framework, no build step, nothing from outside.
// Every number shown comes from the JSON API (/api/...); the page only draws it.
"use strict";

const $ = (sel) => document.querySelector(sel);
const el = (tag, attrs = {}, ...children) => {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") e.className = v;
    else if (k === "text") e.textContent = v;
    else e.setAttribute(k, v);
  }
  for (const c of children) e.append(c);
  return e;
};
const fmt = (v, digits = 4) => {
  if (!Number.isFinite(v)) return String(v);
  if (v === 0) return "0";
  const a = Math.abs(v);
  if (a >= 1e4 || a < 1e-3) return v.toExponential(2);
  return Number(v.toPrecision(digits)).toString();
};
const shapeText = (s) => s.join("×");

// ---------------------------------------------------------------------------------------------
// state, and a count of requests in flight (tests wait for window.explorer.idle())

const state = {
  summary: null,
  seen: null, // the uint8 image the network sees, H×W×C nested lists
  maps: null, // the last /api/maps answer
  pick: null, // {layer, row, col, channel} of the explained unit
  pending: 0,
  drawDirty: false,
  drawBusy: false,
  inputSeq: 0, // the newest input; older answers are dropped
  ops: 0, // user actions still being answered (a file, a test image, a click)
  why: null, // the last /api/why answer shown over the input
};
window.explorer = {
  state,
  idle: () => state.ops === 0 && state.pending === 0 && !state.drawDirty && !state.drawBusy,
};
// an action's whole chain of requests counts as one operation, so idle() has no gaps
const track = (fn) => async (...args) => {
  state.ops += 1;
  try {
    return await fn(...args);
  } finally {
    state.ops -= 1;
  }
};

async function api(path, options = {}) {
  state.pending += 1;
  document.body.dataset.pending = String(state.pending);
  try {
    const response = await fetch(path, options);
    let body = null;
    try {
      body = await response.json();
    } catch (e) {
      body = { detail: `the server answered ${response.status} without JSON` };
    }
    if (!response.ok) {
      const detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      throw new ApiError(detail, response.status);
    }
    return body;
  } finally {
    state.pending -= 1;
    document.body.dataset.pending = String(state.pending);
  }
}
class ApiError extends Error {
  constructor(message, status) {
    super(message);
    this.status = status;
  }
}
const postJSON = (path, body) =>
  api(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });

function showMessage(text) {
  const m = $("#message");
  m.textContent = text || "";
  m.hidden = !text;
}

// ---------------------------------------------------------------------------------------------
// colours: one stated scale per layer (as classic_cnn.viz.arrays.map_grid computes it)

const VIRIDIS = [
  [68, 1, 84], [59, 82, 139], [33, 145, 140], [94, 201, 98], [253, 231, 37],
];
function ramp(stops, t) {
  t = Math.min(1, Math.max(0, t));
  const x = t * (stops.length - 1);
  const i = Math.min(stops.length - 2, Math.floor(x));
  const f = x - i;
  return stops[i].map((c, k) => Math.round(c + (stops[i + 1][k] - c) * f));
}
const DIVERGING = [[33, 102, 172], [146, 197, 222], [247, 247, 247], [244, 165, 130], [178, 24, 43]];
function colourFor(v, layer) {
  if (layer.signed) return ramp(DIVERGING, (v - layer.vmin) / (layer.vmax - layer.vmin));
  return ramp(VIRIDIS, layer.vmax > 0 ? v / layer.vmax : 0);
}
function legend(layer) {
  const c = el("canvas", { width: 90, height: 1 });
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(90, 1);
  for (let i = 0; i < 90; i++) {
    const v = layer.vmin + ((layer.vmax - layer.vmin) * i) / 89;
    const [r, g, b] = colourFor(v, layer);
    img.data.set([r, g, b, 255], i * 4);
  }
  ctx.putImageData(img, 0, 0);
  const lo = el("span", { text: fmt(layer.vmin, 3) });
  const hi = el("span", { text: fmt(layer.vmax, 3) });
  const words = layer.signed ? " (blue negative, white 0, red positive)" : " (0 dark, largest bright)";
  return el("span", { class: "legend", title: "the layer's colour scale" }, lo, c, hi,
    el("span", { text: words }));
}

// ---------------------------------------------------------------------------------------------
// the input the network sees, and the prediction

function drawSeen(seen) {
  const h = seen.length, w = seen[0].length, ch = seen[0][0].length;
  const c = $("#seen");
  c.width = w;
  c.height = h;
  const ctx = c.getContext("2d");
  const img = ctx.createImageData(w, h);
  for (let r = 0; r < h; r++) {
    for (let col = 0; col < w; col++) {
      const p = seen[r][col];
      const [R, G, B] = ch === 3 ? p : [p[0], p[0], p[0]];
      img.data.set([R, G, B, 255], (r * w + col) * 4);
    }
  }
  ctx.putImageData(img, 0, 0);
}

function showPrediction(out) {
  const bars = $("#bars");
  bars.replaceChildren();
  for (const t of out.top.slice(0, 10)) {
    const pct = 100 * t.probability;
    const li = el("li", { "data-class": t.class, "data-p": String(t.probability) },
      el("span", { class: "name", text: t.class, title: t.class }),
      el("span", { class: "track" }, el("span", { class: "fill", style: `width: ${pct.toFixed(2)}%` })),
      el("span", { class: "pct", text: `${pct.toFixed(1)}%` }));
    bars.append(li);
  }
}

function seenNote(out, how) {
  const s = state.summary;
  const [h, w, c] = s.input_shape;
  const parts = [`${h}×${w}×${c}: ${h * w * c} numbers, ${c === 1 ? "gray" : "colour"}`];
  if (how) parts.push(how);
  parts.push(out.inverted ? "inverted to the training polarity" : "not inverted");
  $("#seen-note").textContent = parts.join("; ") +
    `. The network takes (pixel/255 − mean)/std of each number.`;
}

// A new input: show it and its prediction at once, then fetch the maps (and the explained unit).
async function newInput(out, how, seq) {
  if (seq < state.inputSeq) return; // a newer input is already shown
  state.inputSeq = seq;
  state.seen = out.seen;
  drawSeen(out.seen);
  seenNote(out, how);
  showPrediction(out);
  showMessage("");
  if ($("#why-on").checked) await refreshWhy(seq);
}

async function refreshInside(seq) {
  if (!state.seen) return;
  const seen = state.seen;
  let maps;
  try {
    maps = await postJSON("/api/maps", { pixels: seen, invert: "no" });
  } catch (e) {
    showMessage(e.message);
    return;
  }
  if (seq < state.inputSeq) return;
  state.maps = maps;
  renderMaps(maps);
  if (state.pick) await explainUnit(state.pick);
}

let inputCounter = 0;
async function predictPixels(pixels, how) {
  const seq = ++inputCounter;
  try {
    const out = await postJSON("/api/predict", { pixels, invert: "no" });
    await newInput(out, how, seq);
    await refreshInside(seq);
  } catch (e) {
    showMessage(e.message);
  }
}

async function predictFile(file, invert, how) {
  const seq = ++inputCounter;
  const form = new FormData();
  form.append("file", file, file.name || "drawing.png");
  form.append("invert", invert);
  const out = await api("/api/predict-file", { method: "POST", body: form });
  await newInput(out, how, seq);
  return seq;
}

// ---------------------------------------------------------------------------------------------
// feature maps, layer by layer

function tileScale(h, w) {
  // the displayed size of one map: at least 44 px, at most 112 px a side
  return Math.max(1, Math.min(Math.floor(112 / Math.max(h, w)), Math.ceil(44 / Math.max(h, w))));
}

function renderMaps(maps) {
  const box = $("#maps");
  box.replaceChildren();
  for (const layer of maps.layers) {
    const [h, w, c] = layer.shape;
    const head = el("div", { class: "layer-head" },
      el("span", { class: "lname", text: layer.name }),
      el("span", { class: "ltype", text: layer.type }),
      el("span", { class: "lshape", text: shapeText(layer.shape), title: "height × width × channels" }),
      legend(layer));
    const tiles = el("div", { class: "tiles" });
    const scale = tileScale(h, w);
    for (let k = 0; k < c; k++) {
      const canvas = el("canvas", {
        width: w, height: h, "data-layer": layer.name, "data-channel": String(k),
        style: `width: ${w * scale}px; height: ${h * scale}px`,
        title: `${layer.name}, channel ${k}: click a pixel`,
      });
      const ctx = canvas.getContext("2d");
      const img = ctx.createImageData(w, h);
      const m = layer.maps[k];
      for (let r = 0; r < h; r++) {
        for (let col = 0; col < w; col++) {
          const [R, G, B] = colourFor(m[r][col], layer);
          img.data.set([R, G, B, 255], (r * w + col) * 4);
        }
      }
      ctx.putImageData(img, 0, 0);
      if (layer.explainable) {
        canvas.addEventListener("click", (ev) => {
          const rect = canvas.getBoundingClientRect();
          const col = Math.min(w - 1, Math.floor(((ev.clientX - rect.left) / rect.width) * w));
          const row = Math.min(h - 1, Math.floor(((ev.clientY - rect.top) / rect.height) * h));
          state.pick = { layer: layer.name, row, col, channel: k };
          explainUnit(state.pick);
        });
      }
      tiles.append(el("div", { class: "tile" }, canvas, el("div", { text: String(k) })));
    }
    box.append(el("div", { class: "layer", "data-layer": layer.name }, head, tiles));
  }
  const s = state.summary;
  const rest = s.layers.slice(s.layers.findIndex((l) => l.name === maps.layers.at(-1)?.name) + 1);
  $("#head-note").textContent = rest.length
    ? "Then: " + rest.map((l) => `${l.name} (${l.type}, ${shapeText(l.output_shape)})`).join(" → ") +
      " → softmax → the probabilities above."
    : "";
  markPick();
}

function markPick() {
  document.querySelectorAll(".tile .pick").forEach((p) => p.remove());
  const p = state.pick;
  if (!p || !state.maps) return;
  const canvas = document.querySelector(
    `canvas[data-layer="${p.layer}"][data-channel="${p.channel}"]`);
  if (!canvas) return;
  const sx = canvas.clientWidth / canvas.width, sy = canvas.clientHeight / canvas.height;
  canvas.parentElement.append(el("div", {
    class: "pick",
    style: `left: ${p.col * sx}px; top: ${p.row * sy}px; width: ${sx}px; height: ${sy}px`,
  }));
}

// ---------------------------------------------------------------------------------------------
// the arithmetic of one number

function gridTable(g, opts = {}) {
  // g: 2-D nested list; opts.padded: 2-D booleans; opts.winner: [r, c]; opts.signed shading
  const t = el("table", { class: "grid" });
  const flat = g.flat();
  const top = Math.max(1e-12, ...flat.map(Math.abs));
  g.forEach((row, i) => {
    const tr = el("tr");
    row.forEach((v, j) => {
      const td = el("td", { text: fmt(v, 3), title: String(v) });
      if (opts.padded && opts.padded[i][j]) {
        td.classList.add("pad");
        td.title = "zero padding";
      }
      if (opts.winner && opts.winner[0] === i && opts.winner[1] === j) td.classList.add("winner");
      const a = Math.min(1, Math.abs(v) / top);
      td.style.background = v >= 0 ? `rgba(178, 24, 43, ${0.35 * a})` : `rgba(33, 102, 172, ${0.35 * a})`;
      tr.append(td);
    });
    t.append(tr);
  });
  return t;
}
const channelOf = (a, k) => a.map((row) => row.map((px) => px[k]));
const labelled = (node, label) => el("div", {}, node, el("div", { class: "grid-label", text: label }));

const explainUnit = track(async (pick) => {
  if (!state.seen) return;
  let e;
  try {
    e = await postJSON("/api/explain", {
      pixels: state.seen, invert: "no", layer: pick.layer, row: pick.row, col: pick.col,
      channel: pick.channel,
    });
  } catch (err) {
    showMessage(err.message);
    return;
  }
  if (state.pick !== pick) return; // another unit was clicked meanwhile
  renderExplanation(e);
  markPick();
});

function renderExplanation(e) {
  const body = $("#explain-body");
  body.replaceChildren();
  const what = e.kind === "conv" ? "filter" : "channel";
  body.append(el("p", { class: "explain-title",
    text: `${e.layer} (${e.layer_type}), row ${e.position[0]}, col ${e.position[1]}, ${what} ${e.channel}` }));
  const [ph, pw] = [e.patch.length, e.patch[0].length];
  const inputWords = `${e.input_name} (${shapeText(e.input_shape)})`;
  if (e.kind === "conv") {
    const cin = e.input_shape[2];
    body.append(el("p", { class: "hint",
      text: `The ${ph}×${pw}×${cin} kernel of filter ${e.channel} lies over a ${ph}×${pw} window ` +
        `of ${inputWords} at rows ${e.origin[0]}..${e.origin[0] + ph - 1}, cols ` +
        `${e.origin[1]}..${e.origin[1] + pw - 1}` +
        (e.padded.flat().some(Boolean) ? " (dashed cells are the zero padding)" : "") +
        ". Multiply element by element, add everything up, add the bias:" }));
    const shown = Math.min(cin, 3);
    for (let k = 0; k < shown; k++) {
      const products = channelOf(e.products, k);
      const sum = products.flat().reduce((a, b) => a + b, 0);
      body.append(el("div", { class: "grids", "data-input-channel": String(k) },
        labelled(gridTable(channelOf(e.patch, k), { padded: e.padded }), `input channel ${k}`),
        el("span", { class: "op", text: "×" }),
        labelled(gridTable(channelOf(e.kernel, k)), "kernel"),
        el("span", { class: "op", text: "=" }),
        labelled(gridTable(products), `products, sum ${fmt(sum)}`)));
    }
    if (cin > shown) {
      let rest = 0;
      for (let k = shown; k < cin; k++) rest += channelOf(e.products, k).flat().reduce((a, b) => a + b, 0);
      body.append(el("p", { class: "hint",
        text: `… and ${cin - shown} more input channels, whose products sum to ${fmt(rest)}.` }));
    }
    const eq = el("div", { class: "equation" },
      el("div", { text: `sum of the ${e.products.flat(2).length} products = ${fmt(e.total, 6)}` }),
      el("div", { text: `+ bias ${fmt(e.bias, 6)} = ${fmt(e.conv_value, 6)}` }));
    body.append(eq);
  } else {
    const word = e.kind === "max_pool" ? "maximum" : "mean";
    body.append(el("p", { class: "hint",
      text: `A ${ph}×${pw} window (stride ${e.stride}) of channel ${e.channel} of ${inputWords}, ` +
        `rows ${e.origin[0]}..${e.origin[0] + ph - 1}, cols ${e.origin[1]}..${e.origin[1] + pw - 1}; ` +
        `pooling keeps its ${word}:` }));
    body.append(el("div", { class: "grids" },
      labelled(gridTable(e.patch, { winner: e.winner }), "window"),
      el("span", { class: "op", text: "→" }),
      el("span", { text: `${word} = ${fmt(e.conv_value, 6)}` })));
  }
  const eq = el("div", { class: "equation" });
  for (const s of e.steps) eq.append(el("div", { text: `${s.layer} (${s.type}): ${s.formula} = ${fmt(s.value, 6)}` }));
  const value = el("span", { id: "explain-value", "data-value": String(e.value), text: fmt(e.value, 6) });
  eq.append(el("div", {}, `value of ${e.layer} at (${e.position[0]}, ${e.position[1]}, ${e.channel}): `, value));
  body.append(eq);
  const [t, l, b, r] = e.receptive_field;
  body.append(el("p", { class: "hint", id: "rf-text",
    text: `This number depends on rows ${t}..${b - 1}, cols ${l}..${r - 1} of the input ` +
      `(${b - t}×${r - l} pixels: its receptive field), outlined in red in "What the network sees".` }));
  body.dataset.layer = e.layer;
  body.dataset.row = String(e.position[0]);
  body.dataset.col = String(e.position[1]);
  body.dataset.channel = String(e.channel);
  showReceptiveField(e.receptive_field);
}

function showReceptiveField(rf) {
  const box = $("#rf-box");
  const c = $("#seen");
  const sx = c.clientWidth / c.width, sy = c.clientHeight / c.height;
  const [t, l, b, r] = rf;
  Object.assign(box.style, {
    left: `${l * sx + c.clientLeft}px`, top: `${t * sy + c.clientTop}px`,
    width: `${(r - l) * sx}px`, height: `${(b - t) * sy}px`,
  });
  box.dataset.rf = rf.join(",");
  box.hidden = false;
}

// ---------------------------------------------------------------------------------------------
// why this class: an attribution map (/api/why) over the input, as the toggle asks

const INFERNO = [[0, 0, 4], [87, 16, 110], [188, 55, 84], [249, 142, 9], [252, 255, 164]];
// the map's colour (as classic_cnn.viz.plots draws it): diverging for signed maps (blue < 0,
// white 0, red > 0), inferno from 0 (dark) to the largest value (bright) otherwise
function whyColour(v, w) {
  if (w.vmin < 0) return ramp(DIVERGING, (v - w.vmin) / (w.vmax - w.vmin));
  return ramp(INFERNO, w.vmax > 0 ? v / w.vmax : 0);
}
async function refreshWhy(seq = inputCounter) {
  const overlay = $("#why-overlay"), note = $("#why-note");
  if (!$("#why-on").checked || !state.seen) {
    overlay.hidden = true;
    note.hidden = true;
    state.why = null;
    return;
  }
  const body = { pixels: state.seen, invert: "no", method: $("#why-method").value };
  const cls = $("#why-class").value;
  if (cls) body.class_name = cls;
  let w;
  try {
    w = await postJSON("/api/why", body);
  } catch (e) {
    showMessage(e.message);
    return;
  }
  if (seq < state.inputSeq || !$("#why-on").checked) return; // a newer input, or switched off
  state.why = w;
  drawWhy(w);
}
const whyChanged = track(() => refreshWhy());

function drawWhy(w) {
  const overlay = $("#why-overlay");
  const h = w.map.length, wd = w.map[0].length;
  overlay.width = wd;
  overlay.height = h;
  const ctx = overlay.getContext("2d");
  const img = ctx.createImageData(wd, h);
  for (let r = 0; r < h; r++) {
    for (let c = 0; c < wd; c++) img.data.set([...whyColour(w.map[r][c], w), 255], (r * wd + c) * 4);
  }
  ctx.putImageData(img, 0, 0);
  overlay.hidden = false;
  const why = w.chosen === "top" ? "the top class" : "the class asked for";
  const words = w.vmin < 0
    ? `blue ${fmt(w.vmin, 3)} · white 0 · red ${fmt(w.vmax, 3)}`
    : `dark 0 · bright ${fmt(w.vmax, 3)}`;
  const note = $("#why-note");
  note.replaceChildren(
    el("strong", { text: `Why '${w.class_name}'` }),
    ` (${why}, p = ${w.probability.toFixed(3)}): ${w.scale}; ${words}, shown at 60% over the input.`);
  note.dataset.method = w.method;
  note.dataset.class = w.class_name;
  note.dataset.p = String(w.probability);
  note.hidden = false;
}

function setupWhy(s) {
  const methods = new Set(s.why.methods);
  for (const o of $("#why-method").options) o.hidden = o.disabled = !methods.has(o.value);
  if (!methods.has($("#why-method").value)) $("#why-method").value = s.why.methods[0];
  for (const c of s.classes) $("#why-class").append(el("option", { value: c, text: c }));
  $("#why-on").addEventListener("change", whyChanged);
  $("#why-method").addEventListener("change", whyChanged);
  $("#why-class").addEventListener("change", whyChanged);
}

// ---------------------------------------------------------------------------------------------
// the input: draw, file, random test image

function setTab(name) {
  for (const b of document.querySelectorAll(".tabs button")) {
    b.setAttribute("aria-selected", String(b.dataset.tab === name));
  }
  for (const p of ["draw", "file", "sample"]) $(`#pane-${p}`).hidden = p !== name;
}

function setupDrawing() {
  const canvas = $("#draw");
  const ctx = canvas.getContext("2d");
  const dark = state.summary.preprocessing.background === "dark";
  const paper = dark ? "#000" : "#fff";
  const ink = dark ? "#fff" : "#000";
  const clear = () => {
    ctx.fillStyle = paper;
    ctx.fillRect(0, 0, canvas.width, canvas.height);
  };
  clear();
  ctx.lineCap = "round";
  ctx.lineJoin = "round";
  ctx.strokeStyle = ink;
  ctx.lineWidth = canvas.width * 0.08;
  let last = null;
  const at = (ev) => {
    const r = canvas.getBoundingClientRect();
    return [((ev.clientX - r.left) / r.width) * canvas.width, ((ev.clientY - r.top) / r.height) * canvas.height];
  };
  canvas.addEventListener("pointerdown", (ev) => {
    canvas.setPointerCapture(ev.pointerId);
    last = at(ev);
    ctx.beginPath();
    ctx.moveTo(...last);
    ctx.lineTo(...last);
    ctx.stroke();
    sendDrawing();
  });
  canvas.addEventListener("pointermove", (ev) => {
    if (!last) return;
    const p = at(ev);
    ctx.beginPath();
    ctx.moveTo(...last);
    ctx.lineTo(...p);
    ctx.stroke();
    last = p;
    sendDrawing();
  });
  const end = () => {
    if (!last) return;
    last = null;
    sendDrawing(true);
  };
  canvas.addEventListener("pointerup", end);
  canvas.addEventListener("pointercancel", end);
  $("#clear").addEventListener("click", () => {
    clear();
    sendDrawing(true);
  });
}

// At most one drawing request in flight; strokes made meanwhile are sent when it returns. The
// maps (heavier) follow when the stroke ends.
let drawWantsMaps = false;
function sendDrawing(final = false) {
  state.drawDirty = true;
  drawWantsMaps = drawWantsMaps || final;
  if (state.drawBusy) return;
  state.drawBusy = true;
  state.drawDirty = false;
  const withMaps = drawWantsMaps;
  drawWantsMaps = false;
  $("#draw").toBlob(async (blob) => {
    try {
      const seq = await predictFile(new File([blob], "drawing.png", { type: "image/png" }), "no",
        "your drawing, shrunk to the network's size");
      if (withMaps) await refreshInside(seq);
    } catch (e) {
      showMessage(e.message);
    } finally {
      state.drawBusy = false;
      if (state.drawDirty) sendDrawing();
    }
  }, "image/png");
}

function setupFile() {
  const drop = $("#drop");
  const take = track(async (file) => {
    if (!file) return;
    const limit = state.summary.max_upload_bytes;
    if (file.size > limit) {
      showMessage(`${file.name} is ${(file.size / 1e6).toFixed(1)} MB, over the ${limit / 1e6} MB limit`);
      return;
    }
    const img = $("#original");
    img.hidden = true;
    try {
      const seq = await predictFile(file, $("#invert").value,
        "resized keeping its aspect ratio, padded with its border colour");
      const r = state.lastFile;
      if (r) URL.revokeObjectURL(r);
      state.lastFile = URL.createObjectURL(file);
      img.src = state.lastFile;
      img.hidden = false;
      await refreshInside(seq);
    } catch (e) {
      showMessage(e.message);
    }
  });
  $("#file").addEventListener("change", (ev) => take(ev.target.files[0]));
  drop.addEventListener("dragover", (ev) => {
    ev.preventDefault();
    drop.classList.add("over");
  });
  drop.addEventListener("dragleave", () => drop.classList.remove("over"));
  drop.addEventListener("drop", (ev) => {
    ev.preventDefault();
    drop.classList.remove("over");
    take(ev.dataTransfer.files[0]);
  });
  $("#invert").addEventListener("change", () => take($("#file").files[0]));
}

const randomSample = track(async () => {
  try {
    const s = await api("/api/sample");
    $("#sample-info").textContent =
      `${s.dataset} test image ${s.index} of ${s.count.toLocaleString()}; its true class: ${s.true_class}.`;
    await predictPixels(s.seen, `${s.dataset} test image ${s.index}`);
  } catch (e) {
    showMessage(e.message);
  }
});

// ---------------------------------------------------------------------------------------------
// the model: header, filters, summary table

function renderSummary(s) {
  const parts = [`${s.name}`, `${s.parameters.toLocaleString()} parameters`,
    `input ${shapeText(s.input_shape)}`, `${s.classes.length} classes`];
  if (s.dataset && s.dataset.name) parts.push(`trained on ${s.dataset.name}`);
  if (s.metrics && s.metrics.val_accuracy != null) {
    parts.push(`validation accuracy ${(100 * s.metrics.val_accuracy).toFixed(1)}%`);
  }
  $("#model-line").textContent = parts.join(" · ");
  $("#version").textContent = s.version;
  $("#limit").textContent = `${s.max_upload_bytes / 1e6} MB`;
  const t = $("#summary");
  const num = (v) => el("td", { class: "num", text: v.toLocaleString() });
  t.append(el("tr", {}, ...["Layer", "Type", "Output shape", "Parameters", "Multiply-adds"].map(
    (h, i) => el("th", { class: i >= 3 ? "num" : "", text: h }))));
  t.append(el("tr", {}, el("td", { text: "input" }), el("td", { text: "" }),
    el("td", { text: shapeText(s.input_shape) }), el("td"), el("td")));
  for (const l of s.layers) {
    t.append(el("tr", { "data-layer": l.name }, el("td", { text: l.name }), el("td", { text: l.type }),
      el("td", { text: shapeText(l.output_shape) }), num(l.params), num(l.macs)));
  }
  const total = (k) => s.layers.reduce((a, l) => a + l[k], 0);
  t.append(el("tr", {}, el("th", { text: "total" }), el("th"), el("th"),
    el("th", { class: "num", text: total("params").toLocaleString() }),
    el("th", { class: "num", text: total("macs").toLocaleString() })));
}

function renderFilters(f) {
  const [kh, kw, cin, cout] = f.shape;
  $("#filters-note").textContent =
    `${f.layer}: ${cout} kernels of ${kh}×${kw}×${cin}. ${f.scale}. ` +
    "Each filter responds most where the image looks like it.";
  const box = $("#filters");
  box.replaceChildren();
  const grey = (v) => Math.round(255 * Math.min(1, Math.max(0, v)));
  for (let o = 0; o < cout; o++) {
    const planes = f.colour ? [null] : [...Array(Math.min(cin, 3)).keys()];
    for (const k of planes) {
      const c = el("canvas", { width: kw, height: kh });
      const ctx = c.getContext("2d");
      const img = ctx.createImageData(kw, kh);
      for (let r = 0; r < kh; r++) {
        for (let col = 0; col < kw; col++) {
          const rgb = f.colour ? f.tiles[o][r][col].map(grey) : Array(3).fill(grey(f.tiles[o][k][r][col]));
          img.data.set([...rgb, 255], (r * kw + col) * 4);
        }
      }
      ctx.putImageData(img, 0, 0);
      const caption = f.colour || cin === 1 ? `${o}` : `${o}, in ${k}`;
      box.append(el("figure", {}, c, el("figcaption", { text: caption })));
    }
  }
}

// ---------------------------------------------------------------------------------------------

async function main() {
  let s;
  try {
    s = await api("/api/summary");
  } catch (e) {
    $("#model-line").textContent = `cannot reach the server: ${e.message}`;
    return;
  }
  state.summary = s;
  const [h, w] = s.input_shape;
  const seenCanvas = $("#seen");
  seenCanvas.width = w;
  seenCanvas.height = h;
  renderSummary(s);
  api("/api/filters").then(renderFilters, () => { $("#filters-card").hidden = true; });
  for (const b of document.querySelectorAll(".tabs button")) {
    b.addEventListener("click", () => {
      setTab(b.dataset.tab);
      if (b.dataset.tab === "sample" && !$("#sample-info").textContent) randomSample();
      if (b.dataset.tab === "draw") sendDrawing(true);
    });
  }
  $("#tab-draw").hidden = !s.drawable;
  $("#tab-sample").hidden = !s.samples.available;
  if (!s.samples.available) $("#tab-sample").title = s.samples.reason;
  setupFile();
  setupWhy(s);
  $("#sample").addEventListener("click", randomSample);
  if (s.drawable) setupDrawing();
  if (s.samples.available) {
    setTab("sample");
    await randomSample();
  } else if (s.drawable) {
    setTab("draw");
    sendDrawing(true);
  } else {
    setTab("file");
  }
}

main();
