// Live updates without a reload: every few seconds the page is fetched again and each
// element marked data-live is replaced by its new version (forms outside them keep what
// the user typed). A login that ended sends the browser to the login page.
"use strict";
const EVERY_MS = 2000;

async function refresh() {
  if (document.hidden) return;
  let answer;
  try {
    answer = await fetch(location.href, { credentials: "same-origin", cache: "no-store" });
  } catch (_) {
    return; // the relay is restarting: try again at the next tick
  }
  if (answer.redirected || answer.status === 401 || answer.status === 403) {
    location.assign("/console/login");
    return;
  }
  if (!answer.ok) return;
  const fresh = new DOMParser().parseFromString(await answer.text(), "text/html");
  for (const old of document.querySelectorAll("[data-live]")) {
    const replacement = fresh.getElementById(old.id);
    if (replacement && replacement.innerHTML !== old.innerHTML) {
      old.replaceWith(document.importNode(replacement, true));
    }
  }
}

setInterval(refresh, EVERY_MS);
