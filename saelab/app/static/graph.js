// saelab attribution graph view: /graph lists the graphs, /graph/NAME draws one.
// Nodes sit by layer (rows, embeddings at the bottom, targets at the top) and position
// (columns); edge width follows |weight|. Hover a node for its details and top tokens;
// click a feature to open its feature page (or, in pin mode, to pin it); pinned nodes
// form the subgraph below, where they can be grouped into supernodes and saved.
// Model text only ever enters the page through textContent.
"use strict";

const main = document.getElementById("main");
const hover = document.getElementById("hover");
const SVG = "http://www.w3.org/2000/svg";

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  }
  return node;
}

function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) node.setAttribute(k, v);
  return node;
}

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)};
  const res = await fetch("/api/graphs" + path, opts);
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

function showError(err) {
  main.replaceChildren(el("p", {class: "error", id: "error"}, err.message || String(err)));
}

const kindOf = (n) => ({"cross layer transcoder": "feature", "mlp reconstruction error": "error",
                        "embedding": "embedding", "logit": "logit"})[n.feature_type] || "feature";
const fmt = (v) => (v === null || v === undefined) ? "–" : Number(v).toPrecision(3);

async function listPage() {
  const graphs = await api("");
  const rows = graphs.map((g) => el("tr", {},
    el("td", {}, el("a", {href: "/graph/" + g.name.split("/").map(encodeURIComponent).join("/")}, g.name)),
    el("td", {}, g.error ? g.error : g.prompt), el("td", {class: "num"}, g.nodes ?? ""),
    el("td", {class: "num"}, g.links ?? "")));
  main.replaceChildren(el("h1", {}, "Attribution graphs"),
    graphs.length ? el("table", {id: "graphs"}, el("tr", {}, el("th", {}, "graph"), el("th", {}, "prompt"),
      el("th", {}, "nodes"), el("th", {}, "links")), ...rows)
      : el("p", {class: "muted"}, "No graphs here: write one with saelab graph --out DIR under the served folder."));
}

function layout(doc) {
  // Row per layer: "E" at the bottom, transcoder layers, the targets' layer at the top.
  const layers = [...new Set(doc.nodes.map((n) => n.layer))];
  const rank = (l) => (l === "E" ? -1 : Number(l));
  layers.sort((a, b) => rank(a) - rank(b));
  const nPos = doc.metadata.prompt_tokens.length;
  const cell = {};
  for (const n of doc.nodes) (cell[n.layer + "|" + n.ctx_idx] ||= []).push(n);
  const colW = Math.max(...Object.values(cell).map((c) => c.length), 1) * 14 + 20;
  const rowH = 34, left = 60, top = 20;
  const pos = {};
  for (const [key, nodes] of Object.entries(cell)) {
    nodes.forEach((n, i) => {
      const row = layers.length - 1 - layers.indexOf(n.layer);
      pos[n.node_id] = {x: left + n.ctx_idx * colW + 10 + i * 14, y: top + row * rowH + rowH / 2};
    });
  }
  return {layers, pos, colW, rowH, left, top, width: left + nPos * colW + 20,
          height: top + layers.length * rowH + 60, nPos};
}

function draw(doc, state, onlyIds) {
  const keep = onlyIds ? new Set(onlyIds) : null;
  const nodes = keep ? doc.nodes.filter((n) => keep.has(n.node_id)) : doc.nodes;
  const sub = {...doc, nodes};
  const L = layout(sub);
  const g = svg("svg", {class: "graph", width: L.width, height: L.height});
  L.layers.forEach((layer, i) => {
    const t = svg("text", {x: 4, y: L.top + (L.layers.length - 1 - i) * L.rowH + L.rowH / 2 + 4});
    t.textContent = layer === "E" ? "emb" : (kindOf(nodes.find((n) => n.layer === layer) || {}) === "logit" ? "out" : "L" + layer);
    g.appendChild(t);
  });
  doc.metadata.prompt_tokens.forEach((tok, p) => {
    if (keep && !nodes.some((n) => n.ctx_idx === p)) return;
    const t = svg("text", {x: L.left + p * L.colW + 6, y: L.height - 20});
    const shown = tok.replace(/\n/g, "↵");
    t.textContent = shown.length > 14 ? shown.slice(0, 13) + "…" : shown;
    g.appendChild(t);
  });
  const links = doc.links.filter((l) => L.pos[l.source] && L.pos[l.target]);
  const maxW = Math.max(...links.map((l) => Math.abs(l.weight)), 1e-12);
  for (const l of links) {
    const a = L.pos[l.source], b = L.pos[l.target];
    g.appendChild(svg("line", {x1: a.x, y1: a.y, x2: b.x, y2: b.y, class: l.weight >= 0 ? "pos" : "neg",
                               "stroke-width": (0.3 + 5.7 * Math.abs(l.weight) / maxW).toFixed(2),
                               "data-source": l.source, "data-target": l.target}));
  }
  for (const n of nodes) {
    const p = L.pos[n.node_id];
    const kind = kindOf(n);
    const shape = kind === "feature" ? svg("circle", {cx: p.x, cy: p.y, r: 5.5})
      : svg("rect", {x: p.x - 5, y: p.y - 5, width: 10, height: 10});
    shape.setAttribute("class", "node " + kind + (state.pinned.has(n.node_id) ? " pinned" : ""));
    shape.setAttribute("data-id", n.node_id);
    shape.addEventListener("mouseenter", (e) => showHover(n, e));
    shape.addEventListener("mousemove", (e) => placeHover(e));
    shape.addEventListener("mouseleave", () => { hover.hidden = true; });
    shape.addEventListener("click", () => state.click(n));
    g.appendChild(shape);
  }
  return g;
}

