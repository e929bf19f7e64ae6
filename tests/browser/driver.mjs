// Drives Debian's chromium (playwright-core) against a running ComfyUI with the BitDance pack.
//
//   node driver.mjs convert CONFIG.json   API-format workflows -> UI-format files (what the UI saves)
//   node driver.mjs test CONFIG.json      the browser test (see tests/comfyui/test_browser.py)
//   node driver.mjs shot CONFIG.json      load the UI workflow "run", queue it from the page, wait for
//                                         its output image, screenshot (the README's picture)
//
//   node driver.mjs graphs CONFIG.json    load each UI workflow "graphs" [[ui_path, png_path], ...], fit the
//                                         view, screenshot the canvas (for the template thumbnails)
//
// CONFIG: {"url": ..., "screenshot": ..., "convert": [[api_path, ui_path], ...],
//          "ui_workflows": [[ui_path, api_path], ...], "run": ui_path, "pack": the pack's folder name,
//          "demo_run": ui_path, "class_workflow": ui_path, "missing_model": ui_path, "graphs": [...],
//          "template_names": [the pack's workflow names]}
// Prints one JSON line with the results; exits non-zero on an unexpected failure.
import { chromium } from "playwright-core";
import fs from "node:fs";

const [mode, configPath] = process.argv.slice(2);
const cfg = JSON.parse(fs.readFileSync(configPath, "utf8"));
const ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
  "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"];

// Queue the loaded graph from the page, wait for the Save Image node to show its output, fit the
// view and take the screenshot; returns {output, new_prompts}.
async function queueAndShoot(page, url, screenshot) {
  const before = await (await fetch(url + "/history")).json();
  await page.evaluate(() => window.app.queuePrompt(0, 1));
  await page.waitForFunction(() => {
    const save = window.app.graph._nodes.find((n) => n.comfyClass === "SaveImage");
    return save?.imgs?.length > 0 && save.imgs[0].complete && save.imgs[0].naturalWidth > 0;
  }, null, { timeout: 240000 });
  const output = await page.evaluate(() => {
    const save = window.app.graph._nodes.find((n) => n.comfyClass === "SaveImage");
    return { src: save.imgs[0].src, width: save.imgs[0].naturalWidth, height: save.imgs[0].naturalHeight };
  });
  const after = await (await fetch(url + "/history")).json();
  const new_prompts = Object.keys(after).filter((k) => !(k in before)).length;
  await page.keyboard.press("Escape");
  await fitView(page);
  if (screenshot) await page.screenshot({ path: screenshot });
  return { output, new_prompts };
}

async function fitView(page) {
  await page.evaluate(async () => {
    try { await window.app.extensionManager.command.execute("Comfy.Canvas.FitView"); } catch (e) { /* older frontends */ }
    window.app.graph.setDirtyCanvas(true, true);
  });
  await page.waitForTimeout(800);
}

// BitDance nodes whose title the canvas would cut: LiteGraph shortens a title wider than the node
// less two title heights (the collapse dot and the right margin); measured here independently.
function cutTitles() {
  const LG = window.LiteGraph;
  const ctx = document.createElement("canvas").getContext("2d");
  ctx.font = `${LG.NODE_TEXT_SIZE}px ${LG.NODE_FONT}`;
  return window.app.graph._nodes
    .filter((n) => String(n.comfyClass).startsWith("BitDance"))
    .filter((n) => ctx.measureText(n.title).width > n.size[0] - 2 * LG.NODE_TITLE_HEIGHT)
    .map((n) => `${n.title} (${Math.round(n.size[0])} px wide)`);
}

// The node of a class in the loaded graph, drawn until its web-extension state has an answer.
async function waitForInfo(page, comfyClass) {
  await page.waitForFunction((cls) => {
    const n = window.app.graph._nodes.find((x) => x.comfyClass === cls);
    window.app.graph.setDirtyCanvas(true, true);
    return n?.bitdance?.status && n.bitdance.status !== "…" && n.bitdance.model !== undefined;
  }, comfyClass, { timeout: 30000 });
  await page.waitForTimeout(300);
}

