// The staff console's only script: live figures and recipient counts. The pages work without it.
"use strict";

(function () {
  var POLL_MS = 2000;

  function setText(root, field, value) {
    var el = root.querySelector('[data-field="' + field + '"]');
    if (el) { el.textContent = String(value); }
  }

  function showProgress(rows) {
    rows.forEach(function (row) {
      var box = document.querySelector('[data-campaign="' + row.id + '"]');
      if (!box) { return; }
      var c = row.counts;
      setText(box, "sent", c.sent);
      setText(box, "queued", c.queued + c.claimed);
      setText(box, "deferred", c.deferred);
      setText(box, "failed", c.failed);
      setText(box, "per_minute", row.per_minute.toFixed(1));
      var left = row.seconds_left;
      var leftBox = box.querySelector('[data-field="left"]');
      var format = (leftBox && leftBox.getAttribute("data-format")) || "{min} min {s} s";
      setText(box, "left", left === null ? "\u2013"
        : format.replace("{min}", Math.floor(left / 60)).replace("{s}", left % 60));
      var bar = document.querySelector('[data-progress="' + row.id + '"]');
      if (bar) { bar.max = row.total || 1; bar.value = c.sent + c.failed; }
    });
  }

  function poll(url) {
    fetch(url, { credentials: "same-origin", headers: { "Accept": "application/json" } })
      .then(function (r) {
        if (r.status === 401) {
          // Signed out (idle, revoked): leave the figures behind, for the sign-in page.
          window.location.assign("/signin");
          return "stop";
        }
        return r.ok ? r.json() : null;
      })
      .then(function (data) {
        if (data === "stop") { return data; }
        if (data) { showProgress(data.campaigns); }
        return null;
      })
      .catch(function () { return null; /* the next poll tries again */ })
      .then(function (next) {
        if (next !== "stop") { window.setTimeout(function () { poll(url); }, POLL_MS); }
      });
  }

  function watchRecipients() {
    var list = document.getElementById("list");
    var segment = document.getElementById("segment");
    if (!list || !segment) { return; }
    function refresh() {
      var q = "?list=" + encodeURIComponent(list.value) + "&segment=" + encodeURIComponent(segment.value);
      fetch("/api/recipients" + q, { credentials: "same-origin" })
        .then(function (r) { return r.ok ? r.json() : null; })
        .then(function (data) {
          if (!data) { return; }
          Object.keys(data.counts).forEach(function (lang) {
            var el = document.querySelector('#recipients [data-lang="' + lang + '"] strong');
            if (el) { el.textContent = String(data.counts[lang]); }
          });
        })
        .catch(function () { /* the button still works */ });
    }
    list.addEventListener("change", refresh);
    segment.addEventListener("change", refresh);
  }

  document.addEventListener("DOMContentLoaded", function () {
    var live = document.querySelector('[data-live="progress"]');
    if (live) {
      var one = live.getAttribute("data-campaign-id");
      window.setTimeout(function () {
        poll("/api/progress" + (one ? "?campaign=" + encodeURIComponent(one) : ""));
      }, POLL_MS);
    }
    watchRecipients();
  });
}());
