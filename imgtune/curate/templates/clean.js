"use strict";
const $ = (id) => document.getElementById(id);
let state = { classes: [], items: [], mode: "folders" };
// Every API request carries the session's token in a custom header: the server refuses any without it,
// so that no other web page can change the data or look at its images.
const secret = document.querySelector("meta[name=imgtune-token]");
const tokenHeaders = { [secret.dataset.header]: secret.content };

function show(text, isError) { $("status").textContent = text; $("status").className = isError ? "error" : ""; }

async function call(url, body) {
  const response = await fetch(url, { method: "POST", headers: { ...tokenHeaders, "Content-Type": "application/json" },
                                      body: JSON.stringify(body || {}) });
  const answer = await response.json();
  if (!response.ok) throw new Error(answer.detail || response.statusText);
  return answer;
}

async function act(url, body, done) {
  try { await call(url, body); show(done, false); } catch (error) { show(String(error.message), true); }
  await load();
}

// Thumbnails come through fetch (an <img src> cannot send the token), once a card is near the screen.
let shown = [];
const thumbnails = new IntersectionObserver((entries) => entries.forEach(async (entry) => {
  if (!entry.isIntersecting) return;
  const img = entry.target;
  thumbnails.unobserve(img);
  const response = await fetch("api/image?path=" + encodeURIComponent(img.dataset.path), { headers: tokenHeaders });
  if (!response.ok) { img.alt = `${img.dataset.path}: ${response.status}`; return; }
  const url = URL.createObjectURL(await response.blob());
  shown.push(url);
  img.src = url;
}), { rootMargin: "300px" });

function card(item) {
  const div = document.createElement("div");
  div.className = "card " + item.status;
  div.dataset.path = item.path;
  let img = document.createElement("img");
  img.alt = item.path;
  if (item.status !== "quarantined") { img.dataset.path = item.path; thumbnails.observe(img); }
  else { img = document.createElement("div"); img.className = "gone"; img.textContent = "in quarantine"; }
  const name = document.createElement("div");
  name.className = "name";
  name.textContent = item.path;
  const about = document.createElement("div");
  about.className = "about";
  about.textContent = `label ${item.label} (${(100 * item.given_probability).toFixed(0)}%), ` +
    `model: ${item.predicted} ${(100 * item.probability).toFixed(0)}%` + (item.status ? ` [${item.status}]` : "");
  const actions = document.createElement("div");
  actions.className = "actions";
  if (item.status !== "quarantined") {
    const keep = document.createElement("button");
    keep.className = "keep"; keep.textContent = "Keep";
    keep.onclick = () => act("api/keep", { path: item.path }, "kept " + item.path);
    const choice = document.createElement("select");
    choice.className = "label";
    state.classes.filter((c) => c !== item.label).forEach((c) => choice.append(new Option(c, c)));
    if (item.predicted !== item.label) choice.value = item.predicted;
    const relabel = document.createElement("button");
    relabel.className = "relabel"; relabel.textContent = "Relabel";
    relabel.disabled = state.mode === "names";
    relabel.onclick = () => act("api/relabel", { path: item.path, label: choice.value },
                                `relabelled ${item.path} as ${choice.value}`);
    const away = document.createElement("button");
    away.className = "quarantine"; away.textContent = "Quarantine";
    away.onclick = () => act("api/quarantine", { path: item.path }, "quarantined " + item.path);
    actions.append(keep, choice, relabel, away);
  }
  div.append(img, name, about, actions);
  return div;
}

function render() {
  const wanted = $("filter").value;
  thumbnails.disconnect();
  shown.forEach((url) => URL.revokeObjectURL(url));
  shown = [];
  $("grid").replaceChildren(...state.items.filter((i) => !wanted || i.label === wanted).map(card));
}

async function load() {
  const response = await fetch("api/items", { headers: tokenHeaders });
  if (!response.ok) { show(`could not load the images (${response.status})`, true); return; }
  state = await response.json();
  const filter = $("filter"), chosen = filter.value;
  filter.replaceChildren(new Option("all", ""), ...state.classes.map((c) => new Option(c, c)));
  filter.value = chosen;
  render();
  document.body.dataset.loaded = String(Date.now());
}

$("filter").addEventListener("change", render);
$("undo").addEventListener("click", async () => {
  try {
    const answer = await call("api/undo");
    show(answer.undone ? `undid ${answer.undone} change(s)` : "nothing to undo", false);
  } catch (error) { show(String(error.message), true); }
  await load();
});
load();
