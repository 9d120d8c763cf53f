// meshd topology page: reads GET /v1/topology and GET /v1/flows with the login cookie and
// draws the graph with d3 (SVG, so every node and edge is in the DOM).
//
// DOM contract (tests read it; keep it stable):
//   svg#topology g.node[data-id]                         one per TopologyNode
//   svg#topology line.edge[data-from][data-to][data-proto][data-port][data-verdict]
//                with class allowed | denied | would_deny, one per TopologyEdge
//   text.edge-label / line.edge-hit carry the same data-* and open the flow panel on click
//   #flow-panel[data-edge] tr.flow[data-host][data-peer][data-verdict]; .rule (allowed) or
//   pre.needed-rule (denied / would_deny)
//   body[data-updated] counts completed refreshes
"use strict";

(function () {
  const params = new URLSearchParams(window.location.search);
  const POLL_MS = Math.max(500, Number(params.get("refresh")) || 5000);
  const W = 900, H = 640, R = 26;
  let timer = null;
  let selected = null; // the edge whose flows the panel shows
  let view = null;
  let refreshes = 0;

  const $ = (id) => document.getElementById(id);
  const show = (id, on) => $(id).classList.toggle("hidden", !on);

  function protoName(p) {
    return { 1: "icmp", 6: "tcp", 17: "udp", 58: "icmp" }[p] || "proto " + p;
  }
  function portSpec(proto, port) {
    const n = protoName(proto);
    return n === "icmp" ? "icmp" : n.startsWith("proto") ? "any" : n + "/" + port;
  }
  function edgeKey(e) {
    return [e.from, e.to, e.proto, e.port, e.verdict].join("|");
  }
  function groupBy() {
    return ($("group-by").value || "host").trim() || "host";
  }
  function since() {
    return Math.floor(Date.now() / 1000) - Number($("since").value);
  }
  function status(text, error) {
    const s = $("status");
    s.textContent = text;
    s.classList.toggle("error", !!error);
  }

  async function getJson(url) {
    const r = await fetch(url, { credentials: "same-origin" });
    if (r.status === 401) {
      loggedOut();
      throw new Error("logged out");
    }
    if (!r.ok) {
      let msg = r.status + " " + r.statusText;
      try { msg = (await r.json()).message || msg; } catch (e) { /* not JSON */ }
      throw new Error(url + ": " + msg);
    }
    return r.json();
  }

  function loggedOut() {
    if (timer) { clearInterval(timer); timer = null; }
    show("graph", false); show("controls", false); show("flow-panel", false);
    show("login", true);
    $("token").focus();
  }

  function loggedIn() {
    show("login", false); show("controls", true); show("graph", true);
    refresh();
    if (!timer) timer = setInterval(refresh, POLL_MS);
  }

  async function refresh() {
    const q = "since=" + since() + "&group_by=" + encodeURIComponent(groupBy());
    try {
      view = await getJson("/v1/topology?" + q);
      draw(view);
      refreshes += 1;
      document.body.dataset.updated = String(refreshes);
      status(view.nodes.length + " nodes, " + view.edges.length + " edges; updated " +
        new Date().toLocaleTimeString());
      if (selected) {
        const e = view.edges.find((x) => edgeKey(x) === selected);
        if (e) openPanel(e, false); else closePanel();
      }
    } catch (err) {
      if (err.message !== "logged out") status(err.message, true);
    }
  }

  // Nodes on a circle in id order: stable from one refresh to the next.
  function layout(nodes) {
    const pos = new Map();
    const n = nodes.length;
    const rad = n <= 1 ? 0 : Math.min(W, H) / 2 - R - 40;
    nodes.forEach((d, i) => {
      const a = (2 * Math.PI * i) / Math.max(1, n) - Math.PI / 2;
      pos.set(d.id, { x: W / 2 + rad * Math.cos(a), y: H / 2 + rad * Math.sin(a) });
    });
    return pos;
  }

  // Straight segments between node rims; parallel edges of one pair are shifted apart.
  function geometry(edges, pos) {
    const byPair = new Map();
    edges.forEach((e) => {
      const k = [e.from, e.to].sort().join("\u0000");
      if (!byPair.has(k)) byPair.set(k, []);
      byPair.get(k).push(e);
    });
    const g = new Map();
    byPair.forEach((list) => {
      list.forEach((e, i) => {
        const a = pos.get(e.from), b = pos.get(e.to);
        if (!a || !b) return;
        let dx = b.x - a.x, dy = b.y - a.y;
        const len = Math.hypot(dx, dy) || 1;
        dx /= len; dy /= len;
        // Perpendicular shift, in the same direction whichever way the edge points.
        const sign = e.from < e.to ? 1 : -1;
        const rank = i - (list.length - 1) / 2;
        const off = rank * 18 * sign;
        const px = -dy * off, py = dx * off;
        const x1 = a.x + dx * R + px, y1 = a.y + dy * R + py;
        const x2 = b.x - dx * (R + 6) + px, y2 = b.y - dy * (R + 6) + py;
        // Labels of parallel edges are staggered along them too, so none covers another.
        const t = Math.min(0.85, Math.max(0.15, 0.5 + rank * 0.22 * sign));
        g.set(edgeKey(e), { x1, y1, x2, y2, mx: x1 + (x2 - x1) * t, my: y1 + (y2 - y1) * t - 4 });
      });
    });
    return g;
  }

  function setData(sel) {
    return sel
      .attr("data-from", (d) => d.from)
      .attr("data-to", (d) => d.to)
      .attr("data-proto", (d) => d.proto)
      .attr("data-port", (d) => d.port)
      .attr("data-verdict", (d) => d.verdict);
  }

  function draw(v) {
    const svg = d3.select("#topology").attr("viewBox", "0 0 " + W + " " + H);
    if (svg.select("defs").empty()) {
      const defs = svg.append("defs");
      ["allowed", "denied", "would_deny"].forEach((k) => {
        defs.append("marker").attr("id", "arrow-" + k).attr("viewBox", "0 0 10 10")
          .attr("refX", 9).attr("refY", 5).attr("markerWidth", 12).attr("markerHeight", 12)
          .attr("markerUnits", "userSpaceOnUse").attr("orient", "auto")
          .append("path").attr("d", "M0,0L10,5L0,10z").attr("class", "arrow " + k);
      });
      svg.append("g").attr("class", "edges");
      svg.append("g").attr("class", "nodes");
    }
    const pos = layout(v.nodes);
    const geo = geometry(v.edges, pos);
    const edges = v.edges.filter((e) => geo.has(edgeKey(e)));
    const at = (d) => geo.get(edgeKey(d));

    const eg = svg.select("g.edges").selectAll("g.edge-group").data(edges, edgeKey)
      .join((enter) => {
        const g = enter.append("g").attr("class", "edge-group");
        g.append("line").attr("class", "edge-hit");
        g.append("line");
        g.append("text").attr("class", "edge-label");
        return g;
      });
    eg.select("line.edge-hit").call(setData)
      .attr("x1", (d) => at(d).x1).attr("y1", (d) => at(d).y1)
      .attr("x2", (d) => at(d).x2).attr("y2", (d) => at(d).y2)
      .on("click", (d) => openPanel(d, true));
    eg.select("line:not(.edge-hit)").call(setData)
      .attr("class", (d) => "edge " + d.verdict + (edgeKey(d) === selected ? " selected" : ""))
      .attr("marker-end", (d) => "url(#arrow-" + d.verdict + ")")
      .attr("x1", (d) => at(d).x1).attr("y1", (d) => at(d).y1)
      .attr("x2", (d) => at(d).x2).attr("y2", (d) => at(d).y2);
    eg.select("text.edge-label").call(setData)
      .attr("x", (d) => at(d).mx).attr("y", (d) => at(d).my)
      .text((d) => portSpec(d.proto, d.port))
      .on("click", (d) => openPanel(d, true));
    eg.selectAll("title").remove();
    eg.append("title").text((d) => d.from + " \u2192 " + d.to + " " + portSpec(d.proto, d.port) +
      " " + d.verdict + ": " + d.flows + " flows, " + d.packets + " packets, " + d.bytes + " bytes");

    const ng = svg.select("g.nodes").selectAll("g.node").data(v.nodes, (d) => d.id)
      .join((enter) => {
        const g = enter.append("g");
        g.append("circle").attr("r", R);
        g.append("text").attr("class", "name").attr("dy", R + 14);
        g.append("text").attr("class", "count").attr("dy", 4);
        g.append("title");
        return g;
      });
    ng.attr("class", (d) => "node" + (d.learning > 0 ? " learning" : "") +
        (d.id.startsWith("outside:") ? " outside" : ""))
      .attr("data-id", (d) => d.id)
      .attr("data-learning", (d) => d.learning)
      .attr("transform", (d) => "translate(" + pos.get(d.id).x + "," + pos.get(d.id).y + ")");
    ng.select("text.name").text((d) => d.id);
    ng.select("text.count").text((d) => d.hosts.length > 1 ? d.hosts.length : "");
    ng.select("title").text((d) => d.id + ": " + d.hosts.join(", ") +
      (d.learning > 0 ? " (" + d.learning + " learning)" : ""));
  }

  // The node a flow's end belongs to under the current grouping (as the coordinator groups).
  function nodeOf(name, labels, src) {
    if (!name) return "outside:" + src;
    const k = view ? view.group_by : groupBy();
    if (k === "host") return name;
    const v = labels && labels[k];
    return k + "=" + (v === undefined ? "(none)" : v);
  }

  // Opener and responder of a stored flow row.
  function ends(f) {
    const me = { name: f.host, labels: f.host_labels };
    const other = { name: f.peer, labels: f.peer_labels || {}, src: f.src };
    return f.direction === "outbound" ? [me, other] : [other, me];
  }

  function selectorFor(nodeId) {
    const k = view ? view.group_by : "host";
    if (k === "host") return "{host: " + nodeId + "}";
    const i = nodeId.indexOf("=");
    const v = nodeId.slice(i + 1);
    return v === "(none)" ? "{" + k + ": {exists: false}}" : "{" + k + ": " + v + "}";
  }

  function neededRule(e) {
    const clean = (s) => s.replace(/[^A-Za-z0-9_-]+/g, "-").replace(/^-+|-+$/g, "");
    return "- name: " + clean(e.from) + "-to-" + clean(e.to) + "-" + clean(portSpec(e.proto, e.port)) +
      "\n  from: " + selectorFor(e.from) +
      "\n  to: " + selectorFor(e.to) +
      "\n  ports: [" + portSpec(e.proto, e.port) + "]";
  }

  function cell(tr, text) {
    tr.append("td").text(text);
  }

  async function openPanel(e, fresh) {
    selected = edgeKey(e);
    d3.selectAll("#topology line.edge").classed("selected", (d) => edgeKey(d) === selected);
    const panel = d3.select("#flow-panel").attr("data-edge", selected);
    show("flow-panel", true);
    if (fresh) {
      // data-rows is set once this edge's rows are shown (tests wait for it).
      panel.attr("data-rows", null).html("").append("p").text("loading flows\u2026");
    }
    // The opening hosts of the edge: their rows cover every flow of it (a source outside
    // the mesh reports nothing: its responders do).
    const side = e.from.startsWith("outside:") ? 1 : 0;
    const openers = Array.from(new Set(e.pairs.map((p) => p.split(">")[side]))).slice(0, 20);
    let rows = [];
    try {
      const lists = await Promise.all(openers.map((h) =>
        getJson("/v1/flows?since=" + view.since + "&host=" + encodeURIComponent(h))));
      const seen = new Set();
      lists.flat().forEach((f) => {
        const [o, r] = ends(f);
        if (nodeOf(o.name, o.labels, o.src) !== e.from || nodeOf(r.name, r.labels, r.src) !== e.to) return;
        if (f.proto !== e.proto || f.port !== e.port || f.verdict !== e.verdict) return;
        const k = JSON.stringify(f);
        if (!seen.has(k)) { seen.add(k); rows.push(f); }
      });
    } catch (err) {
      if (err.message === "logged out") return;
      panel.html("").append("p").attr("class", "error").text(err.message);
      return;
    }
    if (selected !== edgeKey(e)) return; // another edge was clicked meanwhile
    panel.html("");
    panel.append("h2").text(e.from + " \u2192 " + e.to + " " + portSpec(e.proto, e.port));
    panel.append("p").attr("class", "verdict " + e.verdict).text(
      e.verdict + ": " + e.flows + " connections, " + e.packets + " packets, " + e.bytes + " bytes");
    if (e.verdict === "allowed") {
      const rules = Array.from(new Set(e.rules.concat(rows.map((f) => f.rule).filter(Boolean)))).sort();
      const p = panel.append("p").text("allowed by ");
      rules.forEach((r, i) => {
        if (i) p.append("span").text(", ");
        p.append("code").attr("class", "rule").text(r);
      });
    } else if (e.from.startsWith("outside:")) {
      panel.append("p").text("denied: plaintext from outside the mesh to a port the policy " +
        "covers. No rule admits unencrypted traffic: run meshd on the source host and grant " +
        "its labels this port.");
    } else {
      panel.append("p").text(e.verdict === "denied"
        ? "denied: no rule allows it. A rule that would:"
        : "would be denied (learning mode). The rule that would be needed:");
      panel.append("pre").attr("class", "needed-rule").text(neededRule(e));
    }
    const t = panel.append("table");
    const head = t.append("tr");
    ["reported by", "peer", "direction", "packets", "bytes", "connections", "first seen", "last seen", "rule"]
      .forEach((h) => head.append("th").text(h));
    rows.forEach((f) => {
      const tr = t.append("tr").attr("class", "flow")
        .attr("data-host", f.host).attr("data-peer", f.peer || ("outside:" + f.src))
        .attr("data-verdict", f.verdict);
      cell(tr, f.host);
      cell(tr, f.peer || f.src);
      cell(tr, f.direction);
      cell(tr, f.packets);
      cell(tr, f.bytes);
      cell(tr, f.flows);
      cell(tr, new Date(f.first_seen * 1000).toLocaleString());
      cell(tr, new Date(f.last_seen * 1000).toLocaleString());
      cell(tr, f.rule || "");
    });
    panel.attr("data-rows", rows.length);
  }

  function closePanel() {
    selected = null;
    show("flow-panel", false);
  }

  async function checkSession() {
    const r = await fetch("/ui/session", { credentials: "same-origin" });
    if (r.status === 204) loggedIn(); else loggedOut();
  }

  document.addEventListener("DOMContentLoaded", () => {
    if (params.get("group_by")) $("group-by").value = params.get("group_by");
    $("login-form").addEventListener("submit", async (ev) => {
      ev.preventDefault();
      $("login-error").textContent = "";
      const body = new URLSearchParams({ token: $("token").value.trim() });
      const r = await fetch("/ui/login", { method: "POST", body, credentials: "same-origin" });
      $("token").value = "";
      if (r.status === 204) { loggedIn(); return; }
      let msg = "login failed (" + r.status + ")";
      try { msg = (await r.json()).message || msg; } catch (e) { /* not JSON */ }
      $("login-error").textContent = msg;
    });
    $("logout").addEventListener("click", async () => {
      await fetch("/ui/logout", { method: "POST", credentials: "same-origin" });
      loggedOut();
    });
    $("controls").addEventListener("submit", (ev) => { ev.preventDefault(); closePanel(); refresh(); });
    $("group-by").addEventListener("change", () => { closePanel(); refresh(); });
    $("since").addEventListener("change", refresh);
    checkSession();
  });
})();
