//! The bias report: one self-contained HTML file with inline SVG charts, no scripts and no network
//! fetches, written for a clinician as much as for an engineer.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;

use serde_json::Value;

use crate::counts::{GroupCounts, INTERSECTION_SEP};
use crate::metrics::{AttributeMetrics, DEFAULT_MIN_GROUP_SIZE, FairnessMetrics};
use crate::results::{GroupLabels, RoundResult, StudyResults};
use crate::verdict::{FairnessThresholds, Outcome, verdict};

/// Options of the report.
#[derive(Clone, Debug)]
pub struct ReportOptions {
    /// Minimum group size; `None` takes `min_group_size` from the configuration, else the default.
    pub min_group_size: Option<u64>,
}

/// Why a report could not be rendered.
#[derive(Debug, thiserror::Error)]
pub enum ReportError {
    #[error("the study has no finished rounds yet, so there is nothing to report")]
    NoRounds,
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Okabe–Ito colours: distinguishable with the common forms of colour blindness.
const PALETTE: [&str; 8] = [
    "#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#666666", "#000000",
];
const C_ACC: &str = "#0072B2";
const C_TPR: &str = "#009E73";
const C_FPR: &str = "#D55E00";

/// Escapes text for HTML and SVG content and attribute values.
pub fn escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            _ => out.push(c),
        }
    }
    out
}

fn pct(v: Option<f64>) -> String {
    v.map(|x| format!("{:.1}%", x * 100.0))
        .unwrap_or_else(|| "n/a".into())
}

fn gap(v: Option<f64>) -> String {
    v.map(|x| format!("{x:.3}")).unwrap_or_else(|| "n/a".into())
}

/// Finds a number anywhere in the configuration under any of `names` (compared ignoring case, `_`
/// and `-`).
fn find_number(v: &Value, names: &[&str]) -> Option<f64> {
    let norm = |s: &str| {
        s.chars()
            .filter(|c| *c != '_' && *c != '-')
            .flat_map(char::to_lowercase)
            .collect::<String>()
    };
    match v {
        Value::Object(m) => {
            for (k, val) in m {
                if names.iter().any(|n| norm(k) == norm(n))
                    && let Some(x) = val.as_f64()
                {
                    return Some(x);
                }
            }
            m.values().find_map(|val| find_number(val, names))
        }
        Value::Array(a) => a.iter().find_map(|val| find_number(val, names)),
        _ => None,
    }
}

/// The fairness thresholds written anywhere in the configuration (`maxDemographicParityDifference` /
/// `max_demographic_parity_difference` / `maxDPD`, and the same for equalized odds).
pub fn thresholds_from_config(config: &Value) -> FairnessThresholds {
    FairnessThresholds {
        max_demographic_parity_difference: find_number(
            config,
            &["max_demographic_parity_difference", "max_dpd"],
        ),
        max_equalized_odds_difference: find_number(config, &["max_equalized_odds_difference", "max_eod"]),
    }
}

struct Labels<'a>(&'a GroupLabels);

impl Labels<'_> {
    fn attribute(&self, key: &str) -> String {
        key.split(INTERSECTION_SEP)
            .map(|a| {
                let mut c = a.chars();
                match c.next() {
                    Some(f) => f.to_uppercase().collect::<String>() + c.as_str(),
                    None => String::new(),
                }
            })
            .collect::<Vec<_>>()
            .join(" × ")
    }

    /// Human name of one group, one line per attribute of an intersection.
    fn group(&self, attr_key: &str, value: &str) -> Vec<String> {
        let attrs: Vec<&str> = attr_key.split(INTERSECTION_SEP).collect();
        let values: Vec<&str> = value.split(INTERSECTION_SEP).collect();
        if attrs.len() != values.len() {
            return vec![value.to_string()];
        }
        attrs
            .iter()
            .zip(&values)
            .map(|(a, v)| {
                self.0
                    .get(*a)
                    .and_then(|m| m.get(*v))
                    .cloned()
                    .unwrap_or_else(|| {
                        if attrs.len() > 1 {
                            format!("{a} {v}")
                        } else {
                            v.to_string()
                        }
                    })
            })
            .collect()
    }
}

