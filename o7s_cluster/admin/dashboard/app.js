// O7s dashboard: polls the admin port's JSON and draws tables and inline SVG charts. No dependencies.
"use strict";
const LIVE_MS = 2000, ACCOUNT_MS = 15000, HISTORY = 150;  // 150 points x 2 s = 5 minutes of history
const history = { qps: [], conns: [] }, orgHistory = new Map();
let account = null, lastOk = 0;

const $ = (sel) => document.querySelector(sel);
function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else e.setAttribute(k, v);
  }
  for (const k of kids) e.append(k instanceof Node ? k : document.createTextNode(k == null ? "" : String(k)));
  return e;
}
const fmt = (v, d = 1) => (v == null || Number.isNaN(+v)) ? "–" : (+v).toFixed(d).replace(/\.0+$/, "");
const usd = (v) => v == null ? "–" : "$" + (+v).toFixed(2);
function ago(s) {
  if (s < 90) return Math.round(s) + " s";
  if (s < 5400) return Math.round(s / 60) + " min";
  if (s < 172800) return (s / 3600).toFixed(1) + " h";
  return (s / 86400).toFixed(1) + " d";
}

async function getJSON(url) {
  const r = await fetch(url, { credentials: "same-origin", cache: "no-store" });
  if (r.status === 401) { location.href = "/dashboard"; throw new Error("logged out"); }
  const doc = await r.json().catch(() => ({}));
  if (!r.ok) throw new Error(doc.error || ("HTTP " + r.status));
  return doc;
}

// A meter: how close `value` is to the ceiling `max` (green, then amber from 70 %, red from 90 %).
function meter(value, max) {
  if (!max) return "";
  const pct = Math.min(100, 100 * (value || 0) / max);
  const m = el("span", { class: "meter" + (pct >= 90 ? " bad" : pct >= 70 ? " warn" : ""),
                        title: fmt(pct, 0) + " % of " + max });
  const bar = el("i"); bar.style.width = pct + "%"; m.append(bar);
  return m;
}

// A line chart of `points` into an <svg> (viewBox w x h), scaled to its own maximum.
function drawLine(svg, points, w, h) {
  while (svg.firstChild) svg.firstChild.remove();
  if (points.length < 2) return 0;
  const max = Math.max(1, ...points), step = w / (HISTORY - 1), x0 = w - step * (points.length - 1);
  const xy = points.map((v, i) => [x0 + i * step, h - 2 - (h - 4) * v / max]);
  const ns = "http://www.w3.org/2000/svg";
  const area = document.createElementNS(ns, "polygon");
  area.setAttribute("points", [[x0, h], ...xy, [w, h]].map((p) => p.join(",")).join(" "));
  const line = document.createElementNS(ns, "polyline");
  line.setAttribute("points", xy.map((p) => p.map((n) => n.toFixed(1)).join(",")).join(" "));
  svg.append(area, line);
  return max;
}
function spark(points) {
  const svg = document.createElementNS("http://www.w3.org/2000/svg", "svg");
  svg.setAttribute("class", "spark"); svg.setAttribute("viewBox", "0 0 120 22");
  svg.setAttribute("preserveAspectRatio", "none");
  drawLine(svg, points, 120, 22);
  return svg;
}
const push = (arr, v) => { arr.push(v); if (arr.length > HISTORY) arr.shift(); };

function renderCluster(cluster, orgs) {
  const now = Date.now() / 1000;
  const tbody = $("#workers tbody"); tbody.replaceChildren();
  for (const w of cluster.workers) {
    tbody.append(el("tr", { "data-worker": w.index },
      el("td", {}, w.index), el("td", {}, w.pid ?? "–"), el("td", { class: "state-" + w.state }, w.state),
      el("td", {}, w.started_at ? ago(now - w.started_at) : "–"), el("td", {}, w.client_connections ?? "–"),
      el("td", {}, w.backend_connections ?? "–"), el("td", {}, w.sessions_total ?? "–"),
      el("td", { class: "text" }, (w.orgs_connected || []).join(", "))));
  }
  const qps = orgs.reduce((s, o) => s + (o.qps || 0), 0);
  const conns = orgs.reduce((s, o) => s + (o.client_connections || 0), 0);
  const backends = orgs.reduce((s, o) => s + (o.backend_connections || 0), 0);
  push(history.qps, qps); push(history.conns, conns);
  const up = cluster.workers.filter((w) => w.state === "up").length;
  $("#summary").replaceChildren(
    el("span", {}, "workers ", el("b", { id: "sum-workers" }, up + " / " + cluster.count), " up"),
    el("span", {}, "orgs ", el("b", { id: "sum-orgs" }, orgs.length)),
    el("span", {}, "client conns ", el("b", { id: "sum-conns" }, conns)),
    el("span", {}, "backend conns ", el("b", {}, backends)),
    el("span", {}, "qps ", el("b", { id: "sum-qps" }, fmt(qps))));
  const mq = drawLine($("#chart-qps"), history.qps, 600, 120);
  const mc = drawLine($("#chart-conns"), history.conns, 600, 120);
  $("#axis-qps").textContent = "−5 min  ·  max " + fmt(mq) + "  ·  now " + fmt(qps);
  $("#axis-conns").textContent = "−5 min  ·  max " + fmt(mc) + "  ·  now " + conns;
}

