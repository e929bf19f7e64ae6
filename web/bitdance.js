// The BitDance web extension: the UI offers what the connected model can do.
//
// - AR Sampler: a "preset" dropdown with the sizes the model wired into the sampler (by the Model
//   Loader or the Split Model Loader) makes (from
//   /bitdance/model_info, computed by the engine from the model's tokenizer, downsampling and block:
//   the official sizes for the 14B models, 32x32 .. 512x512 for the digits demo), each labelled with
//   its AR step count; it only sets width and height and is not saved into prompts or workflows.
//   Under the widgets: the AR step count of the current size, or (in a warning colour) why the size
//   does not work with this model, or that the model is not on disk; with a LATENT on its init
//   input, that the init's size is used.
// - ImageNet Class Sampler: the class dropdown lists the connected checkpoint's own classes (from
//   /bitdance/imagenet_info: ImageNet's 1000, or "0" .. "9" for the digits demo); a class chosen for
//   another model keeps its index and gets this model's name.
// - Both node renderers: the canvas one (LiteGraph) and the Vue one ("Nodes 2.0", frontend setting
//   Comfy.VueNodes.Enabled), which paints no canvas foreground: there the status line is a text
//   widget and a timer follows the model (see follow()).
// - Every BitDance node is at least as wide as its title.
// - The template browser lists this pack's workflows in the order of templates.json (the demo
//   workflows, which need no download, first).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";

const SAMPLER = "BitDanceARSampler";
// text-to-image loader -> the widgets that name its model (the query of /bitdance/model_info)
const LOADERS = {
  BitDanceModelLoader: ["model"],
  BitDanceSplitModelLoader: ["main_model", "text_encoder", "vae", "parallel_num"],
};
const CLASS_SAMPLER = "BitDanceImageNetSampler";
const CLASS_LOADER = "BitDanceImageNetLoader";
const CLASS_LOADERS = { [CLASS_LOADER]: ["checkpoint"] }; // the class sampler's loader -> the widget naming its model
const CUSTOM = "custom";
const OK_COLOUR = "#8fc";
const WARNING_COLOUR = "#fb3";
const HERE = new URL(".", import.meta.url); // /extensions/<pack folder>/
const PACK = decodeURIComponent(HERE.pathname.split("/").filter(Boolean).pop());

const infoCache = new Map(); // route + query -> Promise<info>

