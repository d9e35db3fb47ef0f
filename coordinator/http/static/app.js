// The dstack dashboard: a hand-written ES module, no build step. Every page is built with DOM calls
// and textContent (never HTML strings): run names, log lines and messages are other users' text.
// The token lives in sessionStorage (this tab only) and travels as `Authorization: Bearer`, never in
// a URL and never in a cookie; see docs/dashboard.md.

const TOKEN_KEY = "dstack-token";
const POLL_MS = 2000;
const main = document.getElementById("main");
let pageAbort = new AbortController(); // aborted when the page changes: stops polls and log follows

class ApiError extends Error {
  constructor(status, message) { super(message); this.status = status; }
}

function token() { return sessionStorage.getItem(TOKEN_KEY) || ""; }

async function api(path, { method = "GET", body, signal } = {}) {
  const headers = { Authorization: `Bearer ${token()}` };
  if (body !== undefined) headers["Content-Type"] = "application/json";
  const r = await fetch(path, {
    method, headers, signal, credentials: "omit", cache: "no-store",
    body: body === undefined ? undefined : JSON.stringify(body),
  });
  if (!r.ok) {
    let message = r.statusText;
    try { message = (await r.json()).error.message || message; } catch (_) { /* not JSON */ }
    if (r.status === 401 && path !== "/api/whoami") { logout(message); }
    throw new ApiError(r.status, message);
  }
  return r.json();
}

// ---- DOM helpers -------------------------------------------------------------------------------
function h(tag, attrs = {}, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs)) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "text") el.textContent = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

function status(s) { return h("span", { class: `status ${s}`, text: s }); }
function time(ns) { return ns ? new Date(ns / 1e6).toLocaleString() : "—"; }
function bytes(n) {
  if (!n) return "0 B";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  const i = Math.min(units.length - 1, Math.floor(Math.log(n) / Math.log(1024)));
  return `${(n / 1024 ** i).toFixed(i ? 1 : 0)} ${units[i]}`;
}
function errorBox(e) { return h("div", { class: "error", role: "alert", text: describe(e) }); }
function describe(e) {
  if (e instanceof ApiError) return e.status === 403 ? `Refused (403): ${e.message}` : `${e.status}: ${e.message}`;
  return String(e && e.message ? e.message : e);
}
function show(...children) { main.replaceChildren(...children); }

// Re-renders `render()` into `box` now and every POLL_MS until the page changes.
function poll(box, render) {
  const signal = pageAbort.signal;
  const tick = async () => {
    if (signal.aborted) return;
    try { box.replaceChildren(...[await render(signal)].flat()); }
    catch (e) { if (!signal.aborted) box.replaceChildren(errorBox(e)); }
    if (!signal.aborted) setTimeout(tick, POLL_MS);
  };
  tick();
  return box;
}

// ---- login -------------------------------------------------------------------------------------
function logout(why) {
  sessionStorage.removeItem(TOKEN_KEY);
  document.getElementById("who").textContent = "";
  location.hash = "#/login";
  if (why) setTimeout(() => main.prepend(h("div", { class: "error", text: why })), 0);
}

function loginPage() {
  const input = h("input", { type: "password", name: "token", id: "token", autocomplete: "off", placeholder: "token" });
  const out = h("div");
  const form = h("form", { class: "login", onsubmit: async (ev) => {
    ev.preventDefault();
    sessionStorage.setItem(TOKEN_KEY, input.value.trim());
    try {
      await api("/api/whoami");
      location.hash = "#/runs";
    } catch (e) {
      sessionStorage.removeItem(TOKEN_KEY);
      out.replaceChildren(errorBox(e));
    }
  } },
    h("h1", { text: "Log in" }),
    h("p", { class: "note", text: "Paste your dstack token (`dstack config` stores it; an admin's `dstack users add` prints it)." }),
    input, h("button", { type: "submit", text: "Log in" }), out);
  show(form);
  input.focus();
}

