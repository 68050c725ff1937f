// analysisq dashboard: refresh the server-rendered page from /api/ by short polling (one
// request per panel per interval), draw the run's chart with uPlot, send the actions.
// Values are written with textContent only, never innerHTML: data stays data.
"use strict";
(function () {
  const meta = JSON.parse(document.querySelector("meta[name=analysisq]").content);
  const runPath = (id) => "/api/runs/" + id.split("/").map(encodeURIComponent).join("/");
  const fmtInt = (n) => (n === null || n === undefined ? "—" : Number(n).toLocaleString("en"));
  const fmtRate = (r) => (r === null || r === undefined ? "—" : r.toFixed(1) + "/s");
  const fmtMs = (ms) => (ms === null || ms === undefined ? "—" : Math.round(ms) + " ms");
  const fmtCost = (c) => (c === null || c === undefined ? "—" : "$" + c.toFixed(4));
  const fmtTime = (t) => (t ? new Date(t).toLocaleTimeString("en-GB") : "—");
  function fmtEta(s) {
    if (s === null || s === undefined) return "—";
    if (s === 0) return "done";
    if (s < 90) return Math.round(s) + " s";
    if (s < 5400) return Math.round(s / 60) + " min";
    return (s / 3600).toFixed(1) + " h";
  }

  function el(tag, text, cls) {
    const e = document.createElement(tag);
    if (text !== undefined && text !== null) e.textContent = String(text);
    if (cls) e.className = cls;
    return e;
  }

  function toast(text, bad) {
    const t = document.getElementById("toast");
    t.textContent = text;
    t.className = bad ? "show bad" : "show";
    setTimeout(() => { t.className = ""; }, 4000);
  }

  async function getJSON(url) {
    const r = await fetch(url, { headers: { Accept: "application/json" } });
    const body = await r.json().catch(() => ({ error: { message: "HTTP " + r.status } }));
    if (!r.ok) throw new Error(body.error ? body.error.message : "HTTP " + r.status);
    return body;
  }

  async function post(path, body) {
    const headers = { "Content-Type": "application/json", "X-CSRF-Token": meta.csrf };
    if (meta.actions.token_required) {
      let token = sessionStorage.getItem("analysisq-action-token");
      if (!token) {
        token = window.prompt("Action token (from the dashboard's Secret):");
        if (!token) return null;
        sessionStorage.setItem("analysisq-action-token", token);
      }
      headers["X-Action-Token"] = token;
    }
    const r = await fetch(path, { method: "POST", headers, body: JSON.stringify(body || {}) });
    const answer = await r.json().catch(() => ({}));
    if (!r.ok) {
      if (r.status === 403) sessionStorage.removeItem("analysisq-action-token");
      toast(answer.error ? answer.error.message : "HTTP " + r.status, true);
      return null;
    }
    return answer;
  }

  function bar(progress) {
    const wrap = el("div", null, "bar");
    const fill = el("span");
    fill.style.width = (100 * progress).toFixed(1) + "%";
    wrap.title = (100 * progress).toFixed(1) + "%";
    wrap.appendChild(fill);
    return wrap;
  }

  function fillTable(table, columns, rows, render) {
    table.replaceChildren();
    const head = el("thead");
    const tr = el("tr");
    columns.forEach((c) => tr.appendChild(el("th", c)));
    head.appendChild(tr);
    const body = el("tbody");
    rows.forEach((row) => {
      const r = el("tr");
      render(row).forEach((cell) => {
        const td = el("td");
        if (cell instanceof Node) td.appendChild(cell); else td.textContent = cell;
        r.appendChild(td);
      });
      body.appendChild(r);
    });
    table.append(head, body);
    if (!rows.length) {
      const r = el("tr");
      const td = el("td", "none", "empty");
      td.colSpan = columns.length;
      r.appendChild(td);
      body.appendChild(r);
    }
  }

  function setLive(ok, message) {
    const live = document.getElementById("live");
    live.textContent = ok ? "live · updated " + new Date().toLocaleTimeString("en-GB") : message;
    live.className = ok ? "live" : "live down";
  }

  // --- the runs table ------------------------------------------------------------------
  async function refreshRuns() {
    const data = await getJSON("/api/runs");
    const table = document.getElementById("runs");
    const columns = Array.from(table.querySelectorAll("th")).map((th) => th.textContent);
    fillTable(table, columns, data.runs, (run) => {
      const link = el("a", run.name);
      link.href = "/runs/" + run.id.split("/").map(encodeURIComponent).join("/");
      const progress = el("div", null, "progresscell");
      progress.append(bar(run.progress), el("span", (100 * run.progress).toFixed(1) + "%", "pct"));
      const c = run.counts;
      return [link, run.phase, progress, fmtInt(c.total), fmtInt(c.pending),
        fmtInt(c.processing), fmtInt(c.completed), fmtInt(c.retrying), fmtInt(c.failed),
        fmtRate(run.throughput), fmtEta(run.eta_seconds), fmtCost(run.cost)];
    });
  }

  // --- one run -------------------------------------------------------------------------
  let chart = null;
  function drawChart(points) {
    const xs = points.map((p) => new Date(p.at).getTime() / 1000);
    const data = [xs, points.map((p) => p.completed), points.map((p) => p.failed),
      points.map((p) => p.open)];
    const box = document.getElementById("chart");
    if (chart) { chart.setData(data); return; }
    chart = new uPlot({
      width: Math.max(box.clientWidth, 320), height: 220,
      series: [{}, { label: "completed", stroke: "#2e7d32", width: 2, points: { show: false } },
        { label: "failed", stroke: "#c62828", width: 2, points: { show: false } },
        { label: "open", stroke: "#1565c0", width: 2, dash: [6, 4], points: { show: false } }],
      axes: [{}, { size: 60 }],
    }, data, box);
  }

  function button(label, onClick) {
    const b = el("button", label);
    b.type = "button";
    b.addEventListener("click", async () => {
      b.disabled = true;
      try { await onClick(); } finally { b.disabled = false; }
    });
    return b;
  }

  // Locally the count comes back; in the cluster the operator retries (annotation) later.
  const retriedText = (a) => (a.retried === null ? "retry requested (" + a.requested + ")"
    : "retried " + a.retried + " items");
  const can = (action) => meta.actions.enabled && meta.actions.available.includes(action);

  async function act(path, body, done) {
    const answer = await post(runPath(meta.run) + path, body);
    if (answer) { toast(done(answer)); await refreshRun(); }
  }

  async function refreshRun() {
    const base = runPath(meta.run);
    const [summary, timeline, targets, errors, failed, stuck, batches] = await Promise.all([
      getJSON(base), getJSON(base + "/timeline"), getJSON(base + "/targets"),
      getJSON(base + "/errors"), getJSON(base + "/failed"), getJSON(base + "/stuck"),
      getJSON(base + "/batches")]);
    const run = summary.run;
    document.getElementById("phase").textContent = run.phase;
    const progress = document.querySelector(".summary .progress");
    progress.replaceChildren(bar(run.progress),
      el("span", (100 * run.progress).toFixed(1) + "%", "pct"));
    const counts = document.getElementById("counts");
    counts.replaceChildren();
    const c = run.counts;
    [["total", fmtInt(c.total)], ["pending", fmtInt(c.pending)],
      ["processing", fmtInt(c.processing)], ["completed", fmtInt(c.completed)],
      ["retrying", fmtInt(c.retrying)], ["failed", fmtInt(c.failed)], ["stuck", fmtInt(c.stuck)],
      ["throughput", fmtRate(run.throughput)], ["ETA", fmtEta(run.eta_seconds)],
      ["cost", fmtCost(run.cost)]].forEach(([k, v]) => {
      const d = el("div", null, "count");
      d.dataset.name = k;
      d.append(el("dt", k), el("dd", v));
      counts.appendChild(d);
    });
    const runActions = document.getElementById("run-actions");
    runActions.replaceChildren();
    if (can("retry") && c.failed > 0) {
      runActions.appendChild(button("Retry failed", () => act("/retry", {},
        retriedText)));
    }
    if (can("suspend") && run.phase === "Running") {
      runActions.appendChild(button("Suspend", () => act("/suspend", {}, () => "suspending")));
    }
    if (can("resume") && run.phase === "Suspended") {
      runActions.appendChild(button("Resume", () => act("/resume", {}, () => "resuming")));
    }
    drawChart(timeline.points);
    fillTable(document.getElementById("targets"),
      ["target", "total", "completed", "retrying", "failed", "throughput", "p50", "p95",
        "p99", "tokens in", "tokens out", "429s", "cost", "paused"],
      targets.targets, (t) => {
        let paused = t.paused_at ? "paused: " + t.pause_reason : "—";
        if (t.paused_at && can("resume-target")) {
          const cell = el("span", paused + " ");
          cell.appendChild(button("Resume", () => act("/resume-target", { target: t.target },
            (a) => "resumed " + a.resumed.join(", "))));
          paused = cell;
        }
        return [t.target, fmtInt(t.total), fmtInt(t.completed), fmtInt(t.retrying),
          fmtInt(t.failed), fmtRate(t.throughput), fmtMs(t.latency_p50_ms),
          fmtMs(t.latency_p95_ms), fmtMs(t.latency_p99_ms), fmtInt(t.tokens_in),
          fmtInt(t.tokens_out), fmtInt(t.deferrals), fmtCost(t.cost), paused];
      });
    fillTable(document.getElementById("errors"), ["class", "message", "items", ""],
      errors.errors, (e) => [e.error_class, e.error_message, fmtInt(e.count),
        can("retry") ? button("Retry " + e.error_class, () => act("/retry",
          { error_class: e.error_class }, retriedText)) : ""]);
    fillTable(document.getElementById("failed"),
      ["item", "prompt", "target", "attempts", "class", "error", "will retry", "at"],
      failed.items, (i) => [i.external_id, i.prompt_excerpt +
        (i.prompt_chars > i.prompt_excerpt.length ? "…" : ""), i.target, i.attempts,
      i.error_class, i.error_message, i.will_retry ? "yes" : "no", fmtTime(i.updated_at)]);
    fillTable(document.getElementById("stuck"),
      ["item", "target", "attempts", "lease owner", "lease expired", "updated"],
      stuck.items, (i) => [i.external_id, i.target, i.attempts, i.lease_owner,
        fmtTime(i.lease_expires_at), fmtTime(i.updated_at)]);
    const b = batches.summary;
    document.getElementById("batch-summary").textContent = fmtInt(b.in_batches) +
      " items waiting in " + fmtInt(b.open_batches) + " open batches; " +
      fmtInt(b.answered_by_batch) + " of " + fmtInt(b.answered) + " answers came through a batch";
    fillTable(document.getElementById("batches"),
      ["target", "provider batch", "state", "provider status", "items", "counts", "created"],
      batches.batches, (o) => [o.target, o.provider_batch_id || "—", o.state,
        o.provider_status || "—", fmtInt(o.item_count), JSON.stringify(o.request_counts),
        fmtTime(o.created_at)]);
  }

  // The next refresh waits at least five times as long as this one took: a big run whose
  // panels take a second to read is polled every five seconds or more, never back to back.
  async function tick() {
    const began = performance.now();
    try {
      await (meta.page === "run" ? refreshRun() : refreshRuns());
      setLive(true);
    } catch (err) {
      setLive(false, "not updating: " + err.message);
    }
    const took = performance.now() - began;
    setTimeout(tick, Math.max(meta.refresh * 1000, 5 * took));
  }
  tick();
})();
