// medclf web page: upload one image, show the prediction, its heatmap and the model card.
// Plain DOM code, no build step; every server-provided text goes through textContent (never innerHTML).
"use strict";

(function () {
  const $ = (id) => document.getElementById(id);
  const KEY_STORE = "medclf.apiKey";
  let maxUploadBytes = null;
  let busy = false;

  function apiKey() {
    return sessionStorage.getItem(KEY_STORE) || "";
  }

  function headers() {
    const key = apiKey();
    return key ? { Authorization: "Bearer " + key } : {};
  }

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attrs || {})) {
      if (name === "class") node.className = value;
      else node.setAttribute(name, value);
    }
    for (const child of children) {
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  function pct(p) {
    return (100 * p).toFixed(1) + " %";
  }

  function fmt(v, digits = 3) {
    return typeof v === "number" && isFinite(v) ? v.toFixed(digits) : "–";
  }

  function bytesText(n) {
    if (n >= 1 << 20) return (n / (1 << 20)).toFixed(n % (1 << 20) ? 1 : 0) + " MiB";
    if (n >= 1024) return (n / 1024).toFixed(0) + " KiB";
    return n + " bytes";
  }

  function setStatus(text) {
    $("status").textContent = text;
  }

  function showError(message, reason) {
    $("error-text").textContent = message;
    $("error-reason").textContent = reason ? "Reason code: " + reason : "";
    $("error").hidden = false;
  }

  function clearError() {
    $("error").hidden = true;
  }

  function needKey(message) {
    $("key-panel").hidden = false;
    if (message) $("api-key-hint").textContent = message;
    $("api-key").focus();
  }

  async function readJson(response) {
    try {
      return await response.json();
    } catch (e) {
      return { error: "The server answered with status " + response.status + " and no readable message." };
    }
  }

  // ---------------------------------------------------------------- model card and metrics
  async function loadModel() {
    let response;
    try {
      response = await fetch("/v1/model", { headers: headers() });
    } catch (e) {
      $("model-badge").textContent = "Server unreachable";
      return;
    }
    const body = await readJson(response);
    if (response.status === 401) {
      $("model-badge").textContent = "API key required";
      needKey(apiKey() ? "The key was not accepted. Check it and try again." : null);
      return;
    }
    if (!response.ok) {
      $("model-badge").textContent = "Model unavailable";
      showError(body.error || "The model description could not be loaded.", body.reason);
      return;
    }
    $("key-panel").hidden = true;
    renderModel(body);
  }

  function renderModel(model) {
    $("model-badge").textContent = model.arch + " · " + model.classes.length + " classes · " + model.sha256.slice(0, 12);
    $("model-badge").title = "Bundle sha256 " + model.sha256;
    maxUploadBytes = model.limits && model.limits.max_upload_bytes;
    if (maxUploadBytes) $("max-size").textContent = bytesText(maxUploadBytes);

    const facts = $("model-facts");
    facts.replaceChildren();
    const card = model.model_card || {};
    for (const [name, value] of Object.entries(card.facts || {})) {
      const dd = el("dd", {}, value);
      if (name.includes("sha256")) dd.className = "mono";
      facts.append(el("dt", {}, name), dd);
    }
    $("intended-use").textContent = card.intended_use ? "Intended use: " + card.intended_use : "";
    renderMarkdown($("model-card-text"), card.markdown || "");
    renderMetrics(model.metrics || {}, model.classes);
  }

  // A small, safe subset of Markdown: headings, bullet lists, paragraphs.
  function renderMarkdown(target, text) {
    target.replaceChildren();
    let list = null;
    for (const raw of text.split(/\r?\n/)) {
      const line = raw.trim();
      if (!line) { list = null; continue; }
      const heading = line.match(/^#{1,6}\s+(.*)$/);
      const bullet = line.match(/^[-*]\s+(.*)$/);
      if (heading) { list = null; target.append(el("h4", {}, heading[1])); }
      else if (bullet) {
        if (!list) { list = el("ul"); target.append(list); }
        list.append(el("li", {}, bullet[1]));
      } else { list = null; target.append(el("p", {}, line)); }
    }
  }

  function renderMetrics(metrics, classes) {
    const split = metrics.test ? "test" : metrics.val ? "val" : null;
    const table = $("metrics");
    const perClass = $("per-class");
    table.replaceChildren();
    perClass.replaceChildren();
    if (!split) {
      $("metrics-title").textContent = "Metrics";
      $("metrics-note").textContent = "This bundle carries no evaluation metrics.";
      return;
    }
    const m = metrics[split];
    $("metrics-title").textContent = split === "test" ? "Test metrics" : "Validation metrics";
    let note = split === "test"
      ? "Measured on the held-out test split"
      : "No test metrics in this bundle; these are from the validation split used for model selection (optimistic)";
    if (typeof m.n === "number") note += ", n = " + m.n;
    if (m.n_removed_duplicates) note += ", " + m.n_removed_duplicates + " copies of training images left out";
    $("metrics-note").textContent = note + ".";

    const ci = m.ci || {};
    const level = ci.level ? Math.round(ci.level * 100) + " % CI" : "CI";
    table.append(el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Metric"),
      el("th", { scope: "col", class: "num" }, "Value"), el("th", { scope: "col", class: "num" }, level))));
    const body = el("tbody");
    for (const [key, label] of [["accuracy", "Accuracy"], ["balanced_accuracy", "Balanced accuracy"], ["auc", "AUC"]]) {
      if (m[key] === undefined) continue;
      const interval = Array.isArray(ci[key]) ? fmt(ci[key][0]) + " – " + fmt(ci[key][1]) : "–";
      body.append(el("tr", {}, el("th", { scope: "row" }, label), el("td", { class: "num" }, fmt(m[key])),
        el("td", { class: "num" }, interval)));
    }
    table.append(body);

    if (m.per_class) {
      perClass.append(el("caption", {}, "Per class"));
      perClass.append(el("thead", {}, el("tr", {}, el("th", { scope: "col" }, "Class"),
        el("th", { scope: "col", class: "num" }, "Sensitivity"), el("th", { scope: "col", class: "num" }, "Specificity"),
        el("th", { scope: "col", class: "num" }, "AUC"), el("th", { scope: "col", class: "num" }, "n"))));
      const rows = el("tbody");
      for (const name of classes) {
        const c = m.per_class[name];
        if (!c) continue;
        rows.append(el("tr", {}, el("th", { scope: "row" }, name), el("td", { class: "num" }, fmt(c.sensitivity)),
          el("td", { class: "num" }, fmt(c.specificity)), el("td", { class: "num" }, fmt(c.auc)),
          el("td", { class: "num" }, c.support ?? "–")));
      }
      perClass.append(rows);
    }
  }

  // ---------------------------------------------------------------- prediction
  async function analyse(file) {
    if (busy || !file) return;
    clearError();
    if (maxUploadBytes && file.size > maxUploadBytes) {
      showError("The file is " + bytesText(file.size) + ", larger than this server's limit of " +
        bytesText(maxUploadBytes) + ".", "file_too_large");
      return;
    }
    busy = true;
    $("drop").dataset.state = "busy";
    setStatus("Analysing " + file.name + "…");
    const form = new FormData();
    form.append("file", file);
    let response;
    try {
      response = await fetch("/v1/predict?explain=true", { method: "POST", body: form, headers: headers() });
    } catch (e) {
      setStatus("");
      showError("The server could not be reached. Check the connection and try again.", "network");
      finish();
      return;
    }
    const body = await readJson(response);
    setStatus("");
    if (response.status === 401) {
      needKey("This server requires an API key for predictions.");
      showError(body.error || "An API key is required.", body.reason);
    } else if (!response.ok) {
      showError(body.error || "The server refused the image (status " + response.status + ").", body.reason);
    } else {
      renderResult(body, file.name);
      setStatus("Done: " + body.predicted + " (" + pct(body.confidence) + ").");
    }
    finish();
  }

  function finish() {
    busy = false;
    $("drop").dataset.state = "idle";
    $("file").value = "";
  }

  function renderResult(r, fileName) {
    $("result-empty").hidden = true;
    $("result").hidden = false;
    $("predicted").textContent = r.predicted;
    $("confidence").textContent = "confidence " + pct(r.confidence);
    // The bundle's operating point (medclf recalibrate): a yes/no call at a threshold fitted for a site.
    const d = r.decision;
    $("decision").textContent = d ? "Decision at the operating point: " + d.label + " (P(" + d.group + ") " +
      pct(d.score) + (d.positive ? " \u2265 " : " < ") + "threshold " + pct(d.threshold) + ")" : "";
    $("decision").hidden = !d;
    // The bundle's out-of-distribution check, when it has one: this input looks unlike the training data.
    $("ood-warning").textContent = r.ood ? "Caution: " + (r.warning || "this image looks unlike the training data.") : "";
    $("ood-warning").hidden = !r.ood;

    const bars = $("bars");
    bars.replaceChildren();
    const entries = Object.entries(r.probabilities).sort((a, b) => b[1] - a[1]);
    for (const [name, p] of entries) {
      const fill = el("div", { class: "fill" });
      fill.style.width = Math.max(0, Math.min(100, 100 * p)).toFixed(1) + "%";
      const track = el("div", { class: "track", role: "img", "aria-label": name + ": " + pct(p) }, fill);
      // Multi-label findings: each finding present at its own threshold is marked (several may be).
      const marked = r.findings ? r.findings[name].present : name === r.predicted;
      const label = r.findings ? name + (marked ? " (present)" : "") : name;
      bars.append(el("li", { class: marked ? "top" : "" },
        el("span", { class: "name", title: name }, label), track, el("span", { class: "pct" }, pct(p))));
    }
    $("prob-title").textContent = r.findings
      ? "Findings: probability each (present at or above its threshold)"
      : "Class probabilities";

    const details = $("request-details");
    details.replaceChildren();
    const rows = [
      ["File", fileName],
      ["Format", r.input.format + " · " + r.input.shape.join(" × ")],
      ["Input sha256", r.input.sha256],
      ["Model sha256", r.model.sha256],
      ["Latency", r.latency_ms.toFixed(0) + " ms"],
    ];
    for (const [name, value] of rows) {
      details.append(el("dt", {}, name), el("dd", { class: name.includes("sha256") ? "mono" : "" }, value));
    }

    const e = r.explanation;
    if (e) {
      $("input-image").src = "data:image/png;base64," + e.image_png;
      $("heatmap-image").src = "data:image/png;base64," + e.heatmap_png;
      $("download").href = "data:image/png;base64," + e.overlay_png;
      const method = { gradcam: "Grad-CAM", gradcampp: "Grad-CAM++", occlusion: "Occlusion sensitivity" }[e.method] || e.method;
      $("viewer-caption").textContent = "What the model saw (after preprocessing), with " + method +
        " for the class “" + e.explained_class + "”" + (e.layer ? " (network layer " + e.layer + ")" : "") +
        ". The heatmap shows where the model looked, not where a lesion is.";
      $("viewer").hidden = false;
      updateHeat();
    }
  }

  function updateHeat() {
    const value = Number($("opacity").value);
    $("opacity").setAttribute("aria-valuetext", value + " percent");
    $("heatmap-image").style.opacity = $("show-heat").checked ? String(value / 100) : "0";
  }

  // ---------------------------------------------------------------- wiring
  function init() {
    const drop = $("drop");
    $("file").addEventListener("change", (ev) => analyse(ev.target.files[0]));
    for (const name of ["dragenter", "dragover"]) {
      drop.addEventListener(name, (ev) => { ev.preventDefault(); if (!busy) drop.dataset.state = "over"; });
    }
    for (const name of ["dragleave", "dragend"]) {
      drop.addEventListener(name, () => { if (!busy) drop.dataset.state = "idle"; });
    }
    drop.addEventListener("drop", (ev) => {
      ev.preventDefault();
      if (!busy) drop.dataset.state = "idle";
      const files = ev.dataTransfer && ev.dataTransfer.files;
      if (files && files.length > 1) {
        showError("Drop one image at a time.", "too_many_files");
        return;
      }
      if (files && files.length) analyse(files[0]);
    });
    $("opacity").addEventListener("input", updateHeat);
    $("show-heat").addEventListener("change", updateHeat);
    $("api-key-save").addEventListener("click", () => {
      const key = $("api-key").value.trim();
      if (key) sessionStorage.setItem(KEY_STORE, key);
      else sessionStorage.removeItem(KEY_STORE);
      $("api-key").value = "";
      clearError();
      loadModel();
    });
    $("api-key").addEventListener("keydown", (ev) => { if (ev.key === "Enter") $("api-key-save").click(); });
    loadModel();
  }

  init();
})();
