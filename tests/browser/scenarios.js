// The browser scenarios of tests/test_web_browser.py, in Debian's Chromium (never a download).
//
// Usage: node scenarios.js CONFIG.json — CONFIG names the server and the builds:
//   { "url": "http://127.0.0.1:PORT", "overviewBuild": UUID, "logBuild": UUID,
//     "lateBuild": UUID (waiting on the overview build: queued when its page opens),
//     "filterName": TEXT, "screenshots": DIR, "chromium": "/usr/bin/chromium",
//     "ready": FILE }
// The overview and log builds run until pytest lets them end, which it does once FILE exists:
// written when each page has seen its first state (a build running, a log growing, a build
// queued).
// Prints one JSON object with what each scenario saw; pytest checks it. A scenario that cannot
// see what it waits for fails with a message (exit status 1).
'use strict';

const fs = require('fs');
const os = require('os');
const path = require('path');
const { chromium } = require('playwright-core');

const WAIT = 90000; // ms: a scenario waits this long at most for the farm (against hanging)

// Calls `done` once `count` scenarios have called the function it returns.
function countdown(count, done) {
  let left = count;
  return () => { left -= 1; if (left === 0) done(); };
}

async function noReloads(page) {
  // Counts the main frame's navigations: live updates must not reload the page.
  let navigations = 0;
  page.on('framenavigated', (frame) => { if (frame === page.mainFrame()) navigations += 1; });
  return () => navigations;
}

// The overview shows a build running, then (without a reload) succeeded.
async function overview(context, config, ready) {
  const page = await context.newPage();
  const navigations = await noReloads(page);
  await page.goto(config.url + '/');
  await page.evaluate(() => { window.__buildfarmLoaded = true; });
  const running = `#running tr[data-uuid="${config.overviewBuild}"]`;
  const wasRunning = await page.waitForSelector(running, { timeout: WAIT })
    .then(() => true, () => false);
  ready();
  const succeeded = `#recent tr[data-uuid="${config.overviewBuild}"] [data-state="succeeded"]`;
  await page.waitForSelector(succeeded, { timeout: WAIT });
  const stillRunning = await page.$(running);
  const sameDocument = await page.evaluate(() => window.__buildfarmLoaded === true);
  return { page, result: {
    wasRunning, succeeded: true, stillListedRunning: stillRunning !== null, sameDocument,
    navigations: navigations(),
  } };
}

// A running build's page: its log grows while it runs, without a reload.
async function buildLog(context, config, ready) {
  const page = await context.newPage();
  const navigations = await noReloads(page);
  await page.goto(`${config.url}/builds/${config.logBuild}`);
  await page.evaluate(() => { window.__buildfarmLoaded = true; });
  const pre = page.locator('#log-text');
  const streaming = await pre.getAttribute('data-log-stream');
  const before = (await pre.textContent()).length;
  // Ready only once the log has grown: the build ticks until every page is ready, and might
  // otherwise end before a line more reached the page.
  await page.waitForFunction(
    ([n]) => document.getElementById('log-text').textContent.length > n + 20,
    [before], { timeout: WAIT });
  ready();
  const text = await pre.textContent();
  const after = text.length;
  // What the builder printed besides text (bells) is not shown, streamed or not.
  const controls = /[\x00-\x08\x0b-\x1f\x7f-\x9f]/.test(text);
  const sameDocument = await page.evaluate(() => window.__buildfarmLoaded === true);
  return { page, result: {
    streaming, before, after, controls, sameDocument, navigations: navigations(),
  } };
}

// A build's page opened while it waits in the queue: when the build starts, its log appears
// and grows, without a reload.
async function lateLog(context, config, ready) {
  const page = await context.newPage();
  const navigations = await noReloads(page);
  await page.goto(`${config.url}/builds/${config.lateBuild}`);
  await page.evaluate(() => { window.__buildfarmLoaded = true; });
  const queuedAtFirst = (await page.$('#log-text')) === null;
  ready();
  await page.waitForSelector('#log-text[data-following]', { timeout: WAIT });
  await page.waitForFunction(
    () => /tick 3 of/.test(document.getElementById('log-text').textContent),
    null, { timeout: WAIT });
  const sameDocument = await page.evaluate(() => window.__buildfarmLoaded === true);
  await page.close();
  return { queuedAtFirst, sameDocument, navigations: navigations() };
}

// The builds list: a derivation name filter narrows it.
async function filter(context, config) {
  const page = await context.newPage();
  await page.goto(config.url + '/builds');
  const rows = '#build-list tbody tr';
  const before = await page.locator(rows).count();
  await page.fill('#filters input[name="name"]', config.filterName);
  await Promise.all([page.waitForURL(/name=/), page.click('#filters button[type="submit"]')]);
  const names = await page.locator(`${rows} td:nth-child(2) a`).allTextContents();
  const url = page.url();
  await page.close();
  return { before, after: names.length, names, url };
}

async function main() {
  const config = JSON.parse(fs.readFileSync(process.argv[2], 'utf8'));
  const profile = fs.mkdtempSync(path.join(os.tmpdir(), 'buildfarm-chromium-'));
  const context = await chromium.launchPersistentContext(profile, {
    executablePath: config.chromium || '/usr/bin/chromium',
    headless: true,
    viewport: { width: 1280, height: 860 },
    args: ['--headless', '--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
           '--disable-background-networking', '--disable-component-update', '--disable-sync',
           '--disable-dev-shm-usage'],
  });
  try {
    const results = {};
    // Both builds run at once: watch them at once.
    const ready = countdown(3, () => fs.writeFileSync(config.ready, 'ready\n'));
    const [seen, log, late] = await Promise.all([
      overview(context, config, ready), buildLog(context, config, ready),
      lateLog(context, config, ready)]);
    results.overview = seen.result;
    results.log = log.result;
    results.late = late;
    if (config.screenshots) {
      await log.page.screenshot({ path: path.join(config.screenshots, 'build.png'),
                                  fullPage: true });
      await seen.page.screenshot({ path: path.join(config.screenshots, 'overview.png'),
                                   fullPage: true });
    }
    results.filter = await filter(context, config);
    process.stdout.write(JSON.stringify(results) + '\n');
  } finally {
    await context.close();
    fs.rmSync(profile, { recursive: true, force: true });
  }
}

main().catch((error) => {
  process.stderr.write(`browser scenario failed: ${error.stack || error}\n`);
  process.exit(1);
});
