// lora-ckpt console: the Store view (GET /adapters, GET /adapters/{name}/info; load, reload, unload for admin keys).
import { api, notice, state } from "./api.js";
import { $, el, fixed, humanSize, variant, when } from "./util.js";

const INFO_AT_ONCE = 4;

export function adapterNames() {
  const adapters = state.adapters || {};
  const names = new Set([...(adapters.store || []), ...(adapters.resident || []), ...Object.keys(adapters.failed || {})]);
  return [...names].sort();
}

export function statusOf(name) {
  const adapters = state.adapters || {};
  const failed = (adapters.failed || {})[name];
  const info = state.info.get(name);
  // The config's error first: it names the file and what is wrong with it.
  if (info && info.error) return { kind: "failed", text: "failed", reason: info.error };
  if (failed) return { kind: "failed", text: "failed", reason: failed };
  if ((adapters.resident || []).includes(name)) return { kind: "resident", text: "resident" };
  return { kind: "stored", text: "in the store" };
}

export async function loadStore() {
  try {
    state.adapters = await api("/adapters");
  } catch (error) {
    if (error.status === 401) return;
    $("store-summary").textContent = `Cannot list adapters: ${error.message}`;
    state.adapters = null;
    renderStore();
    return;
  }
  renderStore();
  const names = adapterNames();
  let next = 0;
  async function worker() {
    while (next < names.length) {
      const name = names[next];
      next += 1;
      try {
        state.info.set(name, await api(`/adapters/${encodeURIComponent(name)}/info`));
      } catch (error) {
        if (error.status === 401) return;
        state.info.set(name, { error: error.message, status: error.status });
      }
      renderStore();
    }
  }
  await Promise.all(Array.from({ length: Math.min(INFO_AT_ONCE, names.length) }, worker));
  // The Try it view lists the adapters too.
  document.dispatchEvent(new CustomEvent("lora:adapters"));
}

export function renderStore() {
  const body = $("store-rows");
  const names = adapterNames();
  const filter = $("store-filter").value.trim().toLowerCase();
  const adapters = state.adapters || {};
  const resident = (adapters.resident || []).length;
  const failed = names.filter((name) => statusOf(name).kind === "failed").length;
  if (state.adapters) {
    const capacity = adapters.capacity ? ` of ${adapters.capacity} slots` : "";
    $("store-summary").textContent =
      `${names.length} adapter${names.length === 1 ? "" : "s"} · ${resident} resident${capacity}` +
      (failed ? ` · ${failed} failed` : "");
  }
  const rows = [];
  for (const name of names) {
    const info = state.info.get(name);
    const labels = info && info.labels ? info.labels.join(", ") : "";
    if (filter && !name.toLowerCase().includes(filter) && !labels.toLowerCase().includes(filter)) continue;
    rows.push(storeRow(name, info));
  }
  if (!rows.length) {
    const text = state.adapters ? (names.length ? "No adapter matches the filter." : "The store has no adapters.") : "—";
    rows.push(el("tr", {}, el("td", { colspan: 10, class: "empty", text })));
  }
  body.replaceChildren(...rows);
  $("store-table").classList.toggle("no-actions", !(state.who && state.who.admin));
  if (state.selected) renderDetail(state.selected);
}

function storeRow(name, info) {
  const status = statusOf(name);
  const ok = Boolean(info && !info.error);
  return el(
    "tr",
    { "data-adapter": name, class: state.selected === name ? "selected" : null },
    el(
      "td",
      {},
      el("button", {
        type: "button",
        class: "name-button",
        text: name,
        "aria-label": `Details of ${name}`,
        onclick: () => selectAdapter(name),
      }),
    ),
    el(
      "td",
      { class: "status-cell" },
      el("span", { class: `badge ${status.kind}`, text: status.text }),
      status.reason && ok ? el("span", { class: "reason", text: status.reason }) : null,
    ),
    // A config that cannot be read has nothing for the other columns: its reason takes them.
    ok
      ? configCells(info)
      : el("td", { colspan: 7 }, info ? el("span", { class: "reason wide", text: status.reason }) : el("span", { class: "muted", text: "Reading its config…" })),
    el("td", {}, adminActions(name, status)),
  );
}

function configCells(info) {
  const labels = info.labels ? info.labels.join(", ") : "";
  const classes = info.classes === null || info.classes === undefined ? "—" : String(info.classes);
  return [
    el("td", {}, classes, labels ? el("span", { class: "labels", title: labels, text: labels }) : null),
    el("td", { class: "num", text: info.ranks.join(", ") }),
    el("td", {}, el("span", { class: info.dora || info.rslora ? "badge variant" : "", text: variant(info) })),
    el("td", { class: "num", text: humanSize(info.size_bytes) }),
    el("td", { class: "num", text: `v${info.format_version}` }),
    el("td", { class: "nowrap", text: when(info.created) }),
    el("td", {}, el("span", { class: "sha", title: `config SHA-256 ${info.version}`, text: info.version.slice(0, 12) })),
  ];
}