// The template browser on this pack's category: the cards of `names` in display order (rows, then
// left to right) and the width of each card's thumbnail (0: none; the frontend shows its own
// placeholder when NAME.jpg is missing).
async function templateCards(page, pack, names) {
  // tall enough for every card at once: the browser loads a thumbnail only once its card is in view
  const viewport = page.viewportSize();
  await page.setViewportSize({ width: viewport.width, height: Math.max(viewport.height, 400 * Math.ceil(names.length / 4) + 600) });
  await page.evaluate(async () => { await window.app.extensionManager.command.execute("Comfy.BrowseTemplates"); });
  await page.getByText(pack, { exact: true }).first().click({ timeout: 30000 });
  // the cards once every one is there with its thumbnail loaded (falsy until then; a missing
  // thumbnail times out here, and its 404 is in the responses the test checks)
  const handle = await page.waitForFunction((names) => {
    const byName = new Map();
    for (const e of document.querySelectorAll("body *")) {
      const t = e.children.length === 0 ? e.textContent.trim() : null;
      if (t && names.includes(t) && !byName.has(t)) byName.set(t, e);
    }
    const cards = [...byName.entries()].map(([name, e]) => {
      let card = e;
      while (card && !card.querySelector("img")) card = card.parentElement;
      const others = names.filter((n) => n !== name && card?.textContent.includes(n));
      const img = others.length ? null : card?.querySelector("img"); // not another card's thumbnail
      const r = e.getBoundingClientRect();
      return { name, top: Math.round(r.top), left: Math.round(r.left), complete: Boolean(img?.complete),
               width: img?.naturalWidth ?? 0 };
    }).sort((a, b) => a.top - b.top || a.left - b.left);
    return cards.length === names.length && cards.every((c) => c.complete) && cards;
  }, names, { timeout: 30000 });
  const cards = await handle.jsonValue();
  await page.keyboard.press("Escape");
  await page.waitForTimeout(300);
  await page.setViewportSize(viewport);
  return cards.map(({ name, width }) => ({ name, width }));
}

// After a run from the page: the AR sampler's last preview against the Save Image output (same
// size, and close: the whole image, not a partial one; JPEG vs PNG).
async function previewVsOutput(page) {
  return await page.evaluate(async () => {
    const nodes = window.app.graph._nodes;
    const sampler = nodes.find((n) => n.comfyClass === "BitDanceARSampler");
    const save = nodes.find((n) => n.comfyClass === "SaveImage");
    const previews = window.app.nodePreviewImages?.[String(sampler.id)] ?? [];
    const load = (src) => new Promise((ok, bad) => { const i = new Image(); i.onload = () => ok(i); i.onerror = bad; i.src = src; });
    const pixels = (img) => {
      const c = document.createElement("canvas");
      c.width = img.naturalWidth; c.height = img.naturalHeight;
      const ctx = c.getContext("2d");
      ctx.drawImage(img, 0, 0);
      return ctx.getImageData(0, 0, c.width, c.height).data;
    };
    if (!previews.length) return { previews: 0 };
    const pv = await load(previews[previews.length - 1]);
    const out = await load(save.imgs[0].src);
    const a = pixels(pv), b = pixels(out);
    let diff = 0;
    if (a.length === b.length) for (let i = 0; i < a.length; i++) if (i % 4 !== 3) diff += Math.abs(a[i] - b[i]);
    return { previews: previews.length, preview: [pv.naturalWidth, pv.naturalHeight],
             output: [out.naturalWidth, out.naturalHeight], mean_abs_diff: a.length === b.length ? diff / (a.length * 0.75) : null };
  });
}

// How the prompt the page would queue differs from an API-format workflow (empty: not at all).
function promptDiffs(prompt, api) {
  const diffs = [];
  for (const [id, node] of Object.entries(api)) {
    const got = prompt[id];
    if (!got) { diffs.push(`node ${id} missing`); continue; }
    if (got.class_type !== node.class_type) diffs.push(`node ${id}: ${got.class_type} != ${node.class_type}`);
    for (const [k, v] of Object.entries(node.inputs)) {
      if (JSON.stringify(got.inputs[k]) !== JSON.stringify(v)) diffs.push(`node ${id}.${k}: ${JSON.stringify(got.inputs[k])} != ${JSON.stringify(v)}`);
    }
  }
  if (Object.keys(prompt).length !== Object.keys(api).length) diffs.push("node count differs");
  return diffs;
}

