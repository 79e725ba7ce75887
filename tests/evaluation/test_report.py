"""The run report (src/dreamerv4/evaluation/report.py): a structurally real run folder (written with the
project's own writers where cheap) rendered to report.html and loaded in headless Chromium: every image
and video decodes, the headline chart comes first, raw metrics and config sit in collapsed <details>,
no console errors. Runs that stopped early and unreadable files still give a valid page."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import xml.etree.ElementTree as ET
from html.parser import HTMLParser
from pathlib import Path

import imageio.v2 as imageio
import numpy as np
import pytest

from dreamerv4.cli import main
from dreamerv4.config import save_config
from dreamerv4.errors import UserError
from dreamerv4.evaluation.report import NOT_RUN, SECTIONS, write_report
from dreamerv4.evaluation.report_data import CRAFTER_EVAL_FILES, collect, crafter_eval_path, headline
from dreamerv4.media import image_grid, save_png
from dreamerv4.run_config import RunConfig
from dreamerv4.training.logging import MetricsLog

ACHIEVEMENTS = ["collect_drink", "collect_sapling", "collect_wood", "place_plant", "wake_up"]


def _frames(n: int, seed: int, size: int = 64) -> np.ndarray:
    """(n, size, size, 3) uint8: a moving gradient with noise, so GIF/MP4 frames differ."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, size, dtype=np.float32)
    out = []
    for t in range(n):
        r = np.roll(ramp, 4 * t)[None, :].repeat(size, 0)
        frame = np.stack([r, r.T, np.full_like(r, 40 * (t % 6))], -1) + rng.normal(0, 8, (size, size, 3))
        out.append(np.clip(frame, 0, 255).astype(np.uint8))
    return np.stack(out)


def _write_metrics(stage_dir: Path, steps: int, extra_key: str) -> None:
    """metrics.jsonl through the loop's own writer: train records (loss falling, a NaN one), a skipped
    update, eval records, and a training-time image."""
    log = MetricsLog(stage_dir, tensorboard=False)
    for step in range(10, steps + 1, 10):
        loss = 2.0 * np.exp(-step / 100) + 0.1
        log.write({"kind": "train", "step": step, "elapsed_min": step / 600, "lr": 3e-4 * min(1, step / 50),
                   "loss": float(loss), "grad_norm": 1.0 / step ** 0.5, "samples_per_s": 120.0,
                   "frames_per_s": 1900.0, extra_key: float(loss / 2)})
        if step == 60:
            log.write({"kind": "nonfinite", "step": step, "loss": float("nan"), "grad_norm": float("inf")})
        if step % 50 == 0:
            log.write({"kind": "eval", "step": step, "elapsed_min": step / 600, "psnr": 15 + step / 20})
    log.write({"kind": "train", "step": steps + 10, "elapsed_min": 1.0, "loss": float("nan")})
    log.write_image("input|recon", 50, image_grid(_frames(4, 1), ncols=4))
    log.write_image("input|recon", 100, image_grid(_frames(4, 2), ncols=4))
    log.close()


def dynamics_eval() -> dict:
    """evaluation/dynamics.py's eval.json, cut to horizons 1 and 4: the model loses to the frame copy one
    frame ahead, beats it four ahead, keeps fewer objects, and shuffled actions change nothing."""
    scores = {"model": (19.0, 17.0, 0.30, 0.20), "copy_last_frame": (27.0, 16.5, 0.70, 0.35),
              "shuffled_actions": (18.9, 16.9, 0.30, 0.20), "tokenizer_reconstruction": (21.3, 21.2, 0.40, 0.41)}
    results = {m: {"1": {"psnr": a, "object_retention": c}, "4": {"psnr": b, "object_retention": d}}
               for m, (a, b, c, d) in scores.items()}
    comparisons = {
        "copy_last_frame": {"1": {"psnr_diff": -8.0, "psnr_diff_ci95": [-9.0, -7.0], "retention_diff": -0.4,
                                  "retention_diff_ci95": [-0.5, -0.3]},
                            "4": {"psnr_diff": 0.5, "psnr_diff_ci95": [0.2, 0.8], "retention_diff": -0.15,
                                  "retention_diff_ci95": [-0.2, -0.1]}},
        "shuffled_actions": {"1": {"psnr_diff": 0.1, "psnr_diff_ci95": [-0.1, 0.3]},
                             "4": {"psnr_diff": 0.1, "psnr_diff_ci95": [-0.05, 0.25]}}}
    curve = {m: [a, (a + b) / 2, (a + 2 * b) / 3, b] for m, (a, b, _, _) in scores.items()}
    return {"horizons": [1, 4], "results": results, "comparisons": comparisons, "psnr_curve": curve,
            "video": {"panels": ["real", "model", "shuffled"]}}


