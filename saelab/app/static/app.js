// saelab feature browser: renders pages from the JSON API. Every piece of model
// text goes into the page through textContent (never innerHTML), so a token
// such as <script> is shown, never run.
"use strict";

const main = document.getElementById("main");
const nav = document.getElementById("nav");

function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") node.className = v;
    else if (k === "style") node.style.cssText = v;
    else if (k.startsWith("on")) node.addEventListener(k.slice(2), v);
    else node.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    node.appendChild(typeof c === "object" ? c : document.createTextNode(String(c)));
  }
  return node;
}

function fmt(v, digits = 3) {
  if (v === null || v === undefined || Number.isNaN(v)) return "–";
  if (Number.isInteger(v)) return v.toLocaleString("en");
  return Number(v).toPrecision(digits);
}

async function api(path, body) {
  const opts = body === undefined ? {} : {method: "POST", headers: {"Content-Type": "application/json"},
                                          body: JSON.stringify(body)};
  const res = await fetch("/api/" + path, opts);
  const data = await res.json();
  if (!res.ok) throw new Error(data.error || res.statusText);
  return data;
}

const enc = encodeURIComponent;
const saeUrl = (name) => "/sae/" + enc(name);
const featureUrl = (name, f) => saeUrl(name) + "/feature/" + f;

function showError(where, err) {
  where.replaceChildren(el("p", {class: "error", id: "error"}, err.message || String(err)));
}

function showToken(t) {
  return t.replace(/\n/g, "↵").replace(/\t/g, "⇥").replace(/\r/g, "␍");
}

function shade(v, top) {
  if (!top || !v) return "transparent";
  const a = Math.min(Math.abs(v) / top, 1).toFixed(2);
  return v > 0 ? `rgba(255,140,0,${a})` : `rgba(60,120,220,${a})`;
}

function tokens(toks, values, top, focus, label = "act") {
  const line = el("span", {class: "toks"});
  toks.forEach((t, i) => {
    const v = values[i];
    line.appendChild(el("span", {class: i === focus ? "tok focus" : "tok",
                                 style: "background:" + shade(v, top),
                                 title: label + " " + (v === null ? "–" : fmt(v))}, showToken(t)));
  });
  return line;
}

function example(e, top) {
  return el("div", {class: "ex"}, el("span", {class: "a"}, fmt(e.act)),
            tokens(e.tokens, e.acts, top, e.position - e.start));
}

function histogram(counts, top) {
  const ns = "http://www.w3.org/2000/svg", w = 320, h = 90;
  const peak = Math.max(0, ...counts);
  if (!peak) return el("p", {class: "muted"}, "never fired");
  const svg = document.createElementNS(ns, "svg");
  svg.setAttribute("width", w); svg.setAttribute("height", h + 14);
  const bw = w / counts.length;
  counts.forEach((c, i) => {
    const r = document.createElementNS(ns, "rect");
    r.setAttribute("x", i * bw); r.setAttribute("width", Math.max(bw - 1, 1));
    r.setAttribute("y", h - c / peak * h); r.setAttribute("height", c / peak * h);
    r.setAttribute("fill", "#3b6ea5");
    const t = document.createElementNS(ns, "title"); t.textContent = String(c); r.appendChild(t);
    svg.appendChild(r);
  });
  for (const [x, text, anchor] of [[0, "0", "start"], [w, fmt(top), "end"]]) {
    const t = document.createElementNS(ns, "text");
    t.setAttribute("x", x); t.setAttribute("y", h + 12); t.setAttribute("font-size", "10");
    t.setAttribute("text-anchor", anchor); t.textContent = text; svg.appendChild(t);
  }
  return svg;
}

// ---------------------------------------------------------------- pages

