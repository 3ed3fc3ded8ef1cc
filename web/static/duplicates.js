// fastret duplicates view: GET /duplicates, groups side by side. Text from the server goes in via textContent only.
"use strict";

(() => {
  const $ = (id) => document.getElementById(id);

  function kilobytes(bytes) {
    return bytes < 1024 * 1024 ? `${Math.round(bytes / 1024)} KB` : `${(bytes / 1024 / 1024).toFixed(1)} MB`;
  }

  function copyCard(copy, kept) {
    const card = $("copy").content.cloneNode(true);
    const item = card.querySelector("li");
    item.classList.toggle("kept", kept);
    card.querySelector("a").href = `/items/${copy.id}/image`;
    const img = card.querySelector("img");
    img.src = `/items/${copy.id}/thumbnail`;
    img.alt = copy.path;
    card.querySelector(".role").textContent = kept ? "keep" : "duplicate";
    const scores = copy.reason === "near-duplicate"
      ? ` · agreement ${copy.agreement.toFixed(2)} · cosine ${copy.cosine.toFixed(2)}${copy.mirrored ? " · mirrored" : ""}`
      : "";
    card.querySelector(".reason").textContent = kept ? "" : copy.reason + scores;
    card.querySelector(".size").textContent = `${copy.width}×${copy.height} · ${kilobytes(copy.bytes)}`;
    card.querySelector(".path").textContent = copy.path;
    return card;
  }

  function render(data) {
    const groups = $("groups");
    groups.replaceChildren();
    data.groups.forEach((group, number) => {
      const section = $("group").content.cloneNode(true);
      section.querySelector("h2").textContent = `Group ${number + 1}: ${group.duplicates.length + 1} files`;
      const list = section.querySelector(".copies");
      list.append(copyCard(group.kept, true));
      for (const copy of group.duplicates) list.append(copyCard(copy, false));
      groups.append(section);
    });
    const setting = data.threshold_setting === "auto" ? `${data.threshold} (auto)` : data.threshold;
    $("duplicate-status").textContent =
      `${data.groups.length} groups, ${data.duplicates} duplicates among ${data.items} images · agreement threshold ` +
      `${setting} · kept: ${data.keep_rule} · ${data.seconds.total.toFixed(1)} s`;
    $("duplicate-status").classList.remove("error");
  }

  async function load() {
    $("duplicate-status").textContent = "Finding duplicates…";
    document.body.classList.add("busy");
    try {
      const params = new URLSearchParams({ threshold: $("threshold").value, mirrored: $("mirrored").checked });
      const response = await fetch(`/duplicates?${params}`);
      const data = await response.json().catch(() => ({}));
      if (!response.ok) throw new Error(`${response.status}: ${data.detail ?? response.statusText}`);
      render(data);
    } catch (error) {
      $("duplicate-status").textContent = `Finding duplicates failed: ${error.message}`;
      $("duplicate-status").classList.add("error");
    } finally {
      document.body.classList.remove("busy");
    }
  }

  function show(view) {
    $("search-view").hidden = view !== "search";
    $("duplicates-view").hidden = view !== "duplicates";
    $("tab-search").classList.toggle("active", view === "search");
    $("tab-duplicates").classList.toggle("active", view === "duplicates");
    if (view === "duplicates" && !$("groups").childElementCount) load();
  }

  window.addEventListener("DOMContentLoaded", () => {
    $("tab-search").addEventListener("click", () => show("search"));
    $("tab-duplicates").addEventListener("click", () => show("duplicates"));
    $("duplicate-options").addEventListener("change", load);
  });
})();
