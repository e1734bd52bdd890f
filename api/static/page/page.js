// The page at GET /, the service's console, in three views chosen by the URL's fragment:
// - #ask (the default): ask a question about an image or caption it, follow the job to its end, list recent jobs;
// - #batches, #batch=<id>: start a batch, or open one, and watch it end (progress, counts, failures, rate, ETA);
// - #fleet: each task's workers, the answers waiting, and a chart of answers ended per second.
// Jobs and batches sent from this browser are kept in its localStorage. Server text is only ever set as
// textContent, never parsed as HTML. Plain script, served as it is by api/page.py.
"use strict";

const RECENT_STORAGE = "blipq.recentJobs"; // the last jobs, newest first
const BATCHES_STORAGE = "blipq.recentBatches"; // the last batches started or opened here, newest first
const KEY_STORAGE = "blipq.apiKey";
const RECENT_MAX = 8;
const BATCHES_MAX = 8;
const POLL_FIRST_MS = 250; // a job on an idle worker ends in well under a second
const POLL_MAX_MS = 2000;
const FINAL = new Set(["succeeded", "failed", "canceled", "expired"]);
const BATCH_POLL_MS = 1000;
const BATCH_RATE_WINDOW_MS = 15000; // the batch's rate: items ended over the polls of the last 15 s
const FLEET_POLL_MS = 2000;
const FLEET_AUTH_RETRY_MS = 10000; // without a valid key: look again now and then (a new key looks at once)
const FLEET_HISTORY_MS = 5 * 60 * 1000;
const VIEWS = ["ask", "batches", "fleet"];
const STATUSES = ["queued", "running", "succeeded", "failed", "canceled", "expired"];
const TASK_NAMES = { vqa: "Questions", caption: "Captions" };

const $ = (id) => document.getElementById(id);
let shownJobId = null; // the job the result panel shows; others go on updating the recent list only
let previewUrl = null;
let currentView = null;

function load(name, fallback) {
  try {
    return JSON.parse(localStorage.getItem(name)) ?? fallback;
  } catch {
    return fallback; // storage off, or garbled: start afresh
  }
}

function save(name, value) {
  try {
    localStorage.setItem(name, JSON.stringify(value));
  } catch {
    // Storage full or off: the page still works, it forgets on reload.
  }
}