// ---- runs --------------------------------------------------------------------------------------
const STATUSES = ["", "submitted", "waiting", "uploading", "running", "done", "failed", "stopped", "aborted"];

function runsPage(params) {
  const field = (name, placeholder) => h("input", { name, placeholder, value: params.get(name) || "" });
  const owner = field("owner", "owner"), workflow = field("workflow", "workflow"), repository = field("repository", "OWNER/REPO");
  const statusSel = h("select", { name: "status" }, STATUSES.map((s) => h("option", { value: s, selected: params.get("status") === s, text: s || "any status" })));
  const apply = (ev) => {
    ev.preventDefault();
    const q = new URLSearchParams();
    for (const el of [owner, workflow, repository, statusSel]) if (el.value) q.set(el.name, el.value);
    location.hash = `#/runs?${q}`;
  };
  const filters = h("form", { class: "filters", onsubmit: apply }, owner, workflow, repository, statusSel, h("button", { type: "submit", text: "Filter" }));
  const box = h("div", { id: "runs" });
  show(h("h1", { text: "Runs" }), filters, box);
  poll(box, async (signal) => {
    const q = new URLSearchParams({ limit: "100" });
    for (const k of ["owner", "workflow", "repository", "status", "cursor"]) if (params.get(k)) q.set(k, params.get(k));
    const { runs, next_cursor } = await api(`/api/runs?${q}`, { signal });
    if (!runs.length) return h("p", { class: "note", text: "No runs." });
    // Pages of 100, newest first: no run is out of reach (the API's cursor, as `dstack ps -a` pages).
    const older = new URLSearchParams(params);
    if (next_cursor) older.set("cursor", next_cursor);
    const more = h("p", {}, params.get("cursor") ? h("a", { href: "#/runs", text: "Newest runs" }) : "", " ",
      next_cursor ? h("a", { id: "older-runs", href: `#/runs?${older}`, text: "Older runs →" }) : "");
    return h("div", {}, h("table", {},
      h("tr", {}, ["Run", "Workflow", "Owner", "Repository", "Status", "Jobs", "Submitted"].map((t) => h("th", { text: t }))),
      runs.map((r) => h("tr", { "data-run": r.name },
        h("td", {}, h("a", { href: `#/runs/${encodeURIComponent(r.name)}`, text: r.name })),
        h("td", { text: r.workflow }), h("td", { text: r.owner }), h("td", { text: r.repository || "—" }),
        h("td", {}, status(r.status)), h("td", { text: r.jobs.length }), h("td", { text: time(r.submitted_at_ns) })))), more);
  });
}

// ---- one run -----------------------------------------------------------------------------------
function runPage(name) {
  const facts = h("div"), jobs = h("div"), arts = h("div"), logs = h("pre", { class: "logs", id: "logs" });
  const logNote = h("p", { class: "note", id: "log-state", text: "following…" });
  const stop = h("button", { type: "button", class: "secondary", text: "Stop run", onclick: async () => {
    try { await api(`/api/runs/${encodeURIComponent(name)}/stop`, { method: "POST" }); }
    catch (e) { facts.prepend(errorBox(e)); }
  } });
  show(h("h1", { text: `Run ${name}` }), stop, facts, h("h2", { text: "Jobs" }), jobs, h("h2", { text: "Artifacts" }), arts, h("h2", { text: "Logs" }), logNote, logs);
  let finished = false;
  poll(facts, async (signal) => {
    const r = await api(`/api/runs/${encodeURIComponent(name)}`, { signal });
    jobs.replaceChildren(jobsTable(r.jobs));
    if (!finished && ["done", "failed", "stopped", "aborted"].includes(r.status)) { finished = true; loadArtifacts(name, arts); }
    const code = r.code || {};
    return h("dl", { class: "facts" },
      h("dt", { text: "Status" }), h("dd", {}, status(r.status), r.message ? ` ${r.message}` : ""),
      h("dt", { text: "Workflow" }), h("dd", { text: r.workflow }),
      h("dt", { text: "Owner" }), h("dd", { text: r.owner }),
      h("dt", { text: "Repository" }), h("dd", { text: r.repository || code.repo_url || "—" }),
      h("dt", { text: "Code" }), h("dd", { id: "code", text: code.commit ? `${code.branch || "(detached)"} @ ${code.commit.slice(0, 12)}${code.dirty ? " (dirty: uncommitted changes)" : ""}` : "—" }),
      h("dt", { text: "Tags" }), h("dd", { text: r.tags.length ? r.tags.join(", ") : "—" }),
      h("dt", { text: "Variables" }), h("dd", { id: "variables" }, variables(r.jobs)),
      h("dt", { text: "Submitted" }), h("dd", { text: time(r.submitted_at_ns) }),
      h("dt", { text: "Finished" }), h("dd", { text: time(r.finished_at_ns) }));
  });
  arts.replaceChildren(h("p", { class: "note", text: "Listed when the run ends." }));
  followLogs(name, logs, logNote, pageAbort.signal);
}