def build_run(run: Path) -> Path:
    """A run folder laid out as `dreamerv4 run` and the evaluations leave it; the agent and imagination
    stages and the imagination-trained policy's game evaluation did not run."""
    save_config(RunConfig(out_dir=str(run)), run / "config.yaml")
    summary = {"stages": {
        "record": {"seconds": 95.3, "data/crafter": {"recorded": True, "episodes": 20, "frames": 4100}},
        "validate": {"seconds": 1.2, "data/crafter": {"episodes": 20, "frames": 4100}},
        "tokenizer": {"seconds": 612.0, "loss": 0.31, "step": 200, "done": True, "stop_reason": "done",
                      "train_time_min": 10.2},
        "eval_tokenizer": {"seconds": 30.5, "psnr": 24.9, "ssim": 0.81},
    }}
    (run / "summary.json").write_text(json.dumps(summary, indent=2))
    _write_metrics(run / "tokenizer", 200, "mse")
    _write_metrics(run / "dynamics", 120, "shortcut_loss")

    tok_eval = {"checkpoint": str(run / "tokenizer/checkpoint.pt"), "frames": 256, "psnr": 24.9, "ssim": 0.81,
                "lpips": 0.12, "object_retention": None, "per_label": {"tree": 0.9, "water": 0.95},
                "references": {"avg_pool_4x4": {"psnr": 21.0, "ssim": 0.7}}}
    (run / "tokenizer/eval.json").write_text(json.dumps(tok_eval))
    real, recon = _frames(8, 3), _frames(8, 4)
    save_png(run / "tokenizer/eval.png", image_grid(np.concatenate([real, recon]), ncols=8))

    (run / "dynamics/eval.json").write_text(json.dumps(dynamics_eval()))
    rollout_dir = run / "dynamics" / "rollouts"
    rollout_dir.mkdir()
    side_by_side = np.concatenate([_frames(12, 5), _frames(12, 6)], axis=2)  # real | imagined
    imageio.mimsave(rollout_dir / "real_vs_imagined_0.gif", list(side_by_side), duration=0.1, loop=0)
    imageio.mimsave(rollout_dir / "real_vs_imagined_1.mp4", list(side_by_side), fps=8)
    # evaluation/dynamics.py writes eval.gif and eval.mp4 of one rollout: the report shows the MP4 only.
    imageio.mimsave(run / "dynamics" / "eval.gif", list(side_by_side[:6]), duration=0.25, loop=0)
    imageio.mimsave(run / "dynamics" / "eval.mp4", list(side_by_side[:6]), fps=4)

    for policy, ret, score in (("random", 1.1, 1.9), ("bc", 4.6, 8.4)):
        rates = {name: round(0.1 * (i + 1) * score / 8, 3) for i, name in enumerate(ACHIEVEMENTS)}
        path = crafter_eval_path(run, policy)
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps({"mean_return": ret, "return_ci95": [ret - 0.3, ret + 0.3], "crafter_score": score,
                                    "achievements": rates, "episodes": 50, "seed": 100000}))
    # evaluation/imagination.py's report for the BC policy (the imagination policy's did not run)
    (run / "eval" / "imagination_bc.json").write_text(json.dumps({
        "starts": 8, "horizon": 3, "imagined_return": 2.75, "real_return": 0.5, "unlock_precision": 0.25,
        "unlock_recall": None, "per_horizon": [{"h": h, "psnr": 20.0 - h} for h in (1, 2, 3)]}))
    return run


def _attribute_urls(page: str) -> list[str]:
    return re.findall(r'\b(?:src|href)="([^"]*)"', page)


def _sections(page: str) -> dict[str, str]:
    return dict(re.findall(r'<section id="([^"]+)" data-filled="(true|false)"', page))


