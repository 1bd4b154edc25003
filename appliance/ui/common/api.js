// JSON calls of the status pages: relative URLs (a reverse proxy or Home Assistant ingress
// serves the page under a prefix), the bearer token from sessionStorage, a clear error on 401.

const KEY = "appliance.token";

export class AuthError extends Error {}

export function token() {
  return sessionStorage.getItem(KEY) || "";
}

export function setToken(value) {
  if (value) sessionStorage.setItem(KEY, value);
  else sessionStorage.removeItem(KEY);
}

function headers(extra) {
  const out = { ...extra };
  const t = token();
  if (t) out.Authorization = `Bearer ${t}`;
  return out;
}

// fetch a path relative to the page; JSON back (or text when the answer is not JSON)
export async function call(path, { method = "GET", body, type } = {}) {
  const init = { method, headers: headers(type ? { "Content-Type": type } : {}) };
  if (body !== undefined) {
    init.body = type || body instanceof Blob ? body : JSON.stringify(body);
    if (!type && !(body instanceof Blob)) init.headers["Content-Type"] = "application/json";
  }
  const response = await fetch(path, init);
  if (response.status === 401) throw new AuthError("this device needs its bearer token");
  const text = await response.text();
  let data = text;
  try {
    data = JSON.parse(text);
  } catch {
    // not JSON: kept as text
  }
  if (!response.ok) {
    const message = data && data.error ? data.error : `${response.status} ${response.statusText}`;
    const err = new Error(message);
    err.status = response.status;
    err.data = data;
    throw err;
  }
  return data;
}