function loadList(name) {
  const list = load(name, []);
  return Array.isArray(list) ? list : [];
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// A request to this API with the key the page holds; never cached (every read is a poll).
function api(path, options = {}) {
  return fetch(path, { ...options, headers: { ...authHeaders(), ...(options.headers || {}) }, cache: "no-store" });
}

// The API's error shape, {"error": {"code", "message"}}; anything else (a proxy's page) gets a code of its status.
async function readError(response) {
  try {
    const body = await response.json();
    if (body && body.error && body.error.code) return body.error;
  } catch {
    // not JSON
  }
  return { code: `http_${response.status}`, message: response.statusText || "the server answered with an error" };
}

function retryAfterMs(response, fallback) {
  const seconds = Number(response.headers.get("Retry-After"));
  return seconds > 0 ? seconds * 1000 : fallback;
}

function isKeyError(error) {
  return error.code.startsWith("api_key_");
}

function askForKey() {
  $("key-box").open = true;
  $("api-key").focus();
}

function showError(prefix, error) {
  $(prefix).hidden = !error;
  $(`${prefix}-code`).textContent = error ? error.code : "";
  $(`${prefix}-message`).textContent = error ? error.message : "";
}

function showStatus(element, status) {
  element.textContent = status;
  element.dataset.status = status;
}

function element(tag, className, text) {
  const made = document.createElement(tag);
  if (className) made.className = className;
  if (text !== undefined) made.textContent = text;
  return made;
}

function formatRate(perSecond) {
  return perSecond >= 10 ? perSecond.toFixed(0) : perSecond.toFixed(1);
}

function formatDuration(seconds) {
  const rounded = Math.max(1, Math.round(seconds));
  if (rounded < 60) return `${rounded} s`;
  const minutes = Math.floor(rounded / 60);
  if (minutes < 60) return `${minutes} min ${rounded % 60} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

// ---- Jobs: ask a question or caption an image ----

function jobTask() {
  return $("task-caption").checked ? "caption" : "vqa";
}

function showJobTask() {
  const caption = jobTask() === "caption";
  $("question-field").hidden = caption;
  $("prompt-field").hidden = !caption;
  $("submit").textContent = caption ? "Caption" : "Ask";
}

function recentJobs() {
  return loadList(RECENT_STORAGE);
}

async function submitJob(event) {
  event.preventDefault();
  const file = $("image").files[0];
  const imageUrl = $("image-url").value.trim();
  const task = jobTask();
  // A caption's prompt is optional: an empty one is not sent, and the model captions freely.
  const text = task === "caption" ? $("prompt").value.trim() : $("question").value;
  const fields = task === "caption" ? { task, ...(text ? { prompt: text } : {}) } : { question: text };
  const request = { method: "POST", headers: {} };
  if (file) {
    request.body = new FormData();
    for (const [name, value] of Object.entries(fields)) request.body.append(name, value);
    request.body.append("image", file);
    if (imageUrl) request.body.append("image_url", imageUrl); // both: the API says which one to drop
  } else {
    request.headers["Content-Type"] = "application/json";
    request.body = JSON.stringify(imageUrl ? { ...fields, image_url: imageUrl } : fields);
  }
  $("submit").disabled = true;
  try {
    const response = await api("/v1/jobs", request);
    if (response.status !== 202) {
      showRefusal(await readError(response));
      return;
    }
    const accepted = await response.json();
    const job = {
      id: accepted.id,
      status: accepted.status,
      task,
      text,
      source: file ? file.name : imageUrl,
      answer: null,
      error: null,
      submittedAt: Date.now(),
      timeline: [[accepted.status, 0]],
    };
    save(RECENT_STORAGE, [job, ...recentJobs().filter((old) => old.id !== job.id)].slice(0, RECENT_MAX));
    shownJobId = job.id;
    renderJob(job);
    renderRecent();
    pollJob(job.id, POLL_FIRST_MS);
  } catch (error) {
    showRefusal({ code: "network_error", message: `the API could not be reached (${error.message})` });
  } finally {
    $("submit").disabled = false;
  }
}

function pollJob(id, delayMs) {
  setTimeout(() => refreshJob(id, delayMs), delayMs);
}

async function refreshJob(id, delayMs) {
  let nextMs = Math.min(delayMs * 1.5, POLL_MAX_MS);
  try {
    const response = await api(`/v1/jobs/${encodeURIComponent(id)}`);
    if (response.ok) {
      const body = await response.json();
      updateJob(id, { status: body.status, task: body.task ?? "vqa", answer: body.answer, error: body.error });
      if (FINAL.has(body.status)) return;
    } else if (response.status === 429 || response.status === 503) {
      nextMs = retryAfterMs(response, nextMs); // rate limited, or Redis away for a moment: the job is still there
    } else {
      updateJob(id, { error: await readError(response) }); // expired, or another key's job: it cannot be read
      return;
    }
  } catch {
    // The network dropped for a moment: try again later.
  }
  pollJob(id, nextMs);
}

// Merge what the API said into the stored job, note a new status on its timeline, and show it.
function updateJob(id, changes) {
  const jobs = recentJobs();
  const job = jobs.find((candidate) => candidate.id === id);
  if (!job) return; // cleared from the list meanwhile
  if (changes.status && changes.status !== job.status) {
    job.timeline.push([changes.status, Date.now() - job.submittedAt]);
  }
  Object.assign(job, changes);
  save(RECENT_STORAGE, jobs);
  renderRecent();
  if (id === shownJobId) renderJob(job);
}

function taskLabel(task) {
  return task === "caption" ? "caption" : "question";
}

function renderJob(job) {
  $("result").hidden = false;
  $("job-id").textContent = job.id;
  $("job-task").textContent = taskLabel(job.task);
  $("job-task").dataset.task = job.task ?? "vqa";
  showStatus($("status"), job.status);
  $("timeline").replaceChildren(
    ...job.timeline.map(([status, atMs]) => element("li", "", `${status} at ${(atMs / 1000).toFixed(1)} s`)),
  );
  $("answer-label").textContent = job.task === "caption" ? "Caption" : "Answer";
  $("answer-row").hidden = job.status !== "succeeded";
  $("answer").textContent = job.answer ?? "";
  showError("error", job.error);
}

// A submission the API refused: no job was made, only its error is shown.
function showRefusal(error) {
  shownJobId = null;
  $("result").hidden = false;
  $("job-id").textContent = "not submitted";
  $("job-task").textContent = "";
  showStatus($("status"), "refused");
  $("timeline").replaceChildren();
  $("answer-row").hidden = true;
  showError("error", error);
  if (isKeyError(error)) askForKey();
}

function renderRecent() {
  const jobs = recentJobs();
  $("recent-empty").hidden = jobs.length > 0;
  $("recent").replaceChildren(
    ...jobs.map((job) => {
      const item = element("li");
      item.dataset.jobId = job.id;
      item.dataset.task = job.task ?? "vqa";
      const badge = element("span", "badge");
      showStatus(badge, job.status);
      const what = element("span", "what");
      // Jobs stored before captions existed have a `question` and no task.
      what.append(element("span", "task", taskLabel(job.task)), " ", element("q", "", job.text ?? job.question ?? ""));
      const outcome = element("strong", "outcome", job.error ? job.error.code : (job.answer ?? ""));
      const source = element("small", "", `${job.source || "no image"} · ${job.id}`);
      item.append(badge, what, outcome, source);
      return item;
    }),
  );
}

function choosePreview(file) {
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = file ? URL.createObjectURL(file) : null;
  $("preview").hidden = !file;
  if (previewUrl) $("preview").src = previewUrl;
  else $("preview").removeAttribute("src");
}

// ---- Batches: start one, open one, watch it ----

const watch = { id: null, generation: 0, timer: null, samples: [] }; // the batch the batch panel shows

function batchTask() {
  return $("batch-task-caption").checked ? "caption" : "vqa";
}

function showBatchTask() {
  const caption = batchTask() === "caption";
  $("batch-questions-field").hidden = caption;
  $("batch-prompt-field").hidden = !caption;
}

function nonEmptyLines(text) {
  return text
    .split("\n")
    .map((line) => line.trim())
    .filter(Boolean);
}

function recentBatches() {
  return loadList(BATCHES_STORAGE);
}

// Note a batch in the list (new ones first); a known one keeps its place and gets the fields.
function rememberBatch(id, fields) {
  const batches = recentBatches();
  const known = batches.find((batch) => batch.id === id);
  if (known) Object.assign(known, fields);
  else batches.unshift({ id, ...fields });
  save(BATCHES_STORAGE, batches.slice(0, BATCHES_MAX));
  renderRecentBatches();
}

function renderRecentBatches() {
  const batches = recentBatches();
  $("recent-batches-empty").hidden = batches.length > 0;
  $("recent-batches").replaceChildren(
    ...batches.map((batch) => {
      const item = element("li", "batch-item");
      item.dataset.batchId = batch.id;
      const link = element("a", "", batch.id);
      link.href = `#batch=${encodeURIComponent(batch.id)}`;
      const task = element("span", "task", batch.task === "caption" ? "captions" : "questions");
      const state = batch.missing
        ? "not found"
        : batch.count
          ? `${batch.ended ?? 0} of ${batch.count} ended`
          : "not read yet";
      item.append(link, " ", task, " ", element("small", "", state));
      return item;
    }),
  );
}

