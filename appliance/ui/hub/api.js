// The hub's admin API with the token from session storage. Relative URLs only, so the page
// works behind a reverse proxy under any prefix.
const KEY = "appliance-hub-token";

export class AuthError extends Error {}

export function token() {
  return sessionStorage.getItem(KEY);
}

export function setToken(value) {
  if (value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

export async function call(method, path, body) {
  const headers = { Authorization: `Bearer ${token() || ""}` };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  const resp = await fetch(`api/v1/admin/${path}`, init);
  let data = null;
  try {
    data = await resp.json();
  } catch {
    data = null;
  }
  if (resp.status === 401 || resp.status === 403) {
    throw new AuthError((data && data.error) || `HTTP ${resp.status}`);
  }
  if (!resp.ok) {
    throw new Error(`${method} ${path}: ${(data && data.error) || `HTTP ${resp.status}`}`);
  }
  return data;
}

export const get = (path) => call("GET", path);
export const post = (path, body) => call("POST", path, body === undefined ? {} : body);
