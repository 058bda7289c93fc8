// The oneword console: a client of the service's HTTP API, with the same API key as any client.
// Plain DOM code, no framework. Every value from the API is put in the page as text
// (textContent, never innerHTML), so a concept or job name can never become markup.
"use strict";

const API = "../v1"; // relative: works behind any route prefix
const KEY_STORAGE = "oneword-api-key";
const PAGE_SIZE = 50;
const JOB_REFRESH_MS = 2000;

const $ = (id) => document.getElementById(id);

// --- the API, with the key ------------------------------------------------------------------------

class ApiError extends Error {
  constructor(status, body, retryAfter) {
    super(body.message || `HTTP ${status}`);
    this.status = status;
    this.code = body.code || "http_error";
    this.closeMatches = body.close_matches || [];
    this.retryAfter = retryAfter;
  }
}

let keyWanted = null; // a promise that resolves once the user has given a key

function askForKey(refused) {
  if (!keyWanted) {
    keyWanted = new Promise((resolve) => {
      const dialog = $("key-dialog");
      $("key-error").textContent = refused ? "The service refused that key." : "";
      $("key-input").value = "";
      dialog.oncancel = (event) => event.preventDefault(); // Escape: the service still needs a key
      $("key-form").onsubmit = (event) => {
        event.preventDefault();
        sessionStorage.setItem(KEY_STORAGE, $("key-input").value.trim());
        dialog.close();
        keyWanted = null;
        updateKeyButton();
        resolve();
      };
      dialog.showModal();
    });
  }
  return keyWanted;
}

// A call to the API; on 401 it asks for a key and tries again with it.
async function api(path, options = {}) {
  for (;;) {
    const key = sessionStorage.getItem(KEY_STORAGE);
    const headers = { ...(options.headers || {}) };
    if (key) headers.Authorization = `Bearer ${key}`;
    const response = await fetch(`${API}${path}`, { ...options, headers });
    if (response.status === 401) {
      await askForKey(Boolean(key));
      continue;
    }
    if (!response.ok) {
      let body = {};
      try {
        body = await response.json();
      } catch {
        body = { message: `HTTP ${response.status} ${response.statusText}` };
      }
      throw new ApiError(response.status, body, response.headers.get("Retry-After"));
    }
    return response;
  }
}

function describeError(err) {
  if (!(err instanceof ApiError)) return `The service cannot be reached: ${err.message}`;
  let text = `${err.message} (${err.status} ${err.code})`;
  if (err.closeMatches.length) text += `. Did you mean: ${err.closeMatches.join(", ")}?`;
  if (err.retryAfter) text += `. Retry after ${err.retryAfter} s.`;
  return text;
}

function updateKeyButton() {
  $("forget-key").hidden = !sessionStorage.getItem(KEY_STORAGE);
}

// --- small helpers that build the page from values, as text -----------------------------------------

function cell(row, text, className) {
  const td = row.insertCell();
  td.textContent = text === null || text === undefined ? "" : String(text);
  if (className) td.className = className;
  return td;
}

const formatLoss = (loss) => (typeof loss === "number" && Number.isFinite(loss) ? loss.toFixed(4) : "");
const formatDate = (iso) => (iso ? new Date(iso).toLocaleString() : "");

function formatSeconds(seconds) {
  if (typeof seconds !== "number" || !Number.isFinite(seconds)) return "";
  if (seconds < 90) return `${Math.round(seconds)} s`;
  if (seconds < 5400) return `${Math.round(seconds / 60)} min`;
  return `${(seconds / 3600).toFixed(1)} h`;
}

// --- concepts --------------------------------------------------------------------------------------

const concepts = { after: [""], page: 0, blobs: [] };

