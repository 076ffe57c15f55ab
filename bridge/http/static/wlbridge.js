// wlbridge web view: the pages work without this; it asks before a removal and refreshes the log.
"use strict";
document.addEventListener("DOMContentLoaded", function () {
  document.querySelectorAll("form.confirm").forEach(function (form) {
    form.addEventListener("submit", function (event) {
      if (!window.confirm(form.dataset.confirm || "Are you sure?")) event.preventDefault();
    });
  });
  var box = document.getElementById("autorefresh");
  if (box) {
    box.checked = sessionStorage.getItem("wlbridge-autorefresh") === "1";
    box.addEventListener("change", function () {
      sessionStorage.setItem("wlbridge-autorefresh", box.checked ? "1" : "0");
    });
    setInterval(function () { if (box.checked) window.location.reload(); }, 5000);
  }
});
