// The reception page's script: the live check of the token field (a mistyped group is
// named before anything is sent), the camera QR reader where the browser has
// BarcodeDetector, and the live progress of a job page (server-sent events). The pages
// work without it: the server checks the token again and the job page shows its state.
"use strict";

function checkToken(form, text) {
  return fetch(form.dataset.check, {
    method: "POST",
    credentials: "same-origin",
    headers: { "content-type": "application/json", "x-csrf-token": form.dataset.csrf },
    body: JSON.stringify({ token: text }),
  }).then(function (r) {
    if (!r.ok) { throw new Error("check " + r.status); }
    return r.json();
  });
}

function setupReceive() {
  var form = document.getElementById("receive");
  if (!form) { return; }
  var field = document.getElementById("token");
  var out = document.getElementById("token-check");
  var timer = null;
  var submitting = false;
  function show(answer, final) {
    if (answer.ok) {
      out.textContent = answer.message;
      out.className = "check ok";
      field.removeAttribute("aria-invalid");
    } else if (answer.group !== null || final) {
      out.textContent = answer.message;
      out.className = "check bad";
      field.setAttribute("aria-invalid", "true");
    } else {
      out.textContent = "";
      out.className = "check";
      field.removeAttribute("aria-invalid");
    }
  }
  field.addEventListener("input", function () {
    clearTimeout(timer);
    var text = field.value;
    if (text.trim() === "") { show({ ok: false, group: null, message: "" }, false); return; }
    timer = setTimeout(function () {
      checkToken(form, text).then(function (answer) {
        if (field.value === text) { show(answer, false); }
      }).catch(function () {});
    }, 120);
  });
  form.addEventListener("submit", function (event) {
    if (submitting) { return; }
    event.preventDefault();
    clearTimeout(timer);
    checkToken(form, field.value).then(function (answer) {
      show(answer, true);
      if (answer.ok) {
        submitting = true;
        form.submit();
      } else {
        field.focus();
        field.select();
      }
    }).catch(function () { submitting = true; form.submit(); });
  });
  setupCamera(form, field);
}

function setupCamera(form, field) {
  var button = document.getElementById("camera");
  var video = document.getElementById("camera-view");
  if (!button || !video || !("BarcodeDetector" in window) || !navigator.mediaDevices) { return; }
  button.hidden = false;
  var stream = null;
  var detector = new window.BarcodeDetector({ formats: ["qr_code"] });
  function stop() {
    if (stream) { stream.getTracks().forEach(function (t) { t.stop(); }); }
    stream = null;
    video.hidden = true;
    button.textContent = button.dataset.start;
  }
  function scan() {
    if (!stream) { return; }
    detector.detect(video).then(function (codes) {
      if (codes.length > 0) {
        field.value = codes[0].rawValue;
        stop();
        field.dispatchEvent(new Event("input"));
        form.requestSubmit();
      } else {
        setTimeout(scan, 250);
      }
    }).catch(function () { setTimeout(scan, 500); });
  }
  button.addEventListener("click", function () {
    if (stream) { stop(); field.focus(); return; }
    navigator.mediaDevices.getUserMedia({ video: { facingMode: "environment" } }).then(function (s) {
      stream = s;
      video.srcObject = s;
      video.hidden = false;
      button.textContent = button.dataset.stop;
      video.play().then(scan);
    }).catch(function () { button.hidden = true; field.focus(); });
  });
}

function setupJob() {
  var job = document.getElementById("job");
  if (!job || !window.EventSource) { return; }
  var state = job.dataset.state;
  if (state === "done" || state === "failed") { return; }
  var source = new EventSource(job.dataset.events);
  source.addEventListener("end", function () {
    source.close();
    var live = document.getElementById("job-live");
    if (live) { live.hidden = true; }
  });
  source.addEventListener("progress", function (event) {
    var v = JSON.parse(event.data);
    job.dataset.state = v.state;
    document.getElementById("job-step").textContent = v.step;
    var bar = document.getElementById("job-bar");
    bar.max = Math.max(v.total, 1);
    bar.value = v.stored;
    document.getElementById("job-count").textContent = v.count;
    var message = document.getElementById("job-message");
    message.textContent = v.message;
    message.hidden = v.message === "";
    var study = document.getElementById("job-study");
    study.replaceChildren();
    v.study.forEach(function (pair) {
      var dt = document.createElement("dt");
      dt.textContent = pair[0];
      var dd = document.createElement("dd");
      dd.textContent = pair[1];
      study.append(dt, dd);
    });
    study.hidden = v.study.length === 0;
    var detail = document.getElementById("job-detail");
    detail.textContent = v.detail;
    detail.hidden = v.detail === "";
    if (v.state === "done" || v.state === "failed") {
      source.close();
      var live = document.getElementById("job-live");
      if (live) { live.hidden = true; }
    }
  });
}

document.addEventListener("DOMContentLoaded", function () {
  setupReceive();
  setupJob();
});