/// Renders the whole report.
pub fn render_html(results: &StudyResults, opts: &ReportOptions) -> Result<String, ReportError> {
    let last = results.rounds.last().ok_or(ReportError::NoRounds)?;
    let group_labels = results.group_labels().map_err(ReportError::Config)?;
    let labels = Labels(&group_labels);
    let min_group_size = opts
        .min_group_size
        .or_else(|| {
            find_number(&results.config, &["min_group_size"])
                .filter(|x| *x >= 0.0)
                .map(|x| x as u64)
        })
        .unwrap_or(DEFAULT_MIN_GROUP_SIZE);
    let thresholds = thresholds_from_config(&results.config);
    let per_round: Vec<FairnessMetrics> = results
        .rounds
        .iter()
        .map(|r| FairnessMetrics::from_counts(&r.counts, min_group_size))
        .collect();
    let final_metrics = per_round.last().expect("rounds is not empty");
    let single_attrs: Vec<&String> = final_metrics
        .attributes
        .keys()
        .filter(|k| !GroupCounts::is_intersection(k))
        .collect();
    let inter_attrs: Vec<&String> = final_metrics
        .attributes
        .keys()
        .filter(|k| GroupCounts::is_intersection(k))
        .collect();
    let title = results
        .config
        .get("name")
        .or_else(|| results.config.get("study"))
        .and_then(Value::as_str)
        .map(|n| format!("Fairness report: {n}"))
        .unwrap_or_else(|| "Fairness report".to_string());

    let mut h = String::new();
    let _ = write!(
        h,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <title>{}</title>\n<style>{CSS}</style>\n</head>\n<body>\n<main>\n<h1>{}</h1>\n",
        escape(&title),
        escape(&title)
    );

    // --- At a glance -------------------------------------------------------------------------------
    let accuracy = round_accuracy(last);
    let hospitals_n = last.participants.len().max(last.weights.len());
    let across = match hospitals_n {
        0 => String::new(),
        1 => " at 1 hospital".to_string(),
        n => format!(" across {n} hospitals"),
    };
    let _ = write!(
        h,
        "<section class=\"glance\">\n<h2>At a glance</h2>\n<p>After <b>{} round{}</b> of training{across}, \
         the model classifies <b>{}</b> of the evaluation faces correctly.</p>\n",
        last.round,
        if last.round == 1 { "" } else { "s" },
        pct(accuracy)
    );
    let attrs_map: BTreeMap<String, AttributeMetrics> = final_metrics.attributes.clone();
    let v = verdict(&thresholds, &attrs_map);
    let (cls, head) = match v.outcome {
        Outcome::Pass => ("pass", "Within the study's fairness limits"),
        Outcome::Fail => ("fail", "Outside the study's fairness limits"),
        Outcome::Undetermined => ("unknown", "Fairness verdict not available"),
    };
    let _ = write!(
        h,
        "<p class=\"verdict {cls}\"><b>{head}.</b> {}</p>\n<ul>\n",
        escape(&v.message)
    );
    for a in &single_attrs {
        let m = &final_metrics.attributes[*a];
        let worst = m
            .worst_group
            .as_ref()
            .map(|g| labels.group(a, g).join(", "))
            .unwrap_or_else(|| "n/a".into());
        let _ = writeln!(
            h,
            "<li><b>{}</b>: the group served worst is <b>{}</b> with {} accuracy; \
             demographic parity difference {}, equalized odds difference {}.</li>",
            escape(&labels.attribute(a)),
            escape(&worst),
            pct(m.worst_group_accuracy),
            gap(m.demographic_parity_difference),
            gap(m.equalized_odds_difference)
        );
    }
    h.push_str("</ul>\n</section>\n");

    // --- How to read -------------------------------------------------------------------------------
    let _ = write!(h, "{}", explanations(min_group_size));

    // --- Across rounds -----------------------------------------------------------------------------
    let rounds_x: Vec<f64> = results.rounds.iter().map(|r| r.round as f64).collect();
    h.push_str("<section>\n<h2>Accuracy across training rounds</h2>\n");
    h.push_str(
        "<p>Higher is better. The worst-group lines show the accuracy of whichever group the model \
         served worst in that round; the closer they are to the overall line, the more evenly the \
         model works.</p>\n",
    );
    let mut series = vec![Series {
        name: "Overall accuracy".into(),
        color: 7,
        points: zip_x(&rounds_x, results.rounds.iter().map(round_accuracy).collect()),
        dashed: false,
    }];
    if results.rounds.iter().any(|r| r.test_accuracy.is_some()) {
        series.push(Series {
            name: "Held-out test accuracy".into(),
            color: 6,
            points: zip_x(
                &rounds_x,
                results.rounds.iter().map(|r| r.test_accuracy).collect(),
            ),
            dashed: false,
        });
    }
    for (ai, a) in single_attrs.iter().enumerate() {
        series.push(Series {
            name: format!("Worst {} group", labels.attribute(a).to_lowercase()),
            color: ai,
            points: zip_x(
                &rounds_x,
                per_round
                    .iter()
                    .map(|m| m.attributes.get(*a).and_then(|x| x.worst_group_accuracy))
                    .collect(),
            ),
            dashed: true,
        });
    }
    h.push_str(&line_chart(
        "Accuracy by round",
        "Training round",
        &series,
        Axis::Percent,
        &[],
    ));
    h.push_str("</section>\n");

    h.push_str("<section>\n<h2>Fairness gaps across training rounds</h2>\n");
    h.push_str(
        "<p>Lower is better: 0 means every group is treated alike. A gap of 0.10 means a \
         10-percentage-point difference between the best- and worst-treated group. Solid lines: \
         demographic parity difference; dashed lines: equalized odds difference; dotted red lines: \
         the study's limits.</p>\n",
    );
    let mut series = Vec::new();
    for (ai, a) in single_attrs.iter().enumerate() {
        for (name, get) in [
            (
                "demographic parity",
                (|m: &AttributeMetrics| m.demographic_parity_difference)
                    as fn(&AttributeMetrics) -> Option<f64>,
            ),
            ("equalized odds", |m: &AttributeMetrics| {
                m.equalized_odds_difference
            }),
        ] {
            series.push(Series {
                name: format!("{}, {name}", labels.attribute(a)),
                color: ai,
                points: zip_x(
                    &rounds_x,
                    per_round
                        .iter()
                        .map(|m| m.attributes.get(*a).and_then(get))
                        .collect(),
                ),
                dashed: name.starts_with("equalized"),
            });
        }
    }
    let mut limits = Vec::new();
    if let Some(t) = thresholds.max_demographic_parity_difference {
        limits.push(("Limit: demographic parity".to_string(), t));
    }
    if let Some(t) = thresholds.max_equalized_odds_difference {
        limits.push(("Limit: equalized odds".to_string(), t));
    }
    if series.is_empty() {
        h.push_str("<p>No sensitive attributes were recorded.</p>\n");
    } else {
        h.push_str(&line_chart(
            "Fairness gaps by round",
            "Training round",
            &series,
            Axis::Gap,
            &limits,
        ));
    }
    h.push_str("</section>\n");

    // --- Final model per group ---------------------------------------------------------------------
    let _ = write!(
        h,
        "<section>\n<h2>The final model, group by group (round {})</h2>\n<p>For each group: accuracy \
         and true-positive rate (higher is better) and false-positive rate (lower is better). Similar \
         bars across groups mean the model treats them alike. Faded bars marked “too few” belong to \
         groups with fewer than {min_group_size} examples.</p>\n",
        last.round
    );
    for a in single_attrs.iter().chain(&inter_attrs) {
        let m = &final_metrics.attributes[*a];
        let heading = if GroupCounts::is_intersection(a) {
            format!("{} (intersectional groups)", labels.attribute(a))
        } else {
            labels.attribute(a)
        };
        let _ = writeln!(h, "<h3>{}</h3>", escape(&heading));
        h.push_str(&group_bar_chart(&heading, a, m, &labels));
        h.push_str(&group_table(a, m, &labels));
    }
    h.push_str("</section>\n");

    // --- Privacy -----------------------------------------------------------------------------------
    h.push_str("<section>\n<h2>Privacy budget spent per hospital</h2>\n");
    let hospitals: BTreeSet<&String> = results.rounds.iter().flat_map(|r| r.epsilon.keys()).collect();
    if hospitals.is_empty() {
        h.push_str(
            "<p>This study did not record a differential-privacy budget (ε). Without differential \
             privacy, the model updates carry no formal guarantee about what they reveal about \
             individual patients.</p>\n",
        );
    } else {
        let delta = results.rounds.iter().rev().find_map(|r| r.delta);
        let _ = writeln!(
            h,
            "<p>ε (epsilon) measures how much the model could reveal about any single patient of a \
             hospital: lower is more private, and it grows with every round the hospital trains in. \
             Values around 1 are considered strong protection, values above 10 weak.{}</p>",
            delta
                .map(|d| format!(" The guarantee holds except with probability δ = {d:e}."))
                .unwrap_or_default()
        );
        let series: Vec<Series> = hospitals
            .iter()
            .enumerate()
            .map(|(i, hname)| Series {
                name: (*hname).clone(),
                color: i,
                points: zip_x(
                    &rounds_x,
                    results
                        .rounds
                        .iter()
                        .map(|r| r.epsilon.get(*hname).copied())
                        .collect(),
                ),
                dashed: false,
            })
            .collect();
        h.push_str(&line_chart(
            "Privacy budget ε by round",
            "Training round",
            &series,
            Axis::Auto("ε (privacy loss)"),
            &[],
        ));
    }
    h.push_str("</section>\n");

    // --- Weights -----------------------------------------------------------------------------------
    let weighted: BTreeSet<&String> = results.rounds.iter().flat_map(|r| r.weights.keys()).collect();
    if !weighted.is_empty() {
        h.push_str("<section>\n<h2>How much each hospital counted</h2>\n");
        h.push_str(
            "<p>The share each hospital's training update had in the combined model. Plain federated \
             averaging weighs hospitals by their number of examples; FairFed shifts weight away from \
             hospitals whose local fairness differs most from the overall picture.</p>\n",
        );
        let series: Vec<Series> = weighted
            .iter()
            .enumerate()
            .map(|(i, hname)| Series {
                name: (*hname).clone(),
                color: i,
                points: zip_x(
                    &rounds_x,
                    results
                        .rounds
                        .iter()
                        .map(|r| r.weights.get(*hname).copied())
                        .collect(),
                ),
                dashed: false,
            })
            .collect();
        h.push_str(&line_chart(
            "Aggregation weight by round",
            "Training round",
            &series,
            Axis::Percent,
            &[],
        ));
        h.push_str("</section>\n");
    }

    // --- Rounds table and configuration -------------------------------------------------------------
    h.push_str(
        "<section>\n<h2>Round by round</h2>\n<table>\n<thead><tr><th>Round</th><th class=\"t\">Strategy</th>\
         <th class=\"t\">Hospitals</th><th>Accuracy</th><th>Loss</th></tr></thead>\n<tbody>\n",
    );
    for r in &results.rounds {
        let _ = writeln!(
            h,
            "<tr><td>{}</td><td class=\"t\">{}</td><td class=\"t\">{}</td><td>{}</td><td>{}</td></tr>",
            r.round,
            escape(&r.strategy),
            escape(&r.participants.join(", ")),
            pct(round_accuracy(r)),
            r.loss.map(|l| format!("{l:.4}")).unwrap_or_else(|| "n/a".into())
        );
    }
    h.push_str("</tbody>\n</table>\n</section>\n");
    let config = serde_json::to_string_pretty(&results.config).unwrap_or_default();
    let _ = write!(
        h,
        "<section>\n<h2>Study configuration</h2>\n<p>The exact settings this study ran with.</p>\n\
         <pre>{}</pre>\n</section>\n",
        escape(&config)
    );
    h.push_str("</main>\n</body>\n</html>\n");
    Ok(h)
}

