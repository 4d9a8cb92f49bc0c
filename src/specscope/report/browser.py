"""Open a report page in headless Chromium and check it as a reader's browser shows it.

`check_page` loads the page from its file, then reports every image that does not decode, every request
that is not the page itself or a data: image, every console error or uncaught exception (a CSP
violation is one), and horizontal overflow; it tries the per-weight table's search box and sorting, and
saves a full-page screenshot. It talks to Chromium over the DevTools protocol on a pipe
(`--remote-debugging-pipe`, file descriptors 3 and 4): no port is opened and nothing outside the
machine is reached. Standard library only.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import subprocess
import tempfile
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome")
FLAGS = ("--headless", "--disable-gpu", "--no-sandbox", "--no-first-run", "--no-default-browser-check",
         "--disable-extensions", "--disable-background-networking", "--disable-component-update",
         "--disable-sync", "--disable-default-apps", "--mute-audio", "--hide-scrollbars")

# moves the two pipe ends (argv 1, 2) onto fds 3 and 4, then becomes Chromium (argv 3...)
LAUNCH = ("import os, sys; os.dup2(int(sys.argv[1]), 3); os.dup2(int(sys.argv[2]), 4); "
          "os.execvp(sys.argv[3], sys.argv[3:])")

# what the page looks like from inside: images and overflow
LOOK_JS = """(() => {
  const images = [...document.images].map(i => ({alt: i.alt, width: i.naturalWidth, shown: i.clientWidth,
                                                  box: i.parentElement.clientWidth}));
  const doc = document.documentElement;
  const split = [...document.querySelectorAll("td.PASS, td.FAIL, td.INCONCLUSIVE, td.UNDECIDABLE")].filter(td => {
    const words = td.textContent.trim().split(/\\s+/).filter(w => w);  // a verdict word set on two lines
    const r = document.createRange();
    return words.length && td.firstChild && (r.selectNodeContents(td), r.getClientRects().length > words.length);
  }).map(td => td.textContent.trim());
  return JSON.stringify({images, split, scrollWidth: doc.scrollWidth, clientWidth: doc.clientWidth});
})()"""

# one search and one sort of every per-weight table, and one sort of every other sortable table, as a reader would
TRY_JS = """(() => {
  const out = {tables: []};
  for (const box of document.querySelectorAll(".weights")) {
    const rows = [...box.querySelectorAll("tbody tr")], input = box.querySelector("input");
    const heads = [...box.querySelectorAll("thead tr:last-child th")];
    const at = Math.max(0, heads.findIndex(h => h.textContent.trim() === "weight"));
    const name = rows.length ? rows[rows.length - 1].cells[at].textContent : "";
    input.value = name; input.dispatchEvent(new Event("input"));
    const hits = rows.filter(r => !r.hidden).length, count = box.querySelector("output").textContent;
    input.value = ""; input.dispatchEvent(new Event("input"));
    const col = heads.findIndex(h => h.textContent.trim() === "nr/st");
    let sorted = null;
    if (col >= 0) {
      heads[col].querySelector("button").click();
      const v = [...box.querySelectorAll("tbody tr")].map(r => Number(r.cells[col].textContent))
                                                   .filter(x => !Number.isNaN(x));
      sorted = v.every((x, i) => i === 0 || v[i - 1] <= x);
    }
    out.tables.push({rows: rows.length, searched: name, hits, count, sorted,
                     hidden_after_clear: rows.filter(r => r.hidden).length});
  }
  // every other table whose header has buttons (a lab's Measured table): one click on its first column sorts it
  const key = t => { t = t.trim(); const v = t === "inf" ? Infinity : t === "-inf" ? -Infinity : Number(t);
                     return t === "" || t === "\u2014" ? null : Number.isNaN(v) ? t.toLowerCase() : v; };
  for (const table of document.querySelectorAll("table")) {
    if (table.closest(".weights") || !table.tHead) continue;
    const heads = [...table.tHead.rows[table.tHead.rows.length - 1].cells], body = table.tBodies[0];
    if (!body || body.rows.length < 2) continue;
    const values = i => [...body.rows].map(r => key(r.cells[i].textContent)).filter(x => x !== null);
    const ascending = v => v.every((x, i) => i === 0 || typeof v[i - 1] !== typeof x || v[i - 1] <= x);
    const buttons = heads.map((h, i) => h.querySelector("button") ? i : -1).filter(i => i >= 0);
    if (!buttons.length) continue;
    const at = buttons.find(i => !ascending(values(i))) ?? buttons[0];  // a column the click has to reorder
    heads[at].querySelector("button").click();
    const sorted = ascending(values(at));
    out.tables.push({rows: body.rows.length, searched: null, hits: 1, count: "", sorted, hidden_after_clear: 0,
                     column: heads[at].textContent.trim()});
  }
  return JSON.stringify(out);
})()"""


def chromium(install: bool = False) -> str | None:
    """The path of a Chromium/Chrome executable, or None. With install=True and running as root on a
    Debian-like system, install Debian's `chromium` package with apt-get when none is found."""
    found = next((p for p in map(shutil.which, NAMES) if p), None)
    if found or not install or not hasattr(os, "geteuid") or os.geteuid() != 0 or not shutil.which("apt-get"):
        return found
    import fcntl

    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    # one install at a time: a second apt-get (a parallel test worker's) would fail on dpkg's lock and find none.
    # The lock file is opened without following a link and never truncated (this runs as root, in a shared /tmp).
    lock = os.open(Path(tempfile.gettempdir()) / "specscope-chromium-install.lock",
                   os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW, 0o600)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"],
                    ["apt-get", "install", "-y", "-q", "chromium"]):
            if shutil.which("chromium") or (subprocess.run(cmd, env=env, capture_output=True, timeout=1200).returncode == 0
                                            and "install" in cmd):
                break
    finally:
        os.close(lock)  # releases the lock
    return next((p for p in map(shutil.which, NAMES) if p), None)


