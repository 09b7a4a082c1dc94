// lora-ckpt console: the service's routes, called with the key, and the state the views share.
import { $ } from "./util.js";

export const KEY_STORAGE = "lora-ckpt-key";

export const state = {
  key: sessionStorage.getItem(KEY_STORAGE),
  who: null, // {auth, tenant, admin}
  adapters: null, // GET /adapters
  info: new Map(), // name -> info, or {error}
  selected: null, // adapter shown in the detail panel
  files: [], // images chosen to try
  statsTimer: null,
  started: false,
};

let unauthorized = () => {};

// What to do when the service answers 401 (the console asks for a key).
export function whenUnauthorized(handler) {
  unauthorized = handler;
}

export class ApiError extends Error {
  constructor(status, kind, message) {
    super(message);
    this.status = status;
    this.kind = kind;
  }
}

export async function api(path, options) {
  const init = Object.assign({ headers: {} }, options || {});
  init.headers = Object.assign({}, init.headers);
  if (state.key) init.headers.Authorization = `Bearer ${state.key}`;
  init.cache = "no-store";
  const response = await fetch(path, init);
  let body = null;
  try {
    body = await response.json();
  } catch (error) {
    body = null;
  }
  if (!response.ok) {
    const error = body && body.error;
    const message = typeof error === "string" ? error : error && error.message;
    const kind = error && typeof error === "object" ? error.type : "HTTPError";
    if (response.status === 401) unauthorized(state.key ? "That key was refused." : null);
    throw new ApiError(response.status, kind, message || `${response.status} ${response.statusText}`);
  }
  return body;
}

export function notice(text, bad) {
  const node = $("notice");
  if (!text) {
    node.hidden = true;
    return;
  }
  node.textContent = text;
  node.className = bad ? "notice bad" : "notice";
  node.hidden = false;
}