fn round_accuracy(r: &RoundResult) -> Option<f64> {
    r.accuracy.or_else(|| r.counts.overall.accuracy())
}

fn zip_x(xs: &[f64], ys: Vec<Option<f64>>) -> Vec<(f64, Option<f64>)> {
    xs.iter().copied().zip(ys).collect()
}

fn explanations(min_group_size: u64) -> String {
    format!(
        "<section class=\"explain\">\n<h2>How to read this report</h2>\n<dl>\n\
<dt>Accuracy</dt><dd>The share of faces the model classifies correctly.</dd>\n\
<dt>True-positive rate (TPR, sensitivity)</dt><dd>Of the faces whose true answer is “yes” (label 1), \
the share the model also answers “yes”. Higher is better.</dd>\n\
<dt>False-positive rate (FPR)</dt><dd>Of the faces whose true answer is “no” (label 0), the share the \
model wrongly answers “yes”. Lower is better.</dd>\n\
<dt>Selection rate</dt><dd>How often the model answers “yes” at all, whatever the truth.</dd>\n\
<dt>Demographic parity difference</dt><dd>The largest difference in selection rate between any two \
groups. 0 means every group gets “yes” equally often. The ratio (smallest divided by largest) is 1 \
when they are equal.</dd>\n\
<dt>Equalized odds difference</dt><dd>The largest difference between groups in either the true-positive \
rate or the false-positive rate. 0 means the model makes the same kinds of mistakes equally often in \
every group, which is usually what matters clinically.</dd>\n\
<dt>Worst-group accuracy</dt><dd>The accuracy of the group the model serves worst.</dd>\n\
<dt>Intersectional groups</dt><dd>Groups defined by several attributes at once (for example women of \
one ethnicity). A model can look fair for each attribute separately and still fail one such group.</dd>\n\
<dt>Too few examples</dt><dd>Groups with fewer than {min_group_size} examples are shown faded and left \
out of the gaps: their rates are mostly chance.</dd>\n\
<dt>Where the numbers come from</dt><dd>Each hospital evaluated the shared model on its own data and \
sent only counts of right and wrong answers per group; no image or individual prediction left a \
hospital.</dd>\n</dl>\n</section>\n"
    )
}