async function loadConcepts() {
  const prefix = $("prefix").value.trim().toLowerCase();
  const after = concepts.after[concepts.page];
  const query = new URLSearchParams({ prefix, limit: String(PAGE_SIZE) });
  if (after) query.set("after", after);
  $("concepts-error").textContent = "";
  let page;
  try {
    page = await (await api(`/concepts?${query}`)).json();
  } catch (err) {
    $("concepts-error").textContent = describeError(err);
    return;
  }
  if (prefix !== $("prefix").value.trim().toLowerCase()) return; // typed on meanwhile
  concepts.blobs.forEach((url) => URL.revokeObjectURL(url));
  concepts.blobs = [];
  const body = $("concept-table").tBodies[0];
  body.replaceChildren();
  for (const concept of page.concepts) {
    const row = body.insertRow();
    row.dataset.name = concept.name;
    const preview = cell(row, "", "preview");
    if (concept.preview_sha256) showPreview(preview, concept);
    cell(row, `<${concept.name}>`, "name");
    cell(row, concept.version, "version");
    cell(row, `${concept.architecture === "sdxl" ? "SDXL" : "SD"} · ${concept.base_model || "unrecorded"}`, "model");
    cell(row, concept.num_vectors);
    cell(row, concept.steps);
    cell(row, formatLoss(concept.metrics && concept.metrics.final_loss));
    cell(row, concept.job_id || "");
    cell(row, formatDate(concept.created_at));
  }
  $("concepts-empty").hidden = page.concepts.length > 0;
  concepts.after[concepts.page + 1] = page.next_after;
  $("prev-page").disabled = concepts.page === 0;
  $("next-page").disabled = !page.next_after;
  $("page-info").textContent = `page ${concepts.page + 1}`;
}

async function showPreview(td, concept) {
  const query = new URLSearchParams({ version: concept.version });
  try {
    const blob = await (await api(`/concepts/${encodeURIComponent(concept.name)}/preview?${query}`)).blob();
    const url = URL.createObjectURL(blob);
    concepts.blobs.push(url);
    const img = document.createElement("img");
    img.src = url;
    img.alt = `preview of <${concept.name}>`;
    td.replaceChildren(img);
  } catch (err) {
    td.textContent = "no preview";
    td.title = describeError(err);
  }
}

function restartConcepts() {
  concepts.after = [""];
  concepts.page = 0;
  loadConcepts();
}

// --- playground: completion of <name> and <name@version> --------------------------------------------

const completion = { items: [], active: -1, start: 0, timer: null, asked: 0 };

function referenceBeforeCaret() {
  const box = $("prompt");
  const before = box.value.slice(0, box.selectionStart);
  const match = /<([a-z0-9_-]*)(@[0-9A-Za-z.-]*)?$/.exec(before);
  return match ? { start: match.index, name: match[1], version: match[2] } : null;
}

function closeCompletions() {
  $("completions").hidden = true;
  $("completions").replaceChildren();
  completion.items = [];
  completion.active = -1;
}

async function suggest() {
  const ref = referenceBeforeCaret();
  if (!ref) return closeCompletions();
  const asked = ++completion.asked;
  let items = [];
  try {
    if (ref.version !== undefined) {
      const detail = await (await api(`/concepts/${encodeURIComponent(ref.name)}`)).json();
      items = detail.versions.slice().reverse().map((v) => `<${ref.name}@${v}>`);
      items = items.filter((item) => item.startsWith(`<${ref.name}${ref.version}`));
    } else {
      const query = new URLSearchParams({ prefix: ref.name, limit: "200" });
      const page = await (await api(`/concepts?${query}`)).json();
      items = [...new Set(page.concepts.map((c) => `<${c.name}>`))];
    }
  } catch {
    items = []; // an unknown name: nothing to complete
  }
  if (asked !== completion.asked) return; // a newer keystroke asked again
  completion.start = ref.start;
  completion.items = items.slice(0, 20);
  completion.active = completion.items.length ? 0 : -1;
  renderCompletions();
}

