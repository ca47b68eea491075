// forkvm web console: plain ES module, no framework, no build step. It uses only the daemon's
// public API (/v1, /metrics) with the token the user typed, kept in sessionStorage (this tab
// only), never in a URL. Everything the API returns is rendered with textContent (no HTML
// injection), and the page is served with a strict Content-Security-Policy.

const $ = (sel, root = document) => root.querySelector(sel);
const h = (tag, attrs = {}, ...kids) => {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (k === "class") el.className = v;
    else if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) el.setAttribute(k, v === true ? "" : v);
  }
  for (const kid of kids.flat()) if (kid !== null && kid !== undefined) el.append(kid);
  return el;
};
const SVG = "http://www.w3.org/2000/svg";
const s = (tag, attrs = {}, ...kids) => {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, v);
  for (const kid of kids) el.append(kid);
  return el;
};

const TOKEN_KEY = "forkvm-token";
const STATES = ["running", "paused", "hibernated", "creating", "crashed"];
const COLORS = { running: "#3ecf8e", paused: "#f5c451", hibernated: "#8f7cff", creating: "#5aa9ff", crashed: "#ff6b6b" };

const app = {
  token: sessionStorage.getItem(TOKEN_KEY) || "",
  sandboxes: new Map(), // id -> Sandbox
  templates: new Map(), // id -> Template
  cameUp: new Map(), // id -> how it last came up (from events)
  memory: new Map(), // id -> {private_bytes, shared_bytes, rss_bytes}
  events: [], // newest last, capped
  lastEventId: 0,
  view: "sandboxes",
  stream: null,
  asked: new Set(), // unknown sandbox ids already looked up
  gone: new Set(), // ids deleted while the list was loading
  complete: false, // every page of the sandbox list has arrived
  preview: null, // GET /v1/preview: {listen, domain}; a "preview" action when listen is set
};

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, { method = "GET", body } = {}) {
  const headers = { Authorization: `Bearer ${app.token}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const res = await fetch(path, { method, headers, body: body === undefined ? undefined : JSON.stringify(body) });
  const text = await res.text();
  let data = null;
  try { data = text ? JSON.parse(text) : null; } catch { data = null; }
  if (!res.ok) {
    const err = data && data.error ? data.error : { code: String(res.status), message: text || res.statusText };
    throw new ApiError(res.status, err.code, err.message);
  }
  return data ?? text;
}

function toast(msg, isError = false) {
  const t = $("#toast");
  t.textContent = msg;
  t.className = isError ? "error" : "";
  t.hidden = false;
  clearTimeout(toast.timer);
  toast.timer = setTimeout(() => { t.hidden = true; }, isError ? 8000 : 3000);
}

// ---------- sign in / out ----------

function explainAuth(e) {
  if (e.status === 401) return `That token was refused (401: ${e.message}). Create one with: forkvm token create --workspace NAME`;
  return `The daemon answered ${e.status}: ${e.message}`;
}

async function signIn(token) {
  app.token = token.trim();
  const err = $("#login-error");
  err.hidden = true;
  try {
    await reload();
  } catch (e) {
    app.token = "";
    sessionStorage.removeItem(TOKEN_KEY);
    err.textContent = e instanceof ApiError ? explainAuth(e) : `Cannot reach the daemon: ${e.message}`;
    err.hidden = false;
    return;
  }
  sessionStorage.setItem(TOKEN_KEY, app.token);
  app.preview = await api("/v1/preview").catch(() => null);
  $("#login").hidden = true;
  $("#tabs").hidden = false;
  $("#signout").hidden = false;
  $("#live").hidden = false;
  show(app.view);
  startEvents();
}

function signOut(message) {
  app.token = "";
  sessionStorage.removeItem(TOKEN_KEY);
  if (app.stream) app.stream.abort();
  app.sandboxes.clear();
  app.events = [];
  for (const v of document.querySelectorAll(".view")) v.hidden = true;
  $("#tabs").hidden = true;
  $("#signout").hidden = true;
  $("#live").hidden = true;
  $("#login").hidden = false;
  $("#token").value = "";
  if (message) {
    $("#login-error").textContent = message;
    $("#login-error").hidden = false;
  }
}

// ---------- data ----------

// Sign-in needs only the first page of sandboxes (it also proves the token): it is drawn at
// once, and the rest of the list, the templates and the memory report follow in the background.
async function reload() {
  app.complete = false;
  const first = await api("/v1/sandboxes?limit=100");
  app.sandboxes = new Map(first.sandboxes.map((sb) => [sb.id, sb]));
  scheduleRender();
  loadRest(first.next_cursor).catch((e) => toast(`Loading the sandboxes failed: ${e.message}`, true));
  api("/v1/templates")
    .then((t) => { app.templates = new Map(t.templates.map((x) => [x.id, x])); scheduleRender(); })
    .catch(() => {});
  refreshMemory().then(() => scheduleRender());
}

async function loadRest(cursor) {
  const all = new Map(app.sandboxes);
  while (cursor) {
    const page = await api(`/v1/sandboxes?${new URLSearchParams({ limit: "1000", cursor })}`);
    for (const sb of page.sandboxes) if (!all.has(sb.id)) all.set(sb.id, sb);
    cursor = page.next_cursor;
  }
  // Rows that changed meanwhile (events) keep their newer copy.
  for (const [id, sb] of all) if (!app.sandboxes.has(id) && !app.gone.has(id)) app.sandboxes.set(id, sb);
  app.complete = true;
  scheduleRender();
}

async function refreshMemory() {
  try {
    const m = await api("/v1/memory");
    app.memory = new Map(m.sandboxes.map((x) => [x.id, x]));
    app.memorySummary = m;
  } catch { app.memorySummary = null; }
}

function applyEvent(ev) {
  app.lastEventId = Math.max(app.lastEventId, ev.id);
  app.events.push(ev);
  if (app.events.length > 1000) app.events.splice(0, app.events.length - 1000);
  if (["created", "forked", "resumed", "woken", "readopted"].includes(ev.kind)) {
    app.cameUp.set(ev.sandbox, ev.kind === "readopted" ? "running" : ev.kind);
  }
  const sb = app.sandboxes.get(ev.sandbox);
  if (ev.kind === "deleted") {
    app.sandboxes.delete(ev.sandbox);
    app.gone.add(ev.sandbox);
  } else if (sb) {
    if (ev.to_state) sb.state = ev.to_state;
    sb.last_active_at = Math.max(sb.last_active_at, ev.ts);
  } else if (!app.asked.has(ev.sandbox)) {
    app.asked.add(ev.sandbox);
    api(`/v1/sandboxes/${encodeURIComponent(ev.sandbox)}`)
      .then((x) => { app.sandboxes.set(x.id, x); scheduleRender(); })
      .catch(() => {});
  }
  scheduleRender();
}

async function startEvents() {
  const ctl = new AbortController();
  app.stream = ctl;
  const live = $("#live");
  while (app.token && !ctl.signal.aborted) {
    try {
      const res = await fetch(`/v1/events?since=${app.lastEventId}`, {
        headers: { Authorization: `Bearer ${app.token}` },
        signal: ctl.signal,
      });
      if (res.status === 401) { signOut("The token is no longer valid (401)."); return; }
      if (!res.ok) throw new Error(`events: ${res.status}`);
      live.classList.remove("down");
      live.textContent = "live";
      const reader = res.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let i;
        while ((i = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, i);
          buf = buf.slice(i + 2);
          const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
          if (data) {
            try { applyEvent(JSON.parse(data)); } catch { /* not an event */ }
          }
        }
      }
    } catch (e) {
      if (ctl.signal.aborted) return;
    }
    live.classList.add("down");
    live.textContent = "reconnecting";
    await new Promise((r) => setTimeout(r, 1000));
  }
}

// ---------- actions ----------

function confirmDialog(text) {
  const d = $("#confirm");
  $("#confirm-text").textContent = text;
  d.returnValue = "";
  d.showModal();
  return new Promise((resolve) => d.addEventListener("close", () => resolve(d.returnValue === "ok"), { once: true }));
}

async function act(label, fn) {
  try {
    const r = await fn();
    toast(label + (r && r.came_up ? ` (came up: ${r.came_up}${r.wake_ms ? `, ${r.wake_ms.toFixed(1)} ms` : ""})` : ""));
    return r;
  } catch (e) {
    toast(`${label} failed: ${e.message}`, true);
    return null;
  }
}

const actions = {
  async fork(sb) {
    const r = await act(`forked ${sb.name}`, () => api(`/v1/sandboxes/${sb.id}/fork`, { method: "POST", body: { count: 1 } }));
    if (r) for (const c of r.sandboxes) { app.sandboxes.set(c.id, c); app.cameUp.set(c.id, "forked"); }
    scheduleRender();
  },
  pause: (sb) => act(`paused ${sb.name}`, () => api(`/v1/sandboxes/${sb.id}/pause`, { method: "POST" })),
  hibernate: (sb) => act(`hibernated ${sb.name}`, () => api(`/v1/sandboxes/${sb.id}/hibernate`, { method: "POST" })),
  resume: (sb) => act(`resumed ${sb.name}`, () => api(`/v1/sandboxes/${sb.id}/resume`, { method: "POST" })),
  async template(sb) {
    const r = await act(`template from ${sb.name}`, () => api("/v1/templates", { method: "POST", body: { sandbox: sb.id } }));
    if (r) app.templates.set(r.id, r);
    scheduleRender();
  },
  async delete(sb) {
    if (!(await confirmDialog(`Delete sandbox ${sb.name} (${sb.id})? Its memory and state are gone for good.`))) return;
    const r = await act(`deleted ${sb.name}`, () => api(`/v1/sandboxes/${sb.id}`, { method: "DELETE" }));
    if (r !== null) { app.sandboxes.delete(sb.id); scheduleRender(); }
  },
  preview(sb) {
    const d = $("#preview");
    $("#preview-name").textContent = sb.name;
    $("#preview-link").hidden = true;
    d.dataset.id = sb.id;
    d.showModal();
    $("#preview-port").focus();
  },
  exec(sb) {
    const d = $("#exec");
    $("#exec-name").textContent = sb.name;
    $("#exec-out").textContent = "";
    d.dataset.id = sb.id;
    d.showModal();
    $("#exec-line").focus();
  },
};

async function runExec(ev) {
  ev.preventDefault();
  const id = $("#exec").dataset.id;
  const line = $("#exec-line").value;
  if (!line) return;
  const out = $("#exec-out");
  out.textContent = `$ ${line}\n…`;
  try {
    const r = await api(`/v1/sandboxes/${id}/exec`, { method: "POST", body: { line } });
    const how = r.came_up === "running" ? "" : `  [came up: ${r.came_up}, ${r.wake_ms.toFixed(1)} ms]`;
    out.textContent = `$ ${line}${how}\n${r.lines.join("\n")}`;
  } catch (e) {
    out.textContent = `$ ${line}\nerror: ${e.message}`;
  }
}

// Asks the daemon for a link to the sandbox's port through its preview proxy (waking the
// sandbox happens when the link is opened). The link is shown, not followed automatically.
async function runPreview(ev) {
  ev.preventDefault();
  const id = $("#preview").dataset.id;
  const port = Number($("#preview-port").value);
  const a = $("#preview-link");
  a.hidden = true;
  if (!Number.isInteger(port) || port < 1 || port > 65535) { toast("the port must be 1 to 65535", true); return; }
  try {
    const r = await api(`/v1/sandboxes/${id}/ports/${port}/preview`, { method: "POST" });
    if (!/^https?:\/\//.test(r.url)) throw new Error("the daemon sent a link that is not http(s)");
    a.setAttribute("href", r.url);
    a.textContent = `open port ${port} of ${id}` + (r.token ? " (private: the link carries a preview token)" : "");
    a.hidden = false;
  } catch (e) {
    toast(`preview failed: ${e.message}`, true);
  }
}

async function openCreate() {
  const sel = $("#create-form select[name=template]");
  sel.replaceChildren(h("option", { value: "" }, "boot the test guest"));
  // Kernel images the host registered (forkvm serve --image): "image:NAME" values.
  const images = await api("/v1/images").then((x) => x.images).catch(() => []);
  for (const name of images) sel.append(h("option", { value: `image:${name}` }, `boot image ${name}`));
  for (const t of app.templates.values()) sel.append(h("option", { value: t.id }, `template ${t.name} (${t.memory_mib} MiB)`));
  const d = $("#create");
  d.returnValue = "";
  d.showModal();
  d.addEventListener("close", async () => {
    if (d.returnValue !== "ok") return;
    const f = new FormData($("#create-form"));
    const body = { privacy: f.get("privacy") };
    if (f.get("name")) body.name = f.get("name");
    const from = f.get("template");
    if (from && !from.startsWith("image:")) body.template = from;
    else {
      if (from) body.image = from.slice("image:".length);
      body.memory_mib = Number(f.get("memory_mib")) || 64;
    }
    const r = await act("created", () => api("/v1/sandboxes", { method: "POST", body }));
    if (r) { app.sandboxes.set(r.sandbox ? r.sandbox.id : r.id, r.sandbox || r); scheduleRender(); }
  }, { once: true });
}

// ---------- rendering ----------

function ago(ts) {
  const s = Math.max(0, Date.now() / 1000 - ts);
  if (s < 60) return `${Math.round(s)} s`;
  if (s < 3600) return `${Math.round(s / 60)} min`;
  if (s < 86400) return `${(s / 3600).toFixed(1)} h`;
  return `${(s / 86400).toFixed(1)} d`;
}

function mib(bytes) {
  if (bytes >= 1 << 30) return `${(bytes / (1 << 30)).toFixed(2)} GiB`;
  return `${(bytes / (1 << 20)).toFixed(1)} MiB`;
}

let renderQueued = false;
function scheduleRender() {
  if (renderQueued) return;
  renderQueued = true;
  requestAnimationFrame(() => { renderQueued = false; render(); });
}

function render() {
  if (!app.token) return;
  if (app.view === "sandboxes") renderTable();
  else if (app.view === "tree") renderTree();
  else if (app.view === "memory") renderMemory();
  else if (app.view === "latency") renderLatency();
  else if (app.view === "events") renderEvents();
}

function filtered() {
  const q = $("#search").value.trim().toLowerCase();
  const st = $("#state-filter").value;
  return [...app.sandboxes.values()].filter((sb) =>
    (!st || sb.state === st) && (!q || sb.name.toLowerCase().includes(q) || sb.id.toLowerCase().includes(q)));
}

function rowActions(sb) {
  const b = (name, label, enabled, cls) =>
    h("button", { "data-action": name, disabled: !enabled, class: cls }, label);
  const live = sb.state === "running" || sb.state === "paused";
  return [
    b("exec", "exec", sb.state !== "creating" && sb.state !== "crashed"),
    b("fork", "fork", sb.state !== "creating" && sb.state !== "crashed"),
    b("pause", "pause", sb.state === "running"),
    b("hibernate", "hibernate", live),
    b("resume", "resume", sb.state === "paused" || sb.state === "hibernated"),
    b("template", "template", live),
    app.preview && app.preview.listen ? b("preview", "preview", sb.state !== "creating" && sb.state !== "crashed") : null,
    b("delete", "delete", true, "danger"),
  ];
}

function tableRow(sb) {
  return h("tr", { "data-id": sb.id, "data-state": sb.state },
    h("td", {}, sb.name, h("span", { class: "id" }, sb.id)),
    h("td", {}, sb.workspace),
    h("td", {}, sb.privacy),
    h("td", {}, h("span", { class: `badge s-${sb.state}` }, sb.state)),
    h("td", {}, `${sb.memory_mib} MiB`),
    h("td", {}, String(sb.vcpus)),
    h("td", {}, ago(sb.created_at)),
    h("td", {}, ago(sb.last_active_at)),
    h("td", {}, app.cameUp.get(sb.id) || (sb.parent ? "forked" : "created")),
    h("td", { class: "actions" }, rowActions(sb)));
}

// The first screenful is drawn at once; the rest follows in slices, one per animation frame,
// so the page answers input while a long table fills (a newer render cancels the older one).
let tableGen = 0;
function renderTable() {
  const rows = filtered();
  $("#count").textContent = `${rows.length} of ${app.sandboxes.size}`;
  const body = $("#sandboxes tbody");
  const gen = ++tableGen;
  const FIRST = 100, SLICE = 300;
  const fill = (from, to) => {
    const frag = document.createDocumentFragment();
    for (const sb of rows.slice(from, to)) frag.append(tableRow(sb));
    return frag;
  };
  body.replaceChildren(fill(0, FIRST));
  if (rows.length && !performance.getEntriesByName("forkvm:first-rows").length) performance.mark("forkvm:first-rows");
  const more = (from) => {
    if (gen !== tableGen) return;
    if (from >= rows.length) {
      if (app.complete && !performance.getEntriesByName("forkvm:all-rows").length) performance.mark("forkvm:all-rows");
      return;
    }
    body.append(fill(from, from + SLICE));
    requestAnimationFrame(() => more(from + SLICE));
  };
  requestAnimationFrame(() => more(FIRST));
}

// A left-to-right tidy tree: leaves take consecutive rows, a parent sits between its first and
// last child. Templates are roots; a sandbox whose parent is not visible is a root too.
function renderTree() {
  const svg = $("#tree");
  const kids = new Map();
  const roots = [];
  const add = (parent, id) => { if (!kids.has(parent)) kids.set(parent, []); kids.get(parent).push(id); };
  for (const t of app.templates.values()) roots.push(`T:${t.id}`);
  for (const sb of app.sandboxes.values()) {
    if (sb.parent && app.sandboxes.has(sb.parent)) add(sb.parent, sb.id);
    else if (sb.template && app.templates.has(sb.template)) add(`T:${sb.template}`, sb.id);
    else roots.push(sb.id);
  }
  const ROW = 34, COL = 210, W = 170, H = 26;
  const pos = new Map();
  let row = 0, maxDepth = 0;
  const place = (id, depth) => {
    maxDepth = Math.max(maxDepth, depth);
    const children = kids.get(id) || [];
    let y;
    if (children.length === 0) y = row++ * ROW;
    else {
      const ys = children.map((c) => place(c, depth + 1));
      y = (ys[0] + ys[ys.length - 1]) / 2;
    }
    pos.set(id, { x: depth * COL, y });
    return y;
  };
  for (const r of roots) place(r, 0);
  const edges = s("g");
  const nodes = s("g");
  for (const [parent, children] of kids) {
    const p = pos.get(parent);
    if (!p) continue;
    for (const c of children) {
      const q = pos.get(c);
      const x1 = p.x + W + 10, y1 = p.y + H / 2 + 10, x2 = q.x + 10, y2 = q.y + H / 2 + 10;
      edges.append(s("path", { d: `M${x1},${y1} C${x1 + 20},${y1} ${x2 - 20},${y2} ${x2},${y2}` }));
    }
  }
  for (const [id, p] of pos) {
    const g = s("g", { transform: `translate(${p.x + 10},${p.y + 10})`, class: "node", "data-id": id });
    if (id.startsWith("T:")) {
      const t = app.templates.get(id.slice(2));
      g.classList.add("template");
      g.append(s("rect", { width: W, height: H, rx: 2 }),
        s("text", { x: 8, y: 17 }, `▣ ${t.name}`));
    } else {
      const sb = app.sandboxes.get(id);
      const m = app.memory.get(id);
      const sub = m ? `${mib(m.private_bytes)} own · ${mib(m.shared_bytes)} shared` : `${sb.memory_mib} MiB · ${sb.state}`;
      g.setAttribute("data-state", sb.state);
      g.append(s("rect", { width: W, height: H, rx: 6, fill: COLORS[sb.state] || "#888", "fill-opacity": "0.25" }),
        s("rect", { width: 5, height: H, rx: 2, fill: COLORS[sb.state] || "#888" }),
        s("text", { x: 12, y: 12 }, sb.name.length > 22 ? `${sb.name.slice(0, 21)}…` : sb.name),
        s("text", { x: 12, y: 23, class: "sub" }, sub));
      const title = s("title");
      title.textContent = `${sb.name} (${sb.id}) ${sb.state}`;
      g.append(title);
    }
    nodes.append(g);
  }
  svg.setAttribute("width", (maxDepth + 1) * COL + 40);
  svg.setAttribute("height", Math.max(row, 1) * ROW + 20);
  svg.replaceChildren(edges, nodes);
  const legend = document.querySelector("#view-tree .legend");
  legend.replaceChildren(...STATES.map((st) => h("span", {}, h("span", { class: `badge s-${st}` }, st))));
}

function bar(parts, total) {
  return h("div", { class: "bar" }, ...(() => {
    let left = 0;
    return parts.map(([v, color]) => {
      const w = total > 0 ? (100 * v) / total : 0;
      const el = h("div", { style: `left:${left}%;width:${w}%;background:${color}` });
      left += w;
      return el;
    });
  })());
}

async function renderMemory() {
  await refreshMemory();
  const m = app.memorySummary;
  const live = [...app.sandboxes.values()].filter((sb) => sb.state === "running" || sb.state === "paused");
  const full = live.reduce((a, sb) => a + sb.memory_mib * (1 << 20), 0);
  const cards = [];
  if (m) {
    const used = m.private_bytes + m.shared_bytes;
    cards.push(h("div", { class: "card", id: "mem-clones" },
      h("h3", {}, "Guest memory of live sandboxes"),
      h("div", { class: "big" }, mib(used)),
      h("div", { class: "muted" }, `resident, vs ${mib(full)} if every sandbox had a full copy of its memory (${live.length} live)`),
      bar([[m.private_bytes, "#5aa9ff"], [m.shared_bytes, "#3ecf8e"]], Math.max(full, used)),
      h("div", { class: "muted" }, `own ${mib(m.private_bytes)} · shared ${mib(m.shared_bytes)} (copy-on-write between clones, and the VMM's libraries)`)));
    cards.push(h("div", { class: "card" },
      h("h3", {}, "Host"),
      h("div", { class: "big" }, mib(m.host_used_bytes)),
      h("div", { class: "muted" }, `in use of ${mib(m.host_total_bytes)}`),
      bar([[m.host_used_bytes, "#f5c451"]], m.host_total_bytes)));
    if (m.store) {
      cards.push(h("div", { class: "card", id: "mem-store" },
        h("h3", {}, "Chunk store (hibernated memory)"),
        h("div", { class: "big" }, mib(m.store.disk_bytes)),
        h("div", { class: "muted" }, `on disk for ${m.store.images} images, deduplicated across all sandboxes`)));
    }
  } else {
    cards.push(h("div", { class: "card" }, h("p", { class: "error" }, "The daemon did not report memory (GET /v1/memory).")));
  }
  $("#memory").replaceChildren(...cards);
}

function parseMetrics(text) {
  // name{labels} value  ->  [{name, labels: {..}, value}]
  const out = [];
  for (const line of text.split("\n")) {
    if (!line || line.startsWith("#")) continue;
    const m = line.match(/^([a-zA-Z_:][\w:]*)(\{([^}]*)\})?\s+(\S+)/);
    if (!m) continue;
    const labels = {};
    for (const kv of (m[3] || "").matchAll(/(\w+)="((?:[^"\\]|\\.)*)"/g)) labels[kv[1]] = kv[2];
    out.push({ name: m[1], labels, value: Number(m[4]) });
  }
  return out;
}