// Each job's variables (the workflow's env); the jobs of a run usually share them: shown once then.
function variables(jobs) {
  const shown = new Map();
  for (const j of jobs) {
    const text = Object.entries(j.variables || {}).map(([k, v]) => `${k}=${v}`).join("  ");
    if (text) shown.set(text, [...(shown.get(text) || []), j.job_name]);
  }
  if (!shown.size) return "—";
  return [...shown].map(([text, names]) => h("div", {}, shown.size > 1 ? `${names.join(", ")}: ` : "", h("code", { text })));
}

function jobsTable(list) {
  return h("table", {},
    h("tr", {}, ["Job", "Status", "Agent", "GPUs", "Resources", "Waiting because", "Exit"].map((t) => h("th", { text: t }))),
    list.map((j) => h("tr", {},
      h("td", { text: j.job_name }), h("td", {}, status(j.status)), h("td", { text: j.agent_name || "—" }),
      h("td", { text: j.gpu_indices.length ? j.gpu_indices.join(",") : "—" }),
      h("td", { text: j.resources ? Object.entries(j.resources).filter(([, v]) => v && (!Array.isArray(v) || v.length)).map(([k, v]) => `${k}=${v}`).join(" ") : "—" }),
      h("td", { text: j.wait_reason ? `${j.wait_reason}${j.eta_ns ? `, ~${time(j.eta_ns)}` : ""}` : j.message || "" }),
      h("td", { text: j.exit_code ?? "" }))));
}

async function loadArtifacts(name, box) {
  try {
    const { files } = await api(`/api/runs/${encodeURIComponent(name)}/artifacts`);
    if (!files.length) { box.replaceChildren(h("p", { class: "note", text: "No artifacts." })); return; }
    box.replaceChildren(h("table", {},
      h("tr", {}, ["Job", "File", "Size", ""].map((t) => h("th", { text: t }))),
      files.map((f) => h("tr", {}, h("td", { text: f.job_name }), h("td", { text: f.path }), h("td", { text: bytes(f.size) }),
        h("td", {}, h("button", { type: "button", class: "secondary", "data-download": f.path, text: "Download",
          onclick: () => download(name, f).catch((e) => box.prepend(errorBox(e))) }))))));
  } catch (e) { box.replaceChildren(errorBox(e)); }
}

// The file comes through fetch (the token is a header), then is saved from a blob: URL.
async function download(run, f) {
  const path = f.path.split("/").map(encodeURIComponent).join("/");
  const r = await fetch(`/api/runs/${encodeURIComponent(run)}/artifacts/${encodeURIComponent(f.job_name)}/${path}`,
    { headers: { Authorization: `Bearer ${token()}` }, credentials: "omit", cache: "no-store" });
  if (!r.ok) throw new ApiError(r.status, r.statusText);
  const url = URL.createObjectURL(await r.blob());
  const a = h("a", { href: url, download: f.path.split("/").pop() });
  document.body.append(a);
  a.click();
  a.remove();
  setTimeout(() => URL.revokeObjectURL(url), 60000);
}