async function home() {
  const [saes, damaged] = await Promise.all([api("saes"), api("damaged")]);
  // damaged indexes are named (as text) above the table, with the command that rebuilds them
  const broken = damaged.length ? [el("div", {id: "damaged"}, el("h2", {}, "Damaged indexes"),
    ...damaged.map((d) => el("p", {class: "error"}, d.message)))] : [];
  main.replaceChildren(el("h1", {}, "SAEs"), ...broken, el("table", {},
    el("tr", {}, ...["SAE", "site", "model", "features", "L0", "alive", "tokens"].map((h) => el("th", {}, h))),
    ...saes.map((s) => el("tr", {},
      el("td", {}, el("a", {href: saeUrl(s.name)}, s.name)), el("td", {}, s.sae.site),
      el("td", {}, s.model), el("td", {class: "num"}, fmt(s.sae.d_sae)),
      el("td", {class: "num"}, fmt(s.summary.l0)), el("td", {class: "num"}, fmt(s.summary.alive)),
      el("td", {class: "num"}, fmt(s.tokens))))));
}

function saeNav(name) {
  nav.replaceChildren(el("a", {href: saeUrl(name)}, name),
                      el("a", {href: saeUrl(name) + "/search"}, "prompt search"),
                      el("a", {href: saeUrl(name) + "/steer"}, "steering"));
}

async function saePage(name) {
  saeNav(name);
  const sae = await api("saes/" + enc(name));
  const s = sae.summary;
  const metrics = [["architecture", sae.sae.architecture], ["site", sae.sae.site],
                   ["d_in → d_sae", sae.sae.d_in + " → " + sae.sae.d_sae], ["model", sae.model],
                   ["tokens collected", fmt(sae.tokens)], ["corpus", sae.corpus],
                   ["L0 (collected)", fmt(s.l0)], ["alive / dead", s.alive + " / " + s.dead],
                   ["density > 0.1", s.dense]];
  for (const [k, m] of Object.entries(sae.eval || {})) metrics.push([k + " (eval)", fmt(m.value)]);
  const goto = el("input", {id: "goto", type: "number", min: 0, placeholder: "feature id"});
  const list = el("div", {id: "feature-list"});
  main.replaceChildren(el("h1", {}, name),
    el("table", {class: "kv", id: "metrics"}, ...metrics.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v)))),
    el("p", {class: "form"}, goto, " ", el("button", {onclick: () => { if (goto.value !== "") location.href = featureUrl(name, goto.value); }}, "open feature")),
    el("h2", {}, "Features"), list);
  featureList(name, list, {sort: "density", order: "desc", offset: 0});
}

async function featureList(name, where, state) {
  const q = `sort=${state.sort}&order=${state.order}&offset=${state.offset}&limit=100`;
  const data = await api(`saes/${enc(name)}/features?${q}`);
  const cols = [["feature", "feature"], ["density", "density"], ["max_act", "max act"],
                ["mean_act", "mean act"], ["count", "firings"], ["label", "label"]];
  const head = el("tr", {}, ...cols.map(([key, title]) => el("th", {class: "sort", onclick: () => {
    const order = state.sort === key && state.order === "desc" ? "asc" : "desc";
    featureList(name, where, {sort: key, order, offset: 0});
  }}, title + (state.sort === key ? (state.order === "desc" ? " ▼" : " ▲") : ""))),
    el("th", {}, "logit lens (top)"));
  const rows = data.features.map((f) => el("tr", {},
    el("td", {}, el("a", {href: featureUrl(name, f.feature)}, f.feature)),
    el("td", {class: "num"}, fmt(f.density)), el("td", {class: "num"}, fmt(f.max_act)),
    el("td", {class: "num"}, fmt(f.mean_act)), el("td", {class: "num"}, fmt(f.count)),
    el("td", {}, f.label || ""), el("td", {class: "muted"}, f.lens_top_tokens.map(showToken).join(" · "))));
  const pager = el("p", {}, `${state.offset + 1}–${state.offset + data.features.length} of ${data.total} `,
    state.offset > 0 ? el("button", {onclick: () => featureList(name, where, {...state, offset: Math.max(0, state.offset - 100)})}, "previous") : null, " ",
    state.offset + 100 < data.total ? el("button", {onclick: () => featureList(name, where, {...state, offset: state.offset + 100})}, "next") : null);
  where.replaceChildren(el("table", {id: "features"}, head, ...rows), pager);
}

