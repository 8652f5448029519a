//! `caduceus report` on a small results directory written here: structure of the HTML, errors, and a
//! screenshot in headless Chromium (required when CADUCEUS_REQUIRE_CHROMIUM=1, as in CI).
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

fn caduceus(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_caduceus"))
        .args(args)
        .output()
        .expect("run caduceus")
}

fn counts(tp: u64, fp: u64, tn: u64, fn_: u64) -> serde_json::Value {
    json!({"tp": tp, "fp": fp, "tn": tn, "fn": fn_})
}

/// Three rounds, two hospitals, race × gender, ε per hospital, thresholds in the configuration.
fn write_results(dir: &Path) {
    let config = json!({
        "name": "utkface-demo",
        "strategy": {"name": "fairfed", "beta": 0.5},
        "fairness": {"sensitiveAttributes": ["race", "gender"],
                     "maxDemographicParityDifference": 0.1, "maxEqualizedOddsDifference": 0.15},
        "group_labels": {"gender": {"0": "Male", "1": "Female"},
                         "race": {"0": "White", "1": "Black", "2": "Asian", "3": "Indian", "4": "Others"}}
    });
    let mut rounds = Vec::new();
    for r in 1..=3u64 {
        let mut race = serde_json::Map::new();
        let mut inter = serde_json::Map::new();
        let mut gender = [[0u64; 4]; 2];
        for g in 0..5u64 {
            // Race 4 starts worse and improves; race 3 is tiny (too few examples).
            let n = if g == 3 { 12 } else { 100 };
            let wrong = if g == 4 { 40 / r } else { 10 + g };
            let wrong = wrong.min(n / 2);
            let (tp, fn_) = (n / 2 - wrong / 2, wrong / 2);
            let (tn, fp) = (n / 2 - (wrong - wrong / 2), wrong - wrong / 2);
            race.insert(g.to_string(), counts(tp, fp, tn, fn_));
            for s in 0..2u64 {
                let c = [
                    tp / 2 + s * (tp % 2),
                    fp / 2 + s * (fp % 2),
                    tn / 2 + s * (tn % 2),
                    fn_ / 2 + s * (fn_ % 2),
                ];
                inter.insert(format!("{s}&{g}"), counts(c[0], c[1], c[2], c[3]));
                for k in 0..4 {
                    gender[s as usize][k] += c[k];
                }
            }
        }
        let total: Vec<u64> = (0..4).map(|k| gender[0][k] + gender[1][k]).collect();
        rounds.push(json!({
            "round": r,
            "strategy": "fairfed",
            "participants": ["hospital-a", "hospital-b"],
            "loss": 0.9 / r as f64,
            "counts": {
                "overall": counts(total[0], total[1], total[2], total[3]),
                "attributes": {
                    "race": race,
                    "gender": {"0": counts(gender[0][0], gender[0][1], gender[0][2], gender[0][3]),
                               "1": counts(gender[1][0], gender[1][1], gender[1][2], gender[1][3])},
                    "gender&race": inter
                }
            },
            "epsilon": {"hospital-a": 0.6 * r as f64, "hospital-b": 0.8 * r as f64},
            "delta": 1e-5,
            "weights": {"hospital-a": 0.55 + 0.05 * r as f64, "hospital-b": 0.45 - 0.05 * r as f64}
        }));
    }
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_vec_pretty(&config).unwrap(),
    )
    .unwrap();
    std::fs::write(
        dir.join("rounds.json"),
        serde_json::to_vec_pretty(&rounds).unwrap(),
    )
    .unwrap();
}

fn render(dir: &Path) -> (PathBuf, String) {
    let results = dir.join("results");
    write_results(&results);
    let out_path = dir.join("out").join("report.html");
    let out = caduceus(&[
        "report",
        "--results",
        results.to_str().unwrap(),
        "-o",
        out_path.to_str().unwrap(),
    ]);
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stdout).contains("report.html"));
    let html = std::fs::read_to_string(&out_path).unwrap();
    (out_path, html)
}

