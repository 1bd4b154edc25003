// Small time-series charts drawn as inline SVG (no chart library): a line over the last hour,
// gaps where there was no data, the latest value and the maximum as text beside it.

const NS = "http://www.w3.org/2000/svg";

function svg(tag, attrs) {
  const el = document.createElementNS(NS, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

// series: [{values: [number|null], class: "line-a"}]; label: the accessible name
export function spark(series, { width = 160, height = 36, label = "", max } = {}) {
  const root = svg("svg", {
    viewBox: `0 0 ${width} ${height}`,
    width,
    height,
    role: "img",
    class: "spark",
    "aria-label": label,
  });
  const title = svg("title", {});
  title.textContent = label;
  root.append(title);
  const all = series.flatMap((s) => s.values.filter((v) => v !== null && v !== undefined));
  const top = max ?? Math.max(0, ...all);
  const n = Math.max(1, ...series.map((s) => s.values.length));
  const x = (i) => (n === 1 ? width : (i / (n - 1)) * (width - 2) + 1);
  const y = (v) => (top > 0 ? height - 2 - (v / top) * (height - 4) : height - 2);
  root.append(svg("line", { x1: 0, y1: height - 1, x2: width, y2: height - 1, class: "axis" }));
  for (const s of series) {
    let d = "";
    let pen = false;
    s.values.forEach((v, i) => {
      if (v === null || v === undefined) {
        pen = false;
        return;
      }
      d += `${pen ? "L" : "M"}${x(i).toFixed(1)},${y(v).toFixed(1)}`;
      pen = true;
    });
    if (d) root.append(svg("path", { d, class: `line ${s.class || ""}` }));
  }
  return root;
}

// the last value that is not null (the newest bucket may still be empty)
export function latest(values) {
  for (let i = values.length - 1; i >= 0; i--) if (values[i] !== null) return values[i];
  return null;
}

// a left-to-right graph of named boxes; edges [from, to] (a pipeline's nodes, a model's steps)
export function graph(nodes, edges, { label = "graph" } = {}) {
  const depth = new Map(nodes.map((n) => [n.id, 0]));
  for (let pass = 0; pass < nodes.length; pass++) {
    for (const [a, b] of edges) {
      if (depth.has(a) && depth.has(b) && depth.get(b) <= depth.get(a)) depth.set(b, depth.get(a) + 1);
    }
  }
  const columns = [];
  for (const n of nodes) (columns[depth.get(n.id)] ||= []).push(n);
  const bw = 130, bh = 40, gx = 40, gy = 18;
  const rows = Math.max(1, ...columns.map((c) => (c ? c.length : 0)));
  const width = columns.length * (bw + gx);
  const height = rows * (bh + gy) + gy;
  const root = svg("svg", { viewBox: `0 0 ${width} ${height}`, width, height, role: "img", class: "graph", "aria-label": label });
  const title = svg("title", {});
  title.textContent = label;
  root.append(title);
  const at = new Map();
  columns.forEach((col, ci) =>
    (col || []).forEach((n, ri) => at.set(n.id, { x: ci * (bw + gx) + 4, y: gy + ri * (bh + gy) })),
  );
  for (const [a, b] of edges) {
    const p = at.get(a), q = at.get(b);
    if (!p || !q) continue;
    const x1 = p.x + bw, y1 = p.y + bh / 2, x2 = q.x, y2 = q.y + bh / 2;
    // an edge that skips a column arches over the boxes between instead of running behind them
    const d = x2 - x1 > gx + 1
      ? `M${x1},${y1} C${x1 + 30},${p.y - 14} ${x2 - 30},${q.y - 14} ${x2},${y2}`
      : `M${x1},${y1} L${x2},${y2}`;
    root.append(svg("path", { d, class: "edge" }));
  }
  for (const n of nodes) {
    const p = at.get(n.id);
    const g = svg("g", { class: `node ${n.kind || ""}` });
    g.append(svg("rect", { x: p.x, y: p.y, width: bw, height: bh, rx: 6 }));
    const t1 = svg("text", { x: p.x + 8, y: p.y + 16 });
    t1.textContent = n.id.length > 18 ? `${n.id.slice(0, 17)}…` : n.id;
    const t2 = svg("text", { x: p.x + 8, y: p.y + 32, class: "sub" });
    t2.textContent = (n.sub || "").slice(0, 20);
    g.append(t1, t2);
    root.append(g);
  }
  return root;
}
