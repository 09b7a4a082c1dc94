// lora-ckpt console: small helpers (DOM building, number and date formats).

export const COLORS = ["#3b5bdb", "#12b886", "#f76707", "#ae3ec9", "#1098ad", "#e03131", "#74b816", "#f59f00"];

export const $ = (id) => document.getElementById(id);

export function el(tag, attrs, ...children) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs || {})) {
    if (value === null || value === undefined || value === false) continue;
    if (name === "class") node.className = value;
    else if (name === "text") node.textContent = value;
    else if (name.startsWith("on")) node.addEventListener(name.slice(2), value);
    else node.setAttribute(name, value === true ? "" : String(value));
  }
  for (const child of children.flat()) {
    if (child === null || child === undefined || child === false) continue;
    node.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return node;
}

export const SVG = "http://www.w3.org/2000/svg";
export function svg(tag, attrs) {
  const node = document.createElementNS(SVG, tag);
  for (const [name, value] of Object.entries(attrs || {})) node.setAttribute(name, String(value));
  return node;
}

export function humanSize(bytes) {
  if (bytes === null || bytes === undefined) return "—";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let value = bytes;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(unit === 0 ? 0 : 1)} ${units[unit]}`;
}

export function fixed(value, digits) {
  return value === null || value === undefined ? "—" : Number(value).toFixed(digits);
}

export function ms(value) {
  if (value === null || value === undefined) return "—";
  return value >= 100 ? `${value.toFixed(0)} ms` : `${value.toFixed(1)} ms`;
}

export function when(iso) {
  if (!iso) return "—";
  const date = new Date(iso);
  if (Number.isNaN(date.getTime())) return iso;
  return date.toLocaleString(undefined, { year: "numeric", month: "short", day: "numeric", hour: "2-digit", minute: "2-digit" });
}

export function variant(info) {
  if (!info || info.error) return "—";
  const parts = [];
  if (info.dora) parts.push("DoRA");
  if (info.rslora) parts.push("rsLoRA");
  return parts.length ? parts.join(" + ") : "LoRA";
}

// The app counts requests for names it does not serve under "_unknown".
export function displayName(name) {
  return name === "_unknown" ? "other names" : name === "_other" ? "more adapters" : name;
}

export function colorOf(name, names) {
  const index = names.indexOf(name);
  return COLORS[(index < 0 ? 0 : index) % COLORS.length];
}