#[test]
fn report_is_self_contained_html_with_charts() {
    let dir = tempfile::tempdir().unwrap();
    let (_, html) = render(dir.path());
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.trim_end().ends_with("</html>"));
    // Accuracy and fairness across rounds, three group charts (race, gender, gender×race), ε, weights.
    assert_eq!(html.matches("<svg").count(), 7, "charts");
    assert_eq!(html.matches("<svg").count(), html.matches("</svg>").count());
    assert!(
        html.matches("<rect").count() >= 3 * (5 + 2 + 10),
        "bars per group"
    );
    assert!(html.contains("<path"), "lines across rounds");
    for section in [
        "Accuracy across training rounds",
        "Fairness gaps across training rounds",
        "The final model, group by group (round 3)",
        "Privacy budget ε by round",
        "Study configuration",
        "How to read this report",
        "Gender × Race (intersectional groups)",
    ] {
        assert!(html.contains(section), "missing section {section:?}");
    }
    assert!(html.contains("Indian"), "group labels are used");
    assert!(html.contains("too few"), "the 12-example group is flagged");
    assert!(html.contains("Outside the study's fairness limits") || html.contains("Within the study"));
    // No network: no URLs, no scripts, no external resources.
    for forbidden in [
        "http://", "https://", "<script", "src=", "href=", "url(", "@import", "<link",
    ] {
        assert!(!html.contains(forbidden), "report contains {forbidden:?}");
    }
}

#[test]
fn report_errors_name_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nowhere");
    let out = caduceus(&["report", "--results", missing.to_str().unwrap(), "-o", "x.html"]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("nowhere"));

    let results = dir.path().join("r");
    std::fs::create_dir_all(&results).unwrap();
    std::fs::write(results.join("config.json"), "{}").unwrap();
    let out_file = dir.path().join("x.html");
    let args = [
        "report",
        "--results",
        results.to_str().unwrap(),
        "-o",
        out_file.to_str().unwrap(),
    ];
    let err = String::from_utf8_lossy(&caduceus(&args).stderr).to_string();
    assert!(
        err.contains("missing results file") && err.contains("rounds.json"),
        "{err}"
    );
    std::fs::write(results.join("rounds.json"), "[{\"round\": 1, \"counts\": 7}]").unwrap();
    let err = String::from_utf8_lossy(&caduceus(&args).stderr).to_string();
    assert!(err.contains("rounds.json") && err.contains("not valid"), "{err}");
    std::fs::write(results.join("rounds.json"), "[]").unwrap();
    let err = String::from_utf8_lossy(&caduceus(&args).stderr).to_string();
    assert!(err.contains("no finished rounds"), "{err}");
    assert!(!out_file.exists());
}

fn find_chromium() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    for name in [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ] {
        for d in std::env::split_paths(&path) {
            let p = d.join(name);
            if p.is_file() {
                return Some(p);
            }
        }
    }
    None
}

/// Counts pixels within `tol` of `rgb`.
fn pixels_near(img: &image::RgbImage, rgb: [u8; 3], tol: i32) -> usize {
    img.pixels()
        .filter(|p| (0..3).all(|i| (p.0[i] as i32 - rgb[i] as i32).abs() <= tol))
        .count()
}

/// Headless Chromium on a closed network, writing nothing outside `profile`.
fn headless_chromium(chromium: &Path, profile: &Path) -> Command {
    let mut c = Command::new(chromium);
    c.args([
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--hide-scrollbars",
        "--no-first-run",
        "--no-default-browser-check",
        "--disable-extensions",
        "--disable-sync",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-domain-reliability",
        "--metrics-recording-only",
        // Closed network: every host resolves to nothing and every request goes to a dead proxy.
        "--host-resolver-rules=MAP * ~NOTFOUND",
        "--proxy-server=127.0.0.1:9",
        "--window-size=1000,4200",
        "--virtual-time-budget=5000",
    ])
    .arg(format!("--user-data-dir={}", profile.display()))
    .stdout(Stdio::null());
    c
}

