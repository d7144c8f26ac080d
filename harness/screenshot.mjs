// Drive the Microsoft 365 Agents Playground's web UI in headless Chromium (Debian's
// /usr/bin/chromium, through npm playwright-core): open a chat, wait until an Adaptive Card
// showing given texts is rendered, take screenshots.
//
//   node harness/screenshot.mjs '<spec JSON>'
//
// spec: {
//   "url": "http://127.0.0.1:PORT/",          the Playground
//   "chat": "Personal Chat",                  the chat list entry to open (its aria-label)
//   "steps": [{"name": "running",             one step per state to capture, in order
//              "card": ["Activate new line"],  texts one rendered card must all show ...
//              "any": ["Running", "Queued"],   ... plus at least one of these (optional)
//              "screenshot": "/abs/path.png",  (optional)
//              "nth": 1,                       wait for the (nth+1)-th card that matches (default 0)
//              "click": "Help"}],              then press this button of that card (optional)
//   a step may instead wait for a chat message: {"name", "text": ["all", "these"], "screenshot",
//              "press": ["Like", "Submit"]}     then press these buttons (accessible names), in order
//   "timeoutMs": 30000,                       per step
//   "failureScreenshot": "/abs/path.png",     where to save the page when a step times out
//   "executablePath": "/usr/bin/chromium",    (optional)
//   "viewport": {"width": 1280, "height": 900} (optional)
// }
//
// It talks on stdout in JSON lines: {"event": "ready"} once the chat is open (the UI only
// shows what arrives on its WebSocket from then on: the Playground keeps no history for it),
// {"event": "step", "name", "text", "buttons", "screenshot", "clicked"} per step, then
// {"event": "done", "consoleErrors": [...]}; or {"event": "error", "message"} and exit code 1.

import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { chromium } from 'playwright-core';

const ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
  '--no-first-run',
  '--disable-quic',
];

function say(event) {
  process.stdout.write(JSON.stringify(event) + '\n');
}

async function main() {
  const spec = JSON.parse(process.argv[2] || '{}');
  if (!spec.url) throw new Error('spec.url is required');
  const timeout = spec.timeoutMs ?? 30000;
  // A fresh profile every run: nothing cached or remembered from an earlier run.
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'playground-ui-'));
  const consoleErrors = [];
  let context;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: spec.executablePath || '/usr/bin/chromium',
      headless: true,
      args: ARGS,
      viewport: spec.viewport || { width: 1280, height: 900 },
      timeout,
    });
    const page = context.pages()[0] || (await context.newPage());
    page.on('console', (message) => {
      // The UI asks an Office CDN for fonts and animations: offline, those fail harmlessly.
      if (message.type() === 'error' && !/Failed to load (resource|worklet)/.test(message.text())) {
        consoleErrors.push(message.text().slice(0, 500));
      }
    });
    page.on('pageerror', (error) => consoleErrors.push(`pageerror: ${String(error).slice(0, 500)}`));
    await page.goto(spec.url, { waitUntil: 'load', timeout });
    const chat = page.getByRole('treeitem', { name: spec.chat || 'Personal Chat', exact: true });
    await chat.click({ timeout });
    say({ event: 'ready' });

    for (const step of spec.steps || []) {
      if (step.text) {  // a plain message (streamed text, the AI label), not a card
        await page.waitForFunction((all) => all.every((t) => document.body.innerText.includes(t)), step.text,
          { timeout, polling: 100 }).catch(async (error) => {
          if (spec.failureScreenshot) {
            fs.mkdirSync(path.dirname(spec.failureScreenshot), { recursive: true });
            await page.screenshot({ path: spec.failureScreenshot }).catch(() => {});
          }
          throw new Error(`step ${step.name}: the page never showed ${JSON.stringify(step.text)} within ` +
            `${timeout} ms (${error.message.split('\n')[0]})`);
        });
        const shown = await page.evaluate(() => document.body.innerText);
        if (step.screenshot) {
          fs.mkdirSync(path.dirname(step.screenshot), { recursive: true });
          await page.screenshot({ path: step.screenshot });
        }
        for (const name of step.press || []) {
          await page.getByRole('button', { name, exact: true }).last().click({ timeout });
        }
        say({ event: 'step', name: step.name, text: shown, buttons: [], screenshot: step.screenshot || null,
          clicked: (step.press || []).join(',') || null, consoleErrors: consoleErrors.slice() });
        continue;
      }
      const handle = await page.waitForFunction(
        ({ all, any, nth }) => {
          const cards = Array.from(document.querySelectorAll('.ac-adaptiveCard'));
          return cards.filter((card) => {
            const text = card.innerText;
            return all.every((t) => text.includes(t)) && (any.length === 0 || any.some((t) => text.includes(t)));
          })[nth] || null;
        },
        { all: step.card || [], any: step.any || [], nth: step.nth || 0 },
        { timeout, polling: 100 },
      ).catch(async (error) => {
        const shown = await page.$$eval('.ac-adaptiveCard', (els) => els.map((el) => el.innerText.replace(/\s+/g, ' ')))
          .catch(() => []);
        if (spec.failureScreenshot) {
          fs.mkdirSync(path.dirname(spec.failureScreenshot), { recursive: true });
          await page.screenshot({ path: spec.failureScreenshot }).catch(() => {});
        }
        throw new Error(`step ${step.name}: no card showing ${JSON.stringify(step.card)} and any of ` +
          `${JSON.stringify(step.any || [])} within ${timeout} ms (${error.message.split('\n')[0]}); ` +
          `cards shown: ${JSON.stringify(shown)}; console errors: ${JSON.stringify(consoleErrors)}`);
      });
      const card = handle.asElement();
      await card.scrollIntoViewIfNeeded();
      const text = await card.innerText();
      const buttons = await card.$$eval('button', (els) => els.map((el) => el.title || el.innerText.trim()));
      if (step.screenshot) {
        fs.mkdirSync(path.dirname(step.screenshot), { recursive: true });
        await page.screenshot({ path: step.screenshot });
      }
      let clicked = null;
      if (step.click) {
        let pressed = null;
        for (const button of await card.$$('button')) {
          const title = await button.evaluate((el) => el.title || el.innerText.trim());
          if (title === step.click) pressed = button;
        }
        if (pressed) await pressed.click({ timeout });  // a real click, as a person's
        if (!pressed) throw new Error(`step ${step.name}: no button ${JSON.stringify(step.click)} on the card (${buttons})`);
        clicked = step.click;
      }
      say({ event: 'step', name: step.name, text, buttons, screenshot: step.screenshot || null, clicked,
        consoleErrors: consoleErrors.slice() });
    }
    say({ event: 'done', consoleErrors });
  } finally {
    if (context) await context.close().catch(() => {});
    fs.rmSync(userDataDir, { recursive: true, force: true });
  }
}

main().catch(async (error) => {
  say({ event: 'error', message: String(error && error.message ? error.message : error) });
  process.exitCode = 1;
});
