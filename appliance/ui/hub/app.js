// The fleet dashboard: devices, rollouts (progress per group, actions), models, TUF expiry.
// Everything shown comes from the admin JSON API (README "Hub dashboard"), refreshed every 5 s.
import { AuthError, get, post, setToken, token } from "./api.js";
import { ago, bar, bytes, duration, h, versions } from "./dom.js";

const REFRESH_MS = 5000;
// Last seen: fresh under 3 minutes, stale under 15, then lost (devices poll every minute by default).
const FRESH_S = 180;
const STALE_S = 900;
const STAGES = [
  ["active", "active"],
  ["downloading", "downloading"],
  ["waiting", "waiting"],
  ["failed", "failed"],
  ["rolled_back", "rolled back"],
];

const $ = (sel) => document.querySelector(sel);
const state = { devices: [], selected: null, events: [], models: [], edits: {}, timer: null };

// -- auth ---------------------------------------------------------------------------------------
function askToken(reason) {
  setToken(null);
  clearTimeout(state.timer);
  for (const v of document.querySelectorAll(".view")) v.hidden = true;
  $("#warnings").replaceChildren();
  $("#error").hidden = true;
  $("#logout").hidden = true;
  $("#login").hidden = false;
  $("#login-reason").textContent = reason || "";
  $("#token").focus();
}

$("#login-form").addEventListener("submit", (ev) => {
  ev.preventDefault();
  setToken($("#token").value.trim());
  $("#token").value = "";
  start();
});

$("#logout").addEventListener("click", () => askToken("Token forgotten."));

// -- views --------------------------------------------------------------------------------------
function currentView() {
  const name = location.hash.slice(1);
  return ["devices", "rollouts", "models", "metadata"].includes(name) ? name : "devices";
}