function renderOrgs(live) {
  const byName = new Map(live.map((o) => [o.org, o]));
  const names = new Set(byName.keys());
  if (account) for (const n of Object.keys(account.orgs)) names.add(n);
  const tbody = $("#orgs tbody"); tbody.replaceChildren();
  for (const name of [...names].sort()) {
    const o = byName.get(name) || { org: name, client_connections: 0, backend_connections: 0, totals: {}, latency_ms: {} };
    const acct = account ? account.orgs[name] : null;
    const tier = (acct && acct.tier) || o.tier || "–";
    const lim = (account && account.tiers[tier]) || {};
    const r = o.rates || {};
    const h = orgHistory.get(name) || []; push(h, o.qps || 0); orgHistory.set(name, h);
    const lat = (r.latency_ms && r.latency_ms.p50 != null) ? r.latency_ms : (o.latency_ms || {});  // window's, else since start
    const inv = acct && acct.invoice;
    const vcpu = acct ? +acct.vcpu_hours : null;
    tbody.append(el("tr", { "data-org": name },
      el("td", { class: "text" }, name),
      el("td", { class: "text tier" }, tier),
      el("td", { class: "conns" }, (o.client_connections || 0) + (lim.max_connections ? " / " + lim.max_connections : ""),
         meter(o.client_connections, lim.max_connections)),
      el("td", { class: "qps" }, fmt(o.qps), meter(o.qps, lim.max_qps)),
      el("td", {}, spark(h)),
      el("td", { class: "latency" }, fmt(lat.p50, 2) + " / " + fmt(lat.p95, 2) + " / " + fmt(lat.p99, 2)),
      el("td", { class: "throttled" + (r.throttled_per_second ? " hot" : "") }, fmt(r.throttled_per_second, 2)),
      el("td", { class: "refused" + (r.refused_per_second ? " hot" : "") }, fmt(r.refused_per_second, 2)),
      el("td", { class: "errors" }, fmt(r.errors_per_second, 2)),
      el("td", { class: "queries" }, o.totals.queries ?? 0),
      el("td", { class: "backends" }, (o.backend_connections || 0) + (lim.pool_size ? " / " + lim.pool_size + " per db" : "")),
      el("td", { class: "vcpu" }, vcpu == null ? "–" : fmt(vcpu, 4), inv ? meter(vcpu, +inv.vcpu_included) : ""),
      el("td", { class: "invoice" + (inv && inv.over_included ? " hot" : "") }, inv ? usd(inv.total) : "–")));
  }
}

function renderAudit(doc) {
  const tbody = $("#audit tbody"); tbody.replaceChildren();
  for (const e of doc.events) {
    tbody.append(el("tr", {},
      el("td", { class: "text" }, String(e.at).replace("T", " ").slice(0, 19)), el("td", { class: "text" }, e.org ?? "–"),
      el("td", { class: "text kind" }, e.kind), el("td", { class: "text" }, e.actor ?? ""),
      el("td", { class: "text" }, e.source ?? ""), el("td", { class: "text" }, e.method ?? ""),
      el("td", {}, e.count), el("td", { class: "detail" }, e.detail ? JSON.stringify(e.detail) : "")));
  }
  $("#audit-note").textContent = doc.note || (doc.events.length ? "" : "no audit events yet");
}

async function tickLive() {
  try {
    const [cluster, orgs] = await Promise.all([getJSON("/v1/cluster"), getJSON("/v1/orgs")]);
    renderCluster(cluster, orgs.orgs);
    renderOrgs(orgs.orgs);
    lastOk = Date.now();
    const s = $("#status"); s.className = "status"; s.textContent = "live · " + new Date().toLocaleTimeString();
  } catch (err) {
    const s = $("#status"); s.className = "status stale";
    s.textContent = "not updating: " + err.message + (lastOk ? " (last " + new Date(lastOk).toLocaleTimeString() + ")" : "");
  }
}
async function tickAccount() {
  try {
    account = await getJSON("/v1/dashboard/account");
    $("#period").textContent = "· usage and invoice for " + account.period + " so far (as of " +
      account.as_of.slice(11, 19) + " UTC)";
    $("#account-note").textContent = "";
  } catch (err) { $("#account-note").textContent = "tiers, usage and invoices unavailable: " + err.message; }
  try { renderAudit(await getJSON("/v1/dashboard/audit")); }
  catch (err) { $("#audit-note").textContent = "audit log unavailable: " + err.message; }
}

(async function start() {
  await tickAccount();
  await tickLive();
  setInterval(tickLive, LIVE_MS);
  setInterval(tickAccount, ACCOUNT_MS);
})();
