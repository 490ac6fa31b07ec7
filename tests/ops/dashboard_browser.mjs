// SPDX-License-Identifier: MIT
// Opens dispatch_server's dashboard (GET /) in headless Chromium and reads
// it through the DOM, over the Chrome DevTools Protocol on Chromium's
// --remote-debugging-pipe (fds 3 and 4, NUL-separated JSON): no npm
// package, no WebSocket client, any Node version Debian ships.
//   node dashboard_browser.mjs CHROMIUM URL SHOT DONE_FILE PROFILE_DIR [TIMEOUT_S]
// Samples the page's figures every 200 ms until DONE_FILE exists (the load
// has finished), then until every count reads 0 (at most 20 s). Saves a
// screenshot to SHOT at the highest connected-clients reading. Prints one
// JSON line: the peak and the last reading of each figure, and how many
// /stats samples the page itself took.
import { spawn } from "node:child_process";
import { existsSync, mkdirSync, rmSync, writeFileSync } from "node:fs";

// PROFILE_DIR is inside the caller's temporary directory, which its trap
// removes whatever happens to this process.
const [chromiumPath, url, shotPath, doneFile, profile, timeoutArg] = process.argv.slice(2);
const timeoutMs = 1000 * Number(timeoutArg || 240);
const keys = ["connectedClients", "rooms", "trackedRooms", "typingTimers",
              "pendingPersistence", "bytes"];
mkdirSync(profile, { recursive: true });
const chromium = spawn(chromiumPath, [
  "--headless=new", "--no-sandbox", "--disable-gpu", "--no-first-run",
  "--disable-extensions", "--disable-background-networking",
  "--remote-debugging-pipe", `--user-data-dir=${profile}`, "--window-size=1280,800",
], { stdio: ["ignore", "ignore", "pipe", "pipe", "pipe"] });
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function fail(why) {
  console.error("dashboard_browser: " + why);
  chromium.kill("SIGKILL");
  process.exit(1);
}
setTimeout(() => fail("timed out"), timeoutMs).unref();
chromium.on("error", (e) => fail("cannot start chromium: " + e));

let chromiumErr = "";
chromium.stderr.on("data", (d) => { chromiumErr += d; });
chromium.on("exit", (code) => fail(`chromium exited (${code}): ${chromiumErr.slice(-2000)}`));
const toBrowser = chromium.stdio[3], fromBrowser = chromium.stdio[4];
let nextId = 0, inbox = "";
const pending = new Map();
fromBrowser.on("data", (d) => {
  inbox += d;
  let end;
  while ((end = inbox.indexOf("\0")) >= 0) {
    const msg = JSON.parse(inbox.slice(0, end));
    inbox = inbox.slice(end + 1);
    if (msg.id && pending.has(msg.id)) {
      pending.get(msg.id)(msg);
      pending.delete(msg.id);
    }
  }
});
let sessionId;  // the page's, once attached
function send(method, params = {}, toBrowserItself = false) {
  const id = ++nextId;
  const msg = { id, method, params };
  if (sessionId && !toBrowserItself) msg.sessionId = sessionId;
  toBrowser.write(JSON.stringify(msg) + "\0");
  return new Promise((resolve) => pending.set(id, resolve));
}
async function evaluate(expr) {
  const r = await send("Runtime.evaluate", { expression: expr, returnByValue: true });
  return r.result?.result?.value;
}
const created = await send("Target.createTarget", { url: "about:blank" }, true);
if (!created.result) fail("no page: " + JSON.stringify(created));
const attached = await send("Target.attachToTarget",
                            { targetId: created.result.targetId, flatten: true }, true);
if (!attached.result) fail("cannot attach: " + JSON.stringify(attached));
sessionId = attached.result.sessionId;

await send("Page.enable");
await send("Page.navigate", { url });
// What the page shows now: each figure as a number, the page's sample count.
const readExpr = `(() => {
  const out = {};
  for (const k of ${JSON.stringify(keys)}) {
    const el = document.getElementById("v-" + k);
    out[k] = el ? Number(el.textContent.replace(/,/g, "")) : NaN;
  }
  out.samples = Number(document.body.dataset.samples || 0);
  out.warnings = document.getElementById("warning-list")?.innerText ?? "";
  return out;
})()`;

const peak = Object.fromEntries(keys.map((k) => [k, 0]));
let last = null, shotAt = -1, firstSamples = 0;
async function sample() {
  const v = await evaluate(readExpr);
  if (!v || Number.isNaN(v.connectedClients)) return;
  if (!firstSamples && v.samples) firstSamples = v.samples;
  for (const k of keys) peak[k] = Math.max(peak[k], v[k]);
  if (v.connectedClients > shotAt && v.connectedClients > 0) {
    shotAt = v.connectedClients;
    const shot = await send("Page.captureScreenshot", { format: "png" });
    if (shot.result?.data) writeFileSync(shotPath, Buffer.from(shot.result.data, "base64"));
  }
  last = v;
}
while (!existsSync(doneFile)) {
  await sample();
  await sleep(200);
}
// Until every figure reads 0 and the page has polled at least 4 times since
// its first sample (a short load can end before it has: the check is that
// the page stays live, not how long dispatch_load takes).
const settle = Date.now() + 20000;
do {
  await sample();
  if (last && ["connectedClients", "rooms", "trackedRooms", "typingTimers",
               "pendingPersistence"].every((k) => last[k] === 0) &&
      last.samples > firstSamples + 3) break;
  await sleep(200);
} while (Date.now() < settle);

console.log(JSON.stringify({ peak, last, firstSamples, screenshotAtClients: shotAt }));
// Chromium writes its profile while it shuts down: wait for it to exit
// (SIGKILL after 5 s) before the profile is removed.
chromium.removeAllListeners("exit");
const exited = new Promise((r) => chromium.once("exit", r));
chromium.kill("SIGTERM");
const killer = setTimeout(() => chromium.kill("SIGKILL"), 5000);
await exited;
clearTimeout(killer);
// Chromium's helper processes can still be writing into the profile after
// the browser has exited (a removal then fails with ENOTEMPTY): that is
// no failure of the page; the caller's temporary directory, which holds
// the profile, goes at its exit.
try {
  rmSync(profile, { recursive: true, force: true, maxRetries: 5, retryDelay: 200 });
} catch (e) {
  console.error(`dashboard_browser: profile left for the caller to remove (${e.code})`);
}
process.exit(0);
