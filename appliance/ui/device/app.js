// The device status page: #/ is the overview (polled every 5 s), #/models/NAME a model's page.
// It reads only documented endpoints: api/status, api/models/NAME, v2/..., and posts the
// admin actions api/models/NAME/activate and .../rollback.

import { AuthError, call, setToken, token } from "../common/api.js";
import { spark, latest, graph } from "../common/chart.js";
import { h, append, clear, fmt, duration, when } from "../common/dom.js";

const $ = (id) => document.getElementById(id);
const POLL_MS = 5000;
let timer = null;

function problem(message) {
  const el = $("problem");
  el.hidden = !message;
  el.textContent = message || "";
}

function needToken(message) {
  $("auth").hidden = false;
  $("auth-message").textContent = token()
    ? "The token was refused: enter the right one."
    : message || "This device needs its bearer token to show its status.";
  clear($("view"));
  $("token-input").focus();
}

async function guarded(work) {
  try {
    await work();
    problem("");
  } catch (err) {
    if (err instanceof AuthError) needToken(err.message);
    else problem(err.message);
  }
}

// -- overview --------------------------------------------------------------------------------
function header(s) {
  const a = s.appliance;
  $("build").textContent =
    `${a.hostname} · version ${a.version} (${a.revision}) · up ${duration(a.uptime_s)} · ` +
    (a.ready ? "ready" : "not ready");
}

function statusBadge(status) {
  const cls = status === "ready" ? "ok" : status === "loading" ? "warn-text" : "bad";
  return h("span", { class: `badge ${cls}` }, status);
}

function charts(name, series) {
  if (!series) return "";
  const p50 = latest(series.p50_ms), p99 = latest(series.p99_ms);
  return h("div", { class: "charts" },
    h("div", { class: "chart" },
      spark([{ values: series.rate }], { label: `${name}: requests per second, last hour` }),
      h("span", {}, `req/s, now ${fmt(latest(series.rate))}`)),
    h("div", { class: "chart" },
      spark([{ values: series.p50_ms }, { values: series.p99_ms, class: "b" }],
        { label: `${name}: p50 and p99 latency in ms, last hour` }),
      h("span", {}, h("span", { class: "legend-a" }, "p50"), " / ", h("span", { class: "legend-b" }, "p99"),
        ` ms ${fmt(p50)} / ${fmt(p99)}`)),
    h("div", { class: "chart" },
      spark([{ values: series.error_rate, class: "b" }], { label: `${name}: error rate, last hour`, max: 1 }),
      h("span", {}, "5xx share")));
}

function modelsCard(s) {
  const rows = s.models.map((m) => {
    const w = m.last_5m;
    const batch = m.batch && m.batch.mean !== null ? fmt(m.batch.mean) : "–";
    return [
      h("tr", { "data-model": m.name },
        h("th", { scope: "row" }, h("a", { href: `#/models/${encodeURIComponent(m.name)}` }, m.name)),
        h("td", { "data-field": "kind" }, m.kind),
        h("td", { "data-field": "version" }, m.version),
        h("td", { "data-field": "backend" }, m.backend),
        h("td", { "data-field": "status" }, statusBadge(m.status)),
        h("td", { "data-field": "device", title: m.runtime_detail || "" },
          m.device || "–", m.fallback_reason ? h("span", { class: "warn-text" }, " (fallback)") : ""),
        h("td", { class: "num", "data-field": "queue_depth" }, m.queue_depth),
        h("td", { class: "num", "data-field": "batch" }, batch),
        h("td", { class: "num", "data-field": "requests" }, w.requests),
        h("td", { class: "num", "data-field": "rate" }, fmt(w.rate, 3)),
        h("td", { class: "num", "data-field": "p50_ms" }, fmt(w.p50_ms, 3)),
        h("td", { class: "num", "data-field": "p99_ms" }, fmt(w.p99_ms, 3)),
        h("td", { class: "num", "data-field": "error_rate" }, fmt(w.error_rate, 4))),
      h("tr", { class: "chart-row" }, h("td", { colspan: 13 }, charts(m.name, m.series),
        m.reason ? h("span", { class: "bad" }, ` ${m.reason}`) : "")),
    ];
  });
  return h("section", { class: "card", "aria-labelledby": "models-h" },
    h("h2", { id: "models-h" }, "Models and pipelines"),
    h("p", { class: "muted" }, `Numbers over the last ${s.window_s / 60} minutes; charts over the last hour.`),
    h("table", {},
      h("thead", {}, h("tr", {}, ...["name", "kind", "version", "backend", "status", "device"].map((t) => h("th", { scope: "col" }, t)),
        ...["queue", "batch (mean)", "requests", "req/s", "p50 ms", "p99 ms", "error rate"].map((t) => h("th", { scope: "col", class: "num" }, t)))),
      h("tbody", {}, rows)));
}

