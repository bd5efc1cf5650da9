// Centroid's web console: talks only to the JSON API, with the key the user typed.
// Everything from the user or the server goes into the page with textContent / DOM APIs, never innerHTML.
"use strict";

(() => {
  const KEY_STORE = "centroid.apiKey"; // sessionStorage only: gone when the tab closes
  const $ = (id) => document.getElementById(id);
  const state = { datasets: [], models: [], endpoint: null, assignments: [], sort: { by: "cluster", dir: 1 }, plotUrl: null };

  // ---- API key -------------------------------------------------------------------------------
  const storedKey = () => sessionStorage.getItem(KEY_STORE) || "";
  function showKeyStatus() {
    $("key-status").textContent = storedKey() ? "a key is set for this tab" : "no key set";
  }

  // ---- messages --------------------------------------------------------------------------------
  function showMessage(text, kind) {
    const box = $("message");
    box.textContent = text;
    box.className = kind;
    box.hidden = false;
  }
  const showError = (error) => showMessage(error && error.message ? error.message : String(error), "error");
  const showInfo = (text) => showMessage(text, "info");

  // ---- fetch with the key ------------------------------------------------------------------------
  class ApiError extends Error {}

  async function request(method, path, { json, form, text, accept } = {}) {
    const headers = {};
    const key = storedKey();
    if (key) headers.Authorization = "Bearer " + key;
    if (accept) headers.Accept = accept;
    let body;
    if (json !== undefined) {
      headers["Content-Type"] = "application/json";
      body = JSON.stringify(json);
    } else if (form !== undefined) {
      body = form;
    } else if (text !== undefined) {
      headers["Content-Type"] = "text/csv";
      body = text;
    }
    const response = await fetch(path, { method, headers, body, credentials: "omit", cache: "no-store" });
    if (!response.ok) throw await apiError(response);
    return response;
  }

  async function apiError(response) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const body = await response.json();
      if (body && body.error) message = `${body.error.code}: ${body.error.message} (HTTP ${response.status})`;
    } catch (_) {
      /* not JSON: keep the status line */
    }
    if (response.status === 401) message += " — enter an API key above";
    return new ApiError(message);
  }

  const getJson = async (path) => (await request("GET", path)).json();
  const sendJson = async (method, path, json) => (await request(method, path, { json })).json();

  // ---- small DOM helpers -------------------------------------------------------------------------
  function el(tag, text, className) {
    const node = document.createElement(tag);
    if (text !== undefined && text !== null) node.textContent = String(text);
    if (className) node.className = className;
    return node;
  }
  function fillSelect(select, items, { value, label, empty } = {}) {
    const previous = select.value;
    select.replaceChildren();
    if (empty !== undefined) select.append(new Option(empty, ""));
    for (const item of items) select.append(new Option(label(item), value(item)));
    if ([...select.options].some((o) => o.value === previous)) select.value = previous;
  }
  const byId = (list, id) => list.find((item) => item.id === id);
  const uniqueName = (prefix) => `${prefix}-${Date.now().toString(36)}`;

  // Runs a handler, disabling its button and showing any error.
  function action(button, handler) {
    return async (event) => {
      if (event) event.preventDefault();
      if (button) button.disabled = true;
      try {
        await handler();
      } catch (error) {
        showError(error);
      } finally {
        if (button) button.disabled = false;
      }
    };
  }

  // ---- datasets --------------------------------------------------------------------------------
  async function loadDatasets() {
    state.datasets = (await getJson("/datasets?limit=100")).items;
    const body = $("datasets-table").tBodies[0];
    body.replaceChildren();
    for (const ds of state.datasets) {
      const row = el("tr");
      row.dataset.id = ds.id;
      row.append(el("td", ds.name), el("td", ds.row_count, "num"), el("td", ds.key_column || "—"));
      row.append(el("td", ds.columns.map((c) => `${c.name} (${c.dtype})`).join(", ")));
      body.append(row);
    }
    const opts = { value: (d) => d.id, label: (d) => `${d.name} (${d.row_count} rows)` };
    fillSelect($("derive-base"), state.datasets, opts);
    fillSelect($("derive-other"), state.datasets, { ...opts, empty: "— no join —" });
    fillSelect($("train-dataset"), state.datasets, opts);
    refreshDeriveColumns();
  }

  async function upload() {
    const file = $("upload-file").files[0];
    if (!file) throw new Error("choose a CSV file");
    const form = new FormData();
    form.append("file", file);
    form.append("name", $("upload-name").value.trim());
    const key = $("upload-key").value.trim();
    if (key) form.append("key_column", key);
    const ds = await (await request("POST", "/datasets", { form })).json();
    showInfo(`uploaded ${ds.name}: ${ds.row_count} rows, ${ds.columns.length} columns`);
    $("upload-form").reset();
    await loadDatasets();
  }

  // ---- derive ----------------------------------------------------------------------------------
  function deriveColumns() {
    const base = byId(state.datasets, $("derive-base").value);
    if (!base) return [];
    const names = base.columns.map((c) => c.name).filter((n) => n !== base.key_column);
    const other = byId(state.datasets, $("derive-other").value);
    if (other) {
      for (const c of other.columns) if (c.name !== other.key_column && !names.includes(c.name)) names.push(c.name);
    }
    return names;
  }

  function refreshDeriveColumns() {
    const names = deriveColumns();
    fillSelect($("derive-scale"), names, { value: (n) => n, label: (n) => n, empty: "— none —" });
    const box = $("derive-keep");
    box.replaceChildren();
    names.forEach((name, i) => {
      const input = el("input");
      input.type = "checkbox";
      input.checked = true;
      input.value = name;
      input.id = `keep-${i}`;
      const label = el("label", name);
      label.htmlFor = input.id;
      const span = el("span");
      span.append(input, label);
      box.append(span);
    });
  }

  async function derive() {
    const baseId = $("derive-base").value;
    const steps = [];
    const other = $("derive-other").value;
    if (other) steps.push({ op: "join", dataset_id: other, how: "inner" });
    const scale = $("derive-scale").value;
    if (scale) steps.push({ op: "scale", columns: [scale], method: "minmax", feature_range: [-1, 1] });
    const boxes = [...$("derive-keep").querySelectorAll("input[type=checkbox]")];
    const keep = boxes.filter((b) => b.checked).map((b) => b.value);
    if (keep.length && keep.length < boxes.length) steps.push({ op: "select", columns: keep });
    if (!steps.length) throw new Error("choose a join, a column to scale or the columns to keep");
    const ds = await sendJson("POST", `/datasets/${encodeURIComponent(baseId)}/derive`, {
      name: $("derive-name").value.trim(),
      steps,
    });
    showInfo(`derived ${ds.name}: ${ds.row_count} rows, columns ${ds.columns.map((c) => c.name).join(", ")}`);
    await loadDatasets();
    $("train-dataset").value = ds.id;
  }

  // ---- training, followed over Server-Sent Events read with fetch() --------------------------------
  function showJob(job) {
    const percent = job.progress && typeof job.progress.percent === "number" ? job.progress.percent : 0;
    const done = job.status === "Completed";
    $("train-progress").value = done ? 100 : percent;
    const parts = [`${job.name}: ${job.status}`];
    if (job.secondary_status) parts.push(job.secondary_status);
    parts.push(`${Math.round(done ? 100 : percent)}%`);
    if (job.failure_reason) parts.push(job.failure_reason);
    $("train-status").textContent = parts.join(" · ");
    $("train-status").dataset.status = job.status;
  }

  async function followJob(name) {
    const response = await request("GET", `/training-jobs/${encodeURIComponent(name)}/events`, {
      accept: "text/event-stream",
    });
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    let last = null;
    let eventName = "message";
    let data = [];
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      buffer += decoder.decode(value, { stream: true });
      let newline;
      while ((newline = buffer.indexOf("\n")) >= 0) {
        const line = buffer.slice(0, newline).replace(/\r$/, "");
        buffer = buffer.slice(newline + 1);
        if (line === "") {
          if (data.length) {
            const job = JSON.parse(data.join("\n"));
            if (job && job.name) {
              last = job;
              showJob(job);
            }
          }
          if (eventName === "end" || eventName === "timeout") {
            reader.cancel().catch(() => {});
            return last;
          }
          eventName = "message";
          data = [];
        } else if (line.startsWith("event:")) {
          eventName = line.slice(6).trim();
        } else if (line.startsWith("data:")) {
          data.push(line.slice(5).replace(/^ /, ""));
        }
      }
    }
    return last;
  }

  async function train() {
    const name = $("train-name").value.trim();
    const job = await sendJson("POST", "/training-jobs", {
      name,
      train_dataset_id: $("train-dataset").value,
      hyperparameters: { k: Number($("train-k").value) },
    });
    showJob(job);
    let final = await followJob(job.name);
    if (!final || !["Completed", "Failed", "Stopped"].includes(final.status)) {
      final = await getJson(`/training-jobs/${encodeURIComponent(job.name)}`);
      showJob(final);
    }
    $("train-name").value = uniqueName("job");
    if (final.status === "Completed" && final.model_id) {
      await loadModels();
      $("model-select").value = final.model_id;
      await showModel();
      showInfo(`training job ${final.name} completed: model ${final.model_id}`);
    } else {
      showError(new Error(`training job ${final.name}: ${final.status} ${final.failure_reason || ""}`));
    }
  }

  // ---- models and plots --------------------------------------------------------------------------
  async function loadModels() {
    state.models = (await getJson("/models?limit=100")).items;
    fillSelect($("model-select"), state.models, { value: (m) => m.id, label: (m) => `${m.name} (k=${m.k})` });
  }

  async function showModel() {
    const id = $("model-select").value;
    const body = $("model-metrics").tBodies[0];
    body.replaceChildren();
    if (!id) return;
    const model = await getJson(`/models/${encodeURIComponent(id)}`);
    const rows = [
      ["model", model.id],
      ["k", model.k],
      ["features", (model.feature_names || []).join(", ")],
      ["cluster sizes", (model.cluster_sizes || []).join(", ")],
    ];
    for (const [name, value] of Object.entries(model.metrics || {})) rows.push([name, value]);
    for (const [name, value] of rows) {
      const row = el("tr");
      row.append(el("th", name), el("td", value));
      body.append(row);
    }
  }

  async function showPlot() {
    const id = $("model-select").value;
    if (!id) throw new Error("no model selected");
    const kind = $("plot-kind").value;
    const blob = await (await request("GET", `/models/${encodeURIComponent(id)}/plots/${kind}.png`)).blob();
    if (state.plotUrl) URL.revokeObjectURL(state.plotUrl);
    state.plotUrl = URL.createObjectURL(blob);
    const img = $("plot");
    img.alt = `${kind} plot of the model`;
    img.src = state.plotUrl;
    img.hidden = false;
  }

  // ---- endpoints -------------------------------------------------------------------------------
  const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

  async function deploy() {
    const modelId = $("model-select").value;
    if (!modelId) throw new Error("no model selected");
    const name = $("deploy-name").value.trim();
    let endpoint = await sendJson("POST", "/endpoints", { name, model_id: modelId });
    const deadline = Date.now() + 120000;
    while (!["InService", "Failed"].includes(endpoint.status) && Date.now() < deadline) {
      $("endpoint-status").textContent = `${endpoint.name}: ${endpoint.status}`;
      await sleep(300);
      endpoint = await getJson(`/endpoints/${encodeURIComponent(name)}`);
    }
    $("endpoint-status").textContent = `${endpoint.name}: ${endpoint.status}${endpoint.failure_reason ? " · " + endpoint.failure_reason : ""}`;
    $("endpoint-status").dataset.status = endpoint.status;
    if (endpoint.status === "InService") state.endpoint = endpoint.name;
  }

  async function invoke() {
    if (!state.endpoint) throw new Error("deploy an endpoint first");
    const response = await request("POST", `/endpoints/${encodeURIComponent(state.endpoint)}/invocations`, {
      text: $("invoke-row").value.trim(),
    });
    const { predictions } = await response.json();
    const first = predictions[0];
    const out = $("invoke-result");
    out.textContent = `cluster ${first.closest_cluster} (distance ${Number(first.distance_to_cluster).toFixed(3)})`;
    out.dataset.cluster = String(first.closest_cluster);
  }

  // ---- assignments -------------------------------------------------------------------------------
  async function loadAssignments() {
    const id = $("model-select").value;
    if (!id) throw new Error("no model selected");
    const data = await getJson(`/models/${encodeURIComponent(id)}/assignments`);
    state.assignments = Object.entries(data.clusters).map(([key, cluster]) => ({
      key,
      cluster,
      distance: data.distances ? data.distances[key] : null,
    }));
    const counts = $("cluster-counts").tBodies[0];
    counts.replaceChildren();
    for (const [cluster, count] of Object.entries(data.counts).sort((a, b) => Number(a[0]) - Number(b[0]))) {
      const row = el("tr");
      row.append(el("td", cluster, "num"), el("td", count, "num"));
      counts.append(row);
    }
    renderAssignments();
  }

  function renderAssignments() {
    const { by, dir } = state.sort;
    const rows = [...state.assignments].sort((a, b) => {
      const x = a[by];
      const y = b[by];
      const order = typeof x === "number" && typeof y === "number" ? x - y : String(x).localeCompare(String(y));
      return order * dir || String(a.key).localeCompare(String(b.key));
    });
    const body = $("assignments-table").tBodies[0];
    body.replaceChildren();
    for (const r of rows) {
      const row = el("tr");
      const distance = r.distance === null || r.distance === undefined ? "" : Number(r.distance).toFixed(3);
      row.append(el("td", r.key), el("td", r.cluster, "num"), el("td", distance, "num"));
      body.append(row);
    }
    for (const button of document.querySelectorAll("#assignments-table th button")) {
      const active = button.dataset.sort === by;
      button.parentElement.setAttribute("aria-sort", active ? (dir > 0 ? "ascending" : "descending") : "none");
    }
  }

  function sortBy(column) {
    state.sort = { by: column, dir: state.sort.by === column ? -state.sort.dir : 1 };
    renderAssignments();
  }

  // ---- wiring ----------------------------------------------------------------------------------
  async function refreshAll() {
    await loadDatasets();
    await loadModels();
    await showModel();
  }

  function init() {
    $("key-form").addEventListener(
      "submit",
      action($("save-key"), async () => {
        const input = $("api-key");
        const key = input.value.trim();
        input.value = "";
        if (key) sessionStorage.setItem(KEY_STORE, key);
        else sessionStorage.removeItem(KEY_STORE);
        showKeyStatus();
        await refreshAll();
        showInfo("connected");
      }),
    );
    $("forget-key").addEventListener("click", () => {
      sessionStorage.removeItem(KEY_STORE);
      showKeyStatus();
    });
    $("upload-form").addEventListener("submit", action($("upload-submit"), upload));
    $("refresh").addEventListener("click", action($("refresh"), refreshAll));
    $("derive-base").addEventListener("change", refreshDeriveColumns);
    $("derive-other").addEventListener("change", refreshDeriveColumns);
    $("derive-form").addEventListener("submit", action($("derive-submit"), derive));
    $("train-form").addEventListener("submit", action($("train-submit"), train));
    $("model-select").addEventListener("change", action(null, showModel));
    $("show-plot").addEventListener("click", action($("show-plot"), showPlot));
    $("deploy-form").addEventListener("submit", action($("deploy-submit"), deploy));
    $("invoke-form").addEventListener("submit", action($("invoke-submit"), invoke));
    $("load-assignments").addEventListener("click", action($("load-assignments"), loadAssignments));
    for (const button of document.querySelectorAll("#assignments-table th button")) {
      button.addEventListener("click", () => sortBy(button.dataset.sort));
    }
    $("train-name").value = uniqueName("job");
    $("deploy-name").value = uniqueName("endpoint");
    $("derive-name").value = uniqueName("derived");
    showKeyStatus();
    action(null, refreshAll)().then(() => {
      document.body.dataset.ready = "true"; // the first load is done (tests wait for it)
    });
  }

  document.addEventListener("DOMContentLoaded", init);
})();
