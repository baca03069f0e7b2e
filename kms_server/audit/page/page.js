"use strict";
(function () {
  const FIELDS = ["vm", "host", "object", "client", "operation", "result", "since", "until", "limit"];
  const COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf"];
  const SVG = "http://www.w3.org/2000/svg";
  const byId = (id) => document.getElementById(id);

  function currentFilters() {
    const query = new URLSearchParams();
    for (const name of FIELDS) {
      const value = byId("filter-" + name).value.trim();
      if (value && !(name === "limit" && value === "500")) query.set(name, value);
    }
    return query;
  }

  function filtersFromUrl() {
    const query = new URLSearchParams(window.location.search);
    for (const name of FIELDS) {
      const value = query.get(name);
      if (value !== null) byId("filter-" + name).value = value;
    }
  }

  async function getJson(path) {
    const response = await fetch(path, {credentials: "same-origin", cache: "no-store"});
    if (!response.ok) {
      const text = (await response.text()).trim();
      throw new Error(text || ("HTTP " + response.status));
    }
    return response.json();
  }

  function clear(node) {
    while (node.firstChild) node.removeChild(node.firstChild);
  }

  function cell(row, text, name) {
    const td = document.createElement("td");
    td.className = "c-" + name;
    td.textContent = text === null || text === undefined ? "" : String(text);
    row.appendChild(td);
    return td;
  }

  function showRecords(data) {
    const body = document.querySelector("#records tbody");
    clear(body);
    for (const r of data.records) {
      const row = document.createElement("tr");
      row.dataset.seq = String(r.seq);
      if (r.result !== "SUCCESS") row.className = "failed";
      cell(row, r.seq, "seq");
      cell(row, r.time, "time");
      const who = cell(row, r.client, "client");
      if (r.subject) who.title = r.subject + (r.username ? " (user " + r.username + ")" : "");
      cell(row, r.peer, "peer");
      cell(row, r.operation, "operation");
      cell(row, r.uid, "uid");
      cell(row, r.x_name, "x-name");
      cell(row, r.x_component, "x-component");
      const result = cell(row, r.reason ? r.result + " / " + r.reason : r.result, "result");
      if (r.detail) result.title = r.detail;
      body.appendChild(row);
    }
    const shown = data.records.length;
    byId("summary").textContent = shown === data.matched
      ? shown + " records (oldest first)"
      : "the newest " + shown + " of " + data.matched + " matching records (oldest first)";
  }

  function svgNode(parent, name, attributes, text) {
    const node = document.createElementNS(SVG, name);
    for (const [key, value] of Object.entries(attributes)) node.setAttribute(key, String(value));
    if (text !== undefined) node.textContent = text;
    parent.appendChild(node);
    return node;
  }

  function timeLabel(epoch) {
    return new Date(epoch * 1000).toISOString().replace(".000Z", "Z").replace("T", " ");
  }

  function drawPlot(data) {
    const svg = byId("plot");
    clear(svg);
    const W = 960, H = 280, left = 50, right = 190, top = 15, bottom = 40;
    const width = W - left - right, height = H - top - bottom;
    svg.dataset.series = String(data.series.length);
    if (!data.series.length) {
      svgNode(svg, "text", {x: left, y: H / 2, id: "plot-empty"}, "No key accesses for this selection.");
      return;
    }
    let peak = 1;
    for (const s of data.series) for (const c of s.counts) peak = Math.max(peak, c);
    const n = data.buckets;
    const x = (i) => left + (n === 1 ? width / 2 : (i * width) / (n - 1));
    const y = (c) => top + height - (c * height) / peak;
    svgNode(svg, "line", {x1: left, y1: top + height, x2: left + width, y2: top + height, stroke: "#888"});
    svgNode(svg, "line", {x1: left, y1: top, x2: left, y2: top + height, stroke: "#888"});
    svgNode(svg, "text", {x: left - 6, y: top + 4, "text-anchor": "end"}, String(peak));
    svgNode(svg, "text", {x: left - 6, y: top + height, "text-anchor": "end"}, "0");
    svgNode(svg, "text", {x: left, y: H - 20}, timeLabel(data.start));
    svgNode(svg, "text", {x: left + width, y: H - 20, "text-anchor": "end"},
      timeLabel(data.start + (n - 1) * data.bucket_seconds));
    svgNode(svg, "text", {x: left + width / 2, y: H - 4, "text-anchor": "middle"},
      "accesses per " + data.bucket_seconds + " s");
    data.series.forEach((s, index) => {
      const color = COLORS[index % COLORS.length];
      const points = s.counts.map((c, i) => x(i) + "," + y(c)).join(" ");
      svgNode(svg, "polyline", {points: points, fill: "none", stroke: color, "stroke-width": 2, class: "series"});
      s.counts.forEach((c, i) => {
        if (!c) return;
        const dot = svgNode(svg, "circle", {cx: x(i), cy: y(c), r: 3.5, fill: color, class: "point"});
        dot.setAttribute("data-vm", s.vm);
        dot.setAttribute("data-count", String(c));
        svgNode(dot, "title", {}, s.vm + ": " + c + " at " + timeLabel(data.start + i * data.bucket_seconds));
      });
      const ly = top + 14 + index * 18;
      svgNode(svg, "rect", {x: left + width + 15, y: ly - 9, width: 10, height: 10, fill: color});
      svgNode(svg, "text", {x: left + width + 30, y: ly, class: "legend"}, s.vm + " (" + s.total + ")");
    });
    if (data.other_vms) {
      svgNode(svg, "text", {x: left + width + 15, y: top + 14 + data.series.length * 18},
        "+ " + data.other_vms + " other VMs");
    }
  }

  function showVerification(v) {
    const status = byId("verify-status");
    status.dataset.ok = v.ok ? "true" : "false";
    status.className = v.ok ? "ok" : "bad";
    if (v.ok) {
      status.textContent = "Chain intact: " + v.records + " records verified" +
        (v.signatures_checked ? "" : " (checkpoint signatures not checked: no audit key configured)");
    } else {
      status.textContent = "Chain BROKEN at record " + v.first_problem.seq + ": " + v.first_problem.text;
    }
    const details = [
      v.records + " records" + (v.records ? " (" + v.first_seq + " to " + v.last_seq + ")" : ""),
      v.checkpoints + " signed checkpoints" + (v.last_checkpoint ? ", the last at record " + v.last_checkpoint : ""),
      v.unsigned_tail + " records after the last checkpoint",
    ];
    if (v.problems.length > 1) details.push(v.problems.length + " problems found");
    details.push("checked " + v.checked_at);
    byId("verify-details").textContent = details.join(" \u00b7 ");
  }

  async function load() {
    const query = currentFilters();
    const error = byId("error");
    error.textContent = "";
    const plotQuery = new URLSearchParams();
    for (const name of ["vm", "since", "until"]) if (query.get(name)) plotQuery.set(name, query.get(name));
    const results = await Promise.allSettled([
      getJson("/api/records?" + query).then(showRecords),
      getJson("/api/activity?" + plotQuery).then(drawPlot),
    ]);
    const failures = results.filter((r) => r.status === "rejected").map((r) => r.reason.message);
    error.textContent = failures.join("\n");
    document.body.dataset.loaded = "true";
  }

  async function verify() {
    try {
      showVerification(await getJson("/api/verify"));
    } catch (e) {
      const status = byId("verify-status");
      status.dataset.ok = "unknown";
      status.className = "bad";
      status.textContent = "Verification could not run: " + e.message;
    }
  }

  byId("filters").addEventListener("submit", (event) => {
    event.preventDefault();
    const query = currentFilters().toString();
    window.history.replaceState(null, "", query ? "?" + query : window.location.pathname);
    document.body.dataset.loaded = "false";
    load();
  });
  byId("clear").addEventListener("click", () => {
    for (const name of FIELDS) byId("filter-" + name).value = name === "limit" ? "500" : "";
    byId("apply").click();
  });

  filtersFromUrl();
  load();
  verify();
})();