fn group_table(attr: &str, m: &AttributeMetrics, labels: &Labels) -> String {
    let mut t = String::from(
        "<table>\n<thead><tr><th>Group</th><th>Examples</th><th>Accuracy</th><th>TPR</th><th>FPR</th>\
         <th>Selection rate</th></tr></thead>\n<tbody>\n",
    );
    for (g, gm) in &m.groups {
        let _ = writeln!(
            t,
            "<tr{}><td>{}</td><td>{}{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            if gm.insufficient_data {
                " class=\"few\""
            } else {
                ""
            },
            escape(&labels.group(attr, g).join(", ")),
            gm.count,
            if gm.insufficient_data { " (too few)" } else { "" },
            pct(gm.accuracy),
            pct(gm.tpr),
            pct(gm.fpr),
            pct(gm.selection_rate)
        );
    }
    let _ = write!(
        t,
        "</tbody>\n</table>\n<p class=\"gaps\">Demographic parity difference <b>{}</b> (ratio {}); \
         equalized odds difference <b>{}</b> (ratio {}).</p>\n",
        gap(m.demographic_parity_difference),
        gap(m.demographic_parity_ratio),
        gap(m.equalized_odds_difference),
        gap(m.equalized_odds_ratio)
    );
    t
}

// ------------------------------------------------------------------------------------------------
// SVG charts

