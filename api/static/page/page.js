// The page at GET /: submit a job (an uploaded image or an image URL, and a question), poll it until it ends, and
// keep the last jobs in this browser's localStorage. Plain script, served as it is by api/page.py.
"use strict";

const RECENT_STORAGE = "blipq.recentJobs"; // the last jobs, newest first
const KEY_STORAGE = "blipq.apiKey";
const RECENT_MAX = 8;
const POLL_FIRST_MS = 250; // a job on an idle worker ends in well under a second
const POLL_MAX_MS = 2000;
const FINAL = new Set(["succeeded", "failed"]);

const $ = (id) => document.getElementById(id);
let shownJobId = null; // the job the result panel shows; others go on updating the recent list only
let previewUrl = null;

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

function recentJobs() {
  const jobs = load(RECENT_STORAGE, []);
  return Array.isArray(jobs) ? jobs : [];
}

function authHeaders() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
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

async function submit(event) {
  event.preventDefault();
  const file = $("image").files[0];
  const imageUrl = $("image-url").value.trim();
  const question = $("question").value;
  const request = { method: "POST", headers: authHeaders() };
  if (file) {
    request.body = new FormData();
    request.body.append("question", question);
    request.body.append("image", file);
    if (imageUrl) request.body.append("image_url", imageUrl); // both: the API says which one to drop
  } else {
    request.headers["Content-Type"] = "application/json";
    request.body = JSON.stringify(imageUrl ? { image_url: imageUrl, question } : { question });
  }
  $("submit").disabled = true;
  try {
    const response = await fetch("/v1/jobs", request);
    if (response.status !== 202) {
      showRefusal(await readError(response));
      return;
    }
    const accepted = await response.json();
    const job = {
      id: accepted.id,
      status: accepted.status,
      question,
      source: file ? file.name : imageUrl,
      answer: null,
      error: null,
      submittedAt: Date.now(),
      timeline: [[accepted.status, 0]],
    };
    save(RECENT_STORAGE, [job, ...recentJobs().filter((old) => old.id !== job.id)].slice(0, RECENT_MAX));
    shownJobId = job.id;
    render(job);
    poll(job.id, POLL_FIRST_MS);
  } catch (error) {
    showRefusal({ code: "network_error", message: `the API could not be reached (${error.message})` });
  } finally {
    $("submit").disabled = false;
  }
}

function poll(id, delayMs) {
  setTimeout(() => refresh(id, delayMs), delayMs);
}

async function refresh(id, delayMs) {
  let nextMs = Math.min(delayMs * 1.5, POLL_MAX_MS);
  try {
    const response = await fetch(`/v1/jobs/${encodeURIComponent(id)}`, { headers: authHeaders(), cache: "no-store" });
    if (response.ok) {
      const body = await response.json();
      update(id, { status: body.status, answer: body.answer, error: body.error });
      if (FINAL.has(body.status)) return;
    } else if (response.status === 429 || response.status === 503) {
      nextMs = retryAfterMs(response, nextMs); // rate limited, or Redis away for a moment: the job is still there
    } else {
      update(id, { error: await readError(response) }); // expired, or another key's job: it cannot be read
      return;
    }
  } catch {
    // The network dropped for a moment: try again later.
  }
  poll(id, nextMs);
}

// Merge what the API said into the stored job, note a new status on its timeline, and show it.
function update(id, changes) {
  const jobs = recentJobs();
  const job = jobs.find((candidate) => candidate.id === id);
  if (!job) return; // cleared from the list meanwhile
  if (changes.status && changes.status !== job.status) {
    job.timeline.push([changes.status, Date.now() - job.submittedAt]);
  }
  Object.assign(job, changes);
  save(RECENT_STORAGE, jobs);
  renderRecent();
  if (id === shownJobId) render(job);
}

function showStatus(element, status) {
  element.textContent = status;
  element.dataset.status = status;
}

function showError(error) {
  $("error").hidden = !error;
  $("error-code").textContent = error ? error.code : "";
  $("error-message").textContent = error ? error.message : "";
}

function render(job) {
  $("result").hidden = false;
  $("job-id").textContent = job.id;
  showStatus($("status"), job.status);
  $("timeline").replaceChildren(
    ...job.timeline.map(([status, atMs]) => {
      const item = document.createElement("li");
      item.textContent = `${status} at ${(atMs / 1000).toFixed(1)} s`;
      return item;
    }),
  );
  $("answer-row").hidden = job.status !== "succeeded";
  $("answer").textContent = job.answer ?? "";
  showError(job.error);
}

// A submission the API refused: no job was made, only its error is shown.
function showRefusal(error) {
  shownJobId = null;
  $("result").hidden = false;
  $("job-id").textContent = "not submitted";
  showStatus($("status"), "refused");
  $("timeline").replaceChildren();
  $("answer-row").hidden = true;
  showError(error);
  if (error.code.startsWith("api_key_")) {
    $("key-box").open = true;
    $("api-key").focus();
  }
}

function renderRecent() {
  const jobs = recentJobs();
  $("recent-empty").hidden = jobs.length > 0;
  $("recent").replaceChildren(
    ...jobs.map((job) => {
      const item = document.createElement("li");
      item.dataset.jobId = job.id;
      const badge = document.createElement("span");
      badge.className = "badge";
      showStatus(badge, job.status);
      const question = document.createElement("q");
      question.textContent = job.question;
      const outcome = document.createElement("strong");
      outcome.className = "outcome";
      outcome.textContent = job.error ? job.error.code : (job.answer ?? "");
      const source = document.createElement("small");
      source.textContent = `${job.source || "no image"} · ${job.id}`;
      item.append(badge, question, outcome, source);
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

function setUp() {
  $("api-key").value = load(KEY_STORAGE, "");
  $("api-key").addEventListener("change", () => save(KEY_STORAGE, $("api-key").value.trim()));
  $("ask").addEventListener("submit", submit);

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
  // Jobs that had not ended when the page was last closed: follow them again.
  for (const job of recentJobs()) {
    if (!FINAL.has(job.status) && !job.error) poll(job.id, POLL_FIRST_MS);
  }
}

setUp();