function tasksCard(s) {
  if (!s.tasks.length) return "";
  return h("section", { class: "card", "aria-labelledby": "tasks-h" },
    h("h2", { id: "tasks-h" }, "Tasks"),
    h("table", {},
      h("thead", {}, h("tr", {}, ...["name", "variants", "fallback", "serving now"].map((t) => h("th", { scope: "col" }, t)),
        ...["requests", "req/s", "p50 ms", "p99 ms", "error rate"].map((t) => h("th", { scope: "col", class: "num" }, t)))),
      h("tbody", {}, s.tasks.map((t) => [
        h("tr", { "data-task": t.name },
          h("th", { scope: "row" }, t.name),
          h("td", { class: "wrap" }, t.variants.map((v) => `${v.model}${v.version ? "/" + v.version : ""} ×${v.weight}`).join(", ")),
          h("td", {}, t.fallback || "–"),
          h("td", { "data-field": "serving" }, t.serving || "–"),
          h("td", { class: "num", "data-field": "requests" }, t.last_5m.requests),
          h("td", { class: "num", "data-field": "rate" }, fmt(t.last_5m.rate, 3)),
          h("td", { class: "num", "data-field": "p50_ms" }, fmt(t.last_5m.p50_ms, 3)),
          h("td", { class: "num", "data-field": "p99_ms" }, fmt(t.last_5m.p99_ms, 3)),
          h("td", { class: "num", "data-field": "error_rate" }, fmt(t.last_5m.error_rate, 4))),
        h("tr", {}, h("td", { colspan: 9 }, charts(t.name, t.series))),
      ]))));
}

function deviceCard(s) {
  const d = s.device;
  return h("section", { class: "card", "aria-labelledby": "device-h" },
    h("h2", { id: "device-h" }, "Device"),
    h("dl", {},
      h("dt", {}, "Runs on"), h("dd", { id: "device-runs-on" }, d.accelerated ? `accelerator (${d.models_on_accelerator.join(", ")})` : "CPU only"),
      h("dt", {}, "Fallbacks"), h("dd", {}, d.fallbacks.length
        ? d.fallbacks.map((f) => h("div", { class: "warn-text" }, `${f.model}: ${f.reason}`))
        : "none"),
      h("dt", {}, "Platform"), h("dd", {}, `${s.appliance.platform}, Python ${s.appliance.python}`),
      h("dt", {}, "Started"), h("dd", {}, new Date(s.appliance.started_at * 1000).toLocaleString())));
}

function mqttCard(s) {
  const m = s.mqtt;
  const body = !m.enabled
    ? h("p", { class: "muted" }, "MQTT is off (no [mqtt] url).")
    : h("dl", {},
      h("dt", {}, "Broker"), h("dd", {}, m.broker, " ", h("span", { class: `badge ${m.connected ? "ok" : "bad"}`, id: "mqtt-state" }, m.connected ? "connected" : "disconnected")),
      h("dt", {}, "Subscribed"), h("dd", {}, m.subscriptions.join(", ")),
      h("dt", {}, "Status topic"), h("dd", {}, m.status_topic),
      h("dt", {}, "Messages"), h("dd", {}, Object.entries(m.messages).map(([k, v]) => `${k}: ${v}`).join(", ") || "none"));
  return h("section", { class: "card", "aria-labelledby": "mqtt-h" }, h("h2", { id: "mqtt-h" }, "MQTT"), body);
}

