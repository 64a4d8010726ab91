/* Login page: trade the password for a session cookie. */
"use strict";

document.getElementById("login-form").addEventListener("submit", async (e) => {
  e.preventDefault();
  const r = await MT.api("POST", "/api/login", { password: document.getElementById("password").value });
  if (r.ok) {
    const next = new URLSearchParams(location.search).get("next") || "/";
    location.href = next.startsWith("/") && !next.startsWith("//") ? next : "/";
  } else {
    document.getElementById("login-error").textContent = (r.data && r.data.error) || "Login failed.";
  }
});
