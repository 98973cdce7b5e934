// The gputrace audit dashboard: plain JS, no build step, nothing loaded from elsewhere.
// It reads the ledger's /v1 API with the reader's bearer token (from `#token=...` or the sign-in
// form), kept in sessionStorage for this tab only. Every element is built with the DOM API, never
// innerHTML: messages and identifiers come from partners and must not become markup.
"use strict";

(() => {
  const TOKEN_KEY = "gputrace.token";
  const BATCH_PAGE = 500;
  const ANOMALY_PAGE = 1000;
  const MAX_ROWS = 300;
  const REFRESH_MS = 60000;

  // The pipeline in order; `units` is what a batch carries at that stage.
  const PIPELINE = [
    { key: "requested", label: "Requested", statuses: ["requested"], units: (q) => q.requested },
    { key: "quoted", label: "Quoted", statuses: ["quoted"], units: (q) => q.requested },
    { key: "awarded", label: "Awarded", statuses: ["awarded", "export_pending"], units: (q) => q.awarded },
    { key: "license_required", label: "Licence required", statuses: ["license_required"], units: (q) => q.awarded },
    { key: "cleared", label: "Export cleared", statuses: ["cleared"], units: (q) => q.export_cleared },
    { key: "in_transit", label: "In transit", statuses: ["in_transit"], units: (q) => q.dispatched },
    { key: "received", label: "Received", statuses: ["received"], units: (q) => q.received },
    { key: "installed", label: "Installed", statuses: ["installed"], units: (q) => q.installed },
    { key: "accepted", label: "Accepted", statuses: ["accepted"], units: (q) => q.accepted },
  ];
  const STOPPED = [
    { key: "export_denied", label: "Export denied", statuses: ["export_denied"], units: (q) => q.awarded },
    { key: "license_denied", label: "Licence denied", statuses: ["license_denied"], units: (q) => q.awarded },
  ];
  const FUNNEL = [
    ["requested", "Requested"], ["awarded", "Awarded"], ["export_cleared", "Export cleared"],
    ["dispatched", "Dispatched"], ["received", "Received"], ["installed", "Installed"], ["accepted", "Accepted"],
    ["damaged", "Damaged in transit"], ["failed", "Failed acceptance"],
  ];
  const QUANTITIES = [
    ["requested", "Requested"], ["quoted", "Quotes"], ["awarded", "Awarded"], ["export_cleared", "Export cleared"],
    ["dispatched", "Dispatched"], ["in_transit", "In transit"], ["received", "Received"], ["damaged", "Damaged"],
    ["installed", "Installed"], ["accepted", "Accepted"], ["failed", "Failed"],
  ];
  const STATUS_LABELS = {
    requested: "Requested", quoted: "Quoted", awarded: "Awarded", export_pending: "Export pending",
    license_required: "Licence required", export_denied: "Export denied", license_denied: "Licence denied",
    cleared: "Export cleared", in_transit: "In transit", received: "Received", installed: "Installed",
    accepted: "Accepted",
  };

  const state = { token: null, batches: [], selected: null, timer: null, loading: false };
  const byId = (id) => document.getElementById(id);
  const q = (sel) => document.querySelector(sel);
  const testid = (name) => q(`[data-testid="${CSS.escape(name)}"]`);

  // ------------------------------------------------------------------ formatting

  const intFormat = new Intl.NumberFormat("en-US");
  const fmtInt = (n) => (n === null || n === undefined ? "—" : intFormat.format(n));
  /** A decimal string from the API ("2000000000.50"), grouped without going through a float. */
  function fmtDecimal(s) {
    if (s === null || s === undefined) return "—";
    const str = String(s);
    const neg = str.startsWith("-");
    const [whole, frac] = (neg ? str.slice(1) : str).split(".");
    return (neg ? "-" : "") + whole.replace(/\B(?=(\d{3})+(?!\d))/g, ",") + (frac ? "." + frac : "");
  }
  const fmtMoney = (m) => (m ? `${m.currency} ${fmtDecimal(m.amount)}` : "—");
  function fmtTime(iso) {
    if (!iso) return "—";
    const d = new Date(iso);
    return Number.isNaN(d.getTime()) ? String(iso) : d.toISOString().replace("T", " ").slice(0, 19);
  }
  function percent(part, whole) {
    if (!whole) return 0;
    return Math.min(100, (100 * part) / whole);
  }
  /** Ratio of two decimal strings, for a percentage only (display, not accounting). */
  const ratio = (a, b) => (Number(b) > 0 ? (100 * Number(a)) / Number(b) : null);
  const fmtPct = (p) => (p === null ? "—" : `${p.toFixed(p > 0 && p < 1 ? 2 : 1)} %`);

  function el(tag, attrs, ...children) {
    const node = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs || {})) {
      if (v === null || v === undefined || v === false) continue;
      if (k === "class") node.className = v;
      else if (k === "testid") node.dataset.testid = v;
      else if (k === "text") node.textContent = v;
      else node.setAttribute(k, v);
    }
    for (const c of children) if (c !== null && c !== undefined) node.append(c);
    return node;
  }
  const td = (text, attrs) => el("td", { ...attrs, text: String(text) });
  const num = (value, testidName) => td(fmtInt(value), { class: "n", testid: testidName });
  const badge = (status) => el("span", { class: `badge s-${status}`, text: STATUS_LABELS[status] || status });
  const batchLink = (id) => el("a", { href: `#batch=${encodeURIComponent(id)}`, class: "mono", text: id });
  function setText(name, text) {
    const node = testid(name);
    if (node) node.textContent = text;
  }

  // ------------------------------------------------------------------ the API

  class ApiError extends Error {
    constructor(status, detail) {
      super(`${status}: ${detail}`);
      this.status = status;
      this.detail = detail;
    }
  }

  async function api(path) {
    let response;
    try {
      response = await fetch(path, {
        headers: { Authorization: `Bearer ${state.token}`, Accept: "application/json" },
        cache: "no-store",
      });
    } catch (err) {
      throw new ApiError(0, `the ledger did not answer (${err.message})`);
    }
    if (!response.ok) {
      let detail = response.statusText;
      try {
        const body = await response.json();
        if (body && body.detail) detail = typeof body.detail === "string" ? body.detail : JSON.stringify(body.detail);
      } catch (_) { /* not JSON */ }
      throw new ApiError(response.status, detail);
    }
    return response.json();
  }

  function explain(err) {
    if (err.status === 401) return `Not signed in: the ledger did not accept this token (401 ${err.detail}).`;
    if (err.status === 403) return `Your token's role may not read this (403 ${err.detail}).`;
    if (err.status === 404) return `Not found (404 ${err.detail}).`;
    return err.status ? `The ledger answered ${err.status}: ${err.detail}` : String(err.detail || err.message);
  }

  function sectionError(name, err) {
    const node = q(`[data-section-error="${name}"]`);
    if (!node) return;
    node.hidden = !err;
    node.textContent = err ? explain(err) : "";
  }

  // ------------------------------------------------------------------ (1) progress

  function renderProgram(p) {
    const pledged = p.progress ? p.progress.gpus_pledged : p.gpus_total;
    setText("gpus-pledged", fmtInt(pledged));
    setText("target-gpus", fmtInt(p.target_gpus));
    const pct = percent(pledged, p.target_gpus);
    setText("progress-percent", `${pct.toFixed(pct > 0 && pct < 1 ? 2 : 1)} % of target`);
    byId("progress-fill").style.width = `${pct}%`;
    const bar = byId("progress-bar");
    bar.setAttribute("aria-valuenow", String(pledged));
    bar.setAttribute("aria-valuemax", String(p.target_gpus));
    setText("pledge-count", fmtInt(p.pledges));
    setText("withdrawn-count", fmtInt(p.withdrawn));
    setText("capacity-gpu-hours", fmtInt(p.capacity_gpu_hours));

    const models = byId("gpus-by-model");
    const entries = Object.entries(p.gpus || {});
    models.replaceChildren(
      ...(entries.length
        ? entries.map(([model, n]) => el("span", { class: "chip" }, `${model} `, el("b", { class: "num", testid: `gpus-model-${model}`, text: fmtInt(n) })))
        : [el("span", { class: "muted", text: "none yet" })]),
    );

    const currencies = [...new Set([...Object.keys(p.capital || {}), ...Object.keys(p.disbursed || {})])].sort();
    byId("capital-rows").replaceChildren(
      ...(currencies.length
        ? currencies.map((c) => {
          const pledgedAmount = (p.capital || {})[c] || "0";
          const disbursed = (p.disbursed || {})[c] || "0";
          return el("tr", {},
            td(c, { class: "mono" }),
            td(fmtDecimal(pledgedAmount), { class: "n", testid: `capital-pledged-${c}` }),
            td(fmtDecimal(disbursed), { class: "n", testid: `capital-disbursed-${c}` }),
            td(fmtPct(ratio(disbursed, pledgedAmount)), { class: "n" }));
        })
        : [el("tr", {}, td("No capital pledged yet", { colspan: "4", class: "muted" }))]),
    );

    const partners = Object.entries(p.by_partner || {});
    const moneyLines = (m) => {
      const cell = el("td", { class: "n" });
      const items = Object.entries(m || {});
      if (!items.length) cell.textContent = "—";
      items.forEach(([c, a], i) => { if (i) cell.append(el("br")); cell.append(`${c} ${fmtDecimal(a)}`); });
      return cell;
    };
    byId("partner-rows").replaceChildren(
      ...(partners.length
        ? partners.map(([id, t]) => el("tr", { testid: `partner-${id}` },
          td(id, { class: "mono" }),
          num(t.pledges),
          num(t.gpus_total, `partner-gpus-${id}`),
          moneyLines(t.capital),
          moneyLines(t.disbursed)))
        : [el("tr", {}, td("No pledges yet", { colspan: "5", class: "muted" }))]),
    );
  }

  // ------------------------------------------------------------------ (2) pipeline, (3) list

  function stageCard(stage, batches) {
    const here = batches.filter((b) => stage.statuses.includes(b.status));
    const units = here.reduce((sum, b) => sum + (stage.units(b.quantities || {}) || 0), 0);
    const link = el("a", { href: "#", class: "stage-link", "data-status": stage.statuses.join(" ") },
      el("span", { class: "stage-label", text: stage.label }),
      el("span", { class: "stage-count num", testid: `stage-count-${stage.key}`, text: fmtInt(here.length) }),
      el("span", { class: "stage-sub" }, el("span", { class: "num", testid: `stage-units-${stage.key}`, text: fmtInt(units) }), " GPUs"));
    link.addEventListener("click", (ev) => {
      ev.preventDefault();
      byId("status-filter").value = stage.statuses[stage.statuses.length - 1];
      renderBatchList();
      byId("batches").scrollIntoView({ behavior: "smooth" });
    });
    return el("li", { class: here.length ? "stage" : "stage empty" }, link);
  }

  function renderPipeline(batches) {
    setText("batch-total", fmtInt(batches.length));
    byId("stages").replaceChildren(...PIPELINE.map((s) => stageCard(s, batches)));
    byId("stopped").replaceChildren(...STOPPED.map((s) => stageCard(s, batches)));
    const totals = Object.fromEntries(FUNNEL.map(([k]) => [k, 0]));
    for (const b of batches) for (const [k] of FUNNEL) totals[k] += (b.quantities || {})[k] || 0;
    const scale = Math.max(1, ...Object.values(totals));
    byId("funnel").tBodies[0].replaceChildren(...FUNNEL.map(([k, label]) => {
      const fill = el("div", { class: k === "damaged" || k === "failed" ? "bar-fill warn" : "bar-fill" });
      fill.style.width = `${percent(totals[k], scale)}%`;
      return el("tr", {},
        el("th", { scope: "row", text: label }),
        el("td", { class: "funnel-bar" }, el("div", { class: "bar thin" }, fill)),
        num(totals[k], `funnel-${k}`));
    }));
  }

  function renderStatusOptions(batches) {
    const select = byId("status-filter");
    const current = select.value;
    const counts = {};
    for (const b of batches) counts[b.status] = (counts[b.status] || 0) + 1;
    const options = [el("option", { value: "", text: `All statuses (${fmtInt(batches.length)})` })];
    for (const status of Object.keys(STATUS_LABELS)) {
      if (counts[status]) options.push(el("option", { value: status, text: `${STATUS_LABELS[status]} (${fmtInt(counts[status])})` }));
    }
    if (current && !counts[current]) options.push(el("option", { value: current, text: `${STATUS_LABELS[current] || current} (0)` }));
    select.replaceChildren(...options);
    select.value = current;
  }

  function renderBatchList() {
    const status = byId("status-filter").value;
    const needle = byId("text-filter").value.trim().toLowerCase();
    const rows = state.batches.filter((b) => (!status || b.status === status) && (!needle ||
      [b.batch_id, b.model, b.vendor_id, b.site_id, b.program_id].some((v) => v && v.toLowerCase().includes(needle))));
    const shown = rows.slice(0, MAX_ROWS);
    setText("batch-shown", rows.length > shown.length
      ? `showing the first ${fmtInt(shown.length)} of ${fmtInt(rows.length)}; narrow the filter`
      : `${fmtInt(rows.length)} shown`);
    byId("batch-rows").replaceChildren(...(shown.length ? shown.map((b) => {
      const qty = b.quantities || {};
      const row = el("tr", { testid: `batch-row-${b.batch_id}`, class: b.batch_id === state.selected ? "selected" : null },
        el("td", {}, batchLink(b.batch_id)),
        td(b.program_id || "—", { class: "mono small" }),
        td(b.model || "—"),
        td(b.vendor_id || "—"),
        td(b.site_id || "—"),
        el("td", { testid: `batch-status-${b.batch_id}` }, badge(b.status)),
        num(qty.requested, `batch-requested-${b.batch_id}`),
        num(qty.awarded, `batch-awarded-${b.batch_id}`),
        num(qty.accepted, `batch-accepted-${b.batch_id}`),
        td(fmtInt(b.anomalies), { class: b.anomalies ? "n alert" : "n", testid: `batch-anomalies-${b.batch_id}` }));
      row.addEventListener("click", (ev) => {
        if (ev.target.closest("a")) return;
        location.hash = `batch=${encodeURIComponent(b.batch_id)}`;
      });
      return row;
    }) : [el("tr", {}, td("No batches match.", { colspan: "10", class: "muted" }))]));
  }

  async function loadBatches() {
    const all = [];
    for (let offset = 0; ; offset += BATCH_PAGE) {
      const page = await api(`/v1/batches?limit=${BATCH_PAGE}&offset=${offset}`);
      all.push(...page.items);
      if (!page.items.length || offset + page.items.length >= page.total) break;
    }
    state.batches = all;
    renderPipeline(all);
    renderStatusOptions(all);
    renderBatchList();
  }

  // ------------------------------------------------------------------ (4) one batch

  function fact(label, value, testidName, cls) {
    return el("div", {}, el("dt", { text: label }), el("dd", { class: cls, testid: testidName, text: value }));
  }

  function moneyMap(m) {
    const items = Object.entries(m || {});
    return items.length ? items.map(([c, a]) => `${c} ${fmtDecimal(a)}`).join(" · ") : "—";
  }

  function renderBatch(b) {
    const ex = b.export || {};
    const money = b.money || {};
    const statusFact = el("div", {}, el("dt", { text: "Status" }), el("dd", { testid: "detail-status" }, badge(b.status)));
    byId("detail-facts").replaceChildren(
      statusFact,
      fact("Programme", b.program_id || "—", null, "mono"),
      fact("Model", b.model || "—"),
      fact("Vendor", b.vendor_id || "—", "detail-vendor"),
      fact("Site", b.site_id || "—"),
      fact("Export status", ex.status ? `${ex.status}${ex.outcome && ex.outcome !== ex.status ? ` (${ex.outcome})` : ""}` : "—"),
      fact("ECCN", ex.eccn || "—", null, "mono"),
      fact("Export rule version", ex.rule_version || "—", null, "mono"),
      fact("Licence", ex.license_number || "—", null, "mono"),
      fact("Capital earmarked", moneyMap(money.earmarked), "detail-earmarked", "num"),
      fact("Disbursed", moneyMap(money.disbursed), null, "num"),
      fact("Award", fmtMoney(money.awarded), "detail-awarded-money", "num"),
      fact("Unit price", fmtMoney(money.unit_price), null, "num"),
      fact("Anomalies", fmtInt(b.anomalies), "detail-anomalies", "num"),
      fact("Last ledger index", fmtInt(b.last_leaf_index), null, "num"),
    );
    const qty = b.quantities || {};
    byId("qty-head").replaceChildren(...QUANTITIES.map(([, label]) => el("th", { class: "n", text: label })));
    byId("qty-row").replaceChildren(...QUANTITIES.map(([k]) => num(qty[k], `detail-${k}`)));
    const steps = b.timeline || [];
    byId("timeline-rows").replaceChildren(...(steps.length ? steps.map((s) => el("tr",
      { testid: "timeline-step", "data-leaf": String(s.leaf_index), class: s.status === "accepted" ? null : "rejected" },
      num(s.leaf_index),
      td(fmtTime(s.decided_at), { class: "nowrap" }),
      td(s.service),
      td(String(s.event_type).replace(/^gputrace\./, ""), { class: "mono small", title: s.event_type }),
      el("td", {}, el("span", { class: `badge d-${s.status}`, text: s.status })),
      td(s.reason_code || "", { class: "mono small" }),
      td(s.message || ""),
      td((s.anomalies || []).map((a) => a.code).join(", "), { class: (s.anomalies || []).length ? "mono small alert" : "" }),
    )) : [el("tr", {}, td("No ledger entries for this batch.", { colspan: "8", class: "muted" }))]));
  }

  async function showBatch(batchId) {
    state.selected = batchId;
    const panel = byId("detail");
    if (!batchId) {
      panel.hidden = true;
      renderBatchList();
      return;
    }
    panel.hidden = false;
    setText("detail-batch-id", batchId);
    for (const row of document.querySelectorAll("#batch-rows tr")) {
      row.classList.toggle("selected", row.dataset.testid === `batch-row-${batchId}`);
    }
    try {
      const doc = await api(`/v1/batches/${encodeURIComponent(batchId)}`);
      if (state.selected !== batchId) return;
      sectionError("detail", null);
      byId("detail-body").hidden = false;
      renderBatch(doc);
    } catch (err) {
      if (err.status === 401) return signOut(explain(err));
      sectionError("detail", err);
      byId("detail-body").hidden = true;
    }
  }

  // ------------------------------------------------------------------ (5) anomalies, checkpoint

  async function loadAnomalies() {
    const all = [];
    for (let offset = 0; ; offset += ANOMALY_PAGE) {
      const page = await api(`/v1/anomalies?limit=${ANOMALY_PAGE}&offset=${offset}`);
      all.push(...page.items);
      if (page.items.length < ANOMALY_PAGE) break;
    }
    setText("anomaly-count", fmtInt(all.length));
    const codes = {};
    for (const a of all) codes[a.code] = (codes[a.code] || 0) + 1;
    byId("anomaly-codes").replaceChildren(...Object.entries(codes).sort((a, b) => b[1] - a[1]).map(([code, n]) =>
      el("span", { class: "chip" }, el("span", { class: "mono", text: `${code} ` }), el("b", { class: "num", testid: `anomaly-code-${code}`, text: fmtInt(n) }))));
    const newest = all.slice().reverse();
    byId("anomaly-rows").replaceChildren(...(newest.length ? newest.map((a) => el("tr", { testid: "anomaly-row" },
      num(a.leaf_index),
      td(fmtTime(a.decided_at), { class: "nowrap" }),
      el("td", {}, el("span", { class: `badge sev-${a.severity}`, text: a.severity })),
      td(a.code, { class: "mono small" }),
      el("td", {}, a.batch_id ? batchLink(a.batch_id) : "—"),
      td(a.service),
      td(a.party_id || "—"),
      td(a.message),
    )) : [el("tr", {}, td("No anomalies recorded.", { colspan: "8", class: "muted" }))]));
  }

  async function loadCheckpoint() {
    const cp = await api("/v1/log/checkpoint?format=json");
    setText("checkpoint-size", fmtInt(cp.size));
    setText("checkpoint-root", cp.root_hash);
    setText("checkpoint-signed", fmtTime(cp.signed_at) + " UTC");
  }

  async function loadProgram() {
    renderProgram(await api("/v1/program"));
  }

  // ------------------------------------------------------------------ session

  function readFragment() {
    const params = new URLSearchParams(location.hash.replace(/^#/, ""));
    return { token: params.get("token"), batch: params.get("batch") };
  }

  function cleanUrl(batch) {
    const hash = batch ? `#batch=${encodeURIComponent(batch)}` : "";
    history.replaceState(null, "", location.pathname + location.search + hash);
  }

  function setPageState(value) {
    document.body.dataset.state = value;
  }

  function signOut(message) {
    sessionStorage.removeItem(TOKEN_KEY);
    state.token = null;
    state.batches = [];
    clearInterval(state.timer);
    byId("app").hidden = true;
    byId("session").hidden = true;
    byId("login").hidden = false;
    const msg = byId("auth-message");
    msg.hidden = !message;
    msg.textContent = message || "";
    setPageState("signed-out");
    byId("token-input").focus();
  }

  async function refresh() {
    if (state.loading || !state.token) return;
    state.loading = true;
    setPageState("loading");
    const loaders = { program: loadProgram, batches: loadBatches, anomalies: loadAnomalies, checkpoint: loadCheckpoint };
    const names = Object.keys(loaders);
    const results = await Promise.allSettled(names.map((n) => loaders[n]()));
    state.loading = false;
    const rejected = results.map((r, i) => [names[i], r]).filter(([, r]) => r.status === "rejected");
    const unauthorised = rejected.find(([, r]) => r.reason && r.reason.status === 401);
    if (unauthorised) return signOut(explain(unauthorised[1].reason));
    for (const name of names) sectionError(name, null);
    for (const [name, r] of rejected) {
      if (r.reason instanceof ApiError) sectionError(name, r.reason);
      else {
        sectionError(name, new ApiError(0, `could not show this section: ${r.reason}`));
        console.error(r.reason);
      }
    }
    const appMsg = byId("app-message");
    appMsg.hidden = rejected.length < names.length;
    appMsg.textContent = appMsg.hidden ? "" : "Nothing could be read from the ledger; see the messages below.";
    setText("updated", `Updated ${new Date().toISOString().replace("T", " ").slice(0, 19)} UTC`);
    setPageState(rejected.length ? "partial" : "ready");
  }

  function signIn(token) {
    state.token = token;
    sessionStorage.setItem(TOKEN_KEY, token);
    byId("login").hidden = true;
    byId("auth-message").hidden = true;
    byId("app").hidden = false;
    byId("session").hidden = false;
    clearInterval(state.timer);
    state.timer = setInterval(() => { if (!document.hidden) refresh(); }, REFRESH_MS);
    return refresh().then(() => (state.token && state.selected ? showBatch(state.selected) : undefined));
  }

  function start() {
    const fragment = readFragment();
    state.selected = fragment.batch;
    if (fragment.token) sessionStorage.setItem(TOKEN_KEY, fragment.token);
    if (fragment.token !== null) cleanUrl(fragment.batch); // never leave a token in the address bar

    byId("login-form").addEventListener("submit", (ev) => {
      ev.preventDefault();
      const input = byId("token-input");
      const token = input.value.trim();
      input.value = "";
      if (token) signIn(token);
    });
    byId("signout").addEventListener("click", () => signOut("Signed out."));
    byId("refresh").addEventListener("click", () => refresh().then(() => state.selected && showBatch(state.selected)));
    byId("status-filter").addEventListener("change", renderBatchList);
    byId("text-filter").addEventListener("input", renderBatchList);
    byId("detail-close").addEventListener("click", (ev) => {
      ev.preventDefault();
      cleanUrl(null);
      showBatch(null);
    });
    window.addEventListener("hashchange", () => {
      const f = readFragment();
      if (f.token) {
        cleanUrl(f.batch);
        state.selected = f.batch;
        signIn(f.token);
        return;
      }
      if (state.token && f.batch !== state.selected) showBatch(f.batch);
      if (f.batch) byId("detail").scrollIntoView({ behavior: "smooth" });
    });

    const token = sessionStorage.getItem(TOKEN_KEY);
    if (token) signIn(token);
    else signOut(null);
  }

  document.addEventListener("DOMContentLoaded", start);
})();
