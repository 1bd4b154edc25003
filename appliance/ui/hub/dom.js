// Building DOM nodes from data: text always goes in as text (device ids and errors come from
// devices), never as HTML; no inline styles (the page's CSP forbids them).
export function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === undefined || c === null) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const SVG = "http://www.w3.org/2000/svg";

// A stacked horizontal bar: parts [{key, value}], drawn in proportion to `total`.
export function bar(parts, total, label) {
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", "0 0 100 10");
  svg.setAttribute("preserveAspectRatio", "none");
  svg.setAttribute("class", "bar");
  svg.setAttribute("role", "img");
  svg.setAttribute("aria-label", label);
  const bg = document.createElementNS(SVG, "rect");
  bg.setAttribute("width", "100");
  bg.setAttribute("height", "10");
  bg.setAttribute("class", "bar-bg");
  svg.append(bg);
  let x = 0;
  for (const { key, value } of parts) {
    if (!value || !total) continue;
    const w = (100 * value) / total;
    const r = document.createElementNS(SVG, "rect");
    r.setAttribute("x", String(x));
    r.setAttribute("width", String(w));
    r.setAttribute("height", "10");
    r.setAttribute("class", `seg-${key}`);
    svg.append(r);
    x += w;
  }
  return svg;
}

export function ago(iso, now = Date.now()) {
  if (!iso) return { text: "never", seconds: Infinity };
  const s = Math.max(0, Math.round((now - Date.parse(iso)) / 1000));
  let text;
  if (s < 90) text = `${s} s ago`;
  else if (s < 5400) text = `${Math.round(s / 60)} min ago`;
  else if (s < 172800) text = `${Math.round(s / 3600)} h ago`;
  else text = `${Math.round(s / 86400)} days ago`;
  return { text, seconds: s };
}

export function duration(seconds) {
  const s = Math.abs(seconds);
  const sign = seconds < 0 ? "-" : "";
  if (s < 3600) return `${sign}${Math.round(s / 60)} min`;
  if (s < 172800) return `${sign}${(s / 3600).toFixed(1)} h`;
  return `${sign}${(s / 86400).toFixed(1)} days`;
}

export function bytes(n) {
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let i = 0;
  let v = n;
  while (v >= 1024 && i < units.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${i ? v.toFixed(1) : v} ${units[i]}`;
}

export function versions(map) {
  const entries = Object.entries(map || {});
  return entries.length ? entries.map(([m, v]) => `${m} ${v}`).join(", ") : "–";
}
