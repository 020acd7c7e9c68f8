// saelab scope browser: the index of a scope (pickers, metrics table, metric-vs-depth plots),
// search across every SAE of the scope, and steering with any of them. Loaded before app.js,
// whose helpers (el, api, fmt, showToken, shade, featureUrl, showError, steerPage) it calls.
// Model text goes into the page through textContent only, as in app.js.
"use strict";

const METRICS = ["l0", "fvu", "delta_ce", "loss_recovered", "kl", "dead_frac", "dense_frac"];
const KIND_COLOURS = ["#3b6ea5", "#d9822b", "#2e8b57", "#9b4dca", "#c0392b", "#7f8c8d"];
const SVGNS = "http://www.w3.org/2000/svg";

function scopeNav() {
  nav.replaceChildren(el("a", {href: "/"}, "scope"),
                      el("a", {href: "/scope/search"}, "search across the scope"),
                      el("a", {href: "/scope/steer"}, "steering"));
}

function uniq(values) { return [...new Set(values)].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0)); }

function svgEl(tag, attrs, text) {
  const node = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
  if (text !== undefined) node.textContent = text;
  return node;
}

// One line per site kind (and width / target L0 when the scope has several): metric against layer.
function depthPlot(rows, metric, kinds) {
  const w = 520, h = 240, left = 52, bottom = 30, top = 10, right = 150;
  const pts = rows.filter((r) => r.metrics[metric] !== null && r.metrics[metric] !== undefined);
  const svg = svgEl("svg", {width: w + right, height: h + bottom + top, id: "depth-plot"});
  if (!pts.length) { svg.appendChild(svgEl("text", {x: left, y: 40}, "no values of " + metric)); return svg; }
  const xs = pts.map((r) => r.layer), ys = pts.map((r) => r.metrics[metric]);
  const [x0, x1] = [Math.min(...xs), Math.max(...xs)], [y0r, y1r] = [Math.min(...ys), Math.max(...ys)];
  const y0 = Math.min(0, y0r), y1 = y1r === y0 ? y0 + 1 : y1r;
  const X = (x) => left + (x1 === x0 ? (w - left) / 2 : (x - x0) / (x1 - x0) * (w - left - 10));
  const Y = (y) => top + h - (y - y0) / (y1 - y0) * h;
  svg.appendChild(svgEl("line", {x1: left, y1: top + h, x2: w, y2: top + h, stroke: "#888"}));
  svg.appendChild(svgEl("line", {x1: left, y1: top, x2: left, y2: top + h, stroke: "#888"}));
  for (const y of [y0, (y0 + y1) / 2, y1]) {
    svg.appendChild(svgEl("text", {x: left - 4, y: Y(y) + 4, "text-anchor": "end", "font-size": 10}, fmt(y, 2)));
  }
  for (const x of uniq(xs)) {
    svg.appendChild(svgEl("text", {x: X(x), y: top + h + 14, "text-anchor": "middle", "font-size": 10}, String(x)));
  }
  svg.appendChild(svgEl("text", {x: (left + w) / 2, y: top + h + 28, "text-anchor": "middle", "font-size": 11}, "layer"));
  const groups = uniq(rows.map((r) => r.width + "/" + r.target_l0));  // dashed lines tell them apart
  const several = groups.length > 1;
  const series = new Map();
  for (const r of pts) {
    const key = r.site_kind + (several ? ` w${r.width} target L0 ${fmt(r.target_l0)}` : "");
    if (!series.has(key)) series.set(key, {kind: r.site_kind, group: groups.indexOf(r.width + "/" + r.target_l0), pts: []});
    series.get(key).pts.push(r);
  }
  let row = 0;
  for (const [key, s] of series) {
    const colour = KIND_COLOURS[kinds.indexOf(s.kind) % KIND_COLOURS.length];
    const sorted = s.pts.sort((a, b) => a.layer - b.layer);
    svg.appendChild(svgEl("polyline", {fill: "none", stroke: colour, "stroke-width": 1.5, class: "series",
      "stroke-dasharray": ["", "6 3", "2 2", "8 2 2 2"][s.group % 4],
      "data-series": key, points: sorted.map((r) => `${X(r.layer)},${Y(r.metrics[metric])}`).join(" ")}));
    for (const r of sorted) {
      const c = svgEl("circle", {cx: X(r.layer), cy: Y(r.metrics[metric]), r: 3, fill: colour});
      c.appendChild(svgEl("title", {}, `${r.id}: ${metric} ${fmt(r.metrics[metric])}`));
      svg.appendChild(c);
    }
    svg.appendChild(svgEl("line", {x1: w + 6, x2: w + 22, y1: top + row * 16 + 5, y2: top + row * 16 + 5,
      stroke: colour, "stroke-width": 2, "stroke-dasharray": ["", "6 3", "2 2", "8 2 2 2"][s.group % 4]}));
    svg.appendChild(svgEl("text", {x: w + 24, y: top + row * 16 + 9, "font-size": 11}, key));
    row += 1;
  }
  return svg;
}