function syncCard(s) {
  const y = s.sync;
  let body;
  if (!y) body = h("p", { class: "muted" }, "Not syncing with a hub (no [hub] url).");
  else {
    const progress = Object.entries(y.progress || {}).map(([k, p]) => {
      const done = typeof p === "object" && p ? p.bytes ?? p.done : p;
      const total = typeof p === "object" && p ? p.total ?? p.size : null;
      return h("div", {}, `${k}${p && p.version ? " " + p.version : ""}: `, total ? h("progress", { max: total, value: done, "aria-label": `download of ${k}` }) : "", ` ${fmt(done)}${total ? " / " + total : ""}`);
    });
    const pairs = (o) => Object.entries(o || {}).map(([k, v]) => `${k} → ${typeof v === "object" ? JSON.stringify(v) : v}`).join("; ") || "none";
    body = h("dl", {},
      h("dt", {}, "Hub"), h("dd", {}, y.hub, ` (device ${y.device_id})`),
      h("dt", {}, "State"), h("dd", { id: "sync-state" }, y.state, ` · TUF ${y.tuf}`),
      h("dt", {}, "Last check"), h("dd", {}, y.last_check || "never", y.last_error ? h("span", { class: "bad" }, ` · ${y.last_error}`) : ""),
      h("dt", {}, "Downloads"), h("dd", {}, progress.length ? progress : "none"),
      h("dt", {}, "Pending"), h("dd", {}, pairs(y.pending)),
      h("dt", {}, "Refused"), h("dd", { class: "wrap" }, pairs(y.rejected)),
      h("dt", {}, "Outbox"), h("dd", {}, `${y.outbox.events} events, ${y.outbox.bytes} bytes, ${y.outbox.dropped} dropped`));
  }
  return h("section", { class: "card", "aria-labelledby": "sync-h" }, h("h2", { id: "sync-h" }, "Fleet sync"), body);
}

function errorsCard(s) {
  return h("section", { class: "card", "aria-labelledby": "errors-h" },
    h("h2", { id: "errors-h" }, "Last errors"),
    s.errors.length
      ? h("table", { id: "errors" },
        h("thead", {}, h("tr", {}, ...["time", "status", "name", "path", "message", "request id"].map((t) => h("th", { scope: "col" }, t)))),
        h("tbody", {}, s.errors.map((e) => h("tr", {},
          h("td", {}, when(e.time)), h("td", {}, e.status), h("td", {}, e.name || "–"),
          h("td", {}, e.path), h("td", { class: "wrap" }, e.message), h("td", {}, e.request_id)))))
      : h("p", { class: "muted" }, "None since start."));
}

async function overview() {
  const s = await call("api/status?series=360");
  $("auth").hidden = true;
  header(s);
  const view = clear($("view"));
  append(view, [
    modelsCard(s), tasksCard(s),
    h("div", { class: "grid" }, deviceCard(s), mqttCard(s), syncCard(s)),
    errorsCard(s),
  ]);
  view.dataset.loaded = String(s.time);
}

// -- a model's page --------------------------------------------------------------------------
function stepsGraph(meta) {
  const p = meta.parameters || {};
  if (Array.isArray(p.nodes)) {
    const nodes = [{ id: "request", kind: "io", sub: "inputs" }];
    const edges = [];
    for (const n of p.nodes) {
      nodes.push({ id: n.name, kind: n.model ? "" : "step", sub: n.model ? `model ${n.model}` : `step ${(n.step || {}).type || ""}` });
      for (const refs of Object.values(n.inputs || {})) {
        for (const ref of [refs].flat()) edges.push([String(ref).split(".")[0], n.name]);
      }
    }
    return graph(nodes, edges, { label: `pipeline graph of ${meta.name}` });
  }
  const chain = [{ id: "inputs", kind: "io", sub: meta.inputs.map((i) => i.name).join(", ") }];
  const stepList = (side) => ((p.steps || {})[side] || []).map((s, i) => ({ id: s.name || `${side} ${i + 1}`, kind: "step", sub: s.type }));
  // `steps` lists every step; `preprocess`/`postprocess` are summaries of some of them
  if (!p.steps && p.preprocess) chain.push({ id: "preprocess", kind: "step", sub: p.preprocess.type || "image" });
  chain.push(...stepList("input"));
  chain.push({ id: meta.name, sub: meta.platform });
  chain.push(...stepList("output"));
  if (!p.steps && p.postprocess) chain.push({ id: "postprocess", kind: "step", sub: p.postprocess.type || "" });
  chain.push({ id: "outputs", kind: "io", sub: meta.outputs.map((o) => o.name).join(", ") });
  const edges = chain.slice(1).map((n, i) => [chain[i].id, n.id]);
  return graph(chain, edges, { label: `processing steps of ${meta.name}` });
}

