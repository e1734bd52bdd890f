// ---- Fleet: the workers of each task and the answers they end, a panel of the fleet view ----
"use strict";

const FLEET_POLL_MS = 2000; // a rate measured by the page: the models' counters read at this interval
const FLEET_AUTH_RETRY_MS = 10000; // without a valid key: look again now and then (a new key looks at once)
const FLEET_HISTORY_MS = 5 * 60 * 1000;

// tasks: task -> {card, last: [ms, total], rates: [[ms, per s]]}; generation: the one poll loop that goes on
const fleet = { timer: null, generation: 0, tasks: new Map() };

async function pollFleet() {
  const generation = ++fleet.generation; // a poll started now (a new key, the tab shown again) ends the others
  clearTimeout(fleet.timer);
  let nextMs = FLEET_POLL_MS;
  if (!document.hidden) {
    try {
      const response = await api("/v1/models");
      if (generation !== fleet.generation) return;
      if (response.ok) {
        const body = await response.json();
        if (generation !== fleet.generation) return;
        showError("fleet-error", null);
        renderFleet(Array.isArray(body.models) ? body.models : []);
      } else if (response.status === 429 || response.status === 503) {
        nextMs = retryAfterMs(response, nextMs);
      } else {
        const error = await readError(response);
        if (generation !== fleet.generation) return;
        showError("fleet-error", error);
        if (isKeyError(error)) nextMs = FLEET_AUTH_RETRY_MS;
      }
    } catch (error) {
      if (generation !== fleet.generation) return;
      showError("fleet-error", { code: "network_error", message: `the API could not be reached (${error.message})` });
    }
  }
  fleet.timer = setTimeout(pollFleet, nextMs);
}

function renderFleet(models) {
  const now = performance.now();
  for (const entry of models) {
    let state = fleet.tasks.get(entry.task);
    if (!state) {
      state = { card: fleetCard(entry.task), last: null, rates: [] };
      fleet.tasks.set(entry.task, state);
      $("fleet-tasks").append(state.card);
    }
    const outcomes = entry.outcomes || {};
    const total = Object.values(outcomes).reduce((sum, count) => sum + Number(count || 0), 0);
    if (state.last) {
      const seconds = (now - state.last[0]) / 1000;
      // A total that fell: the counters were reset; that interval says nothing.
      const rate = seconds > 0 && total >= state.last[1] ? (total - state.last[1]) / seconds : 0;
      state.rates.push([now, rate]);
      while (state.rates.length && now - state.rates[0][0] > FLEET_HISTORY_MS) state.rates.shift();
    }
    state.last = [now, total];
    updateFleetCard(state, entry, outcomes);
  }
}

function fleetCard(task) {
  const card = element("article", "task-card");
  card.dataset.task = task;
  const title = element("h4", "", `${TASK_NAMES[task] ?? task} `);
  title.id = `fleet-${task}-title`;
  title.append(element("small", "", `(${task})`));
  card.setAttribute("aria-labelledby", title.id);

  const summary = element("p", "summary");
  summary.append(
    element("span", "workers-count"),
    " · ",
    element("span", "waiting"),
    " · queue ",
    element("code", "queue"),
  );
  const outcomes = element("p", "outcomes");
  const figure = element("figure", "chart-box");
  const canvas = element("canvas", "chart");
  canvas.setAttribute("role", "img");
  const rate = element("figcaption", "rate");
  rate.setAttribute("aria-live", "off"); // every 2 s would be noise; the text is there to read
  figure.append(canvas, rate);

  const table = element("table", "workers");
  const head = element("thead");
  const row = element("tr");
  for (const name of ["Worker", "Model", "Device", "Loaded"]) {
    const cell = element("th", "", name);
    cell.scope = "col";
    row.append(cell);
  }
  head.append(row);
  table.append(element("caption", "", "Workers"), head, element("tbody"));
  const none = element("p", "no-workers", "No live worker: this task's jobs are refused (no_worker) or wait for one.");
  none.hidden = true;
  card.append(title, summary, outcomes, figure, table, none, sharesTable());
  return card;
}

function updateFleetCard(state, entry, outcomes) {
  const card = state.card;
  const workers = Array.isArray(entry.workers) ? entry.workers : [];
  const count = card.querySelector(".workers-count");
  count.textContent = `${workers.length} ${workers.length === 1 ? "worker" : "workers"}`;
  count.dataset.count = workers.length;
  const waiting = card.querySelector(".waiting");
  waiting.textContent = `${entry.waiting} ${entry.waiting === 1 ? "answer" : "answers"} waiting`;
  waiting.dataset.count = entry.waiting;
  card.querySelector(".queue").textContent = entry.queue;
  const ended = Object.entries(outcomes).map(([status, number]) => `${status} ${number}`);
  card.querySelector(".outcomes").textContent = `Runs ended: ${ended.length ? ended.join(" · ") : "none yet"}`;

  card.querySelector(".workers").hidden = workers.length === 0;
  card.querySelector(".no-workers").hidden = workers.length > 0;
  card.querySelector(".workers tbody").replaceChildren(
    ...workers.map((worker) => {
      const row = element("tr");
      row.dataset.workerId = worker.id;
      const loaded = new Date(worker.loaded_at);
      const loadedText = Number.isNaN(loaded.getTime()) ? String(worker.loaded_at) : loaded.toLocaleTimeString();
      row.append(
        element("td", "worker-id", worker.id),
        element("td", "model", worker.model),
        element("td", "device", `${worker.device} · ${worker.dtype}`),
        element("td", "loaded", `${loadedText} (${Number(worker.load_seconds).toFixed(1)} s)`),
      );
      return row;
    }),
  );

  updateShares(card, Array.isArray(entry.shares) ? entry.shares : []);

  const rates = state.rates.map(([, rate]) => rate);
  const now = rates.length ? rates[rates.length - 1] : null;
  const peak = rates.length ? Math.max(...rates) : 0;
  const canvas = card.querySelector(".chart");
  canvas.dataset.samples = rates.length;
  canvas.dataset.peak = peak;
  const text =
    now === null
      ? "Answers ended per second: measuring"
      : `Answers ended per second: ${formatRate(now)} now, ${formatRate(peak)} at most in the last 5 minutes`;
  card.querySelector(".rate").textContent = text;
  canvas.setAttribute("aria-label", text);
  drawChart(canvas, state.rates);
}