// Follows /logs/stream (Server-Sent Events) with fetch, since EventSource cannot send a header. The
// event id is the cursor: after a dropped connection it resumes after the last line shown.
async function followLogs(name, pre, note, signal) {
  let cursor = "";
  const append = (lines) => {
    const atBottom = pre.scrollTop + pre.clientHeight >= pre.scrollHeight - 4;
    pre.append(document.createTextNode(lines.map((l) => `${l.text}\n`).join("")));
    if (atBottom) pre.scrollTop = pre.scrollHeight;
  };
  for (let attempt = 0; !signal.aborted; attempt++) {
    try {
      const q = cursor ? `?cursor=${encodeURIComponent(cursor)}` : "";
      const r = await fetch(`/api/runs/${encodeURIComponent(name)}/logs/stream${q}`,
        { headers: { Authorization: `Bearer ${token()}`, Accept: "text/event-stream" }, signal, credentials: "omit", cache: "no-store" });
      if (!r.ok) {
        let message = r.statusText;
        try { message = (await r.json()).error.message; } catch (_) { /* not JSON */ }
        throw new ApiError(r.status, message);
      }
      note.textContent = "following…";
      const reader = r.body.pipeThrough(new TextDecoderStream()).getReader();
      let buf = "";
      for (;;) {
        const { value, done } = await reader.read();
        if (done) break;
        buf += value;
        let cut;
        while ((cut = buf.indexOf("\n\n")) >= 0) {
          const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
          const ev = { event: "message", data: "", id: null };
          for (const line of block.split("\n")) {
            if (line.startsWith(":")) continue;
            const i = line.indexOf(":");
            const k = i < 0 ? line : line.slice(0, i), v = i < 0 ? "" : line.slice(i + 1).replace(/^ /, "");
            if (k === "data") ev.data += (ev.data ? "\n" : "") + v; else if (k === "event") ev.event = v; else if (k === "id") ev.id = v;
          }
          if (ev.id !== null) cursor = ev.id;
          if (ev.event === "lines") append(JSON.parse(ev.data).lines);
          else if (ev.event === "end") { note.textContent = "the run has ended"; return; }
          else if (ev.event === "error") { note.textContent = `stopped: ${ev.data}`; return; }
        }
      }
    } catch (e) {
      if (signal.aborted) return;
      if (e instanceof ApiError && e.status < 500) { note.replaceChildren(errorBox(e)); return; }
      note.textContent = `reconnecting… (${describe(e)})`;
    }
    await new Promise((res) => setTimeout(res, Math.min(10000, 500 * 2 ** Math.min(attempt, 5))));
  }
}

// ---- pool --------------------------------------------------------------------------------------
function poolPage() {
  const box = h("div");
  show(h("h1", { text: "Pool" }), box);
  poll(box, async (signal) => {
    const [{ agents }, { runs }] = await Promise.all([api("/api/agents", { signal }), api("/api/runs?status=running&limit=500", { signal })]);
    const running = {};
    for (const r of runs) for (const j of r.jobs) if (j.agent_name && j.status === "running") (running[j.agent_name] ||= []).push([r.name, j]);
    if (!agents.length) return h("p", { class: "note", text: "No agents. Start one with `dstack agent` on a GPU machine." });
    return h("table", {},
      h("tr", {}, ["Agent", "Status", "Runtime", "CPUs / memory", "GPUs", "Running jobs"].map((t) => h("th", { text: t }))),
      agents.map((a) => h("tr", { "data-agent": a.name },
        h("td", { text: a.name }),
        h("td", {}, status(a.status), a.draining ? ` · draining: ${a.draining}, ${bytes(a.disk_free_bytes)} free` : ""),
        h("td", { text: a.runtime }),
        h("td", { text: `${a.cpu_count} CPUs, ${bytes(a.memory_available_bytes)} free of ${bytes(a.memory_total_bytes)}` }),
        h("td", {}, a.gpus.length ? a.gpus.map(gpu) : "—"),
        h("td", {}, (running[a.name] || []).map(([run, j]) => h("div", {}, h("a", { href: `#/runs/${encodeURIComponent(run)}`, text: `${run}/${j.job_name}` }),
          j.gpu_indices.length ? ` (GPU ${j.gpu_indices.join(",")})` : ""))))));
  });
}

