"""Take the README's Monitoring screenshots of a running digits run with headless Chromium
(Debian's `chromium`): the Ray dashboard's Actors view and TensorBoard's reward curve. A script
to run by hand when the UI changes, not a CI test. About 2 min on 2 CPU cores.

    python scripts/screenshots.py [--out docs] [--epochs 20] [--chromium chromium]

It needs Debian's `chromium` and the `websockets` package (in the venv `make test` builds).

1. starts `ddpo train` on the embedded digits model (output in a temporary directory) and reads
   the Ray dashboard's URL from its stdout;
2. starts headless Chromium with its DevTools port open and, over the DevTools protocol, sets
   the dashboard's cookie `ray-authentication-token` to the token `ray get-auth-token` prints
   (what the dashboard's login dialog does through /api/authenticate), opens `#/actors` and
   waits for the actors' names, and saves the page (`dashboard_actors.png`);
3. once `--epochs` epochs are in the run's metrics.jsonl, stops the run with SIGINT (it stops
   at its next safe point, with a checkpoint) and waits for it;
4. serves TensorBoard for the run's events (as `ddpo train --tensorboard` does, but with every
   epoch there when the page loads: the chart sets its y range at its first drawing), opens its
   time series filtered to `reward_mean`, unsmoothed, waits for the chart, makes it full width
   and saves it (`tensorboard_reward.png`); then removes the temporary directory (kept, and
   named, when something failed).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import websockets

from cluster.run_dir import start_tensorboard

REPO = Path(__file__).resolve().parent.parent
WIDTH = 1200
# the name the dashboard's login dialog gives the token: ray._private.authentication
# .authentication_constants.AUTHENTICATION_TOKEN_COOKIE_NAME
TOKEN_COOKIE = "ray-authentication-token"
# TensorBoard's saved settings (its localStorage item "_tb_global_settings"): settings pane closed
TENSORBOARD_SETTINGS = {"timeSeriesSettingsPaneOpened": False}
ACTOR_NAMES = ("learner-0", "learner-1", "sampler-0", "sampler-1", "reward-0")


def wait_for(condition, timeout: float, what: str, interval: float = 0.5):
    """Poll `condition()` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(interval)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


class TrainRun:
    """`ddpo train` on the digits model as a subprocess; its stdout lines are kept."""

    def __init__(self, output_dir: Path, num_epochs: int):
        command = [sys.executable, "-m", "cluster.cli", "train",
                   "--set", f"output_dir={output_dir}", "--set", f"num_epochs={num_epochs}"]
        self.log = open(output_dir / "train.log", "w")
        self.process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE,
                                        stderr=self.log, text=True, bufsize=1)
        self.lines: list[str] = []
        threading.Thread(target=self._read_stdout, daemon=True).start()

    def _read_stdout(self):
        for line in self.process.stdout:
            print(f"  train| {line}", end="", flush=True)
            self.lines.append(line.rstrip("\n"))

    def check_running(self):
        if self.process.poll() is not None:
            raise RuntimeError(f"ddpo train exited with {self.process.returncode}; "
                               f"see its stderr in {self.log.name}")

    def printed(self, prefix: str) -> str | None:
        """The rest of the first stdout line that starts with `prefix`, up to the first space."""
        self.check_running()
        for line in self.lines:
            if line.startswith(prefix):
                return line[len(prefix):].strip().split(" ")[0]
        return None

    def stop(self, timeout: float = 300):
        """SIGINT: the run stops at its next safe point and saves its checkpoint."""
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.log.close()


def epochs_recorded(run_dir: Path) -> int:
    metrics = run_dir / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if metrics.exists() else 0


def auth_token() -> str | None:
    """The token `ray get-auth-token` prints (the `ray` next to this interpreter), or None."""
    ray_cli = Path(sys.executable).parent / "ray"
    result = subprocess.run([str(ray_cli) if ray_cli.exists() else "ray", "get-auth-token"],
                            capture_output=True, text=True)
    token = result.stdout.strip().splitlines()
    return token[-1] if result.returncode == 0 and token else None