function showHover(n, e) {
  const lines = [n.node_id + "  (" + n.feature_type + ")", "position " + n.ctx_idx + ", layer " + n.layer];
  if (n.activation !== null && n.activation !== undefined) lines.push("activation " + fmt(n.activation));
  if (n.influence !== null && n.influence !== undefined) lines.push("cumulative influence " + fmt(n.influence));
  if (n.clerp) lines.push(n.clerp);
  if (n.label) lines.push("label: " + n.label);
  if (n.top_tokens) lines.push("top tokens: " + n.top_tokens.map((t) => JSON.stringify(t)).join(" "));
  else if (kindOf(n) === "feature") lines.push("(no feature index of this layer is served)");
  hover.textContent = lines.join("\n");
  hover.hidden = false;
  placeHover(e);
}

function placeHover(e) {
  hover.style.left = (e.clientX + 14) + "px";
  hover.style.top = (e.clientY + 10) + "px";
}

async function graphPage(name) {
  const doc = await api("/" + name.split("/").map(encodeURIComponent).join("/"));
  const q = doc.qParams || {};
  const state = {pinned: new Set(q.pinnedIds || []), supernodes: q.supernodes || [], mode: "open",
                 chosen: new Set()};
  const byId = Object.fromEntries(doc.nodes.map((n) => [n.node_id, n]));
  const full = el("div", {class: "gwrap", id: "full"});
  const subgraph = el("div", {class: "gwrap", id: "subgraph"});
  const pinnedList = el("ul", {id: "pinned"});
  const superList = el("ul", {id: "supernodes"});
  const status = el("span", {class: "muted", id: "status"});
  const label = el("input", {type: "text", id: "super-label", placeholder: "supernode label"});

  function render() {
    full.replaceChildren(draw(doc, state));
    subgraph.replaceChildren(state.pinned.size ? draw(doc, state, [...state.pinned])
      : el("p", {class: "muted"}, "Pin nodes (pin mode, then click) to build a subgraph."));
    pinnedList.replaceChildren(...[...state.pinned].map((id) => el("li", {},
      el("input", {type: "checkbox", "data-id": id, onchange: (e) => {
        if (e.target.checked) state.chosen.add(id); else state.chosen.delete(id);
      }}), " " + id + " ", el("span", {class: "muted"}, (byId[id] || {}).feature_type || ""))));
    superList.replaceChildren(...state.supernodes.map((s, i) => el("li", {},
      s[0] + ": " + s.slice(1).join(", ") + " ",
      el("button", {onclick: () => { state.supernodes.splice(i, 1); render(); }}, "ungroup"))));
  }
  state.click = (n) => {
    if (state.mode === "open" && n.href) { window.location.href = n.href; return; }
    if (state.pinned.has(n.node_id)) { state.pinned.delete(n.node_id); state.chosen.delete(n.node_id); }
    else state.pinned.add(n.node_id);
    render();
  };
  const mode = el("select", {id: "mode", onchange: (e) => { state.mode = e.target.value; }},
    el("option", {value: "open"}, "click opens the feature page"),
    el("option", {value: "pin"}, "click pins or unpins a node"));
  const group = el("button", {id: "group", onclick: () => {
    const ids = [...state.chosen];
    if (!label.value.trim() || ids.length < 1) { status.textContent = "tick pinned nodes and give a label"; return; }
    state.supernodes.push([label.value.trim(), ...ids]);
    state.chosen.clear(); label.value = ""; render();
  }}, "group into supernode");
  const save = el("button", {id: "save", onclick: async () => {
    try {
      const r = await api("/" + name.split("/").map(encodeURIComponent).join("/") + "/view",
                          {pinnedIds: [...state.pinned], supernodes: state.supernodes});
      status.textContent = "saved " + r.pinnedIds + " pinned, " + r.supernodes + " supernodes";
    } catch (err) { status.textContent = err.message; }
  }}, "save");
  const m = doc.metadata;
  main.className = "wide";
  main.replaceChildren(
    el("h1", {}, "Graph " + name), el("p", {id: "prompt"}, m.prompt),
    el("p", {class: "muted"}, doc.nodes.length + " nodes, " + doc.links.length + " links; model " + m.scan +
       ". Orange edges raise their target, blue lower it; width by |weight|."),
    el("p", {}, mode), full,
    el("h2", {}, "Subgraph of pinned nodes"), subgraph,
    el("div", {class: "panel"},
      el("div", {}, el("h3", {}, "Pinned"), pinnedList, label, " ", group),
      el("div", {}, el("h3", {}, "Supernodes"), superList, save, " ", status)));
  render();
}

const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
(parts.length > 1 ? graphPage(parts.slice(1).join("/")) : listPage()).catch(showError);
