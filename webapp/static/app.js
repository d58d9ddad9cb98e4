// poseloop rating page: plain JS, no build step. Every label goes through the JSON API (README.md).
"use strict";

const $ = (id) => document.getElementById(id);
const LS = window.localStorage;

const S = {
  cfg: { score_min: -5, score_max: 5 },
  rater: LS.getItem("poseloop:rater") || "",
  roundId: null,
  mode: LS.getItem("poseloop:mode") || "score", // score | pairs | grid | blind
  lastLabelMode: "score", // score or pairs: the mode grid and blind return to, whose labels undo reverts
  roundsLoaded: false, // blind mode drops every round, item and pair from the page, so it can name none
  items: [],
  pos: 0,
  gridSel: 0,
  onlyUnrated: LS.getItem("poseloop:onlyUnrated") === "1",
  overlay: LS.getItem("poseloop:overlay") === "1",
  crisp: false, // crisp pixels: remembered per rater (crispKey), read when the rater is known
  pairs: [], // queue of upcoming pairs; pairs[0] is on screen
  pairsShown: [], // judged pairs of this session, so undo can bring one back
  pairProgress: { done: 0, total: 0 },
  pairProgressKnown: false,
  pendingPairs: new Set(), // "a-b" keys submitted but not yet confirmed
  refilling: false,
  // blind mode: the page holds only opaque pair tokens, prompts and /media/blind URLs
  compId: null,
  blind: [], // queue of upcoming blind pairs; blind[0] is on screen
  blindShown: [], // judged blind pairs of this session, newest last, so undo can bring one back
  blindProgress: { done: 0, total: 0 },
  blindProgressKnown: false,
  pendingBlind: new Set(), // pair tokens submitted but not yet confirmed
  blindRefilling: false,
  minusArmed: false,
  zoom: false,
  writes: Promise.resolve(), // labels are sent one after another, in key order
  inFlight: 0,
  // Bumped when a label write starts and when it ends. A progress count read while a write was on its
  // way may or may not include it, so such a count is not trusted (see progressFrom).
  writeSeq: 0,
};

// ------------------------------------------------------------------ API

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function newRequestId() {
  // crypto.randomUUID needs a secure context; a LAN deployment over http is not one.
  const b = new Uint8Array(16);
  crypto.getRandomValues(b);
  return Array.from(b, (x) => x.toString(16).padStart(2, "0")).join("");
}

async function api(method, path, body) {
  const opts = { method, headers: { Accept: "application/json" }, credentials: "same-origin" };
  if (body !== undefined) {
    opts.headers["Content-Type"] = "application/json";
    opts.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, opts);
  } catch (e) {
    throw new ApiError(0, "network error");
  }
  let data = null;
  try { data = await resp.json(); } catch (e) { /* not JSON */ }
  if (!resp.ok) throw new ApiError(resp.status, (data && data.error) || resp.statusText);
  return data;
}

const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

// A label write: queued behind earlier writes, retried with the same request_id on network or
// server errors so the server can recognise a retry instead of storing the label twice.
function write(path, body) {
  body.request_id = newRequestId();
  S.inFlight++;
  S.writeSeq++;
  showSaving();
  const run = async () => {
    for (let attempt = 0; ; attempt++) {
      try {
        return await api("POST", path, body);
      } catch (e) {
        if ((e.status && e.status < 500) || attempt >= 5) throw e;
        await sleep(250 * 2 ** attempt);
      }
    }
  };
  const p = S.writes.then(run, run);
  S.writes = p.catch(() => {});
  return p.finally(() => { S.inFlight--; S.writeSeq++; showSaving(); });
}

// The progress to show after a /pairs answer. `sent` is S.writeSeq when the request left. The server
// counted what was committed when it read; a label still on its way then may or may not be in that
// count, and adding the pending labels as well (as this page once did) showed 47 / 48 once the last
// label's confirmation came in before the /pairs answer. So the server's count replaces ours only when
// no label write started or ended since the request left; otherwise ours (the last exact count plus the
// labels sent since) stands. `known` is false after a reset, when ours is nothing yet.
function progressFrom(server, sent, current, known, pending) {
  if (sent === S.writeSeq && S.inFlight === 0) return { done: server.done, total: server.total };
  if (!known) return { done: server.done + pending, total: server.total };
  return { done: Math.min(current.done, server.total), total: server.total };
}

function qs(params) {
  return new URLSearchParams(Object.entries(params).filter(([, v]) => v !== null && v !== undefined)).toString();
}

// ------------------------------------------------------------------ small UI helpers

