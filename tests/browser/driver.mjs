// Drives Debian's chromium (playwright-core) against a running ComfyUI with the BitDance pack.
//
//   node driver.mjs convert CONFIG.json   API-format workflows -> UI-format files (what the UI saves)
//   node driver.mjs test CONFIG.json      the browser test (see tests/comfyui/test_browser.py)
//   node driver.mjs shot CONFIG.json      load the UI workflow "run", queue it from the page, wait for
//                                         its output image, screenshot (the README's picture)
//
// CONFIG: {"url": ..., "screenshot": ..., "convert": [[api_path, ui_path], ...],
//          "ui_workflows": [[ui_path, api_path], ...], "run": ui_path}
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
  await page.evaluate(async () => {
    try { await window.app.extensionManager.command.execute("Comfy.Canvas.FitView"); } catch (e) { /* older frontends */ }
    window.app.graph.setDirtyCanvas(true, true);
  });
  await page.waitForTimeout(800);
  await page.screenshot({ path: screenshot });
  return { output, new_prompts };
}

const browser = await chromium.launch({ executablePath: "/usr/bin/chromium", headless: true, args: ARGS });
const result = { console_errors: [] };
try {
  const page = await browser.newPage({ viewport: { width: 1600, height: 1000 } });
  page.on("pageerror", (e) => result.console_errors.push(String(e)));
  // a returning user: no first-run template browser over the canvas
  await fetch(cfg.url + "/settings", { method: "POST", headers: { "Content-Type": "application/json" },
    body: JSON.stringify({ "Comfy.TutorialCompleted": true }) });
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
    for (const [uiPath, apiPath] of cfg.ui_workflows) {
      const ui = JSON.parse(fs.readFileSync(uiPath, "utf8"));
      const api = JSON.parse(fs.readFileSync(apiPath, "utf8"));
      const prompt = await page.evaluate(async (ui) => {
        await window.app.loadGraphData(ui);
        return (await window.app.graphToPrompt()).output;
      }, ui);
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
      result.ui_workflows[uiPath] = diffs;
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
