// fastmaisi app page: builds the form from /api/config, shows the plan, queues a job, follows it, shows the result.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { config: null, nv: null, job: null, planTimer: null, pollTimer: null, shownJob: null };

async function api(path, options) {
  const r = await fetch(path, options);
  const body = await r.json().catch(() => ({ error: `HTTP ${r.status}` }));
  if (!r.ok) throw Object.assign(new Error(body.error || `HTTP ${r.status}`), { field: body.field });
  return body;
}

// ---------------------------------------------------------------------------------------------------- the form
function buildForm(cfg) {
  $("variant").textContent = `variant ${cfg.variant} · device ${cfg.device}`;
  if (cfg.notice) { $("notice").textContent = cfg.notice; $("notice").hidden = false; }
  for (const wf of cfg.workflows) {
    const label = document.createElement("label");
    label.innerHTML = `<input type="radio" name="workflow" value="${wf}"> ${wf}`;
    $("workflows").append(label);
  }
  document.querySelector(`input[name=workflow][value="${cfg.default_workflow}"]`).checked = true;
  for (const slot of cfg.organ_slots) {
    const id = slot.replace(/ /g, "_");
    const has = slot in cfg.organ_defaults;
    const value = has ? cfg.organ_defaults[slot] : 0.01;
    const row = document.createElement("div");
    row.className = "organ";
    row.innerHTML = `<label><input type="checkbox" id="use_${id}" ${has ? "checked" : ""}> ${slot}</label>` +
      `<input type="range" id="organ_${id}" min="0" max="0.3" step="0.0005" value="${value}" aria-label="${slot} size">` +
      `<output id="out_${id}">${value.toFixed(4)}</output>`;
    $("organs").append(row);
    const slider = row.querySelector("input[type=range]");
    slider.addEventListener("input", () => {
      $(`out_${id}`).textContent = Number(slider.value).toFixed(4);
      $(`use_${id}`).checked = true;
    });
  }
  const d = cfg.defaults;
  [0, 1, 2].forEach((i) => { $(`size${i}`).value = d.size[i]; $(`spacing${i}`).value = d.spacing[i]; });
  for (const m of cfg.modalities) $("modality").append(new Option(`${m.name} (${m.code})`, m.code));
  $("modality").value = d.modality;
  $("seed").value = d.seed; $("steps").value = d.steps; $("guidance_scale").value = d.guidance_scale;
  $("mask_steps").value = d.mask_steps;
  $("demographics-fields").hidden = !("demographics" in cfg.fields);
  $("vocabulary-field").hidden = !("mask_vocabulary" in cfg.fields);
  showWorkflowFields();
}

const workflow = () => document.querySelector("input[name=workflow]:checked").value;

function showWorkflowFields() {
  for (const fs of document.querySelectorAll("fieldset[data-workflow]")) {
    fs.disabled = fs.dataset.workflow !== workflow();
    fs.classList.toggle("off", fs.disabled);
  }
}

// The request fields (the API's JSON) from the form.
function params() {
  const cfg = state.config, wf = workflow();
  const p = { workflow: wf, seed: $("seed").value, steps: $("steps").value, guidance_scale: $("guidance_scale").value,
              modality: $("modality").value,
              size: [0, 1, 2].map((i) => $(`size${i}`).value), spacing: [0, 1, 2].map((i) => $(`spacing${i}`).value) };
  if (wf === "paired") {
    p.mask_steps = $("mask_steps").value;
    p.organ_sizes = {};
    for (const slot of cfg.organ_slots) {
      const id = slot.replace(/ /g, "_");
      if ($(`use_${id}`).checked) p.organ_sizes[slot] = Number($(`organ_${id}`).value);
    }
    if ("demographics" in cfg.fields && ($("age").value || $("sex").value)) {
      p.demographics = {};
      if ($("age").value) p.demographics.age = Number($("age").value);
      if ($("sex").value) p.demographics.sex = $("sex").value;
    }
  }
  if (wf === "from-mask" && "mask_vocabulary" in cfg.fields && $("mask_vocabulary").value)
    p.mask_vocabulary = $("mask_vocabulary").value;
  return p;
}

function body() {
  const form = new FormData();
  form.append("params", JSON.stringify(params()));
  const file = $("mask").files[0];
  if (workflow() === "from-mask" && file) form.append("mask", file);
  return form;
}