let toastTimer = null;
function toast(msg, isError) {
  const t = $("toast");
  t.textContent = msg;
  t.classList.toggle("error", !!isError);
  t.hidden = false;
  clearTimeout(toastTimer);
  toastTimer = setTimeout(() => { t.hidden = true; }, isError ? 5000 : 1400);
}

function showSaving() {
  $("save-state").textContent = S.inFlight > 0 ? "saving…" : "saved";
  $("save-state").classList.toggle("busy", S.inFlight > 0);
}

function setProgress(done, total) {
  $("progress-text").textContent = `${done} / ${total}`;
  $("progress-fill").style.width = total ? `${(100 * done) / total}%` : "0";
}

function fmtScore(v) {
  return v === null || v === undefined ? "–" : v > 0 ? `+${v}` : `${v}`;
}

function el(tag, props, children) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const c of children || []) e.append(c);
  return e;
}

function preload(urls) {
  for (const u of urls) { const i = new Image(); i.src = u; }
}

// ------------------------------------------------------------------ rounds and rater

function roundLabel(r) {
  const marks = [r.finished ? "" : ` · unfinished (${r.status})`, r.in_comparison ? " · blind evaluation" : ""];
  return `${r.name} (${r.label}) · ${r.groups} groups · ${r.samples} images${marks.join("")}`;
}

async function loadRounds() {
  const data = await api("GET", "/api/rounds");
  const sel = $("round");
  sel.replaceChildren(...data.rounds.map((r) => el("option", { value: r.id, textContent: roundLabel(r) })));
  const saved = Number(LS.getItem("poseloop:round"));
  // The server's default is the newest finished round outside any blind comparison: evaluation rounds are
  // judged blind first, and an unfinished round has only part of its images.
  const found = data.rounds.find((r) => r.id === saved)
    || data.rounds.find((r) => r.id === data.default_round_id) || data.rounds[0];
  S.roundId = found ? found.id : null;
  if (found) sel.value = String(found.id);
  S.roundsLoaded = true;
}

async function loadComparisons() {
  const data = await api("GET", "/api/comparisons");
  const sel = $("comparison");
  sel.replaceChildren(...data.comparisons.map((c) =>
    el("option", { value: c.id, textContent: `${c.name} · ${c.pairs} pairs` })));
  const saved = Number(LS.getItem("poseloop:comparison"));
  const found = data.comparisons.find((c) => c.id === saved) || data.comparisons[0];
  S.compId = found ? found.id : null;
  if (found) sel.value = String(found.id);
}

function askRater() {
  $("rater-input").value = S.rater;
  $("rater-dialog").showModal();
  $("rater-input").focus();
}

function setRater(name) {
  S.rater = name.trim();
  LS.setItem("poseloop:rater", S.rater);
  $("rater-btn").textContent = S.rater;
  S.crisp = LS.getItem(crispKey()) === "1";
  reload();
}

// Crisp pixels is a matter of taste and screen, so each rater's choice is kept apart (raters may share a
// browser); localStorage is per device, like the rater's name.
const crispKey = () => `poseloop:crisp:${S.rater}`;

function setCrisp(on) {
  S.crisp = on;
  if (S.rater) LS.setItem(crispKey(), on ? "1" : "0");
  render();
}

// ------------------------------------------------------------------ loading

async function reload() {
  if (S.mode === "blind") {
    if (S.rater) {
      try { await loadBlind(true); } catch (e) { toast(`Could not load: ${e.message}`, true); }
    }
    render();
    return;
  }
  if (!S.roundsLoaded) {
    try { await loadRounds(); } catch (e) { toast(`Could not load: ${e.message}`, true); return; }
  }
  if (!S.rater || S.roundId === null) {
    showEmpty(S.roundId === null ? "No rounds in the database yet. Run generate.py first." : "");
    return;
  }
  try {
    await loadItems();
    if (S.mode === "pairs") await loadPairs(true);
  } catch (e) {
    toast(`Could not load: ${e.message}`, true);
  }
  render();
}

async function loadItems() {
  const data = await api("GET", `/api/rounds/${S.roundId}/items?${qs({ rater: S.rater })}`);
  S.items = data.items;
  const saved = Number(LS.getItem(`poseloop:pos:${S.roundId}`));
  const idx = S.items.findIndex((it) => it.sample_id === saved);
  S.pos = idx >= 0 ? idx : firstUnrated();
  S.gridSel = S.pos;
}

function firstUnrated() {
  const i = S.items.findIndex((it) => it.score === null);
  return i >= 0 ? i : 0;
}

async function loadPairs(reset) {
  if (reset) { S.pairs = []; S.pendingPairs.clear(); S.pairProgressKnown = false; }
  await refillPairs();
}

const pairKey = (p) => {
  const a = p.left.sample_id, b = p.right.sample_id;
  return a < b ? `${a}-${b}` : `${b}-${a}`;
};

