// embindex search page: talks to this server's /v1/search; plain JS, no build step, no dependencies.
// File names are shown with textContent only, never parsed as HTML. The API key lives in sessionStorage (this tab)
// and travels as an Authorization header; image URLs come signed from the server, so <img> tags need no key.
"use strict";

const $ = (id) => document.getElementById(id);
const KEY_STORE = "embindex-api-key";
const NEIGHBOURS = 12;
const state = { key: sessionStorage.getItem(KEY_STORE) || "", image: null, seq: 0, detailSeq: 0, hash: "" };

function el(tag, className, text) {
  const node = document.createElement(tag);
  if (className) node.className = className;
  if (text !== undefined) node.textContent = text;
  return node;
}

function setStatus(node, kind, message) {
  node.dataset.state = kind;
  node.textContent = message;
}

async function api(method, path, body) {
  const headers = {};
  if (body !== undefined) headers["Content-Type"] = "application/json";
  if (state.key) headers.Authorization = "Bearer " + state.key;
  const response = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  let payload = null;
  try {
    payload = await response.json();
  } catch (err) {
    payload = null;
  }
  if (!response.ok) {
    const message = payload && payload.error ? payload.error.message : payload && payload.message;
    const error = new Error(message || `the server answered ${response.status}`);
    error.status = response.status;
    throw error;
  }
  return payload;
}

function explain(error) {
  if (error.status === 401) {
    $("key-box").open = true;
    $("key").focus();
    return state.key ? "Wrong API key: enter this server's key above." : "This server needs an API key: enter it above.";
  }
  return error.message;
}

function showBanner(smokeTest) {
  $("banner").hidden = !smokeTest;
  $("banner").textContent = smokeTest
    ? "Smoke test: this server's model has random weights (scripts/make_tiny_models.py); its results are meaningless."
    : "";
}

// The best-matching pyramid tile, as a box over an image shown with object-fit: contain in a square frame.
function tileInFrame(hit) {
  const [left, top, right, bottom] = hit.tile_box;
  const side = Math.max(hit.width, hit.height);
  const shownW = hit.width / side, shownH = hit.height / side;
  const box = el("div", "tile");
  box.style.left = 100 * ((1 - shownW) / 2 + (left / hit.width) * shownW) + "%";
  box.style.top = 100 * ((1 - shownH) / 2 + (top / hit.height) * shownH) + "%";
  box.style.width = 100 * ((right - left) / hit.width) * shownW + "%";
  box.style.height = 100 * ((bottom - top) / hit.height) * shownH + "%";
  box.title = `tile: level ${hit.tile_level}, row ${hit.tile_row}, column ${hit.tile_col}`;
  return box;
}

function card(hit, onOpen) {
  const figure = el("figure", "hit");
  figure.tabIndex = 0;
  figure.dataset.path = hit.path;
  figure.dataset.score = hit.score;
  const frame = el("div", "frame");
  const img = el("img");
  img.loading = "lazy";
  img.decoding = "async";
  img.alt = hit.path;
  img.addEventListener("error", () => figure.classList.add("broken"));
  img.src = hit.thumbnail_url;
  frame.append(img);
  if (hit.tile_box && hit.width && hit.height) frame.append(tileInFrame(hit));
  const caption = el("figcaption");
  caption.append(el("span", "score", hit.score.toFixed(3)), el("span", "path", hit.path));
  figure.title = `${hit.root}/${hit.path}\n${hit.width} x ${hit.height} px, score ${hit.score.toFixed(4)}`;
  figure.append(frame, caption);
  figure.addEventListener("click", () => onOpen(hit));
  figure.addEventListener("keydown", (event) => {
    if (event.key === "Enter" || event.key === " ") {
      event.preventDefault();
      onOpen(hit);
    }
  });
  return figure;
}

function describe(query) {
  if (query.text) return `“${query.text}”`;
  if (query.path) return `images like ${query.path}`;
  return state.image ? state.image.name : "the image";
}

async function search(query) {
  const seq = ++state.seq;
  const body = { ...query, k: Number($("k").value) };
  const where = $("where").value.trim();
  if (where) body.where = where;
  setStatus($("status"), "busy", "Searching…");
  const started = performance.now();
  try {
    const answer = await api("POST", "/v1/search", body);
    if (seq !== state.seq) return; // a newer search replaced this one
    showBanner(answer.smoke_test);
    $("grid").replaceChildren(...answer.data.map((hit) => card(hit, openDetail)));
    const took = Math.round(performance.now() - started);
    const found = answer.data.length === 1 ? "1 result" : `${answer.data.length} results`;
    setStatus($("status"), "done", `${found} for ${describe(query)} · ${took} ms`);
  } catch (error) {
    if (seq !== state.seq) return;
    $("grid").replaceChildren();
    setStatus($("status"), "error", explain(error));
  }
  document.body.dataset.searches = String(Number(document.body.dataset.searches) + 1);
}

// -- the query: text, an image (picked, dropped or pasted), or an indexed image ("search like this") --------------
function setHash(params) {
  state.hash = params ? "#" + new URLSearchParams(params).toString() : "";
  history.replaceState(null, "", state.hash || location.pathname);
}

function searchText() {
  const text = $("text").value.trim();
  if (!text) return false;
  clearImage();
  const params = { text };
  if ($("where").value.trim()) params.where = $("where").value.trim();
  setHash(params);
  search({ text });
  return true;
}

function searchLike(hit) {
  clearImage();
  $("text").value = "";
  setHash({ path: hit.path, root: hit.root });
  search({ path: hit.path, root: hit.root });
}