def _section(page: str, sid: str) -> str:
    """The HTML of one <section> (sections do not nest)."""
    start = page.index(f'<section id="{sid}"')
    return page[start:page.index("</section>", start)]


VOID = {"area", "base", "br", "col", "embed", "hr", "img", "input", "link", "meta", "source", "track", "wbr"}


class _TagChecker(HTMLParser):
    """Every element the page opens is closed, in order (void elements and SVG self-closing tags aside)."""

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag not in VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        pass

    def handle_endtag(self, tag):
        assert self.stack and self.stack[-1] == tag, f"</{tag}> closes {self.stack[-3:]}"
        self.stack.pop()


def assert_well_formed(page: str) -> None:
    assert page.startswith("<!DOCTYPE html>")
    checker = _TagChecker()
    checker.feed(page)
    checker.close()
    assert checker.stack == [], checker.stack
    for svg in re.findall(r"<svg.*?</svg>", page, re.S):
        ET.fromstring(svg)  # inline SVG is XML


# ---------------------------------------------------------------------------------------------
# Chromium

ERROR_CAPTURE = """<script>
window.__errors = [];
window.addEventListener('error', e => {
  if (e.target && e.target.id === 'broken-control') return;
  window.__errors.push(e.message || ('failed to load ' + (e.target && (e.target.currentSrc || e.target.tagName))));
}, true);
document.addEventListener('securitypolicyviolation', e => window.__errors.push('CSP ' + e.violatedDirective));
</script>"""

LOAD_CHECK = """<img id="broken-control" src="data:image/png;base64,bm90IGEgcG5n" alt="">
<script>
const started = performance.now();
function check() {
  const videos = [...document.querySelectorAll('video')];
  if (videos.some(v => v.readyState < 2 && !v.error) && performance.now() - started < 20000) {
    setTimeout(check, 50); return;
  }
  const images = [...document.images].filter(i => i.id !== 'broken-control');
  const control = document.getElementById('broken-control');
  const chart = document.getElementById('headline-chart');
  const box = chart ? chart.getBoundingClientRect() : null;
  const lastStage = document.getElementById('imagination-instrument');
  const result = {
    images: images.length,
    images_loaded: images.filter(i => i.complete && i.naturalWidth > 0).length,
    videos: videos.length,
    videos_loaded: videos.filter(v => v.readyState >= 2 && v.videoWidth > 0 && !v.error).length,
    control_loaded: control.complete && control.naturalWidth > 0,
    svgs: document.querySelectorAll('svg.plot').length,
    first_section: document.querySelector('section').id,
    headline: chart && {
      top: box.top, bottom: box.bottom, width: box.width, height: box.height, viewport: window.innerHeight,
      // nothing with content (plot, image, video, table, text block, collapsible) comes before it
      first_content: document.querySelector('svg, img, video, table, pre, details') === chart,
      bars: chart.querySelectorAll('rect').length,
    },
    details: [...document.querySelectorAll('details')].map(d => ({
      summary: d.querySelector('summary').textContent,
      open: d.open,
      // what a closed <details> holds is not shown and takes no room: the box is about its summary line
      content_hidden: [...d.children].filter(c => c.tagName !== 'SUMMARY').every(c => !c.checkVisibility())
                      && d.getBoundingClientRect().height
                         < d.querySelector('summary').getBoundingClientRect().height + 20,
      after_stages: Boolean(lastStage.compareDocumentPosition(d) & Node.DOCUMENT_POSITION_FOLLOWING)
                    && !lastStage.contains(d),
    })),
    errors: window.__errors,
  };
  const out = document.createElement('pre');
  out.id = 'load-check';
  out.textContent = JSON.stringify(result);
  document.body.appendChild(out);
}
window.addEventListener('load', check);
</script>"""


def chromium_binary() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if found:
        return found
    if os.environ.get("CI"):
        pytest.fail("chromium is not installed: the test set-up (`make test`, run by .ci/run) installs Debian's "
                    "`chromium` package with apt-get; it did not run or failed")
    pytest.skip("chromium not installed (apt-get install -y chromium); CI installs it and never skips")