// The API keys holding work in the task's queue, level by level: each one's share of the workers (fair share within
// a level, a higher level first). Only the key of this page is named; the others are "another key".
function sharesTable() {
  const table = element("table", "shares");
  const head = element("thead");
  const row = element("tr");
  for (const name of ["Priority", "Key", "Waiting", "Weight", "Share"]) {
    const cell = element("th", "", name);
    cell.scope = "col";
    row.append(cell);
  }
  head.append(row);
  table.append(element("caption", "", "Keys holding work, and their shares of the workers"), head, element("tbody"));
  table.hidden = true;
  return table;
}

function updateShares(card, shares) {
  const table = card.querySelector(".shares");
  table.hidden = shares.length === 0;
  table.querySelector("tbody").replaceChildren(
    ...shares.map((share) => {
      const row = element("tr");
      row.dataset.priority = share.priority;
      row.dataset.yours = share.yours ? "true" : "false";
      const name = share.yours ? `${share.key === "-" ? "requests without a key" : share.key} (yours)` : "another key";
      row.append(
        element("td", "priority", share.priority),
        element("td", "key", name),
        element("td", "waiting", `${share.waiting} ${share.waiting === 1 ? "answer" : "answers"}`),
        element("td", "weight", String(share.weight)),
        element("td", "share", `${Math.round(share.share * 100)} %`),
      );
      return row;
    }),
  );
}

function drawCharts() {
  for (const state of fleet.tasks.values()) drawChart(state.card.querySelector(".chart"), state.rates);
}

function niceCeiling(value) {
  const power = 10 ** Math.floor(Math.log10(value));
  for (const step of [1, 2, 5, 10]) if (value <= step * power) return step * power;
  return 10 * power;
}

// Answers per second over the last FLEET_HISTORY_MS, newest on the right, on a 1-2-5 scale.
function drawChart(canvas, rates) {
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return; // not shown: drawn when its view opens
  const ratio = window.devicePixelRatio || 1;
  canvas.width = Math.round(width * ratio);
  canvas.height = Math.round(height * ratio);
  const context = canvas.getContext("2d");
  context.setTransform(ratio, 0, 0, ratio, 0, 0);
  context.clearRect(0, 0, width, height);

  const style = getComputedStyle(canvas);
  const top = niceCeiling(Math.max(1, ...rates.map(([, rate]) => rate)));
  const pad = { top: 16, bottom: 16, left: 4, right: 4 };
  const plotHeight = height - pad.top - pad.bottom;
  const now = performance.now();
  const x = (at) => pad.left + (width - pad.left - pad.right) * (1 - (now - at) / FLEET_HISTORY_MS);
  const y = (rate) => pad.top + plotHeight * (1 - rate / top);

  context.strokeStyle = style.getPropertyValue("--line").trim() || "#d1d5db";
  context.lineWidth = 1;
  context.beginPath();
  for (const level of [0, top / 2, top]) {
    context.moveTo(pad.left, Math.round(y(level)) + 0.5);
    context.lineTo(width - pad.right, Math.round(y(level)) + 0.5);
  }
  context.stroke();

  context.fillStyle = style.getPropertyValue("--muted").trim() || "#6b7280";
  context.font = "11px system-ui, sans-serif";
  context.textBaseline = "alphabetic";
  context.textAlign = "left";
  context.fillText(`${top}/s`, pad.left, pad.top - 4);
  context.fillText("5 min ago", pad.left, height - 3);
  context.textAlign = "right";
  context.fillText("now", width - pad.right, height - 3);

  if (!rates.length) return;
  const accent = style.getPropertyValue("--accent").trim() || "#2f6fd6";
  const line = new Path2D();
  rates.forEach(([at, rate], index) => {
    if (index === 0) line.moveTo(x(at), y(rate));
    else line.lineTo(x(at), y(rate));
  });
  if (rates.length === 1) line.lineTo(x(rates[0][0]) + 2, y(rates[0][1])); // one point: a dot
  const area = new Path2D(line);
  area.lineTo(x(rates[rates.length - 1][0]), y(0));
  area.lineTo(x(rates[0][0]), y(0));
  area.closePath();
  context.fillStyle = accent;
  context.globalAlpha = 0.15;
  context.fill(area);
  context.globalAlpha = 1;
  context.strokeStyle = accent;
  context.lineWidth = 2;
  context.lineJoin = "round";
  context.stroke(line);
}

addPanel({
  start: pollFleet, // in every view: the chart covers the minutes the page was open
  keyChanged: pollFleet, // another key may see the fleet
  shown: drawCharts, // a canvas is drawn at its size, which it has only while shown
  visible: pollFleet, // measured again at once; the interval while hidden is averaged
});