function useImage(file) {
  if (!file || !file.type.startsWith("image/")) {
    setStatus($("status"), "error", "Not an image: drop or pick a JPEG, PNG, WebP, GIF, BMP or TIFF file.");
    return;
  }
  const reader = new FileReader();
  reader.addEventListener("load", () => {
    state.image = { name: file.name, uri: reader.result };
    $("query-thumb").src = reader.result;
    $("query-name").textContent = file.name;
    $("query-image").hidden = false;
    $("text").value = "";
    setHash(null);
    search({ image: reader.result });
  });
  reader.readAsDataURL(file);
}

function clearImage() {
  state.image = null;
  $("query-image").hidden = true;
  $("query-thumb").removeAttribute("src");
  $("image").value = "";
}

function fromHash() {
  if (location.hash === state.hash) return;
  const params = new URLSearchParams(location.hash.slice(1));
  state.hash = location.hash;
  if (params.get("where") !== null) $("where").value = params.get("where");
  if (params.get("k") && [...$("k").options].some((o) => o.value === params.get("k"))) $("k").value = params.get("k");
  if (params.get("text")) {
    $("text").value = params.get("text");
    search({ text: params.get("text") });
  } else if (params.get("path")) {
    search({ path: params.get("path"), root: params.get("root") || undefined });
  }
}

// -- one image: the preview, its facts, its neighbours ------------------------------------------------------------
function fact(list, name, value) {
  list.append(el("dt", "", name), el("dd", "", value));
}

async function openDetail(hit) {
  const dialog = $("detail");
  $("detail-path").textContent = hit.path;
  $("detail-img").alt = hit.path;
  $("detail-img").src = hit.preview_url;
  const tile = $("detail-tile");
  tile.hidden = !hit.tile_box;
  if (hit.tile_box) {
    const [left, top, right, bottom] = hit.tile_box;
    tile.style.left = (100 * left) / hit.width + "%";
    tile.style.top = (100 * top) / hit.height + "%";
    tile.style.width = (100 * (right - left)) / hit.width + "%";
    tile.style.height = (100 * (bottom - top)) / hit.height + "%";
  }
  const meta = $("detail-meta");
  meta.replaceChildren();
  fact(meta, "score", hit.score.toFixed(4));
  fact(meta, "size", `${hit.width} x ${hit.height} px, ${(hit.size_bytes / 1024).toFixed(0)} KiB`);
  fact(meta, "root", hit.root);
  if (hit.tile_box) fact(meta, "tile", `level ${hit.tile_level}, row ${hit.tile_row}, column ${hit.tile_col}`);
  $("detail-original").href = hit.image_url;
  $("detail-like").onclick = () => {
    dialog.close();
    searchLike(hit);
  };
  if (!dialog.open) dialog.showModal();
  const seq = ++state.detailSeq;
  const status = $("neighbours-status");
  setStatus(status, "busy", "Looking for neighbours…");
  $("neighbours").replaceChildren();
  try {
    const answer = await api("POST", "/v1/search", { path: hit.path, root: hit.root, k: NEIGHBOURS + 1 });
    if (seq !== state.detailSeq) return;
    const others = answer.data.filter((n) => n.path !== hit.path || n.root !== hit.root).slice(0, NEIGHBOURS);
    $("neighbours").replaceChildren(...others.map((n) => card(n, openDetail)));
    setStatus(status, "done", others.length ? "" : "No other images in the index.");
  } catch (error) {
    if (seq === state.detailSeq) setStatus(status, "error", explain(error));
  }
}

// -- the index this server searches -------------------------------------------------------------------------------
async function loadInfo() {
  const headers = state.key ? { Authorization: "Bearer " + state.key } : {};
  try {
    const response = await fetch("/v1/search", { headers });
    const info = await response.json();
    if (response.status === 401) {
      setStatus($("status"), "error", explain({ status: 401 }));
      return;
    }
    if (!info.available) {
      setStatus($("status"), "error", info.message || "Search is unavailable on this server.");
      $("index-info").textContent = "";
      return;
    }
    const images = info.index.rows === 1 ? "1 image" : `${info.index.rows.toLocaleString()} images`;
    $("index-info").textContent = `${images} · model ${info.model}`;
    $("text").disabled = !info.modalities.includes("text");
    if ($("text").disabled) $("text").placeholder = "This model has no text tower: search by an image";
    showBanner(info.smoke_test);
    if ($("status").dataset.state === "error") setStatus($("status"), "idle", "");
  } catch (error) {
    setStatus($("status"), "error", "Cannot reach the server: " + error.message);
  }
}

function start() {
  $("key").value = state.key;
  $("key").addEventListener("change", () => {
    state.key = $("key").value.trim();
    sessionStorage.setItem(KEY_STORE, state.key);
    state.hash = ""; // a linked search refused for want of the key runs again with it
    loadInfo().then(fromHash);
  });
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    if (searchText()) return;
    if (state.image) search({ image: state.image.uri });
    else setStatus($("status"), "error", "Type what you are looking for, or drop an image.");
  });
  $("image").addEventListener("change", () => useImage($("image").files[0]));
  $("query-clear").addEventListener("click", clearImage);
  $("detail-close").addEventListener("click", () => $("detail").close());
  $("detail").addEventListener("click", (event) => {
    if (event.target === $("detail")) $("detail").close(); // a click on the backdrop
  });
  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    event.preventDefault();
    dragDepth += 1;
    $("drop-hint").hidden = false;
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (!dragDepth) $("drop-hint").hidden = true;
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    $("drop-hint").hidden = true;
    useImage(event.dataTransfer.files[0]);
  });
  document.addEventListener("paste", (event) => {
    const file = [...event.clipboardData.files].find((f) => f.type.startsWith("image/"));
    if (file) useImage(file);
  });
  window.addEventListener("hashchange", fromHash);
  loadInfo().then(fromHash);
}

start();