function showView() {
  const name = currentView();
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== `view-${name}`;
  for (const a of document.querySelectorAll("nav a")) {
    if (a.dataset.view === name) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
}

window.addEventListener("hashchange", () => {
  if (token()) showView();
});

function showError(err) {
  if (err instanceof AuthError) {
    askToken(`The hub refused the token: ${err.message}. Enter the admin token.`);
    return;
  }
  $("#error").textContent = String(err.message || err);
  $("#error").hidden = false;
}

// -- devices ------------------------------------------------------------------------------------
function staleness(iso) {
  const { text, seconds } = ago(iso);
  const level = seconds < FRESH_S ? "fresh" : seconds < STALE_S ? "stale" : "lost";
  return h("span", { class: `seen seen-${level}`, "data-level": level }, text,
    level === "fresh" ? "" : ` (${level})`);
}

function renderDevices() {
  const q = $("#device-search").value.trim().toLowerCase();
  const rows = state.devices.filter((d) => !q || JSON.stringify([d.device_id, d.group, d.active,
    d.pending, d.last_error, d.tuf]).toLowerCase().includes(q));
  $("#device-count").textContent = `${rows.length} of ${state.devices.length} devices`;
  $("#devices tbody").replaceChildren(...rows.map((d) => h("tr", { "data-device": d.device_id },
    h("td", {}, h("button", { type: "button", class: "link", onclick: () => openDevice(d.device_id) },
      d.device_id)),
    h("td", {}, d.group),
    h("td", {}, staleness(d.last_seen)),
    h("td", { "data-field": "active" }, versions(d.active)),
    h("td", { "data-field": "pending" }, versions(d.pending)),
    h("td", { class: d.last_error ? "err" : "" }, d.last_error || "–"),
    h("td", {}, d.tuf || "–"))));
}

async function openDevice(id) {
  state.selected = id;
  state.events = [];
  await loadEvents();
  $("#timeline").hidden = false;
  $("#timeline-title").focus();
}

// The selected device's events: only those after the last one seen are fetched at each refresh.
const KEEP_EVENTS = 100;

async function loadEvents() {
  if (!state.selected) return;
  const id = state.selected;
  const after = state.events.length ? state.events[state.events.length - 1].seq : 0;
  const fresh = await get(`devices/${encodeURIComponent(id)}/events?after=${after}&limit=1000`);
  if (id !== state.selected) return;
  state.events = state.events.concat(fresh).slice(-KEEP_EVENTS);
  $("#timeline-title").textContent = `Events of ${id} (last ${state.events.length}, newest first)`;
  $("#timeline-title").setAttribute("tabindex", "-1");
  $("#events").replaceChildren(...state.events.slice().reverse().map((e) => h("li",
    { class: `ev ev-${e.kind}` },
    h("time", { datetime: e.time }, e.time), " ",
    h("strong", {}, e.kind), ` #${e.seq} `,
    h("code", {}, JSON.stringify(e.data)))));
}

$("#device-search").addEventListener("input", renderDevices);

// -- rollouts -----------------------------------------------------------------------------------
function targetText(t) {
  if (t.all) return "all devices";
  if (t.group) return `group ${t.group}`;
  return `devices ${(t.devices || []).join(", ")}`;
}

function confirmAction(text, label) {
  const dlg = $("#confirm");
  $("#confirm-text").textContent = text;
  $("#confirm-ok").textContent = label;
  dlg.returnValue = "";
  dlg.showModal();
  return new Promise((resolve) => {
    dlg.addEventListener("close", () => resolve(dlg.returnValue === "ok"), { once: true });
  });
}

async function act(r, action, body) {
  try {
    await post(`rollouts/${r.rollout}/${action}`, body);
    await refresh();
  } catch (err) {
    showError(err);
  }
}

function countsRow(label, c, scope) {
  return h("tr", { "data-group": scope },
    h("th", { scope: "row" }, label),
    h("td", { "data-count": "devices" }, c.devices),
    ...STAGES.map(([key]) => h("td", { "data-count": key }, c[key])),
    h("td", { "data-count": "error_rate" }, `${(100 * c.error_rate).toFixed(1)} %`),
    h("td", { class: "barcell" }, bar(STAGES.map(([key]) => ({ key, value: c[key] })), c.devices,
      `${label}: ${STAGES.map(([key, name]) => `${c[key]} ${name}`).join(", ")} of ${c.devices}`)));
}

function renderRollout(r) {
  const id = `pct-${r.rollout}`;
  const active = r.state === "active";
  const actions = h("div", { class: "actions" },
    h("label", { for: id }, "Percent"),
    h("input", { id, type: "number", min: 0, max: 100, value: state.edits[id] ?? r.percent,
      disabled: !active, oninput: (ev) => { state.edits[id] = ev.target.value; } }),
    h("button", { type: "button", disabled: !active, "data-action": "percent",
      id: `percent-${r.rollout}`,
      onclick: () => {
        delete state.edits[id];
        act(r, "percent", { percent: Number($(`#${id}`).value) });
      } }, "Set percentage"),
    h("button", { type: "button", disabled: !active, "data-action": "halt", id: `halt-${r.rollout}`,
      onclick: async () => {
        if (await confirmAction(`Halt rollout ${r.rollout} (${r.model} ${r.version})? Devices that run it keep it; no others get it.`, "Halt")) act(r, "halt");
      } }, "Halt"),
    h("button", { type: "button", class: "danger", disabled: r.state === "rolled_back",
      "data-action": "rollback", id: `rollback-${r.rollout}`,
      onclick: async () => {
        if (await confirmAction(`Roll back rollout ${r.rollout}? Every device it reached returns to the version of the previous rollout (${r.model} ${r.version} is withdrawn).`, "Roll back")) act(r, "rollback");
      } }, "Roll back"));
  return h("article", { class: `rollout state-${r.state}`, "data-rollout": r.rollout,
    "aria-labelledby": `title-${r.rollout}` },
    h("h3", { id: `title-${r.rollout}` }, `${r.rollout}: ${r.model} ${r.version} `,
      h("span", { class: `badge badge-${r.state}`, "data-field": "state" }, r.state.replace("_", " "))),
    h("p", {}, `${targetText(r.target)}, `, h("span", { "data-field": "percent" }, `${r.percent} %`),
      `, created ${r.created_at}, updated ${r.updated_at}`),
    h("table", { class: "progress" },
      h("caption", { class: "sr-only" }, `Progress of ${r.rollout} by group`),
      h("thead", {}, h("tr", {}, h("th", { scope: "col" }, "Group"), h("th", { scope: "col" }, "Devices"),
        ...STAGES.map(([, name]) => h("th", { scope: "col" }, name)),
        h("th", { scope: "col" }, "Error rate"), h("th", { scope: "col" }, "Progress"))),
      h("tbody", {}, ...r.groups.map((g) => countsRow(g.group, g, g.group)),
        countsRow("all groups", r.total, "*"))),
    actions);
}

$("#create-rollout").addEventListener("submit", async (ev) => {
  ev.preventDefault();
  const [model, version] = JSON.parse($("#ro-model").value);
  const kind = $("#ro-kind").value;
  const value = $("#ro-value").value.trim();
  const target = kind === "all" ? { all: true } : kind === "group" ? { group: value }
    : { devices: value.split(",").map((s) => s.trim()).filter(Boolean) };
  try {
    await post("rollouts", { model, version, target, percent: Number($("#ro-percent").value) });
    location.hash = "#rollouts";
    await refresh();
  } catch (err) {
    showError(err);
  }
});

// -- models -------------------------------------------------------------------------------------
function renderModels() {
  const sel = $("#ro-model");
  const chosen = sel.value;
  sel.replaceChildren(...state.models.map((m) => h("option",
    { value: JSON.stringify([m.name, m.version]) }, `${m.name} ${m.version}`)));
  if (chosen) sel.value = chosen;
  $("#models tbody").replaceChildren(...state.models.map((m) => h("tr",
    { "data-model": `${m.name}/${m.version}` },
    h("td", {}, m.name), h("td", {}, m.version), h("td", {}, m.backend || "–"),
    h("td", {}, bytes(m.length)), h("td", { "data-field": "acceptance" }, m.acceptance_cases),
    h("td", {}, h("code", { title: m.sha256 }, m.sha256.slice(0, 12))),
    h("td", {}, m.created_at),
    h("td", {}, h("button", { type: "button", onclick: () => openModel(m.name, m.version) },
      `Show ${m.name} ${m.version}`)))));
}

async function openModel(name, version) {
  try {
    const d = await get(`models/${encodeURIComponent(name)}/${encodeURIComponent(version)}`);
    $("#model-detail-title").textContent = `${d.name} ${d.version} (${d.backend}, ${d.target})`;
    $("#acceptance-count").textContent = `${d.acceptance.length} acceptance case(s), run by each device before it activates this version.`;
    $("#acceptance").textContent = JSON.stringify(d.acceptance, null, 2);
    $("#manifest").textContent = JSON.stringify(d.manifest, null, 2);
    $("#model-detail").hidden = false;
  } catch (err) {
    showError(err);
  }
}

// -- metadata -----------------------------------------------------------------------------------
const HINTS = {
  root: ": renew it with the offline root key (appliance hub rotate-key root)",
  targets: ": publishing re-signs it; the hub re-signs it itself at half its life",
  snapshot: ": the running hub re-signs it; check the hub's log",
  timestamp: ": the running hub re-signs it; check the hub's log",
};
function renderMetadata(meta) {
  const warnings = [];
  $("#metadata tbody").replaceChildren(...Object.entries(meta.roles).map(([role, m]) => {
    const level = m.expired ? "expired" : m.warning ? "expiring soon" : "ok";
    if (level !== "ok") warnings.push(`${role} metadata ${level === "expired" ? "has expired" : `expires in ${duration(m.seconds_left)}`} (${m.expires})${HINTS[role]}`);
    return h("tr", { "data-role": role },
      h("th", { scope: "row" }, role), h("td", {}, m.expires),
      h("td", {}, duration(m.seconds_left)),
      h("td", { class: `meta-${level.replace(" ", "-")}` }, level));
  }));
  $("#warnings").replaceChildren(...warnings.map((w) => h("p", { class: "warning" }, `Warning: ${w}`)));
}

// -- loop ---------------------------------------------------------------------------------------
async function refresh() {
  clearTimeout(state.timer);
  try {
    const [devices, progress, models, meta] = await Promise.all([
      get("devices"), get("rollouts/progress"), get("models"), get("metadata")]);
    state.devices = devices;
    state.models = models;
    renderDevices();
    // Re-rendered in place: a half-typed percentage and the keyboard focus survive it.
    const focused = document.activeElement && document.activeElement.id;
    $("#rollouts").replaceChildren(...(progress.length ? progress.map(renderRollout)
      : [h("p", {}, "No rollouts yet.")]));
    if (focused && document.activeElement === document.body) {
      const again = document.getElementById(focused);
      if (again) again.focus();
    }
    renderModels();
    renderMetadata(meta);
    await loadEvents();
    $("#error").hidden = true;
    $("#updated").textContent = `Updated ${new Date().toLocaleTimeString()}`;
    document.body.dataset.loaded = String(Number(document.body.dataset.loaded || 0) + 1);
  } catch (err) {
    showError(err);
    if (err instanceof AuthError) return;
  }
  state.timer = setTimeout(refresh, REFRESH_MS);
}

function start() {
  if (!token()) {
    askToken("");
    return;
  }
  $("#login").hidden = true;
  $("#logout").hidden = false;
  showView();
  refresh();
}

start();
