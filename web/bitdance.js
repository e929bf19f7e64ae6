// BitDance AR Sampler: size presets that follow the connected model, with the AR step count.
//
// The sampler node gets a "preset" dropdown (not saved into prompts or workflows: it only sets
// width and height). Its entries are the official BitDance sizes that the model wired into the
// sampler can make (sizes must divide by its block: 128 px for 64x models, 64 px for 16x), each
// labelled with the number of AR steps it takes. Under the widgets the node shows the AR step
// count of the current width x height, or why that size does not work with this model (or, with a
// LATENT on its init input, that the init's size is used).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SAMPLER = "BitDanceARSampler";
const LOADER = "BitDanceModelLoader";
const CUSTOM = "custom";
const infoCache = new Map(); // model name -> Promise<info>

function modelInfo(name) {
  if (!infoCache.has(name)) {
    const p = api
      .fetchApi(`/bitdance/model_info?model=${encodeURIComponent(name)}`)
      .then((r) => r.json())
      .catch((e) => ({ available: false, error: String(e) }));
    infoCache.set(name, p);
  }
  return infoCache.get(name);
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

// The model name chosen in the loader wired (directly) into this sampler's "model" input.
function connectedModel(node) {
  const input = node.inputs?.find((i) => i.name === "model");
  if (!input || input.link == null) return null;
  const link = node.graph?.links?.[input.link] ?? node.graph?.links?.get?.(input.link);
  if (!link) return null;
  const src = node.graph.getNodeById(link.origin_id);
  if (!src || (src.comfyClass ?? src.type) !== LOADER) return null;
  return widget(src, "model")?.value ?? null;
}

export function geometry(info) {
  const blockSide = Math.round(Math.sqrt(info.parallel_num));
  return { blockPixels: blockSide * info.downsample, downsample: info.downsample, parallel: info.parallel_num };
}

export function arSteps(info, width, height) {
  const g = geometry(info);
  if (width % g.blockPixels || height % g.blockPixels) return null;
  return ((width / g.downsample) * (height / g.downsample)) / g.parallel;
}

function presetLabel(info, h, w) {
  return `${w}x${h} · ${arSteps(info, w, h)} AR steps`;
}

function presetsFor(info) {
  const g = geometry(info);
  return info.official_sizes
    .filter(([h, w]) => h % g.blockPixels === 0 && w % g.blockPixels === 0)
    .map(([h, w]) => ({ label: presetLabel(info, h, w), width: w, height: h }));
}

// Recompute what the node shows for its model (async: asks the server once per model name).
async function refresh(node) {
  const name = connectedModel(node);
  node.bitdance.model = name;
  const preset = widget(node, "preset");
  if (!name) {
    node.bitdance.info = null;
    node.bitdance.presets = [];
    preset.options.values = [CUSTOM];
    node.setDirtyCanvas(true, true);
    return;
  }
  const info = await modelInfo(name);
  if (node.bitdance.model !== name) return; // changed while waiting
  node.bitdance.info = info.available ? info : null;
  node.bitdance.error = info.available ? null : info.error;
  node.bitdance.presets = info.available ? presetsFor(info) : [];
  preset.options.values = [CUSTOM, ...node.bitdance.presets.map((p) => p.label)];
  syncPreset(node);
  node.setDirtyCanvas(true, true);
}

// Show the preset matching width x height, or "custom".
function syncPreset(node) {
  const w = widget(node, "width")?.value;
  const h = widget(node, "height")?.value;
  const match = node.bitdance.presets.find((p) => p.width === w && p.height === h);
  widget(node, "preset").value = match ? match.label : CUSTOM;
}

// With a LATENT on "init" the sampler continues that image: its size, not width/height.
function continuesInit(node) {
  const input = node.inputs?.find((i) => i.name === "init");
  return input != null && input.link != null;
}

function statusText(node) {
  const b = node.bitdance;
  if (!b.model) return "connect a BitDance Model Loader";
  if (!b.info) return b.error ? `model not on disk: ${b.model}` : "…";
  if (continuesInit(node)) return "continues init: its size (width/height unused)";
  const w = widget(node, "width").value;
  const h = widget(node, "height").value;
  const steps = arSteps(b.info, w, h);
  if (steps == null) return `${w}x${h}: sides must divide by ${geometry(b.info).blockPixels} px for this model`;
  return `${steps} AR steps · ${b.info.parallel_num} tokens per step`;
}

app.registerExtension({
  name: "BitDance.SizePresets",
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (nodeData.name !== SAMPLER) return;

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    nodeType.prototype.onNodeCreated = function () {
      const r = onNodeCreated?.apply(this, arguments);
      this.bitdance = { model: undefined, info: null, presets: [], error: null };
      const node = this;
      const w = this.addWidget("combo", "preset", CUSTOM, (value) => {
        const p = node.bitdance.presets.find((x) => x.label === value);
        if (!p) return;
        widget(node, "width").value = p.width;
        widget(node, "height").value = p.height;
        node.setDirtyCanvas(true, true);
      }, { values: [CUSTOM], serialize: false });
      w.serialize = false; // not part of widgets_values: saved workflows keep the backend's layout
      for (const name of ["width", "height"]) {
        const dim = widget(this, name);
        const cb = dim?.callback;
        if (dim) dim.callback = function () { const out = cb?.apply(this, arguments); syncPreset(node); return out; };
      }
      return r;
    };

    const onDrawForeground = nodeType.prototype.onDrawForeground;
    nodeType.prototype.onDrawForeground = function (ctx) {
      const r = onDrawForeground?.apply(this, arguments);
      if (!this.bitdance || this.flags?.collapsed) return r;
      const name = connectedModel(this);
      if (name !== this.bitdance.model) refresh(this); // follows rewiring and the loader's dropdown
      this.bitdance.status = statusText(this);
      ctx.save();
      ctx.font = "12px sans-serif";
      ctx.fillStyle = "#8fc";
      ctx.fillText(this.bitdance.status, 10, this.size[1] - 8);
      ctx.restore();
      return r;
    };

    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function () {
      const size = computeSize ? computeSize.apply(this, arguments) : [200, 100];
      return [size[0], size[1] + 18];
    };
  },
});