function tensorTable(list) {
  return h("table", {},
    h("thead", {}, h("tr", {}, ...["name", "datatype", "shape"].map((t) => h("th", { scope: "col" }, t)))),
    h("tbody", {}, list.map((t) => h("tr", {}, h("td", {}, t.name), h("td", {}, t.datatype), h("td", {}, JSON.stringify(t.shape))))));
}

function example(meta) {
  const inputs = meta.inputs.map((t) => {
    const shape = t.shape.map((d) => (d < 0 ? 1 : d));
    const count = shape.reduce((a, b) => a * b, 1);
    const value = t.datatype === "BYTES" ? "hello" : t.datatype === "BOOL" ? false : 0;
    return { name: t.name, datatype: t.datatype, shape, data: Array(Math.min(count, 100000)).fill(value) };
  });
  return JSON.stringify({ inputs }, null, 1);
}

function versionsCard(name, stored, refresh) {
  if (!stored) return h("section", { class: "card" }, h("h2", {}, "Versions"), h("p", { class: "muted" }, "Served from a file, not a model store: no versions to switch."));
  const act = (path, body, button) => async () => {
    button.disabled = true;
    await guarded(async () => {
      const r = await call(`api/models/${encodeURIComponent(name)}/${path}`, { method: "POST", body });
      $("switch-result").textContent = `${r.name} now serves version ${r.version}`;
      await refresh();
    });
    button.disabled = false;
  };
  const rows = [...stored.versions].reverse().map((v) => {
    const active = v === stored.active;
    const button = h("button", { type: "button", class: "secondary", "data-activate": v, disabled: active, "aria-label": `activate version ${v}` }, "Activate");
    button.addEventListener("click", act("activate", { version: v }, button));
    return h("tr", { "data-version": v }, h("td", {}, v), h("td", {}, active ? h("span", { class: "badge ok" }, "active") : stored.history.includes(v) ? "earlier" : ""), h("td", {}, button));
  });
  const back = h("button", { type: "button", id: "rollback", disabled: !stored.history.length }, "Roll back");
  back.addEventListener("click", act("rollback", undefined, back));
  return h("section", { class: "card versions", "aria-labelledby": "versions-h" },
    h("h2", { id: "versions-h" }, "Versions"),
    h("table", {}, h("thead", {}, h("tr", {}, ...["version", "state", "action"].map((t) => h("th", { scope: "col" }, t)))), h("tbody", {}, rows)),
    h("p", { class: "actions" }, back, h("span", { id: "switch-result", role: "status" })),
    h("p", { class: "muted" }, "Switching loads and checks the new version while the old one serves (no gap)."));
}

function tryCard(meta, backend) {
  const p = meta.parameters || {};
  const answer = h("pre", { id: "try-answer", class: "answer", "aria-live": "polite", tabindex: 0 });
  const show = (data) => { answer.textContent = typeof data === "string" ? data : JSON.stringify(data, null, 1); };
  const run = (work) => async (ev) => {
    ev.preventDefault();
    answer.textContent = "…";
    try {
      show(await work());
    } catch (err) {
      if (err instanceof AuthError) needToken(err.message);
      else show(`error ${err.status || ""}: ${err.message}`);
    }
  };
  const base = `v2/models/${encodeURIComponent(meta.name)}`;
  const forms = [];
  const textual = backend === "gguf"; // a text model: the generate extension
  if (textual) {
    const prompt = h("textarea", { id: "try-prompt" }, "Hello");
    forms.push(h("form", { onsubmit: run(() => call(`${base}/generate`, { method: "POST", body: { text_input: prompt.value, parameters: { max_tokens: 32 } } })) },
      h("label", { for: "try-prompt" }, "Prompt (generate)"), prompt, h("button", { type: "submit" }, "Generate")));
  }
  if (p.preprocess || meta.inputs.some((i) => i.datatype === "BYTES" && meta.platform === "pipeline")) {
    const file = h("input", { id: "try-file", type: "file", accept: "image/*" });
    forms.push(h("form", { onsubmit: run(() => {
      const f = file.files[0];
      if (!f) throw new Error("choose a picture first");
      return call(`${base}/infer`, { method: "POST", body: f, type: f.type || "image/png" });
    }) }, h("label", { for: "try-file" }, "Picture"), file, h("button", { type: "submit" }, "Send picture")));
  }
  if (!textual && !p.preprocess) { // an image model takes the picture, not its tensor
    const body = h("textarea", { id: "try-body", spellcheck: "false" }, example(meta));
    forms.push(h("form", { onsubmit: run(() => {
      let parsed;
      try { parsed = JSON.parse(body.value); } catch (e) { throw new Error(`not JSON: ${e.message}`); }
      return call(`${base}/infer`, { method: "POST", body: parsed });
    }) }, h("label", { for: "try-body" }, "KServe v2 request (JSON)"), body, h("button", { type: "submit" }, "Send")));
  }
  return h("section", { class: "card try", "aria-labelledby": "try-h" }, h("h2", { id: "try-h" }, "Try it"), forms, h("h3", {}, "Answer"), answer);
}