function adminActions(name, status) {
  if (!state.who || !state.who.admin) return null;
  const resident = status.kind === "resident";
  const box = el("div", { class: "actions" });
  box.append(
    el("button", {
      type: "button",
      class: "small",
      text: resident ? "Reload" : "Load",
      "aria-label": `${resident ? "Reload" : "Load"} ${name}`,
      onclick: (event) => adminCall(event.currentTarget, "POST", name),
    }),
  );
  if (resident) {
    box.append(
      el("button", {
        type: "button",
        class: "small danger",
        text: "Unload",
        "aria-label": `Unload ${name}`,
        onclick: (event) => adminCall(event.currentTarget, "DELETE", name),
      }),
    );
  }
  return box;
}

async function adminCall(button, method, name) {
  button.disabled = true;
  try {
    const body = await api(`/adapters/${encodeURIComponent(name)}`, { method });
    notice(method === "DELETE" ? `Unloaded ${name}.` : `${name}: ${body.outcome || "done"}.`);
  } catch (error) {
    notice(`${name}: ${error.message}`, true);
  }
  state.info.delete(name);
  await loadStore();
}

function selectAdapter(name) {
  state.selected = name;
  renderStore();
  const panel = $("detail");
  panel.hidden = false;
  panel.focus();
  panel.scrollIntoView({ block: "nearest" });
}

function facts(pairs) {
  const list = el("dl", { class: "facts" });
  for (const [term, value] of pairs) list.append(el("dt", { text: term }), el("dd", {}, value));
  return list;
}

function renderDetail(name) {
  $("detail-title").textContent = name;
  const body = $("detail-body");
  const info = state.info.get(name);
  const status = statusOf(name);
  if (!info) {
    body.replaceChildren(el("p", { class: "muted", text: "Reading its config…" }));
    return;
  }
  if (info.error) {
    body.replaceChildren(facts([["Status", el("span", { class: "badge failed", text: "failed" })], ["Reason", el("span", { class: "reason", text: status.reason })]]));
    return;
  }
  const layers = el(
    "table",
    { class: "data" },
    el(
      "thead",
      {},
      el("tr", {}, ["Layer", "Type", "Rank", "Alpha", "Scaling", "DoRA", "rsLoRA"].map((h) => el("th", { scope: "col", text: h }))),
    ),
    el(
      "tbody",
      {},
      Object.entries(info.layers).map(([path, layer]) =>
        el(
          "tr",
          {},
          el("td", { class: "mono", text: path }),
          el("td", { text: layer.type || "—" }),
          el("td", { class: "num", text: layer.rank }),
          el("td", { class: "num", text: layer.alpha === undefined ? "—" : layer.alpha }),
          el("td", { class: "num", text: layer.scaling === undefined ? "—" : fixed(layer.scaling, 4) }),
          el("td", { text: layer.dora ? "yes" : "no" }),
          el("td", { text: layer.rslora ? "yes" : "no" }),
        ),
      ),
    ),
  );
  const labels = info.labels ? el("div", { class: "chips" }, info.labels.map((label) => el("span", { class: "chip", text: label }))) : "—";
  const saved = info.saved || {};
  body.replaceChildren(
    el(
      "div",
      { class: "detail-grid" },
      el(
        "div",
        {},
        el("h3", { text: "Adapter" }),
        facts([
          ["Status", el("span", {}, el("span", { class: `badge ${status.kind}`, text: status.text }))],
          ["Version", el("span", { class: "sha", text: info.version })],
          ["Created", when(info.created)],
          ["Format", `version ${info.format_version}, written by lora_ckpt ${info.library_version}`],
          ["Size", `${humanSize(info.size_bytes)}, ${Number(info.num_parameters).toLocaleString()} parameters`],
          ["Ranks", info.ranks.join(", ")],
          ["Variant", variant(info)],
          ["Saved", `LoRA A/B, biases: ${saved.bias || "none"}, extra layers: ${(saved.extra_layers || []).join(", ") || "none"}`],
        ]),
      ),
      el(
        "div",
        {},
        el("h3", { text: "Base model it fits" }),
        facts([
          ["Architecture", el("span", { class: "mono", text: info.base.architecture })],
          ["LoRA class", el("span", { class: "mono", text: info.base.lora_architecture })],
          ["Fingerprint", el("span", { class: "sha", text: info.base.fingerprint })],
        ]),
        el("h3", { text: `Classes (${info.classes === null ? "—" : info.classes})` }),
        labels,
      ),
    ),
    el("h3", { text: `Layers (${Object.keys(info.layers).length})` }),
    el("div", { class: "table-wrap" }, layers),
    el("h3", { text: "Metadata" }),
    el("pre", { class: "json", text: JSON.stringify(info.metadata, null, 2) }),
  );
}