class Chromium:
    """Headless Chromium driven over the DevTools protocol (one page, one websocket)."""

    def __init__(self, executable: str, profile: Path):
        self.process = subprocess.Popen(
            [executable, "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
             "--no-first-run", "--remote-debugging-port=0", f"--user-data-dir={profile}",
             f"--window-size={WIDTH},800", "about:blank"],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        # with port 0 Chromium picks a free port and writes it to DevToolsActivePort
        active_port = profile / "DevToolsActivePort"
        port = wait_for(lambda: active_port.exists() and active_port.read_text().split("\n")[0],
                        30, "Chromium's DevTools port")
        targets = wait_for(lambda: self._pages(port), 30, "Chromium's page")
        self.page_url = targets[0]["webSocketDebuggerUrl"]
        self.next_id = 0

    @staticmethod
    def _pages(port: str):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list") as response:
            return [t for t in json.load(response) if t["type"] == "page"]

    async def call(self, ws, method: str, **params):
        self.next_id += 1
        await ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:  # events arrive between the answers; only the answer to this call matters
            message = json.loads(await ws.recv())
            if message.get("id") == self.next_id:
                if "error" in message:
                    raise RuntimeError(f"{method}: {message['error']}")
                return message["result"]

    async def wait_for_page(self, ws, predicate_js: str, timeout: float, what: str):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = await self.call(ws, "Runtime.evaluate", expression=predicate_js, returnByValue=True)
            if result["result"].get("value"):
                return
            await asyncio.sleep(0.5)
        raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")

    async def screenshot(self, url: str, ready_js: str, what: str, path: Path, height: int,
                         cookies: list[dict] = (), local_storage: dict[str, str] | None = None,
                         then_js: str | None = None):
        """Open `url` (with `cookies` set, or `local_storage` set in its origin and reloaded), wait
        until `ready_js` is true there, run `then_js`, and save the page as a PNG."""
        async with websockets.connect(self.page_url, max_size=None) as ws:
            await self.call(ws, "Emulation.setDeviceMetricsOverride", width=WIDTH, height=height,
                            deviceScaleFactor=1, mobile=False)
            for cookie in cookies:
                await self.call(ws, "Network.setCookie", **cookie)
            await self.call(ws, "Page.navigate", url=url)
            if local_storage:
                await self.wait_for_page(ws, "document.readyState === 'complete'", 30, url)
                for key, value in local_storage.items():
                    await self.call(ws, "Runtime.evaluate",
                                    expression=f"localStorage.setItem({json.dumps(key)}, {json.dumps(value)})")
                await self.call(ws, "Page.reload")  # navigating to the same URL#hash would not reload
            await self.wait_for_page(ws, ready_js, 90, what)
            if then_js:
                await self.call(ws, "Runtime.evaluate", expression=then_js)
            # the charts and tables animate in once their data is there
            await self.call(ws, "Runtime.evaluate", awaitPromise=True,
                            expression="new Promise(r => setTimeout(r, 1500))")
            png = await self.call(ws, "Page.captureScreenshot", format="png")
        path.write_bytes(base64.b64decode(png["data"]))
        print(f"wrote {path} ({path.stat().st_size // 1024} KiB)")

    def close(self):
        self.process.terminate()
        try:
            self.process.wait(10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=REPO / "docs", help="where the two PNGs go")
    p.add_argument("--epochs", type=int, default=20, help="epochs of the reward curve")
    p.add_argument("--chromium", default="chromium", help="the Chromium executable")
    args = p.parse_args()
    if shutil.which(args.chromium) is None:
        sys.exit(f"--chromium: '{args.chromium}' not found (Debian: apt-get install chromium)")

    started = time.monotonic()
    tmp = Path(tempfile.mkdtemp(prefix="ddpo-screenshots-"))
    run = chromium = None
    succeeded = False
    try:
        # more epochs than needed: the run is still going at the first screenshot; SIGINT ends it
        run = TrainRun(tmp, num_epochs=args.epochs + 100)
        dashboard = wait_for(lambda: run.printed("Ray dashboard:"), 300, "the Ray dashboard's URL")
        run_dir = Path(wait_for(lambda: run.printed("run directory:"), 60, "the run directory"))
        wait_for(lambda: run.check_running() or epochs_recorded(run_dir) >= 1, 600,
                 f"an epoch in {run_dir / 'metrics.jsonl'}", interval=1)

        chromium = Chromium(args.chromium, tmp / "chromium-profile")
        token = auth_token()
        cookies = [] if token is None else [dict(
            name=TOKEN_COOKIE, value=token, url=dashboard.rstrip("/") + "/", httpOnly=True,
            sameSite="Strict")]
        actors_listed = " && ".join(f"document.body.innerText.includes('{name}')" for name in ACTOR_NAMES)
        args.out.mkdir(parents=True, exist_ok=True)
        asyncio.run(chromium.screenshot(
            dashboard.rstrip("/") + "/#/actors", f"document.body && {actors_listed}",
            "the Actors table", args.out / "dashboard_actors.png", 880, cookies))
        wait_for(lambda: run.check_running() or epochs_recorded(run_dir) >= args.epochs, 600,
                 f"{args.epochs} epochs in {run_dir / 'metrics.jsonl'}", interval=1)
        run.stop()
        tensorboard = start_tensorboard(run_dir / "tensorboard")
        # the time series view, filtered to the reward's tag and unsmoothed (a smoothed curve sets
        # the y range and clips the raw one); ready once its chart has a line; then full width
        asyncio.run(chromium.screenshot(
            tensorboard.rstrip("/") + "/?smoothing=0&tagFilter=reward_mean#timeseries",
            "document.body && document.body.innerText.includes('reward_mean') "
            "&& document.querySelector('line-chart path.line, line-chart canvas') !== null",
            "the reward_mean chart", args.out / "tensorboard_reward.png", 640,
            local_storage={"_tb_global_settings": json.dumps(TENSORBOARD_SETTINGS)},
            then_js="document.querySelector('[title=\"Toggle full size mode\"]').click()"))
        succeeded = True
    finally:
        if chromium is not None:
            chromium.close()
        if run is not None:
            run.stop()
        if succeeded:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            print(f"kept {tmp} (the run's directory and stderr, train.log)", file=sys.stderr)
    print(f"done in {time.monotonic() - started:.0f} s")


if __name__ == "__main__":
    main()