/// Runs `command` to success within `limit`, its stderr in `log` (shown when it fails).
fn run_within(mut command: Command, log: &Path, limit: Duration) {
    let mut child = command
        .stderr(std::fs::File::create(log).unwrap())
        .spawn()
        .expect("start chromium");
    let start = Instant::now();
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            let stderr = std::fs::read_to_string(log).unwrap_or_default();
            let lines: Vec<&str> = stderr.lines().collect();
            let tail = lines[lines.len().saturating_sub(20)..].join("\n");
            assert!(status.success(), "chromium failed: {status}\n{tail}");
            return;
        }
        if start.elapsed() > limit {
            let _ = child.kill();
            panic!("chromium did not finish within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Checks that every chart (`<svg>`) in a serialized DOM starts with a non-empty `<title>` and has one
/// non-empty x and one y axis label (an element of class `axis-label` with `data-axis="x"` / `"y"`);
/// returns the number of charts.
fn check_charts(dom: &str) -> usize {
    let mut charts = 0;
    for chunk in dom.split("<svg").skip(1) {
        let svg = &chunk[..chunk.find("</svg>").expect("every <svg> is closed")];
        let body = &svg[svg.find('>').expect("<svg ...>") + 1..];
        let title = body
            .trim_start()
            .strip_prefix("<title>")
            .and_then(|t| t.split_once("</title>"))
            .map(|(t, _)| t.trim());
        assert!(
            title.is_some_and(|t| !t.is_empty()),
            "chart {} does not start with a <title>: {}",
            charts + 1,
            &body[..body.len().min(200)]
        );
        let title = title.unwrap_or_default();
        for axis in ["x", "y"] {
            let marker = format!("data-axis=\"{axis}\"");
            assert_eq!(
                body.matches(&marker).count(),
                1,
                "chart {title:?}: one {axis} axis label"
            );
            let at = body.find(&marker).unwrap();
            let tag = &body[body[..at].rfind('<').unwrap()..];
            let tag = &tag[..tag.find('>').unwrap()];
            assert!(tag.contains("axis-label"), "chart {title:?}: {tag}");
            let rest = &body[at..];
            let text = &rest[rest.find('>').unwrap() + 1..rest.find('<').unwrap()];
            assert!(
                !text.trim().is_empty(),
                "chart {title:?}: empty {axis} axis label"
            );
        }
        charts += 1;
    }
    charts
}

#[test]
fn every_chart_has_a_title_and_axis_labels() {
    let dir = tempfile::tempdir().unwrap();
    let (_, html) = render(dir.path());
    assert_eq!(check_charts(&html), 7);
}

#[test]
fn report_renders_in_headless_chromium() {
    let Some(chromium) = find_chromium() else {
        if std::env::var("CADUCEUS_REQUIRE_CHROMIUM").as_deref() == Ok("1") {
            panic!(
                "CADUCEUS_REQUIRE_CHROMIUM=1 but no chromium binary is on PATH (apt-get install chromium)"
            );
        }
        eprintln!("skipping: no chromium on PATH (set CADUCEUS_REQUIRE_CHROMIUM=1 to make this fail)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let (html_path, html) = render(dir.path());
    let png = dir.path().join("shot.png");
    let profile = dir.path().join("profile");
    let url = format!("file://{}", html_path.display());
    let mut shot = headless_chromium(&chromium, &profile);
    shot.arg(format!("--screenshot={}", png.display())).arg(&url);
    run_within(shot, &dir.path().join("shot.log"), Duration::from_secs(120));
    // The DOM Chromium built from the file: every chart in it has its title and axis labels.
    let dom_path = dir.path().join("dom.html");
    let mut dom = headless_chromium(&chromium, &profile);
    dom.arg("--dump-dom")
        .arg(&url)
        .stdout(std::fs::File::create(&dom_path).unwrap());
    run_within(dom, &dir.path().join("dom.log"), Duration::from_secs(120));
    let dom = std::fs::read_to_string(&dom_path).unwrap();
    assert_eq!(
        check_charts(&dom),
        html.matches("<svg").count(),
        "Chromium's DOM has every chart of the file"
    );
    // Development aids: keep the screenshot and the report to look at them.
    if let Ok(keep) = std::env::var("CADUCEUS_KEEP_SCREENSHOT") {
        std::fs::copy(&png, keep).unwrap();
    }
    if let Ok(keep) = std::env::var("CADUCEUS_KEEP_REPORT") {
        std::fs::copy(&html_path, keep).unwrap();
    }
    let img = image::open(&png).expect("chromium wrote a PNG").to_rgb8();
    assert_eq!((img.width(), img.height()), (1000, 4200));
    let mut colours = std::collections::HashSet::new();
    for p in img.pixels().step_by(7) {
        colours.insert(p.0);
    }
    assert!(
        colours.len() > 50,
        "screenshot is nearly uniform: {} colours",
        colours.len()
    );
    // The charts' colours are on the page in quantity: accuracy (blue), TPR (green), FPR (red-orange).
    for (name, rgb) in [
        ("accuracy blue", [0x00, 0x72, 0xB2]),
        ("TPR green", [0x00, 0x9E, 0x73]),
        ("FPR vermillion", [0xD5, 0x5E, 0x00]),
    ] {
        let n = pixels_near(&img, rgb, 12);
        assert!(n > 2000, "{name}: only {n} pixels; charts not drawn?");
    }
}