async function featurePage(name, fid) {
  saeNav(name);
  const f = await api(`saes/${enc(name)}/features/${enc(fid)}`);
  const top = f.max_act || 0;
  const lens = el("table", {class: "lens"}, ...["top", "bottom"].map((side) => el("tr", {},
    el("th", {}, side === "top" ? "promoted" : "suppressed"),
    ...(f[`lens_${side}_tokens`] || []).map((t, i) => el("td", {}, showToken(t) + " ",
      el("span", {class: "muted"}, fmt(f[`lens_${side}_values`][i])))))));
  const neigh = el("div", {}, ...[["neighbours", "in this SAE", true], ["other_neighbours", "in the other SAE", false]]
    .filter(([k]) => f[k]).map(([k, title, link]) => el("p", {}, el("b", {}, title + ": "),
      ...f[k].flatMap((n, i) => [link ? el("a", {href: featureUrl(name, n)}, n) : String(n),
                                 ` (${fmt(f[k.replace("neighbours", "neighbour_cos")][i], 2)}) `]))));
  const ablation = el("div", {id: "ablation"});
  renderAblation(ablation, f, name, f.feature);
  main.replaceChildren(
    el("h1", {id: "feature-title"}, `Feature ${f.feature}` + (f.label ? " — " + f.label : "")),
    el("p", {}, `density ${fmt(f.density)} · max ${fmt(top)} · mean when active ${fmt(f.mean_act)} · `
                + `${fmt(f.count)} firings in ${fmt(f.n_tokens)} tokens · `,
       el("a", {href: saeUrl(name) + "/steer?feature=" + f.feature}, "steer with it")),
    el("div", {class: "cols"}, el("div", {}, el("h3", {}, "Activations"), histogram(f.hist, top)),
       el("div", {}, el("h3", {}, "Logit lens"), lens, lensFilter(f.lens_filter))),
    el("h3", {}, "Top examples"),
    el("div", {id: "top-examples"}, ...(f.top.length ? f.top.map((e) => example(e, top)) : [el("p", {class: "muted"}, "never fired")])),
    el("h3", {}, "Examples by activation bin"),
    el("div", {id: "bin-examples"}, ...f.bins.filter((b) => b.examples.length).map((b) => el("div", {},
      el("h4", {}, `bin ${b.bin} [${fmt(b.lo)}, ${fmt(b.hi)}): ${fmt(b.count)} firings`),
      ...b.examples.map((e) => example(e, top))))),
    el("h3", {}, "Nearest features"), neigh,
    el("h3", {}, "Ablated text: top and uniform examples"), ablation);
}

// The logit lens's token filter: the rule and every token row it leaves out.
function lensFilter(filt) {
  if (!filt) return null;
  return el("details", {id: "lens-filter"},
    el("summary", {class: "muted"}, `${fmt(filt.n_excluded)} abnormal token rows left out`),
    el("p", {class: "muted"}, filt.rule),
    el("ul", {}, ...Object.entries(filt.reasons).map(([reason, v]) => el("li", {},
      `${reason} (${fmt(v.count)}): `, ...v.examples.flatMap((t, i) => [i ? ", " : "", el("code", {}, showToken(String(t)))]),
      v.count > v.examples.length ? ` and ${fmt(v.count - v.examples.length)} more` : ""))));
}

