// The page at GET /, the service's console, in three views chosen by the URL's fragment:
// - #ask (the default): ask a question about an image or caption it, follow the job to its end, list recent jobs;
// - #batches, #batch=<id>: start a batch (image URLs or files), or open one, and follow it to its end (progress,
//   counts, failed items, rate, end estimate);
// - #fleet: panels beside each other; the fleet's: each task's workers, the answers waiting, and a chart of answers
//   ended per second.
// Five plain scripts, served as they are by api/page.py, sharing one global scope, run in order: common.js (what
// every view uses), jobs.js, batches.js, fleet.js (one per view or panel), and page.js (the views, and the set-up).
// Jobs and batches are followed by long polls (GET ?wait=S: the API answers the moment they change), never on a
// timer. Jobs and batches sent from this browser are kept in its localStorage. Server text is only ever set as
// textContent, never parsed as HTML.
"use strict";

const KEY_STORAGE = "blipq.apiKey";
// A long poll: the API holds the read until the job or batch changes, or this many seconds (its most, 20).
const LONG_POLL_S = 20;
const RETRY_MS = 2000; // after the network dropped: read again this much later
const FINAL = new Set(["succeeded", "failed", "canceled", "expired"]);
const VIEWS = ["ask", "batches", "fleet"];
const STATUSES = ["queued", "running", "succeeded", "failed", "canceled", "expired"];
const TASK_NAMES = { vqa: "Questions", caption: "Captions" };
const REASONS = {
  no_worker: "no worker serves this task",
  no_rate: "the workers have not measured their rate yet",
};

const $ = (id) => document.getElementById(id);

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

// A request to this API with the key the page holds; never cached (every read wants the state of now).
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

// A pause before reading again (after an error only); cut short when `signal` aborts.
function sleep(ms, signal) {
  return new Promise((resolve) => {
    const timer = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => (clearTimeout(timer), resolve()), { once: true });
  });
}

function plural(count, one, many) {
  return `${count} ${count === 1 ? one : many}`;
}

// An `estimate` of the API in words: "ends in about 12 s, 340 answers ahead", or why there is none.
function describeEstimate(estimate) {
  if (!estimate) return "";
  if (estimate.ends_in_s === null || estimate.ends_in_s === undefined) {
    return `no estimate: ${REASONS[estimate.reason] ?? estimate.reason ?? "unknown"}`;
  }
  const when = estimate.ends_in_s < 1 ? "in under a second" : `in about ${formatDuration(estimate.ends_in_s)}`;
  return `ends ${when}, ${plural(estimate.answers_ahead, "answer", "answers")} ahead`;
}

function formatDuration(seconds) {
  const rounded = Math.max(1, Math.round(seconds));
  if (rounded < 60) return `${rounded} s`;
  const minutes = Math.floor(rounded / 60);
  if (minutes < 60) return `${minutes} min ${rounded % 60} s`;
  return `${Math.floor(minutes / 60)} h ${minutes % 60} min`;
}

// The panels of the fleet view, each a section of #fleet-panels beside the others: the fleet's (fleet.js), and any
// other a script adds here before page.js sets the page up. A panel is {start, keyChanged, shown, visible}: what to
// do when the page is set up, when the API key changed, when the fleet view is shown, and when the tab is again.
const panels = [];

function addPanel(panel) {
  panels.push(panel);
}