function showFormError(err) {
  for (const el of document.querySelectorAll(".invalid")) el.classList.remove("invalid");
  $("form-error").textContent = err ? err.message : "";
  if (err && err.field) {
    const map = { size: "size0", spacing: "spacing0", organ_sizes: "organs", mask: "mask" };
    const el = $(map[err.field] || err.field);
    if (el) el.classList.add("invalid");
  }
}

// One plan request at a time (a dry run takes seconds on a CPU); changes made meanwhile are planned after it.
async function updatePlan() {
  if (state.planning) { state.planAgain = true; return; }
  state.planning = true;
  state.planAgain = false;
  $("plan").textContent = "planning…";
  try {
    const plan = await api("api/plan", { method: "POST", body: body() });
    $("plan").textContent = plan.text;
    $("plan-warnings").replaceChildren(...plan.warnings.map((w) => Object.assign(document.createElement("li"), { textContent: w })));
    showFormError(null);
    $("generate").disabled = false;
  } catch (err) {
    $("plan").textContent = "—";
    $("plan-warnings").replaceChildren();
    showFormError(err);
    $("generate").disabled = true;
  } finally {
    state.planning = false;
    if (state.planAgain) updatePlan();
  }
}

function planSoon() { clearTimeout(state.planTimer); state.planTimer = setTimeout(updatePlan, 300); }

async function submit(ev) {
  ev.preventDefault();
  $("generate").disabled = true;
  try {
    const job = await api("api/jobs", { method: "POST", body: body() });
    showFormError(null);
    follow(job.id);
  } catch (err) {
    showFormError(err);
  } finally {
    $("generate").disabled = false;
  }
}

// ---------------------------------------------------------------------------------------------------- jobs
function follow(id) {
  state.job = id;
  localStorage.setItem("fastmaisi.job", id);
  clearTimeout(state.pollTimer);
  poll();
}

async function poll() {
  const id = state.job;
  let job;
  try { job = await api(`api/jobs/${id}`); } catch (err) {
    if (localStorage.getItem("fastmaisi.job") === id) localStorage.removeItem("fastmaisi.job");
    $("job").hidden = true;
    return;
  }
  if (id !== state.job) return;
  $("job").hidden = false;
  $("job-id").textContent = job.id;
  $("job-status").textContent = job.status + (job.position ? ` (${job.position} ahead)` : "");
  $("job-status").className = `status ${job.status}`;
  $("job-stage").textContent = job.status === "running" ? `Stage: ${job.stage}` : "";
  $("job-progress").value = job.progress ?? 0;
  $("job-progress").hidden = job.status !== "running";
  $("job-error").textContent = job.error || "";
  if (job.status === "done") await showResult(job);
  else if (job.status !== "failed") state.pollTimer = setTimeout(poll, 500);
  listJobs();
}

async function listJobs() {
  const { jobs } = await api("api/jobs");
  $("jobs").replaceChildren(...jobs.reverse().map((j) => {
    const li = document.createElement("li");
    const a = Object.assign(document.createElement("a"), { href: "#", textContent: `${j.id} ${j.workflow} ${j.status}` });
    a.addEventListener("click", (e) => { e.preventDefault(); follow(j.id); });
    li.append(a);
    return li;
  }));
}

// ---------------------------------------------------------------------------------------------------- the result
async function showResult(job) {
  if (state.shownJob === job.id) return;
  state.shownJob = job.id;
  const files = (name) => `api/jobs/${job.id}/files/${encodeURIComponent(name)}`;
  const out = job.outputs;
  const labels = job.labels || [];
  // legend: every label of the map with its volume
  $("legend").querySelector("tbody").replaceChildren(...labels.map((l) => {
    const tr = document.createElement("tr");
    tr.innerHTML = `<td><span class="swatch" style="background:rgb(${l.color.join(",")})"></span></td>` +
      `<td>${l.name}</td><td>${l.volume_ml.toFixed(1)}</td>`;
    return tr;
  }));
  const qc = job.record.quality_check;
  $("qc").innerHTML = qc == null ? "<b>Quality check:</b> not applicable (no label map or not CT)" :
    `<b>Quality check:</b> <span class="${qc.passed ? "pass" : "fail"}">${qc.passed ? "passed" : "FAILED"}</span>` +
    (qc.failed.length ? ` (${qc.failed.join(", ")})` : "") + ` · seed ${job.record.seed}, retries ${job.record.retries}`;
  const links = [["image", "image (NIfTI)"], ["label", "label map (NIfTI)"], ["record", "record (JSON)"],
                 ["labels", "label volumes (JSON)"], ["preview", "preview (PNG)"]]
    .filter(([k]) => out[k]).map(([k, text]) => `<a href="${files(out[k])}" download>${text}</a>`);
  links.push(`<a href="api/jobs/${job.id}/dicom" download>DICOM series + SEG (zip)</a>`);
  $("downloads").innerHTML = "<b>Download:</b> " + links.join(" · ");
  // the viewer loads the server's view: the file itself, or a display copy of at most 256^3 voxels
  const view = job.view || { reduced: false, names: out }, viewUrl = (kind) => `api/jobs/${job.id}/view/${kind}`;
  $("view-note").textContent = view.reduced ?
    `display copy: ${view.shape.join("x")} of ${view.source_shape.join("x")}; downloads are full resolution` : "";
  await showVolumes({ url: viewUrl("image"), name: view.names.image },
                    out.label ? { url: viewUrl("label"), name: view.names.label } : null, labels);
}