async function refillPairs() {
  if (S.refilling) return;
  S.refilling = true;
  try {
    const exclude = [...S.pairs.map(pairKey), ...S.pendingPairs].join(",");
    const sent = S.writeSeq;
    const data = await api("GET", `/api/rounds/${S.roundId}/pairs?${qs({ rater: S.rater, count: 3, exclude })}`);
    const have = new Set(S.pairs.map(pairKey));
    for (const p of data.pairs) if (!have.has(pairKey(p))) S.pairs.push(p);
    S.pairProgress = progressFrom(data.progress, sent, S.pairProgress, S.pairProgressKnown, S.pendingPairs.size);
    S.pairProgressKnown = true;
    for (const p of S.pairs.slice(1, 3)) preload([p.left.image_url, p.right.image_url]);
  } finally {
    S.refilling = false;
  }
}

async function loadBlind(reset) {
  if (reset) {
    S.blind = []; S.blindShown = []; S.pendingBlind.clear();
    S.blindProgress = { done: 0, total: 0 }; S.blindProgressKnown = false;
  }
  await refillBlind();
}

async function refillBlind() {
  if (S.blindRefilling || S.compId === null || !S.rater) return;
  const cid = S.compId;
  S.blindRefilling = true;
  try {
    const exclude = [...S.blind.map((p) => p.pair), ...S.pendingBlind].join(",");
    const sent = S.writeSeq;
    const data = await api("GET", `/api/comparisons/${cid}/pairs?${qs({ rater: S.rater, count: 3, exclude })}`);
    if (cid !== S.compId) return;
    const have = new Set(S.blind.map((p) => p.pair));
    for (const p of data.pairs) if (!have.has(p.pair)) S.blind.push(p);
    S.blindProgress = progressFrom(data.progress, sent, S.blindProgress, S.blindProgressKnown, S.pendingBlind.size);
    S.blindProgressKnown = true;
    for (const p of S.blind.slice(1, 3)) preload([p.left_url, p.right_url]);
  } finally {
    S.blindRefilling = false;
  }
}

// Blind mode must not show anything that could tell the two models apart, so entering it drops every
// round name, sample id and image URL of the other modes from the page; leaving it loads them again.
function sealRounds() {
  S.items = []; S.pairs = []; S.pairsShown = []; S.pendingPairs.clear();
  S.roundsLoaded = false;
  $("round").replaceChildren();
  $("grid").replaceChildren();
  for (const id of ["score-img", "score-overlay", "score-pose", "pair-left", "pair-right", "pair-left-overlay",
                    "pair-right-overlay", "pair-pose"]) $(id).removeAttribute("src");
  for (const id of ["score-meta", "score-prompt", "score-pose-name", "score-badge", "pair-prompt", "pair-pose-name"]) {
    $(id).textContent = "";
  }
}

// ------------------------------------------------------------------ rendering

function showEmpty(msg) {
  for (const v of ["score", "pairs", "grid", "blind"]) $(`view-${v}`).hidden = true;
  $("empty").hidden = !msg;
  $("empty").textContent = msg;
}

function render() {
  document.body.classList.toggle("overlay-on", S.overlay);
  $("overlay-toggle").checked = S.overlay;
  document.body.classList.toggle("crisp", S.crisp);
  $("crisp-toggle").checked = S.crisp;
  $("only-unrated").checked = S.onlyUnrated;
  for (const b of document.querySelectorAll(".modes button")) b.classList.toggle("active", b.dataset.mode === S.mode);
  document.body.classList.toggle("blind-mode", S.mode === "blind");
  if (S.mode === "blind") return renderBlind();
  if (!S.rater || S.roundId === null) return;
  if (!S.items.length) return showEmpty("This round has no images.");
  $("empty").hidden = true;
  for (const v of ["score", "pairs", "grid", "blind"]) $(`view-${v}`).hidden = v !== S.mode;
  if (S.mode === "score") renderScore();
  else if (S.mode === "pairs") renderPairs();
  else renderGrid();
  renderLightbox();
}

function scoreProgress() {
  setProgress(S.items.filter((it) => it.score !== null).length, S.items.length);
}

function renderScale(current) {
  const scale = $("scale");
  const n = S.cfg.score_max - S.cfg.score_min + 1;
  scale.style.setProperty("--per-row", String(Math.ceil(n / Math.ceil(n / 6))));
  const buttons = [];
  for (let v = S.cfg.score_min; v <= S.cfg.score_max; v++) {
    const b = el("button", { type: "button", textContent: fmtScore(v), title: keyHint(v) });
    b.dataset.score = v;
    if (v === current) b.classList.add("current");
    b.style.setProperty("--hue", String(((v - S.cfg.score_min) / (S.cfg.score_max - S.cfg.score_min)) * 120));
    buttons.push(b);
  }
  scale.replaceChildren(...buttons);
}