async function scopeHome(scope) {
  scopeNav();
  const rows = scope.saes;
  const kinds = uniq(rows.map((r) => r.site_kind));
  const select = (id, label, values) => el("label", {}, label + " ", el("select", {id},
    el("option", {value: ""}, "all"), ...values.map((v) => el("option", {value: String(v)}, String(v)))));
  const pickers = el("p", {class: "form", id: "pickers"},
    select("pick-kind", "site kind", kinds), select("pick-layer", "layer", uniq(rows.map((r) => r.layer)).sort((a, b) => a - b)),
    select("pick-width", "width", uniq(rows.map((r) => r.width)).sort((a, b) => a - b)),
    select("pick-l0", "target L0", uniq(rows.map((r) => r.target_l0)).sort((a, b) => a - b)),
    el("label", {}, "plot ", el("select", {id: "plot-metric"}, ...METRICS.map((m) => el("option", {value: m}, m)))));
  const table = el("div", {id: "scope-table-box"}), plot = el("div", {id: "plot-box"});
  const bad = rows.filter((r) => r.status !== "ok");
  const stages = Object.entries(scope.stages || {});
  main.replaceChildren(...[el("h1", {}, `Scope of ${scope.model}`),
    el("p", {class: "muted"}, `${rows.length} ${scope.kind === "transcoder" ? "transcoders" : "SAEs"} · ` +
       `${scope.n_layers} layers · d_model ${scope.d_model}`),
    bad.length ? el("div", {id: "scope-missing"}, ...bad.map((r) => el("p", {class: "error"}, `${r.id}: ${r.status} (${r.problem})`))) : null,
    pickers, el("h2", {}, "Metrics against depth"), plot, el("h2", {}, "SAEs"), table,
    stages.length ? el("h2", {}, "Time per stage") : null,
    stages.length ? el("table", {class: "kv", id: "stages"}, ...stages.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {class: "num"}, fmt(v) + " s")))) : null]
    .filter((c) => c !== null));  // replaceChildren would show a null as the text "null"
  const value = (id) => document.getElementById(id).value;
  const render = () => {
    const shown = rows.filter((r) => (!value("pick-kind") || r.site_kind === value("pick-kind"))
      && (!value("pick-layer") || String(r.layer) === value("pick-layer"))
      && (!value("pick-width") || String(r.width) === value("pick-width"))
      && (!value("pick-l0") || String(r.target_l0) === value("pick-l0")));
    plot.replaceChildren(depthPlot(shown, value("plot-metric"), kinds));
    const head = ["SAE", "site", "width", "arch", "average L0", ...METRICS, "status", ""];
    table.replaceChildren(el("table", {id: "scope-table"}, el("tr", {}, ...head.map((h) => el("th", {}, h))),
      ...shown.map((r) => el("tr", {class: r.status === "ok" ? "" : "missing", "data-id": r.id},
        el("td", {}, r.features ? el("a", {href: saeUrl(r.features)}, r.id) : r.id),
        el("td", {}, r.site), el("td", {class: "num"}, fmt(r.width)), el("td", {}, r.arch),
        el("td", {class: "num"}, fmt(r.average_l0)),
        ...METRICS.map((m) => el("td", {class: "num", title: intervalText(r.metrics, m)}, fmt(r.metrics[m]))),
        el("td", {class: r.status === "ok" ? "" : "error", title: r.problem || ""},
           r.status === "ok" ? (r.features ? "ok" : "ok (no feature index: " + r.features_status + ")") : r.status),
        el("td", {}, r.status === "ok" ? el("a", {href: "/scope/steer?sae=" + enc(r.id)}, "steer") : "")))));
  };
  for (const id of ["pick-kind", "pick-layer", "pick-width", "pick-l0", "plot-metric"]) {
    document.getElementById(id).addEventListener("change", render);
  }
  render();
}

function intervalText(m, name) {
  const lo = m[name + "_lo"], hi = m[name + "_hi"];
  return lo === undefined || hi === undefined ? "" : `interval [${fmt(lo)}, ${fmt(hi)}]`;
}