def chromium_command(profile: Path, *args: str) -> list[str]:
    """Headless Chromium with network names unresolvable, a 1280x900 window and console messages on stderr."""
    return [chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
            "--no-first-run", "--mute-audio", f"--user-data-dir={profile}", "--host-resolver-rules=MAP * ~NOTFOUND",
            "--window-size=1280,900", "--enable-logging=stderr", "--v=0", *args]


def load_in_chromium(page_path: Path, profile: Path) -> dict:
    """Open a copy of the page with ERROR_CAPTURE first in <head> and LOAD_CHECK appended in headless Chromium
    and return what the check script found, with every console message Chromium logged ("console")."""
    copy = page_path.with_name("report-load-check.html")
    copy.write_text(page_path.read_text().replace("<head>", "<head>" + ERROR_CAPTURE, 1)
                    .replace("</body>", LOAD_CHECK + "</body>"))
    cmd = chromium_command(profile, "--virtual-time-budget=30000", "--dump-dom", copy.resolve().as_uri())
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    match = re.search(r'<pre id="load-check">(.*?)</pre>', proc.stdout)
    assert match, f"no load-check result from chromium (exit {proc.returncode}):\n{proc.stderr[-2000:]}"
    result = json.loads(match.group(1))
    result["console"] = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    return result


def test_report_loads_in_chromium(tmp_path):
    run = build_run(tmp_path / "run")
    report = write_report(run)
    page = report.read_text()

    # Self-contained: every resource is a data URI (anchors point inside the page); no scripts.
    urls = _attribute_urls(page)
    assert urls and all(u.startswith(("data:", "#")) for u in urls), [u[:60] for u in urls if not u.startswith(("data:", "#"))]
    assert "<script" not in page and "<link" not in page and "@import" not in page
    assert_well_formed(page)

    result = load_in_chromium(report, tmp_path / "chromium-profile")
    # eval.png + latest training image of tokenizer and dynamics + one GIF; two MP4 <video>s.
    assert result["images"] == 4 and result["images_loaded"] == 4, result
    assert result["videos"] == 2 and result["videos_loaded"] == 2, result
    assert result["control_loaded"] is False, "the load check cannot tell a broken image from a good one"
    assert result["svgs"] >= 10, result
    assert result["errors"] == [] and result["console"] == [], (result["errors"], result["console"])

    # The headline chart opens the page: first section, first content, whole within the first screen.
    assert result["first_section"] == "crafter-eval"
    chart = result["headline"]
    assert chart and chart["first_content"], chart
    assert chart["width"] > 300 and chart["height"] > 100, chart
    assert 0 < chart["top"] and chart["bottom"] <= chart["viewport"], chart
    assert chart["bars"] == 2  # random and BC; the imagination policy's row says "not run"
    # Raw metrics and config: collapsed <details> after the stage sections, their content taking no room.
    details = result["details"]
    summaries = [d["summary"] for d in details]
    assert any("config" in s for s in summaries) and any("tokenizer/eval.json" in s for s in summaries), summaries
    assert all(not d["open"] and d["content_hidden"] and d["after_stages"] for d in details), details

    sections = _sections(page)
    assert list(sections) == list(SECTIONS)
    assert sections == {sid: "false" if sid in ("agent", "imagine") else "true" for sid in SECTIONS}, sections
    # What did not run says so instead of showing numbers.
    assert f"{NOT_RUN} (no {CRAFTER_EVAL_FILES['imagine']})" in page
    assert f"{NOT_RUN}: no agent/metrics.jsonl" in page
    assert "real_vs_imagined_0.gif" in page and "real_vs_imagined_1.mp4" in page


