// lora-ckpt console: the Try it view (POST /predict/{name}, a multipart image, per adapter).
import { api, notice, state } from "./api.js";
import { adapterNames, loadStore, statusOf } from "./store.js";
import { $, el, ms } from "./util.js";

const MAX_IMAGES = 8;

export function renderTryAdapters() {
  const box = $("try-adapters");
  const checked = new Set([...box.querySelectorAll("input:checked")].map((input) => input.value));
  const names = adapterNames();
  if (!checked.size && names.length) checked.add(names.find((name) => statusOf(name).kind !== "failed") || names[0]);
  const options = names.map((name) => {
    const failed = statusOf(name).kind === "failed";
    return el(
      "label",
      {},
      el("input", { type: "checkbox", name: "adapter", value: name, checked: checked.has(name) }),
      el("span", { class: failed ? "dim" : null, text: failed ? `${name} (failed)` : name }),
    );
  });
  options.push(
    el(
      "label",
      {},
      el("input", { type: "checkbox", name: "adapter", value: "off", checked: checked.has("off") }),
      el("span", { class: "dim", text: "off (the base alone)" }),
    ),
  );
  box.replaceChildren(...options);
}

function chooseFiles(files) {
  const images = [...files].filter((file) => file.type.startsWith("image/") || file.type === "");
  for (const entry of state.files) URL.revokeObjectURL(entry.url);
  state.files = images.slice(0, MAX_IMAGES).map((file) => ({ file, url: URL.createObjectURL(file) }));
  if (images.length > MAX_IMAGES) notice(`Only the first ${MAX_IMAGES} images are used.`);
  $("try-thumbs").replaceChildren(
    ...state.files.map((entry) =>
      el("li", {}, el("img", { src: entry.url, alt: entry.file.name }), el("span", { title: entry.file.name, text: entry.file.name })),
    ),
  );
}

export function wireTry() {
  document.addEventListener("lora:adapters", renderTryAdapters);
  const input = $("try-files");
  input.addEventListener("change", () => chooseFiles(input.files));
  const drop = $("drop");
  for (const kind of ["dragenter", "dragover"]) {
    drop.addEventListener(kind, (event) => {
      event.preventDefault();
      drop.classList.add("over");
    });
  }
  for (const kind of ["dragleave", "drop"]) drop.addEventListener(kind, () => drop.classList.remove("over"));
  drop.addEventListener("drop", (event) => {
    event.preventDefault();
    chooseFiles(event.dataTransfer.files);
  });
  $("try-clear").addEventListener("click", () => {
    input.value = "";
    chooseFiles([]);
    $("try-results").replaceChildren();
  });
  $("try-form").addEventListener("submit", (event) => {
    event.preventDefault();
    runTry();
  });
}

async function predict(name, file) {
  const form = new FormData();
  form.append("image", file, file.name);
  const started = performance.now();
  const body = await api(`/predict/${encodeURIComponent(name)}`, { method: "POST", body: form });
  return { body, latency: performance.now() - started };
}

function resultCard(name, outcome) {
  if (outcome.error) {
    return el(
      "div",
      { class: "result error", "data-adapter": name },
      el("div", { class: "result-head" }, el("span", { class: "adapter", text: name }), el("span", { class: "latency", text: `${outcome.error.status}` })),
      el("div", { class: "message", text: outcome.error.message }),
    );
  }
  const { body, latency } = outcome;
  const labelOf = (entry) => (entry.label === null || entry.label === undefined ? `class ${entry.class}` : entry.label);
  return el(
    "div",
    { class: "result", "data-adapter": name },
    el(
      "div",
      { class: "result-head" },
      el("span", { class: "adapter", text: name }),
      el("span", { class: "latency", title: "round trip, from this browser", text: ms(latency) }),
    ),
    el("div", { class: "top-label", "data-class": body.class, text: labelOf(body.top_k[0] || body) }),
    el(
      "ol",
      { class: "bars", "aria-label": `Top ${body.top_k.length} of ${name}` },
      body.top_k.map((entry) => {
        const percent = entry.probability * 100;
        const fill = el("div", { class: "bar-fill" });
        fill.style.width = `${Math.max(0, Math.min(100, percent)).toFixed(1)}%`;
        return el(
          "li",
          { class: "bar-row", "data-class": entry.class, "data-probability": entry.probability },
          el("span", { class: "bar-label", title: labelOf(entry), text: labelOf(entry) }),
          el("div", { class: "bar-track", role: "presentation" }, fill),
          el("span", { class: "bar-value", text: `${percent.toFixed(1)} %` }),
        );
      }),
    ),
  );
}

async function runTry() {
  const names = [...$("try-adapters").querySelectorAll("input:checked")].map((input) => input.value);
  const results = $("try-results");
  if (!state.files.length || !names.length) {
    notice(!state.files.length ? "Choose an image first." : "Choose at least one adapter.", true);
    return;
  }
  notice(null);
  const run = $("try-run");
  run.disabled = true;
  results.replaceChildren();
  try {
    for (const entry of state.files) {
      const list = el("div", { class: "result-list" });
      const block = el(
        "div",
        { class: "panel result-image", "data-image": entry.file.name },
        el("div", {}, el("img", { src: entry.url, alt: entry.file.name }), el("div", { class: "caption", text: entry.file.name })),
        list,
      );
      results.append(block);
      for (const name of names) {
        let outcome;
        try {
          outcome = await predict(name, entry.file);
        } catch (error) {
          outcome = { error };
        }
        list.append(resultCard(name, outcome));
      }
    }
  } finally {
    run.disabled = false;
  }
  loadStore(); // a request loads its adapter: the store view shows it resident now
}