const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true, args: ARGS });
const result = { console_errors: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on("pageerror", (e) => result.console_errors.push(String(e)));
  // a returning user: no first-run template browser over the canvas; the Vue node renderer
  // ("Nodes 2.0") only for the "vue" mode (a setting of the server's user, so said every time)
  await fetch(cfg.url + "/settings", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ "Comfy.TutorialCompleted": true, "Comfy.VueNodes.Enabled": mode === "vue" }) });
  await page.goto(cfg.url, { waitUntil: "domcontentloaded" });
  await page.waitForFunction(() => window.app?.graph && window.app?.extensionManager !== undefined, null, { timeout: 90000 });
  await page.waitForFunction(() => window.LiteGraph?.registered_node_types?.BitDanceARSampler, null, { timeout: 60000 });
  result.extension_loaded = await page.evaluate(() =>
    window.app.extensions.some((e) => e.name === "BitDance.SizePresets"));

  if (mode === "convert") {
    for (const [apiPath, uiPath] of cfg.convert) {
      const api = JSON.parse(fs.readFileSync(apiPath, "utf8"));
      const ui = await page.evaluate(async (api) => {
        await window.app.loadApiJson(api, "workflow");
        const g = window.app.graph;
        // lay the nodes out left to right in link order
        const order = [...g._nodes].sort((a, b) => Number(a.id) - Number(b.id));
        let x = 50;
        for (const n of order) { n.pos = [x, 100 + (Number(n.id) % 2) * 40]; x += n.size[0] + 60; }
        return g.serialize();
      }, api);
      fs.writeFileSync(uiPath, JSON.stringify(ui, null, 2) + "\n");
    }
    result.converted = cfg.convert.length;
  }

  if (mode === "test") {
    // 1. every UI-format workflow loads as drag-and-drop loads it, and the UI would queue exactly
    //    the API-format twin
    result.ui_workflows = {};
    result.cut_titles = {};
    for (const [uiPath, apiPath] of cfg.ui_workflows) {
      const ui = JSON.parse(fs.readFileSync(uiPath, "utf8"));
      const api = JSON.parse(fs.readFileSync(apiPath, "utf8"));
      const prompt = await page.evaluate(async (ui) => {
        await window.app.loadGraphData(ui);
        return (await window.app.graphToPrompt()).output;
      }, ui);
      result.ui_workflows[uiPath] = promptDiffs(prompt, api);
      result.cut_titles[uiPath] = await page.evaluate(cutTitles);
    }

    // 1b. the web extension follows the split loader too (its three files and parallel_num)
    if (cfg.split_ui) {
      const splitUi = JSON.parse(fs.readFileSync(cfg.split_ui, "utf8"));
      await page.evaluate(async (ui) => { await window.app.loadGraphData(ui); }, splitUi);
      await page.waitForFunction(() => {
        const n = window.app.graph._nodes.find((n) => n.comfyClass === "BitDanceARSampler");
        window.app.graph.setDirtyCanvas(true, true);
        return n?.bitdance?.presets?.length > 0 && n.bitdance.status;
      }, null, { timeout: 30000 });
      result.split_web = await page.evaluate(() => {
        const n = window.app.graph._nodes.find((n) => n.comfyClass === "BitDanceARSampler");
        return { presets: n.bitdance.presets.map((p) => p.label), parallel_num: n.bitdance.info.parallel_num,
                 status: n.bitdance.status };
      });
    }

    // 2. the tiny workflow, loaded like a dropped file
    const ui = JSON.parse(fs.readFileSync(cfg.run, "utf8"));
    await page.evaluate(async (ui) => { await window.app.loadGraphData(ui); }, ui);
    const sampler = () => window.app.graph._nodes.find((n) => n.comfyClass === "BitDanceARSampler");

    // 3. the web extension: presets follow the model, selecting one sets the size, step count shown
    await page.waitForFunction((fn) => {
      const n = window.app.graph._nodes.find((n) => n.comfyClass === "BitDanceARSampler");
      window.app.graph.setDirtyCanvas(true, true);
      return n?.bitdance?.presets?.length > 0;
    }, null, { timeout: 30000 });
    result.web = await page.evaluate(async () => {
      const n = window.app.graph._nodes.find((n) => n.comfyClass === "BitDanceARSampler");
      const w = (name) => n.widgets.find((x) => x.name === name);
      const out = { presets: n.bitdance.presets.map((p) => p.label), parallel_num: n.bitdance.info.parallel_num };
      const p512 = n.bitdance.presets.find((p) => p.width === 512 && p.height === 512);
      w("preset").value = p512.label;
      w("preset").callback(p512.label);
      window.app.graph.setDirtyCanvas(true, true);
      await new Promise((r) => setTimeout(r, 300));
      out.after_preset = { width: w("width").value, height: w("height").value, status: n.bitdance.status };
      // back to the workflow's own size (fast on the CPU), as a user typing it would
      w("width").value = 256; w("width").callback?.(256);
      w("height").value = 256; w("height").callback?.(256);
      window.app.graph.setDirtyCanvas(true, true);
      await new Promise((r) => setTimeout(r, 300));
      out.after_typing = { preset: w("preset").value, status: n.bitdance.status };
      out.preset_in_prompt = "preset" in (await window.app.graphToPrompt()).output[String(n.id)].inputs;
      // a LATENT on "init": the status says the init's size is used; taken away again before queueing
      const src = window.LiteGraph.createNode("EmptyLatentImage");
      window.app.graph.add(src);
      src.connect(0, n, n.findInputSlot("init"));
      window.app.graph.setDirtyCanvas(true, true);
      await new Promise((r) => setTimeout(r, 300));
      out.with_init = n.bitdance.status;
      window.app.graph.remove(src);
      window.app.graph.setDirtyCanvas(true, true);
      await new Promise((r) => setTimeout(r, 300));
      out.after_init_removed = n.bitdance.status;
      return out;
    });

    // 4. queue from the page; the output image appears on the Save Image node
    Object.assign(result, await queueAndShoot(page, cfg.url, cfg.screenshot));
    result.screenshot = cfg.screenshot;

    // 5. the demo from the page: the sampler's preview ends as the whole image, at its own size
    const demo = JSON.parse(fs.readFileSync(cfg.demo_run, "utf8"));
    await page.evaluate(async (ui) => { await window.app.loadGraphData(ui); }, demo);
    await waitForInfo(page, "BitDanceARSampler");
    result.demo = await page.evaluate(() => {
      const n = window.app.graph._nodes.find((x) => x.comfyClass === "BitDanceARSampler");
      return { presets: n.bitdance.presets.map((p) => [p.width, p.height]), status: n.bitdance.status,
               colour: n.bitdance.statusColour };
    });
    const demoRun = await queueAndShoot(page, cfg.url, null);
    result.demo.new_prompts = demoRun.new_prompts;
    result.demo.preview = await previewVsOutput(page);

    // 6. the class sampler lists the connected model's classes; a class chosen for another model
    //    keeps its index
    const cls = JSON.parse(fs.readFileSync(cfg.class_workflow, "utf8"));
    await page.evaluate(async (ui) => { await window.app.loadGraphData(ui); }, cls);
    await waitForInfo(page, "BitDanceImageNetSampler");
    result.classes = await page.evaluate(async () => {
      const n = window.app.graph._nodes.find((x) => x.comfyClass === "BitDanceImageNetSampler");
      const w = n.widgets.find((x) => x.name === "class_name");
      const out = { options: [...w.options.values], value: w.value, status: n.bitdance.status, colour: n.bitdance.statusColour };
      w.value = "3: tiger shark"; // as a workflow made for an ImageNet model would have it
      n.bitdance.model = undefined; // the next draw asks again
      for (let i = 0; i < 20 && w.value === "3: tiger shark"; i++) {
        window.app.graph.setDirtyCanvas(true, true);
        await new Promise((r) => setTimeout(r, 100));
      }
      out.relabelled = w.value;
      out.queued = (await window.app.graphToPrompt()).output[String(n.id)].inputs.class_name;
      return out;
    });

    // 7. a workflow whose model is not on disk: the status line says so, in the warning colour
    const missing = JSON.parse(fs.readFileSync(cfg.missing_model, "utf8"));
    await page.evaluate(async (ui) => { await window.app.loadGraphData(ui); }, missing);
    await waitForInfo(page, "BitDanceARSampler");
    result.missing = await page.evaluate(() => {
      const n = window.app.graph._nodes.find((x) => x.comfyClass === "BitDanceARSampler");
      return { status: n.bitdance.status, colour: n.bitdance.statusColour };
    });

    // 8. the template browser: this pack's thumbnails are served, the demo workflows come first
    const thumbs = [];
    page.on("response", (r) => { if (r.url().endsWith(".jpg") && r.url().includes("/workflow_templates/")) thumbs.push([r.status(), r.url()]); });
    result.templates = await templateCards(page, cfg.pack, cfg.template_names);
    result.thumbnail_responses = thumbs;
  }

  if (mode === "vue") {
    // The web extension under the Vue node renderer, which paints no canvas foreground: the presets
    // and class lists follow the model, and the status line is a text widget on the page.
    const vueOn = await page.evaluate(() => Boolean(window.app.extensionManager.setting.get("Comfy.VueNodes.Enabled")));
    const statusOf = (cls) => page.evaluate((cls) => {
      const n = window.app.graph._nodes.find((x) => x.comfyClass === cls);
      const el = n?.bitdance?.statusElement;
      const r = el?.getBoundingClientRect();
      return { status: n?.bitdance?.status, colour: n?.bitdance?.statusColour, text: el?.textContent ?? null,
               shown: Boolean(el && el.isConnected && r.width > 0 && r.height > 0 && getComputedStyle(el).visibility !== "hidden"),
               css_colour: el ? getComputedStyle(el).color : null };
    }, cls);
    // waits on the extension's own timer only: nothing here redraws the canvas
    const waitStatus = (cls, part) => page.waitForFunction(([cls, part]) => {
      const n = window.app.graph._nodes.find((x) => x.comfyClass === cls);
      return n?.bitdance?.statusElement?.textContent.includes(part);
    }, [cls, part], { timeout: 30000 });

    const [uiPath, apiPath] = cfg.vue_workflow;
    const ui = JSON.parse(fs.readFileSync(uiPath, "utf8"));
    const api = JSON.parse(fs.readFileSync(apiPath, "utf8"));
    await page.evaluate(async (ui) => { await window.app.loadGraphData(ui); }, ui);
    await waitStatus("BitDanceARSampler", "AR steps");
    const vue = { enabled: vueOn, first: await statusOf("BitDanceARSampler") };
    const samplerState = () => page.evaluate(() => {
      const n = window.app.graph._nodes.find((n) => n.comfyClass === "BitDanceARSampler");
      const w = (name) => n.widgets.find((x) => x.name === name).value;
      return { width: w("width"), height: w("height"), preset: w("preset"), text: n.bitdance.statusElement.textContent,
               presets: n.bitdance.presets.map((p) => p.label) };
    });
    // as a user: open the preset dropdown on the page, pick 512x512
    const before = await samplerState();
    vue.presets = before.presets;
    await page.getByText(before.preset, { exact: true }).first().click();
    await page.getByRole("option", { name: "512x512 · 64 AR steps" }).waitFor({ timeout: 30000 });
    vue.listed = await page.evaluate(() => [...document.querySelectorAll("[role=option]")].map((e) => e.textContent.trim()));
    // the status follows on the extension's timer: waited for (30 s at most, then read as it is)
    const statusSays = (part) => page.waitForFunction((part) => window.app.graph._nodes
      .find((n) => n.comfyClass === "BitDanceARSampler").bitdance.statusElement.textContent.startsWith(part),
      part, { timeout: 30000 }).catch(() => null);
    await page.getByRole("option", { name: "512x512 · 64 AR steps" }).click();
    await statusSays("64 AR steps");
    vue.after_pick = await samplerState();
    vue.after_pick.shown = await page.getByText("512x512 · 64 AR steps", { exact: true }).first().isVisible();
    // typing the workflow's own size back: the preset says custom, on the page too
    await page.evaluate(() => {
      const n = window.app.graph._nodes.find((n) => n.comfyClass === "BitDanceARSampler");
      for (const name of ["width", "height"]) {
        const w = n.widgets.find((x) => x.name === name);
        w.value = 256;
        w.callback?.(256);
      }
    });
    await statusSays("16 AR steps");
    vue.after_typing = await samplerState();
    vue.after_typing.shown = await page.getByText("custom", { exact: true }).first().isVisible();
    if (cfg.screenshot) await page.screenshot({ path: cfg.screenshot });
    vue.prompt_diffs = promptDiffs(await page.evaluate(async () => (await window.app.graphToPrompt()).output), api);
    vue.saved_widgets_values = await page.evaluate(() => window.app.graph.serialize().nodes
      .filter((n) => n.type === "BitDanceARSampler").map((n) => n.widgets_values));
    vue.ui_widgets_values = ui.nodes.filter((n) => n.type === "BitDanceARSampler").map((n) => n.widgets_values);
    result.vue = vue;

    const cls = JSON.parse(fs.readFileSync(cfg.class_workflow, "utf8"));
    await page.evaluate(async (ui) => { await window.app.loadGraphData(ui); }, cls);
    await waitStatus("BitDanceImageNetSampler", "classes");
    result.vue.classes = {
      ...(await statusOf("BitDanceImageNetSampler")),
      options: await page.evaluate(() => [...window.app.graph._nodes.find((x) => x.comfyClass === "BitDanceImageNetSampler")
        .widgets.find((x) => x.name === "class_name").options.values]),
    };

    const missing = JSON.parse(fs.readFileSync(cfg.missing_model, "utf8"));
    await page.evaluate(async (ui) => { await window.app.loadGraphData(ui); }, missing);
    await waitStatus("BitDanceARSampler", "model not on disk");
    result.vue.missing = await statusOf("BitDanceARSampler");
  }

  if (mode === "graphs") {
    for (const [uiPath, png] of cfg.graphs) {
      const ui = JSON.parse(fs.readFileSync(uiPath, "utf8"));
      await page.evaluate(async (ui) => {
        await window.app.loadGraphData(ui);
        // two rows of nodes (in link order) for a squarer picture; the file is not changed
        const order = [...window.app.graph._nodes].sort((a, b) => Number(a.id) - Number(b.id));
        const perRow = Math.ceil(order.length / 2);
        let x = 0, y = 0, rowHeight = 0;
        order.forEach((n, i) => {
          if (i === perRow) { x = 0; y += rowHeight + 80; }
          n.pos = [x, y];
          x += n.size[0] + 50;
          rowHeight = Math.max(rowHeight, n.size[1] + window.LiteGraph.NODE_TITLE_HEIGHT);
        });
      }, ui);
      await page.waitForTimeout(1000);
      await fitView(page);
      // the canvas's own pixels (no menus or banners over it), cropped to the nodes
      const data = await page.evaluate(() => {
        const c = window.app.canvas, LG = window.LiteGraph, dpr = window.devicePixelRatio || 1;
        c.draw(true, true);
        let [x0, y0, x1, y1] = [Infinity, Infinity, -Infinity, -Infinity];
        for (const n of window.app.graph._nodes) {
          const [ax, ay] = c.ds.convertOffsetToCanvas([n.pos[0], n.pos[1] - LG.NODE_TITLE_HEIGHT]);
          const [bx, by] = c.ds.convertOffsetToCanvas([n.pos[0] + n.size[0], n.pos[1] + n.size[1]]);
          x0 = Math.min(x0, ax); y0 = Math.min(y0, ay); x1 = Math.max(x1, bx); y1 = Math.max(y1, by);
        }
        const pad = 24, src = c.canvas;
        const sx = Math.max(0, (x0 - pad) * dpr), sy = Math.max(0, (y0 - pad) * dpr);
        const w = Math.min(src.width - sx, (x1 - x0 + 2 * pad) * dpr), h = Math.min(src.height - sy, (y1 - y0 + 2 * pad) * dpr);
        const out = document.createElement("canvas");
        out.width = Math.round(w); out.height = Math.round(h);
        out.getContext("2d").drawImage(src, sx, sy, w, h, 0, 0, out.width, out.height);
        return out.toDataURL("image/png").split(",")[1];
      });
      fs.writeFileSync(png, Buffer.from(data, "base64"));
    }
    result.graphs = cfg.graphs.length;
  }

  if (mode === "shot") {
    const ui = JSON.parse(fs.readFileSync(cfg.run, "utf8"));
    await page.evaluate(async (ui) => { await window.app.loadGraphData(ui); }, ui);
    await page.waitForTimeout(1000);  // the web extension asks the server about the model
    Object.assign(result, await queueAndShoot(page, cfg.url, cfg.screenshot));
    result.screenshot = cfg.screenshot;
  }
  console.log(JSON.stringify(result));
} finally {
  await browser.close();
}