def test_summary_json_keeps_stages_and_adds_report_data(tmp_path):
    run = build_run(tmp_path / "run")
    stages_before = json.loads((run / "summary.json").read_text())["stages"]
    write_report(run)
    summary = json.loads((run / "summary.json").read_text())  # strict JSON: NaN would fail to parse below
    json.loads((run / "summary.json").read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON {c}"))

    assert summary["stages"] == stages_before
    assert summary["config"]["out_dir"] == str(run)
    tok = summary["training"]["tokenizer"]
    assert tok["step"] == 210 and tok["nonfinite_steps"] == 1
    assert tok["last_train"]["loss"] == "nan"  # the loop's encoding of a NaN, passed through as it is
    assert tok["last_eval"]["psnr"] == pytest.approx(25.0)
    assert summary["stage_evals"]["tokenizer"]["psnr"] == 24.9
    assert summary["crafter_eval"]["bc"]["mean_return"] == 4.6 and summary["crafter_eval"]["imagine"] is None
    assert summary["report"]["sections"] == {sid: sid not in ("agent", "imagine") for sid in SECTIONS}
    policies = summary["headline"]["policies"]
    assert policies["bc"]["mean_return"] == 4.6 and policies["imagine"] is None
    assert summary["report"]["rollouts"] == ["dynamics/eval.mp4", "dynamics/rollouts/real_vs_imagined_0.gif",
                                             "dynamics/rollouts/real_vs_imagined_1.mp4"]

    # A second report (e.g. after a resumed run) replaces the first and keeps the stages.
    write_report(run)
    assert json.loads((run / "summary.json").read_text())["stages"] == stages_before


def test_report_table_values_come_from_the_files(tmp_path):
    run = build_run(tmp_path / "run")
    page = write_report(run).read_text()
    crafter = page[page.index('id="crafter-eval"'):]
    assert "behaviour cloning</td><td class=\"num\">4.6</td><td class=\"num\">[4.3, 4.9]</td>" \
           "<td class=\"num\">8.4</td><td class=\"num\">50</td>" in crafter
    for name in ACHIEVEMENTS:
        assert f"<td>{name}</td>" in crafter
    assert "10:12" in page  # tokenizer wall time 612 s as m:ss
    tokenizer = _section(page, "tokenizer")
    assert "<td>PSNR (dB)</td><td class=\"num\">24.9</td><td class=\"num\">21</td>" in tokenizer
    assert "210 steps" in tokenizer and "tokenizer 10:12, eval_tokenizer 0:30" in tokenizer
    dynamics = _section(page, "dynamics")
    assert "copying the last real frame" in dynamics and "real | model | shuffled" in dynamics
    imagine_section = _section(page, "imagine")
    assert f"{NOT_RUN}: no {CRAFTER_EVAL_FILES['imagine']}" in imagine_section  # its test is the real game
    imagine = json.loads(crafter_eval_path(run, "bc").read_text())
    crafter_eval_path(run, "imagine").write_text(json.dumps({**imagine, "mean_return": 5.0}))
    page = write_report(run).read_text()
    assert "Paired over the same" not in page  # these evaluations keep no per-episode returns
    imagine_section = _section(page, "imagine")
    assert f"no {CRAFTER_EVAL_FILES['imagine']}" not in imagine_section
    assert "<td>real-game return</td><td class=\"num\">5 [4.3, 4.9]</td>" in imagine_section
    assert "train time" in page and "skipped non-finite updates" in page
    instrument = page[page.index('id="imagination-instrument"'):]
    assert "<td>imagined return over the horizon</td><td class=\"num\">2.75</td>" in instrument
    assert "<td>real return of the same actions</td><td class=\"num\">0.5</td>" in instrument
    assert "<td>unlock recall of the reward head</td><td class=\"num\">n/a</td>" in instrument
    assert "imagined vs real frame: PSNR" in instrument
    # Per-episode returns on the same worlds: the headline adds the paired difference.
    seeds = list(range(100000, 100004))
    for policy, returns in (("bc", [4.0, 5.0, 4.0, 5.0]), ("imagine", [5.0, 6.0, 5.0, 7.0])):
        result = json.loads(crafter_eval_path(run, policy).read_text())
        crafter_eval_path(run, policy).write_text(json.dumps({**result, "returns": returns, "env_seeds": seeds}))
    page = write_report(run).read_text()
    assert "Paired over the same 4 worlds: +1.25 (95% interval +0.76 to +1.74, above zero)." in page


def test_empty_run_folder_is_all_not_run(tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    page = write_report(run).read_text()
    assert_well_formed(page)
    assert set(_sections(page).values()) == {"false"}
    assert page.count(NOT_RUN) >= len(SECTIONS)
    assert "<img" not in page and "<video" not in page and "<svg" not in page
    summary = json.loads((run / "summary.json").read_text())
    assert summary["stages"] == {} and summary["config"] is None
    assert summary["crafter_eval"] == {"random": None, "bc": None, "imagine": None}
    assert summary["instrument"] == {"bc": None, "imagine": None}


def test_unreadable_files_are_reported_not_fatal(tmp_path):
    run = build_run(tmp_path / "run")
    crafter_eval_path(run, "bc").write_text("{not json")
    crafter_eval_path(run, "imagine").write_text(json.dumps({"mean_return": 3.0}))  # keys missing
    page = write_report(run).read_text()
    assert "crafter_bc.json: unreadable JSON" in page
    assert "crafter_imagine.json: missing return_ci95, crafter_score, achievements, episodes" in page
    summary = json.loads((run / "summary.json").read_text())
    assert any("crafter_bc.json" in p for p in summary["report"]["problems"])

    # A corrupt summary.json (the pipeline's record) is reported and left untouched, never replaced.
    (run / "summary.json").write_text('{"stages": {"tok')
    page = write_report(run).read_text()
    assert "summary.json: unreadable JSON" in page
    assert (run / "summary.json").read_text() == '{"stages": {"tok'

    with pytest.raises(UserError, match="no such run folder"):
        write_report(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------
# The headline in the page


def test_headline_section_says_what_moved_and_whether_the_intervals_separate(tmp_path):
    run = build_run(tmp_path / "run")
    bc = json.loads(crafter_eval_path(run, "bc").read_text())
    crafter_eval_path(run, "imagine").write_text(json.dumps(
        {**bc, "mean_return": 4.8, "achievements": {**bc["achievements"], "wake_up": 0.0, "collect_wood": 0.9}}))
    assert [m["name"] for m in headline(collect(run))["moved"]] == ["collect_wood", "wake_up"]
    headline_html = _section(write_report(run).read_text(), "crafter-eval")
    assert headline_html.index("<td>collect_wood</td>") < headline_html.index("<td>wake_up</td>")
    assert "+58.5 points" in headline_html and "-52.5 points" in headline_html
    assert "the 95% intervals overlap" in headline_html and "the 95% intervals do not overlap, higher" in headline_html


# ---------------------------------------------------------------------------------------------
# A run that stopped early, and a report written elsewhere


def test_run_stopped_after_the_tokenizer_gives_a_valid_report(tmp_path):
    run = tmp_path / "early"
    save_config(RunConfig(out_dir=str(run)), run / "config.yaml")
    stages = {"tokenizer": {"seconds": 60.0, "stop_reason": "time_limit"}}
    (run / "summary.json").write_text(json.dumps({"stages": stages}))
    _write_metrics(run / "tokenizer", 50, "mse")
    page = write_report(run).read_text()
    assert_well_formed(page)
    sections = _sections(page)
    assert sections == {sid: "true" if sid in ("tokenizer", "raw-metrics", "config") else "false" for sid in SECTIONS}
    headline_html = _section(page, "crafter-eval")
    assert "<svg" not in headline_html and headline_html.count(NOT_RUN) == 4  # 3 policies + moved achievements
    assert f"{NOT_RUN}: no tokenizer/eval.json" in _section(page, "tokenizer")
    assert "stopped: time_limit" in _section(page, "tokenizer")
    for sid in ("dynamics", "agent", "imagine", "imagination-instrument"):
        assert NOT_RUN in _section(page, sid), sid
    # A stage eval.json of an unexpected shape is shown raw, not fatal.
    (run / "tokenizer" / "eval.json").write_text(json.dumps([1, 2, 3]))
    page = write_report(run).read_text()
    assert_well_formed(page)
    assert "holds none of the key numbers" in _section(page, "tokenizer") and "tokenizer/eval.json" in page


def test_out_argument_and_cli_leave_the_run_folder_as_it_is(tmp_path, capsys):
    run = build_run(tmp_path / "run")
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    out = tmp_path / "elsewhere" / "page.html"
    assert write_report(run, out=out) == out and "headline-chart" in out.read_text()
    assert main(["report", str(run), "--out", str(tmp_path / "cli.html")]) == 0
    assert str(tmp_path / "cli.html") in capsys.readouterr().out
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing written there
    assert main(["report", str(tmp_path / "missing")]) == 2
    assert "no such run folder" in capsys.readouterr().err