function renderCompletions() {
  const list = $("completions");
  list.replaceChildren();
  completion.items.forEach((item, i) => {
    const li = document.createElement("li");
    li.textContent = item;
    li.setAttribute("role", "option");
    li.setAttribute("aria-selected", String(i === completion.active));
    li.addEventListener("mousedown", (event) => {
      event.preventDefault(); // keep the focus in the prompt
      accept(i);
    });
    list.append(li);
  });
  list.hidden = completion.items.length === 0;
}

function accept(index) {
  const box = $("prompt");
  const item = completion.items[index];
  const caret = box.selectionStart;
  box.value = box.value.slice(0, completion.start) + item + box.value.slice(caret);
  const at = completion.start + item.length;
  box.setSelectionRange(at, at);
  closeCompletions();
  box.focus();
}

function onPromptKey(event) {
  if ($("completions").hidden) return;
  const count = completion.items.length;
  if (event.key === "ArrowDown" || event.key === "ArrowUp") {
    completion.active = (completion.active + (event.key === "ArrowDown" ? 1 : count - 1)) % count;
    renderCompletions();
  } else if (event.key === "Enter" || event.key === "Tab") {
    accept(completion.active);
  } else if (event.key === "Escape") {
    closeCompletions();
  } else {
    return;
  }
  event.preventDefault();
}

// --- playground: generation ----------------------------------------------------------------------

async function generate(event) {
  event.preventDefault();
  closeCompletions();
  const request = { prompt: $("prompt").value, negative_prompt: $("negative_prompt").value };
  for (const field of ["width", "height", "steps", "seed", "n"]) {
    if ($(field).value !== "") request[field] = Number.parseInt($(field).value, 10);
  }
  if ($("guidance_scale").value !== "") request.guidance_scale = Number.parseFloat($("guidance_scale").value);
  $("generate-error").textContent = "";
  $("generate-info").textContent = "Generating…";
  $("generate").disabled = true;
  try {
    const response = await api("/generate", {
      method: "POST",
      headers: { "Content-Type": "application/json", Accept: "application/json" },
      body: JSON.stringify(request),
    });
    const result = await response.json();
    const images = result.images.map((b64, i) => {
      const img = document.createElement("img");
      img.src = `data:image/${result.format};base64,${b64}`;
      img.alt = `image ${i + 1}, seed ${result.seed + i}`;
      img.width = result.width;
      img.height = result.height;
      return img;
    });
    $("images").replaceChildren(...images);
    const used = Object.entries(result.concepts).map(([name, version]) => `<${name}@${version}>`);
    $("generate-info").textContent =
      `${result.width}×${result.height}, seed ${result.seed}` + (used.length ? `, ${used.join(", ")}` : "");
  } catch (err) {
    $("generate-info").textContent = "";
    $("generate-error").textContent = describeError(err);
  } finally {
    $("generate").disabled = false;
  }
}

// --- jobs ------------------------------------------------------------------------------------------

const jobs = { selected: null, timer: null };

async function loadJobs() {
  $("jobs-error").textContent = "";
  let list;
  try {
    list = await (await api("/jobs")).json();
  } catch (err) {
    $("jobs-error").textContent = describeError(err);
    return;
  }
  const body = $("job-list").tBodies[0];
  body.replaceChildren();
  for (const job of list.jobs) {
    const row = body.insertRow();
    row.dataset.job = job.job;
    const link = document.createElement("a");
    link.href = `#jobs/${encodeURIComponent(job.job)}`;
    link.textContent = job.job;
    row.insertCell().append(link);
    cell(row, job.state, `state ${job.state}`);
    const counts = Object.entries(job.counts || {}).filter(([, n]) => n);
    cell(row, counts.map(([state, n]) => `${n} ${state}`).join(", "));
    cell(row, formatDate(job.started_at));
    cell(row, formatDate(job.updated_at));
  }
  $("jobs-empty").hidden = list.jobs.length > 0;
}