struct Series {
    name: String,
    /// Index into [`PALETTE`].
    color: usize,
    points: Vec<(f64, Option<f64>)>,
    dashed: bool,
}

enum Axis {
    /// 0..1 shown as 0%..100%.
    Percent,
    /// 0..max, at least 0..0.2, shown as decimals.
    Gap,
    /// 0..max with a unit name.
    Auto(&'static str),
}

fn nice_step(max: f64, ticks: f64) -> f64 {
    let raw = (max / ticks).max(1e-9);
    let mag = 10f64.powf(raw.log10().floor());
    let f = raw / mag;
    let nice = if f <= 1.0 {
        1.0
    } else if f <= 2.0 {
        2.0
    } else if f <= 2.5 {
        2.5
    } else if f <= 5.0 {
        5.0
    } else {
        10.0
    };
    nice * mag
}

fn fmt_tick(v: f64, axis: &Axis) -> String {
    match axis {
        Axis::Percent => format!("{:.0}%", v * 100.0),
        _ => {
            let v = (v * 1e9).round() / 1e9;
            if v == v.trunc() {
                format!("{v:.0}")
            } else if (v * 10.0) == (v * 10.0).round() {
                format!("{v:.1}")
            } else {
                format!("{v:.2}")
            }
        }
    }
}

const W: f64 = 900.0;
const ML: f64 = 64.0;
const MR: f64 = 250.0;
const MT: f64 = 36.0;
const MB: f64 = 52.0;

fn line_chart(title: &str, x_label: &str, series: &[Series], axis: Axis, limits: &[(String, f64)]) -> String {
    let h = 340.0;
    let pw = W - ML - MR;
    let ph = h - MT - MB;
    let xs: Vec<f64> = series.iter().flat_map(|s| s.points.iter().map(|p| p.0)).collect();
    let (mut x0, mut x1) = (
        xs.iter().copied().fold(f64::INFINITY, f64::min),
        xs.iter().copied().fold(f64::NEG_INFINITY, f64::max),
    );
    if !x0.is_finite() {
        (x0, x1) = (0.0, 1.0);
    }
    if x1 - x0 < 1.0 {
        x0 -= 0.5;
        x1 += 0.5;
    }
    let ymax_data = series
        .iter()
        .flat_map(|s| s.points.iter().filter_map(|p| p.1))
        .chain(limits.iter().map(|l| l.1))
        .fold(0.0f64, f64::max);
    let (ymax, step) = match axis {
        Axis::Percent => (1.0, 0.2),
        Axis::Gap => {
            let step = nice_step(ymax_data.max(0.2), 5.0);
            ((ymax_data.max(0.2) / step).ceil() * step, step)
        }
        Axis::Auto(_) => {
            let step = nice_step(ymax_data.max(1e-6), 5.0);
            (((ymax_data.max(1e-6)) / step).ceil() * step, step)
        }
    };
    let sx = |x: f64| ML + (x - x0) / (x1 - x0) * pw;
    let sy = |y: f64| MT + ph - (y / ymax).clamp(0.0, 1.0) * ph;
    let mut s = svg_open(title, h);
    let _ = writeln!(
        s,
        "<text x=\"{ML}\" y=\"22\" class=\"ct\">{}</text>",
        escape(title)
    );
    // y grid
    let mut y = 0.0;
    while y <= ymax + step * 0.001 {
        let _ = writeln!(
            s,
            "<line x1=\"{ML}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" class=\"grid\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" class=\"yt\">{}</text>",
            ML + pw,
            sy(y),
            sy(y),
            ML - 8.0,
            sy(y) + 4.0,
            fmt_tick(y, &axis)
        );
        y += step;
    }
    if let Axis::Auto(unit) = axis {
        let _ = writeln!(
            s,
            "<text x=\"16\" y=\"{:.1}\" class=\"al\" transform=\"rotate(-90 16 {:.1})\">{}</text>",
            MT + ph / 2.0,
            MT + ph / 2.0,
            escape(unit)
        );
    }
    // x ticks: integers, at most ~12
    let span = (x1 - x0).ceil().max(1.0);
    let xstep = (span / 12.0).ceil().max(1.0);
    let mut x = x0.ceil();
    while x <= x1 + 1e-9 {
        let _ = writeln!(
            s,
            "<line x1=\"{:.1}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" class=\"axis\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" class=\"xt\">{x:.0}</text>",
            sx(x),
            sx(x),
            MT + ph,
            MT + ph + 5.0,
            sx(x),
            MT + ph + 20.0
        );
        x += xstep;
    }
    let _ = writeln!(
        s,
        "<line x1=\"{ML}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" class=\"axis\"/>\
         <text x=\"{:.1}\" y=\"{:.1}\" class=\"al\">{}</text>",
        ML + pw,
        MT + ph,
        MT + ph,
        ML + pw / 2.0,
        h - 10.0,
        escape(x_label)
    );
    // threshold lines
    for (name, v) in limits {
        let _ = writeln!(
            s,
            "<line x1=\"{ML}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" class=\"limit\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" class=\"lt\">{} ({})</text>",
            ML + pw,
            sy(*v),
            sy(*v),
            ML + pw - 4.0,
            sy(*v) - 5.0,
            escape(name),
            fmt_tick(*v, &Axis::Gap)
        );
    }
    // series
    for (i, se) in series.iter().enumerate() {
        let color = PALETTE[se.color % PALETTE.len()];
        let mut d = String::new();
        let mut pen_down = false;
        for (x, y) in &se.points {
            match y {
                Some(y) => {
                    let _ = write!(
                        d,
                        "{}{:.1} {:.1} ",
                        if pen_down { "L" } else { "M" },
                        sx(*x),
                        sy(*y)
                    );
                    pen_down = true;
                }
                None => pen_down = false,
            }
        }
        if !d.is_empty() {
            let _ = writeln!(
                s,
                "<path d=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"2.5\"{} class=\"series\"/>",
                d.trim_end(),
                if se.dashed {
                    " stroke-dasharray=\"7 4\""
                } else {
                    ""
                }
            );
        }
        for (x, y) in &se.points {
            if let Some(y) = y {
                let _ = writeln!(
                    s,
                    "<circle cx=\"{:.1}\" cy=\"{:.1}\" r=\"3.5\" fill=\"{color}\">\
                     <title>{}, round {x:.0}: {}</title></circle>",
                    sx(*x),
                    sy(*y),
                    escape(&se.name),
                    match axis {
                        Axis::Percent => format!("{:.1}%", y * 100.0),
                        _ => format!("{y:.3}"),
                    }
                );
            }
        }
        // legend
        let ly = MT + 6.0 + i as f64 * 20.0;
        let lx = W - MR + 16.0;
        let _ = writeln!(
            s,
            "<line x1=\"{lx:.1}\" x2=\"{:.1}\" y1=\"{ly:.1}\" y2=\"{ly:.1}\" stroke=\"{color}\" \
             stroke-width=\"3\"{}/><text x=\"{:.1}\" y=\"{:.1}\" class=\"lg\">{}</text>",
            lx + 22.0,
            if se.dashed {
                " stroke-dasharray=\"7 4\""
            } else {
                ""
            },
            lx + 28.0,
            ly + 4.0,
            escape(&truncate(&se.name, 34))
        );
    }
    s.push_str("</svg>\n</figure>\n");
    s
}

fn truncate(s: &str, n: usize) -> String {
    if s.chars().count() <= n {
        s.to_string()
    } else {
        s.chars().take(n - 1).collect::<String>() + "…"
    }
}

fn svg_open(title: &str, h: f64) -> String {
    format!(
        "<figure>\n<svg viewBox=\"0 0 {W} {h}\" width=\"{W}\" height=\"{h}\" role=\"img\" \
         aria-label=\"{}\" class=\"chart\">\n",
        escape(title)
    )
}

fn group_bar_chart(title: &str, attr: &str, m: &AttributeMetrics, labels: &Labels) -> String {
    let n = m.groups.len().max(1) as f64;
    let lines = attr.split(INTERSECTION_SEP).count() as f64;
    let slot = ((W - ML - 30.0) / n).clamp(48.0, 150.0);
    let w = (ML + 30.0 + slot * n).max(W);
    let ph = 220.0;
    let mt = 40.0;
    let mb = 30.0 + 15.0 * (lines + 1.0);
    let h = mt + ph + mb;
    let sy = |y: f64| mt + ph - y.clamp(0.0, 1.0) * ph;
    let mut s = format!(
        "<figure>\n<svg viewBox=\"0 0 {w} {h}\" width=\"{w}\" height=\"{h}\" role=\"img\" \
         aria-label=\"{}\" class=\"chart\">\n<text x=\"{ML}\" y=\"22\" class=\"ct\">{}</text>\n",
        escape(title),
        escape("Accuracy, TPR and FPR per group")
    );
    for (i, (name, color)) in [("Accuracy", C_ACC), ("TPR", C_TPR), ("FPR", C_FPR)]
        .iter()
        .enumerate()
    {
        let lx = w - 300.0 + i as f64 * 95.0;
        let _ = writeln!(
            s,
            "<rect x=\"{lx:.1}\" y=\"12\" width=\"14\" height=\"14\" fill=\"{color}\"/>\
             <text x=\"{:.1}\" y=\"24\" class=\"lg\">{name}</text>",
            lx + 19.0
        );
    }
    for k in 0..=5 {
        let y = k as f64 * 0.2;
        let _ = writeln!(
            s,
            "<line x1=\"{ML}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" class=\"grid\"/>\
             <text x=\"{:.1}\" y=\"{:.1}\" class=\"yt\">{:.0}%</text>",
            w - 10.0,
            sy(y),
            sy(y),
            ML - 8.0,
            sy(y) + 4.0,
            y * 100.0
        );
    }
    let bw = ((slot - 16.0) / 3.0).min(30.0);
    for (i, (g, gm)) in m.groups.iter().enumerate() {
        let cx = ML + 15.0 + slot * (i as f64 + 0.5);
        let x_start = cx - 1.5 * bw;
        let opacity = if gm.insufficient_data { 0.3 } else { 1.0 };
        let name = labels.group(attr, g).join(", ");
        for (j, (v, color, metric)) in [
            (gm.accuracy, C_ACC, "accuracy"),
            (gm.tpr, C_TPR, "TPR"),
            (gm.fpr, C_FPR, "FPR"),
        ]
        .iter()
        .enumerate()
        {
            let x = x_start + j as f64 * bw;
            match v {
                Some(v) => {
                    let _ = writeln!(
                        s,
                        "<rect x=\"{x:.1}\" y=\"{:.1}\" width=\"{:.1}\" height=\"{:.1}\" fill=\"{color}\" \
                         fill-opacity=\"{opacity}\" class=\"bar\"><title>{}: {metric} {:.1}%</title></rect>",
                        sy(*v),
                        bw - 2.0,
                        (mt + ph - sy(*v)).max(0.5),
                        escape(&name),
                        v * 100.0
                    );
                }
                None => {
                    let _ = writeln!(
                        s,
                        "<text x=\"{:.1}\" y=\"{:.1}\" class=\"na\">n/a</text>",
                        x + bw / 2.0 - 1.0,
                        mt + ph - 4.0
                    );
                }
            }
        }
        let mut ty = mt + ph + 16.0;
        for part in labels.group(attr, g) {
            let _ = writeln!(
                s,
                "<text x=\"{cx:.1}\" y=\"{ty:.1}\" class=\"xt\">{}</text>",
                escape(&truncate(&part, (slot / 7.0) as usize + 2))
            );
            ty += 15.0;
        }
        let _ = writeln!(
            s,
            "<text x=\"{cx:.1}\" y=\"{ty:.1}\" class=\"xn\">n={}{}</text>",
            gm.count,
            if gm.insufficient_data { ", too few" } else { "" }
        );
    }
    let _ = writeln!(
        s,
        "<line x1=\"{ML}\" x2=\"{:.1}\" y1=\"{:.1}\" y2=\"{:.1}\" class=\"axis\"/>",
        w - 10.0,
        mt + ph,
        mt + ph
    );
    s.push_str("</svg>\n</figure>\n");
    s
}

const CSS: &str = "
body{margin:0;background:#fafafa;color:#1a1a1a;font:16px/1.5 system-ui,-apple-system,'Segoe UI',\
Roboto,'DejaVu Sans',Arial,sans-serif}
main{max-width:960px;margin:0 auto;padding:24px 28px 60px;background:#fff}
h1{font-size:1.9em;margin:.2em 0 .6em}
h2{font-size:1.35em;margin-top:1.8em;border-bottom:2px solid #e3e3e3;padding-bottom:.2em}
h3{font-size:1.1em;margin:1.4em 0 .3em}
.glance{background:#f1f6fb;border:1px solid #cfe0ef;border-radius:8px;padding:4px 20px 10px}
.verdict{padding:8px 12px;border-radius:6px}
.verdict.pass{background:#e3f4ea;border-left:6px solid #009E73}
.verdict.fail{background:#fbe7df;border-left:6px solid #D55E00}
.verdict.unknown{background:#efefef;border-left:6px solid #666}
dt{font-weight:600;margin-top:.5em}
dd{margin-left:1.2em}
figure{margin:8px 0;overflow-x:auto}
svg.chart{max-width:100%;height:auto;font-family:inherit}
.ct{font-size:16px;font-weight:600;fill:#1a1a1a}
.grid{stroke:#e4e4e4;stroke-width:1}
.axis{stroke:#444;stroke-width:1.2}
.limit{stroke:#b00020;stroke-width:1.5;stroke-dasharray:3 3}
.lt{font-size:12px;fill:#b00020;text-anchor:end}
.yt{font-size:12px;fill:#444;text-anchor:end}
.xt{font-size:12px;fill:#333;text-anchor:middle}
.xn{font-size:11px;fill:#666;text-anchor:middle}
.al{font-size:13px;fill:#333;text-anchor:middle}
.lg{font-size:13px;fill:#1a1a1a}
.na{font-size:10px;fill:#888;text-anchor:middle}
table{border-collapse:collapse;margin:6px 0;font-size:.92em}
th,td{border:1px solid #ddd;padding:4px 10px;text-align:right}
th:first-child,td:first-child,.t{text-align:left}
thead th{background:#f3f3f3}
tr.few td{color:#888;font-style:italic}
.gaps{font-size:.95em}
pre{background:#f6f6f6;border:1px solid #e2e2e2;padding:12px;overflow-x:auto;font-size:.85em}
";

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::utkface_group_labels;

    fn study() -> StudyResults {
        let mut rounds = Vec::new();
        for r in 1..=3u32 {
            let mut c = GroupCounts::new();
            for i in 0..400u32 {
                let race = (i % 5).to_string();
                let gender = ((i / 5) % 2).to_string();
                let label = i % 3 == 0;
                // Race 4 is served worse early on; everyone improves.
                let wrong_every = if race == "4" { 2 + r } else { 4 + 2 * r };
                let pred = if i % wrong_every == 0 { !label } else { label };
                c.record(&[("race", &race), ("gender", &gender)], label, pred)
                    .unwrap();
            }
            rounds.push(RoundResult {
                round: r,
                strategy: "fairfed".into(),
                participants: vec!["hospital-a".into(), "hospital-b".into()],
                loss: Some(1.0 / r as f64),
                counts: c,
                epsilon: [
                    ("hospital-a".to_string(), 0.4 * r as f64),
                    ("hospital-b".to_string(), 0.5 * r as f64),
                ]
                .into(),
                weights: [
                    ("hospital-a".to_string(), 0.5 + 0.05 * r as f64),
                    ("hospital-b".to_string(), 0.5 - 0.05 * r as f64),
                ]
                .into(),
                ..Default::default()
            });
        }
        let mut config = serde_json::json!({
            "name": "demo <study>",
            "fairness": {"maxDemographicParityDifference": 0.1, "maxEqualizedOddsDifference": 0.15}
        });
        config["group_labels"] = serde_json::to_value(utkface_group_labels()).unwrap();
        StudyResults { config, rounds }
    }

    #[test]
    fn renders_all_sections() {
        let html = render_html(&study(), &ReportOptions { min_group_size: None }).unwrap();
        assert!(html.starts_with("<!DOCTYPE html>"));
        assert!(html.contains("demo &lt;study&gt;"), "title is escaped");
        assert!(!html.contains("<study>"));
        assert!(
            html.matches("<svg").count() >= 6,
            "rounds×2, groups×3, ε, weights"
        );
        assert!(html.contains("Privacy budget ε by round"));
        assert!(html.contains("Gender × Race (intersectional groups)"));
        assert!(html.contains("Asian"));
        assert!(html.contains("Limit: equalized odds"));
        assert!(!html.contains("http://") && !html.contains("https://"));
        assert!(!html.contains("<script"));
    }

    #[test]
    fn thresholds_are_found_in_any_spelling() {
        let t = thresholds_from_config(&serde_json::json!({"spec": {"fairness": {
            "max_demographic_parity_difference": 0.2, "maxEOD": 0.3}}}));
        assert_eq!(t.max_demographic_parity_difference, Some(0.2));
        assert_eq!(t.max_equalized_odds_difference, Some(0.3));
    }

    #[test]
    fn no_rounds_is_an_error() {
        let r = StudyResults {
            config: serde_json::json!({}),
            rounds: vec![],
        };
        assert!(matches!(
            render_html(&r, &ReportOptions { min_group_size: None }),
            Err(ReportError::NoRounds)
        ));
    }
}
