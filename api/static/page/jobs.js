// ---- Jobs: ask a question or caption an image, and follow each job to its end by long polls ----
"use strict";

const RECENT_STORAGE = "blipq.recentJobs"; // the last jobs, newest first
const RECENT_MAX = 8;
// The jobs listed but not shown are read in turn, one long poll at a time, each held at most this long: they share
// one of the few connections a browser opens to a host (six), beside the shown job's and the batch's.
const OTHERS_POLL_S = 10;

let shownJobId = null; // the job the result panel shows; others go on updating the recent list only
let previewUrl = null;
let followingOthers = false; // whether the loop that reads the jobs not shown runs

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
      estimate: accepted.estimate ?? null,
      submittedAt: Date.now(),
      timeline: [[accepted.status, 0]],
    };
    save(RECENT_STORAGE, [job, ...recentJobs().filter((old) => old.id !== job.id)].slice(0, RECENT_MAX));
    shownJobId = job.id;
    renderJob(job);
    renderRecent();
    followShownJob(job.id);
  } catch (error) {
    showRefusal({ code: "network_error", message: `the API could not be reached (${error.message})` });
  } finally {
    $("submit").disabled = false;
  }
}

// One read of a job, held by the API until the job ends or `waitS` seconds passed. Returns how long to pause
// before the next read (0: none), or null once there is nothing more to read (it ended, or cannot be read).
async function readJob(id, waitS) {
  try {
    const response = await api(`/v1/jobs/${encodeURIComponent(id)}?wait=${waitS}`);
    if (response.ok) {
      const body = await response.json();
      const { status, answer, error, estimate } = body;
      updateJob(id, { status, task: body.task ?? "vqa", answer, error, estimate });
      return FINAL.has(status) ? null : 0;
    }
    if (response.status === 429 || response.status === 503) {
      return retryAfterMs(response, RETRY_MS); // rate limited, or Redis away for a moment: the job is still there
    }
    updateJob(id, { error: await readError(response), estimate: null }); // expired, or another key's job
    return null;
  } catch {
    return RETRY_MS; // the network dropped for a moment
  }
}

// The shown job, read again as soon as each long poll answers, until it ends or another job is shown.
async function followShownJob(id) {
  while (id === shownJobId) {
    const pauseMs = await readJob(id, LONG_POLL_S);
    if (pauseMs === null) return;
    if (pauseMs) await sleep(pauseMs);
  }
  followOtherJobs(); // another job is shown: this one, should it not have ended, is followed with the others
}

// The listed jobs that have not ended and are not shown (from before a reload, or sent before the shown one), one
// long poll at a time, in turn, until every one ended.
async function followOtherJobs() {
  if (followingOthers) return;
  followingOthers = true;
  try {
    for (;;) {
      const open = recentJobs().filter((job) => job.id !== shownJobId && !FINAL.has(job.status) && !job.error);
      if (!open.length) return;
      for (const job of open) {
        if (job.id === shownJobId) continue; // shown meanwhile: its own loop reads it
        const pauseMs = await readJob(job.id, OTHERS_POLL_S);
        if (pauseMs) await sleep(pauseMs);
      }
    }
  } finally {
    followingOthers = false;
  }
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
  const estimate = FINAL.has(job.status) || job.error ? "" : describeEstimate(job.estimate);
  $("job-estimate").hidden = !estimate;
  $("job-estimate-text").textContent = estimate;
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
  $("job-estimate").hidden = true;
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