@dataclass
class PageCheck:
    """What the browser saw. `problems` lists everything a reader would notice; empty means clean."""

    url: str
    images: list[dict] = field(default_factory=list)
    requests: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    tables: list[dict] = field(default_factory=list)
    overflow_px: int = 0
    split_verdicts: list[str] = field(default_factory=list)  # verdict cells with a word broken across lines
    screenshot: str = ""

    @property
    def problems(self) -> list[str]:
        out = [f"image {i['alt']!r} does not decode" for i in self.images if not i["width"] > 0]
        out += [f"image {i['alt']!r} is wider than its box" for i in self.images if i["shown"] > i["box"] + 1]
        out += [f"request to {u[:80]}" for u in self.requests if not u.startswith(("data:", self.url))]
        out += [f"console: {e}" for e in self.errors]
        out += [f"page is {self.overflow_px}px wider than the window"] if self.overflow_px > 0 else []
        out += [f"verdict {v!r} is broken inside a word" for v in self.split_verdicts]
        for t in self.tables:
            if t["rows"] and (t["hits"] < 1 or t["hidden_after_clear"] or t["sorted"] is False):
                out.append(f"{'sortable' if t.get('column') else 'per-weight'} table does not search or sort: {t}")
        return out

    def as_dict(self) -> dict:
        return {"url": self.url, "images": self.images, "requests": self.requests, "errors": self.errors,
                "tables": self.tables, "overflow_px": self.overflow_px, "split_verdicts": self.split_verdicts,
                "screenshot": self.screenshot,
                "problems": self.problems}