async function modelPage(name) {
  const [status, meta] = await Promise.all([call("api/status?series=360"), call(`v2/models/${encodeURIComponent(name)}`)]);
  $("auth").hidden = true;
  header(status);
  const m = status.models.find((x) => x.name === name);
  let stored = null;
  if (m && m.stored) {
    try { stored = await call(`api/models/${encodeURIComponent(name)}`); } catch (err) { if (err instanceof AuthError) throw err; }
  }
  const view = clear($("view"));
  const p = meta.parameters || {};
  append(view, [
    h("p", {}, h("a", { href: "#/" }, "← all models")),
    h("section", { class: "card", "aria-labelledby": "model-h" },
      h("h2", { id: "model-h" }, `${name} `, statusBadge(p.status || (m ? m.status : "unknown"))),
      h("dl", {},
        h("dt", {}, "Version"), h("dd", { id: "model-version" }, meta.versions.join(", ")),
        h("dt", {}, "Backend"), h("dd", {}, meta.platform),
        h("dt", {}, "Device"), h("dd", {}, p.device || "–", p.runtime_detail ? ` (${p.runtime_detail})` : ""),
        p.fallback_reason ? [h("dt", {}, "Fallback"), h("dd", { class: "warn-text" }, p.fallback_reason)] : "",
        h("dt", {}, "sha256"), h("dd", {}, p.sha256 || "–")),
      m ? charts(name, m.series) : ""),
    h("div", { class: "grid" },
      h("section", { class: "card", "aria-labelledby": "in-h" }, h("h2", { id: "in-h" }, "Inputs"), tensorTable(meta.inputs)),
      h("section", { class: "card", "aria-labelledby": "out-h" }, h("h2", { id: "out-h" }, "Outputs"), tensorTable(meta.outputs))),
    h("section", { class: "card", "aria-labelledby": "steps-h" }, h("h2", { id: "steps-h" }, p.nodes ? "Pipeline graph" : "Steps"), stepsGraph(meta)),
    versionsCard(name, stored, () => modelPage(name)),
    tryCard(meta, m ? m.backend : meta.platform),
    stored ? h("section", { class: "card", "aria-labelledby": "manifest-h" }, h("h2", { id: "manifest-h" }, "Manifest"), h("pre", { id: "manifest", tabindex: 0 }, JSON.stringify(stored.manifest, null, 1))) : "",
  ]);
  view.dataset.loaded = String(status.time);
}

// -- routing ---------------------------------------------------------------------------------
async function route() {
  clearInterval(timer);
  timer = null;
  const hash = location.hash.replace(/^#/, "");
  const match = hash.match(/^\/models\/(.+)$/);
  if (match) {
    await guarded(() => modelPage(decodeURIComponent(match[1])));
  } else {
    await guarded(overview);
    timer = setInterval(() => { if ($("auth").hidden) guarded(overview); }, POLL_MS);
  }
}

$("auth-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setToken($("token-input").value.trim());
  $("token-input").value = "";
  $("auth").hidden = true;
  route();
});
$("token-button").addEventListener("click", () => needToken("Enter a bearer token for this device."));
window.addEventListener("hashchange", route);
route();