function scopeSearchPage() {
  scopeNav();
  const text = el("textarea", {id: "scope-search-text", placeholder: "type a prompt"});
  const out = el("div", {id: "scope-search-results"});
  const go = el("button", {id: "scope-search-go", onclick: async () => {
    go.disabled = true; out.replaceChildren(el("p", {class: "muted"}, "running the model once, every SAE reading its site…"));
    try { renderScopeSearch(out, await api("scope/search", {text: text.value})); }
    catch (err) { showError(out, err); }
    go.disabled = false;
  }}, "search every SAE");
  main.replaceChildren(el("h1", {}, "Search across the scope"),
    el("p", {class: "muted"}, "One forward of the model; every SAE of the scope encodes its own site. " +
       "Click a token to see the top features of each layer and site on it."), text, el("p", {}, go), out);
}

function renderScopeSearch(out, data) {
  const detail = el("div", {id: "scope-token-features"});
  const line = el("div", {class: "ex", id: "scope-tokens"});
  const order = data.saes.slice().sort((a, b) => a.layer - b.layer || (a.site_kind < b.site_kind ? -1 : 1));
  const count = (i) => order.reduce((n, s) => n + s.tokens[i].length, 0);
  const best = Math.max(1, ...data.tokens.map((t, i) => (t.special ? 0 : count(i))));
  const pick = (i, span) => {
    line.querySelectorAll(".sel").forEach((s) => s.classList.remove("sel"));
    span.classList.add("sel");
    detail.replaceChildren(el("p", {}, "features on ", el("b", {}, JSON.stringify(data.tokens[i].token)), ":"),
      el("table", {id: "scope-hits"}, el("tr", {}, ...["layer", "site", "SAE", "top features"].map((h) => el("th", {}, h))),
        ...order.map((s) => el("tr", {"data-id": s.id}, el("td", {class: "num"}, s.layer), el("td", {}, s.site_kind),
          el("td", {class: "muted"}, s.id),
          el("td", {}, ...(s.tokens[i].length ? s.tokens[i].flatMap((f) => [
            s.features ? el("a", {href: featureUrl(s.features, f.feature)}, String(f.feature)) : String(f.feature),
            el("span", {class: "muted"}, ` (${fmt(f.act)})  `)]) : [el("span", {class: "muted"}, "none")]))))));
  };
  const spans = data.tokens.map((t, i) => {
    const span = el("span", {class: t.special ? "tok pick muted" : "tok pick",
                             style: t.special ? "" : "background:" + shade(count(i), best),
                             title: `${count(i)} features fire here`}, showToken(t.token));
    span.addEventListener("click", () => pick(i, span));
    line.appendChild(span);
    return span;
  });
  const missing = data.unavailable.length ? el("div", {id: "scope-unavailable"}, el("h2", {}, "Not searched"),
    ...data.unavailable.map((u) => el("p", {class: "error"}, `${u.id}: ${u.problem}`))) : null;
  out.replaceChildren(el("h2", {}, `Tokens (click one) · ${data.saes.length} SAEs searched`), line, detail, missing);
  const last = data.tokens.length - 1;
  if (last >= 0) pick(last, spans[last]);
}

async function scopeSteerPage(scope) {
  const params = new URLSearchParams(location.search);
  const ok = scope.saes.filter((r) => r.status === "ok");
  if (!ok.length) throw new Error("every SAE of this scope is missing or corrupt");
  const id = ok.some((r) => r.id === params.get("sae")) ? params.get("sae") : ok[0].id;
  await steerPage(id, {path: "scope/steer", extra: {sae: id}, nav: scopeNav});
  const choose = el("select", {id: "scope-steer-sae", onchange: () => {
    location.href = "/scope/steer?sae=" + enc(choose.value) + "&feature=" + enc(document.getElementById("steer-feature").value);
  }}, ...ok.map((r) => el("option", r.id === id ? {value: r.id, selected: "selected"} : {value: r.id}, r.id)));
  main.insertBefore(el("p", {class: "form"}, el("label", {}, "SAE ", choose)), main.children[1]);
}

// Called by app.js's route(); true when the page was a scope page.
async function scopeRoute(parts) {
  if (parts.length === 0) {
    let scope;
    try { scope = await api("scope"); } catch (err) { return false; }  // not a scope: the SAE list
    await scopeHome(scope);
    return true;
  }
  if (parts[0] !== "scope") return false;
  if (parts[1] === "search" && parts.length === 2) { scopeSearchPage(); return true; }
  if (parts[1] === "steer" && parts.length === 2) { await scopeSteerPage(await api("scope")); return true; }
  throw new Error("no such page: " + location.pathname);
}