function fetchInfo(route, query) {
  const id = `${route}?${query}`;
  if (!infoCache.has(id)) {
    const p = api
      .fetchApi(`/bitdance/${route}?${query}`)
      .then((r) => r.json())
      .catch((e) => ({ available: false, error: String(e) }));
    infoCache.set(id, p);
  }
  return infoCache.get(id);
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

// A widget's value set as a user would set it: through its callback, which the Vue node renderer
// wraps to update what it shows (a plain assignment would leave its display behind). Unchanged
// values are left alone, so callbacks that set each other (preset <-> width/height) stop.
function setValue(w, value) {
  if (!w || w.value === value) return;
  w.value = value;
  w.callback?.(value);
}

// A dropdown's choices, changed in place: the Vue node renderer keeps the array it was given.
function setOptions(w, values) {
  if (Array.isArray(w.options.values)) w.options.values.splice(0, w.options.values.length, ...values);
  else w.options.values = [...values];
}

// The node wired (directly) into this node's `input`.
function connectedNode(node, input) {
  const slot = node.inputs?.find((i) => i.name === input);
  if (!slot || slot.link == null) return null;
  const link = node.graph?.links?.[slot.link] ?? node.graph?.links?.get?.(slot.link);
  if (!link) return null;
  return node.graph.getNodeById(link.origin_id) ?? null;
}

// The query that names the model wired into `node`'s "model" input ("model=BitDance-14B-64x", or
// the split loader's three files), for the loaders in `loaders` (type -> its widgets); null if none.
function connectedQuery(node, loaders) {
  const src = connectedNode(node, "model");
  const names = src && loaders[src.comfyClass ?? src.type];
  if (!names) return null;
  const query = new URLSearchParams();
  for (const name of names) {
    const value = widget(src, name)?.value;
    if (value == null) return null;
    query.set(name, String(value));
  }
  return query.toString();
}

// What the status line calls the connected model: its folder or main-model file.
function modelLabel(query) {
  const q = new URLSearchParams(query);
  return q.get("model") ?? q.get("main_model") ?? q.get("checkpoint") ?? query;
}

export function fits(info, width, height) {
  const ok = (v) => Number.isInteger(v) && v > 0 && v <= info.max_side && v % info.block_pixels === 0;
  return ok(width) && ok(height);
}

export function arSteps(info, width, height) {
  if (!fits(info, width, height)) return null;
  return ((width / info.downsample) * (height / info.downsample)) / info.parallel_num;
}

function presetsFor(info) {
  return info.sizes.map(([h, w]) => ({ label: `${w}x${h} · ${arSteps(info, w, h)} AR steps`, width: w, height: h }));
}

// --- AR sampler: size presets ------------------------------------------------------------------
async function refreshSizes(node) {
  const name = connectedQuery(node, LOADERS);
  node.bitdance.model = name;
  const preset = widget(node, "preset");
  if (!name) {
    Object.assign(node.bitdance, { info: null, presets: [], error: null });
    setOptions(preset, [CUSTOM]);
    node.setDirtyCanvas(true, true);
    return;
  }
  const info = await fetchInfo("model_info", name);
  if (node.bitdance.model !== name) return; // changed while waiting
  node.bitdance.info = info.available ? info : null;
  node.bitdance.error = info.available ? null : info.error;
  node.bitdance.presets = info.available ? presetsFor(info) : [];
  setOptions(preset, [CUSTOM, ...node.bitdance.presets.map((p) => p.label)]);
  syncPreset(node);
  node.setDirtyCanvas(true, true);
}

// Show the preset matching width x height, or "custom".
function syncPreset(node) {
  const w = widget(node, "width")?.value;
  const h = widget(node, "height")?.value;
  const match = node.bitdance.presets.find((p) => p.width === w && p.height === h);
  setValue(widget(node, "preset"), match ? match.label : CUSTOM);
}

// With a LATENT on "init" the sampler continues that image: its size, not width/height.
function continuesInit(node) {
  const input = node.inputs?.find((i) => i.name === "init");
  return input != null && input.link != null;
}

// [text, healthy?]
function sizeStatus(node) {
  const b = node.bitdance;
  if (!b.model) return ["connect a BitDance Model Loader", false];
  if (!b.info) return b.error ? [`model not on disk: ${modelLabel(b.model)}`, false] : ["…", true];
  if (continuesInit(node)) return ["continues init: its size (width/height unused)", true];
  const w = widget(node, "width").value;
  const h = widget(node, "height").value;
  const steps = arSteps(b.info, w, h);
  if (steps == null) {
    return [`${w}x${h}: this model makes sides of ${b.info.block_pixels} to ${b.info.max_side} px in steps of ${b.info.block_pixels}`, false];
  }
  return [`${steps} AR steps · ${b.info.parallel_num} tokens per step`, true];
}

// --- class sampler: the model's classes ---------------------------------------------------------
async function refreshClasses(node) {
  const name = connectedQuery(node, CLASS_LOADERS);
  node.bitdance.model = name;
  if (!name) return;
  const info = await fetchInfo("imagenet_info", name);
  if (node.bitdance.model !== name) return;
  node.bitdance.info = info.available ? info : null;
  node.bitdance.error = info.available ? null : info.error;
  if (!info.available) return node.setDirtyCanvas(true, true);
  const w = widget(node, "class_name");
  setOptions(w, info.classes);
  if (!info.classes.includes(w.value)) {
    const index = parseInt(String(w.value).split(":")[0], 10);
    if (index >= 0 && index < info.classes.length) setValue(w, info.classes[index]); // same class, this model's name
  }
  node.setDirtyCanvas(true, true);
}

function classStatus(node) {
  const b = node.bitdance;
  if (!b.model) return ["connect a BitDance ImageNet Loader", false];
  if (!b.info) return b.error ? [`model not on disk: ${modelLabel(b.model)}`, false] : ["…", true];
  const n = b.info.classes.length;
  const index = widget(node, "class_index")?.value;
  if (index != null && index >= n) return [`class_index ${index}: this model has classes 0 to ${n - 1}`, false];
  if (!b.info.classes.includes(widget(node, "class_name")?.value)) return [`class_name: not one of this model's ${n} classes`, false];
  return [`${n} classes`, true];
}

// --- drawing -------------------------------------------------------------------------------------
function drawStatus(node, ctx, [text, healthy]) {
  ctx.save();
  ctx.font = "12px sans-serif";
  ctx.fillStyle = healthy ? OK_COLOUR : WARNING_COLOUR;
  ctx.fillText(text, 10, node.size[1] - 8);
  ctx.restore();
}

let measure = null;
export function titleWidth(title) {
  measure ??= document.createElement("canvas").getContext("2d");
  const LG = window.LiteGraph;
  measure.font = `${LG?.NODE_TEXT_SIZE ?? 14}px ${LG?.NODE_FONT ?? "Arial"}`;
  return measure.measureText(title ?? "").width;
}

// Room for the title: the collapse dot on its left, the text, and as much again on its right.
function minWidth(node) {
  const pad = window.LiteGraph?.NODE_TITLE_HEIGHT ?? 30;
  return Math.ceil(titleWidth(node.title) + 2 * pad);
}

// Keeping up with the graph: the model wired into a sampler changes by rewiring or by the loader's
// dropdown, and no node event reaches the sampler for the latter. The canvas renderer redraws a node
// after such changes (onDrawForeground follows them there); the Vue node renderer ("Nodes 2.0")
// never calls onDrawForeground, so a timer follows every sampler too (FOLLOW_MS).
const FOLLOW_MS = 500;
const KINDS = {}; // node type -> { loaders, refresh, status }

function follow(node) {
  const kind = KINDS[node.comfyClass];
  if (!kind || !node.bitdance) return null;
  if (connectedQuery(node, kind.loaders) !== node.bitdance.model) kind.refresh(node);
  const [text, healthy] = kind.status(node);
  node.bitdance.status = text;
  node.bitdance.statusColour = healthy ? OK_COLOUR : WARNING_COLOUR;
  const el = node.bitdance.statusElement;
  if (el && (el.textContent !== text || el.dataset.colour !== node.bitdance.statusColour)) {
    el.textContent = text;
    el.dataset.colour = node.bitdance.statusColour;
    el.style.color = node.bitdance.statusColour;
  }
  return [text, healthy];
}

function vueNodes() {
  try {
    return Boolean(app.extensionManager?.setting?.get?.("Comfy.VueNodes.Enabled")
      ?? app.ui?.settings?.getSettingValue?.("Comfy.VueNodes.Enabled"));
  } catch (e) {
    return false;
  }
}

// The status line: drawn under the widgets by the canvas renderer; a text widget under the Vue one,
// which paints no canvas foreground (not saved: workflows keep the backend's widget layout).
function addStatusElement(node) {
  const el = document.createElement("div");
  el.className = "bitdance-status";
  el.style.cssText = "font: 12px sans-serif; padding: 2px 4px; white-space: normal;";
  const w = node.addDOMWidget?.("bitdance_status", "bitdance-status", el, { serialize: false, hideOnZoom: false });
  if (!w) return;
  w.serialize = false;
  node.bitdance.statusElement = el;
}

function withStatusLine(nodeType, name, loaders, refresh, status) {
  KINDS[name] = { loaders, refresh, status };
  const onDrawForeground = nodeType.prototype.onDrawForeground;
  nodeType.prototype.onDrawForeground = function (ctx) {
    const r = onDrawForeground?.apply(this, arguments);
    if (!this.bitdance || this.flags?.collapsed) return r;
    const now = follow(this);
    if (now && !this.bitdance.statusElement) drawStatus(this, ctx, now);
    return r;
  };
  const computeSize = nodeType.prototype.computeSize;
  nodeType.prototype.computeSize = function () {
    const size = computeSize.apply(this, arguments);
    return [size[0], size[1] + (this.bitdance?.statusElement ? 0 : 18)];
  };
}

function followAll() {
  const graphs = new Set([app.graph, app.canvas?.graph].filter(Boolean));
  for (const g of graphs) for (const n of g.nodes ?? g._nodes ?? []) if (n.bitdance) follow(n);
}

// --- the template browser: this pack's workflows in the order of templates.json ------------------
let templateOrder = null;
async function orderedTemplates(listing) {
  if (!listing?.[PACK]) return listing;
  templateOrder ??= fetch(new URL("templates.json", HERE)).then((r) => r.json()).then((t) => t.map((e) => e.name))
    .catch(() => []);
  const order = await templateOrder;
  const rank = (n) => (order.includes(n) ? order.indexOf(n) : order.length);
  listing[PACK] = [...listing[PACK]].sort((a, b) => rank(a) - rank(b) || a.localeCompare(b));
  return listing;
}

const getWorkflowTemplates = api.getWorkflowTemplates?.bind(api);
if (getWorkflowTemplates) api.getWorkflowTemplates = async () => orderedTemplates(await getWorkflowTemplates());

app.registerExtension({
  name: "BitDance.SizePresets",
  setup() {
    setInterval(followAll, FOLLOW_MS);
  },
  async beforeRegisterNodeDef(nodeType, nodeData) {
    if (!nodeData.name.startsWith("BitDance")) return;

    const computeSize = nodeType.prototype.computeSize;
    nodeType.prototype.computeSize = function () {
      const size = computeSize ? computeSize.apply(this, arguments) : [200, 100];
      return [Math.max(size[0], minWidth(this)), size[1]];
    };

    const onNodeCreated = nodeType.prototype.onNodeCreated;
    if (nodeData.name === SAMPLER) {
      nodeType.prototype.onNodeCreated = function () {
        const r = onNodeCreated?.apply(this, arguments);
        this.bitdance = { model: undefined, info: null, presets: [], error: null };
        const node = this;
        const w = this.addWidget("combo", "preset", CUSTOM, (value) => {
          const p = node.bitdance.presets.find((x) => x.label === value);
          if (!p) return;
          setValue(widget(node, "width"), p.width);
          setValue(widget(node, "height"), p.height);
          node.setDirtyCanvas(true, true);
        }, { values: [CUSTOM], serialize: false });
        w.serialize = false; // not part of widgets_values: saved workflows keep the backend's layout
        for (const name of ["width", "height"]) {
          const dim = widget(this, name);
          const cb = dim?.callback;
          if (dim) dim.callback = function () { const out = cb?.apply(this, arguments); syncPreset(node); return out; };
        }
        if (vueNodes()) addStatusElement(this);
        return r;
      };
      withStatusLine(nodeType, SAMPLER, LOADERS, refreshSizes, sizeStatus);
    } else if (nodeData.name === CLASS_SAMPLER) {
      nodeType.prototype.onNodeCreated = function () {
        const r = onNodeCreated?.apply(this, arguments);
        this.bitdance = { model: undefined, info: null, error: null };
        if (vueNodes()) addStatusElement(this);
        return r;
      };
      withStatusLine(nodeType, CLASS_SAMPLER, CLASS_LOADERS, refreshClasses, classStatus);
    }
  },
});
