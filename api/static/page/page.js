// ---- The views, chosen by the URL's fragment, and the set-up (the last script: the others are loaded) ----
"use strict";

let currentView = null;

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
  } else if (view === "batches") {
    resumeBatch();
  } else {
    stopBatch(); // its view closed: no read waits for it
  }
  for (const name of VIEWS) {
    $(`view-${name}`).hidden = name !== view;
    if (name === view) $(`nav-${name}`).setAttribute("aria-current", "page");
    else $(`nav-${name}`).removeAttribute("aria-current");
  }
  const changed = currentView !== null && currentView !== view;
  currentView = view;
  if (view === "fleet") for (const panel of panels) panel.shown();
  if (changed) $(`${view}-title`).focus(); // a screen reader hears the new view's title
}

function setUp() {
  $("api-key").value = load(KEY_STORAGE, "");
  $("api-key").addEventListener("change", () => {
    save(KEY_STORAGE, $("api-key").value.trim());
    for (const panel of panels) panel.keyChanged();
    if (watch.id && currentView === "batches") openBatch(watch.id); // another key may see another batch
  });
  $("ask").addEventListener("submit", submitJob);
  for (const radio of document.querySelectorAll('input[name="task"]')) radio.addEventListener("change", showJobTask);
  showJobTask(); // a reload may keep the radio the user had chosen
  $("batch-form").addEventListener("submit", submitBatch);
  for (const radio of document.querySelectorAll('input[name="batch-task"]')) {
    radio.addEventListener("change", showBatchTask);
  }
  showBatchTask();
  // Image URLs or files, not both: files chosen clear the URLs, URLs typed clear the files.
  $("batch-files").addEventListener("change", () => {
    if ($("batch-files").files.length) $("batch-images").value = "";
  });
  $("batch-images").addEventListener("input", () => {
    if ($("batch-images").value.trim()) $("batch-files").value = "";
  });
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
  followOtherJobs(); // jobs that had not ended when the page was last closed: followed again
  window.addEventListener("hashchange", route);
  window.addEventListener("resize", () => {
    if (currentView === "fleet") for (const panel of panels) panel.shown();
  });
  document.addEventListener("visibilitychange", () => {
    if (!document.hidden) for (const panel of panels) panel.visible();
  });
  route();
  for (const panel of panels) panel.start();
}

setUp();