// Ablated text: data.ablation (the top example) and data.ablation_uniform (one row per
// uniform example, highest bin first), stored in the index or computed live.
function renderAblation(where, data, name, feature) {
  if (!data.ablation) {
    const btn = el("button", {id: "ablate", onclick: async () => {
      btn.disabled = true; btn.textContent = "computing…";
      try { renderAblation(where, await api(`saes/${enc(name)}/features/${feature}/ablation`, {}), name, feature); }
      catch (err) { showError(where, err); }
    }}, "compute it now (loads the model)");
    where.replaceChildren(el("p", {class: "muted"}, "not stored for this feature. "), btn);
    return;
  }
  const rows = [data.ablation, ...(data.ablation_uniform || [])].map((ab) => {
    const scale = Math.max(0, ...ab.deltas.filter((d) => d !== null).map(Math.abs));
    const what = ab.kind === "bin" ? `bin ${ab.bin}` : "top";
    return el("div", {class: "ex " + (ab.kind === "bin" ? "ablation-bin" : "ablation-top")},
      el("span", {class: "a ab", title: `${what}: activation with nothing deleted`}, `${what} ${fmt(ab.base)}`),
      tokens(ab.tokens, ab.deltas, scale, ab.position - ab.start, "change"));
  });
  const windowOnly = data.live && (data.ablation_uniform || []).length
    ? " Computed now: the uniform examples in their shown window alone (the index keeps whole contexts only for top examples)." : "";
  where.replaceChildren(
    el("p", {class: "muted"}, "Each earlier token is shaded by the change of the activation at the outlined token "
       + "when it is deleted (blue: the feature drops); the number is the activation with nothing deleted." + windowOnly),
    ...rows);
}

async function searchPage(name) {
  saeNav(name);
  const text = el("textarea", {id: "search-text", placeholder: "type a prompt"});
  const out = el("div", {id: "search-results"});
  const go = el("button", {id: "search-go", onclick: async () => {
    go.disabled = true; out.replaceChildren(el("p", {class: "muted"}, "running the model…"));
    try { renderSearch(name, out, await api(`saes/${enc(name)}/search`, {text: text.value})); }
    catch (err) { showError(out, err); }
    go.disabled = false;
  }}, "find features");
  main.replaceChildren(el("h1", {}, "Prompt search"), text, el("p", {}, go), out);
}

function renderSearch(name, out, data) {
  const detail = el("div", {id: "token-features"});
  // special tokens (BOS, the attention sink) would set the scale for everything else
  const best = Math.max(0, ...data.tokens.filter((t) => !t.special).map((t) => t.features.length ? t.features[0].act : 0));
  const line = el("div", {class: "ex", id: "search-tokens"});
  const pick = (i, span) => {
    line.querySelectorAll(".sel").forEach((s) => s.classList.remove("sel"));
    span.classList.add("sel");
    const t = data.tokens[i];
    detail.replaceChildren(el("p", {}, "features on ", el("b", {}, JSON.stringify(t.token)), ":"),
      t.features.length ? el("table", {}, ...t.features.map((f) => el("tr", {},
        el("td", {}, el("a", {href: featureUrl(name, f.feature)}, "feature " + f.feature)),
        el("td", {class: "num"}, fmt(f.act))))) : el("p", {class: "muted"}, "none"));
  };
  data.tokens.forEach((t, i) => {
    const v = t.features.length ? t.features[0].act : 0;
    const span = el("span", {class: t.special ? "tok pick muted" : "tok pick",
                             style: t.special ? "" : "background:" + shade(v, best),
                             title: t.features.map((f) => f.feature + ": " + fmt(f.act)).join(", ")}, showToken(t.token));
    span.addEventListener("click", () => pick(i, span));
    line.appendChild(span);
  });
  out.replaceChildren(el("h2", {}, "Tokens (click one)"), line, detail,
    el("h2", {}, "Top features overall"),
    el("table", {id: "overall"}, el("tr", {}, ...["feature", "max act", "at token", "tokens fired"].map((h) => el("th", {}, h))),
      ...data.overall.map((f) => el("tr", {},
        el("td", {}, el("a", {href: featureUrl(name, f.feature)}, "feature " + f.feature)),
        el("td", {class: "num"}, fmt(f.max_act)), el("td", {}, showToken(data.tokens[f.position].token)),
        el("td", {class: "num"}, f.n_tokens)))));
}

