// The service's API as the viewer uses it: requests with the API key, problem+json errors as messages.

const KEY_STORAGE = "medserve.apiKey";

/** An error answer of the service (or no answer): `detail` is the human text to show. */
export class ServiceError extends Error {
  constructor(status, title, detail, { type = null, retryAfter = null } = {}) {
    super(detail);
    this.status = status;
    this.title = title;
    this.detail = detail;
    this.type = type;
    this.retryAfter = retryAfter;
  }
}

/** A 401: the service wants an API key (or the one sent is not valid). */
export class KeyRequired extends ServiceError {}

export function storedKey() {
  try {
    return sessionStorage.getItem(KEY_STORAGE);
  } catch {
    return null; // storage disabled: the user is asked again
  }
}

export function storeKey(key) {
  try {
    sessionStorage.setItem(KEY_STORAGE, key);
  } catch {
    // storage disabled; the key is lost with the page
  }
}

export function forgetKey() {
  try {
    sessionStorage.removeItem(KEY_STORAGE);
  } catch {
    // nothing stored
  }
}

const STATUS_TEXT = {
  400: "Bad request",
  401: "API key required",
  404: "Not found",
  413: "Upload too large",
  415: "Unsupported media type",
  422: "Cannot be processed",
  500: "Internal server error",
  502: "Bad gateway",
  503: "Service unavailable",
  504: "Timed out",
};

/** The error a failed response stands for: the problem's `title` and `detail`, never its raw body. */
async function errorOf(response) {
  let title = STATUS_TEXT[response.status] || `HTTP ${response.status}`;
  let detail = null;
  let type = null;
  const contentType = (response.headers.get("content-type") || "").toLowerCase();
  if (contentType.includes("json")) {
    try {
      const body = await response.json();
      if (body && typeof body.detail === "string" && body.detail) detail = body.detail;
      if (body && typeof body.title === "string" && body.title) title = body.title;
      if (body && typeof body.type === "string") type = body.type;
    } catch {
      // not JSON after all: the generic message below
    }
  }
  if (detail === null) detail = `The service answered HTTP ${response.status} without an explanation.`;
  const seconds = Number.parseInt(response.headers.get("retry-after") || "", 10);
  const retryAfter = Number.isFinite(seconds) ? seconds : null;
  const Kind = response.status === 401 ? KeyRequired : ServiceError;
  return new Kind(response.status, title, detail, { type, retryAfter });
}

/**
 * Sends a request to the service with the stored API key; resolves with the response when it is 2xx.
 * @throws {KeyRequired} on 401; {ServiceError} on any other error answer or when the service is unreachable.
 */
export async function call(path, { method = "GET", body = undefined } = {}) {
  const headers = new Headers();
  const key = storedKey();
  if (key) headers.set("X-API-Key", key);
  let response;
  try {
    response = await fetch(path, { method, body, headers, cache: "no-store", credentials: "omit" });
  } catch {
    throw new ServiceError(
      0,
      "No answer",
      "The service cannot be reached: check that it is running and that this page was opened from it.",
    );
  }
  if (!response.ok) throw await errorOf(response);
  return response;
}

/** POSTs one file as the multipart field `file` to `path` (a path with its query string). */
export function postFile(path, file) {
  const form = new FormData();
  form.append("file", file, file.name || "upload");
  return call(path, { method: "POST", body: form });
}

/** The query string of `params`, leaving out null and undefined values. */
export function query(params) {
  const search = new URLSearchParams();
  for (const [name, value] of Object.entries(params)) {
    if (value !== null && value !== undefined) search.set(name, String(value));
  }
  const text = search.toString();
  return text ? `?${text}` : "";
}

/** The out-of-distribution verdict of an answer: its JSON `ood` member, else its headers; null when absent. */
export function oodOf(ood, response = null) {
  if (ood && typeof ood === "object" && typeof ood.flagged === "boolean") return ood;
  if (response) {
    const verdict = (response.headers.get("x-medserve-ood") || "").trim().toLowerCase();
    if (verdict === "ok" || verdict === "flagged") {
      const score = Number.parseFloat(response.headers.get("x-medserve-ood-score") || "");
      return { flagged: verdict === "flagged", score: Number.isFinite(score) ? score : null, threshold: null };
    }
  }
  return null;
}