async function renderLatency() {
  let text = "";
  try { text = await api("/metrics"); } catch (e) { $("#latency").replaceChildren(h("p", { class: "error" }, e.message)); return; }
  const samples = parseMetrics(typeof text === "string" ? text : "");
  const series = new Map();
  for (const x of samples) {
    const m = x.name.match(/^forkvm_(create|fork|wake)_ms_(bucket|count|sum)$/);
    if (!m) continue;
    const { le, ...rest } = x.labels;
    const key = `${m[1]} ${Object.values(rest).join(" ")}`.trim();
    if (!series.has(key)) series.set(key, { buckets: [], count: 0, sum: 0 });
    const e = series.get(key);
    if (m[2] === "bucket") e.buckets.push([le === "+Inf" ? Infinity : Number(le), x.value]);
    else e[m[2]] = x.value;
  }
  const cards = [];
  for (const [key, e] of [...series].sort()) {
    e.buckets.sort((a, b) => a[0] - b[0]);
    const per = e.buckets.map(([le, c], i) => [le, c - (i ? e.buckets[i - 1][1] : 0)]);
    const q = (p) => { const hit = e.buckets.find(([, c]) => c >= p * e.count); return hit ? hit[0] : NaN; };
    const max = Math.max(1, ...per.map(([, c]) => c));
    const fmt = (v) => (v === Infinity ? "∞" : v >= 1000 ? `${(v / 1000).toFixed(1)} s` : `${v} ms`);
    cards.push(h("div", { class: "card", "data-series": key },
      h("h3", {}, key),
      h("div", { class: "muted" }, e.count ? `${e.count} · mean ${(e.sum / e.count).toFixed(1)} ms · p50 ≤ ${fmt(q(0.5))} · p99 ≤ ${fmt(q(0.99))}` : "no samples yet"),
      h("div", { class: "hist" }, ...per.map(([le, c]) => h("div", { style: `height:${(100 * c) / max}%`, title: `≤ ${fmt(le)}: ${c}` }))),
      h("div", { class: "hist-axis" }, h("span", {}, fmt(per.length ? per[0][0] : 0)), h("span", {}, fmt(per.length > 1 ? per[per.length - 2][0] : 0)))));
  }
  if (!cards.length) cards.push(h("p", { class: "muted" }, "No latency samples yet."));
  $("#latency").replaceChildren(...cards);
}