function keyHint(v) {
  if (v === 10 && S.cfg.score_min > 0) return "key 0";
  return v < 0 ? `Shift+${-v} (or - then ${-v})` : `key ${v}`;
}

function renderScore() {
  const it = S.items[S.pos];
  LS.setItem(`poseloop:pos:${S.roundId}`, String(it.sample_id));
  $("score-img").src = it.image_url;
  $("score-overlay").src = it.condition_url;
  $("score-pose").src = it.condition_url;
  $("score-pose-name").textContent = it.pose_name;
  $("score-prompt").textContent = it.prompt;
  $("score-meta").textContent =
    `image ${S.pos + 1} of ${S.items.length} · group ${it.group_index} · #${it.index} · ${it.file_name}`;
  const badge = $("score-badge");
  badge.textContent = fmtScore(it.score);
  badge.classList.toggle("unset", it.score === null);
  renderScale(it.score);
  scoreProgress();
  preload(S.items.slice(S.pos + 1, S.pos + 3).map((x) => x.image_url));
}

function renderPairs() {
  const p = S.pairs[0];
  setProgress(S.pairProgress.done, S.pairProgress.total);
  const view = $("view-pairs");
  if (!p) {
    view.hidden = true;
    showEmpty(allDoneText(S.pairProgress, S.refilling || S.pendingPairs.size > 0, "round"));
    return;
  }
  $("pair-prompt").textContent = p.prompt;
  $("pair-left").src = p.left.image_url;
  $("pair-right").src = p.right.image_url;
  $("pair-left-overlay").src = p.condition_url;
  $("pair-right-overlay").src = p.condition_url;
  $("pair-pose").src = p.condition_url;
  $("pair-pose-name").textContent = `${p.pose_name} · group ${p.group_index}`;
}

// What an empty pair queue means. "Every pair judged" is said only when the count shown says so too,
// and only once the labels still on their way have landed and the queue has been refilled.
function allDoneText(progress, busy, what) {
  if (busy) return "Loading pairs…";
  if (!progress.total) return what === "round" ? "No pairs in this round." : "This comparison has no pairs.";
  if (progress.done >= progress.total) return `You have judged every pair of this ${what}. Thank you!`;
  return `No pair to show right now (${progress.done} of ${progress.total} judged); reload to look again.`;
}

function renderBlind() {
  if (!S.rater) return;
  if (S.compId === null) return showEmpty("No blind comparisons yet. Run evaluate.py first.");
  setProgress(S.blindProgress.done, S.blindProgress.total);
  const p = S.blind[0];
  if (!p) return showEmpty(allDoneText(S.blindProgress, S.blindRefilling || S.pendingBlind.size > 0, "comparison"));
  $("empty").hidden = true;
  for (const v of ["score", "pairs", "grid", "blind"]) $(`view-${v}`).hidden = v !== "blind";
  $("blind-prompt").textContent = p.prompt;
  $("blind-left").src = p.left_url;
  $("blind-right").src = p.right_url;
  $("blind-left-overlay").src = p.pose_url;
  $("blind-right-overlay").src = p.pose_url;
  $("blind-pose").src = p.pose_url;
  renderLightbox();
}

function visibleGridItems() {
  return S.items.map((it, i) => [it, i]).filter(([it]) => !S.onlyUnrated || it.score === null);
}

function renderGrid() {
  const grid = $("grid");
  const rows = [];
  let groupId = null, row = null;
  const visible = visibleGridItems();
  if (!visible.some(([, i]) => i === S.gridSel) && visible.length) S.gridSel = visible[0][1];
  for (const [it, i] of visible) {
    if (it.group_id !== groupId) {
      groupId = it.group_id;
      row = el("div", { className: "grid-row" });
      const head = el("div", { className: "grid-head" }, [
        el("img", { src: it.condition_url, alt: "pose", loading: "lazy" }),
        el("p", { textContent: it.prompt }),
      ]);
      row.append(head);
      rows.push(row);
    }
    const fig = el("figure", { className: "tile" + (i === S.gridSel ? " selected" : "") }, [
      el("img", { src: it.image_url, alt: it.file_name, loading: "lazy" }),
      el("span", { className: "badge" + (it.score === null ? " unset" : ""), textContent: fmtScore(it.score) }),
    ]);
    fig.dataset.index = i;
    fig.addEventListener("click", () => { S.pos = i; setMode("score"); });
    row.append(fig);
  }
  grid.replaceChildren(...rows);
  if (!rows.length) grid.append(el("p", { className: "empty", textContent: "Every image has a score." }));
  scoreProgress();
  const sel = grid.querySelector(".selected");
  if (sel) sel.scrollIntoView({ block: "nearest" });
}

