// fastret search page: plain JS, no build step. Text from the server goes in via textContent only.
"use strict";

const $ = (id) => document.getElementById(id);
let lastQuery = null; // {kind: "upload", file}, {kind: "item", id, path} or {kind: "text", text}

function options() {
  const params = new URLSearchParams({
    k: $("k").value, score: $("score").value, exact: $("exact").checked,
    rerank: $("rerank").checked, flip_tta: $("flip").checked,
  });
  return params.toString();
}

function showQueryImage(src, name) {
  const img = $("query-image");
  if (img.dataset.blob) URL.revokeObjectURL(img.dataset.blob);
  img.dataset.blob = src.startsWith("blob:") ? src : "";
  img.src = src;
  img.hidden = false;
  $("drop-hint").hidden = true;
  $("query-name").textContent = name;
}

function setStatus(text, isError = false) {
  $("status").textContent = text;
  $("status").classList.toggle("error", isError);
}

async function run(url, body, headers = {}) {
  setStatus("Searching…");
  document.body.classList.add("busy");
  try {
    const response = await fetch(url, { method: "POST", body, headers });
    const data = await response.json().catch(() => ({}));
    if (!response.ok) {
      const detail = typeof data.detail === "string" ? data.detail : JSON.stringify(data.detail ?? response.statusText);
      throw new Error(`${response.status}: ${detail}`);
    }
    render(data);
  } catch (error) {
    setStatus(`Search failed: ${error.message}`, true);
  } finally {
    document.body.classList.remove("busy");
  }
}

function searchFile(file) {
  if (!file) return;
  lastQuery = { kind: "upload", file };
  showQueryImage(URL.createObjectURL(file), file.name || "pasted image");
  const body = new FormData();
  body.append("image", file, file.name || "pasted-image");
  return run(`/search?${options()}`, body);
}

function searchItem(id, path) {
  lastQuery = { kind: "item", id, path };
  showQueryImage(`/items/${id}/thumbnail`, path);
  return run(`/search/item/${id}?${options()}`);
}

function searchText(text) {
  if (!text.trim()) return;
  lastQuery = { kind: "text", text };
  const img = $("query-image");
  img.hidden = true;
  $("drop-hint").hidden = false;
  $("query-name").textContent = `text: ${text}`;
  return run(`/search/text?${options()}`, JSON.stringify({ text }), { "Content-Type": "application/json" });
}

function render(data) {
  const list = $("results");
  const template = $("card").content;
  list.replaceChildren();
  for (const hit of data.results) {
    const card = template.cloneNode(true);
    const img = card.querySelector("img");
    img.src = `/items/${hit.id}/thumbnail`;
    img.alt = hit.path;
    card.querySelector(".rank").textContent = `#${hit.rank}`;
    card.querySelector(".label").textContent = hit.label;
    card.querySelector(".score").textContent = data.score === "softmax" ? hit.score.toExponential(2) : hit.score.toFixed(3);
    card.querySelector(".path").textContent = hit.path;
    card.querySelector("li").dataset.label = hit.label;
    card.querySelector("button").addEventListener("click", () => searchItem(hit.id, hit.path));
    list.append(card);
  }
  const t = data.timing;
  const ms = (value) => value.toFixed(1);
  const parts = [`decode ${ms(t.decode_ms)}`, `encode ${ms(t.encode_ms)}`, `search ${ms(t.search_ms)}`];
  setStatus(`${data.results.length} results in ${ms(t.total_ms)} ms (${parts.join(" + ")} ms) · ${data.search}${data.rerank ? " + re-ranking" : ""} · ${data.score}`);
}

function firstImage(items) {
  for (const item of items) {
    if (item.kind === "file" && item.type.startsWith("image/")) return item.getAsFile();
  }
  return null;
}

function rerun() {
  if (lastQuery?.kind === "upload") searchFile(lastQuery.file);
  else if (lastQuery?.kind === "item") searchItem(lastQuery.id, lastQuery.path);
  else if (lastQuery?.kind === "text") searchText(lastQuery.text);
}

async function showHealth() {
  try {
    const h = await (await fetch("/health")).json();
    const r = h.rerank;
    const rerank = r ? ` · re-ranking ${r.source === "index" ? `through the index's graph (${r.dim}-d, ef ${r.ef})` : "in memory"}`
      + (r.notes.length ? `: ${r.notes.join("; ")}` : "") : "";
    $("health").textContent = `${h.count} images indexed with ${h.model} (${h.dim}-d, ${h.backend})${rerank}`;
    $("text-form").hidden = !h.text_queries;
  } catch {
    $("health").textContent = "server unreachable";
  }
}

window.addEventListener("DOMContentLoaded", () => {
  const drop = $("drop");
  $("file").addEventListener("change", (e) => searchFile(e.target.files[0]));
  drop.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") $("file").click(); });
  for (const name of ["dragenter", "dragover"]) {
    drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
  }
  for (const name of ["dragleave", "drop"]) {
    drop.addEventListener(name, () => drop.classList.remove("over"));
  }
  drop.addEventListener("drop", (e) => { e.preventDefault(); searchFile(e.dataTransfer.files[0]); });
  document.addEventListener("paste", (e) => {
    const file = firstImage(e.clipboardData.items);
    if (file) searchFile(file);
  });
  // softmax probabilities are over plain cosines: choosing one turns the other off
  $("score").addEventListener("change", () => { if ($("score").value === "softmax") $("rerank").checked = false; });
  $("rerank").addEventListener("change", () => { if ($("rerank").checked) $("score").value = "cosine"; });
  $("options").addEventListener("change", rerun);
  $("text-form").addEventListener("submit", (e) => { e.preventDefault(); searchText($("text").value); });
  showHealth();
});
