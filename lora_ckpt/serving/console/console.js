// lora-ckpt console: plain JavaScript, no library, no build step. It calls the
// service's own routes, as any client would: GET /ready, /whoami, /adapters,
// /adapters/{name}/info, /console/stats; POST /predict/{name} (multipart
// "image"); POST and DELETE /adapters/{name} (admin keys only).
// Modules: util (helpers), api (calls and shared state), store, try, service
// (one view each), this one (keys, tabs, readiness, start).
// Text from the server (names, labels, metadata, reasons) is only ever put in
// the page as text (textContent), never parsed as HTML.

import { api, KEY_STORAGE, notice, state, whenUnauthorized } from "./api.js";
import { loadStore, renderStore } from "./store.js";
import { renderTryAdapters, wireTry } from "./try.js";
import { startStats, stopStats } from "./service.js";
import { $, el } from "./util.js";

const READY_EVERY_MS = 5000;

function askForKey(message) {
  state.who = null;
  for (const view of document.querySelectorAll(".view")) view.hidden = true;
  $("login").hidden = false;
  $("who").hidden = true;
  $("sign-out").hidden = true;
  const error = $("login-error");
  error.hidden = !message;
  error.textContent = message || "";
  stopStats();
  $("key-input").focus();
}

async function identify() {
  try {
    state.who = await api("/whoami");
  } catch (error) {
    if (error.status !== 401) notice(`Cannot reach the service: ${error.message}`, true);
    return false;
  }
  $("login").hidden = true;
  const who = $("who");
  who.replaceChildren();
  if (state.who.auth) {
    who.append("Tenant ", el("strong", { text: state.who.tenant || "—" }), state.who.admin ? " · admin" : "");
    who.hidden = false;
    $("sign-out").hidden = false;
  } else {
    who.hidden = true;
  }
  return true;
}

// ---- tabs ------------------------------------------------------------------------

const TABS = ["store", "try", "service"];

function showTab(name, focus) {
  for (const tab of TABS) {
    const selected = tab === name;
    const button = $(`tab-${tab}`);
    button.setAttribute("aria-selected", String(selected));
    button.tabIndex = selected ? 0 : -1;
    $(`view-${tab}`).hidden = !selected;
  }
  if (focus) $(`tab-${name}`).focus();
  if (location.hash !== `#${name}`) history.replaceState(null, "", `#${name}`);
  if (name === "service") startStats();
  else stopStats();
  if (name === "try") renderTryAdapters();
}

function currentTab() {
  const name = location.hash.replace("#", "");
  return TABS.includes(name) ? name : "store";
}

function wireTabs() {
  for (const tab of TABS) {
    const button = $(`tab-${tab}`);
    button.addEventListener("click", () => showTab(tab, false));
    button.addEventListener("keydown", (event) => {
      const index = TABS.indexOf(tab);
      let next = null;
      if (event.key === "ArrowRight") next = TABS[(index + 1) % TABS.length];
      else if (event.key === "ArrowLeft") next = TABS[(index + TABS.length - 1) % TABS.length];
      else if (event.key === "Home") next = TABS[0];
      else if (event.key === "End") next = TABS[TABS.length - 1];
      if (next) {
        event.preventDefault();
        showTab(next, true);
      }
    });
  }
}

// ---- readiness -------------------------------------------------------------------

async function pollReady() {
  const node = $("health");
  const text = node.querySelector(".health-text");
  try {
    const response = await fetch("/ready", { cache: "no-store" });
    const body = await response.json();
    node.className = body.ready ? "health ok" : "health bad";
    text.textContent = body.ready ? "Ready" : `Not ready: ${body.reason || "starting"}`;
  } catch (error) {
    node.className = "health bad";
    text.textContent = "Unreachable";
  }
}

async function start() {
  if (!(await identify())) return;
  showTab(currentTab(), false);
  await loadStore();
}

function init() {
  wireTabs();
  wireTry();
  $("store-filter").addEventListener("input", renderStore);
  $("store-refresh").addEventListener("click", () => {
    state.info.clear();
    loadStore();
  });
  $("detail-close").addEventListener("click", () => {
    const name = state.selected;
    state.selected = null;
    $("detail").hidden = true;
    renderStore();
    const button = document.querySelector(`tr[data-adapter="${CSS.escape(name || "")}"] .name-button`);
    if (button) button.focus();
  });
  $("login-form").addEventListener("submit", async (event) => {
    event.preventDefault();
    const key = $("key-input").value.trim();
    if (!key) return;
    state.key = key;
    sessionStorage.setItem(KEY_STORAGE, key);
    $("key-input").value = "";
    state.info.clear();
    await start();
  });
  $("sign-out").addEventListener("click", () => {
    sessionStorage.removeItem(KEY_STORAGE);
    state.key = null;
    state.adapters = null;
    state.info.clear();
    askForKey(null);
  });
  window.addEventListener("hashchange", () => {
    if (state.who) showTab(currentTab(), false);
  });
  pollReady();
  setInterval(pollReady, READY_EVERY_MS);
  start();
}

whenUnauthorized(askForKey);
init(); // a module runs once the document is parsed