function renderLightbox() {
  const box = $("lightbox");
  if (box.hidden) return;
  let urls = [];
  if (S.mode === "blind") urls = S.blind[0] ? [S.blind[0].left_url, S.blind[0].right_url] : [];
  else if (S.mode === "pairs" && S.pairs[0]) urls = [S.pairs[0].left.image_url, S.pairs[0].right.image_url];
  else if (S.items.length) urls = [S.items[S.mode === "grid" ? S.gridSel : S.pos].image_url];
  box.classList.toggle("zoom", S.zoom);
  // A phone has no Esc key: the close button is how fullscreen ends there.
  const close = el("button", { type: "button", className: "lightbox-close", textContent: "×", title: "Close (Esc)" });
  close.setAttribute("aria-label", "Close fullscreen");
  close.addEventListener("click", (e) => { e.stopPropagation(); toggleLightbox(false); });
  box.replaceChildren(...urls.map((u) => el("img", { src: u, alt: "fullscreen" })), close);
}

// ------------------------------------------------------------------ actions

function setMode(mode) {
  const was = S.mode;
  S.mode = mode;
  LS.setItem("poseloop:mode", mode);
  if (mode === "blind") {
    if (was !== "blind") {
      sealRounds();
      toggleLightbox(false);
      loadComparisons().then(() => loadBlind(true)).then(render, (e) => toast(e.message, true));
    }
    return render();
  }
  if (!S.roundsLoaded) {
    if (mode !== "grid") S.lastLabelMode = mode;
    toggleLightbox(false);
    return reload();
  }
  if (mode !== "grid") S.lastLabelMode = mode;
  LS.setItem("poseloop:mode", mode);
  if (mode === "grid") S.gridSel = S.pos;
  if (mode === "pairs" && !S.pairs.length) {
    loadPairs(true).then(render, (e) => toast(e.message, true));
  }
  render();
}

function move(delta) {
  const n = S.items.length;
  let i = S.pos;
  for (let step = 0; step < n; step++) {
    i = Math.min(Math.max(i + delta, 0), n - 1);
    if (!S.onlyUnrated || S.items[i].score === null || i === 0 || i === n - 1) break;
  }
  S.pos = i;
  render();
}

function nextUnrated(from) {
  const n = S.items.length;
  for (let k = 1; k <= n; k++) {
    const i = (from + k) % n;
    if (S.items[i].score === null) return i;
  }
  return -1;
}

function score(index, value, advance) {
  if (value < S.cfg.score_min || value > S.cfg.score_max) {
    toast(`${fmtScore(value)} is outside the scale ${S.cfg.score_min}…${S.cfg.score_max}`, true);
    return;
  }
  const it = S.items[index];
  const before = it.score;
  it.score = value; // optimistic: the next image shows at once, the write catches up
  if (advance) {
    if (S.onlyUnrated) {
      const nxt = nextUnrated(index);
      S.pos = nxt >= 0 ? nxt : index;
    } else {
      S.pos = Math.min(index + 1, S.items.length - 1);
    }
    if (index === S.items.length - 1 && !S.onlyUnrated) toast("Last image of the round");
  }
  flash(value);
  render();
  write("/api/scores", { rater: S.rater, sample_id: it.sample_id, score: value })
    .catch((e) => {
      it.score = before;
      toast(`Score not saved: ${e.message}`, true);
      render();
    });
}

function flash(value) {
  const b = document.querySelector(`#scale button[data-score="${value}"]`);
  if (b) { b.classList.add("pressed"); setTimeout(() => b.classList.remove("pressed"), 180); }
}

function judge(choice) {
  const p = S.blind.shift();
  if (!p) return;
  const cid = S.compId;
  S.pendingBlind.add(p.pair);
  S.blindShown.push(p);
  S.blindProgress.done++;
  if (S.blind.length < 2) refillBlind().then(render, () => {});
  render();
  write(`/api/comparisons/${cid}/judgements`, { rater: S.rater, pair: p.pair, choice })
    .then((res) => {
      S.pendingBlind.delete(p.pair);
      if (cid !== S.compId) return;
      // Exact: the server counted after storing this verdict, and label writes go one at a time, so
      // none of the verdicts still pending was stored yet.
      S.blindProgress = { done: res.progress.done + S.pendingBlind.size, total: res.progress.total };
      S.blindProgressKnown = true;
      render();
    })
    .catch((e) => {
      S.pendingBlind.delete(p.pair);
      if (cid !== S.compId) return;
      S.blindShown = S.blindShown.filter((x) => x !== p);
      if (e.status === 409) { toast(`Already judged: ${e.message}`, true); return; } // e.g. in another tab
      S.blindProgress.done--;
      S.blind.unshift(p);
      toast(`Choice not saved: ${e.message}`, true);
      render();
    })
    .finally(() => {
      if (S.blind.length < 3 && S.mode === "blind") refillBlind().then(render, () => {});
    });
}