async function submitBatch(event) {
  event.preventDefault();
  const task = batchTask();
  const images = nonEmptyLines($("batch-images").value);
  const prompt = $("batch-prompt").value.trim();
  const body =
    task === "caption"
      ? { task, images, ...(prompt ? { prompt } : {}) }
      : { images, questions: nonEmptyLines($("batch-questions").value) };
  showError("batch-form-error", null);
  $("batch-submit").disabled = true;
  try {
    const response = await api("/v1/batches", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    if (response.status !== 202) {
      const error = await readError(response);
      showError("batch-form-error", error);
      if (isKeyError(error)) askForKey();
      return;
    }
    const accepted = await response.json();
    rememberBatch(accepted.id, { task, count: accepted.count, ended: 0, submittedAt: Date.now() });
    showBatchById(accepted.id);
  } catch (error) {
    showError("batch-form-error", { code: "network_error", message: `the API could not be reached (${error.message})` });
  } finally {
    $("batch-submit").disabled = false;
  }
}

// Show a batch through the URL (so it can be bookmarked, and Back works); the same URL again reopens it.
function showBatchById(id) {
  const hash = `#batch=${encodeURIComponent(id)}`;
  if (location.hash === hash) route();
  else location.hash = hash;
}

function openBatch(id) {
  clearTimeout(watch.timer);
  watch.generation += 1;
  watch.id = id;
  watch.samples = [];
  $("batch").hidden = false;
  $("batch-id").textContent = id;
  $("batch-task").textContent = "";
  $("batch-body").hidden = true;
  $("batch-results").href = `/v1/batches/${encodeURIComponent(id)}/results`;
  $("batch-results").download = `batch-${id}.jsonl`;
  $("batch-results-note").textContent = "";
  showError("batch-error", null);
  pollBatch(watch.generation);
}

async function pollBatch(generation) {
  if (generation !== watch.generation) return; // another batch was opened meanwhile
  let nextMs = BATCH_POLL_MS;
  try {
    const response = await api(`/v1/batches/${encodeURIComponent(watch.id)}`);
    if (generation !== watch.generation) return;
    if (response.ok) {
      const batch = await response.json();
      if (generation !== watch.generation) return;
      renderBatch(batch);
      rememberBatch(batch.id, { task: batch.task, count: batch.count, ended: batch.ended, missing: false });
      if (batch.ended >= batch.count) return; // every item ended: nothing more will change
    } else if (response.status === 429 || response.status === 503) {
      nextMs = retryAfterMs(response, nextMs);
    } else {
      const error = await readError(response);
      if (generation === watch.generation) showBatchError(error);
      return;
    }
  } catch {
    // The network dropped for a moment: try again later.
  }
  watch.timer = setTimeout(() => pollBatch(generation), nextMs);
}

function showBatchError(error) {
  $("batch-body").hidden = true;
  if (error.code === "batch_not_found") {
    // Never issued, expired, or another API key's: the API does not say which, nor does the page.
    error = { code: error.code, message: "not found: no batch with this id is readable with this API key (it may have expired)" };
    if (recentBatches().some((batch) => batch.id === watch.id)) rememberBatch(watch.id, { missing: true });
  }
  showError("batch-error", error);
  if (isKeyError(error)) askForKey();
}

function renderBatch(batch) {
  const now = performance.now();
  watch.samples.push([now, batch.ended]);
  // Keep the polls of the rate's window, and always the two last ones.
  while (watch.samples.length > 2 && now - watch.samples[0][0] > BATCH_RATE_WINDOW_MS) watch.samples.shift();

  showError("batch-error", null);
  $("batch-body").hidden = false;
  $("batch-task").textContent = batch.task === "caption" ? "captions" : "questions";
  const done = batch.ended >= batch.count;
  const percent = done ? 100 : Math.floor(batch.progress * 100); // 100% only once every item ended
  $("batch-progress").value = batch.progress;
  $("batch-progress").dataset.ended = batch.ended;
  $("batch-progress").dataset.count = batch.count;
  $("batch-progress-text").textContent = `${batch.ended} of ${batch.count} ended (${percent}%)`;
  // Announced once, at the end: the progress itself changes every second, too often to be read out.
  const ends = ["succeeded", "failed", "canceled", "expired"].filter((status) => batch.counts[status]);
  $("batch-outcome").textContent = done
    ? `Every item ended: ${ends.map((status) => `${batch.counts[status]} ${status}`).join(", ")}.`
    : "";
  for (const cell of $("batch-counts").children) {
    cell.textContent = String(batch.counts[cell.dataset.status] ?? 0);
  }
  const errors = Object.entries(batch.errors || {}).sort((a, b) => b[1] - a[1]);
  $("batch-errors-none").hidden = errors.length > 0;
  $("batch-errors").replaceChildren(
    ...errors.map(([code, count]) => {
      const item = element("li");
      item.dataset.code = code;
      item.append(element("code", "", code), ` ${count}`);
      return item;
    }),
  );

  const [first, last] = [watch.samples[0], watch.samples[watch.samples.length - 1]];
  const seconds = (last[0] - first[0]) / 1000;
  const rate = seconds > 0 ? (last[1] - first[1]) / seconds : null;
  if (rate !== null) $("batch-rate").textContent = `${formatRate(rate)} items/s`;
  else $("batch-rate").textContent = done ? "not measured (it had ended)" : "measuring";
  if (done) $("batch-eta").textContent = "done";
  else if (rate === null) $("batch-eta").textContent = "measuring";
  else if (rate === 0) $("batch-eta").textContent = "unknown: no item ended lately";
  else $("batch-eta").textContent = formatDuration((batch.count - batch.ended) / rate);
}

// The results, read with the key the page holds (a plain link could not send it), saved from a blob: URL.
async function downloadResults(event) {
  event.preventDefault();
  const id = watch.id;
  const note = $("batch-results-note");
  note.textContent = "fetching the results";
  try {
    const response = await api(`/v1/batches/${encodeURIComponent(id)}/results`);
    if (!response.ok) {
      const error = await readError(response);
      note.textContent = `${error.code}: ${error.message}`;
      if (isKeyError(error)) askForKey();
      return;
    }
    const blob = await response.blob();
    const lines = (await blob.text()).split("\n").filter(Boolean).length;
    const url = URL.createObjectURL(blob);
    const link = element("a");
    link.href = url;
    link.download = `batch-${id}.jsonl`;
    document.body.append(link);
    link.click();
    link.remove();
    setTimeout(() => URL.revokeObjectURL(url), 60000); // the download reads it after the click returns
    note.textContent = `${lines} lines saved as batch-${id}.jsonl`;
  } catch (error) {
    note.textContent = `network_error: the API could not be reached (${error.message})`;
  }
}

// ---- Fleet: the workers of each task and the answers they end ----

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
  const title = element("h3", "", `${TASK_NAMES[task] ?? task} `);
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
  card.append(title, summary, outcomes, figure, table, none);
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

// ---- Views and set-up ----

function route() {
  let hash = "";
  try {
    hash = decodeURIComponent(location.hash.slice(1));
  } catch {
    // a garbled fragment: the default view
  }
  let view = VIEWS.includes(hash) ? hash : "ask";
  if (hash.startsWith("batch=")) {
    view = "batches";
    const id = hash.slice("batch=".length).trim();
    if (id) openBatch(id);
  }
  for (const name of VIEWS) {
    $(`view-${name}`).hidden = name !== view;
    if (name === view) $(`nav-${name}`).setAttribute("aria-current", "page");
    else $(`nav-${name}`).removeAttribute("aria-current");
  }
  const changed = currentView !== null && currentView !== view;
  currentView = view;
  if (view === "fleet") drawCharts();
  if (changed) $(`${view}-title`).focus(); // a screen reader hears the new view's title
}

function setUp() {
  $("api-key").value = load(KEY_STORAGE, "");
  $("api-key").addEventListener("change", () => {
    save(KEY_STORAGE, $("api-key").value.trim());
    pollFleet(); // another key may see the fleet, or another batch
    if (watch.id) openBatch(watch.id);
  });
  $("ask").addEventListener("submit", submitJob);
  for (const radio of document.querySelectorAll('input[name="task"]')) radio.addEventListener("change", showJobTask);
  showJobTask(); // a reload may keep the radio the user had chosen
  $("batch-form").addEventListener("submit", submitBatch);
  for (const radio of document.querySelectorAll('input[name="batch-task"]')) {
    radio.addEventListener("change", showBatchTask);
  }
  showBatchTask();
  $("batch-open").addEventListener("submit", (event) => {
    event.preventDefault();
    const id = $("batch-open-id").value.trim();
    if (id) showBatchById(id);
  });
  $("batch-results").addEventListener("click", downloadResults);

  // One image at a time: a file chosen clears the URL, a URL typed clears the file.
  $("image").addEventListener("change", () => {
    const file = $("image").files[0];
    if (file) $("image-url").value = "";
    choosePreview(file);
  });
  $("image-url").addEventListener("input", () => {
    if (!$("image-url").value.trim()) return;
    $("image").value = "";
    choosePreview(null);
  });

  const zone = $("drop-zone");
  zone.addEventListener("dragover", (event) => {
    event.preventDefault();
    zone.classList.add("dragging");
  });
  zone.addEventListener("dragleave", () => zone.classList.remove("dragging"));
  zone.addEventListener("drop", (event) => {
    event.preventDefault();
    zone.classList.remove("dragging");
    if (event.dataTransfer.files.length) {
      $("image").files = event.dataTransfer.files;
      $("image").dispatchEvent(new Event("change"));
    } else {
      const url = event.dataTransfer.getData("text/uri-list").split("\n")[0].trim(); // an image dragged from a page
      if (url) {
        $("image-url").value = url;
        $("image-url").dispatchEvent(new Event("input"));
      }
    }
  });

  renderRecent();
  renderRecentBatches();
  // Jobs that had not ended when the page was last closed: follow them again.
  for (const job of recentJobs()) {
    if (!FINAL.has(job.status) && !job.error) pollJob(job.id, POLL_FIRST_MS);
  }
  window.addEventListener("hashchange", route);
  window.addEventListener("resize", drawCharts);
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) pollFleet(); // measured again at once; the interval while hidden is averaged
  });
  route();
  pollFleet(); // in every view: the chart covers the minutes the page was open
}

setUp();