async function loadJob() {
  const job = jobs.selected;
  if (!job) return;
  let status;
  try {
    status = await (await api(`/jobs/${encodeURIComponent(job)}`)).json();
  } catch (err) {
    $("jobs-error").textContent = describeError(err);
    return;
  }
  if (job !== jobs.selected) return;
  $("jobs-error").textContent = "";
  $("job-detail").hidden = false;
  $("job-title").textContent = `Job ${status.job}: ${status.state}`;
  const counts = Object.entries(status.counts || {}).filter(([, n]) => n);
  $("job-summary").textContent =
    counts.map(([state, n]) => `${n} ${state}`).join(", ") +
    (status.updated_at ? ` · updated ${formatDate(status.updated_at)}` : "") +
    (status.error ? ` · ${status.error}` : "");
  const body = $("job-table").tBodies[0];
  body.replaceChildren();
  for (const [name, entry] of Object.entries(status.concepts)) {
    const row = body.insertRow();
    row.dataset.concept = name;
    row.className = `state-${entry.state}`;
    cell(row, name, "name");
    cell(row, entry.state, "state");
    const done = entry.state === "published" || entry.state === "skipped";
    const step = done ? entry.steps : entry.step || 0;
    cell(row, entry.steps ? `${step}/${entry.steps}` : "", "step");
    const bar = document.createElement("progress");
    bar.max = entry.steps || 1;
    bar.value = entry.steps ? step : 0;
    row.insertCell().append(bar);
    cell(row, formatLoss(entry.loss ?? entry.final_loss), "loss");
    cell(row, entry.state === "running" ? formatSeconds(entry.eta_seconds) : "", "eta");
    cell(row, entry.attempt ?? entry.attempts ?? "");
    let detail = entry.version || entry.error || "";
    if (entry.state === "running" && entry.pack) {
      detail = `${entry.pack}, ${entry.slot !== undefined && entry.slot !== null ? `slot ${entry.slot}` : "waiting for a slot"}`;
    }
    cell(row, detail, entry.error ? "error" : "detail");
  }
}

function showJob(job) {
  jobs.selected = job;
  clearInterval(jobs.timer);
  $("job-detail").hidden = true;
  if (job) {
    loadJob();
    jobs.timer = setInterval(() => {
      loadJob();
      loadJobs();
    }, JOB_REFRESH_MS);
  }
}

// --- pages -----------------------------------------------------------------------------------------

function route() {
  const [page, arg] = (location.hash.slice(1) || "concepts").split("/");
  const known = ["concepts", "playground", "jobs"].includes(page) ? page : "concepts";
  for (const section of document.querySelectorAll(".page")) section.hidden = section.id !== known;
  for (const link of document.querySelectorAll("nav a")) {
    link.classList.toggle("current", link.dataset.page === known);
  }
  if (known !== "jobs") showJob(null);
  if (known === "concepts") loadConcepts();
  if (known === "jobs") {
    loadJobs();
    showJob(arg ? decodeURIComponent(arg) : null);
  }
  if (known === "playground") api("/concepts?limit=1").catch(() => {}); // asks for a key now, if one is needed
}

document.addEventListener("DOMContentLoaded", () => {
  $("concept-filter").addEventListener("submit", (event) => event.preventDefault());
  let typing = null;
  $("prefix").addEventListener("input", () => {
    clearTimeout(typing);
    typing = setTimeout(restartConcepts, 200);
  });
  $("prev-page").addEventListener("click", () => {
    concepts.page -= 1;
    loadConcepts();
  });
  $("next-page").addEventListener("click", () => {
    concepts.page += 1;
    loadConcepts();
  });
  $("prompt").addEventListener("input", () => {
    clearTimeout(completion.timer);
    completion.timer = setTimeout(suggest, 120);
  });
  $("prompt").addEventListener("keydown", onPromptKey);
  $("prompt").addEventListener("blur", () => setTimeout(closeCompletions, 100));
  $("generate-form").addEventListener("submit", generate);
  $("forget-key").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    updateKeyButton();
  });
  window.addEventListener("hashchange", route);
  updateKeyButton();
  route();
});
