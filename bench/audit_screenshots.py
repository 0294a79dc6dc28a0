"""An audit as a new user would see it, in a browser: the HTML audit page and the Prefect UI, screenshotted.

Starts ``prefect server start`` on a non-default port (with ``PREFECT_UI_API_URL`` set, as the README says),
runs ``seqedit run`` on SmolLM2 against it (``--edits`` CounterFact facts, an evaluation after every batch, the
quick profile), writes ``seqedit report --run N --html``, and takes headless-Chromium screenshots of the audit
page, the flow-run list, the run's flow run (its task runs and its Logs tab) and the artifacts, into ``--out``.

    python bench/audit_screenshots.py --out docs/screenshots --edits 8 --batch-size 4

Needs Chromium (``apt-get install chromium``); facts: the first records of ``counterfact-easyedit-edit.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FACTS = ROOT.parent / "shared" / "data" / "counterfact" / "counterfact-easyedit-edit.json"


def screenshot(chromium: str, url: str, path: Path, height: int = 1100, budget_ms: int = 20000) -> None:
    """A 1400-pixel-wide screenshot of ``url`` after its scripts have had ``budget_ms`` of (virtual) time."""
    with tempfile.TemporaryDirectory() as profile:
        subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", f"--user-data-dir={profile}",
                        "--hide-scrollbars", f"--window-size=1400,{height}", f"--virtual-time-budget={budget_ms}",
                        f"--screenshot={path}", url], check=True, capture_output=True, timeout=180)
    print(f"screenshot: {path}", flush=True)


async def flow_run_of(run_id: int) -> str:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async with get_client() as client:
        runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(
            tags=FlowRunFilterTags(all_=[f"seqedit-run-{run_id}"])))
    return str(runs[0].id)


async def artifacts_of(engine, kinds: tuple[str, ...]) -> dict[str, str]:
    """The id of the latest artifact of the ledger's run 1 under each kind's key (:func:`artifact_key`)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    from flows.prefect_ui import artifact_key

    async with get_client() as client:
        found = {}
        for kind in kinds:
            artifacts = await client.read_artifacts(artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[artifact_key(engine, 1, kind)])))
            found[kind] = str(max(artifacts, key=lambda artifact: artifact.created).id)
        return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--edits", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--port", type=int, default=4310)
    args = parser.parse_args()
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    if chromium is None:
        parser.error("Chromium is not installed (apt-get install chromium)")
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="audit-ui-"))
    api = f"http://127.0.0.1:{args.port}/api"
    env = {**os.environ, "PREFECT_HOME": str(work / "prefect"), "PREFECT_API_URL": api, "PREFECT_UI_API_URL": api,
           "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1",
           "SEQEDIT_DATABASE_URL": f"sqlite:///{work / 'ledger.db'}"}
    os.environ.update(env)
    server = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                               "--port", str(args.port)], env=env, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    try:
        for _ in range(240):
            try:
                urllib.request.urlopen(f"{api}/health", timeout=2)
                break
            except OSError:
                time.sleep(1)
        facts = work / "facts.json"
        facts.write_text(json.dumps(json.loads(FACTS.read_text())[: args.edits]))
        seqedit = [sys.executable, "-m", "flows.cli"]
        subprocess.run([*seqedit, "init"], env=env, check=True, cwd=ROOT)
        subprocess.run([*seqedit, "ingest", str(facts), "--source", "audit"], env=env, check=True, cwd=ROOT)
        started = time.perf_counter()
        subprocess.run([*seqedit, "run", "--source", "audit", "--batch-size", str(args.batch_size), "--eval-every",
                        "1", "--eval-profile", "quick", "--limit", str(args.edits), "--name", "audit demo"],
                       env=env, check=True, cwd=ROOT)
        print(f"run: {time.perf_counter() - started:.0f} s", flush=True)
        subprocess.run([*seqedit, "report", "--run", "1", "--html", "--out", str(work)], env=env, check=True,
                       cwd=ROOT)
        screenshot(chromium, (work / "run-1-audit.html").as_uri(), args.out / "audit-page.png", height=3200)
        ui = f"http://127.0.0.1:{args.port}"
        flow_run = asyncio.run(flow_run_of(1))
        from db.engine import make_engine

        engine = make_engine(env["SEQEDIT_DATABASE_URL"])
        screenshot(chromium, f"{ui}/runs", args.out / "prefect-runs.png", budget_ms=60000)
        screenshot(chromium, f"{ui}/runs/flow-run/{flow_run}", args.out / "prefect-flow-run.png", height=1600)
        screenshot(chromium, f"{ui}/runs/flow-run/{flow_run}?tab=Task%20Runs", args.out / "prefect-task-runs.png",
                   height=1600)
        screenshot(chromium, f"{ui}/artifacts", args.out / "prefect-artifacts.png")
        for what, artifact in asyncio.run(artifacts_of(engine, ("summary", "metrics"))).items():
            # the artifact's own page: the key page renders no content in headless Chromium
            screenshot(chromium, f"{ui}/artifacts/artifact/{artifact}", args.out / f"prefect-artifact-{what}.png",
                       height=1600, budget_ms=30000)
    finally:
        server.terminate()
        server.wait(timeout=60)
    return 0


if __name__ == "__main__":
    sys.exit(main())