async function undoBlind() {
  const cid = S.compId;
  if (cid === null) return;
  try {
    await S.writes; // let earlier verdicts land first
    const last = S.blindShown.pop();
    const body = { rater: S.rater };
    if (last) body.pair = last.pair; // naming the pair makes a retried undo harmless
    const res = await write(`/api/comparisons/${cid}/undo`, body);
    if (cid !== S.compId) return;
    if (!res.undone) { toast("Nothing to undo"); return; }
    const p = res.undone.pair;
    S.blind = [p, ...S.blind.filter((x) => x.pair !== p.pair)];
    S.blindProgress = { done: res.progress.done + S.pendingBlind.size, total: res.progress.total };
    S.blindProgressKnown = true;
    toast(`Undone (${res.undone.choice}): the pair is back`);
    render();
  } catch (e) {
    toast(`Undo failed: ${e.message}`, true);
  }
}

function choose(choice) {
  const p = S.pairs.shift();
  if (!p) return;
  const key = pairKey(p);
  S.pendingPairs.add(key);
  S.pairsShown.push(p);
  S.pairProgress.done++;
  if (S.pairs.length < 2) refillPairs().then(render, () => {});
  render();
  write("/api/preferences", { rater: S.rater, left_id: p.left.sample_id, right_id: p.right.sample_id, choice })
    .then(() => S.pendingPairs.delete(key))
    .catch((e) => {
      S.pendingPairs.delete(key);
      S.pairProgress.done--;
      S.pairs.unshift(p);
      toast(`Choice not saved: ${e.message}`, true);
      render();
    })
    .finally(() => {
      if (S.pairs.length < 3 && S.mode === "pairs") refillPairs().then(render, () => {});
    });
}

async function undo() {
  if (S.mode === "blind") return undoBlind();
  const kind = S.lastLabelMode === "pairs" ? "preference" : "score";
  try {
    await S.writes; // let earlier labels land first, so undo reverts the newest one
    const res = await write("/api/undo", { rater: S.rater, round_id: S.roundId, kind });
    const ev = res.undone;
    if (!ev) { toast("Nothing to undo"); return; }
    if (ev.kind === "score") {
      const i = S.items.findIndex((it) => it.sample_id === ev.sample_id);
      if (i >= 0) { S.items[i].score = ev.old_score; S.pos = i; S.gridSel = i; }
      toast(`Undone: ${fmtScore(ev.score)} → ${fmtScore(ev.old_score)}`);
    } else {
      const key = `${ev.sample_a_id}-${ev.sample_b_id}`;
      const idx = S.pairsShown.findIndex((p) => pairKey(p) === key);
      S.pairs = S.pairs.filter((p) => pairKey(p) !== key);
      if (idx >= 0) S.pairs.unshift(S.pairsShown.splice(idx, 1)[0]);
      else await loadPairs(true);
      if (ev.old_choice === null) S.pairProgress.done = Math.max(0, S.pairProgress.done - 1);
      toast("Undone: pair is back");
    }
    render();
  } catch (e) {
    toast(`Undo failed: ${e.message}`, true);
  }
}

function toggleLightbox(force) {
  const box = $("lightbox");
  box.hidden = force === undefined ? !box.hidden : !force;
  S.zoom = false;
  renderLightbox();
}

function toggleHelp() {
  const d = $("help-dialog");
  if (d.open) d.close(); else d.showModal();
}

// The options menu of narrow screens (on wide ones the same toggles sit in the header itself).
function toggleOptions(force) {
  const bar = $("bar");
  const open = force === undefined ? !bar.classList.contains("opts-open") : force;
  bar.classList.toggle("opts-open", open);
  $("opts-btn").setAttribute("aria-expanded", String(open));
}

// ------------------------------------------------------------------ keyboard

// US-layout shifted digits, for browsers that report Shift+2 as "@" without a usable code.
const SHIFTED = { "!": 1, "@": 2, "#": 3, "$": 4, "%": 5, "^": 6, "&": 7, "*": 8, "(": 9 };

function digitOf(e) {
  const m = /^(?:Digit|Numpad)(\d)$/.exec(e.code || "");
  if (m) return Number(m[1]);
  if (/^\d$/.test(e.key)) return Number(e.key);
  if (e.key in SHIFTED) return SHIFTED[e.key];
  return null;
}

