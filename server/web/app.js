// lorag web page: sign in with a tenant key, chat with streamed cited answers, inspect sources,
// manage documents and adapters. Talks only to this server's JSON API; no build step, no dependencies.
"use strict";

const KEY_STORAGE = "lorag.apiKey";
const MAX_CONTEXT = 20; // the passages API's largest before/after
const state = { key: null, history: [], busy: false, panel: null };

const $ = (id) => document.getElementById(id);

function el(tag, attrs = {}, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else if (value !== null && value !== undefined && value !== false) node.setAttribute(name, value === true ? "" : value);
  }
  for (const child of children) if (child !== null && child !== undefined) node.append(child);
  return node;
}

const basename = (source) => String(source).split(/[\\/]/).pop();

// ---------------------------------------------------------------- API

class ApiError extends Error {
  constructor(status, message, code) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

function explain(status, message, code) {
  if (status === 401) return `Your API key was not accepted: ${message}.`;
  if (status === 503) return `The server is busy or still starting (${message}). Please try again in a moment.`;
  if (status === 413) return `Rejected as too large: ${message}.`;
  if (status === 0) return message;
  return message || `The server answered ${status}${code ? ` (${code})` : ""}.`;
}

async function errorOf(response) {
  let message = response.statusText;
  let code = null;
  try {
    const body = await response.json();
    if (body && body.error) ({ message, code } = body.error);
  } catch (_) { /* not JSON: keep the status text */ }
  return new ApiError(response.status, explain(response.status, message, code), code);
}

async function api(path, { method = "GET", json } = {}) {
  const headers = { Authorization: `Bearer ${state.key}` };
  let body;
  if (json !== undefined) {
    headers["Content-Type"] = "application/json";
    body = JSON.stringify(json);
  }
  let response;
  try {
    response = await fetch(path, { method, headers, body });
  } catch (_) {
    throw new ApiError(0, "The server cannot be reached. Check that lorag is running and try again.");
  }
  if (!response.ok) {
    const error = await errorOf(response);
    if (error.status === 401 && state.key) signOut(error.message);
    throw error;
  }
  return response;
}

function showError(id, error) {
  $(id).textContent = error ? (error.message || String(error)) : "";
}

// ---------------------------------------------------------------- sign in, views

async function signIn(key, { quiet = false } = {}) {
  state.key = key;
  let models;
  try {
    models = (await (await api("/v1/models")).json()).data;
  } catch (error) {
    state.key = null;
    sessionStorage.removeItem(KEY_STORAGE);
    if (!quiet || error.status !== 401) showError("signin-error", error);
    return;
  }
  sessionStorage.setItem(KEY_STORAGE, key);
  showError("signin-error", null);
  $("api-key").value = "";
  fillModels(models);
  $("nav").hidden = false;
  showView("chat");
}

function signOut(message) {
  state.key = null;
  state.history = [];
  sessionStorage.removeItem(KEY_STORAGE);
  $("messages").replaceChildren();
  closePanel();
  $("nav").hidden = true;
  showView("signin");
  showError("signin-error", message ? { message } : null);
}

function fillModels(models) {
  const select = $("model");
  select.replaceChildren();
  for (const model of models) {
    const label = model.kind === "adapter" ? `${model.id} (adapter)` : model.kind === "base" ? `${model.id} (base model)` : model.id;
    select.append(el("option", { value: model.id, text: label }));
  }
  if (models.some((model) => model.id === "lorag")) select.value = "lorag";
}

function showView(name) {
  for (const view of document.querySelectorAll(".view")) view.hidden = view.id !== `view-${name}`;
  for (const tab of document.querySelectorAll(".tab")) {
    if (tab.dataset.view === name) tab.setAttribute("aria-current", "page");
    else tab.removeAttribute("aria-current");
  }
  if (name !== "chat") closePanel();
  if (name === "documents") loadDocuments();
  if (name === "adapters") loadAdapters();
  const heading = name === "chat" ? $("question") : $(`${name}-title`);
  heading.focus();
}

// ---------------------------------------------------------------- chat

async function ask(question) {
  if (state.busy) return;
  state.busy = true;
  $("ask-button").disabled = true;
  showError("chat-error", null);
  state.history.push({ role: "user", content: question });
  const log = $("messages");
  log.append(el("div", { class: "message user" }, el("p", { class: "who", text: "You" }), el("p", { text: question })));
  const answer = el("div", { class: "answer", "aria-busy": "true" });
  const message = el("div", { class: "message assistant" }, el("p", { class: "who", text: "lorag" }), answer);
  log.append(message);
  followNewest(log, true);

  const body = {
    model: $("model").value,
    messages: state.history,
    stream: true,
    retrieval: { enabled: $("retrieval").checked },
  };
  let text = "";
  let final = null;
  try {
    const response = await api("/v1/chat/completions", { method: "POST", json: body });
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new ApiError(chunk.error.code === "server_busy" ? 503 : 500, chunk.error.message, chunk.error.code);
      const delta = chunk.choices && chunk.choices[0] && chunk.choices[0].delta;
      if (delta && delta.content) {
        text += delta.content;
        const follow = isAtBottom(log);
        answer.replaceChildren(markdownBlock(text));
        followNewest(log, follow);
      }
      if (chunk.citations !== undefined) final = chunk;
    }
    if (!final) throw new ApiError(0, "The answer stream ended early; the answer may be incomplete.");
    state.history.push({ role: "assistant", content: final.attribution ? final.attribution.text : text });
    const follow = isAtBottom(log);
    renderAnswer(answer, text, final);
    followNewest(log, follow);
  } catch (error) {
    state.history.pop(); // the question was not answered: do not send it as context again
    const follow = isAtBottom(log);
    answer.replaceChildren(markdownBlock(text));
    message.classList.add("failed");
    showError("chat-error", error);
    message.append(el("p", { class: "error", text: error.message }));
    followNewest(log, follow);
  } finally {
    answer.setAttribute("aria-busy", "false");
    state.busy = false;
    $("ask-button").disabled = false;
  }
}