function gpu(g) {
  const used = g.memory_total_bytes ? g.memory_used_bytes / g.memory_total_bytes : 0;
  return h("div", { class: `gpu${g.busy ? " busy" : ""}`, title: g.uuid || "" },
    `#${g.index} ${g.name}${g.simulated && !g.name.includes("simulated") ? " (simulated)" : ""} · ${g.busy ? "held" : "free"} · mem ${bytes(g.memory_used_bytes)}/${bytes(g.memory_total_bytes)} `,
    h("meter", { min: 0, max: 1, value: used.toFixed(3) }),
    ` util ${g.utilization_percent}% `, h("meter", { min: 0, max: 100, value: g.utilization_percent }));
}

// ---- queue -------------------------------------------------------------------------------------
function queuePage() {
  const box = h("div");
  show(h("h1", { text: "Queue" }), box);
  poll(box, async (signal) => {
    const { jobs } = await api("/api/queue", { signal });
    if (!jobs.length) return h("p", { class: "note", text: "Nothing is waiting." });
    return h("table", {},
      h("tr", {}, ["#", "Run / job", "Owner", "Workflow", "Status", "Why it waits", "Estimated start"].map((t) => h("th", { text: t }))),
      jobs.map((j) => h("tr", {},
        h("td", { text: j.position || "—" }),
        h("td", {}, h("a", { href: `#/runs/${encodeURIComponent(j.run_name)}`, text: `${j.run_name}/${j.job_name}` })),
        h("td", { text: j.owner }), h("td", { text: j.workflow }), h("td", {}, status(j.status)),
        h("td", { text: j.message || j.reason }), h("td", { text: j.eta_ns ? time(j.eta_ns) : "unknown" }))));
  });
}

