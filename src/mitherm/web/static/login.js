/* Login page: trade the password for a session cookie. */
"use strict";

document.getElementById("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const r = await MT.api("POST", "/api/login", { password: document.getElementById("password").value });
  if (r.ok) {
    const next = new URLSearchParams(location.search).get("next") || "/";
    location.href = /^\/(?![\/\\])/.test(next) ? next : "/"; // same-site paths only, no //host or /\host
  } else {
    document.getElementById("login-error").textContent = (r.data && r.data.error) || "Login failed.";
  }
});