// The conversation follows the newest answer as it streams in, unless the reader scrolled up to read an earlier
// one: then it stays where they are.
function isAtBottom(log) {
  return log.scrollHeight - log.scrollTop - log.clientHeight < 24;
}

function followNewest(log, follow) {
  if (follow) log.scrollTop = log.scrollHeight;
}

function markdownBlock(text, onText) {
  const block = el("div", { class: "md" });
  renderMarkdown(block, text, onText);
  return block;
}

// Parse the SSE body of a streaming chat completion: yields each `data:` JSON object until [DONE].
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = event.split("\n").filter((line) => line.startsWith("data:")).map((line) => line.slice(5).trim()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// The [n] grammar of core/prompt.py (CITATION_MARKER): [1], [1,3], [1, 3], [1-3] (hyphen or en dash).
const CITATION_MARKER = /\[\s*\d+\s*(?:[,\-\u2013]\s*\d+\s*)*\]/g;

function markerNumbers(marker) {
  const numbers = [];
  for (const part of marker.matchAll(/(\d+)\s*(?:[\-\u2013]\s*(\d+))?/g)) {
    const first = Number(part[1]);
    const last = part[2] ? Number(part[2]) : first;
    // Ranges are clipped to 50 numbers: a marker never names more passages than a request may retrieve.
    for (let n = Math.min(first, last); n <= Math.max(first, last) && numbers.length < 50; n++) {
      if (!numbers.includes(n)) numbers.push(n);
    }
  }
  return numbers;
}

function renderAnswer(container, text, final) {
  const citations = new Map(final.citations.map((citation) => [citation.number, citation]));
  const proof = final.attribution;
  const answerText = proof ? proof.text : text; // the answer with its markers matched to the passages
  container.replaceChildren();
  const sentences = proof && proof.sentences.length && !proof.abstained ? proof.sentences : [];
  // Markdown over the answer; each run of text is cut at sentence boundaries so every sentence keeps its support
  // class (a sentence with **bold** in it becomes several spans of the same sentence).
  container.append(markdownBlock(answerText, (node, start, end) => {
    let position = start;
    for (const [index, sentence] of sentences.entries()) {
      if (sentence.end <= position || sentence.start >= end) continue;
      if (sentence.start > position) appendWithMarkers(node, answerText.slice(position, sentence.start), citations);
      const to = Math.min(end, sentence.end);
      const kind = !sentence.claim ? "neutral" : sentence.supported ? "supported" : "unsupported";
      const span = el("span", {
        class: `sentence ${kind}`,
        "data-sentence": String(index),
        title: kind === "supported" ? "Supported by the cited passage" :
          kind === "unsupported" ? "No retrieved passage supports this sentence" : "",
      });
      appendWithMarkers(span, answerText.slice(Math.max(position, sentence.start), to), citations, [sentence.text]);
      if (kind === "unsupported" && to === sentence.end) span.append(el("span", { class: "flag", text: "not in the documents" }));
      node.append(span);
      position = to;
    }
    if (position < end) appendWithMarkers(node, answerText.slice(position, end), citations);
  }));

  if (proof && proof.abstained && proof.draft) {
    container.append(el("p", { class: "declined", text: "The model's answer was withheld: no retrieved passage supports it." }));
    container.append(el("details", { class: "retrieved" }, el("summary", { text: "Show the withheld answer" }),
      el("p", { class: "draft", text: proof.draft })));
  } else if (proof && proof.abstained) {
    container.append(el("p", { class: "declined", text: "None of the retrieved passages answers this question, so nothing was generated." }));
  } else if (proof && proof.sentences.some((s) => s.claim)) {
    const claims = proof.sentences.filter((s) => s.claim).length;
    container.append(el("p", {
      class: proof.unsupported ? "support-summary partial" : "support-summary",
      text: `${proof.supported} of ${claims} sentence${claims === 1 ? "" : "s"} supported by the passages.`,
    }));
  }
  if (final.generator && final.generator.startsWith("extractive")) {
    container.append(el("p", {
      class: "notice",
      text: "No language model is answering on this server: this answer quotes the retrieved passages directly (extractive fallback).",
    }));
  }
  if (final.citations.length) {
    const list = el("ol", { class: "sources", "aria-label": "Sources" });
    for (const citation of [...final.citations].sort((a, b) => a.number - b.number)) {
      const supported = (citation.sentences || []).map((index) => proof && proof.sentences[index]).filter(Boolean);
      list.append(el("li", {}, citeButton(citation, `[${citation.number}] ${basename(citation.source)}, page ${citation.page}`,
        supported.map((sentence) => sentence.text))));
    }
    container.append(list);
  } else if ($("retrieval").checked) {
    container.append(el("p", { class: "hint", text: "This answer cites no passage from your documents." }));
  }
  // Every passage that was retrieved stays one click away, cited or not.
  if (final.context && final.context.length) {
    const details = el("details", { class: "retrieved" },
      el("summary", { text: `Other retrieved passages (${final.context.length})` }));
    const list = el("ul", { "aria-label": "Other retrieved passages" });
    for (const passage of final.context) {
      list.append(el("li", {}, citeButton(passage, `${basename(passage.source)}, page ${passage.page}`)));
    }
    details.append(list);
    container.append(details);
  }
}

// Text with its [n] markers turned into buttons that open the cited passage; ``claims`` are the answer sentences
// the marker stands behind, which the panel finds and marks in the passage.
function appendWithMarkers(parent, text, citations, claims = []) {
  let last = 0;
  for (const match of text.matchAll(CITATION_MARKER)) {
    const cited = markerNumbers(match[0]).map((number) => citations.get(number)).filter(Boolean);
    if (!cited.length) continue;
    parent.append(text.slice(last, match.index));
    cited.forEach((citation) => parent.append(citeButton(citation, `[${citation.number}]`, claims)));
    last = match.index + match[0].length;
  }
  parent.append(text.slice(last));
}

function citeButton(citation, label, claims = []) {
  return el("button", {
    type: "button",
    class: "cite",
    text: label,
    "aria-label": `Source ${citation.number ? `${citation.number}: ` : ""}${basename(citation.source)}, page ${citation.page}`,
    "aria-controls": "panel",
    onclick: (event) => openPanel(citation, event.currentTarget, claims),
  });
}

// ---------------------------------------------------------------- source panel

async function openPanel(citation, trigger, claims = []) {
  state.panel = { citation, trigger, radius: 1, claims };
  const panel = $("panel");
  $("panel-title").textContent = `${citation.number ? `[${citation.number}] ` : ""}${basename(citation.source)}`;
  const meta = $("panel-meta");
  meta.replaceChildren(
    el("dt", { text: "File" }), el("dd", { text: citation.source }),
    el("dt", { text: "Page" }), el("dd", { text: String(citation.page), id: "panel-page" }),
  );
  if (citation.heading_path && citation.heading_path.length) {
    meta.append(el("dt", { text: "Section" }), el("dd", { text: citation.heading_path.join(" › ") }));
  }
  const original = $("panel-original");
  const isPdf = /\.pdf$/i.test(citation.source);
  original.textContent = isPdf ? `Open original PDF at page ${citation.page}` : "Open original file";
  showError("panel-error", null);
  panel.hidden = false;
  document.body.classList.add("panel-open");
  $("panel-title").focus();
  await loadContext();
}

async function loadContext() {
  const { citation, radius, claims } = state.panel;
  const box = $("panel-passages");
  box.setAttribute("aria-busy", "true");
  try {
    const response = await api(`/v1/passages/${encodeURIComponent(citation.id)}/neighbours?before=${radius}&after=${radius}`);
    const chunks = (await response.json()).data;
    box.replaceChildren();
    let cited = null;
    for (const chunk of chunks) {
      const isCited = chunk.id === citation.id;
      const label = `page ${chunk.page}${chunk.heading_path.length ? ` · ${chunk.heading_path.join(" › ")}` : ""}`;
      // In the cited passage, the sentence(s) the answer stands on are marked, not the whole chunk.
      const marks = isCited ? evidenceSpans(chunk.text, claims) : [];
      const text = markdownBlock(chunk.text, (node, start, end) => appendMarked(node, chunk.text, start, end, marks));
      text.classList.add("text");
      const block = el("div", { class: isCited ? "passage cited" : "passage", "data-passage-id": chunk.id },
        el("p", { class: "where", text: isCited ? `Cited passage, ${label}` : label }), text);
      box.append(block);
      if (isCited) cited = block;
    }
    if (cited) cited.scrollIntoView({ block: "nearest" });
    $("panel-more").disabled = radius >= MAX_CONTEXT;
  } catch (error) {
    showError("panel-error", error);
  } finally {
    box.setAttribute("aria-busy", "false");
  }
}

// source[start, end) with the parts inside ``marks`` ([start, end) pairs, in order) wrapped in <mark>.
function appendMarked(node, source, start, end, marks) {
  let position = start;
  for (const [markStart, markEnd] of marks) {
    if (markEnd <= position || markStart >= end) continue;
    if (markStart > position) node.append(source.slice(position, markStart));
    const to = Math.min(end, markEnd);
    node.append(el("mark", { text: source.slice(Math.max(position, markStart), to) }));
    position = to;
  }
  if (position < end) node.append(source.slice(position, end));
}

function closePanel() {
  const panel = $("panel");
  if (panel.hidden) return;
  panel.hidden = true;
  document.body.classList.remove("panel-open");
  const trigger = state.panel && state.panel.trigger;
  state.panel = null;
  if (trigger && trigger.isConnected) trigger.focus();
}

// The file needs the Authorization header, so it is fetched and opened as a blob: URL in a new tab.
async function openOriginal(documentId, { page = null, errorId } = {}) {
  const tab = window.open("", "_blank"); // opened during the click, so popup blockers allow it
  try {
    const response = await api(`/v1/documents/${encodeURIComponent(documentId)}/file`);
    const blob = await response.blob();
    const url = URL.createObjectURL(blob);
    const target = page && blob.type === "application/pdf" ? `${url}#page=${page}` : url;
    if (tab) tab.location.href = target;
    else window.location.href = target;
    setTimeout(() => URL.revokeObjectURL(url), 60000);
  } catch (error) {
    if (tab) tab.close();
    showError(errorId, error);
  }
}

// ---------------------------------------------------------------- documents

const formatSize = (bytes) => bytes >= 1048576 ? `${(bytes / 1048576).toFixed(1)} MB` : `${Math.max(1, Math.round(bytes / 1024))} KB`;

async function loadDocuments() {
  showError("documents-error", null);
  const tbody = $("documents-table").querySelector("tbody");
  try {
    const documents = (await (await api("/v1/documents")).json()).data;
    tbody.replaceChildren();
    for (const doc of documents) {
      const name = basename(doc.source);
      tbody.append(el("tr", { "data-document-id": doc.id },
        el("th", { scope: "row", title: doc.source, text: name }),
        el("td", { text: String(doc.pages) }),
        el("td", { text: String(doc.chunk_count) }),
        el("td", { text: formatSize(doc.size_bytes) }),
        el("td", { text: doc.ingested_at.replace("T", " ").replace("+00:00", " UTC") }),
        el("td", { class: "actions" },
          el("button", { type: "button", "aria-label": `Open ${name}`, text: "Open",
            onclick: () => openOriginal(doc.id, { errorId: "documents-error" }) }),
          el("button", { type: "button", class: "danger", "aria-label": `Delete ${name}`, text: "Delete",
            onclick: () => deleteDocument(doc, name) }))));
    }
    $("documents-count").textContent = documents.length
      ? `${documents.length} document${documents.length === 1 ? "" : "s"}.`
      : "No documents yet: upload some above.";
  } catch (error) {
    showError("documents-error", error);
  }
}

async function deleteDocument(doc, name) {
  if (!window.confirm(`Delete ${name}? Answers will no longer cite it.`)) return;
  let failed = null;
  try {
    await api(`/v1/documents/${encodeURIComponent(doc.id)}`, { method: "DELETE" });
  } catch (error) {
    failed = error;
  }
  await loadDocuments(); // redrawn first, so the message below describes what is on screen
  if (failed) showError("documents-error", failed);
  else $("documents-status").textContent = `Deleted ${name}.`;
  $("documents-title").focus();
}

async function uploadAll(files) {
  const list = $("upload-list");
  list.replaceChildren();
  const rows = files.map((file) => {
    const progress = el("progress", { max: "100", value: "0", "aria-label": `Upload progress of ${file.name}` });
    const status = el("span", { class: "upload-status", text: "Waiting" });
    const row = el("li", { "data-file": file.name }, el("span", { class: "upload-name", text: file.name }), progress, status);
    list.append(row);
    return { file, row, progress, status };
  });
  for (const item of rows) await uploadOne(item);
  await loadDocuments();
  $("documents-status").textContent = "Uploads finished.";
}

// XHR, not fetch: only XHR reports upload progress.
function uploadOne({ file, row, progress, status }) {
  return new Promise((resolve) => {
    const finish = (ok, message) => {
      row.classList.add(ok ? "ok" : "failed");
      status.textContent = message;
      resolve();
    };
    const xhr = new XMLHttpRequest();
    xhr.open("POST", "/v1/documents");
    xhr.setRequestHeader("Authorization", `Bearer ${state.key}`);
    status.textContent = "Uploading";
    xhr.upload.onprogress = (event) => {
      if (event.lengthComputable) progress.value = Math.round((100 * event.loaded) / event.total);
    };
    xhr.upload.onload = () => { progress.value = 100; status.textContent = "Indexing…"; };
    xhr.onerror = () => finish(false, "Failed: the server cannot be reached.");
    xhr.onload = () => {
      let body = null;
      try { body = JSON.parse(xhr.responseText); } catch (_) { /* reported below */ }
      if (xhr.status !== 200) {
        const error = body && body.error ? body.error : { message: xhr.statusText };
        if (xhr.status === 401) signOut(explain(401, error.message));
        return finish(false, `Failed: ${explain(xhr.status, error.message, error.code)}`);
      }
      const outcome = body.data[0];
      if (outcome.status === "failed" || outcome.status === "rejected") return finish(false, `Failed: ${outcome.reason}`);
      const what = { added: "Added", updated: "Updated", unchanged: "Already indexed, unchanged" }[outcome.status];
      finish(true, `${what}: ${outcome.pages} page${outcome.pages === 1 ? "" : "s"}, ${outcome.chunks} chunk${outcome.chunks === 1 ? "" : "s"}.`);
    };
    const form = new FormData();
    form.append("files", file, file.name);
    xhr.send(form);
  });
}

// ---------------------------------------------------------------- adapters

async function loadAdapters() {
  showError("adapters-error", null);
  const rows = $("adapters-list");
  rows.replaceChildren();
  $("adapters-wrap").hidden = true;
  $("adapters-status").textContent = "";
  let adapters;
  try {
    adapters = (await (await api("/v1/adapters")).json()).data;
  } catch (error) {
    if (error.status === 404 || error.status === 405) {
      $("adapters-status").textContent = "Adapter management is not available on this server.";
    } else {
      showError("adapters-error", error);
    }
    return;
  }
  if (!adapters.length) $("adapters-status").textContent = "This tenant has no adapters yet (train one with lorag train).";
  $("adapters-wrap").hidden = !adapters.length;
  for (const adapter of adapters) rows.append(adapterRow(adapter));
}

const shortNumber = (value) => typeof value === "number" ? String(+value.toPrecision(4)) : "";
const shortDate = (iso) => iso ? iso.slice(0, 10) : ""; // the day; the full time is in the cell's title

// What a reader compares between adapters: validation loss and perplexity against the base model's.
function validationSummary(metrics) {
  const parts = [];
  const loss = metrics.val_loss ?? metrics.eval_loss;
  if (loss !== undefined && loss !== null) parts.push(`loss ${shortNumber(loss)}`);
  if (metrics.val_perplexity !== undefined && metrics.val_perplexity !== null) {
    const base = metrics.base_val_perplexity;
    parts.push(`perplexity ${shortNumber(metrics.val_perplexity)}${base ? ` (base ${shortNumber(base)})` : ""}`);
  }
  return parts.join(", ") || "not measured";
}

function adapterRow(adapter) {
  const resident = adapter.residency === "gpu" || adapter.residency === "host";
  const metrics = adapter.metrics || {};
  const where = { gpu: "accelerator", host: "host memory", disk: "disk" }[adapter.residency] || adapter.residency;
  const plot = el("td", { class: "plot" });
  if (adapter.loss_plot_url) {
    loadImage(adapter.loss_plot_url, `Training loss of ${adapter.name}`).then(
      (img) => plot.append(img), () => plot.append(el("span", { class: "hint", text: "not available" })));
  } else {
    plot.append(el("span", { class: "hint", text: "none" }));
  }
  const action = resident ? "unload" : "load";
  const button = el("button", {
    type: "button",
    "data-adapter": adapter.name,
    text: resident ? "Unload" : "Load",
    "aria-label": `${resident ? "Unload" : "Load"} ${adapter.name}`,
    disabled: adapter.pinned && resident ? true : null,
    onclick: async () => {
      let done = null;
      let failed = null;
      try {
        await api(`/v1/adapters/${encodeURIComponent(adapter.name)}/${action}`, { method: "POST" });
        done = `${adapter.name} ${action === "load" ? "loaded" : "unloaded"}.`;
      } catch (error) {
        failed = error;
      }
      await loadAdapters(); // the table is redrawn: report afterwards and put focus back on this adapter
      if (done) $("adapters-status").textContent = done;
      if (failed) showError("adapters-error", failed);
      const again = $("adapters-list").querySelector(`[data-adapter="${CSS.escape(adapter.name)}"]`);
      (again || $("adapters-title")).focus();
    },
  });
  return el("tr", { "data-adapter-row": adapter.name },
    el("th", { scope: "row", text: adapter.name + (adapter.default ? " (default)" : "") }),
    el("td", { text: adapter.base_model }),
    el("td", { text: adapter.method + (adapter.rank ? `, rank ${adapter.rank}` : "") }),
    el("td", { text: validationSummary(metrics) }),
    el("td", { text: metrics.steps !== undefined ? String(metrics.steps) : "" }),
    el("td", { text: where + (adapter.pinned ? " (pinned)" : "") }),
    el("td", { text: shortDate(adapter.created_at), title: adapter.created_at || null }),
    plot,
    el("td", { class: "actions" }, button));
}

async function loadImage(url, alt) {
  const blob = await (await api(url)).blob();
  return el("img", { src: URL.createObjectURL(blob), alt });
}

// ---------------------------------------------------------------- wiring

function wire() {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const key = $("api-key").value.trim();
    if (!key) return showError("signin-error", { message: "Enter an API key." });
    signIn(key);
  });
  $("sign-out").addEventListener("click", () => signOut());
  for (const tab of document.querySelectorAll(".tab")) tab.addEventListener("click", () => showView(tab.dataset.view));

  $("ask-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const question = $("question").value.trim();
    if (!question) return showError("chat-error", { message: "Type a question first." });
    $("question").value = "";
    ask(question);
  });
  $("question").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey && !event.isComposing) {
      event.preventDefault();
      $("ask-form").requestSubmit();
    }
  });

  $("panel-close").addEventListener("click", closePanel);
  $("panel").addEventListener("keydown", (event) => { if (event.key === "Escape") closePanel(); });
  $("panel-more").addEventListener("click", () => {
    if (!state.panel) return;
    state.panel.radius = Math.min(MAX_CONTEXT, state.panel.radius + 2);
    loadContext();
  });
  $("panel-original").addEventListener("click", (event) => {
    event.preventDefault();
    if (!state.panel) return;
    const { citation } = state.panel;
    openOriginal(citation.document_id, { page: citation.page, errorId: "panel-error" });
  });

  $("upload-form").addEventListener("submit", (event) => {
    event.preventDefault();
    const files = Array.from($("upload-files").files);
    if (!files.length) return showError("documents-error", { message: "Choose one or more files to upload." });
    showError("documents-error", null);
    uploadAll(files).then(() => { $("upload-files").value = ""; });
  });

  const saved = sessionStorage.getItem(KEY_STORAGE);
  if (saved) signIn(saved, { quiet: true });
  else $("api-key").focus();
}

document.addEventListener("DOMContentLoaded", wire);
