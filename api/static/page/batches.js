// ---- Batches: start one (image URLs or files), open one, and follow it to its end by long polls ----
"use strict";

const BATCHES_STORAGE = "blipq.recentBatches"; // the last batches started or opened here, newest first
const BATCHES_MAX = 8;
const BATCH_RATE_WINDOW_MS = 15000; // the batch's rate: items ended over the reads of the last 15 s
const FAILED_SHOWN_MAX = 50; // the failed items listed; the rest are counted

// The batch the batch panel shows: its id; `generation`, the one follow loop that goes on (a batch opened, or the
// view left, ends the others); `controller`, which aborts that loop's read in flight; the reads' (time, ended)
// samples of the rate; and the failed count whose items the list shows.
const watch = { id: null, generation: 0, controller: null, following: false, samples: [], failedShown: null };
// The images of the batches uploaded from this page since it was loaded, by batch id: {urls: blob: URLs of the
// files, in upload order; perImage: the items asked of each image}. A failed item shows its thumbnail from them.
const uploadedImages = new Map();

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

function chosenFiles() {
  return [...$("batch-files").files];
}

async function submitBatch(event) {
  event.preventDefault();
  const task = batchTask();
  const files = chosenFiles();
  const prompt = $("batch-prompt").value.trim();
  const questions = nonEmptyLines($("batch-questions").value);
  const request = { method: "POST", headers: {} };
  if (files.length) {
    // An upload: files named `images`, the questions as a JSON array (POST /v1/batches, multipart/form-data).
    request.body = new FormData();
    if (task === "caption") {
      request.body.append("task", task);
      if (prompt) request.body.append("prompt", prompt);
    } else {
      request.body.append("questions", JSON.stringify(questions));
    }
    for (const file of files) request.body.append("images", file, file.name);
  } else {
    const images = nonEmptyLines($("batch-images").value);
    request.headers["Content-Type"] = "application/json";
    request.body = JSON.stringify(
      task === "caption" ? { task, images, ...(prompt ? { prompt } : {}) } : { images, questions },
    );
  }
  showError("batch-form-error", null);
  $("batch-submit").disabled = true;
  try {
    const response = await api("/v1/batches", request);
    if (response.status !== 202) {
      const error = await readError(response);
      showError("batch-form-error", error);
      if (isKeyError(error)) askForKey();
      return;
    }
    const accepted = await response.json();
    if (files.length) {
      const urls = files.map((file) => URL.createObjectURL(file));
      uploadedImages.set(accepted.id, { urls, perImage: accepted.count / files.length });
    }
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
  watch.id = id;
  watch.samples = [];
  watch.failedShown = null;
  $("batch").hidden = false;
  $("batch-id").textContent = id;
  $("batch-task").textContent = "";
  $("batch-body").hidden = true;
  $("batch-failed").replaceChildren();
  $("batch-results").href = `/v1/batches/${encodeURIComponent(id)}/results`;
  $("batch-results").download = `batch-${id}.jsonl`;
  $("batch-results-note").textContent = "";
  showError("batch-error", null);
  followBatch();
}

// Stop following the shown batch (another is opened, or its view closed): the read in flight is aborted.
function stopBatch() {
  watch.generation += 1;
  watch.following = false;
  if (watch.controller) watch.controller.abort();
  watch.controller = null;
}

// Follow the shown batch again, as the panel left it, when its view is shown again before it ended.
function resumeBatch() {
  if (watch.id && !watch.following && !$("batch-body").hidden && $("batch-eta").dataset.done !== "true") {
    followBatch();
  }
}

// Read the shown batch, then long polls, each answered by the API as soon as an item ends (`after`: the ended
// count shown, so that an end between two reads is not missed), until every item ended or the loop is stopped.
async function followBatch() {
  stopBatch();
  const generation = watch.generation;
  const controller = new AbortController();
  watch.controller = controller;
  watch.following = true;
  const current = () => generation === watch.generation;
  const path = `/v1/batches/${encodeURIComponent(watch.id)}`;
  let after = null;
  try {
    while (current()) {
      let pauseMs = 0;
      try {
        const query = after === null ? "" : `?wait=${LONG_POLL_S}&after=${after}`;
        const response = await api(path + query, { signal: controller.signal });
        if (!current()) return;
        if (response.ok) {
          const batch = await response.json();
          if (!current()) return;
          renderBatch(batch);
          rememberBatch(batch.id, { task: batch.task, count: batch.count, ended: batch.ended, missing: false });
          if (batch.counts.failed !== watch.failedShown) await readFailedItems(batch, controller.signal, current);
          if (batch.ended >= batch.count) return; // every item ended: nothing more will change
          after = batch.ended;
        } else if (response.status === 429 || response.status === 503) {
          pauseMs = retryAfterMs(response, RETRY_MS);
        } else {
          showBatchError(await readError(response));
          return;
        }
      } catch {
        if (!current()) return; // aborted: the loop was stopped
        pauseMs = RETRY_MS; // the network dropped for a moment
      }
      if (pauseMs) await sleep(pauseMs, controller.signal);
    }
  } finally {
    if (current()) watch.following = false;
  }
}

// The batch's failed items, from its results of status `failed`: each with its image, its question and its error.
async function readFailedItems(batch, signal, current) {
  const path = `/v1/batches/${encodeURIComponent(batch.id)}/results?status=failed`;
  const response = await api(path, { signal });
  if (!current() || !response.ok) return; // not read this time: the next change reads it again
  const lines = (await response.text()).split("\n").filter(Boolean);
  if (!current()) return;
  watch.failedShown = batch.counts.failed;
  renderFailedItems(batch.id, lines.map((line) => JSON.parse(line)));
}

function renderFailedItems(batchId, failed) {
  const uploaded = uploadedImages.get(batchId);
  $("batch-failed-none").hidden = failed.length > 0;
  const more = failed.length - FAILED_SHOWN_MAX;
  $("batch-failed-more").hidden = more <= 0;
  $("batch-failed-more").textContent = more > 0 ? `and ${plural(more, "more failed item", "more failed items")}` : "";
  $("batch-failed").replaceChildren(
    ...failed.slice(0, FAILED_SHOWN_MAX).map((line) => {
      const item = element("li", "failed-item");
      item.dataset.index = line.index;
      // An image is named by its URL or file name, never loaded from elsewhere: only a file this page uploaded is
      // shown, from the browser's own copy.
      const blobUrl = uploaded ? uploaded.urls[Math.floor(line.index / uploaded.perImage)] : null;
      if (blobUrl) {
        const thumbnail = element("img", "thumbnail");
        thumbnail.src = blobUrl;
        thumbnail.alt = line.image_name || "the uploaded image";
        item.append(thumbnail);
      }
      const text = line.task === "caption" ? `caption${line.prompt ? `, prompt: ${line.prompt}` : ""}` : line.question;
      const about = element("div", "about");
      about.append(
        element("code", "image-ref", line.image_url ?? line.image_name ?? ""),
        element("q", "question", text ?? ""),
      );
      const error = element("p", "item-error");
      error.append(element("code", "code", line.error ? line.error.code : ""), " ");
      error.append(element("span", "message", line.error ? line.error.message : ""));
      about.append(error);
      item.append(about);
      return item;
    }),
  );
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
  // Keep the reads of the rate's window, and always the two last ones.
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
  // Announced once, at the end: the progress itself changes too often to be read out.
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
  // The API's end estimate, from the queue and the fleet's rate as they are at this read.
  $("batch-eta").dataset.done = String(done);
  $("batch-eta").textContent = done ? "done: every item ended" : describeEstimate(batch.estimate);
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