// opts (the scope's steering page): path of the steer endpoint, extra body fields, nav renderer.
async function steerPage(name, opts = {}) {
  (opts.nav || saeNav)(name);
  const params = new URLSearchParams(location.search);
  const field = (id, attrs) => el("input", {id, ...attrs});
  const prompt = el("textarea", {id: "steer-prompt"}, "Tell me about your favourite place.");
  const feature = field("steer-feature", {type: "number", min: 0, value: params.get("feature") || "0"});
  const mode = el("select", {id: "steer-mode"}, el("option", {value: "add"}, "add (push along the feature's direction)"),
                  el("option", {value: "clamp"}, "clamp (hold the feature at a value)"));
  // Strength is in site norms (N = the site's mean activation norm on plain prose), the same unit as
  // `saelab generate`: 0.25 changes the text visibly and keeps it fluent; 1 and more give gibberish.
  const strength = field("steer-strength", {type: "number", step: "any", value: "0.25"});
  const n = field("steer-tokens", {type: "number", min: 1, max: 128, value: "30"});
  const seed = field("steer-seed", {type: "number", min: 0, value: "0"});
  const chat = field("steer-chat", {type: "checkbox", checked: "checked"});
  const out = el("div", {id: "steer-results"});
  const go = el("button", {id: "steer-go", onclick: async () => {
    go.disabled = true; out.replaceChildren(el("p", {class: "muted"}, "generating…"));
    try {
      const r = await api(opts.path || `saes/${enc(name)}/steer`, {...(opts.extra || {}), prompt: prompt.value, feature: parseInt(feature.value, 10),
        mode: mode.value, strength: parseFloat(strength.value), max_new_tokens: parseInt(n.value, 10),
        seed: parseInt(seed.value, 10), chat: chat.checked});
      out.replaceChildren(el("div", {class: "cols"},
        el("div", {class: "col"}, el("h3", {}, "unsteered"), el("div", {class: "box", id: "steer-plain"}, r.unsteered)),
        el("div", {class: "col"}, el("h3", {}, `steered: feature ${feature.value}, ${mode.value} ${strength.value} site norms`),
           el("div", {class: "box", id: "steer-steered"}, r.steered))),
        el("p", {class: "muted"}, `both from seed ${r.seed}; N = ${fmt(r.site_norm)}, ` +
           `so the feature's activation is ${mode.value === "add" ? "raised by" : "held at"} ${fmt(r.activation)}`));
    } catch (err) { showError(out, err); }
    go.disabled = false;
  }}, "generate");
  main.replaceChildren(el("h1", {}, "Steering"), prompt,
    el("p", {class: "form"}, el("label", {}, "feature ", feature), el("label", {}, "mode ", mode),
       el("label", {}, "strength ", strength), el("label", {}, "new tokens ", n),
       el("label", {}, "seed ", seed), el("label", {}, chat, " chat template")),
    el("p", {class: "muted", id: "steer-unit"}, "Strength is in site norms: N is the site's mean activation norm " +
       "on plain prose. add s adds a vector of norm s·N along the feature's decoder direction; clamp s holds the " +
       "feature where its decoded part has norm s·N. On the embedded model 0.25 changes the text visibly and keeps it fluent; " +
       "1 and more give gibberish."),
    el("p", {}, go), out);
}

async function route() {
  const parts = location.pathname.split("/").filter(Boolean).map(decodeURIComponent);
  try {
    if (typeof scopeRoute === "function" && await scopeRoute(parts)) return;  // scope.js
    if (parts.length === 0) return await home();
    if (parts[0] === "sae" && parts.length === 2) return await saePage(parts[1]);
    if (parts[0] === "sae" && parts[2] === "feature" && parts.length === 4) return await featurePage(parts[1], parts[3]);
    if (parts[0] === "sae" && parts[2] === "search") return await searchPage(parts[1]);
    if (parts[0] === "sae" && parts[2] === "steer") return await steerPage(parts[1]);
    throw new Error("no such page: " + location.pathname);
  } catch (err) { showError(main, err); }
}

route();