class _Pipe:
    """A DevTools-protocol connection over Chromium's fds 3 (commands in) and 4 (replies and events out)."""

    def __init__(self, exe: str, profile: str, width: int, height: int):
        cmd_r, self._cmd_w = os.pipe()
        self._out_r, out_w = os.pipe()
        args = [exe, *FLAGS, f"--user-data-dir={profile}", f"--window-size={width},{height}",
                "--remote-debugging-pipe", "about:blank"]
        # Chromium expects its pipe ends on fds 3 and 4; LAUNCH puts them there
        self.proc = subprocess.Popen([sys.executable, "-c", LAUNCH, str(cmd_r), str(out_w), *args],
                                     pass_fds=(cmd_r, out_w),
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.close(cmd_r)
        os.close(out_w)
        self.messages: queue.Queue = queue.Queue()
        self.events: list[dict] = []
        self._next = 0
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        buffer = b""
        while chunk := os.read(self._out_r, 1 << 20):
            buffer += chunk
            *complete, buffer = buffer.split(b"\0")
            for raw in complete:
                self.messages.put(json.loads(raw))
        self.messages.put(None)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 60) -> dict:
        self._next += 1
        message = {"id": self._next, "method": method, "params": params or {}}
        if session:
            message["sessionId"] = session
        os.write(self._cmd_w, json.dumps(message).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            reply = self.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            if reply is None:
                raise RuntimeError(f"chromium exited during {method}")
            if reply.get("id") == self._next:
                if "error" in reply:
                    raise RuntimeError(f"{method}: {reply['error']}")
                return reply.get("result", {})
            self.events.append(reply)

    def wait_for(self, method: str, timeout: float = 60) -> dict:
        seen = next((e for e in self.events if e.get("method") == method), None)
        deadline = time.monotonic() + timeout
        while seen is None:
            event = self.messages.get(timeout=max(deadline - time.monotonic(), 0.01))
            if event is None:
                raise RuntimeError(f"chromium exited while waiting for {method}")
            self.events.append(event)
            seen = event if event.get("method") == method else None
        return seen

    def drain(self, seconds: float) -> None:
        """Collect the events that arrive in the next `seconds` (late console errors)."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            try:
                event = self.messages.get(timeout=left)
            except queue.Empty:
                return
            if event is None:
                return
            self.events.append(event)

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout=10)
        except (RuntimeError, OSError, queue.Empty):
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        os.close(self._cmd_w)
        self._reader.join(timeout=10)  # reads to EOF now that Chromium has exited
        if not self._reader.is_alive():
            os.close(self._out_r)


def _errors(events: list[dict]) -> list[str]:
    out = []
    for e in events:
        p = e.get("params", {})
        if e.get("method") == "Runtime.exceptionThrown":
            d = p.get("exceptionDetails", {})
            out.append(d.get("exception", {}).get("description") or d.get("text", "exception"))
        elif e.get("method") == "Runtime.consoleAPICalled" and p.get("type") in ("error", "assert", "warning"):
            out.append(" ".join(str(a.get("value", a.get("description", ""))) for a in p.get("args", [])))
        elif e.get("method") == "Log.entryAdded" and p.get("entry", {}).get("level") in ("error", "warning"):
            out.append(p["entry"].get("text", ""))
    return out


def _evaluate(pipe: _Pipe, expression: str, session: str):
    reply = pipe.send("Runtime.evaluate", {"expression": expression, "returnByValue": True}, session)
    if "exceptionDetails" in reply:
        raise RuntimeError(f"page check script failed: {reply['exceptionDetails'].get('text')}")
    return json.loads(reply["result"]["value"])


def check_page(page: str | os.PathLike, screenshot: str | os.PathLike | None = None, *, width: int = 1280,
               height: int = 900, exe: str | None = None, timeout: float = 90) -> PageCheck:
    """Load `page` (an HTML file) in headless Chromium at `width`×`height` CSS pixels and check it;
    write a full-page PNG to `screenshot` if given. Raises RuntimeError when no Chromium is found."""
    exe = exe or chromium()
    if exe is None:
        raise RuntimeError("no Chromium found (install Debian's `chromium` package)")
    url = Path(page).resolve().as_uri()
    with tempfile.TemporaryDirectory(prefix="specscope-chromium-") as profile:
        pipe = _Pipe(exe, profile, width, height)
        try:
            target = pipe.send("Target.createTarget", {"url": "about:blank"}, timeout=timeout)["targetId"]
            session = pipe.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
            for domain in ("Page", "Runtime", "Network", "Log"):
                pipe.send(f"{domain}.enable", session=session)
            pipe.send("Emulation.setDeviceMetricsOverride", {"width": width, "height": height,
                                                             "deviceScaleFactor": 1, "mobile": False}, session)
            pipe.events.clear()
            pipe.send("Page.navigate", {"url": url}, session)
            pipe.wait_for("Page.loadEventFired", timeout)
            pipe.drain(0.3)
            seen = _evaluate(pipe, LOOK_JS, session)
            check = PageCheck(url=url, images=seen["images"], split_verdicts=seen["split"],
                              overflow_px=max(0, seen["scrollWidth"] - seen["clientWidth"]))
            if screenshot is not None:
                size = pipe.send("Page.getLayoutMetrics", session=session)["cssContentSize"]
                clip = {"x": 0, "y": 0, "width": width, "height": min(size["height"], 16000), "scale": 1}
                shot = pipe.send("Page.captureScreenshot", {"format": "png", "captureBeyondViewport": True,
                                                            "clip": clip}, session, timeout=timeout)
                Path(screenshot).write_bytes(base64.b64decode(shot["data"]))
                check.screenshot = str(screenshot)
            check.tables = _evaluate(pipe, TRY_JS, session)["tables"]
            pipe.drain(0.2)
        finally:
            pipe.close()
    check.requests = [e["params"]["request"]["url"][:200] for e in pipe.events
                      if e.get("method") == "Network.requestWillBeSent"]
    check.errors = _errors(pipe.events)
    return check
