"use strict";
const model = JSON.parse(document.getElementById("model").textContent);
const $ = (id) => document.getElementById(id);
$("name").textContent = model.name;
const accuracy = model.metrics && typeof model.metrics.valid_accuracy === "number"
  ? `validation accuracy ${(100 * model.metrics.valid_accuracy).toFixed(1)}%` : "validation accuracy unknown";
$("about").textContent = `${model.arch}, ${model.size} px; ${accuracy}; classes: ${model.classes.join(", ")}`;

function show(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function classify(file) {
  if (!file) return;
  show("Classifying " + file.name + " ...", false);
  $("result").hidden = true;
  const body = new FormData();
  body.append("file", file);
  const k = Math.min(5, model.classes.length);
  try {
    const response = await fetch(`api/predict?top_k=${k}&cam=true`, { method: "POST", body });
    const answer = await response.json();
    if (!response.ok) { show(String(answer.detail || response.statusText), true); return; }
    const rows = $("labels");
    rows.replaceChildren();
    answer.labels.forEach((item, i) => {
      const row = document.createElement("div");
      row.className = i === 0 ? "row top" : "row";
      const label = document.createElement("span");
      label.className = "label";
      label.textContent = item.label;
      const bar = document.createElement("div");
      bar.className = "bar";
      const fill = document.createElement("span");
      fill.style.width = (100 * item.probability).toFixed(1) + "%";
      bar.append(fill);
      const pct = document.createElement("span");
      pct.className = "pct";
      pct.textContent = (100 * item.probability).toFixed(1) + "%";
      row.append(label, bar, pct);
      rows.append(row);
    });
    if ($("preview").src) URL.revokeObjectURL($("preview").src);
    $("preview").src = URL.createObjectURL(file);
    if (answer.cam) { $("cam").src = answer.cam; }
    $("cam").parentElement.hidden = !answer.cam;
    show(`${answer.top} (${answer.seconds.toFixed(2)} s)`, false);
    $("result").hidden = false;
  } catch (error) {
    show("The server did not answer: " + error, true);
  }
}

$("file").addEventListener("change", () => classify($("file").files[0]));
const drop = $("drop");
["dragenter", "dragover"].forEach((type) => drop.addEventListener(type, (event) => {
  event.preventDefault(); drop.classList.add("over");
}));
["dragleave", "drop"].forEach((type) => drop.addEventListener(type, (event) => {
  event.preventDefault(); drop.classList.remove("over");
}));
drop.addEventListener("drop", (event) => classify(event.dataTransfer.files[0]));
