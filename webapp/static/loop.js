// Loop mode on the rating page: the "Train next round" button, the job's stage and progress, and a notice
// when the new round is in the selector. Uses app.js's api(), toast(), loadRounds() and S (loaded before this).
"use strict";

const LOOP = { known: null, notified: new Set(), timer: null, busy: false };
const STAGES = {
  start: "starting", reward: "training the reward model", policy: "training the policy",
  generate: "generating the round", compare: "making the blind A/B rounds", score: "scoring the rounds",
};

function loopSchedule(ms) {
  clearTimeout(LOOP.timer);
  LOOP.timer = setTimeout(loopPoll, ms);
}

function loopText(st) {
  const job = st.job;
  if (!job) return "No loop job yet.";
  const pct = `${Math.round(100 * job.progress)}%`;
  if (job.state === "queued") return `${job.target_round}: waiting for a worker${job.attempts ? ` (attempt ${job.attempts + 1})` : ""} · ${job.message}`;
  if (job.state === "running") return `${job.target_round}: ${STAGES[job.stage] || job.stage} · ${pct} · ${job.message}`;
  if (job.state === "done") return `${job.target_round} is ready (job ${job.id}).`;
  if (job.state === "failed") return `Job ${job.id} failed: ${job.error || job.message}`;
  return `Job ${job.id} ${job.state}.`;
}

async function loopNewRound(name) {
  // Blind mode holds no round names on the page; the selector is refreshed when the rater leaves it.
  if (S.mode !== "blind") await loadRounds();
  const note = $("loop-notice");
  note.replaceChildren(`${name} is ready: it is in the round selector. `);
  const opt = Array.from($("round").options).find((o) => o.textContent.startsWith(`${name} `));
  if (opt && S.mode !== "blind") {
    const go = el("button", { type: "button", className: "link-btn", id: "loop-open", textContent: `Rate ${name}` });
    go.addEventListener("click", () => {
      $("round").value = opt.value;
      $("round").dispatchEvent(new Event("change"));
      note.hidden = true;
      go.blur();
    });
    note.append(go);
  }
  note.hidden = false;
  toast(`${name} is ready`);
}

async function loopPoll() {
  let st;
  try {
    st = await api("GET", "/api/loop");
  } catch (e) {
    loopSchedule(5000);
    return;
  }
  if (!st.enabled) return;
  $("loop-bar").hidden = false;
  const job = st.job;
  const active = !!job && (job.state === "queued" || job.state === "running");
  $("loop-train").disabled = active || !st.round || LOOP.busy;
  const bar = $("loop-progress");
  bar.hidden = !active;
  bar.value = job ? job.progress : 0;
  $("loop-stage").textContent = st.worker_error ? `${st.worker_error}. ${loopText(st)}` : loopText(st);
  $("loop-stage").dataset.state = job ? job.state : "";
  $("loop-stage").dataset.stage = job ? job.stage : "";
  $("loop-labels").textContent = st.round
    ? `${st.round.name}: ${st.round.labels} labels${st.min_labels ? ` (trains by itself at ${st.min_labels})` : ""}`
    : "no loop round yet";
  // The new round is announced once it is stored (its job may still be making the A/B rounds).
  const made = job && job.result && job.result.round;
  if (LOOP.known === null) {
    LOOP.known = true;
    if (made) LOOP.notified.add(job.id); // made before this page opened: nothing new
  } else if (made && !LOOP.notified.has(job.id)) {
    LOOP.notified.add(job.id);
    await loopNewRound(job.result.round);
  }
  loopSchedule(active ? 1000 : 4000);
}

async function loopTrain() {
  const btn = $("loop-train");
  btn.blur();
  LOOP.busy = true;
  btn.disabled = true;
  try {
    const job = await api("POST", "/api/loop/jobs", S.rater ? { rater: S.rater } : {});
    toast(`Job ${job.id} queued: ${job.target_round} follows`);
  } catch (e) {
    toast(e.message, true);
  } finally {
    LOOP.busy = false;
    loopPoll();
  }
}

document.addEventListener("DOMContentLoaded", () => {
  $("loop-train").addEventListener("click", loopTrain);
  loopPoll();
});