// ---- settings ----------------------------------------------------------------------------------
async function settingsPage() {
  const me = await api("/api/whoami");
  const secretsBox = h("div", { id: "secrets" }), adminBox = h("div", { id: "admin" });
  const name = h("input", { name: "secret-name", placeholder: "NAME", required: true, pattern: "[A-Za-z_][A-Za-z0-9_]*" });
  const value = h("input", { name: "secret-value", type: "password", placeholder: "value", autocomplete: "off", required: true });
  const personal = h("input", { type: "checkbox", name: "personal", checked: me.role !== "admin" });
  const formOut = h("div", { id: "secret-result" });
  const form = h("form", { class: "inline", id: "secret-form", onsubmit: async (ev) => {
    ev.preventDefault();
    try {
      await api(`/api/secrets/${encodeURIComponent(name.value)}`, { method: "PUT", body: { value: value.value, personal: personal.checked } });
      formOut.replaceChildren(h("p", { class: "note", text: `Saved ${name.value}.` }));
      form.reset(); personal.checked = me.role !== "admin";
      renderSecrets();
    } catch (e) { formOut.replaceChildren(errorBox(e)); }
  } }, name, value, h("label", {}, personal, " personal (only my runs)"), h("button", { type: "submit", text: "Add or replace" }));

  const renderSecrets = async () => {
    try {
      const { secrets } = await api("/api/secrets");
      secretsBox.replaceChildren(secrets.length ? h("table", {},
        h("tr", {}, ["Name", "Scope", "Value", "Updated", ""].map((t) => h("th", { text: t }))),
        secrets.map((s) => h("tr", { "data-secret": s.name },
          h("td", { text: s.name }), h("td", { text: s.personal ? "personal" : "team" }), h("td", { text: "••••••" }),
          h("td", { text: time(s.updated_at_ns) }),
          h("td", {}, h("button", { type: "button", class: "secondary", text: "Delete", onclick: async () => {
            try {
              await api(`/api/secrets/${encodeURIComponent(s.name)}${s.personal ? "?personal=true" : ""}`, { method: "DELETE" });
              renderSecrets();
            } catch (e) { formOut.replaceChildren(errorBox(e)); }
          } }))))) : h("p", { class: "note", text: "No secrets." }));
    } catch (e) { secretsBox.replaceChildren(errorBox(e)); }
  };

  // One's own token (a leak, a routine change): the new one replaces the old at once, here too, and is
  // shown once so the CLI's config can take it (`dstack config --token -`).
  const rotateOut = h("div", { id: "own-token" });
  const rotateOwn = h("div", {}, h("button", { type: "button", class: "secondary", id: "rotate-own", text: "Rotate my token",
    onclick: async () => {
      if (!confirm("Replace your token? The old one stops working at once, in the CLI too.")) return;
      try {
        const r = await api(`/api/users/${encodeURIComponent(me.user)}/token`, { method: "POST" });
        sessionStorage.setItem(TOKEN_KEY, r.token);
        rotateOut.replaceChildren(h("div", { class: "note" }, "Your new token (shown once; copy it now): ", h("code", { text: r.token })));
      } catch (e) { rotateOut.replaceChildren(errorBox(e)); }
    } }), rotateOut);
  show(h("h1", { text: "Settings" }),
    h("h2", { text: "You" }),
    h("dl", { class: "facts", id: "whoami" }, h("dt", { text: "User" }), h("dd", { text: me.user }), h("dt", { text: "Role" }), h("dd", { text: me.role }),
      h("dt", { text: "Token" }), h("dd", { text: "kept in this tab only (sessionStorage)" })),
    rotateOwn,
    h("h2", { text: "Secrets" }),
    h("p", { class: "note", text: "Values are write-only: nobody can read them back here or through the API. Jobs get them as environment variables, masked in logs. Team secrets need an admin." }),
    form, formOut, secretsBox,
    h("h2", { text: "Users and join tokens (admins)" }), adminBox);
  renderSecrets();
  renderAdmin(adminBox);
}