function labelColormap(labels) {
  const max = Math.max(1, ...labels.map((l) => l.value));
  const cm = { R: [], G: [], B: [], A: [], I: [], labels: [] };
  for (let v = 0; v <= max; v++) {
    const l = labels.find((x) => x.value === v);
    cm.I.push(v); cm.labels.push(l ? l.name : "");
    cm.R.push(l ? l.color[0] : 0); cm.G.push(l ? l.color[1] : 0); cm.B.push(l ? l.color[2] : 0);
    cm.A.push(l && l.name !== "body" ? 255 : 0); // body drawn clear: it covers the whole patient
  }
  return cm;
}

// imageFile, labelFile: {url, name}; NiiVue picks the reader from the name's extension.
async function showVolumes(imageFile, labelFile, labels) {
  const nv = await viewer();
  for (const v of [...nv.volumes].reverse()) nv.removeVolume(v);
  const image = { ...imageFile, colormap: "gray" };
  if (state.config.modality === "ct") Object.assign(image, { cal_min: -160, cal_max: 240 }); // soft-tissue window
  const list = [image];
  if (labelFile) list.push({ ...labelFile, opacity: Number($("overlay-opacity").value) });
  await nv.loadVolumes(list);
  if (labelFile) nv.volumes[1].setColormapLabel(labelColormap(labels));
  nv.updateGLVolume();
  $("viewer-empty").hidden = true;
  document.body.dataset.viewer = "ready";
}

// ---------------------------------------------------------------------------------------------------- start
// NiiVue (2 MB) loads after the form is usable, so the page answers at once; its first use waits for it.
function viewer() {
  if (!state.viewer) state.viewer = new Promise((resolve, reject) => {
    const script = Object.assign(document.createElement("script"), { src: "vendor/niivue/niivue.umd.js" });
    script.onload = resolve;
    script.onerror = () => reject(new Error("the viewer (vendor/niivue) did not load"));
    document.head.append(script);
  }).then(async () => {
    state.nv = new niivue.Niivue({ backColor: [0.05, 0.05, 0.07, 1], show3Dcrosshair: true, isColorbar: false,
                                   crosshairColor: [0.3, 0.8, 1, 0.5], crosshairWidth: 0.5, loadingText: "" });
    await state.nv.attachTo("gl");
    state.nv.setSliceType(3);
    document.body.dataset.viewerAttached = "1";
    performance.mark("fastmaisi-viewer-attached");
    return state.nv;
  });
  return state.viewer;
}

async function start() {
  state.config = await api("api/config");
  buildForm(state.config);
  $("request-form").addEventListener("input", (ev) => { if (ev.target.name === "workflow") showWorkflowFields(); planSoon(); });
  $("request-form").addEventListener("change", planSoon);
  $("request-form").addEventListener("submit", submit);
  for (const b of document.querySelectorAll("[data-slice]"))
    b.addEventListener("click", async () => (await viewer()).setSliceType(Number(b.dataset.slice)));
  $("overlay-opacity").addEventListener("input", async () => {
    const nv = await viewer();
    if (nv.volumes.length > 1) nv.setOpacity(1, Number($("overlay-opacity").value));
  });
  updatePlan();
  const last = localStorage.getItem("fastmaisi.job");
  if (last) follow(last); else listJobs();
  document.body.dataset.ready = "1";
  performance.mark("fastmaisi-form-ready");
  viewer().catch((err) => { $("viewer-empty").textContent = err.message; });
}

start().catch((err) => { $("notice").hidden = false; $("notice").textContent = `The page could not start: ${err.message}`; });