function scoreFromKey(e) {
  const d = digitOf(e);
  if (d === null) return null;
  const negative = e.shiftKey || e.key in SHIFTED || S.minusArmed;
  S.minusArmed = false;
  if (negative) return d === 0 ? null : -d;
  if (d === 0 && S.cfg.score_min > 0) return 10; // 1..10 scales: 0 is ten
  return d;
}

function onKey(e) {
  const target = e.target;
  if (target && (target.tagName === "INPUT" || target.tagName === "SELECT" || target.tagName === "TEXTAREA")) {
    if (e.key === "Escape") target.blur();
    return;
  }
  if ($("rater-dialog").open) return;
  if ($("help-dialog").open) {
    if (e.key === "?" || e.key === "Escape") { e.preventDefault(); $("help-dialog").close(); }
    return;
  }
  if (e.altKey || e.metaKey) return;
  if (e.ctrlKey) {
    if (e.key === "z" || e.key === "Z") { e.preventDefault(); undo(); }
    return;
  }
  const k = e.key;
  const handled = () => e.preventDefault();

  if (k === "?") { handled(); return toggleHelp(); }
  if (k === "Escape") { handled(); S.minusArmed = false; toggleOptions(false); return toggleLightbox(false); }
  if (!S.rater) return;
  if (k === "b") { handled(); return setMode(S.mode === "blind" ? S.lastLabelMode : "blind"); }
  if (S.mode === "blind") return onBlindKey(e, k, handled);
  if (!S.items.length) return;
  if (k === "f") { handled(); return toggleLightbox(); }
  if (k === "z") { handled(); if ($("lightbox").hidden) toggleLightbox(true); S.zoom = !S.zoom; return renderLightbox(); }
  if (k === "m") { handled(); return setMode(S.mode === "pairs" ? "score" : "pairs"); }
  if (k === "g") { handled(); return setMode(S.mode === "grid" ? S.lastLabelMode : "grid"); }
  if (k === "n") { handled(); return toggleOnlyUnrated(); }
  if (k === "o") { handled(); S.overlay = !S.overlay; LS.setItem("poseloop:overlay", S.overlay ? "1" : "0"); return render(); }
  if (k === "u") { handled(); return undo(); }

  if (S.mode === "pairs") {
    const choice = { ArrowLeft: "left", a: "left", ArrowRight: "right", d: "right",
                     ArrowDown: "tie", t: "tie", ArrowUp: "skip", s: "skip" }[k];
    if (choice) { handled(); if (!e.repeat) choose(choice); }
    return;
  }

  if (k === "-") { handled(); S.minusArmed = true; toast("−  now a digit"); return; }
  const v = scoreFromKey(e);
  if (v !== null) {
    handled();
    if (e.repeat) return; // a held key must not score a run of images
    if (S.mode === "grid") { score(S.gridSel, v, false); return gridMove(1); }
    return score(S.pos, v, true);
  }
  if (S.mode === "grid") {
    const cols = gridColumns();
    const delta = { ArrowLeft: -1, ArrowRight: 1, ArrowUp: -cols, ArrowDown: cols }[k];
    if (delta) { handled(); return gridMove(delta); }
    if (k === "Enter") { handled(); S.pos = S.gridSel; return setMode("score"); }
    return;
  }
  if (k === "ArrowLeft") { handled(); return move(-1); }
  if (k === "ArrowRight") { handled(); return move(1); }
  if (k === "Home") { handled(); S.pos = 0; return render(); }
  if (k === "End") { handled(); S.pos = S.items.length - 1; return render(); }
  if (k === " ") {
    handled();
    const nxt = nextUnrated(S.pos);
    if (nxt >= 0) { S.pos = nxt; render(); } else toast("Every image has a score");
  }
}

function onBlindKey(e, k, handled) {
  if (k === "f") { handled(); return toggleLightbox(); }
  if (k === "z") { handled(); if ($("lightbox").hidden) toggleLightbox(true); S.zoom = !S.zoom; return renderLightbox(); }
  if (k === "o") { handled(); S.overlay = !S.overlay; LS.setItem("poseloop:overlay", S.overlay ? "1" : "0"); return render(); }
  if (k === "u") { handled(); return undoBlind(); }
  if (k === "m") { handled(); return setMode(S.lastLabelMode); }
  if (k === "g") { handled(); return setMode("grid"); }
  const choice = { ArrowLeft: "left", a: "left", ArrowRight: "right", d: "right",
                   ArrowDown: "tie", t: "tie", ArrowUp: "skip", s: "skip" }[k];
  if (choice) { handled(); if (!e.repeat) judge(choice); }
}