// Users and join tokens: the API refuses all of it to a non-admin (403), and the section says so.
async function renderAdmin(box) {
  const out = h("div", { id: "admin-result" });
  const again = () => renderAdmin(box);
  const act = (fn) => async (ev) => {
    if (ev) ev.preventDefault();
    try { await fn(); } catch (e) { out.replaceChildren(errorBox(e)); }
  };
  // A new token is in one answer only: shown once, here, never stored by the page.
  const once = (what, tokenValue) => h("div", { class: "note", id: "new-token" }, `${what} (shown once; copy it now): `, h("code", { text: tokenValue }));
  let users, joins;
  try {
    [{ users }, { join_tokens: joins }] = await Promise.all([api("/api/users"), api("/api/join-tokens")]);
  } catch (e) { box.replaceChildren(errorBox(e)); return; }
  const newName = h("input", { name: "user-name", placeholder: "user name", required: true });
  const newRole = h("select", { name: "user-role" }, ["member", "viewer", "admin"].map((r) => h("option", { value: r, text: r })));
  const ttl = h("input", { name: "join-ttl", type: "number", min: "0", step: "any", value: "24", title: "hours (0: never expires)" });
  const uses = h("input", { name: "join-uses", type: "number", min: "0", value: "1", title: "uses (0: unlimited)" });
  box.replaceChildren(out,
    h("form", { class: "inline", id: "user-form", onsubmit: act(async () => {
      const r = await api("/api/users", { method: "POST", body: { name: newName.value, role: newRole.value } });
      await again(); box.prepend(once(`Token of ${r.user.name}`, r.token));
    }) }, newName, newRole, h("button", { type: "submit", text: "Add user" })),
    h("table", { id: "users" }, h("tr", {}, ["User", "Role", "Created", "Last seen", ""].map((t) => h("th", { text: t }))),
      users.map((u) => h("tr", { "data-user": u.name }, h("td", { text: u.name }), h("td", { text: u.role }), h("td", { text: time(u.created_at_ns) }), h("td", { text: time(u.last_seen_at_ns) }),
        h("td", {}, u.name === "admin" ? "" : [
          h("button", { type: "button", class: "secondary", "data-rotate": u.name, text: "Rotate token", onclick: act(async () => {
            const r = await api(`/api/users/${encodeURIComponent(u.name)}/token`, { method: "POST" });
            await again(); box.prepend(once(`New token of ${u.name}`, r.token));
          }) }), " ",
          h("button", { type: "button", class: "secondary", "data-remove": u.name, text: "Remove", onclick: act(async () => {
            if (!confirm(`Remove user ${u.name}? Their token stops working at once.`)) return;
            await api(`/api/users/${encodeURIComponent(u.name)}`, { method: "DELETE" }); await again();
          }) })])))),
    h("h2", { text: "Join tokens" }),
    h("form", { class: "inline", id: "join-form", onsubmit: act(async () => {
      const r = await api("/api/join-tokens", { method: "POST", body: { ttl_s: Number(ttl.value) * 3600, max_uses: Number(uses.value) } });
      await again(); box.prepend(once(`Join token ${r.join_token.id}`, r.token));
    }) }, "valid for (hours)", ttl, "uses", uses, h("button", { type: "submit", text: "Create join token" })),
    joins.length ? h("table", { id: "join-tokens" }, h("tr", {}, ["Id", "Uses", "Expires", "Revoked", ""].map((t) => h("th", { text: t }))),
      joins.map((t) => h("tr", { "data-join": t.id }, h("td", { text: t.id }), h("td", { text: `${t.uses}/${t.max_uses || "∞"}` }), h("td", { text: time(t.expires_at_ns) }), h("td", { text: time(t.revoked_at_ns) }),
        h("td", {}, t.revoked_at_ns ? "" : h("button", { type: "button", class: "secondary", text: "Revoke", onclick: act(async () => {
          await api(`/api/join-tokens/${encodeURIComponent(t.id)}/revoke`, { method: "POST" }); await again();
        }) })))))
      : h("p", { class: "note", text: "No join tokens." }));
}

// ---- routing -----------------------------------------------------------------------------------
async function route() {
  pageAbort.abort();
  pageAbort = new AbortController();
  const [path, query] = (location.hash.slice(1) || "/runs").split("?");
  const params = new URLSearchParams(query || "");
  const parts = path.split("/").filter(Boolean).map(decodeURIComponent);
  const page = parts[0] || "runs";
  const logged = !!token();
  document.getElementById("logout").hidden = !logged;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.page === page);
  if (!logged && page !== "login") { location.hash = "#/login"; return; }
  try {
    if (page === "login") return loginPage();
    if (!document.getElementById("who").textContent) {
      const me = await api("/api/whoami");
      document.getElementById("who").textContent = `${me.user} (${me.role})`;
    }
    if (page === "runs" && parts[1]) return runPage(parts[1]);
    if (page === "runs") return runsPage(params);
    if (page === "pool") return poolPage();
    if (page === "queue") return queuePage();
    if (page === "settings") return await settingsPage();
    show(h("p", { text: "No such page." }));
  } catch (e) { show(errorBox(e)); }
}

document.getElementById("logout").addEventListener("click", () => logout());
window.addEventListener("hashchange", route);
route();