function renderEvents() {
  const frag = document.createDocumentFragment();
  for (const ev of app.events.slice(-300).reverse()) {
    const sb = app.sandboxes.get(ev.sandbox);
    frag.append(h("li", { "data-kind": ev.kind },
      `${new Date(ev.ts * 1000).toLocaleTimeString()}  `,
      h("span", { class: "kind" }, ev.kind),
      `${sb ? sb.name : ev.sandbox}  ${ev.from_state || ""}${ev.to_state ? ` → ${ev.to_state}` : ""}  ${ev.detail || ""}`));
  }
  $("#events").replaceChildren(frag);
}

function show(view) {
  app.view = view;
  for (const b of document.querySelectorAll("#tabs button")) b.classList.toggle("active", b.dataset.view === view);
  for (const v of document.querySelectorAll(".view")) v.hidden = v.id !== `view-${view}`;
  render();
  if (view === "tree") refreshMemory().then(scheduleRender);
}

// ---------- wiring ----------

document.addEventListener("DOMContentLoaded", () => {
  $("#login-form").addEventListener("submit", (e) => {
    e.preventDefault();
    performance.mark("forkvm:sign-in");
    signIn($("#token").value);
  });
  $("#signout").addEventListener("click", () => signOut());
  for (const b of document.querySelectorAll("#tabs button")) b.addEventListener("click", () => show(b.dataset.view));
  $("#search").addEventListener("input", scheduleRender);
  $("#state-filter").addEventListener("change", scheduleRender);
  $("#create-open").addEventListener("click", openCreate);
  $("#sandboxes tbody").addEventListener("click", (e) => {
    const b = e.target.closest("button[data-action]");
    const sb = b && app.sandboxes.get(b.closest("tr").dataset.id);
    if (sb && actions[b.dataset.action]) actions[b.dataset.action](sb);
  });
  $("#exec-form").addEventListener("submit", (e) => { if (e.submitter && e.submitter.value === "run") runExec(e); });
  $("#exec-line").addEventListener("keydown", (e) => { if (e.key === "Enter") runExec(e); });
  $("#preview-form").addEventListener("submit", (e) => { if (e.submitter && e.submitter.value === "open") runPreview(e); });
  $("#preview-port").addEventListener("keydown", (e) => { if (e.key === "Enter") runPreview(e); });
  setInterval(() => { if (app.token && (app.view === "memory" || app.view === "latency")) render(); }, 5000);
  if (app.token) signIn(app.token);
});
