// poseloop stats page: renders /api/stats for one round.
"use strict";

const $ = (id) => document.getElementById(id);

function el(tag, props, children) {
  const e = document.createElement(tag);
  Object.assign(e, props || {});
  for (const c of children || []) e.append(c);
  return e;
}

async function getJson(path) {
  const r = await fetch(path, { headers: { Accept: "application/json" }, credentials: "same-origin" });
  const data = await r.json();
  if (!r.ok) throw new Error(data.error || r.statusText);
  return data;
}

function bar(done, total) {
  const fill = el("span");
  fill.style.width = total ? `${(100 * done) / total}%` : "0";
  return el("div", { className: "mini" }, [
    el("div", { className: "progress-bar" }, [fill]),
    el("span", { textContent: `${done} / ${total}` }),
  ]);
}

function histogram(hist) {
  const max = Math.max(1, ...hist.map((h) => h.count));
  return el("div", { className: "hist" }, hist.map((h) => {
    const b = el("span", { title: `${h.score}: ${h.count}` });
    b.style.height = `${(100 * h.count) / max}%`;
    return el("div", {}, [b, el("small", { textContent: String(h.score) })]);
  }));
}

const fmt = (x, digits) => (x === null || x === undefined ? "–" : Number(x).toFixed(digits));

function setExports(roundId) {
  const q = `round_id=${roundId}`;
  $("exp-scores").href = `/api/export/scores.json?${q}`;
  $("exp-d3po").href = `/api/export/d3po.zip?${q}`;
  $("exp-jsonl").href = `/api/export/labels.jsonl?${q}`;
  $("exp-history").href = `/api/export/labels.jsonl?${q}&history=1`;
}

// The page opens with "Loading…" in every table (stats.html); a round change shows it again until the
// new numbers are in, so old and new rows are never mixed.
function setLoading(on) {
  $("stats-loading").hidden = !on;
  document.querySelector("main").setAttribute("aria-busy", String(on));
  if (!on) return;
  for (const t of document.querySelectorAll("table.data")) {
    const cell = el("td", { textContent: "Loading…", colSpan: t.tHead.rows[0].cells.length });
    t.tBodies[0].replaceChildren(el("tr", { className: "loading-row" }, [cell]));
  }
  for (const note of document.querySelectorAll(".empty-note")) note.hidden = true;
}

// Tables still saying "Loading…" when there is nothing (more) to load are emptied.
function clearLoadingRows() {
  for (const row of document.querySelectorAll("tr.loading-row")) row.remove();
}

function showError(e) {
  setLoading(false);
  clearLoadingRows();
  document.querySelector("main").prepend(el("p", { className: "error", textContent: `Could not load: ${e.message}` }));
}

async function show(roundId) {
  setExports(roundId);
  setLoading(true);
  const s = await getJson(`/api/stats?round_id=${roundId}`);
  setLoading(false);
  showAcrossRounds(s);
  $("rater-table").tBodies[0].replaceChildren(...s.raters.map((r) => el("tr", {}, [
    el("td", { textContent: r.rater }),
    el("td", {}, [bar(r.scored, r.score_total)]),
    el("td", {}, [bar(r.pairs, r.pair_total)]),
    el("td", { textContent: fmt(r.mean_score, 2) }),
    el("td", {}, [histogram(r.histogram)]),
  ])));
  $("no-raters").hidden = s.raters.length > 0;
  const pairRow = (r, value) => el("tr", {}, [
    el("td", { textContent: `${r.a} · ${r.b}` }), el("td", { textContent: String(r.shared) }), el("td", { textContent: value }),
  ]);
  $("spearman-table").tBodies[0].replaceChildren(...s.agreement.spearman.map((r) => pairRow(r, fmt(r.spearman, 3))));
  $("pair-table").tBodies[0].replaceChildren(...s.agreement.pairs.map((r) =>
    pairRow(r, r.agreement === null ? "–" : `${(100 * r.agreement).toFixed(1)}%`)));
}

const pct = (x) => (x === null || x === undefined ? "–" : `${(100 * x).toFixed(1)}%`);
const td = (text, cls) => el("td", { textContent: String(text), className: cls || "" });
const roundLabel = (r) => `${r.name}${r.policy_version ? ` (${r.policy_version})` : ""}`;

function showAcrossRounds(s) {
  $("rounds-table").tBodies[0].replaceChildren(...s.rounds.map((r) => el("tr", {}, [
    td(r.name), td(r.policy_version || "base model"), td((r.created_at || "").slice(0, 16).replace("T", " ")),
    td(r.n_scores), td(r.n_raters), td(fmt(r.mean_score, 2)), td(fmt(r.mean_z, 2)),
  ])));
  $("cross-table").tBodies[0].replaceChildren(...s.cross_round.map((c) => el("tr", {}, [
    td(`${c.older} → ${c.newer}`), td(c.n), td(c.newer_wins), td(c.older_wins), td(c.ties), td(pct(c.newer_win_rate)),
  ])));
  $("no-cross").hidden = s.cross_round.length > 0;
  const rows = [];
  for (const c of s.comparisons) {
    const t = c.total;
    rows.push(el("tr", { className: "group-row" }, [
      td(`${c.name} · ${c.pairs} pairs`), td(roundLabel(c.baseline)), td(roundLabel(c.candidate)), td(t.n),
      td(t.candidate_wins), td(t.baseline_wins), td(t.ties), td(t.skips), td(pct(t.candidate_win_rate)),
    ]));
    for (const r of c.raters) {
      rows.push(el("tr", { className: "sub-row" }, [
        td(r.rater, "indent"), td(""), td(""), td(r.n), td(r.candidate_wins), td(r.baseline_wins), td(r.ties),
        td(r.skips), td(pct(r.candidate_win_rate)),
      ]));
    }
  }
  $("blind-table").tBodies[0].replaceChildren(...rows);
  $("no-blind").hidden = s.comparisons.length > 0;
}

async function main() {
  const data = await getJson("/api/rounds");
  const sel = $("round");
  sel.replaceChildren(...data.rounds.map((r) =>
    el("option", { value: r.id, textContent: r.finished ? r.name : `${r.name} (unfinished)` })));
  const saved = Number(localStorage.getItem("poseloop:round"));
  if (data.rounds.some((r) => r.id === saved)) sel.value = String(saved);
  else if (data.default_round_id !== null) sel.value = String(data.default_round_id);
  sel.addEventListener("change", () => show(Number(sel.value)).catch(showError));
  if (data.rounds.length) {
    await show(Number(sel.value));
  } else {
    const s = await getJson("/api/stats");
    setLoading(false);
    showAcrossRounds(s);
    clearLoadingRows();
    $("no-raters").hidden = false;
  }
}

main().catch(showError);