function gridColumns() {
  // Tiles of one group share a row; moving up/down jumps a group.
  const row = document.querySelector("#grid .grid-row");
  return row ? row.querySelectorAll(".tile").length || 1 : 1;
}

function gridMove(delta) {
  const visible = visibleGridItems().map(([, i]) => i);
  if (!visible.length) return render();
  let at = visible.indexOf(S.gridSel);
  at = Math.min(Math.max((at < 0 ? 0 : at) + delta, 0), visible.length - 1);
  S.gridSel = visible[at];
  S.pos = S.gridSel;
  render();
}

function toggleOnlyUnrated() {
  S.onlyUnrated = !S.onlyUnrated;
  LS.setItem("poseloop:onlyUnrated", S.onlyUnrated ? "1" : "0");
  if (S.onlyUnrated && S.items[S.pos] && S.items[S.pos].score !== null) {
    const nxt = nextUnrated(S.pos);
    if (nxt >= 0) S.pos = nxt;
  }
  render();
}

// ------------------------------------------------------------------ wiring

function wire() {
  document.addEventListener("keydown", onKey);
  $("round").addEventListener("change", (e) => {
    S.roundId = Number(e.target.value);
    LS.setItem("poseloop:round", String(S.roundId));
    S.pairs = [];
    S.pairsShown = [];
    e.target.blur();
    reload();
  });
  for (const b of document.querySelectorAll(".modes button")) b.addEventListener("click", () => setMode(b.dataset.mode));
  $("only-unrated").addEventListener("change", () => toggleOnlyUnrated());
  $("crisp-toggle").addEventListener("change", (e) => setCrisp(e.target.checked));
  $("opts-btn").addEventListener("click", (e) => { e.stopPropagation(); toggleOptions(); });
  document.addEventListener("click", (e) => { if (!$("opts").contains(e.target)) toggleOptions(false); });
  $("overlay-toggle").addEventListener("change", (e) => {
    S.overlay = e.target.checked;
    LS.setItem("poseloop:overlay", S.overlay ? "1" : "0");
    render();
  });
  $("scale").addEventListener("click", (e) => {
    const b = e.target.closest("button");
    if (b) score(S.pos, Number(b.dataset.score), true);
  });
  $("prev").addEventListener("click", () => move(-1));
  $("next").addEventListener("click", () => move(1));
  for (const b of document.querySelectorAll("#view-pairs .choices button")) b.addEventListener("click", () => choose(b.dataset.choice));
  for (const b of document.querySelectorAll("#view-blind .choices button")) b.addEventListener("click", () => judge(b.dataset.choice));
  $("comparison").addEventListener("change", (e) => {
    S.compId = Number(e.target.value);
    LS.setItem("poseloop:comparison", String(S.compId));
    e.target.blur();
    loadBlind(true).then(render, (err) => toast(err.message, true));
  });
  for (const id of ["score-img", "pair-left", "pair-right", "blind-left", "blind-right"]) {
    $(id).addEventListener("click", () => toggleLightbox(true));
  }
  $("lightbox").addEventListener("click", () => { S.zoom = !S.zoom; renderLightbox(); });
  $("help-btn").addEventListener("click", toggleHelp);
  $("help-close").addEventListener("click", () => $("help-dialog").close());
  $("help-dialog").addEventListener("click", (e) => { if (e.target === $("help-dialog")) $("help-dialog").close(); });
  $("rater-btn").addEventListener("click", askRater);
  $("rater-form").addEventListener("submit", () => {
    const name = $("rater-input").value.trim();
    if (name) setRater(name);
  });
  $("rater-dialog").addEventListener("cancel", (e) => { if (!S.rater) e.preventDefault(); });
  window.addEventListener("beforeunload", (e) => {
    // Only warn when a label is still on its way; everything else is already stored.
    if (S.inFlight > 0) { e.preventDefault(); e.returnValue = ""; }
  });
}

async function main() {
  wire();
  try {
    S.cfg = await api("GET", "/api/config");
    // Blind mode loads no rounds at all: nothing on the page may name the models it compares.
    if (S.mode === "blind") await loadComparisons();
    else await loadRounds();
  } catch (e) {
    showEmpty(`Cannot reach the server: ${e.message}`);
    return;
  }
  if (S.mode === "score" || S.mode === "pairs") S.lastLabelMode = S.mode;
  else if (!["grid", "blind"].includes(S.mode)) S.mode = "score";
  $("rater-btn").textContent = S.rater || "set rater";
  S.crisp = S.rater ? LS.getItem(crispKey()) === "1" : false;
  if (!S.rater) askRater();
  else reload();
}

main();
